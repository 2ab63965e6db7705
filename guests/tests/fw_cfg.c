/*
 * fw_cfg (legacy I/O 0x510/0x511): signature, ID, CPU count and RAM size, checked against what the test
 * harness passed on the command line (cpus=N mem=BYTES), and against the Multiboot information.
 */
#include "rt.h"

int main(void)
{
    u64 sig = fw_cfg_read(FW_CFG_SIGNATURE, 4);
    report(sig == 0x554D4551, "fw_cfg signature is \"QEMU\" (read %lx)", sig);
    report(fw_cfg_read(FW_CFG_ID, 4) & 1, "fw_cfg ID has the traditional-interface bit");
    u64 cpus = fw_cfg_nb_cpus();
    u64 want_cpus = arg_u64("cpus", 0);
    report(want_cpus && cpus == want_cpus, "fw_cfg NB_CPUS is %lu (expected %lu)", cpus, want_cpus);
    u64 ram = fw_cfg_ram_size();
    u64 want_ram = arg_u64("mem", 0);
    report(want_ram && ram == want_ram, "fw_cfg RAM_SIZE is %lu (expected %lu)", ram, want_ram);
    /* mem_upper: KiB of RAM from 1 MiB up (QEMU reports 128 KiB less than the whole; allow up to 1 MiB). */
    u64 upper = (u64)boot_mem_upper_kib() * 1024;
    if (want_ram && want_ram <= (3ULL << 30))
        report(upper + (1 << 20) <= want_ram && upper + (2 << 20) >= want_ram,
               "Multiboot mem_upper covers RAM: %lu KiB", upper >> 10);
    /* a few reads past the end of an item and of an unknown key read 0 */
    outw(0x510, FW_CFG_NB_CPUS);
    inb(0x511);
    inb(0x511);
    report(inb(0x511) == 0 && inb(0x511) == 0, "reads past the end of an item return 0");
    report(fw_cfg_read(0x7FFF, 8) == 0, "an unknown key reads 0");
    /* re-selecting resets the offset */
    report(fw_cfg_nb_cpus() == cpus, "selecting again restarts the item");
    return 0;
}

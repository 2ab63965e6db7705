/* The smallest guest: prints a line over serial and passes. Used to smoke-test the VMM. */
#include "rt.h"

int main(void)
{
    printf("hello from the enlighten guest runtime (booted via %s, magic %x)\n",
           booted_via_elf64() ? "ELF64" : "multiboot", boot_entry_magic());
    report(boot_entry_magic() == 0x2BADB002, "entry magic is 0x2BADB002");
    return 0;
}

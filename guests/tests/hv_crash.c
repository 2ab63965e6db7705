/*
 * Guest panic through the Hyper-V crash MSRs: fills CRASH_P0..P4 with known values and writes CRASH_CTL with
 * the notify bit. With `continue=1` (-action panic=none) the guest must keep running and passes; otherwise it
 * spins until the VMM stops it (shutdown, exit-failure, pause).
 */
#include "rt.h"
#include "hv.h"

int main(void)
{
    static const u64 params[5] = {0x1e, 0xfffff80012345678ul, 0, 1, 0xffffffffffffffffl};
    for (u32 i = 0; i < 5; i++)
        wrmsr(HV_MSR_CRASH_P0 + i, params[i]);
    report(rdmsr(HV_MSR_CRASH_CTL) == HV_CRASH_CTL_NOTIFY, "CRASH_CTL advertises the notify bit");
    printf("crash: notifying\n");
    wrmsr(HV_MSR_CRASH_CTL, HV_CRASH_CTL_NOTIFY);
    if (arg_u64("continue", 0)) {
        report(true, "the guest continues after the crash notification");
        bool same = true;
        for (u32 i = 0; i < 5; i++)
            same &= rdmsr(HV_MSR_CRASH_P0 + i) == params[i];
        report(same, "CRASH_P0..P4 keep their values");
        return 0;
    }
    /* The VMM stops the VM (or every vCPU): spin without exits so that a stopped vCPU is visible as idle. */
    for (;;)
        pause();
}

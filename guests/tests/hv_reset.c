/*
 * Hyper-V RESET: the first boot sets Hyper-V state (GUEST_OS_ID, hypercall page, TSC page, crash parameters,
 * re-enlightenment), waits until 3.2 s of reference time and writes RESET = 1. The VMM resets the whole VM and
 * reloads the kernel, which runs again from its entry. Reference time survives a reset (as in KVM), so a boot
 * that starts after 3 s of reference time is the second one: it checks that the Hyper-V state reads as after
 * power-on and that reference time did not step back.
 */
#include "rt.h"
#include "hv.h"

#define SECOND_BOOT_AFTER 30000000ul /* 3 s of reference time */
#define RESET_AT 32000000ul

int main(void)
{
    smp_init();
    u64 ref = rdmsr(HV_MSR_TIME_REF_COUNT);
    u64 osid = rdmsr(HV_MSR_GUEST_OS_ID), hc = rdmsr(HV_MSR_HYPERCALL), tsc = rdmsr(HV_MSR_REFERENCE_TSC);
    u64 p0 = rdmsr(HV_MSR_CRASH_P0), re = rdmsr(HV_MSR_REENLIGHTENMENT_CONTROL);
    if (ref < SECOND_BOOT_AFTER) {
        printf("first boot: %u CPUs, reference time %lu\n", nr_cpus(), ref);
        report(osid == 0 && hc == 0, "first boot: GUEST_OS_ID and HYPERCALL read 0");
        void *hcpage = hv_enable_hypercalls();
        report(hcpage && hv_hypercall(0x7FFF, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
               "first boot: hypercalls work");
        void *tscpage = alloc_pages(1);
        wrmsr(HV_MSR_REFERENCE_TSC, (u64)tscpage | 1);
        wrmsr(HV_MSR_CRASH_P0, 0x1234);
        wrmsr(HV_MSR_REENLIGHTENMENT_CONTROL, 0x10030);
        report(rdmsr(HV_MSR_GUEST_OS_ID) != 0 && rdmsr(HV_MSR_REFERENCE_TSC) != 0 && rdmsr(HV_MSR_CRASH_P0) == 0x1234,
               "first boot: Hyper-V state set");
        while (rdmsr(HV_MSR_TIME_REF_COUNT) < RESET_AT)
            pause();
        printf("first boot: writing RESET\n");
        wrmsr(HV_MSR_RESET, 1);
        for (;;)
            pause();
    }
    printf("second boot: %u CPUs, reference time %lu\n", nr_cpus(), ref);
    report(ref >= RESET_AT, "reference time continued across the reset (%lu >= %lu)", ref, RESET_AT);
    report(osid == 0, "GUEST_OS_ID reads 0 after the reset (%lx)", osid);
    report(hc == 0, "HYPERCALL reads 0 after the reset (%lx)", hc);
    report(tsc == 0, "REFERENCE_TSC reads 0 after the reset (%lx)", tsc);
    report(p0 == 0, "CRASH_P0 reads 0 after the reset (%lx)", p0);
    report(re == 0, "REENLIGHTENMENT_CONTROL reads 0 after the reset (%lx)", re);
    report(nr_cpus() == fw_cfg_nb_cpus(), "every vCPU came back after the reset (%u)", nr_cpus());
    report(hv_enable_hypercalls() && hv_hypercall(0x7FFF, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "hypercalls can be enabled again");
    return 0;
}

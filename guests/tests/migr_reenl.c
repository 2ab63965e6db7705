/*
 * Migration rule test: the guest enables re-enlightenment notifications (REENLIGHTENMENT_CONTROL bit 16), then
 * keeps counting reference time for `ms=N` milliseconds (default 3000) and checks it never steps back. QEMU's rule:
 * migrating such a guest needs `tsc-frequency=` on the destination; without it the destination refuses the load
 * and the source resumes and finishes this guest.
 */
#include "rt.h"
#include "hv.h"

int main(void)
{
    u32 feax = hv_features_eax();
    if (!(feax & HV_EAX_REENLIGHTENMENT))
        fail("no re-enlightenment in CPUID (features %x)", feax);
    wrmsr(HV_MSR_REENLIGHTENMENT_CONTROL, 0x40 | (1u << 16));
    report((rdmsr(HV_MSR_REENLIGHTENMENT_CONTROL) & (1u << 16)) != 0, "re-enlightenment notifications enabled");
    u64 ms = arg_u64("ms", 3000);
    u64 start = rdmsr(HV_MSR_TIME_REF_COUNT), prev = start, backwards = 0;
    while (prev - start < ms * 10000) {
        u64 t = rdmsr(HV_MSR_TIME_REF_COUNT);
        if (t < prev)
            backwards++;
        prev = t;
        tsc_delay(1000000);
    }
    report(backwards == 0, "reference time never stepped back over %lu ms (%lu backward steps)", ms, backwards);
    return 0;
}

/*
 * Live-migration test: keeps `pages=N` pages (default 512, 2 MiB) dirty for `ms=N` ms of reference time
 * (default 4000) while the test migrates the VM with iterative pre-copy. Round r checks that every page still
 * holds r in its first and last word (the previous round's write) and writes r + 1 there, so a page update
 * that a migration lost shows as a mismatch on the destination. Reference time (TIME_REF_COUNT) must never
 * step back. `spin=N` (default 0) adds N loop iterations of work after each page write, for the auto-converge
 * test: the dirty rate is then proportional to the CPU time the vCPU gets, so throttling it slows the guest
 * down. After the first round, once every page has been written, it prints "dirtying N pages at R pages/s"
 * (R: that round's rate, from reference time).
 */
#include "rt.h"
#include "hv.h"

int main(void)
{
    if (!(hv_features_eax() & HV_EAX_TIME_REF_COUNT))
        fail("needs hv-time (TIME_REF_COUNT)");
    u64 npages = arg_u64("pages", 512), ms = arg_u64("ms", 4000), spin = arg_u64("spin", 0);
    volatile u64 *buf = alloc_pages((unsigned)npages);
    u64 start = rdmsr(HV_MSR_TIME_REF_COUNT), prev = start, backwards = 0, bad = 0, round = 0;
    while (prev - start < ms * 10000) {
        for (u64 p = 0; p < npages; p++) {
            volatile u64 *w = buf + p * 512;
            if (w[0] != round || w[511] != round)
                bad++;
            w[0] = round + 1;
            w[511] = round + 1;
            for (volatile u64 i = 0; i < spin; i++)
                ;
        }
        u64 t = rdmsr(HV_MSR_TIME_REF_COUNT);
        if (t < prev)
            backwards++;
        if (++round == 1) {
            u64 ticks = t > start ? t - start : 1;
            printf("dirtying %lu pages at %lu pages/s\n", (unsigned long)npages,
                   (unsigned long)(npages * 10000000 / ticks));
        }
        prev = t;
    }
    report(bad == 0, "every page kept its last write (%lu pages x %lu rounds, %lu mismatches)",
           (unsigned long)npages, (unsigned long)round, (unsigned long)bad);
    report(backwards == 0, "reference time never stepped back (%lu backward steps)", (unsigned long)backwards);
    report(round >= 2, "the pages were rewritten %lu times", (unsigned long)round);
    return 0;
}

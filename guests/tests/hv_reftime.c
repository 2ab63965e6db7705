/*
 * Reference time on every vCPU at once: each CPU interleaves reference-TSC-page reads at CPL 3 (native, no exit)
 * with page / TIME_REF_COUNT / page triples at CPL 0. Checks: no backwards step on any CPU, page <= MSR <= page,
 * the sequence is never 0 or 0xFFFFFFFF, and reference time advances at 10 MHz against the TSC.
 * Arguments: `rounds=N` (default 500), `reads=N` CPL-3 reads per round (default 2000), `min_ms=N`: keep going
 * after `rounds` until N ms of reference time have passed (default 0), so that a run lasts long enough
 * whatever the host's speed (the migration tests migrate it mid-run).
 */
#include "rt.h"
#include "hv.h"

static struct hv_tsc_page *page;
static u64 reads_per_round;

struct cpu_result {
    u64 rounds, user_reads, backwards, order_errors, bad_seq, first, last;
    u64 bad_a, bad_m, bad_b;
    volatile u32 done;
};
static struct cpu_result results[MAX_CPUS];

/* CPL 3: `reads` page reads, each >= the previous and >= start. Returns the last value, or 0 on a backwards step
 * or an invalid page. */
static u64 user_reads(u64 start)
{
    u64 prev = start;
    for (u64 i = 0; i < reads_per_round; i++) {
        u64 t;
        if (!hv_tsc_page_read(page, &t) || t < prev)
            return 0;
        prev = t;
    }
    return prev;
}

static u64 min_ref; /* 100 ns units; 0 = just `rounds` */

static void worker(void *arg)
{
    u64 rounds = (u64)arg;
    struct cpu_result *r = &results[smp_id()];
    u64 last = 0;
    for (u64 i = 0; i < rounds || (min_ref && last - r->first < min_ref); i++) {
        u64 u = run_user(user_reads, last);
        if (u == 0)
            r->backwards++;
        else
            last = u;
        r->user_reads += reads_per_round;
        u32 seq = page->sequence;
        if (seq == 0 || seq == 0xFFFFFFFF)
            r->bad_seq++;
        u64 a = 0, b = 0, m;
        if (!hv_tsc_page_read(page, &a))
            r->bad_seq++;
        m = rdmsr(HV_MSR_TIME_REF_COUNT);
        if (!hv_tsc_page_read(page, &b))
            r->bad_seq++;
        if (a < last || b < a)
            r->backwards++;
        if (!(a <= m && m <= b)) {
            if (!r->order_errors) {
                r->bad_a = a;
                r->bad_m = m;
                r->bad_b = b;
            }
            r->order_errors++;
        }
        if (i == 0)
            r->first = a;
        last = b;
        r->rounds++;
    }
    r->last = last;
    WRITE_ONCE(r->done, 1);
}

int main(void)
{
    u32 feax = hv_features_eax();
    if (!(feax & HV_EAX_REFERENCE_TSC))
        fail("no reference TSC page in CPUID (features %x)", feax);
    smp_init();
    page = alloc_pages(1);
    wrmsr(HV_MSR_REFERENCE_TSC, (u64)page | 1);
    report(page->sequence != 0 && page->sequence != 0xFFFFFFFF, "the TSC page is valid (sequence %x)",
           page->sequence);
    u64 rounds = arg_u64("rounds", 500);
    reads_per_round = arg_u64("reads", 2000);
    min_ref = arg_u64("min_ms", 0) * 10000;
    u32 n = nr_cpus();
    u64 tsc0 = rdtsc(), ref0 = rdmsr(HV_MSR_TIME_REF_COUNT);
    for (u32 cpu = 1; cpu < n; cpu++)
        on_cpu_async(cpu, worker, (void *)rounds);
    worker((void *)rounds);
    for (u32 cpu = 1; cpu < n; cpu++)
        while (!READ_ONCE(results[cpu].done))
            pause();
    u64 tsc1 = rdtsc(), ref1 = rdmsr(HV_MSR_TIME_REF_COUNT);
    for (u32 cpu = 0; cpu < n; cpu++) {
        struct cpu_result *r = &results[cpu];
        report(r->rounds >= rounds, "CPU %u ran %lu rounds (%lu CPL-3 page reads)", cpu, r->rounds, r->user_reads);
        report(r->backwards == 0, "CPU %u: reference time never stepped back (%lu backward steps)", cpu,
               r->backwards);
        report(r->order_errors == 0, "CPU %u: page <= TIME_REF_COUNT <= page in every round (%lu errors; first %lu %lu %lu)",
               cpu, r->order_errors, r->bad_a, r->bad_m, r->bad_b);
        report(r->bad_seq == 0, "CPU %u: the sequence was never 0 or 0xFFFFFFFF", cpu);
        report(r->last > r->first, "CPU %u: reference time advanced by %lu (100 ns)", cpu, r->last - r->first);
    }
    u64 hz = tsc_hz_from_cpuid();
    u64 msr_hz = 0;
    if (!hz && rdmsr_safe(HV_MSR_TSC_FREQUENCY, &msr_hz) == 0)
        hz = msr_hz;
    u64 elapsed = ref1 - ref0;
    report_info("%lu vCPUs, %lu ms of reference time", (u64)n, elapsed / 10000);
    if (hz) {
        u64 expect = (tsc1 - tsc0) * 10000000 / hz;
        u64 diff = expect > elapsed ? expect - elapsed : elapsed - expect;
        report(diff * 100 <= expect, "reference time ran at 10 MHz against the TSC (%lu vs %lu)", elapsed, expect);
    }
    return 0;
}

/*
 * Benchmark guest (bench/run, issue 9): a 1 ms periodic tick on every vCPU, for accuracy and idle cost.
 *
 * Arguments: timer=stimer|apic (default stimer), secs=N (default 10), period_us=N (default 1000).
 * - timer=stimer: synthetic timer 0 of each vCPU in direct mode (vector 0x41), periodic, SynIC enabled.
 * - timer=apic: the local APIC timer, periodic (x2APIC or xAPIC from mode=).
 * Every vCPU idles in `sti; hlt` between ticks. The BSP timestamps each tick with reference time (the TSC
 * page, 100 ns units) and, after `secs`, prints
 *   BENCH timer kind=... ticks=... expected=... skipped=... mean_period_100ns_x1000=... p50_ns=... p99_ns=...
 *   max_ns=... early=...
 * where lateness of tick i is its reference time minus the latest period boundary start + k*period not
 * later than it (k strictly increasing), and skipped counts boundaries without a tick.
 */
#include "rt.h"
#include "hv.h"

#define VEC 0x41
#define HV_MSR_SCONTROL 0x40000080
#define HV_MSR_STIMER0_CONFIG 0x400000B0
#define HV_MSR_STIMER0_COUNT 0x400000B1
#define HV_EAX_SYNTIMERS (1u << 3)
#define HV_EDX_STIMER_DIRECT (1u << 19)
#define HIST_BUCKETS 4096 /* 1 us buckets, 0 .. 4 ms; beyond counts in the last */

static const struct hv_tsc_page *tsc_page;
static bool use_stimer;
static u64 period_100ns;
static volatile bool done;

/* BSP: the guest TSC at each tick (the handler does as little as possible: CPL 0 code is emulated here), turned
 * into reference time and statistics afterwards at CPL 3, where this host runs code natively. */
#define MAX_TICKS 200000
static u64 tick_tsc[MAX_TICKS];
static volatile u64 ticks;
static u64 t_start; /* reference time of the first boundary (arm time + period) */
static u64 scale;
static s64 offset;
static u32 hist[HIST_BUCKETS];
static u64 max_late_ns, early, first_t, first_k, last_t, last_k;

static u64 ref_time(void)
{
    u64 t;
    if (!hv_tsc_page_read(tsc_page, &t))
        t = rdmsr(HV_MSR_TIME_REF_COUNT);
    return t;
}

static volatile u32 other_ticks; /* ticks taken by the APs (idle-cost normalisation) */

static void tick(struct regs *r)
{
    if (smp_id() != 0) {
        atomic_inc(&other_ticks);
    } else if (!done) {
        u64 i = ticks;
        if (i < MAX_TICKS)
            tick_tsc[i] = rdtsc();
        ticks = i + 1;
    }
    apic_eoi();
}

static void hist_add(u64 ns, int delta)
{
    u64 b = ns / 1000;
    hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1] += delta;
    if (delta > 0 && ns > max_late_ns)
        max_late_ns = ns;
}

/* Lateness of tick i: its reference time minus the boundary t_start + k*period it belongs to. Ticks are assigned
 * greedily to the latest boundary not after them, with k strictly increasing. When two ticks fall between the
 * same two boundaries (the first was delayed past the next boundary, e.g. its handler ran after that boundary
 * fired), the first one belongs to the boundary before: it is moved there (a period later than first assumed)
 * if that boundary is free, and the second takes its place. Only if that is impossible is a tick counted as
 * "early" (assigned to a boundary after it). */
static u64 compute_stats(u64 n)
{
    bool have = false, have_prev2 = false, last_early = false;
    u64 prev2_k = 0, last_late = 0;
    for (u64 i = 0; i < n; i++) {
        u64 now = hv_scale_tsc(tick_tsc[i], scale, offset);
        u64 k = now >= t_start ? (now - t_start) / period_100ns : 0;
        if (have && k <= last_k) {
            if (k == last_k && !last_early && last_k > 0 && (!have_prev2 || last_k - 1 > prev2_k)) {
                hist_add(last_late, -1);
                last_late += period_100ns * 100;
                hist_add(last_late, 1);
                if (first_k == last_k)
                    first_k--;
                last_k--;
            } else {
                k = last_k + 1;
            }
        }
        s64 late = (s64)now - (s64)(t_start + k * period_100ns);
        last_early = late < 0;
        if (late < 0) {
            early++;
        } else {
            last_late = (u64)late * 100;
            hist_add(last_late, 1);
        }
        if (!have) {
            first_t = now;
            first_k = k;
        } else {
            prev2_k = last_k;
            have_prev2 = true;
        }
        have = true;
        last_k = k;
        last_t = now;
    }
    return 0;
}

static void arm(void)
{
    if (use_stimer) {
        wrmsr(HV_MSR_SCONTROL, 1);
        u64 cfg = 1 /* enable */ | 2 /* periodic */ | ((u64)VEC << 4) | (1ul << 12) /* direct */;
        wrmsr(HV_MSR_STIMER0_COUNT, period_100ns);
        wrmsr(HV_MSR_STIMER0_CONFIG, cfg);
    } else {
        apic_write(APIC_TDCR, 0xB);
        apic_write(APIC_LVTT, APIC_LVT_TIMER_PERIODIC | VEC);
        apic_write(APIC_TMICT, (u32)(period_100ns * 100)); /* 1 GHz APIC clock */
    }
}

static void disarm(void)
{
    if (use_stimer) {
        wrmsr(HV_MSR_STIMER0_CONFIG, 0);
    } else {
        apic_write(APIC_LVTT, APIC_LVT_MASKED);
        apic_write(APIC_TMICT, 0);
    }
}

static void ap_tick_loop(void *arg)
{
    cli();
    arm();
    while (!READ_ONCE(done))
        safe_halt();
    cli();
    disarm();
    sti();
}

static u64 hist_pct(unsigned p)
{
    u64 total = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++)
        total += hist[i];
    if (!total)
        return 0;
    u64 want = (total * p + 99) / 100, acc = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        acc += hist[i];
        if (acc >= want)
            return (u64)(i + 1) * 1000; /* upper edge of the bucket, ns */
    }
    return (u64)HIST_BUCKETS * 1000;
}

int main(void)
{
    u64 secs = arg_u64("secs", 10);
    period_100ns = arg_u64("period_us", 1000) * 10;
    use_stimer = !arg_is("timer", "apic");
    u32 eax = hv_features_eax();
    if (!(eax & HV_EAX_REFERENCE_TSC))
        fail("the reference TSC page is needed (hv-time)");
    void *page = alloc_pages(1);
    wrmsr(HV_MSR_REFERENCE_TSC, (u64)page | 1);
    tsc_page = page;
    if (use_stimer && (!(eax & HV_EAX_SYNTIMERS) || !(hv_features_edx() & HV_EDX_STIMER_DIRECT)))
        fail("synthetic timers in direct mode are needed (hv-synic,hv-stimer,hv-stimer-direct)");
    set_irq_handler(VEC, tick);
    smp_init();
    for (u32 c = 1; c < nr_cpus(); c++)
        on_cpu_async(c, ap_tick_loop, NULL);

    u64 end_count = secs * 10000000ul / period_100ns;
    if (end_count > MAX_TICKS)
        end_count = MAX_TICKS;
    cli();
    t_start = ref_time() + period_100ns;
    arm();
    while (READ_ONCE(ticks) < end_count)
        safe_halt();
    cli();
    disarm();
    WRITE_ONCE(done, true);
    for (u32 c = 1; c < nr_cpus(); c++) /* each AP sees `done` at its next tick */
        while (!cpu_idle(c))
            pause();

    u32 seq;
    do { /* the page's scale and offset, as the ticks were converted with them */
        seq = tsc_page->sequence;
        scale = tsc_page->scale;
        offset = tsc_page->offset;
    } while (seq != tsc_page->sequence);
    run_user(compute_stats, ticks);
    u64 expected = last_k - first_k + 1;
    u64 span_k = last_k - first_k;
    /* mean period in 100 ns units x1000 (integer arithmetic) */
    u64 mean_x1000 = span_k ? (last_t - first_t) * 1000 / span_k : 0;
    /* mean interval between the ticks received, same units */
    u64 recv_x1000 = ticks > 1 ? (last_t - first_t) * 1000 / (ticks - 1) : 0;
    printf("BENCH timer kind=%s cpus=%u ticks=%lu expected=%lu skipped=%lu period_100ns=%lu "
           "mean_period_100ns_x1000=%lu mean_interval_100ns_x1000=%lu p50_ns=%lu p99_ns=%lu max_ns=%lu "
           "early=%lu ap_ticks=%u\n",
           use_stimer ? "stimer" : "apic", nr_cpus(), ticks, expected, expected - ticks, period_100ns,
           mean_x1000, recv_x1000, hist_pct(50), hist_pct(99), max_late_ns, early, other_ticks);
    report(ticks == end_count, "%lu ticks", ticks);
    return 0;
}

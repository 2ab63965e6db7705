/*
 * Local APIC timer: one-shot, periodic and TSC-deadline modes, with every divide setting, measured against
 * the TSC.
 *
 * The APIC timer clock is assumed to be 1 GHz (KVM's and enlighten's APIC bus frequency; override with
 * apic_hz=N on the command line). The TSC frequency comes from CPUID (0x15 or 0x40000010) when the guest can
 * see it; otherwise it is calibrated from the divide-1 one-shot measurement, and the other divide settings
 * are checked against that calibration (their ratios are what the divide configuration controls).
 *
 * Each measurement takes the minimum of 3 runs: timer interrupts can only be late (host scheduling, exits),
 * never early, so the minimum is the best estimate of the programmed period. Tolerance: the measured period
 * must be within [-3 %, +10 %] of the expected one (a 10 ms one-shot; for periodic mode, 2 ms periods
 * averaged from arming to the 5th interrupt, so that only the last interrupt's lateness counts, divided by
 * 5); a TSC-deadline interrupt must never arrive before its deadline and at most 2 ms after it.
 * Arguments: mode=xapic|x2apic, apic_hz=N.
 */
#include "rt.h"

#define VEC 0x60
static volatile u32 ticks;
static volatile u64 tick_tsc[16];

static void timer_handler(struct regs *r)
{
    (void)r;
    u64 t = rdtsc();
    if (ticks < ARRAY_SIZE(tick_tsc))
        tick_tsc[ticks] = t;
    ticks++;
    apic_eoi();
}

static const struct { u32 div, tdcr; } divides[] = {
    { 1, 0xB }, { 2, 0x0 }, { 4, 0x1 }, { 8, 0x2 }, { 16, 0x3 }, { 32, 0x8 }, { 64, 0x9 }, { 128, 0xA },
};

static u64 apic_hz;
static u64 tsc_hz;

/* Halts until `n` ticks have been counted (the timer always fires, or the harness times out). */
static void wait_ticks(u32 n)
{
    cli();
    while (ticks < n) {
        safe_halt();
        cli();
    }
}

/* One-shot of `count` at divide index `d`: returns TSC ticks from arming to the interrupt. */
static u64 oneshot_once(u32 d, u32 count, bool *count_ok)
{
    ticks = 0;
    apic_write(APIC_TDCR, divides[d].tdcr);
    apic_write(APIC_LVTT, APIC_LVT_TIMER_ONESHOT | VEC);
    u64 t0 = rdtsc();
    apic_write(APIC_TMICT, count);
    u32 cc = apic_read(APIC_TMCCT);
    wait_ticks(1);
    u64 dt = tick_tsc[0] - t0;
    u32 after = apic_read(APIC_TMCCT);
    *count_ok = cc > 0 && cc <= count && after == 0;
    return dt;
}

static u64 oneshot_min(u32 d, u32 count, bool *count_ok)
{
    u64 best = ~0ULL;
    bool ok = true;
    for (int i = 0; i < 3; i++) {
        bool c;
        u64 dt = oneshot_once(d, count, &c);
        ok &= c;
        if (dt < best)
            best = dt;
    }
    *count_ok = ok;
    return best;
}

/* expected TSC ticks for `count` APIC timer ticks at divide `div` */
static u64 expected_tsc(u64 count, u64 div)
{
    return count * div * (tsc_hz / 1000) / (apic_hz / 1000);
}

static bool within(u64 measured, u64 expected)
{
    return measured * 100 >= expected * 97 && measured * 100 <= expected * 110;
}

/* per-mille ratio, for printing */
static u64 permille(u64 measured, u64 expected)
{
    return expected ? measured * 1000 / expected : 0;
}

static void test_oneshot(const char *mode)
{
    u32 base_count = 10000000; /* 10 ms at 1 GHz, divide 1 */
    bool calibrated = false;
    if (!tsc_hz) {
        bool c;
        u64 dt = oneshot_min(0, (u32)(base_count * (apic_hz / 1000) / 1000000), &c);
        tsc_hz = dt * 100; /* 10 ms */
        calibrated = true;
        report_info("TSC frequency not in CPUID: calibrated %lu kHz from a 10 ms one-shot at divide 1",
                    tsc_hz / 1000);
    } else {
        report_info("TSC frequency from CPUID: %lu kHz", tsc_hz / 1000);
    }
    u64 sane = tsc_hz >= 100000000ULL && tsc_hz <= 20000000000ULL;
    report(sane, "%s: TSC frequency %lu kHz is plausible", mode, tsc_hz / 1000);
    for (u32 d = 0; d < ARRAY_SIZE(divides); d++) {
        u32 div = divides[d].div;
        /* 10 ms whatever the divide */
        u32 count = (u32)((u64)base_count * (apic_hz / 1000) / 1000000 / div);
        bool count_ok;
        u64 dt = oneshot_min(d, count, &count_ok);
        u64 exp = expected_tsc(count, div);
        if (calibrated && div == 1) {
            report(count_ok, "%s: one-shot divide 1 (calibration): %lu TSC ticks, current count ran down", mode,
                   dt);
            continue;
        }
        report(within(dt, exp) && count_ok,
               "%s: one-shot divide %u count %u: %lu TSC ticks, expected %lu (ratio %lu/1000)", mode, div, count,
               dt, exp, permille(dt, exp));
    }
    /* one interrupt per one-shot: nothing more arrives after the expiry */
    ticks = 0;
    apic_write(APIC_TDCR, 0xB);
    apic_write(APIC_LVTT, APIC_LVT_TIMER_ONESHOT | VEC);
    apic_write(APIC_TMICT, 1000000);
    wait_ticks(1);
    sti();
    tsc_delay(expected_tsc(3000000, 1));
    cli();
    report(ticks == 1, "%s: a one-shot fires exactly once (%u interrupts)", mode, ticks);
    /* masked: counts down, no interrupt */
    ticks = 0;
    apic_write(APIC_LVTT, APIC_LVT_MASKED | APIC_LVT_TIMER_ONESHOT | VEC);
    apic_write(APIC_TMICT, 1000000);
    sti();
    tsc_delay(expected_tsc(2000000, 1));
    cli();
    report(ticks == 0 && apic_read(APIC_TMCCT) == 0, "%s: a masked one-shot runs down without an interrupt", mode);
}

static void test_periodic(const char *mode)
{
    for (u32 d = 0; d < ARRAY_SIZE(divides); d++) {
        u32 div = divides[d].div;
        u32 count = (u32)(2000000ULL * (apic_hz / 1000) / 1000000 / div); /* 2 ms */
        u64 best = ~0ULL;
        for (int rep = 0; rep < 2; rep++) {
            ticks = 0;
            apic_write(APIC_TDCR, divides[d].tdcr);
            apic_write(APIC_LVTT, APIC_LVT_TIMER_PERIODIC | VEC);
            u64 t0 = rdtsc();
            apic_write(APIC_TMICT, count);
            wait_ticks(5);
            apic_write(APIC_LVTT, APIC_LVT_MASKED);
            apic_write(APIC_TMICT, 0);
            /* from arming to the 5th interrupt: only the last one's lateness counts, divided by 5 */
            u64 avg = (tick_tsc[4] - t0) / 5;
            if (avg < best)
                best = avg;
        }
        u64 exp = expected_tsc(count, div);
        report(within(best, exp), "%s: periodic divide %u count %u: period %lu TSC ticks, expected %lu (%lu/1000)",
               mode, div, count, best, exp, permille(best, exp));
    }
}

static void test_tsc_deadline(const char *mode)
{
    if (!((cpuid(1).c >> 24) & 1)) {
        report_skip("%s: TSC-deadline mode not in CPUID.1:ECX[24]", mode);
        return;
    }
    apic_write(APIC_LVTT, APIC_LVT_TIMER_TSCDEADLINE | VEC);
    u64 delta = tsc_hz / 200; /* 5 ms */
    u64 slack = tsc_hz / 500; /* 2 ms */
    u64 best_late = ~0ULL;
    bool early = false;
    for (int i = 0; i < 3; i++) {
        ticks = 0;
        u64 deadline = rdtsc() + delta;
        wrmsr(MSR_IA32_TSC_DEADLINE, deadline);
        wait_ticks(1);
        if (tick_tsc[0] < deadline)
            early = true;
        u64 late = tick_tsc[0] - deadline;
        if (late < best_late)
            best_late = late;
    }
    report(!early, "%s: TSC-deadline interrupt never before the deadline", mode);
    report(!early && best_late <= slack, "%s: TSC-deadline lateness %lu TSC ticks (limit %lu)", mode, best_late,
           slack);
    report(rdmsr(MSR_IA32_TSC_DEADLINE) == 0, "%s: IA32_TSC_DEADLINE reads 0 after expiry", mode);
    /* disarm by writing 0 */
    ticks = 0;
    wrmsr(MSR_IA32_TSC_DEADLINE, rdtsc() + delta);
    wrmsr(MSR_IA32_TSC_DEADLINE, 0);
    sti();
    tsc_delay(3 * delta);
    cli();
    report(ticks == 0, "%s: writing 0 disarms the TSC deadline", mode);
    /* a deadline in the past fires at once */
    ticks = 0;
    wrmsr(MSR_IA32_TSC_DEADLINE, 1);
    sti();
    tsc_delay(slack);
    cli();
    report(ticks == 1, "%s: a deadline in the past fires immediately", mode);
    apic_write(APIC_LVTT, APIC_LVT_MASKED);
}

int main(void)
{
    apic_init(apic_mode_from_cmdline());
    const char *mode = apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC";
    set_irq_handler(VEC, timer_handler);
    apic_hz = arg_u64("apic_hz", 1000000000ULL);
    tsc_hz = tsc_hz_from_cpuid();
    test_oneshot(mode);
    test_periodic(mode);
    test_tsc_deadline(mode);
    return 0;
}

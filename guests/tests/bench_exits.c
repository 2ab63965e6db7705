/*
 * Benchmark guest (bench/run, issue 9): exit round trips and exit counts, measured from inside the guest.
 *
 * test=micro (default): round trips in TSC ticks (median and p99 over `n` samples, each one access bracketed
 *   by rdtsc) of
 *   - a bare port read of an unused port (all-ones, the VMM does no work) at CPL 0, and a bare MMIO read of
 *     an address with neither RAM nor device at CPL 3 (native here; PVM gives CPL 3 no port access) and CPL 0;
 *   - NotifyLongSpinWait through the hypercall page (CPL 0 only: the page is supervisor-only);
 *   - the port floor, the hypercall and the null-page call again with one fixed assembly framing (the `_asm_`
 *     keys), interleaved sample by sample;
 *   - rdmsr of TIME_REF_COUNT (synthetic) and of IA32_APIC_BASE (the VMM's APIC, non-synthetic), CPL 0;
 *   - a CPL 0 loop body with no exit at all (what KVM's instruction emulator adds to every CPL 0 sample);
 *   - reference time from the TSC page at CPL 3 (native here) and from TIME_REF_COUNT.
 *   Prints one `BENCH key=value ...` line per measure.
 * test=loop: `kind` = mmio3 (bare MMIO reads at CPL 3), tscpage (TSC-page reads at CPL 3), hypercall
 *   (NotifyLongSpinWait through the hypercall page, CPL 0) or nullcall (the same call into a copy of the page whose
 *   `out` goes to an idle port), `n` iterations; fixed-width output: two runs with different `n` differ in exits
 *   only by the loop's own exits (and a host profile of the two differs only by the loop's exit handling).
 * test=window: `n` rounds of cli, self-IPI, sti, then an exit-free CPL 0 loop of `spin` iterations watching for
 *   the handler (`cli=0` skips the cli); prints how many rounds ended the loop before the handler ran.
 * test=irq: `n` APIC-timer interrupts (1 ms periodic) taken while spinning at CPL 3, each ended with
 *   eoi=xapic (MMIO EOI register; run with mode=xapic), eoi=msr (HV_X64_MSR_EOI) or eoi=pv (exit-less EOI
 *   through the VP assist page, falling back to the EOI MSR when the VMM did not set "no EOI required").
 *   Fixed-width output; the host divides the difference of exit counts of two runs by the difference of `n`.
 */
#include "rt.h"
#include "hv.h"

#define IDLE_PORT 0x7F0 /* no device: reads all-ones */
/* No RAM and no device at this address: a 4-byte read exits as MMIO and reads all-ones. This host's KVM
 * (PVM) runs CPL 3 natively and never grants IOPL or an I/O bitmap to it, so at CPL 3 the bare exit is an
 * MMIO read rather than a port read. */
#define IDLE_MMIO 0xF0000000ul
#define MAX_SAMPLES 4096
#define HV_MSR_EOI 0x40000070
#define HV_MSR_VP_ASSIST_PAGE 0x40000073

static u64 samples[MAX_SAMPLES];

/* ---- sorting and percentiles, run at CPL 3 (native on this host) */
static u64 sort_samples(u64 n)
{
    /* heap sort: O(n log n), no recursion */
    u64 *a = samples;
    for (u64 start = n / 2; start-- > 0;) {
        u64 root = start;
        for (;;) {
            u64 child = 2 * root + 1;
            if (child >= n)
                break;
            if (child + 1 < n && a[child] < a[child + 1])
                child++;
            if (a[root] >= a[child])
                break;
            u64 t = a[root]; a[root] = a[child]; a[child] = t;
            root = child;
        }
    }
    for (u64 end = n; end-- > 1;) {
        u64 t = a[0]; a[0] = a[end]; a[end] = t;
        u64 root = 0;
        for (;;) {
            u64 child = 2 * root + 1;
            if (child >= end)
                break;
            if (child + 1 < end && a[child] < a[child + 1])
                child++;
            if (a[root] >= a[child])
                break;
            t = a[root]; a[root] = a[child]; a[child] = t;
            root = child;
        }
    }
    return 0;
}

static u64 pct(u64 n, unsigned p) { return samples[(n - 1) * p / 100]; }

static void report_samples(const char *name, u64 n)
{
    run_user(sort_samples, n);
    printf("BENCH %s median_tsc=%lu p99_tsc=%lu min_tsc=%lu n=%lu\n", name, pct(n, 50), pct(n, 99), samples[0],
           n);
}

/* ---- CPL 3 loops */
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }

static u64 user_mmio_samples(u64 n)
{
    u64 bad = 0;
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        u32 v = mmio_read32(IDLE_MMIO);
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
        bad += v != 0xFFFFFFFF;
    }
    return bad;
}

static u64 user_mmio_loop(u64 n)
{
    u64 bad = 0;
    for (u64 i = 0; i < n; i++)
        bad += mmio_read32(IDLE_MMIO) != 0xFFFFFFFF;
    return bad;
}

static const struct hv_tsc_page *tsc_page;

static u64 user_tscpage_samples(u64 n)
{
    u64 bad = 0, t;
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        bad += !hv_tsc_page_read(tsc_page, &t);
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
    }
    return bad;
}

/* Batches of TSC_BATCH reads; samples[i] = TSC ticks of batch i (the median batch is immune to preemption of
 * the vCPU thread). Returns the number of failed or non-monotonic reads. */
#define TSC_BATCH 1000
static u64 user_tscpage_batches(u64 nbatches)
{
    u64 t = 0, prev = 0, bad = 0;
    for (u64 b = 0; b < nbatches; b++) {
        u64 t0 = rdtsc();
        for (u64 i = 0; i < TSC_BATCH; i++) {
            bad += !hv_tsc_page_read(tsc_page, &t) || t < prev;
            prev = t;
        }
        samples[b] = rdtsc() - t0;
    }
    return bad;
}

/* Reads the page `n` times; returns the elapsed TSC ticks, or 0 if a read failed. */
static u64 user_tscpage_loop(u64 n)
{
    u64 t, prev = 0;
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++) {
        if (!hv_tsc_page_read(tsc_page, &t) || t < prev)
            return 0;
        prev = t;
    }
    return rdtsc() - t0;
}

static void noexit_target(void) { asm volatile("" ::: "memory"); }

/* One sample with a fixed framing written in assembly, the same for the floor and for the calls: rdtsc, two
 * `mov` saving the TSC, the argument set-up (`mov` of the port; or `mov` of RCX and RDX, the fast-call ABI), the
 * access, one `mov` saving the result, rdtsc. At CPL 0 KVM emulates every instruction here (about 1 µs each), so
 * the C loops above measure the compiler's scheduling too: for the hypercall it puts three instructions of the
 * first timestamp's arithmetic inside the window, for the port read after it. These samples differ only by what
 * a call through the page adds to a port access: one more argument register, the `call`, and the page's `ret`
 * (unless the VMM performs it). */
static u64 asm_sample_in(u16 port, u8 *value)
{
    u32 lo0, hi0, lo1, hi1, v;
    asm volatile("rdtsc\n\t"
                 "mov %%eax, %[lo0]\n\t"
                 "mov %%edx, %[hi0]\n\t"
                 "mov %[port], %%edx\n\t"
                 "inb (%%dx), %%al\n\t"
                 "movzbl %%al, %[v]\n\t"
                 "rdtsc"
                 : "=&a"(lo1), "=&d"(hi1), [lo0] "=&r"(lo0), [hi0] "=&r"(hi0), [v] "=&r"(v)
                 : [port] "r"((u32)port)
                 : "memory");
    *value = (u8)v;
    return (((u64)hi1 << 32) | lo1) - (((u64)hi0 << 32) | lo0);
}

static u64 asm_sample_call(void *page, u64 control, u64 input, u64 *status)
{
    u32 lo0, hi0, lo1, hi1;
    u64 st;
    asm volatile("rdtsc\n\t"
                 "mov %%eax, %[lo0]\n\t"
                 "mov %%edx, %[hi0]\n\t"
                 "mov %[ctl], %%rcx\n\t"
                 "mov %[in], %%rdx\n\t"
                 "call *%[page]\n\t"
                 "mov %%rax, %[st]\n\t"
                 "rdtsc"
                 : "=&a"(lo1), "=&d"(hi1), [lo0] "=&r"(lo0), [hi0] "=&r"(hi0), [st] "=&r"(st)
                 : [ctl] "r"(control), [in] "r"(input), [page] "r"(page)
                 : "rcx", "cc", "memory");
    *status = st;
    return (((u64)hi1 << 32) | lo1) - (((u64)hi0 << 32) | lo0);
}

static bool setup_tsc_page(void)
{
    if (!(hv_features_eax() & HV_EAX_REFERENCE_TSC))
        return false;
    void *page = alloc_pages(1);
    if (wrmsr_safe(HV_MSR_REFERENCE_TSC, (u64)page | 1))
        return false;
    tsc_page = page;
    u64 t;
    return hv_tsc_page_read(tsc_page, &t);
}

static void micro(void)
{
    u64 n = arg_u64("n", 2000);
    if (n > MAX_SAMPLES)
        n = MAX_SAMPLES;
    if (n < 10)
        n = 10;
    u64 hz = tsc_hz_from_cpuid();
    if (!hz && (hv_features_eax() & HV_EAX_FREQUENCY_MSRS))
        hz = rdmsr(HV_MSR_TSC_FREQUENCY);
    printf("BENCH info tsc_hz=%lu\n", hz);

    /* bare MMIO exit at CPL 3 (native execution) and at CPL 0 */
    u64 bad = run_user(user_mmio_samples, n);
    report(bad == 0, "MMIO 0x%lx reads all-ones at CPL 3", IDLE_MMIO);
    report_samples("mmio_cpl3", n);
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        u32 v = mmio_read32(IDLE_MMIO);
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
        bad += v != 0xFFFFFFFF;
    }
    report(bad == 0, "MMIO 0x%lx reads all-ones at CPL 0", IDLE_MMIO);
    report_samples("mmio_cpl0", n);

    /* floor at CPL 0 */
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        u8 v = inb(IDLE_PORT);
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
        bad += v != 0xFF;
    }
    report(bad == 0, "port 0x%x reads all-ones at CPL 0", IDLE_PORT);
    report_samples("floor_cpl0", n);

    /* emulation cost of a CPL 0 sample without an exit (an indirect call, as the hypercall makes) */
    void (*volatile target)(void) = noexit_target;
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        target();
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
    }
    report_samples("noexit_cpl0", n);

    /* hypercall round trip, and the same call into a copy of the page whose `out` goes to an idle port: the
     * same instructions for KVM to emulate, an exit the VMM answers with no work */
    if (hv_features_eax() & HV_EAX_HYPERCALL && hv_enable_hypercalls()) {
        u8 *null_page = alloc_pages(1);
        memcpy(null_page, hv_hypercall_page, 4096);
        report(null_page[0] == 0xE6 && null_page[2] == 0xC3, "hypercall page is `out imm8, al; ret`");
        null_page[1] = 0xE5; /* no device */
        void *real = hv_hypercall_page;
        hv_hypercall_page = null_page;
        for (u64 i = 0; i < n; i++) {
            u64 t0 = rdtsc();
            (void)hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_HYPERCALL_FAST, 1, 0);
            u64 t1 = rdtsc();
            samples[i] = t1 - t0;
        }
        report_samples("nullcall_cpl0", n);
        hv_hypercall_page = real;
        u64 st = 0;
        for (u64 i = 0; i < n; i++) {
            u64 t0 = rdtsc();
            st |= hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_HYPERCALL_FAST, 1, 0);
            u64 t1 = rdtsc();
            samples[i] = t1 - t0;
        }
        report((st & 0xFFFF) == HV_STATUS_SUCCESS, "NotifyLongSpinWait returns success (0x%lx)", st);
        report_samples("hypercall_cpl0", n);

        /* The same three with the assembly framing, interleaved so that they share the host's conditions. */
        u64 *s_floor = alloc_pages((n * 8 + 4095) / 4096);
        u64 *s_null = alloc_pages((n * 8 + 4095) / 4096);
        const u64 fast = HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_HYPERCALL_FAST;
        st = 0;
        for (u64 i = 0; i < n; i++) {
            u8 v;
            u64 ignored;
            s_floor[i] = asm_sample_in(IDLE_PORT, &v);
            bad += v != 0xFF;
            s_null[i] = asm_sample_call(null_page, fast, 1, &ignored);
            u64 one;
            samples[i] = asm_sample_call(real, fast, 1, &one);
            st |= one;
        }
        report(bad == 0 && (st & 0xFFFF) == HV_STATUS_SUCCESS, "assembly-framed samples (port all-ones, status 0x%lx)",
               st);
        report_samples("hypercall_asm_cpl0", n);
        memcpy(samples, s_null, n * 8);
        report_samples("nullcall_asm_cpl0", n);
        memcpy(samples, s_floor, n * 8);
        report_samples("floor_asm_cpl0", n);
    } else {
        report_skip("no hypercall page");
    }

    /* synthetic MSR */
    if (hv_features_eax() & HV_EAX_TIME_REF_COUNT) {
        for (u64 i = 0; i < n; i++) {
            u64 t0 = rdtsc();
            (void)rdmsr(HV_MSR_TIME_REF_COUNT);
            u64 t1 = rdtsc();
            samples[i] = t1 - t0;
        }
        report_samples("msr_time_ref_count_cpl0", n);
    } else {
        report_skip("no TIME_REF_COUNT");
    }

    /* non-synthetic MSR handled by the VMM */
    for (u64 i = 0; i < n; i++) {
        u64 t0 = rdtsc();
        (void)rdmsr(MSR_IA32_APICBASE);
        u64 t1 = rdtsc();
        samples[i] = t1 - t0;
    }
    report_samples("msr_apic_base_cpl0", n);

    /* reference time: TSC page at CPL 3 */
    if (setup_tsc_page()) {
        bad = run_user(user_tscpage_samples, n);
        report(bad == 0, "TSC page valid for every read");
        report_samples("tscpage_cpl3", n);
        /* per-read cost without the rdtsc bracketing: batches of 1000 reads */
        u64 nb = n < 1000 ? n : 1000;
        bad = run_user(user_tscpage_batches, nb);
        report(bad == 0, "TSC page reads valid and monotonic");
        printf("BENCH tscpage_batch_info reads_per_batch=%u\n", TSC_BATCH);
        report_samples("tscpage_batch_cpl3", nb);
    } else {
        report_skip("no reference TSC page");
    }
}

static void loop(void)
{
    u64 n = arg_u64("n", 100000);
    u64 r = 0;
    if (arg_is("kind", "mmio3")) {
        r = run_user(user_mmio_loop, n);
        report(r == 0, "MMIO reads all-ones");
    } else if (arg_is("kind", "tscpage")) {
        if (!setup_tsc_page())
            fail("no reference TSC page");
        r = run_user(user_tscpage_loop, n);
        report(r != 0, "TSC page reads monotonic");
    } else if (arg_is("kind", "hypercall") || arg_is("kind", "nullcall")) {
        if (!(hv_features_eax() & HV_EAX_HYPERCALL) || !hv_enable_hypercalls())
            fail("no hypercall page");
        u8 *null_page = alloc_pages(1);
        memcpy(null_page, hv_hypercall_page, 4096);
        null_page[1] = 0xE5; /* no device */
        bool null = arg_is("kind", "nullcall");
        if (null)
            hv_hypercall_page = null_page;
        u64 st = 0;
        for (u64 i = 0; i < n; i++)
            st |= hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_HYPERCALL_FAST, 1, 0);
        report(null || (st & 0xFFFF) == HV_STATUS_SUCCESS, "calls returned 0x%016lx", null ? 0ul : st);
    } else {
        fail("unknown kind");
    }
    /* fixed width: the output costs the same exits whatever n is */
    printf("BENCH loop n=%020lu\n", n);
}

/* ---- interrupt delivery */
static volatile u64 irq_count;
static volatile u32 *assist;
static volatile u64 pv_skipped;
enum { EOI_XAPIC, EOI_X2APIC, EOI_MSR, EOI_PV } eoi_kind;
static bool hv_eoi_works;

static void timer_irq(struct regs *r)
{
    irq_count++;
    if (eoi_kind == EOI_XAPIC || eoi_kind == EOI_X2APIC) {
        apic_eoi();
    } else if (eoi_kind == EOI_PV && assist && (__atomic_fetch_and(assist, ~1u, __ATOMIC_SEQ_CST) & 1)) {
        pv_skipped++;
    } else if (hv_eoi_works) {
        wrmsr(HV_MSR_EOI, 0);
    } else {
        apic_eoi();
    }
}

static u64 user_spin_until(u64 n)
{
    while (READ_ONCE(irq_count) < n)
        pause();
    return 0;
}

static void irq(void)
{
    u64 n = arg_u64("n", 200);
    if (arg_is("eoi", "xapic"))
        eoi_kind = EOI_XAPIC;
    else if (arg_is("eoi", "x2apic"))
        eoi_kind = EOI_X2APIC;
    else if (arg_is("eoi", "msr"))
        eoi_kind = EOI_MSR;
    else if (arg_is("eoi", "pv"))
        eoi_kind = EOI_PV;
    else
        fail("eoi=xapic|x2apic|msr|pv");
    apic_init(apic_mode_from_cmdline());
    /* An EOI with nothing in service is harmless: probe the Hyper-V EOI MSR once. */
    hv_eoi_works = wrmsr_safe(HV_MSR_EOI, 0) == 0;
    if (eoi_kind == EOI_MSR && !hv_eoi_works) {
        printf("BENCH irq unsupported=hv_eoi_msr_gp\n");
        return;
    }
    if (eoi_kind == EOI_PV) {
        void *page = alloc_pages(1);
        if (wrmsr_safe(HV_MSR_VP_ASSIST_PAGE, (u64)page | 1) == 0)
            assist = page;
    }
    set_irq_handler(0x40, timer_irq);
    apic_write(APIC_TDCR, 0xB); /* divide by 1 */
    apic_write(APIC_LVTT, APIC_LVT_TIMER_PERIODIC | 0x40);
    apic_write(APIC_TMICT, 1000000); /* 1 ms at the 1 GHz APIC clock */
    sti();
    run_user(user_spin_until, n);
    cli();
    apic_write(APIC_LVTT, APIC_LVT_MASKED);
    apic_write(APIC_TMICT, 0);
    /* fixed width */
    printf("BENCH irq n=%020lu pv_skipped=%020lu hv_eoi=%d\n", n, (u64)pv_skipped, hv_eoi_works);
}

/* ---- interrupt window: an interrupt that becomes pending while IF=0 must be taken right after `sti`, without
 * waiting for another exit. Each round: cli, self-IPI (one exit, during which the interrupt is pending but not
 * injectable), sti, then an exit-free loop of `spin` iterations (CPL 0, emulated) watching for the handler.
 * Counts the rounds in which the handler had not run by the end of the loop (it then runs at the `hlt`). */
static volatile u64 window_hits;

static void window_irq(struct regs *r)
{
    (void)r;
    window_hits++;
    apic_eoi();
}

static void window(void)
{
    u64 n = arg_u64("n", 20), spin = arg_u64("spin", 20000), late = 0;
    set_irq_handler(0x42, window_irq);
    bool use_cli = arg_u64("cli", 1) != 0;
    apic_init(apic_mode_from_cmdline());
    for (u64 i = 0; i < n; i++) {
        if (use_cli)
            cli();
        u64 before = window_hits;
        apic_send_ipi(smp_id(), 0x42);
        sti();
        u64 k = 0;
        while (window_hits == before && k < spin)
            k++;
        if (window_hits == before)
            late++;
        while (window_hits == before)
            safe_halt();
    }
    printf("BENCH window n=%lu spin=%lu late=%lu\n", n, spin, late);
}

int main(void)
{
    if (arg_is("test", "window"))
        window();
    else if (arg_is("test", "loop"))
        loop();
    else if (arg_is("test", "irq"))
        irq();
    else
        micro();
    return 0;
}

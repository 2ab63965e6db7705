/*
 * Hyper-V synthetic MSRs, one group at a time: the value read, writes taking effect, #GP for read-only MSRs and
 * invalid writes (where KVM #GPs), and gating: every MSR #GPs without Hyper-V identification, and with
 * hv-enforce-cpuid (argument `enforce=1`) each group #GPs unless its CPUID 0x40000003 bit is set. Without
 * enforcement every implemented MSR works once Hyper-V is identified (KVM without ENFORCE_CPUID).
 * Arguments: `enforce=0|1`, `apic_hz=N` (expected APIC_FREQUENCY, default 10^9).
 */
#include "rt.h"
#include "hv.h"

static bool enforce;
static u32 feax, fedx;

/* Whether a group gated by these CPUID bits is reachable. */
static bool reachable(u32 eax_bit, u32 edx_bit)
{
    if (!hv_identified())
        return false;
    if (!enforce)
        return true;
    return (feax & eax_bit) == eax_bit && (fedx & edx_bit) == edx_bit;
}

static void expect_gp(const char *group, const u32 *msrs, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        u64 v = 0;
        int r = rdmsr_safe(msrs[i], &v);
        int w = wrmsr_safe(msrs[i], 0);
        report(r == GP_FAULT && w == GP_FAULT, "%s: rdmsr/wrmsr %x raise #GP while the group is off (%d %d)", group,
               msrs[i], r, w);
    }
}

static u64 rd(u32 msr)
{
    u64 v = 0;
    if (rdmsr_safe(msr, &v))
        report(false, "rdmsr %x raised an exception", msr);
    return v;
}

static void busy(u64 n)
{
    for (volatile u64 i = 0; i < n; i++) {
    }
}

static void group_hypercall(void)
{
    static const u32 msrs[] = {HV_MSR_GUEST_OS_ID, HV_MSR_HYPERCALL};
    if (!reachable(HV_EAX_HYPERCALL, 0))
        return expect_gp("GUEST_OS_ID/HYPERCALL", msrs, 2);
    u8 *page = alloc_pages(1);
    memset(page, 0xCC, 4096);
    report(rd(HV_MSR_GUEST_OS_ID) == 0, "GUEST_OS_ID reads 0 at boot");
    int f = wrmsr_safe(HV_MSR_HYPERCALL, (u64)page | 1);
    report(f == 0 && rd(HV_MSR_HYPERCALL) == 0 && page[0] == 0xCC,
           "HYPERCALL write while GUEST_OS_ID is 0 is ignored (no #GP, reads 0, page untouched)");
    f = wrmsr_safe(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX | 0x1234);
    report(f == 0 && rd(HV_MSR_GUEST_OS_ID) == (HV_GUEST_OS_ID_LINUX | 0x1234), "GUEST_OS_ID stores its value");
    f = wrmsr_safe(HV_MSR_HYPERCALL, 0x12345000);
    report(f == 0 && rd(HV_MSR_HYPERCALL) == 0x12345000, "HYPERCALL without the enable bit is stored verbatim");
    f = wrmsr_safe(HV_MSR_HYPERCALL, (u64)page | 1);
    report(f == 0 && rd(HV_MSR_HYPERCALL) == ((u64)page | 1), "HYPERCALL enable reads back %lx",
           rd(HV_MSR_HYPERCALL));
    report(page[0] == 0xE6 && page[1] == 0xE4 && page[2] == 0xC3 && page[3] == 0xCC,
           "the hypercall page is 'out 0xE4, al; ret' and the rest is untouched (%x %x %x %x)", page[0], page[1],
           page[2], page[3]);
    hv_hypercall_page = page;
    u64 st = hv_hypercall(0x7FFF, 0, 0);
    report(st == HV_STATUS_INVALID_HYPERCALL_CODE, "a call through the page exits and returns status %lx", st);
    f = wrmsr_safe(HV_MSR_HYPERCALL, (1ul << 40) | 1);
    report(f == GP_FAULT, "enabling the hypercall page outside RAM raises #GP");
    report(rd(HV_MSR_HYPERCALL) == ((u64)page | 1), "HYPERCALL keeps its value after the #GP");
    f = wrmsr_safe(HV_MSR_GUEST_OS_ID, 0);
    report(f == 0 && rd(HV_MSR_GUEST_OS_ID) == 0 && (rd(HV_MSR_HYPERCALL) & 1) == 0,
           "GUEST_OS_ID = 0 clears HYPERCALL's enable bit");
}

static volatile u64 vp_index_seen[MAX_CPUS];
static volatile int vp_index_write_fault[MAX_CPUS];

static void read_vp_index(void *arg)
{
    (void)arg;
    u32 id = smp_id();
    u64 v = ~0ul;
    if (rdmsr_safe(HV_MSR_VP_INDEX, &v))
        v = ~1ul;
    vp_index_seen[id] = v;
    vp_index_write_fault[id] = wrmsr_safe(HV_MSR_VP_INDEX, v);
}

static void group_vp_index(void)
{
    static const u32 msrs[] = {HV_MSR_VP_INDEX};
    if (!reachable(HV_EAX_VP_INDEX, 0))
        return expect_gp("VP_INDEX", msrs, 1);
    for (u32 cpu = 0; cpu < nr_cpus(); cpu++) {
        on_cpu(cpu, read_vp_index, NULL);
        report(vp_index_seen[cpu] == cpu, "VP_INDEX on CPU %u is %lx (its APIC ID is %u)", cpu, vp_index_seen[cpu],
               cpu);
        report(vp_index_write_fault[cpu] == GP_FAULT, "VP_INDEX is read-only on CPU %u", cpu);
    }
}

static void group_vp_runtime(void)
{
    static const u32 msrs[] = {HV_MSR_VP_RUNTIME};
    if (!reachable(HV_EAX_VP_RUNTIME, 0))
        return expect_gp("VP_RUNTIME", msrs, 1);
    u64 a = rd(HV_MSR_VP_RUNTIME);
    busy(100000);
    u64 b = rd(HV_MSR_VP_RUNTIME);
    report(b > a, "VP_RUNTIME increases while the vCPU runs (%lu -> %lu, 100 ns units)", a, b);
    report(wrmsr_safe(HV_MSR_VP_RUNTIME, 0) == GP_FAULT, "VP_RUNTIME is read-only");
}

/* TIME_REF_COUNT and the TSC at the same moment: the reading of 8 tries whose surrounding TSC reads are
 * closest together, with the midpoint of those as its TSC value. */
static u64 ref_count_at(u64 *tsc)
{
    u64 best_width = ~0ULL, best = 0;
    for (int i = 0; i < 8; i++) {
        u64 a = rdtsc();
        u64 r = rd(HV_MSR_TIME_REF_COUNT);
        u64 b = rdtsc();
        if (b - a < best_width) {
            best_width = b - a;
            best = r;
            *tsc = a + (b - a) / 2;
        }
    }
    return best;
}

static void group_time_ref_count(void)
{
    static const u32 msrs[] = {HV_MSR_TIME_REF_COUNT};
    if (!reachable(HV_EAX_TIME_REF_COUNT, 0))
        return expect_gp("TIME_REF_COUNT", msrs, 1);
    u64 a = rd(HV_MSR_TIME_REF_COUNT);
    busy(20000);
    u64 b = rd(HV_MSR_TIME_REF_COUNT);
    report(b > a, "TIME_REF_COUNT advances (%lu -> %lu)", a, b);
    /* 10^7 per second: compare with the TSC over at least 20 ms of reference time, against TSC_FREQUENCY
     * when it is readable. */
    u64 hz = 0;
    if (rdmsr_safe(HV_MSR_TSC_FREQUENCY, &hz) == 0 && hz) {
        /* Each reading is paired with the TSC midway between two TSC reads around it (the narrowest of a
         * few tries), so a host delay of the exit itself does not count as reference time. */
        u64 t0, r0 = ref_count_at(&t0), r1, t1;
        do {
            r1 = ref_count_at(&t1);
        } while (r1 - r0 < 200000);
        u64 expect = (t1 - t0) * 10 / (hz / 1000000); /* TSC ticks → 100 ns units */
        u64 diff = expect > r1 - r0 ? expect - (r1 - r0) : (r1 - r0) - expect;
        report(diff * 100 <= expect, "TIME_REF_COUNT runs at 10 MHz against the TSC (%lu vs %lu, 1%% allowed)",
               r1 - r0, expect);
    }
    report(wrmsr_safe(HV_MSR_TIME_REF_COUNT, 0) == GP_FAULT, "TIME_REF_COUNT is read-only");
}

static void group_reference_tsc(void)
{
    static const u32 msrs[] = {HV_MSR_REFERENCE_TSC};
    if (!reachable(HV_EAX_REFERENCE_TSC, 0))
        return expect_gp("REFERENCE_TSC", msrs, 1);
    struct hv_tsc_page *p = alloc_pages(1);
    report(rd(HV_MSR_REFERENCE_TSC) == 0, "REFERENCE_TSC reads 0 at boot");
    int f = wrmsr_safe(HV_MSR_REFERENCE_TSC, ((u64)p) | 0xABC);
    report(f == 0 && rd(HV_MSR_REFERENCE_TSC) == (((u64)p) | 0xABC) && p->sequence == 0,
           "REFERENCE_TSC stores any value without the enable bit (no reserved-bit #GP) and leaves the page");
    f = wrmsr_safe(HV_MSR_REFERENCE_TSC, (u64)p | 1);
    u32 seq = p->sequence;
    report(f == 0 && seq != 0 && seq != 0xFFFFFFFF, "the enabled page has a valid sequence (%x)", seq);
    u64 hz = 0;
    if (rdmsr_safe(HV_MSR_TSC_FREQUENCY, &hz) == 0 && hz) {
        u64 want = (u64)(((unsigned __int128)10000000 << 64) / hz);
        report(p->scale == want, "scale is 2^64 * 10^7 / TSC Hz (%lx, expected %lx)", p->scale, want);
    }
    bool ordered = true;
    u64 last = 0;
    for (int i = 0; i < 200 && ordered; i++) {
        u64 a = 0, m, b = 0;
        hv_tsc_page_read(p, &a);
        m = rd(HV_MSR_TIME_REF_COUNT);
        hv_tsc_page_read(p, &b);
        if (!(last <= a && a <= m && m <= b)) {
            report(false, "page %lu <= MSR %lu <= page %lu (previous %lu)", a, m, b, last);
            ordered = false;
        }
        last = b;
    }
    report(ordered, "page <= TIME_REF_COUNT <= page, never backwards (200 rounds)");
    f = wrmsr_safe(HV_MSR_REFERENCE_TSC, (u64)p | 1);
    report(f == 0 && p->sequence != seq && p->sequence != 0, "re-enabling rewrites the page with a new sequence");
    f = wrmsr_safe(HV_MSR_REFERENCE_TSC, 0);
    report(f == 0 && rd(HV_MSR_REFERENCE_TSC) == 0, "REFERENCE_TSC can be disabled");
}

static void group_frequencies(void)
{
    static const u32 msrs[] = {HV_MSR_TSC_FREQUENCY, HV_MSR_APIC_FREQUENCY};
    if (!reachable(HV_EAX_FREQUENCY_MSRS, 0))
        return expect_gp("TSC/APIC_FREQUENCY", msrs, 2);
    u64 hz = rd(HV_MSR_TSC_FREQUENCY);
    u64 cpuid_hz = tsc_hz_from_cpuid();
    if (cpuid_hz)
        report(hz / 1000 == cpuid_hz / 1000, "TSC_FREQUENCY %lu matches CPUID's %lu", hz, cpuid_hz);
    /* Calibrate against reference time when it is readable (TIME_REF_COUNT is gated separately). */
    u64 r0 = 0;
    if (rdmsr_safe(HV_MSR_TIME_REF_COUNT, &r0) == 0) {
        u64 t0 = rdtsc(), r1, t1;
        do {
            r1 = rd(HV_MSR_TIME_REF_COUNT);
            t1 = rdtsc();
        } while (r1 - r0 < 200000);
        u64 measured = (t1 - t0) * 10000000 / (r1 - r0); /* Hz */
        u64 diff = measured > hz ? measured - hz : hz - measured;
        report(diff * 100 <= hz, "TSC_FREQUENCY %lu Hz agrees with the TSC rate over reference time (%lu Hz)", hz,
               measured);
    } else {
        report(hz > 100000000, "TSC_FREQUENCY %lu Hz is plausible", hz);
    }
    u64 apic = rd(HV_MSR_APIC_FREQUENCY), want = arg_u64("apic_hz", 1000000000);
    report(apic == want, "APIC_FREQUENCY is %lu (expected %lu)", apic, want);
    report(wrmsr_safe(HV_MSR_TSC_FREQUENCY, hz) == GP_FAULT && wrmsr_safe(HV_MSR_APIC_FREQUENCY, apic) == GP_FAULT,
           "TSC_FREQUENCY and APIC_FREQUENCY are read-only");
}

static void group_crash(void)
{
    static const u32 msrs[] = {HV_MSR_CRASH_P0,     HV_MSR_CRASH_P0 + 1, HV_MSR_CRASH_P0 + 2,
                               HV_MSR_CRASH_P0 + 3, HV_MSR_CRASH_P0 + 4, HV_MSR_CRASH_CTL};
    if (!reachable(0, HV_EDX_CRASH_MSRS))
        return expect_gp("CRASH", msrs, 6);
    bool ok = true;
    for (u32 i = 0; i < 5; i++) {
        u64 v = 0x1111111111111111ul * (i + 1) ^ (1ul << 63);
        ok &= wrmsr_safe(HV_MSR_CRASH_P0 + i, v) == 0 && rd(HV_MSR_CRASH_P0 + i) == v;
    }
    report(ok, "CRASH_P0..P4 store their values");
    report(rd(HV_MSR_CRASH_CTL) == HV_CRASH_CTL_NOTIFY, "CRASH_CTL reads the notify capability (bit 63)");
    int f = wrmsr_safe(HV_MSR_CRASH_CTL, 0);
    report(f == 0 && rd(HV_MSR_CRASH_CTL) == HV_CRASH_CTL_NOTIFY,
           "a CRASH_CTL write without the notify bit is accepted and changes nothing");
}

static void group_reset(void)
{
    static const u32 msrs[] = {HV_MSR_RESET};
    if (!reachable(HV_EAX_RESET, 0))
        return expect_gp("RESET", msrs, 1);
    report(rd(HV_MSR_RESET) == 0, "RESET reads 0");
    int a = wrmsr_safe(HV_MSR_RESET, 0), b = wrmsr_safe(HV_MSR_RESET, 2);
    busy(1000);
    report(a == 0 && b == 0, "RESET writes other than 1 are ignored (no #GP, no reset)");
}

static void group_reenlightenment(void)
{
    static const u32 msrs[] = {HV_MSR_REENLIGHTENMENT_CONTROL, HV_MSR_TSC_EMULATION_CONTROL,
                               HV_MSR_TSC_EMULATION_STATUS};
    if (!reachable(HV_EAX_REENLIGHTENMENT, 0))
        return expect_gp("re-enlightenment", msrs, 3);
    u64 ctl = (1ul << 32) | (1ul << 16) | 0x30;
    int f = wrmsr_safe(HV_MSR_REENLIGHTENMENT_CONTROL, ctl);
    report(f == 0 && rd(HV_MSR_REENLIGHTENMENT_CONTROL) == ctl, "REENLIGHTENMENT_CONTROL stores its value");
    f = wrmsr_safe(HV_MSR_TSC_EMULATION_CONTROL, 1);
    report(f == 0 && rd(HV_MSR_TSC_EMULATION_CONTROL) == 1, "TSC_EMULATION_CONTROL stores its value");
    report(wrmsr_safe(HV_MSR_TSC_EMULATION_STATUS, 0) == 0 && rd(HV_MSR_TSC_EMULATION_STATUS) == 0,
           "TSC_EMULATION_STATUS accepts 0");
    report(wrmsr_safe(HV_MSR_TSC_EMULATION_STATUS, 1) == GP_FAULT, "TSC_EMULATION_STATUS #GPs on a non-zero write");
    wrmsr_safe(HV_MSR_TSC_EMULATION_CONTROL, 0);
    wrmsr_safe(HV_MSR_REENLIGHTENMENT_CONTROL, 0);
}

int main(void)
{
    enforce = arg_u64("enforce", 0) != 0;
    feax = hv_features_eax();
    fedx = hv_features_edx();
    report_info("Hyper-V %s, features eax=%x edx=%x, enforce=%d", hv_identified() ? "identified" : "absent", feax,
                fedx, enforce);
    smp_init();
    group_hypercall();
    group_vp_index();
    group_vp_runtime();
    group_time_ref_count();
    group_reference_tsc();
    group_frequencies();
    group_crash();
    group_reset();
    group_reenlightenment();
    /* Outside the implemented set: #GP in every configuration. */
    u64 v;
    report(rdmsr_safe(0x400000F0, &v) == GP_FAULT, "GUEST_IDLE (not implemented) raises #GP");
    return 0;
}

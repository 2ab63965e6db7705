/*
 * Hostile synthetic-MSR values (issue 10): writes to every read-only or unimplemented MSR, reserved bits in
 * every writable MSR, SINT vectors 0..15, overlay pages (hypercall, VP assist, reference TSC, SIMP, SIEFP)
 * beyond RAM or over MMIO and then used (stimer messages, events, TIME_REF_COUNT), stimer counts 0 and
 * u64::MAX, direct stimers with vectors below 16 or a 100 ns period, and EOM floods with and without a pending
 * message. Each access must give exactly KVM's result (#GP or not, value read back), and the VMM must survive.
 * Needs -smp 1 and -cpu host,hv-passthrough -device hyperv-testdev.
 */
#include "synic.h"

#define HV_MSR_GUEST_IDLE 0x400000F0
#define HV_MSR_TSC_INVARIANT_CONTROL 0x40000118
#define HVMSG_TEST 0x12345u

static u64 tsc_khz;
static u64 ms(u64 n) { return n * tsc_khz; }

static volatile u32 hits[256];
static void count_irq(struct regs *r)
{
    atomic_inc(&hits[r->vector]);
    if (r->vector >= 32)
        apic_eoi();
}

static u64 rd(u32 msr)
{
    u64 v = 0;
    int f = rdmsr_safe(msr, &v);
    if (f)
        report(false, "rdmsr %x raised exception %d", msr, f - 1);
    return v;
}

/* A write that must be accepted and read back as `back`. */
static bool wr_ok(u32 msr, u64 v, u64 back)
{
    int f = wrmsr_safe(msr, v);
    u64 r = rd(msr);
    if (f || r != back) {
        report(false, "wrmsr %x = %lx: fault %d, reads %lx (expected no fault, %lx)", msr, v, f, r, back);
        return false;
    }
    return true;
}

/* A write that must #GP and leave the value unchanged (when `check` is set). */
static bool wr_gp(u32 msr, u64 v, bool check)
{
    u64 before = 0;
    if (check)
        before = rd(msr);
    int f = wrmsr_safe(msr, v);
    if (f != GP_FAULT) {
        report(false, "wrmsr %x = %lx: fault %d (expected #GP)", msr, v, f);
        return false;
    }
    if (check && rd(msr) != before) {
        report(false, "wrmsr %x = %lx #GPed but changed the value", msr, v);
        return false;
    }
    return true;
}

static void read_only_and_unimplemented(void)
{
    static const u32 ro[] = {HV_MSR_VP_INDEX, HV_MSR_VP_RUNTIME, HV_MSR_TIME_REF_COUNT, HV_MSR_TSC_FREQUENCY,
                             HV_MSR_APIC_FREQUENCY, HV_MSR_SVERSION};
    static const u64 vals[] = {0, 1, 0x8000000000000000ul, ~0ul};
    bool ok = true;
    for (unsigned i = 0; i < ARRAY_SIZE(ro); i++)
        for (unsigned j = 0; j < ARRAY_SIZE(vals); j++) {
            bool stable = ro[i] != HV_MSR_VP_RUNTIME && ro[i] != HV_MSR_TIME_REF_COUNT;
            ok &= wr_gp(ro[i], vals[j], stable);
        }
    report(ok, "every write to the 6 read-only MSRs #GPs and changes nothing");
    report(rd(HV_MSR_SVERSION) == 1 && rd(HV_MSR_EOM) == 0, "SVERSION still reads 1, EOM reads 0");

    /* Unimplemented or unknown synthetic MSRs: GUEST_IDLE, gaps between the groups, the SYNDBG MSRs (SynDbg is
     * not offered, so KVM #GPs them too), the nested SynIC range. */
    static const u32 none[] = {0x40000004, 0x4000000F, 0x40000011, 0x40000024, 0x4000006F, 0x40000074,
                               0x40000085, 0x4000008F, 0x400000A0, 0x400000B8, 0x400000EF, HV_MSR_GUEST_IDLE,
                               0x400000F1, 0x400000F2, 0x400000F3, 0x400000F4, 0x400000F5, 0x400000FF,
                               0x40000109, 0x40000117, 0x40000119, 0x400001FF, 0x40001000, 0x40001080,
                               0x400FFFFF, 0x4FFFFFFF};
    ok = true;
    for (unsigned i = 0; i < ARRAY_SIZE(none); i++) {
        u64 v;
        int r = rdmsr_safe(none[i], &v);
        int w = wrmsr_safe(none[i], ~0ul);
        if (r != GP_FAULT || w != GP_FAULT) {
            report(false, "unimplemented MSR %x: read fault %d, write fault %d (expected #GP)", none[i], r, w);
            ok = false;
        }
    }
    report(ok, "the %u unimplemented synthetic MSRs #GP on read and write", (unsigned)ARRAY_SIZE(none));
}

static void reserved_bits(u8 *hc_page)
{
    u8 *page = alloc_pages(1);
    bool ok = true;
    /* KVM checks no reserved bits in these: every bit is stored and read back. */
    ok &= wr_ok(HV_MSR_GUEST_OS_ID, ~0ul, ~0ul);
    ok &= wr_ok(HV_MSR_HYPERCALL, (u64)hc_page | 0xFFC | 1, (u64)hc_page | 0xFFC | 1);
    ok &= hc_page[0] == 0xE6 && hc_page[1] == 0xE4 && hc_page[2] == 0xC3;
    ok &= hv_hypercall(0x7FFF, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE;
    report(ok, "GUEST_OS_ID = ~0 and HYPERCALL with bits 11:2 set are stored; the page still works");

    memset(page, 0, 4096);
    ok = wr_ok(HV_MSR_REFERENCE_TSC, (u64)page | 0xFFE | 1, (u64)page | 0xFFE | 1);
    struct hv_tsc_page *tp = (void *)page;
    u64 t;
    report(ok && hv_tsc_page_read(tp, &t), "REFERENCE_TSC with bits 11:1 set is stored and the page is valid");
    wr_ok(HV_MSR_REFERENCE_TSC, 0, 0);

    ok = wr_ok(HV_MSR_VP_ASSIST_PAGE, (u64)page | 0xFFE | 1, (u64)page | 0xFFE | 1);
    ok &= wr_ok(HV_MSR_VP_ASSIST_PAGE, 0xFFE, 0xFFE);
    ok &= wr_ok(HV_MSR_VP_ASSIST_PAGE, 0, 0);
    report(ok, "VP_ASSIST_PAGE with bits 11:1 set is stored");

    ok = wr_ok(HV_MSR_SCONTROL, ~0ul, ~0ul) && wr_ok(HV_MSR_SCONTROL, 1, 1);
    ok &= wr_ok(HV_MSR_SIMP, (u64)page | 0xFFE | 1, (u64)page | 0xFFE | 1);
    ok &= wr_ok(HV_MSR_SIEFP, (u64)page | 0xFFE | 1, (u64)page | 0xFFE | 1);
    ok &= wr_ok(HV_MSR_SIMP, 0, 0) && wr_ok(HV_MSR_SIEFP, 0, 0);
    report(ok, "SCONTROL = ~0, SIMP and SIEFP with bits 11:1 set are stored");

    ok = true;
    for (unsigned s = 0; s < 16; s++) {
        ok &= wr_ok(HV_MSR_SINT0 + s, 0xFFFFFFFFFFFEFF30ul, 0xFFFFFFFFFFFEFF30ul);
        ok &= wr_ok(HV_MSR_SINT0 + s, ~0ul, ~0ul);
        ok &= wr_ok(HV_MSR_SINT0 + s, HV_SINT_MASKED, HV_SINT_MASKED);
    }
    report(ok, "every SINT stores all 64 bits (unmasked vector 0x30 with every other bit set, and ~0)");

    ok = true;
    for (unsigned n = 0; n < 4; n++) {
        ok &= wr_ok(HV_MSR_STIMER0_CONFIG + 2 * n, 0xFFFFFFFFFFF0E000ul, 0xFFFFFFFFFFF0E000ul);
        ok &= wr_ok(HV_MSR_STIMER0_COUNT + 2 * n, ~0ul, ~0ul);
        ok &= wr_ok(HV_MSR_STIMER0_CONFIG + 2 * n, 0, 0);
        ok &= wr_ok(HV_MSR_STIMER0_COUNT + 2 * n, 0, 0);
    }
    report(ok, "STIMER CONFIG reserved bits (63:20, 15:13) and COUNT = ~0 are stored");

    ok = true;
    for (unsigned i = 0; i < 5; i++)
        ok &= wr_ok(HV_MSR_CRASH_P0 + i, ~0ul - i, ~0ul - i);
    u64 ctl = rd(HV_MSR_CRASH_CTL);
    ok &= wr_ok(HV_MSR_CRASH_CTL, 0x7FFFFFFFFFFFFFFFul, ctl) && wr_ok(HV_MSR_CRASH_CTL, 0, ctl);
    report(ok, "CRASH_P0..4 store ~0; CRASH_CTL writes without the notify bit keep reading %lx", ctl);

    ok = wr_ok(HV_MSR_REENLIGHTENMENT_CONTROL, ~0ul, ~0ul) && wr_ok(HV_MSR_REENLIGHTENMENT_CONTROL, 0, 0);
    ok &= wr_ok(HV_MSR_TSC_EMULATION_CONTROL, ~0ul, ~0ul) && wr_ok(HV_MSR_TSC_EMULATION_CONTROL, 0, 0);
    report(ok, "REENLIGHTENMENT_CONTROL and TSC_EMULATION_CONTROL store ~0");

    ok = wr_gp(HV_MSR_TSC_EMULATION_STATUS, 1, true) && wr_gp(HV_MSR_TSC_EMULATION_STATUS, 1ul << 63, true) &&
         wr_gp(HV_MSR_TSC_EMULATION_STATUS, ~0ul, true) && wr_ok(HV_MSR_TSC_EMULATION_STATUS, 0, 0);
    report(ok, "TSC_EMULATION_STATUS #GPs on every non-zero value");

    ok = wr_gp(HV_MSR_TSC_INVARIANT_CONTROL, 2, true) && wr_gp(HV_MSR_TSC_INVARIANT_CONTROL, ~0ul, true) &&
         wr_gp(HV_MSR_TSC_INVARIANT_CONTROL, 1ul << 63, true) && wr_ok(HV_MSR_TSC_INVARIANT_CONTROL, 1, 1) &&
         wr_gp(HV_MSR_TSC_INVARIANT_CONTROL, 0, true) && wr_gp(HV_MSR_TSC_INVARIANT_CONTROL, 3, true);
    report(ok, "TSC_INVARIANT_CONTROL #GPs on bits other than 0 and on clearing bit 0");

    ok = wr_ok(HV_MSR_RESET, 2, 0) && wr_ok(HV_MSR_RESET, ~0ul, 0) && wr_ok(HV_MSR_RESET, 0, 0);
    report(ok, "RESET ignores every value but 1 (2, ~0, 0)");
    wr_ok(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX, HV_GUEST_OS_ID_LINUX);
}

static void sint_vectors(void)
{
    bool ok = true;
    for (unsigned s = 0; s < 16; s++) {
        for (u64 v = 0; v < 16; v++) {
            ok &= wr_gp(HV_MSR_SINT0 + s, v, true);
            ok &= wr_gp(HV_MSR_SINT0 + s, v | HV_SINT_AUTO_EOI, true);
            ok &= wr_ok(HV_MSR_SINT0 + s, v | HV_SINT_MASKED, v | HV_SINT_MASKED);
            ok &= wr_ok(HV_MSR_SINT0 + s, v | HV_SINT_MASKED | HV_SINT_AUTO_EOI, v | HV_SINT_MASKED | HV_SINT_AUTO_EOI);
        }
        ok &= wr_ok(HV_MSR_SINT0 + s, 16, 16) && wr_ok(HV_MSR_SINT0 + s, HV_SINT_MASKED, HV_SINT_MASKED);
    }
    report(ok, "SINT0..15 with vectors 0..15: #GP unmasked (value kept), stored masked; vector 16 accepted");
}

/* Message-mode one-shot stimer `timer` on SINT `sint` whose deadline (absolute reference time 1) is already past:
 * it expires during the COUNT write itself (KVM: "a one-shot timer with a count in the past expires at once"),
 * so the outcome does not depend on how busy the host is. */
static void expire_now(unsigned timer, unsigned sint)
{
    stimer_config(timer, HV_STIMER_SINT(sint) | HV_STIMER_AUTO_ENABLE);
    stimer_count(timer, 1);
}

/* Waits (interrupts on) until hits[v] reaches `want`, at most 2 s; then a short grace period for extras. */
static bool wait_hits(u8 v, u32 want)
{
    bool ok = wait_count(&hits[v], want, ms(2000));
    idle_for(ms(2));
    return ok;
}

static bool stimer_enabled(unsigned timer) { return rd(HV_MSR_STIMER0_CONFIG + 2 * timer) & HV_STIMER_ENABLE; }

static void pages_outside_ram(u8 *hc_page)
{
    u64 ram = fw_cfg_ram_size();
    static const struct {
        const char *name;
        u64 gpa;
    } bad[] = {{"beyond RAM", 0}, {"on the local APIC page", 0xFEE00000ul}, {"in the 0xF0000000 hole", 0xF0000000ul}};
    for (unsigned i = 0; i < ARRAY_SIZE(bad); i++) {
        u64 gpa = bad[i].gpa ? bad[i].gpa : ram + (1ul << 32);
        u64 hc = rd(HV_MSR_HYPERCALL);
        bool ok = wr_gp(HV_MSR_HYPERCALL, gpa | 1, true);
        ok &= hv_hypercall(0x7FFF, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE;
        ok &= wr_ok(HV_MSR_HYPERCALL, gpa, gpa) && wr_ok(HV_MSR_HYPERCALL, hc, hc);
        report(ok, "HYPERCALL enabled %s: #GP, value kept, the old page still works; disabled: stored", bad[i].name);

        ok = wr_gp(HV_MSR_VP_ASSIST_PAGE, gpa | 1, true) && wr_ok(HV_MSR_VP_ASSIST_PAGE, gpa, gpa);
        ok &= wr_ok(HV_MSR_VP_ASSIST_PAGE, 0, 0);
        report(ok, "VP_ASSIST_PAGE enabled %s: #GP; disabled: stored", bad[i].name);

        u32 id = apic_id();
        u64 t0 = hv_ref_time();
        ok = wr_ok(HV_MSR_REFERENCE_TSC, gpa | 1, gpa | 1);
        idle_for(ms(1));
        u64 t1 = hv_ref_time();
        ok &= wr_ok(HV_MSR_REFERENCE_TSC, 0, 0);
        report(ok && t1 > t0 && apic_id() == id,
               "REFERENCE_TSC enabled %s: stored, TIME_REF_COUNT still advances (%lu -> %lu), the APIC is intact",
               bad[i].name, t0, t1);

        /* SIMP there: accepted (SYNIC2), and a timer message to it cannot be delivered: the timer stays
         * enabled with its message pending, and EOMs retry in vain. */
        memset((void *)hits, 0, sizeof(hits));
        synic_set_sint(2, 0x40, false);
        ok = wr_ok(HV_MSR_SIMP, gpa | 1, gpa | 1);
        expire_now(0, 2);
        idle_for(ms(2));
        for (int k = 0; k < 10; k++)
            wrmsr(HV_MSR_EOM, 0);
        idle_for(ms(2));
        report(ok && hits[0x40] == 0 && stimer_enabled(0),
               "SIMP %s: stored; a stimer message is not delivered (no interrupt) and stays pending", bad[i].name);
        /* Moving SIMP into RAM and acknowledging delivers it. */
        struct hv_message *simp = alloc_pages(1);
        wrmsr(HV_MSR_SIMP, (u64)simp | 1);
        wrmsr(HV_MSR_EOM, 0);
        wait_hits(0x40, 1);
        report(hits[0x40] == 1 && simp[2].type == HVMSG_TIMER_EXPIRED && !stimer_enabled(0),
               "... moved into RAM, EOM delivers it: %u interrupt, type %x", hits[0x40], simp[2].type);
        simp[2].type = 0;
        wrmsr(HV_MSR_SIMP, 0);

        /* SIEFP there: a SignalEvent succeeds (QEMU's answer) and the flag is dropped. */
        memset((void *)hits, 0, sizeof(hits));
        synic_set_sint(3, 0x41, false);
        ok = wr_ok(HV_MSR_SIEFP, gpa | 1, gpa | 1);
        hvt_cmd(HVT_EVT_CONN_CREATE, 0, 3, 9);
        u64 st = hv_signal_event_fast(9, 0);
        idle_for(ms(2));
        report(ok && st == HV_STATUS_SUCCESS && hits[0x41] == 0,
               "SIEFP %s: SignalEvent returns %lx, no interrupt", bad[i].name, st);
        hvt_cmd(HVT_EVT_CONN_DESTROY, 0, 0, 9);
        wrmsr(HV_MSR_SIEFP, 0);

        /* SIMP there and a PostMessage echo: the echo is lost, the staging buffer is freed. */
        wrmsr(HV_MSR_SIMP, gpa | 1);
        hvt_cmd(HVT_MSG_CONN_CREATE, 0, 3, 10);
        struct hv_post_message_input *in = alloc_pages(1);
        in->connection_id = 10;
        in->message_type = HVMSG_TEST;
        in->payload_size = 240;
        u64 st1 = hv_post_message(in), st2 = hv_post_message(in);
        idle_for(ms(2));
        report(st1 == HV_STATUS_SUCCESS && st2 == HV_STATUS_SUCCESS && hits[0x41] == 0,
               "SIMP %s: PostMessage echoes return %lx %lx and are dropped", bad[i].name, st1, st2);
        hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, 10);
        wrmsr(HV_MSR_SIMP, 0);
        synic_mask_all();
    }
    (void)hc_page;
}

static void stimer_edges(void)
{
    struct hv_message *simp = alloc_pages(1);
    wrmsr(HV_MSR_SIMP, (u64)simp | 1);
    synic_set_sint(2, 0x40, false);
    set_irq_handler(0x40, count_irq);
    set_irq_handler(0x42, count_irq);
    static const u8 low[] = {0, 1, 2, 5, 8, 13, 15};
    for (unsigned i = 0; i < ARRAY_SIZE(low); i++)
        set_irq_handler(low[i], count_irq);

    /* Direct mode with an illegal vector: accepted by the MSR (KVM does not check), delivered to the local
     * APIC, which refuses vectors below 16; the expiry itself succeeds, so a one-shot timer disables itself. */
    bool ok = true;
    for (unsigned i = 0; i < ARRAY_SIZE(low); i++) {
        memset((void *)hits, 0, sizeof(hits));
        int f = wrmsr_safe(HV_MSR_STIMER0_CONFIG, HV_STIMER_DIRECT | HV_STIMER_VECTOR(low[i]) | HV_STIMER_AUTO_ENABLE);
        stimer_count(0, 1); /* in the past: expires during this write */
        idle_for(ms(2));
        u32 n = 0;
        for (unsigned v = 0; v < 32; v++)
            n += hits[v];
        if (f || n || stimer_enabled(0)) {
            report(false, "direct stimer, vector %u: fault %d, %u exceptions/interrupts, enabled %d", low[i], f, n,
                   stimer_enabled(0));
            ok = false;
        }
    }
    report(ok, "direct one-shot stimers with vectors 0..15 expire without delivering anything");
    for (unsigned i = 0; i < ARRAY_SIZE(low); i++)
        if (low[i] != 5)
            set_irq_handler(low[i], NULL);
    memset((void *)hits, 0, sizeof(hits));
    stimer_config(1, HV_STIMER_DIRECT | HV_STIMER_VECTOR(5) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
    stimer_count(1, 1); /* 100 ns period */
    idle_for(ms(5));
    stimer_config(1, 0);
    report(hits[5] == 0 && !stimer_enabled(1), "a periodic direct stimer with vector 5 and a 100 ns period: nothing");
    set_irq_handler(5, NULL);

    /* A 100 ns periodic direct timer with a legal vector: an interrupt storm the guest survives. */
    memset((void *)hits, 0, sizeof(hits));
    stimer_config(1, HV_STIMER_DIRECT | HV_STIMER_VECTOR(0x42) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
    stimer_count(1, 1);
    wait_count(&hits[0x42], 1, ms(2000));
    idle_for(ms(5));
    wrmsr(HV_MSR_STIMER0_CONFIG + 2, 0);
    u32 storm = hits[0x42];
    idle_for(ms(2)); /* an expiry already in the IRR is still delivered once */
    u32 after = hits[0x42];
    idle_for(ms(2));
    report(storm > 0 && after <= storm + 1 && hits[0x42] == after,
           "a 100 ns periodic direct stimer delivers (%u interrupts) and stops", storm);

    /* Count 0: clears enable (one-shot and periodic); an enabled timer with count 0 never runs. */
    memset((void *)hits, 0, sizeof(hits));
    stimer_config(0, HV_STIMER_SINT(2) | HV_STIMER_AUTO_ENABLE);
    stimer_count(0, hv_ref_time() + 100000000ul); /* 10 s from now */
    bool e1 = stimer_enabled(0);
    stimer_count(0, 0);
    bool e2 = stimer_enabled(0);
    stimer_config(1, HV_STIMER_SINT(2) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
    stimer_count(1, 0);
    bool e3 = stimer_enabled(1);
    stimer_config(2, HV_STIMER_SINT(2) | HV_STIMER_ENABLE);
    bool e4 = stimer_enabled(2);
    stimer_config(3, HV_STIMER_SINT(2) | HV_STIMER_PERIODIC | HV_STIMER_ENABLE);
    idle_for(ms(5));
    report(e1 && !e2 && !e3 && e4 && stimer_enabled(3) && hits[0x40] == 0 && simp[2].type == 0,
           "count 0 clears enable (one-shot and periodic); enabled with count 0: stays enabled, never fires "
           "(%d %d %d %d %d, %u interrupts, slot type %x)",
           e1, e2, e3, e4, stimer_enabled(3), hits[0x40], simp[2].type);
    for (unsigned n = 0; n < 4; n++)
        stimer_config(n, 0);

    /* Count u64::MAX: one-shot deadline at the end of time, periodic period of 58000 years: neither fires, and
     * nothing wraps into the past. */
    memset((void *)hits, 0, sizeof(hits));
    stimer_config(0, HV_STIMER_SINT(2) | HV_STIMER_AUTO_ENABLE);
    stimer_count(0, ~0ul);
    stimer_config(1, HV_STIMER_SINT(2) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
    stimer_count(1, ~0ul);
    stimer_config(2, HV_STIMER_DIRECT | HV_STIMER_VECTOR(0x42) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
    stimer_count(2, ~0ul);
    stimer_config(3, HV_STIMER_DIRECT | HV_STIMER_VECTOR(0x42) | HV_STIMER_AUTO_ENABLE);
    stimer_count(3, ~0ul - 1);
    idle_for(ms(10));
    bool all_on = stimer_enabled(0) && stimer_enabled(1) && stimer_enabled(2) && stimer_enabled(3);
    report(all_on && hits[0x40] == 0 && hits[0x42] == 0 && simp[2].type == 0,
           "count u64::MAX (one-shot, periodic, direct): enabled, nothing fires (%d %d %d %d, %u %u, %x)",
           stimer_enabled(0), stimer_enabled(1), stimer_enabled(2), stimer_enabled(3), hits[0x40], hits[0x42],
           simp[2].type);
    for (unsigned n = 0; n < 4; n++)
        stimer_config(n, 0);
    stimer_count(0, 0);
    wrmsr(HV_MSR_SIMP, 0);
    synic_mask_all();
}

/* Every hyperv-testdev command with a missing VP, SINT or connection (QEMU asserts on several of them): ignored;
 * duplicates keep the first registration; the device keeps working. */
static void testdev_garbage(void)
{
    struct hv_message *simp = alloc_pages(1);
    wrmsr(HV_MSR_SIMP, (u64)simp | 1);
    synic_set_sint(4, 0x44, false);
    synic_set_sint(5, 0x45, false);
    set_irq_handler(0x44, count_irq);
    set_irq_handler(0x45, count_irq);
    memset((void *)hits, 0, sizeof(hits));
    for (unsigned cmd = 0; cmd < 256; cmd++) {
        if (cmd == HVT_LATCH_EXITS)
            continue;
        hvt_cmd((u8)cmd, 200, 99, 255); /* no such VP, no such SINT */
        hvt_cmd((u8)cmd, 0, 99, 254);   /* no such SINT */
        hvt_cmd((u8)cmd, 0, 7, 253);    /* destroys and fires of things never created */
    }
    hvt_cmd(HVT_LATCH_EXITS, 200, 0, 0);
    (void)inl(HV_TESTDEV_PORT);
    (void)inl(HV_TESTDEV_PORT);
    outb(HV_TESTDEV_PORT, 0xFF); /* a 1-byte write (only 32-bit accesses are valid) */
    outw(HV_TESTDEV_PORT + 2, 0xFFFF);
    idle_for(ms(2));
    u32 stray = hits[0x44] + hits[0x45];

    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 4, 0);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 4, 0);
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 4, 0);
    wait_hits(0x44, 1);
    u32 fired = hits[0x44];
    hvt_cmd(HVT_SINT_ROUTE_DESTROY, 0, 4, 0);
    hvt_cmd(HVT_SINT_ROUTE_DESTROY, 0, 4, 0);
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 4, 0);
    idle_for(ms(2));
    report(stray == 0 && fired == 1 && hits[0x44] == 1,
           "768 hyperv-testdev commands naming missing VPs/SINTs/connections are ignored; a real route fires once "
           "and not after its destruction (%u %u %u)",
           stray, fired, hits[0x44]);

    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 5, 20);
    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 6, 20); /* duplicate: ignored */
    struct hv_post_message_input *in = alloc_pages(1);
    in->connection_id = 20;
    in->message_type = HVMSG_TEST;
    in->payload_size = 16;
    u64 st = hv_post_message(in);
    wait_hits(0x45, 1);
    report(st == HV_STATUS_SUCCESS && hits[0x45] == 1 && simp[5].type == HVMSG_TEST && simp[6].type == 0,
           "a duplicate MSG_CONN_CREATE keeps the first target (status %lx, slot 5 %x, slot 6 %x)", st,
           simp[5].type, simp[6].type);
    hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, 20);
    hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, 20);
    st = hv_post_message(in);
    report(st == HV_STATUS_INVALID_CONNECTION_ID, "after MSG_CONN_DESTROY (twice) PostMessage gives %lx (0x12)", st);
    wrmsr(HV_MSR_SIMP, 0);
    synic_mask_all();
}

/* All four timers periodic with a 100 ns period (direct mode): an interrupt storm that must stop when disabled. */
static void stimer_storm(void)
{
    memset((void *)hits, 0, sizeof(hits));
    set_irq_handler(0x42, count_irq);
    for (unsigned n = 0; n < 4; n++) {
        stimer_config(n, HV_STIMER_DIRECT | HV_STIMER_VECTOR(0x42) | HV_STIMER_PERIODIC | HV_STIMER_AUTO_ENABLE);
        stimer_count(n, 1);
    }
    wait_count(&hits[0x42], 1, ms(2000));
    idle_for(ms(20));
    for (unsigned n = 0; n < 4; n++)
        stimer_config(n, 0);
    u32 storm = hits[0x42];
    idle_for(ms(5)); /* an expiry already in the IRR is still delivered once */
    u32 after = hits[0x42];
    idle_for(ms(5));
    report(storm > 0 && after <= storm + 1 && hits[0x42] == after,
           "four 100 ns periodic stimers at once: %u interrupts, then silence", storm);
}

/* Exit-less EOI (hv-vapic, KVM's PV-EOI through bit 0 of the assist page's first u32) when the interrupt
 * handler moves or disables the assist page right after clearing the bit, or without clearing it. KVM
 * completes a cleared bit's EOI at the exit, before it handles the MSR write; an uncleared bit means no EOI. */
#define PV_VECTOR 0x50
static volatile u32 *pv_assist;
static volatile u64 pv_next_page; /* what the handler writes to VP_ASSIST_PAGE */
static volatile u32 pv_taken, pv_plain, pv_clear;

static void pv_handler(struct regs *r)
{
    (void)r;
    u8 bit;
    asm volatile("lock btrl $0, %1; setc %b0" : "=q"(bit), "+m"(*pv_assist) : : "memory", "cc");
    if (bit && !pv_clear) {
        *pv_assist |= 1; /* put it back: this handler "forgets" the exit-less EOI */
    }
    if (bit)
        pv_taken++;
    else {
        pv_plain++;
        apic_eoi();
    }
    wrmsr(HV_MSR_VP_ASSIST_PAGE, pv_next_page);
}

static void pveoi_page_changes(void)
{
    if (apic_mode() != APIC_X2APIC) {
        report_skip("exit-less EOI cases need x2APIC");
        return;
    }
    set_irq_handler(PV_VECTOR, pv_handler);
    static const struct {
        const char *name;
        bool clear; /* the handler clears the bit (does the exit-less EOI) */
        bool move;  /* moves the page (else disables it) */
    } cases[] = {
        {"cleared, then the page disabled", true, false},
        {"cleared, then the page moved", true, true},
        {"not cleared, then the page disabled", false, false},
        {"not cleared, then the page moved", false, true},
    };
    for (unsigned i = 0; i < ARRAY_SIZE(cases); i++) {
        u8 *a = alloc_pages(1), *b = alloc_pages(1);
        pv_assist = (volatile u32 *)a;
        wrmsr(HV_MSR_VP_ASSIST_PAGE, (u64)a | 1);
        pv_next_page = cases[i].move ? (u64)b | 1 : 0;
        pv_clear = cases[i].clear;
        pv_taken = pv_plain = 0;
        apic_send_ipi(apic_id(), PV_VECTOR);
        u64 end = rdtsc() + ms(2000);
        sti();
        while (pv_taken + pv_plain == 0 && rdtsc() < end)
            (void)inb(0x80);
        cli();
        bool in_service = apic_vector_set(APIC_ISR, PV_VECTOR);
        if (pv_plain) {
            report_skip("%s: the exit-less EOI was not offered", cases[i].name);
        } else if (cases[i].clear) {
            report(pv_taken == 1 && !in_service, "exit-less EOI %s: the EOI is done (in service: %d)", cases[i].name,
                   in_service);
        } else {
            report(pv_taken == 1 && in_service, "exit-less EOI %s: no EOI, the vector stays in service (%d)",
                   cases[i].name, in_service);
        }
        if (apic_vector_set(APIC_ISR, PV_VECTOR))
            apic_eoi();
        wrmsr(HV_MSR_VP_ASSIST_PAGE, 0);
    }
    report(!apic_vector_set(APIC_ISR, PV_VECTOR), "... and nothing stays in service afterwards");
    set_irq_handler(PV_VECTOR, NULL);
}

/* Every overlay page on one guest page: SIMP, SIEFP, the reference TSC page, the VP assist page and the hypercall
 * page. The guest gets the mess it asked for (each write lands where that feature puts it), and the features keep
 * working where their bytes do not collide: a timer message in SINT 1's slot, an event flag in SINT 2's slot, the
 * hypercall code at offset 0 (written last). */
static void overlays_on_one_page(void)
{
    u8 *p = alloc_pages(1);
    u64 gpa = (u64)p;
    bool ok = wrmsr_safe(HV_MSR_SIMP, gpa | 1) == 0 && wrmsr_safe(HV_MSR_SIEFP, gpa | 1) == 0 &&
              wrmsr_safe(HV_MSR_REFERENCE_TSC, gpa | 1) == 0 && wrmsr_safe(HV_MSR_VP_ASSIST_PAGE, gpa | 1) == 0 &&
              wrmsr_safe(HV_MSR_HYPERCALL, gpa | 1) == 0;
    u8 *old_page = hv_hypercall_page;
    hv_hypercall_page = p;
    u64 st = hv_hypercall(0x7FFF, 0, 0);
    memset((void *)hits, 0, sizeof(hits));
    set_irq_handler(0x46, count_irq);
    set_irq_handler(0x47, count_irq);
    synic_set_sint(1, 0x46, false);
    synic_set_sint(2, 0x47, false);
    expire_now(0, 1);
    hvt_cmd(HVT_EVT_CONN_CREATE, 0, 2, 9);
    u64 st2 = hv_signal_event_fast(9, 0);
    u64 t0 = hv_ref_time();
    wait_hits(0x46, 1);
    wait_hits(0x47, 1);
    struct hv_message *msgs = (struct hv_message *)p;
    u8 flag = p[2 * 256 + 1] & 2; /* event flag 9 of SINT 2 */
    report(ok && st == HV_STATUS_INVALID_HYPERCALL_CODE && st2 == HV_STATUS_SUCCESS && hits[0x46] == 1 &&
               hits[0x47] == 1 && msgs[1].type == HVMSG_TIMER_EXPIRED && flag && hv_ref_time() > t0,
           "SIMP, SIEFP, TSC, assist and hypercall pages on one page: accepted, and a timer message, an event flag "
           "and a hypercall still work (%d %lx %lx %u %u %x %d)",
           ok, st, st2, hits[0x46], hits[0x47], msgs[1].type, flag);
    hvt_cmd(HVT_EVT_CONN_DESTROY, 0, 0, 9);
    wrmsr(HV_MSR_SIMP, 0);
    wrmsr(HV_MSR_SIEFP, 0);
    wrmsr(HV_MSR_REFERENCE_TSC, 0);
    wrmsr(HV_MSR_VP_ASSIST_PAGE, 0);
    wrmsr(HV_MSR_HYPERCALL, (u64)old_page | 1);
    hv_hypercall_page = old_page;
    synic_mask_all();
}

static void eom_flood(void)
{
    struct hv_message *simp = alloc_pages(1);
    wrmsr(HV_MSR_SIMP, (u64)simp | 1);
    synic_set_sint(3, 0x43, false);
    set_irq_handler(0x43, count_irq);
    memset((void *)hits, 0, sizeof(hits));
    for (int i = 0; i < 5000; i++)
        wrmsr(HV_MSR_EOM, (u64)i * 0x9E3779B97F4A7C15ul);
    idle_for(ms(1));
    report(hits[0x43] == 0, "5000 EOM writes with nothing pending: no interrupt, no fault");

    /* A timer message that finds its slot busy: msg_pending is set and EOMs retry while the slot stays busy. */
    simp[3].type = HVMSG_TEST;
    expire_now(1, 3);
    idle_for(ms(2));
    bool pending = (simp[3].flags & HV_MSG_FLAG_PENDING) != 0;
    for (int i = 0; i < 3000; i++)
        wrmsr(HV_MSR_EOM, 0);
    idle_for(ms(2));
    report(pending && hits[0x43] == 0 && stimer_enabled(1) && simp[3].type == HVMSG_TEST,
           "3000 EOMs while a timer message waits for a busy slot: msg_pending set, nothing delivered, timer pending");
    simp[3].type = 0;
    wrmsr(HV_MSR_EOM, 0);
    wait_hits(0x43, 1);
    report(hits[0x43] == 1 && simp[3].type == HVMSG_TIMER_EXPIRED && !stimer_enabled(1),
           "freeing the slot and one EOM delivers it exactly once (%u)", hits[0x43]);
    simp[3].type = 0;
    for (int i = 0; i < 2000; i++)
        wrmsr(HV_MSR_EOM, 0);
    idle_for(ms(1));
    report(hits[0x43] == 1, "2000 more EOMs after delivery: no duplicate");
    wrmsr(HV_MSR_SIMP, 0);
    synic_mask_all();
}

int main(void)
{
    apic_init(apic_mode_from_cmdline());
    u8 *hc_page = hv_enable_hypercalls();
    if (!hc_page)
        fail("cannot enable the hypercall page");
    tsc_khz = rd(HV_MSR_TSC_FREQUENCY) / 1000;
    if (!tsc_khz)
        fail("TSC_FREQUENCY is 0");
    set_irq_handler(0x40, count_irq);
    set_irq_handler(0x41, count_irq);
    wrmsr(HV_MSR_SCONTROL, 1);

    read_only_and_unimplemented();
    reserved_bits(hc_page);
    sint_vectors();
    pages_outside_ram(hc_page);
    stimer_edges();
    eom_flood();
    testdev_garbage();
    stimer_storm();
    pveoi_page_changes();
    overlays_on_one_page();
    report(hv_hypercall(0x7FFF, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE, "hypercalls still work at the end");
    return 0;
}

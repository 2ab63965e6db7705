/*
 * SynIC under -device hyperv-testdev on 2 vCPUs: MSR read/write and reserved bits; all 16 SINTs delivered with
 * auto-EOI and normal-EOI vectors mixed in one priority class; PostMessage (testdev echo) to self and to the other
 * VP; a post to a full slot sets msg_pending and is redelivered after EOM, or after the EOI of the SINT's vector;
 * a second post while one waits gets INSUFFICIENT_BUFFERS; SignalEvent sets the flag and interrupts only on 0->1;
 * hostile input (SIMP/SIEFP outside RAM, payload > 240, vector < 16, EOM storms, bogus testdev commands).
 */
#include "rt.h"
#include "synic.h"

#define VEC_BASE 0x50 /* SINT i -> 0x50 + i: one priority class */
#define VEC_MSG 0x60
#define VEC_MSG2 0x62
#define VEC_EVT 0x61
#define FAR_OUTSIDE_RAM 0x7F00000000ul

static u64 tsc_hz;
static struct hv_message *simp[2];
static u8 *siefp[2];

static volatile u32 sint_count[256];
static volatile u32 sint_total;
static volatile u32 isr_wrong[256];
static volatile u32 msg_irq[2];
static volatile u32 msg2_irq;
static volatile u32 evt_irq;

static u64 ms(u64 n) { return tsc_hz / 1000 * n; }

static void quiet(u64 n_ms) { idle_for(ms(n_ms)); }

static void sint_handler(struct regs *r)
{
    u8 v = (u8)r->vector;
    bool auto_eoi = ((v - VEC_BASE) & 1) == 0;
    sint_count[v]++;
    sint_total++;
    /* auto-EOI: never in the ISR when accepted; normal: in the ISR until our EOI. */
    if (apic_vector_set(APIC_ISR, v) == auto_eoi)
        isr_wrong[v]++;
    if (!auto_eoi)
        apic_eoi();
}

static void msg_handler(struct regs *r)
{
    (void)r;
    msg_irq[smp_id() & 1]++;
    apic_eoi();
}

static void msg2_handler(struct regs *r)
{
    (void)r;
    msg2_irq++;
    apic_eoi();
}

static void evt_handler(struct regs *r)
{
    (void)r;
    evt_irq++; /* auto-EOI SINT: no EOI */
}

static void ap_setup(void *arg)
{
    (void)arg;
    synic_enable(simp[1], siefp[1]);
    synic_set_sint(2, VEC_MSG, false);
}

static void test_msrs(void)
{
    report(rdmsr(HV_MSR_SVERSION) == 1, "SVERSION reads 1");
    report(wrmsr_safe(HV_MSR_SVERSION, 2) == GP_FAULT, "SVERSION is read-only (#GP)");
    bool masked = true;
    for (unsigned i = 0; i < 16; i++)
        masked &= rdmsr(HV_MSR_SINT0 + i) == HV_SINT_MASKED;
    report(masked, "every SINT starts masked (0x10000)");
    report(rdmsr(HV_MSR_EOM) == 0, "EOM reads 0");
    wrmsr(HV_MSR_SCONTROL, 1);
    report(rdmsr(HV_MSR_SCONTROL) == 1, "SCONTROL read back");
    u64 v = 0x77 | HV_SINT_AUTO_EOI | (1ul << 18);
    wrmsr(HV_MSR_SINT0 + 9, v);
    report(rdmsr(HV_MSR_SINT0 + 9) == v, "SINT stores vector, auto-EOI and polling bits");
    report(wrmsr_safe(HV_MSR_SINT0 + 9, 15) == GP_FAULT, "unmasked SINT vector 15: #GP");
    report(rdmsr(HV_MSR_SINT0 + 9) == v, "the refused SINT write changed nothing");
    report(wrmsr_safe(HV_MSR_SINT0 + 9, 15 | HV_SINT_MASKED) == 0, "masked SINT vector 15 is accepted");
    wrmsr(HV_MSR_SINT0 + 9, HV_SINT_MASKED);
    wrmsr(HV_MSR_SIMP, (u64)simp[0] | 1);
    report(rdmsr(HV_MSR_SIMP) == ((u64)simp[0] | 1), "SIMP read back");
    wrmsr(HV_MSR_SIEFP, (u64)siefp[0] | 1);
    report(rdmsr(HV_MSR_SIEFP) == ((u64)siefp[0] | 1), "SIEFP read back");
}

static void test_all_sints(void)
{
    for (unsigned i = 0; i < 16; i++) {
        set_irq_handler(VEC_BASE + i, sint_handler);
        synic_set_sint(i, VEC_BASE + i, (i & 1) == 0);
        hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, i, 0);
    }
    const unsigned rounds = 3;
    for (unsigned round = 0; round < rounds; round++) {
        cli();
        for (unsigned i = 0; i < 16; i++)
            hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, i, 0);
        /* All 16 are pending at once; wait until they are all taken before the next round (the IRR would
         * merge a second request of a vector still pending). */
        wait_count(&sint_total, 16 * (round + 1), ms(1000));
        quiet(2);
    }
    bool ok = true;
    for (unsigned i = 0; i < 16; i++) {
        u8 v = VEC_BASE + i;
        if (sint_count[v] != rounds || isr_wrong[v] || apic_vector_set(APIC_ISR, v) || apic_vector_set(APIC_IRR, v)) {
            report(false, "SINT%u vector %x: %u deliveries, %u ISR errors, ISR %d IRR %d", i, v, sint_count[v],
                   isr_wrong[v], apic_vector_set(APIC_ISR, v), apic_vector_set(APIC_IRR, v));
            ok = false;
        }
    }
    report(ok, "all 16 SINTs delivered %u times each, auto-EOI (even) never in ISR, none lost or stuck", rounds);
    /* Masked SINT: firing it does nothing. */
    wrmsr(HV_MSR_SINT0 + 5, HV_SINT_MASKED | (VEC_BASE + 5));
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 5, 0);
    quiet(5);
    report(sint_count[VEC_BASE + 5] == rounds, "a masked SINT raises nothing");
    for (unsigned i = 0; i < 16; i++) {
        hvt_cmd(HVT_SINT_ROUTE_DESTROY, 0, i, 0);
        wrmsr(HV_MSR_SINT0 + i, HV_SINT_MASKED);
    }
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 0, 0); /* destroyed route: ignored */
    synic_set_sint(0, VEC_BASE, true);
    quiet(5);
    report(sint_count[VEC_BASE] == rounds, "firing a destroyed route does nothing");
    wrmsr(HV_MSR_SINT0, HV_SINT_MASKED);
}

static struct hv_post_message_input *post_in;

static u64 post(u32 conn, u32 type, u32 size, u8 fill)
{
    post_in->connection_id = conn;
    post_in->message_type = type;
    post_in->payload_size = size;
    for (u32 i = 0; i < 240; i++)
        post_in->payload[i] = (u8)(fill + i);
    return hv_post_message(post_in);
}

static bool slot_is(const struct hv_message *m, u32 type, u32 size, u8 fill)
{
    if (m->type != type || m->size != size || m->sender != 0)
        return false;
    for (u32 i = 0; i < size; i++)
        if (m->payload[i] != (u8)(fill + i))
            return false;
    return true;
}

static void test_messages(void)
{
    set_irq_handler(VEC_MSG, msg_handler);
    set_irq_handler(VEC_MSG2, msg2_handler);
    synic_set_sint(2, VEC_MSG, false);
    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 2, 1); /* conn 1 -> VP 0 SINT 2 */
    hvt_cmd(HVT_MSG_CONN_CREATE, 1, 2, 2); /* conn 2 -> VP 1 SINT 2 */

    struct hv_message *m = &simp[0][2];
    u64 s = post(1, 0x1234, 16, 0x10);
    bool got = wait_count(&msg_irq[0], 1, ms(500));
    report(s == 0 && got && slot_is(m, 0x1234, 16, 0x10) && m->flags == 0,
           "PostMessage to self: status %lx, interrupt, echo in slot 2 (type %x size %u)", s, m->type, m->size);

    s = post(1, 0x2345, 240, 0x40);
    quiet(10);
    report(s == 0 && msg_irq[0] == 1 && (m->flags & HV_MSG_FLAG_PENDING) && m->type == 0x1234,
           "post to a full slot: SUCCESS, msg_pending set, no interrupt, old message kept");
    s = post(1, 0x3456, 8, 0x70);
    report(s == HV_STATUS_INSUFFICIENT_BUFFERS, "a post while the echo waits: INSUFFICIENT_BUFFERS (%lx)", s);
    m->type = HVMSG_NONE;
    wrmsr(HV_MSR_EOM, 0);
    got = wait_count(&msg_irq[0], 2, ms(500));
    report(got && slot_is(m, 0x2345, 240, 0x40) && m->flags == 0,
           "redelivered after EOM: 240-byte payload, msg_pending cleared");
    m->type = HVMSG_NONE;
    s = post(1, 0x4567, 1, 0x01);
    got = wait_count(&msg_irq[0], 3, ms(500));
    report(s == 0 && got && slot_is(m, 0x4567, 1, 0x01), "staging buffer free again after the redelivery");

    /* Redelivery through the EOI of the SINT's vector (normal-EOI SINT 4): the slot stays busy, a route fires
     * the SINT, the handler's EOI acknowledges it and the staged echo goes in. */
    synic_set_sint(4, VEC_MSG2, false);
    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 4, 3);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 4, 0);
    struct hv_message *m4 = &simp[0][4];
    post(3, 0x11, 4, 0x20);
    wait_count(&msg2_irq, 1, ms(500));
    s = post(3, 0x22, 4, 0x30);
    quiet(5);
    bool pending = (m4->flags & HV_MSG_FLAG_PENDING) && msg2_irq == 1;
    m4->type = HVMSG_NONE;
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 4, 0);
    got = wait_count(&msg2_irq, 3, ms(500));
    report(s == 0 && pending && got && slot_is(m4, 0x22, 4, 0x30),
           "busy slot redelivered after the EOI of its vector (%u interrupts)", msg2_irq);
    m4->type = HVMSG_NONE;

    /* To the other VP. */
    s = post(2, 0x5678, 32, 0x55);
    got = wait_count(&msg_irq[1], 1, ms(500));
    report(s == 0 && got && slot_is(&simp[1][2], 0x5678, 32, 0x55) && msg_irq[0] == 3,
           "PostMessage to the other VP: its slot 2 and its interrupt only");
    simp[1][2].type = HVMSG_NONE;

    /* Payload over 240: refused before the connection is looked at. */
    s = post(1, 0x99, 241, 0);
    report(s == HV_STATUS_INVALID_HYPERCALL_INPUT, "payload size 241: INVALID_HYPERCALL_INPUT (%lx)", s);
    s = post(200, 0x99, 4, 0);
    report(s == HV_STATUS_INVALID_CONNECTION_ID, "unknown connection: INVALID_CONNECTION_ID (%lx)", s);
    hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, 3);
    s = post(3, 0x99, 4, 0);
    report(s == HV_STATUS_INVALID_CONNECTION_ID, "destroyed connection: INVALID_CONNECTION_ID (%lx)", s);
}

static void test_events(void)
{
    set_irq_handler(VEC_EVT, evt_handler);
    synic_set_sint(3, VEC_EVT, true);
    hvt_cmd(HVT_EVT_CONN_CREATE, 0, 3, 5);
    volatile u8 *flags = siefp[0] + 3 * 256;
    u64 s = hv_signal_event_fast(5, 0);
    bool got = wait_count(&evt_irq, 1, ms(500));
    report(s == 0 && got && (flags[0] & (1 << 5)), "SignalEvent: SUCCESS, flag 5 of slot 3 set, interrupt");
    s = hv_signal_event_fast(5, 0);
    quiet(10);
    report(s == 0 && evt_irq == 1, "a second SignalEvent with the flag still set: no interrupt");
    flags[0] &= (u8)~(1 << 5);
    s = hv_signal_event_fast(5, 0);
    got = wait_count(&evt_irq, 2, ms(500));
    report(s == 0 && got, "after the guest cleared the flag: interrupt again");
    report(hv_signal_event_fast(9, 0) == HV_STATUS_INVALID_CONNECTION_ID, "SignalEvent unknown connection");
    report(hv_signal_event_fast(5, 1) == HV_STATUS_INVALID_PORT_ID, "SignalEvent flag number 1: INVALID_PORT_ID");
}

static void test_hostile(void)
{
    /* SIMP outside RAM: accepted; the echo is lost, not fatal. */
    u32 before = msg_irq[0];
    report(wrmsr_safe(HV_MSR_SIMP, FAR_OUTSIDE_RAM | 1) == 0, "SIMP outside RAM accepted");
    u64 s = post(1, 0x77, 8, 0);
    quiet(5);
    report(s == 0 && msg_irq[0] == before, "post with SIMP outside RAM: SUCCESS, message dropped");
    wrmsr(HV_MSR_SIMP, (u64)simp[0] | 1);
    s = post(1, 0x78, 8, 0);
    bool got = wait_count(&msg_irq[0], before + 1, ms(500));
    report(s == 0 && got && simp[0][2].type == 0x78, "messages flow again after SIMP came back");
    simp[0][2].type = HVMSG_NONE;

    u32 evts = evt_irq;
    report(wrmsr_safe(HV_MSR_SIEFP, FAR_OUTSIDE_RAM | 1) == 0, "SIEFP outside RAM accepted");
    s = hv_signal_event_fast(5, 0);
    quiet(5);
    report(s == 0 && evt_irq == evts, "SignalEvent with SIEFP outside RAM: SUCCESS, dropped");
    wrmsr(HV_MSR_SIEFP, (u64)siefp[0] | 1);

    /* EOM storm, with and without a staged echo. */
    for (unsigned i = 0; i < 3000; i++)
        wrmsr(HV_MSR_EOM, i);
    before = msg_irq[0];
    s = post(1, 0x79, 8, 0);
    got = wait_count(&msg_irq[0], before + 1, ms(500));
    report(s == 0 && got, "3000 EOM writes survived, messages still delivered");

    /* Bogus hyperv-testdev commands (QEMU would assert): ignored. */
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 9, 0);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 200, 1, 0);
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 200, 1, 0);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 40, 0);
    hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, 77);
    hvt_cmd(HVT_EVT_CONN_DESTROY, 0, 0, 78);
    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 2, 1); /* already exists */
    hvt_cmd(0x55, 1, 2, 3);
    outb(HV_TESTDEV_PORT + 1, 0xFF);
    report(inl(HV_TESTDEV_PORT) == 0, "bogus hyperv-testdev commands ignored, port reads 0");
}

int main(void)
{
    tsc_hz = tsc_hz_from_cpuid();
    if (!tsc_hz)
        tsc_hz = 2000000000ul;
    if (!(hv_features_eax() & HV_EAX_SYNIC) || !hv_enable_hypercalls()) {
        report_skip("no hv-synic or no hypercall page");
        return 0;
    }
    smp_init();
    if (nr_cpus() < 2) {
        report_skip("needs -smp 2");
        return 0;
    }
    for (unsigned i = 0; i < 2; i++) {
        simp[i] = alloc_pages(1);
        siefp[i] = alloc_pages(1);
    }
    post_in = alloc_pages(1);
    test_msrs();
    on_cpu(1, ap_setup, 0);
    test_all_sints();
    test_messages();
    test_events();
    test_hostile();
    return 0;
}

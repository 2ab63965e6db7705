/*
 * Migration test: a 1 ms periodic synthetic timer in message mode runs for `tenths=N` tenths of a second of
 * reference time (default 40) on the BSP while the test migrates the VM. Every message's expiration must be
 * start + k * period with k strictly increasing (the timer keeps its phase), delivery >= expiration, reference
 * time (TIME_REF_COUNT) never steps back, and the last message is for one of the final periods. Periods that
 * fall inside the migration's downtime are skipped, as Hyper-V does for a late periodic timer; the count is
 * reported. After a gap in reference time of over 100 ms (the VM was stopped) the run goes on for at least
 * 0.5 s.
 *
 * Meanwhile a SynIC message exchange runs through hyperv-testdev (`-device hyperv-testdev`): HvCallPostMessage
 * from the BSP on connection 1 is echoed into SINT 1 of CPU 1 (of the BSP with one CPU), one message in flight
 * at a time and at most one per timer message, each carrying its sequence number. Every post must succeed
 * and every echo must arrive once and in order, also across the migration (the
 * echo may be in flight in the slot, the engine or the device when the VM is saved).
 */
#include "rt.h"
#include "synic.h"

#define VEC_TIMER 0x90
#define VEC_ECHO 0x91
#define ECHO_TYPE 0x4D5347
#define PERIOD 10000ul /* 1 ms in 100 ns units */
#define MAX_TICKS 8192

static struct hv_message *simp;
static volatile u64 expirations[MAX_TICKS], deliveries[MAX_TICKS];
static volatile u32 timers[MAX_TICKS];
static volatile u32 nticks;
static struct hv_post_message_input *post_in;
static struct hv_message *echo_simp; /* the SIMP of the CPU the echoes go to */
static volatile u32 echoed, echo_bad;

static void echo_setup(void *arg)
{
    (void)arg;
    synic_enable(echo_simp, 0);
    synic_set_sint(1, VEC_ECHO, false);
}

static void echo_handler(struct regs *r)
{
    (void)r;
    struct hv_message *m = &echo_simp[1];
    if (m->type == ECHO_TYPE) {
        u32 seq = (u32)m->payload[0] | (u32)m->payload[1] << 8 | (u32)m->payload[2] << 16 |
                  (u32)m->payload[3] << 24;
        if (seq == echoed && m->size == 4)
            echoed = seq + 1;
        else
            echo_bad++;
    }
    bool pending = m->flags & HV_MSG_FLAG_PENDING;
    m->type = HVMSG_NONE;
    if (pending)
        wrmsr(HV_MSR_EOM, 0);
    apic_eoi();
}

/* Posts message `seq` on connection 1; returns the hypercall status. */
static u64 post_echo(u32 seq)
{
    post_in->connection_id = 1;
    post_in->message_type = ECHO_TYPE;
    post_in->payload_size = 4;
    for (int i = 0; i < 4; i++)
        post_in->payload[i] = (u8)(seq >> (8 * i));
    return hv_post_message(post_in);
}

static void timer_handler(struct regs *r)
{
    (void)r;
    struct hv_message *m = &simp[0];
    u32 n = nticks;
    if (m->type == HVMSG_TIMER_EXPIRED && n < MAX_TICKS) {
        const struct hv_timer_payload *p = (const struct hv_timer_payload *)m->payload;
        timers[n] = p->timer;
        expirations[n] = p->expiration;
        deliveries[n] = p->delivery;
        nticks = n + 1;
    }
    bool pending = m->flags & HV_MSG_FLAG_PENDING;
    m->type = HVMSG_NONE;
    if (pending)
        wrmsr(HV_MSR_EOM, 0);
    apic_eoi();
}

int main(void)
{
    u32 eax = hv_features_eax();
    if (!(eax & HV_EAX_SYNIC) || !(eax & HV_EAX_SYNTIMERS) || !(eax & HV_EAX_TIME_REF_COUNT))
        fail("needs hv-synic, hv-stimer and hv-time (features %x)", eax);
    apic_init(apic_mode_from_cmdline());
    simp = alloc_pages(1);
    set_irq_handler(VEC_TIMER, timer_handler);
    synic_enable(simp, 0);
    synic_set_sint(0, VEC_TIMER, false);
    bool echo = hv_enable_hypercalls() != NULL;
    post_in = alloc_pages(1);
    set_irq_handler(VEC_ECHO, echo_handler);
    smp_init();
    u32 echo_cpu = nr_cpus() > 1 ? 1 : 0;
    echo_simp = echo_cpu ? alloc_pages(1) : simp;
    on_cpu(echo_cpu, echo_setup, NULL);
    hvt_cmd(HVT_MSG_CONN_CREATE, (u8)echo_cpu, 1, 1); /* connection 1 -> SINT 1 of the echo CPU */
    u32 posted = 0, post_failed = 0, posted_at_tick = ~0u;
    u64 first_status = 0;
    u64 tenths = arg_u64("tenths", 40);
    stimer_count(0, PERIOD);
    u64 before = hv_ref_time(), prev = before, backwards = 0;
    stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_SINT(0));
    u64 end = before + tenths * 1000000ul;
    while (prev < end && nticks < MAX_TICKS) {
        /* At most one post per timer message: the exchange keeps the timer's pace. */
        if (echo && echoed == posted && nticks != posted_at_tick) {
            posted_at_tick = nticks;
            u64 st = post_echo(posted);
            if (st == 0)
                posted++;
            else if (post_failed++ == 0)
                first_status = st;
        }
        sti();
        /* Past STI's interrupt shadow, then an exit: a pending SINT is injected when the exit returns. */
        asm volatile("nop");
        (void)inb(0x80);
        cli();
        u64 t = hv_ref_time();
        if (t < prev)
            backwards++;
        /* A gap of over 100 ms (the VM was stopped: a migration's downtime, or a save restored later): run on
         * for at least 0.5 s, so that the checks below see the timer running after it. */
        else if (t - prev > 1000000 && end < t + 5000000)
            end = t + 5000000;
        prev = t;
    }
    stimer_config(0, 0);
    /* The last echo, if one is in flight. */
    for (u64 until = hv_ref_time() + 1000000; echoed != posted && hv_ref_time() < until;) {
        sti();
        (void)inb(0x80);
        cli();
    }
    if (echo)
        report(posted > 0 && post_failed == 0 && echo_bad == 0 && echoed == posted,
               "SynIC messages: %u posted, %u echoed in order, %u lost, %u posts failed (first status %lx), "
               "%u out of order",
               posted, echoed, posted - echoed, post_failed, first_status, echo_bad);
    else
        report(false, "SynIC messages: the hypercall page could not be enabled");
    u32 n = nticks;
    report(n >= 2, "periodic 1 ms: %u messages", n);
    if (n < 2)
        return 0;
    u64 start = expirations[0] - PERIOD;
    u64 prev_k = 0, skipped = 0, bad_phase = 0, bad_k = 0, bad_delivery = 0, bad_timer = 0, max_late = 0;
    for (u32 i = 0; i < n; i++) {
        if (timers[i] != 0)
            bad_timer++;
        if (expirations[i] < start || (expirations[i] - start) % PERIOD) {
            bad_phase++;
            continue;
        }
        u64 k = (expirations[i] - start) / PERIOD;
        if (i > 0) {
            if (k <= prev_k)
                bad_k++;
            else
                skipped += k - prev_k - 1;
        }
        prev_k = k;
        if (deliveries[i] < expirations[i])
            bad_delivery++;
        else if (deliveries[i] - expirations[i] > max_late)
            max_late = deliveries[i] - expirations[i];
    }
    report(start >= before && start <= before + 20000, "periodic 1 ms: first expiration = start + period");
    report(!bad_phase && !bad_timer, "periodic 1 ms: every expiration = start + k * period (%u messages)", n);
    report(!bad_k, "periodic 1 ms: k strictly increasing");
    report(!bad_delivery, "periodic 1 ms: delivery time >= expiration time (max lateness %lu x 100 ns)", max_late);
    report(backwards == 0, "reference time never stepped back (%lu backward steps)", backwards);
    u64 elapsed = (prev - start) / PERIOD;
    report(prev_k + 50 >= elapsed, "periodic 1 ms: the last message is for period %lu of %lu elapsed", prev_k,
           elapsed);
    report_info("periodic 1 ms over %lu.%lu s: %u messages, %lu periods skipped", tenths / 10, tenths % 10, n,
                skipped);
    return 0;
}

/*
 * Synthetic timers: one-shot, periodic and auto-enable in message mode and in direct mode; a one-shot that finds
 * its slot busy sets msg_pending and is redelivered after EOM; a 1 ms periodic timer over about 1 s of reference
 * time, where every message's expiration time must equal start + k * period with k strictly increasing and the
 * delivery time >= the expiration time. Reports how many periods were skipped.
 * Arguments: `seconds=N` length of the periodic run in tenths of a second (default 10).
 */
#include "rt.h"
#include "synic.h"

#define VEC_TIMER 0x90
/* Message SINT. Not 0: KVM disables a running timer whose CONFIG is rewritten with SINTx = 0 (Windows' way of
 * stopping one), which would make SINT 0 a special case here. */
#define SINT 2
#define VEC_DIRECT 0xA0
#define PERIOD 10000ul /* 1 ms in 100 ns units */
#define MAX_TICKS 4096

static u64 tsc_hz;
static struct hv_message *simp;

struct tick {
    u64 expiration, delivery, received;
    u32 timer, size;
};
static struct tick ticks[MAX_TICKS];
static volatile u32 nticks;
static volatile u32 direct_irq;
static volatile u64 direct_time[64];

static u64 ms(u64 n) { return tsc_hz / 1000 * n; }

static void quiet(u64 n_ms) { idle_for(ms(n_ms)); }

/* Message-mode handler: record the payload, free the slot, EOM if something waits, EOI. */
static void timer_handler(struct regs *r)
{
    (void)r;
    struct hv_message *m = &simp[SINT];
    u32 n = nticks;
    if (m->type == HVMSG_TIMER_EXPIRED && n < MAX_TICKS) {
        const struct hv_timer_payload *p = (const struct hv_timer_payload *)m->payload;
        ticks[n].timer = p->timer;
        ticks[n].expiration = p->expiration;
        ticks[n].delivery = p->delivery;
        ticks[n].size = m->size;
        ticks[n].received = hv_ref_time();
        nticks = n + 1;
    }
    bool pending = m->flags & HV_MSG_FLAG_PENDING;
    m->type = HVMSG_NONE;
    if (pending)
        wrmsr(HV_MSR_EOM, 0);
    apic_eoi();
}

static void direct_handler(struct regs *r)
{
    (void)r;
    u32 n = direct_irq;
    if (n < 64)
        direct_time[n] = hv_ref_time();
    direct_irq = n + 1;
    apic_eoi();
}

static void test_oneshot(void)
{
    nticks = 0;
    stimer_config(0, HV_STIMER_SINT(SINT));
    u64 deadline = hv_ref_time() + 50000; /* 5 ms */
    stimer_count(0, deadline);
    stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_SINT(SINT));
    bool got = wait_count(&nticks, 1, ms(3000));
    quiet(15);
    report(got && nticks == 1 && ticks[0].timer == 0 && ticks[0].size == 24 && ticks[0].expiration == deadline &&
               ticks[0].delivery >= deadline && ticks[0].received >= ticks[0].delivery,
           "message one-shot: one HVMSG_TIMER_EXPIRED, 24-byte payload, expiration = COUNT, delivery %lu after",
           got ? ticks[0].delivery - deadline : 0);
    report((rdmsr(HV_MSR_STIMER0_CONFIG) & HV_STIMER_ENABLE) == 0, "a one-shot clears enable after expiry");

    /* A deadline in the past fires at once. */
    nticks = 0;
    stimer_count(0, 1);
    stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_SINT(SINT));
    got = wait_count(&nticks, 1, ms(3000));
    report(got && ticks[0].expiration == 1, "a one-shot deadline in the past expires immediately");
}

static void test_auto_enable(void)
{
    nticks = 0;
    stimer_config(1, HV_STIMER_AUTO_ENABLE | HV_STIMER_SINT(SINT));
    bool idle = (rdmsr(HV_MSR_STIMER0_CONFIG + 2) & HV_STIMER_ENABLE) == 0;
    u64 deadline = hv_ref_time() + 200000;
    stimer_count(1, deadline);
    /* Enabled now, or (on a host slow enough that 20 ms passed) already expired: its message is in the slot,
     * visible even with interrupts off. */
    bool enabled = (rdmsr(HV_MSR_STIMER0_CONFIG + 2) & HV_STIMER_ENABLE) || simp[SINT].type == HVMSG_TIMER_EXPIRED;
    bool got = wait_count(&nticks, 1, ms(3000));
    report(idle && enabled && got && ticks[0].timer == 1 && ticks[0].expiration == deadline,
           "auto-enable: writing COUNT enables the timer, message from timer 1 (idle %d enabled %d got %d timer %u "
           "exp %lu deadline %lu, %u messages)",
           idle, enabled, got, ticks[0].timer, ticks[0].expiration, deadline, nticks);
    stimer_count(1, 0);
    report((rdmsr(HV_MSR_STIMER0_CONFIG + 2) & HV_STIMER_ENABLE) == 0, "COUNT = 0 clears enable");
    stimer_config(1, 0);
}

static void test_busy_slot(void)
{
    /* Occupy slot 0 with a foreign message: the one-shot's message must wait for EOM. */
    nticks = 0;
    simp[SINT].type = 0x42;
    simp[SINT].flags = 0;
    u64 deadline = hv_ref_time() + 20000;
    stimer_count(0, deadline);
    stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_SINT(SINT));
    quiet(20);
    bool pending = (simp[SINT].flags & HV_MSG_FLAG_PENDING) && simp[SINT].type == 0x42 && nticks == 0;
    simp[SINT].type = HVMSG_NONE;
    wrmsr(HV_MSR_EOM, 0);
    bool got = wait_count(&nticks, 1, ms(3000));
    report(pending && got && ticks[0].expiration == deadline && ticks[0].delivery > deadline + 10000,
           "busy slot: msg_pending set, timer message redelivered after EOM (expiration kept, delivery later)");
    report((rdmsr(HV_MSR_STIMER0_CONFIG) & HV_STIMER_ENABLE) == 0, "the redelivered one-shot is done");
}

/* A periodic timer that finds its slot busy drops the tick without msg_pending (KVM posts periodic ticks with
 * no retry) and keeps running on its grid: ticks resume as soon as the slot is free, without an EOM. */
static void test_periodic_busy(void)
{
    nticks = 0;
    simp[SINT].type = 0x42;
    simp[SINT].flags = 0;
    stimer_count(2, 20000); /* 2 ms */
    stimer_config(2, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_SINT(SINT));
    quiet(15);
    bool dropped = nticks == 0 && simp[SINT].type == 0x42 && !(simp[SINT].flags & HV_MSG_FLAG_PENDING);
    simp[SINT].type = HVMSG_NONE;
    bool resumed = wait_count(&nticks, 2, ms(3000));
    stimer_config(2, 0);
    quiet(3);
    report(dropped && resumed && ticks[1].expiration > ticks[0].expiration &&
               (ticks[1].expiration - ticks[0].expiration) % 20000 == 0,
           "periodic with a busy slot: ticks dropped without msg_pending, resume on the grid once the slot is free");
}

static void test_periodic(u64 tenths)
{
    nticks = 0;
    stimer_config(2, 0);
    stimer_count(2, PERIOD);
    u64 before = hv_ref_time();
    stimer_config(2, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_SINT(SINT));
    u64 end = before + tenths * 1000000ul;
    while (hv_ref_time() < end && nticks < MAX_TICKS) {
        sti();
        hlt(); /* every tick wakes us */
        cli();
    }
    stimer_config(2, 0);
    u64 stopped = hv_ref_time();
    quiet(5);
    u32 n = nticks;
    if (n < 2) {
        report(false, "periodic 1 ms: only %u messages", n);
        return;
    }
    u64 start = ticks[0].expiration - PERIOD;
    bool first_ok = start >= before && start <= before + 20000;
    u64 prev_k = 0, skipped = 0, max_late = 0, bad_phase = 0, bad_k = 0, bad_delivery = 0, bad_timer = 0;
    for (u32 i = 0; i < n; i++) {
        const struct tick *t = &ticks[i];
        if (t->timer != 2)
            bad_timer++;
        if (t->expiration < start || (t->expiration - start) % PERIOD) {
            bad_phase++;
            continue;
        }
        u64 k = (t->expiration - start) / PERIOD;
        if (i > 0) {
            if (k <= prev_k)
                bad_k++;
            else
                skipped += k - prev_k - 1;
        }
        prev_k = k;
        if (t->delivery < t->expiration)
            bad_delivery++;
        else if (t->delivery - t->expiration > max_late)
            max_late = t->delivery - t->expiration;
    }
    report(first_ok, "periodic 1 ms: first expiration = start + period (start %lu after the CONFIG write)",
           start - before);
    report(!bad_phase && !bad_timer, "periodic 1 ms: every expiration = start + k * period (%u messages)", n);
    report(!bad_k, "periodic 1 ms: k strictly increasing");
    report(!bad_delivery, "periodic 1 ms: delivery time >= expiration time (max lateness %lu x 100 ns)", max_late);
    report_info("periodic 1 ms over %lu.%lu s: %u messages, last k %lu, %lu periods skipped", tenths / 10,
                tenths % 10, n, prev_k, skipped);
    u64 elapsed = (stopped - start) / PERIOD;
    /* The last message may only lag the end by what deliveries lagged anyway (a loaded host delays them). */
    u64 slack = max_late / PERIOD + 2;
    report(prev_k <= elapsed && elapsed - prev_k <= slack,
           "periodic 1 ms: the last message is for period %lu of %lu elapsed (slack %lu)", prev_k, elapsed, slack);
}

static void test_direct(void)
{
    if (!(hv_features_edx() & HV_EDX_STIMER_DIRECT)) {
        report_skip("direct mode not advertised (hv-stimer-direct)");
        return;
    }
    set_irq_handler(VEC_DIRECT, direct_handler);
    nticks = 0;
    direct_irq = 0;
    u64 deadline = hv_ref_time() + 30000;
    stimer_count(3, deadline);
    stimer_config(3, HV_STIMER_ENABLE | HV_STIMER_DIRECT | HV_STIMER_VECTOR(VEC_DIRECT));
    bool got = wait_count(&direct_irq, 1, ms(3000));
    quiet(10);
    report(got && direct_irq == 1 && direct_time[0] >= deadline && nticks == 0 && simp[SINT].type == HVMSG_NONE,
           "direct one-shot: vector %x once, not before the deadline, no message", VEC_DIRECT);
    report((rdmsr(HV_MSR_STIMER0_CONFIG + 6) & HV_STIMER_ENABLE) == 0, "direct one-shot clears enable");

    direct_irq = 0;
    stimer_count(3, 20000); /* 2 ms */
    u64 t0 = hv_ref_time();
    stimer_config(3, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_DIRECT | HV_STIMER_VECTOR(VEC_DIRECT));
    got = wait_count(&direct_irq, 10, ms(3000));
    stimer_config(3, 0);
    u32 n = direct_irq;
    bool spaced = true;
    for (u32 i = 1; i < n && i < 10; i++)
        spaced &= direct_time[i] >= t0 + 20000 * (i + 1);
    report(got && spaced, "direct periodic 2 ms: 10 interrupts, none before start + k * period");

    /* Auto-enable in direct mode. */
    direct_irq = 0;
    stimer_config(3, HV_STIMER_AUTO_ENABLE | HV_STIMER_DIRECT | HV_STIMER_VECTOR(VEC_DIRECT));
    stimer_count(3, hv_ref_time() + 20000);
    got = wait_count(&direct_irq, 1, ms(3000));
    report(got, "direct auto-enable: COUNT write starts it");
    stimer_config(3, 0);
}

int main(void)
{
    tsc_hz = tsc_hz_from_cpuid();
    if (!tsc_hz)
        tsc_hz = 2000000000ul;
    u32 eax = hv_features_eax();
    if (!(eax & HV_EAX_SYNIC) || !(eax & HV_EAX_SYNTIMERS) || !(eax & HV_EAX_TIME_REF_COUNT)) {
        report_skip("needs hv-synic, hv-stimer and hv-time");
        return 0;
    }
    apic_init(apic_mode_from_cmdline());
    simp = alloc_pages(1);
    set_irq_handler(VEC_TIMER, timer_handler);
    synic_enable(simp, 0);
    synic_set_sint(SINT, VEC_TIMER, false);
    test_oneshot();
    test_auto_enable();
    test_busy_slot();
    test_direct();
    test_periodic_busy();
    test_periodic(arg_u64("seconds", 10));
    return 0;
}

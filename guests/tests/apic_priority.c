/*
 * Local APIC priority rules on one vCPU: a higher-class vector preempts a lower one in its handler, a lower
 * one waits for the EOI of a higher one, pending vectors are delivered highest first, EOI clears the highest
 * ISR bit, PPR follows ISR and TPR, and TPR masks classes at or below it. Arguments: mode=xapic|x2apic.
 */
#include "rt.h"

static volatile u32 events[32];
static volatile u32 nevents;
static volatile bool in_high_isr_low, in_high_isr_high, after_eoi_low, after_eoi_high;
static volatile u32 ppr_in_high, tpr_ppr;
static volatile bool low_seen_pending_in_irr, low_ran_early;

static void logev(u32 e)
{
    if (nevents < ARRAY_SIZE(events))
        events[nevents] = e;
    nevents++;
}

static void self_ipi(u8 vec)
{
    if (apic_mode() == APIC_X2APIC && (vec & 1))
        apic_write(APIC_SELF_IPI, vec); /* the x2APIC SELF IPI register, for odd vectors */
    else
        apic_icr_write(0, APIC_DEST_SELF | APIC_INT_ASSERT | vec);
}

static bool expect(const u32 *want, u32 n)
{
    bool ok = nevents == n;
    for (u32 i = 0; i < n && i < nevents; i++)
        ok &= events[i] == want[i];
    if (!ok) {
        printf("  events:");
        for (u32 i = 0; i < nevents && i < ARRAY_SIZE(events); i++)
            printf(" %x", events[i]);
        printf("\n");
    }
    return ok;
}

static void reset(void)
{
    nevents = 0;
}

/* Waits with interrupts enabled until `count` events are logged (or a long timeout). */
static void wait_events(u32 count)
{
    u64 t0 = rdtsc();
    sti();
    while (nevents < count && rdtsc() - t0 < 3000000000ULL)
        pause();
    tsc_delay(5000000);
    cli();
}

/* Test 1: 0x50 handler raises 0x90 and enables interrupts: 0x90 preempts it. */
static void h50(struct regs *r)
{
    (void)r;
    logev(0x150);
    self_ipi(0x90);
    sti();
    u64 t0 = rdtsc();
    while (nevents < 2 && rdtsc() - t0 < 3000000000ULL)
        pause();
    cli();
    logev(0x250);
    apic_eoi();
}

static void h90(struct regs *r)
{
    (void)r;
    logev(0x90);
    in_high_isr_low = apic_vector_set(APIC_ISR, 0x50);
    in_high_isr_high = apic_vector_set(APIC_ISR, 0x90);
    ppr_in_high = apic_read(APIC_PPR);
    apic_eoi();
    after_eoi_low = apic_vector_set(APIC_ISR, 0x50);
    after_eoi_high = apic_vector_set(APIC_ISR, 0x90);
}

/* Test 2: 0xA0 handler raises 0x60 and enables interrupts: 0x60 waits for 0xA0's EOI. */
static void hA0(struct regs *r)
{
    (void)r;
    logev(0x1A0);
    self_ipi(0x60);
    sti();
    tsc_delay(10000000);
    cli();
    low_ran_early = nevents != 1;
    low_seen_pending_in_irr = apic_vector_set(APIC_IRR, 0x60);
    logev(0x2A0);
    apic_eoi();
    sti(); /* 0x60 is delivered here, nested, now that PPR dropped */
    tsc_delay(5000000);
    cli();
}

static void plain(struct regs *r)
{
    logev((u32)r->vector);
    apic_eoi();
}

int main(void)
{
    apic_init(apic_mode_from_cmdline());
    const char *mode = apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC";
    set_irq_handler(0x50, h50);
    set_irq_handler(0x90, h90);
    set_irq_handler(0xA0, hA0);
    const u8 plain_vecs[] = { 0x60, 0x52, 0x5C, 0xB1, 0x55, 0x65, 0x75, 0x41, 0x4E };
    for (u32 i = 0; i < sizeof(plain_vecs); i++)
        set_irq_handler(plain_vecs[i], plain);

    /* 1 */
    reset();
    self_ipi(0x50);
    wait_events(3);
    static const u32 want1[] = { 0x150, 0x90, 0x250 };
    report(expect(want1, 3), "%s: vector 0x90 preempts the handler of 0x50", mode);
    report(in_high_isr_low && in_high_isr_high, "%s: both 0x50 and 0x90 in ISR while nested", mode);
    report((ppr_in_high & 0xF0) == 0x90, "%s: PPR is 0x90 in the nested handler (read %x)", mode, ppr_in_high);
    report(after_eoi_low && !after_eoi_high, "%s: EOI clears only the highest ISR bit", mode);
    report(!apic_vector_set(APIC_ISR, 0x50) && (apic_read(APIC_PPR) & 0xF0) == 0, "%s: ISR empty, PPR 0 after",
           mode);

    /* 2 */
    reset();
    self_ipi(0xA0);
    wait_events(3);
    static const u32 want2[] = { 0x1A0, 0x2A0, 0x60 };
    report(expect(want2, 3) && !low_ran_early, "%s: vector 0x60 waits for the EOI of 0xA0", mode);
    report(low_seen_pending_in_irr, "%s: 0x60 pending in IRR while 0xA0 is in service", mode);

    /* 3: pending vectors are delivered highest first */
    reset();
    self_ipi(0x52);
    self_ipi(0x41);
    self_ipi(0x5C);
    self_ipi(0xB1);
    self_ipi(0x4E);
    report(apic_vector_set(APIC_IRR, 0x52) && apic_vector_set(APIC_IRR, 0xB1), "%s: IRR holds the pending vectors",
           mode);
    wait_events(5);
    static const u32 want3[] = { 0xB1, 0x5C, 0x52, 0x4E, 0x41 };
    report(expect(want3, 5), "%s: pending vectors delivered in priority order", mode);

    /* 4: TPR masks classes at or below it */
    reset();
    apic_write(APIC_TPR, 0x60);
    tpr_ppr = apic_read(APIC_PPR);
    report((apic_read(APIC_TPR) & 0xFF) == 0x60 && (tpr_ppr & 0xF0) == 0x60, "%s: TPR 0x60 reads back, PPR %x",
           mode, tpr_ppr);
    self_ipi(0x55);
    self_ipi(0x65);
    self_ipi(0x75);
    wait_events(1);
    static const u32 want4[] = { 0x75 };
    report(expect(want4, 1), "%s: with TPR 0x60 only vector 0x75 is delivered", mode);
    report(apic_vector_set(APIC_IRR, 0x55) && apic_vector_set(APIC_IRR, 0x65), "%s: 0x55 and 0x65 stay in IRR",
           mode);
    apic_write(APIC_TPR, 0);
    wait_events(3);
    static const u32 want5[] = { 0x75, 0x65, 0x55 };
    report(expect(want5, 3), "%s: lowering TPR releases 0x65 then 0x55", mode);
    return 0;
}

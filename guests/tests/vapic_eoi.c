/*
 * hv-vapic: the APIC-access MSRs and exit-less EOI through the VP assist page (bit 0 of its first u32, KVM's
 * PV-EOI semantics). Interrupts come from a hyperv-testdev SINT route (one port write each); exits are counted
 * with enlighten's hyperv-testdev exit latch. Checks: the bit is offered only when the interrupt is the only one
 * in service and nothing else is requested; a handler that clears the bit skips the EOI and the EOI still
 * happens; exits per interrupt with exit-less EOI are about half those with a plain EOI; priority masking stays
 * exact while a handler that was offered the bit runs (never auto-EOI).
 * Arguments: `n=N` interrupts per measurement (default 300).
 */
#include "rt.h"
#include "synic.h"

#define VEC_A 0x80 /* SINT 7 */
#define VEC_B 0x70 /* SINT 6 */

static volatile u32 *assist;
static volatile u32 a_count, b_count, offered, skipped_eoi, b_before_a_eoi, mode_pv;
static volatile bool fire_b_inside;

static bool take_no_eoi(void)
{
    u32 old;
    /* test-and-clear of bit 0, as a guest's PV-EOI fast path does */
    asm volatile("lock btrl $0, %1; setc %b0" : "=q"(old), "+m"(*assist) : : "memory", "cc");
    return old & 1;
}

static void a_handler(struct regs *r)
{
    (void)r;
    a_count++;
    if (fire_b_inside) {
        /* A lower class than A: must stay pending until A's EOI, even with IF=1 and the bit offered. */
        hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 6, 0);
        sti();
        for (unsigned i = 0; i < 2000; i++)
            pause();
        cli();
        if (b_count)
            b_before_a_eoi++;
    }
    if (mode_pv == 1 && take_no_eoi()) {
        offered++;
        skipped_eoi++;
        return;
    }
    if (mode_pv == 2)
        wrmsr(HV_MSR_EOI, 0); /* hv-vapic EOI MSR */
    else
        apic_eoi();
}

static void b_handler(struct regs *r)
{
    (void)r;
    b_count++;
    if (mode_pv == 1 && take_no_eoi()) {
        skipped_eoi++;
        return;
    }
    apic_eoi();
}

/* n interrupts of A, each raised with one port write; returns the exits they took. */
static u64 measure(u32 n)
{
    a_count = 0;
    u64 e0 = hvt_exit_count(0);
    sti();
    for (u32 i = 0; i < n; i++)
        hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 7, 0);
    cli();
    u64 e1 = hvt_exit_count(0);
    return e1 - e0 - 3; /* minus the latch of the first measurement point */
}

int main(void)
{
    if (!(hv_features_eax() & HV_EAX_APIC_ACCESS) || !(hv_features_eax() & HV_EAX_SYNIC)) {
        report_skip("needs hv-vapic and hv-synic");
        return 0;
    }
    apic_init(apic_mode_from_cmdline());
    u32 n = (u32)arg_u64("n", 300);
    set_irq_handler(VEC_A, a_handler);
    set_irq_handler(VEC_B, b_handler);
    synic_enable(alloc_pages(1), 0);
    synic_set_sint(7, VEC_A, false);
    synic_set_sint(6, VEC_B, false);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 7, 0);
    hvt_cmd(HVT_SINT_ROUTE_CREATE, 0, 6, 0);

    /* APIC-access MSRs. */
    wrmsr(HV_MSR_TPR, 0x20);
    report(rdmsr(HV_MSR_TPR) == 0x20 && apic_read(APIC_TPR) == 0x20, "HV TPR MSR is the APIC TPR");
    wrmsr(HV_MSR_TPR, 0);
    report(wrmsr_safe(HV_MSR_TPR, 1ul << 32) == GP_FAULT, "HV TPR MSR: bits 63:32 #GP");
    u64 e0 = hvt_exit_count(0);
    u64 e1 = hvt_exit_count(0);
    report(e1 - e0 == 3 || e0 + e1 == 0, "exit latch: one latch + two reads = 3 exits (%lu)", e1 - e0);

    mode_pv = 0;
    u64 plain = measure(n);
    report(a_count == n, "plain EOI: %u interrupts delivered", a_count);
    mode_pv = 2;
    u64 msr_eoi = measure(n / 4);
    report(a_count == n / 4 && msr_eoi == 2 * (n / 4) && !apic_vector_set(APIC_ISR, VEC_A),
           "HV EOI MSR: %u interrupts, each EOI'd through 0x40000070 (%lu exits)", a_count, msr_eoi);

    void *page = alloc_pages(1);
    assist = page;
    *assist = 0xFFFFFFFEu;
    wrmsr(HV_MSR_VP_ASSIST_PAGE, (u64)page | 1);
    report(*assist == 0, "enabling the VP assist page zeroes its first u32");
    mode_pv = 1;
    offered = skipped_eoi = 0;
    u64 pv = measure(n);
    report(a_count == n && offered == n, "exit-less EOI: %u interrupts, bit offered for %u", a_count, offered);
    report(!apic_vector_set(APIC_ISR, VEC_A) && apic_read(APIC_PPR) == 0,
           "the deferred EOIs were performed (ISR empty, PPR 0)");
    report_info("exits for %u interrupts: plain EOI %lu (%lu.%02lu per interrupt), exit-less EOI %lu (%lu.%02lu)", n,
                plain, plain / n, plain * 100 / n % 100, pv, pv / n, pv * 100 / n % 100);
    report(pv * 10 <= plain * 6, "exit-less EOI takes at most 60%% of the exits of plain EOI (%lu vs %lu)", pv, plain);

    /* Two interrupts pending at once: the first handler must not be offered the bit. */
    offered = 0;
    skipped_eoi = 0;
    a_count = b_count = 0;
    cli();
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 6, 0);
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 7, 0);
    sti();
    for (unsigned i = 0; i < 1000 && b_count == 0; i++)
        pause();
    cli();
    report(a_count == 1 && b_count == 1 && offered == 0 && skipped_eoi == 1,
           "with another vector requested, the first handler is not offered the bit; the last one is");

    /* Priority masking while the bit is offered. */
    a_count = b_count = b_before_a_eoi = 0;
    fire_b_inside = true;
    sti();
    hvt_cmd(HVT_SINT_ROUTE_SET_SINT, 0, 7, 0);
    for (unsigned i = 0; i < 1000 && b_count == 0; i++)
        pause();
    cli();
    fire_b_inside = false;
    report(a_count == 1 && b_count == 1 && b_before_a_eoi == 0,
           "a lower-class vector waits for the deferred EOI (not auto-EOI): A %u, B %u, B early %u", a_count,
           b_count, b_before_a_eoi);
    report(!apic_vector_set(APIC_ISR, VEC_A) && !apic_vector_set(APIC_ISR, VEC_B), "ISR empty at the end");

    /* Disabling the page stops the offers. */
    wrmsr(HV_MSR_VP_ASSIST_PAGE, 0);
    offered = 0;
    measure(20);
    report(offered == 0 && a_count == 20, "assist page disabled: no exit-less EOI offered");
    return 0;
}

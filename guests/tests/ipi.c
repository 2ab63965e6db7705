/*
 * Inter-processor interrupts through the local APIC: fixed IPIs between every pair of vCPUs (each received
 * exactly once), the all-excluding-self, all-including-self and self shorthands, logical destinations and
 * lowest-priority delivery and NMI. Arguments: mode=xapic|x2apic. Run with -smp 2 or more.
 */
#include "rt.h"

#define MAXN 32
#define VEC_PAIR 0x40 /* sender i uses VEC_PAIR + i */
#define VEC_ALLBUT 0xA0
#define VEC_ALLINC 0xA1
#define VEC_SELF 0xA2
#define VEC_LOGICAL 0xA3
#define VEC_LOWEST 0xA4

static volatile u32 got[MAXN][MAXN]; /* [receiver][sender] */
static volatile u32 got_allbut[MAXN], got_allinc[MAXN], got_self[MAXN], got_logical[MAXN], got_nmi[MAXN], got_lowest[MAXN];
static u32 n;

static void pair_handler(struct regs *r)
{
    atomic_inc(&got[smp_id()][r->vector - VEC_PAIR]);
    apic_eoi();
}

static void counter_handler(struct regs *r)
{
    u32 me = smp_id();
    switch (r->vector) {
    case VEC_ALLBUT: atomic_inc(&got_allbut[me]); break;
    case VEC_ALLINC: atomic_inc(&got_allinc[me]); break;
    case VEC_SELF: atomic_inc(&got_self[me]); break;
    case VEC_LOGICAL: atomic_inc(&got_logical[me]); break;
    case VEC_LOWEST: atomic_inc(&got_lowest[me]); break;
    }
    apic_eoi();
}

static void nmi_handler(struct regs *r)
{
    (void)r;
    atomic_inc(&got_nmi[smp_id()]);
}

static void send_to_all_others(void *arg)
{
    u32 me = smp_id();
    (void)arg;
    for (u32 j = 0; j < n; j++)
        if (j != me)
            apic_send_ipi(j, (u8)(VEC_PAIR + me));
}

static void send_self(void *arg)
{
    (void)arg;
    apic_icr_write(0, APIC_DEST_SELF | APIC_INT_ASSERT | VEC_SELF);
}

static void setup_logical(void *arg)
{
    (void)arg;
    if (apic_mode() == APIC_XAPIC) {
        apic_write(APIC_DFR, 0xFFFFFFFF); /* flat model */
        apic_write(APIC_LDR, (1u << smp_id()) << 24);
    }
}

static u32 logical_id(u32 cpu)
{
    if (apic_mode() == APIC_X2APIC)
        return ((cpu >> 4) << 16) | (1u << (cpu & 0xF));
    return 1u << cpu;
}

static u32 sum(volatile u32 *a)
{
    u32 s = 0;
    for (u32 i = 0; i < n; i++)
        s += a[i];
    return s;
}

static u32 pair_total(void)
{
    u32 s = 0;
    for (u32 i = 0; i < n; i++)
        s += sum(got[i]);
    return s;
}

/* Waits with interrupts enabled until *total() reaches want (or ~3e9 TSC ticks), then a short settle time
 * so that duplicates would show up. */
static void wait_for(u32 (*total)(void), u32 want)
{
    u64 t0 = rdtsc();
    sti();
    while (total() < want && rdtsc() - t0 < 3000000000ULL)
        pause();
    tsc_delay(20000000);
    cli();
}

static u32 t_allbut(void) { return sum(got_allbut); }
static u32 t_allinc(void) { return sum(got_allinc); }
static u32 t_self(void) { return sum(got_self); }
static u32 t_logical(void) { return sum(got_logical); }
static u32 t_nmi(void) { return sum(got_nmi); }
static u32 t_lowest(void) { return sum(got_lowest); }

int main(void)
{
    smp_init();
    n = nr_cpus();
    if (n < 2 || n > MAXN) {
        report_skip("needs 2..%u vCPUs, have %u", MAXN, n);
        return 0;
    }
    const char *mode = apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC";
    for (u32 i = 0; i < n; i++)
        set_irq_handler((u8)(VEC_PAIR + i), pair_handler);
    for (u32 v = VEC_ALLBUT; v <= VEC_LOWEST; v++)
        set_irq_handler((u8)v, counter_handler);
    set_irq_handler(2, nmi_handler);

    /* 1. fixed IPIs, every vCPU to every other one, all senders at once */
    for (u32 i = 1; i < n; i++)
        on_cpu_async(i, send_to_all_others, NULL);
    send_to_all_others(NULL);
    wait_for(pair_total, n * (n - 1));
    bool exact = true;
    for (u32 r = 0; r < n; r++)
        for (u32 s = 0; s < n; s++)
            if (got[r][s] != (r == s ? 0 : 1)) {
                printf("  vCPU %u received %u IPIs from vCPU %u\n", r, got[r][s], s);
                exact = false;
            }
    report(exact, "%s: fixed IPIs between all %u vCPUs, each received exactly once (%u total)", mode, n,
           pair_total());

    /* 2. all-excluding-self */
    apic_icr_write(0, APIC_DEST_ALLBUT | APIC_INT_ASSERT | VEC_ALLBUT);
    wait_for(t_allbut, n - 1);
    bool ok = got_allbut[0] == 0;
    for (u32 i = 1; i < n; i++)
        ok &= got_allbut[i] == 1;
    report(ok, "%s: all-excluding-self shorthand reaches every other vCPU once", mode);

    /* 3. all-including-self */
    apic_icr_write(0, APIC_DEST_ALLINC | APIC_INT_ASSERT | VEC_ALLINC);
    wait_for(t_allinc, n);
    ok = true;
    for (u32 i = 0; i < n; i++)
        ok &= got_allinc[i] == 1;
    report(ok, "%s: all-including-self shorthand reaches every vCPU once", mode);

    /* 4. self shorthand on every vCPU */
    for (u32 i = 0; i < n; i++)
        on_cpu(i, send_self, NULL);
    wait_for(t_self, n);
    ok = true;
    for (u32 i = 0; i < n; i++)
        ok &= got_self[i] == 1;
    report(ok, "%s: self shorthand interrupts only the sender, once", mode);

    /* 5. logical destination: the odd-numbered vCPUs (cluster 0 / flat model: up to 8 or 16 vCPUs) */
    if (n <= 8) {
        for (u32 i = 0; i < n; i++)
            on_cpu(i, setup_logical, NULL);
        u32 dest = 0, want = 0;
        for (u32 i = 1; i < n; i += 2) {
            dest |= logical_id(i);
            want++;
        }
        apic_icr_write(dest,
                       APIC_INT_ASSERT | (1u << 11) | VEC_LOGICAL);
        wait_for(t_logical, want);
        ok = true;
        for (u32 i = 0; i < n; i++)
            ok &= got_logical[i] == (i & 1);
        report(ok, "%s: logical destination %x reaches exactly the odd vCPUs", mode, dest);

        /* 5b. lowest priority to the same set: exactly one of them takes it */
        apic_icr_write(dest, APIC_INT_ASSERT | (1u << 11) | 0x100 | VEC_LOWEST);
        wait_for(t_lowest, 1);
        ok = t_lowest() == 1;
        for (u32 i = 0; i < n; i += 2)
            ok &= got_lowest[i] == 0;
        report(ok, "%s: lowest-priority IPI to logical %x taken by exactly one of them", mode, dest);
    } else {
        report_skip("logical destination test needs at most 8 vCPUs");
    }

    /* 6. NMI to the last vCPU */
    apic_icr_write(n - 1, APIC_DM_NMI | APIC_INT_ASSERT);
    wait_for(t_nmi, 1);
    report(got_nmi[n - 1] == 1 && t_nmi() == 1, "%s: NMI IPI delivered once to vCPU %u only", mode, n - 1);
    return 0;
}

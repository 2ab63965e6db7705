/*
 * QMP test guest: stays alive so that a QMP client can drive the VM, and shows on serial that it runs.
 *
 * Prints "qmp_idle: boot" (again after every reset), brings up the other CPUs, then halts with interrupts on,
 * woken by a periodic APIC timer (10 ms), printing "qmp_idle: tick N" every 10 ticks. Every NMI (QMP
 * inject-nmi) is counted per CPU and reported as "qmp_idle: nmi cpu=I count=N". Never exits by itself.
 *
 * Arguments:
 *   crash=N        after N ticks, write the Hyper-V crash MSRs (needs hv-crash): CRASH_P0..P4 = p0..p4, then
 *                  CRASH_CTL with the notify bit, and print "qmp_idle: crashed" (printed again if the guest
 *                  keeps running, e.g. with -action panic=none);
 *   p0..p4=V       the crash parameters (default 0x1000 + i);
 *   triple=N       after N ticks, triple-fault (a guest-initiated reset; prints "qmp_idle: triple fault");
 *   poweroff=N     after N ticks, power off through the Bochs port 0x8900 ("qmp_idle: power off");
 *   apic_hz=N      APIC timer clock (default 1 GHz, enlighten's and KVM's);
 *   mode=xapic|x2apic.
 */
#include "rt.h"

#define TIMER_VEC 0x40
#define NMI_VEC 2
#define HV_X64_MSR_CRASH_P0 0x40000100
#define HV_X64_MSR_CRASH_CTL 0x40000105
#define HV_CRASH_CTL_NOTIFY (1ull << 63)
#define MAX_TRACKED_CPUS 8

static volatile u32 ticks;
static volatile u32 nmis[MAX_TRACKED_CPUS];

static void timer_handler(struct regs *r)
{
    (void)r;
    ticks++;
    apic_eoi();
}

static void nmi_handler(struct regs *r)
{
    (void)r;
    u32 id = smp_id();
    if (id < MAX_TRACKED_CPUS)
        atomic_inc(&nmis[id]);
}

static void crash(void)
{
    char key[3] = {'p', '0', 0};
    for (u32 i = 0; i < 5; i++) {
        key[1] = (char)('0' + i);
        u64 v = arg_u64(key, 0x1000 + i);
        wrmsr(HV_X64_MSR_CRASH_P0 + i, v);
    }
    wrmsr(HV_X64_MSR_CRASH_CTL, HV_CRASH_CTL_NOTIFY);
    printf("qmp_idle: crashed\n");
}

static void triple_fault(void)
{
    struct {
        u16 limit;
        u64 base;
    } __attribute__((packed)) empty = {0, 0};
    printf("qmp_idle: triple fault\n");
    asm volatile("lidt %0" ::"m"(empty));
    asm volatile("ud2");
}

static void power_off(void)
{
    printf("qmp_idle: power off\n");
    for (const char *p = "Shutdown"; *p; p++)
        outb(0x8900, (u8)*p);
}

int main(void)
{
    printf("qmp_idle: boot\n");
    set_irq_handler(TIMER_VEC, timer_handler);
    set_irq_handler(NMI_VEC, nmi_handler);
    smp_init();
    u64 apic_hz = arg_u64("apic_hz", 1000000000);
    u64 crash_at = arg_u64("crash", 0);
    u64 triple_at = arg_u64("triple", 0);
    u64 poweroff_at = arg_u64("poweroff", 0);
    apic_write(APIC_TDCR, 0xB); /* divide by 1 */
    apic_write(APIC_LVTT, APIC_LVT_TIMER_PERIODIC | TIMER_VEC);
    apic_write(APIC_TMICT, (u32)(apic_hz / 100));
    u32 seen_ticks = 0;
    u32 seen_nmis[MAX_TRACKED_CPUS] = {0};
    bool crashed = false;
    for (;;) {
        safe_halt();
        cli();
        u32 t = READ_ONCE(ticks);
        if (t / 10 != seen_ticks / 10)
            printf("qmp_idle: tick %u\n", t);
        seen_ticks = t;
        for (u32 i = 0; i < MAX_TRACKED_CPUS; i++) {
            u32 n = READ_ONCE(nmis[i]);
            if (n != seen_nmis[i]) {
                printf("qmp_idle: nmi cpu=%u count=%u\n", i, n);
                seen_nmis[i] = n;
            }
        }
        if (crash_at && !crashed && t >= crash_at) {
            crashed = true;
            crash();
        }
        if (triple_at && t >= triple_at)
            triple_fault();
        if (poweroff_at && t >= poweroff_at)
            power_off();
    }
}

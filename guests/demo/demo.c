/*
 * The demo guest: what `enlighten` boots without -kernel. It prints what a guest sees of the machine: the CPU
 * and hypervisor identity, the vCPUs, memory and the APIC timer. Each report is one entry of `sections`;
 * to report something new (an enlightenment, say), write a `static void section_x(void)` and add it there.
 */
#include "rt.h"
#include "hv.h"

static void cpuid_string(u32 leaf, char out[13])
{
    struct cpuid r = cpuid(leaf);
    memcpy(out, &r.b, 4);
    memcpy(out + 4, leaf ? &r.c : &r.d, 4);
    memcpy(out + 8, leaf ? &r.d : &r.c, 4);
    out[12] = '\0';
}

static void section_cpu(void)
{
    char vendor[13];
    cpuid_string(0, vendor);
    struct cpuid f = cpuid(1);
    u32 family = (f.a >> 8) & 0xF, model = (f.a >> 4) & 0xF;
    if (family == 0xF)
        family += (f.a >> 20) & 0xFF;
    if (family >= 6)
        model |= ((f.a >> 16) & 0xF) << 4;
    printf("  vendor        %s, family %u model %u stepping %u\n", vendor, family, model, f.a & 0xF);
    if (cpuid(0x80000000).a >= 0x80000004) {
        char brand[49];
        for (u32 i = 0; i < 3; i++) {
            struct cpuid b = cpuid(0x80000002 + i);
            memcpy(brand + 16 * i, &b, 16);
        }
        brand[48] = '\0';
        const char *p = brand;
        while (*p == ' ')
            p++;
        printf("  brand         %s\n", p);
    }
    printf("  features      x2apic=%s tsc-deadline=%s hypervisor=%s\n", (f.c >> 21) & 1 ? "yes" : "no",
           (f.c >> 24) & 1 ? "yes" : "no", (f.c >> 31) & 1 ? "yes" : "no");
}

static void section_hypervisor(void)
{
    if (!((cpuid(1).c >> 31) & 1)) {
        printf("  no hypervisor bit in CPUID.1:ECX[31]\n");
        return;
    }
    char sig[13];
    cpuid_string(0x40000000, sig);
    u32 max = cpuid(0x40000000).a;
    printf("  0x40000000    \"%s\", max leaf %x\n", sig, max);
    struct cpuid iface = cpuid(0x40000001);
    char id[5];
    memcpy(id, &iface.a, 4);
    id[4] = '\0';
    bool hv = iface.a == 0x31237648; /* "Hv#1" */
    printf("  0x40000001    interface %x%s%s%s\n", iface.a, hv ? " (\"" : "", hv ? id : "", hv ? "\": Hyper-V)" : "");
    if (hv && max >= 0x40000003) {
        struct cpuid v = cpuid(0x40000002);
        struct cpuid feat = cpuid(0x40000003);
        printf("  version       %u.%u.%u\n", v.b >> 16, v.b & 0xFFFF, v.a);
        printf("  features      eax=%08x ebx=%08x edx=%08x\n", feat.a, feat.b, feat.d);
    }
    for (u32 base = 0x40000100; base <= 0x40000100; base += 0x100) {
        char s2[13];
        cpuid_string(base, s2);
        if (!strcmp(s2, "KVMKVMKVM"))
            printf("  %x    \"%s\" (KVM leaves moved), features %x\n", base, s2, cpuid(base + 1).a);
    }
}

static volatile u32 ap_seen[MAX_CPUS];

static void note_cpu(void *arg)
{
    (void)arg;
    ap_seen[smp_id()] = apic_id() + 1;
}

static void section_cpus(void)
{
    u32 fw = fw_cfg_nb_cpus();
    smp_init();
    for (u32 i = 0; i < nr_cpus(); i++)
        on_cpu(i, note_cpu, NULL);
    printf("  vCPUs         %u (fw_cfg NB_CPUS %u), %s mode, APIC IDs", nr_cpus(), fw,
           apic_mode() == APIC_X2APIC ? "x2APIC" : "xAPIC");
    for (u32 i = 0; i < nr_cpus() && i < 16; i++)
        printf(" %u", ap_seen[i] - 1);
    printf(nr_cpus() > 16 ? " ...\n" : "\n");
}

static void section_memory(void)
{
    printf("  RAM           %lu MiB (fw_cfg), Multiboot mem_upper %u KiB\n", fw_cfg_ram_size() >> 20,
           boot_mem_upper_kib());
}

static volatile u32 timer_ticks;
static volatile u64 last_tick_tsc;

static void tick(struct regs *r)
{
    (void)r;
    timer_ticks++;
    last_tick_tsc = rdtsc();
    apic_eoi();
}

static void section_timer(void)
{
    /* a 1 ms periodic APIC timer (1 GHz APIC clock), counted over 50 ticks against the TSC */
    set_irq_handler(0x40, tick);
    timer_ticks = 0;
    apic_write(APIC_TDCR, 0xB);
    apic_write(APIC_LVTT, APIC_LVT_TIMER_PERIODIC | 0x40);
    u64 t0 = rdtsc();
    apic_write(APIC_TMICT, 1000000);
    cli();
    while (timer_ticks < 50) {
        safe_halt();
        cli();
    }
    apic_write(APIC_LVTT, APIC_LVT_MASKED);
    apic_write(APIC_TMICT, 0);
    u64 dt = last_tick_tsc - t0;
    u64 hz = tsc_hz_from_cpuid();
    printf("  APIC timer    50 ticks of a 1 ms periodic timer in %lu TSC ticks", dt);
    if (hz)
        printf(" = %lu us at %lu kHz\n", dt / (hz / 1000000), hz / 1000);
    else
        printf(" (TSC frequency not in CPUID: %lu kHz if the APIC clock is 1 GHz)\n", dt / 50);
}

/* ---- Hyper-V enlightenments: each one found in CPUID is exercised and reported as working or not. */

static volatile u64 hv_vp_index[MAX_CPUS];

static void note_vp_index(void *arg)
{
    (void)arg;
    u64 v = ~0ul;
    if (rdmsr_safe(HV_MSR_VP_INDEX, &v))
        v = ~0ul;
    hv_vp_index[smp_id()] = v;
}

static struct hv_tsc_page *hv_tsc;

/* CPL 3: `n` reference-TSC-page reads; returns the number of reads that went backwards or found the page
 * invalid (0 expected). */
static u64 hv_user_reads(u64 n)
{
    u64 prev = 0, bad = 0;
    for (u64 i = 0; i < n; i++) {
        u64 t = 0;
        if (!hv_tsc_page_read(hv_tsc, &t) || t < prev)
            bad++;
        prev = t;
    }
    return bad;
}

static const char *works(bool ok) { return ok ? "working" : "NOT WORKING"; }

static void section_hyperv(void)
{
    if (!hv_identified()) {
        printf("  not identified (try -cpu host,hv-passthrough)\n");
        return;
    }
    u32 a = hv_features_eax(), d = hv_features_edx();
    struct cpuid hints = cpuid(0x40000004);
    if (a & HV_EAX_HYPERCALL) {
        void *page = hv_enable_hypercalls();
        u64 st = page ? hv_hypercall(0x7FFF, 0, 0) : ~0ul;
        u64 spin = page ? hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, 0, 0) : ~0ul;
        printf("  hypercall page  at %p, unknown call -> status %lu, NotifyLongSpinWait -> %lu: %s\n", page, st, spin,
               works(st == HV_STATUS_INVALID_HYPERCALL_CODE));
    }
    if (hints.a & (1u << 5))
        printf("  relaxed timing  recommended (hv-relaxed)\n");
    if (hints.b != 0xFFFFFFFF)
        printf("  spinlocks       notify after %u retries (hv-spinlocks)\n", hints.b);
    if (a & HV_EAX_VP_INDEX) {
        bool ok = true;
        printf("  VP index       ");
        for (u32 i = 0; i < nr_cpus(); i++) {
            on_cpu(i, note_vp_index, NULL);
            printf(" %lu", hv_vp_index[i]);
            ok &= hv_vp_index[i] == i;
        }
        printf(" (= APIC IDs): %s\n", works(ok));
    }
    if (a & HV_EAX_VP_RUNTIME) {
        u64 r0 = rdmsr(HV_MSR_VP_RUNTIME);
        for (volatile u32 i = 0; i < 20000; i++) {
        }
        u64 r1 = rdmsr(HV_MSR_VP_RUNTIME);
        printf("  VP runtime      %lu us of vCPU thread time so far: %s\n", r1 / 10, works(r1 > r0));
    }
    if (a & HV_EAX_FREQUENCY_MSRS)
        printf("  frequencies     TSC %lu Hz, APIC %lu Hz\n", rdmsr(HV_MSR_TSC_FREQUENCY),
               rdmsr(HV_MSR_APIC_FREQUENCY));
    if (a & HV_EAX_TIME_REF_COUNT) {
        u64 t0 = rdmsr(HV_MSR_TIME_REF_COUNT);
        for (int i = 0; i < 99; i++)
            rdmsr(HV_MSR_TIME_REF_COUNT);
        u64 t1 = rdmsr(HV_MSR_TIME_REF_COUNT);
        printf("  TIME_REF_COUNT  %lu ms since start, %lu ns per read (each read is an exit): %s\n", t1 / 10000,
               (t1 - t0), works(t1 > t0));
        if (a & HV_EAX_REFERENCE_TSC) {
            u64 per_msr_ns = t1 - t0; /* 100 reads, 100 ns units: ns per read */
            hv_tsc = alloc_pages(1);
            wrmsr(HV_MSR_REFERENCE_TSC, (u64)hv_tsc | 1);
            u64 s0 = 0, s1 = 0;
            bool valid = hv_tsc_page_read(hv_tsc, &s0);
            const u64 n = 1000000;
            u64 bad = valid ? run_user(hv_user_reads, n) : n;
            valid &= hv_tsc_page_read(hv_tsc, &s1);
            u64 ns = (s1 - s0) * 100;
            /* Had each read exited, n reads would take at least n exits. */
            bool exit_free = valid && bad == 0 && ns < n * per_msr_ns / 10;
            printf("  reference TSC   scale=%lx, offset=%ld, sequence %u; %lu CPL-3 reads in %lu us (%lu ns each)%s: "
                   "%s\n",
                   hv_tsc->scale, hv_tsc->offset, hv_tsc->sequence, n, ns / 1000, ns / n,
                   exit_free ? ", without an exit" : "", works(exit_free));
        }
    }
    if (d & HV_EDX_CRASH_MSRS)
        printf("  crash MSRs      CRASH_CTL=%lx (notify supported): %s\n", rdmsr(HV_MSR_CRASH_CTL),
               works(rdmsr(HV_MSR_CRASH_CTL) == HV_CRASH_CTL_NOTIFY));
    if (a & HV_EAX_RESET)
        printf("  reset MSR       available (writing 1 resets the VM)\n");
    if (a & HV_EAX_REENLIGHTENMENT) {
        wrmsr(HV_MSR_REENLIGHTENMENT_CONTROL, 0x10030);
        bool ok = rdmsr(HV_MSR_REENLIGHTENMENT_CONTROL) == 0x10030;
        wrmsr(HV_MSR_REENLIGHTENMENT_CONTROL, 0);
        printf("  re-enlightenment MSRs: %s\n", works(ok));
    }
}

/* ---- SynIC, synthetic timers and exit-less EOI (hv-synic, hv-stimer, hv-vapic; hyperv-testdev for the
 * message echo and the event). */
#include "synic.h"

static struct hv_message *demo_simp;
static volatile u32 demo_timer_msgs, demo_echo_msgs, demo_events, demo_pv_offered, demo_pv_irqs;
static volatile u32 *demo_assist;

static void demo_timer_msg(struct regs *r)
{
    (void)r;
    if (demo_simp[0].type == HVMSG_TIMER_EXPIRED)
        demo_timer_msgs++;
    bool pending = demo_simp[0].flags & HV_MSG_FLAG_PENDING;
    demo_simp[0].type = HVMSG_NONE;
    if (pending)
        wrmsr(HV_MSR_EOM, 0);
    apic_eoi();
}

static void demo_echo(struct regs *r)
{
    (void)r;
    demo_echo_msgs++;
    apic_eoi();
}

static void demo_event(struct regs *r)
{
    (void)r;
    demo_events++; /* auto-EOI SINT */
}

static void demo_direct(struct regs *r)
{
    (void)r;
    demo_pv_irqs++;
    u32 old;
    asm volatile("lock btrl $0, %1; setc %b0" : "=q"(old), "+m"(*demo_assist) : : "memory", "cc");
    if (old & 1)
        demo_pv_offered++; /* exit-less EOI: the VMM completes it at the next exit */
    else
        apic_eoi();
}

static void section_synic(void)
{
    u32 a = hv_features_eax();
    if (!(a & HV_EAX_SYNIC)) {
        printf("  not offered (hv-synic)\n");
        return;
    }
    u64 hz = tsc_hz_from_cpuid();
    if (!hz)
        hz = 2000000000ul;
    demo_simp = alloc_pages(1);
    u8 *siefp = alloc_pages(1);
    set_irq_handler(0x91, demo_timer_msg);
    set_irq_handler(0x92, demo_echo);
    set_irq_handler(0x93, demo_event);
    set_irq_handler(0x94, demo_direct);
    synic_enable(demo_simp, siefp);
    synic_set_sint(0, 0x91, false);
    synic_set_sint(1, 0x92, false);
    synic_set_sint(2, 0x93, true);

    /* A message through hyperv-testdev's echo connection, and an event. */
    if (hv_hypercall_page || hv_enable_hypercalls()) {
        struct hv_post_message_input *in = alloc_pages(1);
        hvt_cmd(HVT_MSG_CONN_CREATE, 0, 1, 1);
        hvt_cmd(HVT_EVT_CONN_CREATE, 0, 2, 2);
        in->connection_id = 1;
        in->message_type = 0x1234;
        in->payload_size = 6;
        memcpy(in->payload, "hello", 6);
        u64 st = hv_post_message(in);
        bool got = wait_count(&demo_echo_msgs, 1, hz / 10);
        if (st == HV_STATUS_INVALID_CONNECTION_ID)
            printf("  message         PostMessage: no connection (add -device hyperv-testdev for the echo)\n");
        else
            printf("  message         PostMessage 'hello' (type 0x1234) echoed into SINT1's slot: \"%s\": %s\n",
                   got ? (const char *)demo_simp[1].payload : "", works(got && demo_simp[1].type == 0x1234));
        demo_simp[1].type = HVMSG_NONE;
        st = hv_signal_event_fast(2, 0);
        got = wait_count(&demo_events, 1, hz / 10);
        if (st == HV_STATUS_INVALID_CONNECTION_ID)
            printf("  event           SignalEvent: no connection (add -device hyperv-testdev)\n");
        else
            printf("  event           SignalEvent set flag 2 of SINT2 (%s) and raised it once: %s\n",
                   siefp[2 * 256] & 4 ? "set" : "clear", works(got && (siefp[2 * 256] & 4) && demo_events == 1));
    }

    if (!(a & HV_EAX_SYNTIMERS) || !(a & HV_EAX_TIME_REF_COUNT)) {
        printf("  synthetic timers not offered (hv-stimer)\n");
        return;
    }
    /* A 1 ms periodic stimer in message mode over 200 ms of reference time. */
    stimer_count(0, 10000);
    u64 t0 = hv_ref_time();
    stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_SINT(0));
    while (hv_ref_time() < t0 + 2000000) {
        safe_halt();
        cli();
    }
    stimer_config(0, 0);
    u32 n = demo_timer_msgs;
    printf("  stimer          1 ms periodic, message mode: %u HVMSG_TIMER_EXPIRED in 200 ms (%u per second): %s\n",
           n, n * 5, works(n > 0));

    if (!(a & HV_EAX_APIC_ACCESS) || !(hv_features_edx() & HV_EDX_STIMER_DIRECT)) {
        printf("  exit-less EOI   not shown (needs hv-vapic and hv-stimer-direct)\n");
        return;
    }
    /* Exit-less EOI: a 1 ms direct-mode stimer for 50 interrupts whose handler honours the assist page bit. */
    demo_assist = alloc_pages(1);
    wrmsr(HV_MSR_VP_ASSIST_PAGE, (u64)demo_assist | 1);
    stimer_count(1, 10000);
    stimer_config(1, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_DIRECT | HV_STIMER_VECTOR(0x94));
    while (demo_pv_irqs < 50) {
        safe_halt();
        cli();
    }
    stimer_config(1, 0);
    wrmsr(HV_MSR_VP_ASSIST_PAGE, 0);
    printf("  exit-less EOI   %u of %u direct stimer interrupts EOI'd without an EOI exit: %s\n", demo_pv_offered,
           demo_pv_irqs, works(demo_pv_offered > 0));
}

static const struct {
    const char *title;
    void (*fn)(void);
} sections[] = {
    { "CPU", section_cpu },
    { "Hypervisor", section_hypervisor },
    { "vCPUs", section_cpus },
    { "Memory", section_memory },
    { "Timer", section_timer },
    { "Hyper-V", section_hyperv },
    { "SynIC", section_synic },
};

int main(void)
{
    printf("enlighten demo guest (%s entry)\n", booted_via_elf64() ? "ELF64" : "Multiboot");
    for (u32 i = 0; i < ARRAY_SIZE(sections); i++) {
        printf("%s\n", sections[i].title);
        sections[i].fn();
    }
    printf("demo done\n");
    return 0;
}

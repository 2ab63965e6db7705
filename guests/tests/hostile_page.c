/*
 * Hostile use of the hypercall page (issue 10).
 *
 * race (default, -smp 2+): CPU 1 calls through the hypercall page in a loop while CPU 0 keeps rewriting that
 * page with other code, re-enables the HYPERCALL MSR on it (the VMM rewrites it), moves it to another page,
 * disables it and clears GUEST_OS_ID. Every call must end in one of the outcomes the bytes in the page at that
 * moment allow: the hypercall's status (2 for the unknown code used), -KVM_ENOSYS while GUEST_OS_ID is 0, or what
 * the replacement code does (`mov al, 0x77` or `0x0B`, `in al, 0xE4`). Never a VMM crash or hang.
 *
 * msrrace (mode=msrrace rounds=N, -smp 2+): CPU 0 changes the partition-wide MSRs (REFERENCE_TSC on, off and
 * beyond RAM, TSC_EMULATION_CONTROL, REENLIGHTENMENT_CONTROL, HYPERCALL, CRASH_P0, GUEST_OS_ID) while the other
 * CPUs read TIME_REF_COUNT, reprogram their stimers, write EOM and make hypercalls: no deadlock, reference time
 * monotonic on every CPU, exact statuses.
 *
 * postflood (mode=postflood posts=N, -smp 2+, -device hyperv-testdev): every CPU but 0 posts N messages to one
 * PostMessage connection that targets CPU 0; statuses SUCCESS or INSUFFICIENT_BUFFERS only, and every accepted
 * message delivered exactly once.
 *
 * endrace (mode=endrace end=reset|triple|crash, -smp 2+, --no-reboot): CPU 0 ends the VM while the others are busy
 * with hypercalls, MSRs and timer interrupts; the VMM must stop cleanly. end=reboot (without --no-reboot): the
 * RESET reboots the VM, and the second boot checks that every CPU came back with its Hyper-V state reset.
 *
 * hammer (mode=hammer iters=N, any -smp up to 1024): every CPU makes N rounds of three hypercalls through the
 * same page at once (NotifyLongSpinWait, an unknown code, a fast SendSyntheticClusterIpi to nobody); each must
 * return its exact status.
 *
 * Needs -cpu host,hv-passthrough (hv-vpindex and hv-ipi at least).
 */
#include "synic.h"

#define UNKNOWN_CODE 0x7FFFul
#define SENTINEL 0x5E5E5E5E5E5E5E00ul
#define KVM_ENOSYS ((u64)-1000l)
/* Pages the hypercall page moves through. Never reused: CPU 1 may still be inside a page it read from `cur`
 * long ago (its thread can be descheduled for milliseconds), so only the current page is ever rewritten, and a
 * page is prepared (filled with 0xCC, which this host's emulator cannot execute) only before it first becomes
 * current. */
#define NPAGES 64
#define HVMSG_TEST_FLOOD 0x7E57u

/* First 8 bytes of the page. Guest ring 0 is emulated on this host, and an opcode the emulator does not know
 * (int3, undefined opcodes such as FE /7, MMX or SSE such as 0F E4, 0F 77, 0F C3) ends the VM with an emulation
 * failure instead of raising an exception in the guest. `ud2` is no exception to that: written by CPU 0 just
 * before CPU 1 runs it, it raised #UD in most calls but ended about one run in 60 with an emulation failure on
 * the bytes `0f 0b` (KVM's emulator has no `ud2` and fails at CPL 0), so no version faults. CPU 1 may also fetch
 * the first bytes torn against one of CPU 0's rewrites (the emulator's fetch and the emulated store are byte
 * copies), so every step below changes the page only between two versions whose every byte mix of the first two
 * bytes still decodes to something the emulator executes: E6 xx `out`, E4 xx `in`, B0 xx `mov al`. Every version
 * is a two-byte instruction followed by `ret` in bytes 2..7, so whatever ran first, the next fetch finds `ret`.
 * The VMM writes `E6 E4 C3` (A) in place only over M. */
#define V_MOV77 0xC3C3C3C3C3C377B0ul /* M: mov al, 0x77; ret */
#define V_IN 0xC3C3C3C3C3C3E4E4ul    /* I: in al, 0xE4 (a read of the hypercall port); ret */
#define V_MOV0B 0xC3C3C3C3C3C30BB0ul /* N: mov al, 0x0B; ret */

static u8 *pages[NPAGES];
static u8 *volatile cur;
static volatile u32 done;

struct tally {
    u64 ok, enosys, mov, in, no_exit, other, last_other;
};
static struct tally tally;

static inline u64 call_page(u8 *page, u64 control, u64 rdx, u64 r8v)
{
    u64 rax = SENTINEL;
    register u64 r8 asm("r8") = r8v;
    asm volatile("call *%[p]" : "+a"(rax), "+c"(control), "+d"(rdx), "+r"(r8) : [p] "r"(page) : "cc", "memory");
    return rax;
}

static void hammer_race(void *arg)
{
    u64 n = (u64)arg;
    struct tally t = {0};
    for (u64 i = 0; i < n; i++) {
        u64 r = call_page(cur, UNKNOWN_CODE, 0, 0);
        if (r == HV_STATUS_INVALID_HYPERCALL_CODE)
            t.ok++;
        else if (r == KVM_ENOSYS)
            t.enosys++;
        else if (r == (SENTINEL | 0x77) || r == (SENTINEL | 0x0B))
            t.mov++;
        else if (r == (SENTINEL | 0xFF))
            t.in++; /* `in al, 0xE4` (or `in al, 0x0B` torn): unhandled port reads give all-ones */
        else if (r == SENTINEL || r == (SENTINEL | 0xE4))
            t.no_exit++; /* an `out` to another port or `mov al, 0xE4`: a fetch torn against a rewrite */
        else {
            t.other++;
            t.last_other = r;
        }
    }
    tally = t;
    WRITE_ONCE(done, 1);
}

static void set_first_qword(u8 *page, u64 v) { WRITE_ONCE(*(volatile u64 *)page, v); }

static void race(u64 calls)
{
    for (unsigned i = 0; i < NPAGES; i++) {
        pages[i] = alloc_pages(1);
        memset(pages[i], 0xCC, 4096);
    }
    wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX);
    wrmsr(HV_MSR_HYPERCALL, (u64)pages[0] | 1);
    cur = pages[0];
    report(call_page(cur, UNKNOWN_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE, "the page works before the race");

    on_cpu_async(1, hammer_race, (void *)calls);
    u64 steps = 0, moves = 0;
    unsigned next = 1;
    while (!READ_ONCE(done)) {
        u8 *p = cur;
        /* A -> I -> N -> M -> A, then the MSR games and a move to a fresh page (A). */
        switch (steps++ % 8) {
        case 0:
            set_first_qword(p, V_IN);
            break;
        case 1:
            set_first_qword(p, V_MOV0B);
            break;
        case 2:
            set_first_qword(p, V_MOV77); /* right before the in-place rewrite */
            break;
        case 3:
            wrmsr(HV_MSR_HYPERCALL, (u64)p | 1); /* the VMM rewrites the code in place */
            break;
        case 4:
            wrmsr(HV_MSR_GUEST_OS_ID, 0);
            tsc_delay(1000000);
            wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX);
            break;
        case 5:
            wrmsr(HV_MSR_HYPERCALL, 0); /* disabled: the code stays, calls still work (KVM) */
            break;
        case 6: {
            if (next >= NPAGES)
                break;
            u8 *q = pages[next++];
            memset(q, 0xCC, 4096);
            wrmsr(HV_MSR_HYPERCALL, (u64)q | 1);
            cur = q;
            moves++;
            break;
        }
        default:
            tsc_delay(20000);
        }
    }
    struct tally t = tally;
    report_info("race: %lu calls: %lu status 2, %lu -KVM_ENOSYS, %lu mov, %lu in, %lu torn, "
                "%lu other; %lu rewrites, %lu moves",
                calls, t.ok, t.enosys, t.mov, t.in, t.no_exit, t.other, steps, moves);
    report(t.other == 0, "every call ended with the status or what the bytes in the page do (other: %lu, last %lx)",
           t.other, t.last_other);
    report(t.ok + t.enosys + t.mov + t.in + t.no_exit + t.other == calls && t.ok > 0 && steps > 8,
           "CPU 1 made all %lu calls while CPU 0 rewrote the page %lu times", calls, steps);
    wrmsr(HV_MSR_HYPERCALL, (u64)cur | 1);
    report(call_page(cur, UNKNOWN_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "re-enabling the page makes it work again");
}

static volatile u32 bad_calls, finished;

static void hammer_all(void *arg)
{
    u64 n = (u64)arg;
    u32 bad = 0;
    for (u64 i = 0; i < n; i++) {
        bad += hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, 0, 0) != HV_STATUS_SUCCESS;
        bad += hv_hypercall(UNKNOWN_CODE, i, i) != HV_STATUS_INVALID_HYPERCALL_CODE;
        bad += hv_hypercall(0x000B | HV_HYPERCALL_FAST, 0xE1, 0) != HV_STATUS_SUCCESS;
    }
    if (bad)
        atomic_fetch_add(&bad_calls, bad);
    atomic_inc(&finished);
}

static void hammer(u64 iters)
{
    if (!hv_enable_hypercalls())
        fail("cannot enable the hypercall page");
    u32 n = nr_cpus();
    for (u32 cpu = 1; cpu < n; cpu++)
        on_cpu_async(cpu, hammer_all, (void *)iters);
    hammer_all((void *)iters);
    u64 end = rdtsc() + 120000000000ul;
    while (READ_ONCE(finished) < n && rdtsc() < end)
        pause();
    report(READ_ONCE(finished) == n, "all %u CPUs finished %lu rounds of 3 hypercalls (%u)", n, iters, finished);
    report(bad_calls == 0, "%lu hypercalls through the same page, every status exact (%u wrong)", 3 * iters * n,
           bad_calls);
}

/* ---- msrrace: CPU 0 keeps changing the partition-wide MSRs while every other CPU reads reference time, programs
 * its own synthetic timers, writes EOM and makes hypercalls. Nothing may deadlock, reference time must never go
 * backwards on any CPU, and every call keeps its status. */
static volatile u32 race_stop, race_done, race_bad;
static volatile u64 race_back[MAX_CPUS];

static void msr_worker(void *arg)
{
    (void)arg;
    u32 id = smp_id();
    u64 last = 0, back = 0, bad = 0;
    while (!READ_ONCE(race_stop)) {
        u64 t = rdmsr(HV_MSR_TIME_REF_COUNT);
        if (t < last)
            back++;
        last = t;
        wrmsr(0x400000B0 + 2 * (id % 4), (2ul << 16) | (1ul << 3)); /* STIMERn_CONFIG: SINT 2, auto-enable */
        wrmsr(0x400000B1 + 2 * (id % 4), t + 5000);                 /* 0.5 ms from now */
        wrmsr(0x40000084, 0);                                       /* EOM */
        bad += hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, 0, 0) != HV_STATUS_SUCCESS;
        bad += hv_hypercall(UNKNOWN_CODE, 0, 0) != HV_STATUS_INVALID_HYPERCALL_CODE;
    }
    wrmsr(0x400000B0 + 2 * (id % 4), 0);
    race_back[id] = back;
    atomic_fetch_add(&race_bad, (u32)bad);
    atomic_inc(&race_done);
}

static void msr_race(u64 rounds)
{
    u8 *hc = hv_enable_hypercalls();
    if (!hc)
        fail("cannot enable the hypercall page");
    u8 *tsc_page = alloc_pages(1);
    u32 n = nr_cpus();
    /* The workers' timers post to SINT 2 with SIMP disabled: each expiry fails and waits for an EOM. */
    for (u32 cpu = 1; cpu < n; cpu++)
        on_cpu_async(cpu, msr_worker, NULL);
    u64 last = 0, back = 0;
    for (u64 i = 0; i < rounds; i++) {
        static const u64 ref[] = {1, 0, 2};
        u64 r = ref[i % 3];
        wrmsr(HV_MSR_REFERENCE_TSC, r == 1 ? (u64)tsc_page | 1 : r == 2 ? (fw_cfg_ram_size() + (1ul << 32)) | 1 : 0);
        wrmsr(HV_MSR_TSC_EMULATION_CONTROL, i & 1);
        wrmsr(HV_MSR_REENLIGHTENMENT_CONTROL, (i & 1) ? (1ul << 16) | 0xF5 : 0);
        wrmsr(HV_MSR_HYPERCALL, (u64)hc | 1);
        wrmsr(HV_MSR_CRASH_P0, i);
        wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX | (i & 0xFF));
        u64 t = rdmsr(HV_MSR_TIME_REF_COUNT);
        if (t < last)
            back++;
        last = t;
    }
    WRITE_ONCE(race_stop, 1);
    u64 end = rdtsc() + 60000000000ul;
    while (READ_ONCE(race_done) < n - 1 && rdtsc() < end)
        pause();
    wrmsr(HV_MSR_REFERENCE_TSC, 0);
    wrmsr(HV_MSR_TSC_EMULATION_CONTROL, 0);
    u64 worker_back = 0;
    for (u32 cpu = 1; cpu < n; cpu++)
        worker_back += race_back[cpu];
    report(READ_ONCE(race_done) == n - 1, "%u CPUs kept running through %lu rounds of partition MSR changes",
           n - 1, rounds);
    report(back == 0 && worker_back == 0, "TIME_REF_COUNT never went backwards on any CPU (%lu, %lu)", back,
           worker_back);
    report(race_bad == 0, "every hypercall during the race kept its status (%u wrong)", race_bad);
}

/* ---- postflood: every CPU but 0 posts messages to one connection whose target is CPU 0's SINT 3 as fast as
 * it can; CPU 0 consumes them. Every PostMessage returns SUCCESS (staged, will be delivered) or
 * INSUFFICIENT_BUFFERS (the connection's single staging buffer is busy: retry); each successful post is
 * delivered exactly once, none is lost, none duplicated. */
#define FLOOD_VECTOR 0x43
#define FLOOD_CONN 30
#define FLOOD_MAX 512
/* The SIMP page the consumer reads (NULL while SIMP is disabled or outside RAM); changed only by CPU 0 with
 * interrupts off, and the handler runs on CPU 0. */
static struct hv_message *volatile flood_simp;
static volatile u32 flood_got, flood_dup, flood_bad_payload;
static volatile u8 flood_seen[MAX_CPUS][FLOOD_MAX];
static volatile u32 flood_sent, flood_busy, flood_other, flood_done, flood_give_up;

static void flood_handler(struct regs *r)
{
    (void)r;
    if (!flood_simp) {
        wrmsr(HV_MSR_EOM, 0);
        apic_eoi();
        return;
    }
    struct hv_message *m = &flood_simp[3];
    if (m->type == HVMSG_TEST_FLOOD) {
        u32 cpu = m->payload[0] | ((u32)m->payload[1] << 8);
        u32 seq = m->payload[2] | ((u32)m->payload[3] << 8);
        if (cpu >= MAX_CPUS || seq >= FLOOD_MAX || m->size != 16)
            flood_bad_payload++;
        else if (flood_seen[cpu][seq]++)
            flood_dup++;
        flood_got++;
    }
    bool pending = m->flags & HV_MSG_FLAG_PENDING;
    m->type = 0;
    barrier();
    if (pending)
        wrmsr(HV_MSR_EOM, 0);
    apic_eoi();
}

static void flood_poster(void *arg)
{
    u64 n = (u64)arg;
    u32 cpu = smp_id();
    struct hv_post_message_input *in = alloc_pages(1);
    in->connection_id = FLOOD_CONN;
    in->message_type = HVMSG_TEST_FLOOD;
    in->payload_size = 16;
    for (u64 i = 0; i < n; i++) {
        in->payload[0] = (u8)cpu;
        in->payload[1] = (u8)(cpu >> 8);
        in->payload[2] = (u8)i;
        in->payload[3] = (u8)(i >> 8);
        for (;;) {
            u64 st = hv_post_message(in);
            if (st == HV_STATUS_SUCCESS) {
                atomic_inc(&flood_sent);
                break;
            }
            if (st == HV_STATUS_INSUFFICIENT_BUFFERS) {
                atomic_inc(&flood_busy);
                pause();
                if (READ_ONCE(flood_give_up))
                    break;
                continue;
            }
            atomic_inc(&flood_other);
            break;
        }
    }
    atomic_inc(&flood_done);
}

/* While the flood runs, CPU 0 keeps moving its SIMP between two pages, disabling it and pointing it beyond RAM
 * and on the APIC page (with an EOM each time, so that a message staged against the old page is retried). Messages
 * may then be lost (a message copied into a page that is moved away, or dropped while SIMP is off), but none may
 * be duplicated or corrupted, every status stays SUCCESS/INSUFFICIENT_BUFFERS, and once SIMP is stable again a
 * fresh message goes through. */
static void toggle_simp(unsigned step, struct hv_message *a, struct hv_message *b)
{
    static const u64 outside[] = {1ul << 40, 0xFEE00000ul};
    cli();
    switch (step % 5) {
    case 0:
        wrmsr(HV_MSR_SIMP, (u64)a | 1);
        flood_simp = a;
        break;
    case 1:
        wrmsr(HV_MSR_SIMP, (u64)b | 1);
        flood_simp = b;
        break;
    case 2:
        wrmsr(HV_MSR_SIMP, 0);
        flood_simp = NULL;
        break;
    default:
        wrmsr(HV_MSR_SIMP, outside[step % 2] | 1);
        flood_simp = NULL;
        break;
    }
    wrmsr(HV_MSR_EOM, 0);
    sti();
}

static void post_flood(u64 per_cpu, bool toggle)
{
    if (!hv_enable_hypercalls())
        fail("cannot enable the hypercall page");
    if (per_cpu > FLOOD_MAX)
        per_cpu = FLOOD_MAX;
    struct hv_message *a = alloc_pages(1), *b = alloc_pages(1);
    flood_simp = a;
    synic_enable(a, NULL);
    set_irq_handler(FLOOD_VECTOR, flood_handler);
    synic_set_sint(3, FLOOD_VECTOR, false);
    hvt_cmd(HVT_MSG_CONN_CREATE, 0, 3, FLOOD_CONN);
    u32 n = nr_cpus();
    for (u32 cpu = 1; cpu < n; cpu++)
        on_cpu_async(cpu, flood_poster, (void *)per_cpu);
    u64 end = rdtsc() + 60000000000ul;
    unsigned toggles = 0;
    sti();
    while ((READ_ONCE(flood_done) < n - 1 || (!toggle && READ_ONCE(flood_got) < READ_ONCE(flood_sent))) &&
           rdtsc() < end) {
        (void)inb(0x80);
        if (toggle)
            toggle_simp(toggles++, a, b);
    }
    if (READ_ONCE(flood_done) < n - 1) {
        WRITE_ONCE(flood_give_up, 1);
        while (READ_ONCE(flood_done) < n - 1)
            (void)inb(0x80);
    }
    if (toggle) {
        cli();
        wrmsr(HV_MSR_SIMP, (u64)a | 1); /* stable again: a fresh (zeroed) page */
        flood_simp = a;
        wrmsr(HV_MSR_EOM, 0);
        sti();
    }
    idle_for(10000000); /* a straggler would show up as a duplicate or an extra message */
    cli();
    u32 total = (n - 1) * (u32)per_cpu;
    u32 missing = 0;
    for (u32 cpu = 1; cpu < n; cpu++)
        for (u32 i = 0; i < per_cpu; i++)
            missing += flood_seen[cpu][i] == 0;
    report(flood_other == 0 && !flood_give_up,
           "%u CPUs posted %u messages: every status SUCCESS or INSUFFICIENT_BUFFERS (%u busy retries, %u other%s)",
           n - 1, total, flood_busy, flood_other, flood_give_up ? ", gave up" : "");
    if (!toggle) {
        report(flood_sent == total && flood_got == total && missing == 0 && flood_dup == 0 && flood_bad_payload == 0,
               "every accepted message delivered exactly once (sent %u, delivered %u, missing %u, duplicated %u, "
               "bad %u)",
               flood_sent, flood_got, missing, flood_dup, flood_bad_payload);
    } else {
        report(flood_got <= flood_sent && flood_dup == 0 && flood_bad_payload == 0,
               "with SIMP moved, disabled and put outside RAM %u times: no duplicate or corrupt message "
               "(sent %u, delivered %u, duplicated %u, bad %u)",
               toggles, flood_sent, flood_got, flood_dup, flood_bad_payload);
        /* One more message once SIMP is stable: delivered. */
        u32 before = flood_got;
        struct hv_post_message_input *in = alloc_pages(1);
        in->connection_id = FLOOD_CONN;
        in->message_type = HVMSG_TEST_FLOOD;
        in->payload_size = 16;
        in->payload[0] = 0;
        in->payload[2] = 0; /* CPU 0, sequence 0: never used by the posters */
        u64 st;
        u64 stop = rdtsc() + 20000000000ul;
        while ((st = hv_post_message(in)) == HV_STATUS_INSUFFICIENT_BUFFERS && rdtsc() < stop) {
            wrmsr(HV_MSR_EOM, 0);
            idle_for(100000);
        }
        wait_count(&flood_got, before + 1, 20000000000ul);
        report(st == HV_STATUS_SUCCESS && flood_got == before + 1 && flood_seen[0][0] == 1,
               "after the toggling, a new message is delivered (status %lx, %u)", st, flood_got - before);
    }
    hvt_cmd(HVT_MSG_CONN_DESTROY, 0, 0, FLOOD_CONN);
    synic_mask_all();
}

/* ---- endrace: CPU 0 ends the VM (end=reset: RESET = 1; end=triple: a triple fault; end=crash: CRASH_CTL notify)
 * while every other CPU is in the middle of hypercalls, stimer reprogramming, EOMs and 100 us periodic timer
 * interrupts. Under --no-reboot the VMM must stop cleanly (status 0, no error, no hang). */
#define END_VECTOR 0x52
static volatile u32 end_calls[MAX_CPUS];
static void end_irq(struct regs *r)
{
    (void)r;
    apic_eoi();
}

static void end_worker(void *arg)
{
    (void)arg;
    u32 id = smp_id();
    wrmsr(HV_MSR_SCONTROL, 1);
    /* A 100 us periodic direct timer: interrupts keep arriving during the end. */
    wrmsr(HV_MSR_STIMER0_CONFIG, HV_STIMER_DIRECT | HV_STIMER_VECTOR(END_VECTOR) | HV_STIMER_PERIODIC |
                                     HV_STIMER_AUTO_ENABLE);
    wrmsr(HV_MSR_STIMER0_COUNT, 1000);
    sti();
    for (;;) {
        hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, 0, 0);
        hv_hypercall(UNKNOWN_CODE, 0, 0);
        wrmsr(HV_MSR_STIMER0_CONFIG + 2, (2ul << 16) | (1ul << 3));
        wrmsr(HV_MSR_STIMER0_COUNT + 2, rdmsr(HV_MSR_TIME_REF_COUNT) + 100);
        wrmsr(HV_MSR_EOM, 0);
        end_calls[id]++;
    }
}

/* 3 s of reference time (a first boot takes well under that). */
#define REBOOT_MARK 30000000ul
static volatile u64 after_reset[MAX_CPUS][4];

static void read_after_reset(void *arg)
{
    (void)arg;
    u32 id = smp_id();
    after_reset[id][0] = rdmsr(HV_MSR_STIMER0_CONFIG) | rdmsr(HV_MSR_STIMER0_CONFIG + 2);
    after_reset[id][1] = rdmsr(HV_MSR_SCONTROL);
    after_reset[id][2] = rdmsr(HV_MSR_SINT0 + 2);
    after_reset[id][3] = 1;
}

/* The boot after a RESET made while every CPU was busy: all CPUs back, per-VP Hyper-V state as after a reset
 * (timers off, SCONTROL 0, SINTs masked), partition state cleared, hypercalls can be enabled again. */
static void second_boot(void)
{
    u32 n = nr_cpus();
    printf("endrace: second boot, %u CPUs\n", n);
    u64 osid = rdmsr(HV_MSR_GUEST_OS_ID), hc = rdmsr(HV_MSR_HYPERCALL);
    bool clean = true;
    for (u32 cpu = 0; cpu < n; cpu++) {
        on_cpu(cpu, read_after_reset, NULL);
        clean &= after_reset[cpu][3] == 1 && after_reset[cpu][0] == 0 && after_reset[cpu][1] == 0 &&
                 after_reset[cpu][2] == HV_SINT_MASKED;
    }
    report(fw_cfg_nb_cpus() == n, "every CPU came back after the reset (%u)", n);
    report(clean && osid == 0 && hc == 0, "Hyper-V state reads as after a reset on every CPU");
    report(hv_enable_hypercalls() && hv_hypercall(UNKNOWN_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "hypercalls can be enabled again");
}

static void end_race(const char *how)
{
    if (!strcmp(how, "reboot") && rdmsr(HV_MSR_TIME_REF_COUNT) >= REBOOT_MARK) {
        second_boot();
        return;
    }
    if (!hv_enable_hypercalls())
        fail("cannot enable the hypercall page");
    set_irq_handler(END_VECTOR, end_irq);
    u32 n = nr_cpus();
    for (u32 cpu = 1; cpu < n; cpu++)
        on_cpu_async(cpu, end_worker, NULL);
    u64 end = rdtsc() + 60000000000ul;
    for (u32 cpu = 1; cpu < n; cpu++)
        while (end_calls[cpu] < 50 && rdtsc() < end)
            pause();
    if (!strcmp(how, "reboot")) {
        /* Reference time survives the reset: the boot that finds it past REBOOT_MARK is the second one. */
        while (rdmsr(HV_MSR_TIME_REF_COUNT) < REBOOT_MARK && rdtsc() < end)
            pause();
    }
    printf("endrace: every CPU is busy; ending the VM with %s\n", how);
    if (!strcmp(how, "reset") || !strcmp(how, "reboot")) {
        wrmsr(HV_MSR_RESET, 1);
    } else if (!strcmp(how, "crash")) {
        wrmsr(HV_MSR_CRASH_P0, 0xBAD);
        wrmsr(HV_MSR_CRASH_CTL, HV_CRASH_CTL_NOTIFY);
    } else {
        struct {
            u16 limit;
            u64 base;
        } __attribute__((packed)) empty = {0, 0};
        asm volatile("lidt %0" ::"m"(empty));
        asm volatile("ud2");
    }
    /* The VM must end within the timeout; if the guest gets here, the end did not happen at once. */
    u64 grace = rdtsc() + 20000000000ul;
    while (rdtsc() < grace)
        pause();
    fail("the VM did not end after %s", how);
}

int main(void)
{
    smp_init();
    if (arg_is("mode", "hammer"))
        hammer(arg_u64("iters", 4));
    else if (arg_is("mode", "endrace")) {
        const char *how = arg_str("end");
        end_race(!how                         ? "triple"
                 : !strncmp(how, "reset", 5)  ? "reset"
                 : !strncmp(how, "reboot", 6) ? "reboot"
                 : !strncmp(how, "crash", 5)  ? "crash"
                                              : "triple");
    } else if (arg_is("mode", "postflood"))
        post_flood(arg_u64("posts", 200), arg_u64("toggle", 0) != 0);
    else if (arg_is("mode", "msrrace"))
        msr_race(arg_u64("rounds", 300));
    else if (nr_cpus() < 2)
        report_skip("the race needs -smp 2");
    else
        race(arg_u64("calls", 3000));
    return 0;
}

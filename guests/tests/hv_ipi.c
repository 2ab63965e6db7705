/*
 * HvCallSendSyntheticClusterIpi (0x000B) and HvCallSendSyntheticClusterIpiEx (0x0015) under real KVM: every
 * call must reach exactly the VPs of its set, once each, and never a VP outside it: processor masks and sparse
 * VP sets with holes, format ALL (sender included), VP indexes beyond the partition, the fast form, and the
 * invalid inputs (vector outside 16..255, bank count not matching the header) that must deliver nothing.
 * Needs -smp 3 or more and -cpu ...,hv-vpindex,hv-ipi.
 */
#include "hv.h"

#define HVCALL_SEND_IPI 0x000B
#define HVCALL_SEND_IPI_EX 0x0015
#define VAR_CNT(n) ((u64)(n) << 17)
#define VP_SET_SPARSE 0ull
#define VP_SET_ALL 1ull
#define MAXN 1024
#define VEC 0xE0 /* 0xF0 is the runtime's WAKE_VECTOR */
#define VEC2 0x31

static volatile u32 got[MAXN][2];
static u32 n;
static u32 vp_of[MAXN];
static u64 *input;

static void handler(struct regs *r)
{
    atomic_inc(&got[smp_id()][r->vector == VEC ? 0 : 1]);
    apic_eoi();
}

static void read_vp_index(void *arg)
{
    (void)arg;
    vp_of[smp_id()] = (u32)rdmsr(HV_MSR_VP_INDEX);
}

static u32 total(void)
{
    u32 s = 0;
    for (u32 i = 0; i < n; i++)
        s += got[i][0] + got[i][1];
    return s;
}

/* Receives with interrupts on until `want` interrupts arrived (or ~1e9 TSC ticks), then settles so that
 * duplicates or strays would show up. */
static void wait_for(u32 want)
{
    u64 t0 = rdtsc();
    sti();
    while (total() < want && rdtsc() - t0 < 1000000000ull)
        pause();
    tsc_delay(20000000);
    cli();
}

/* Calls, waits and checks that exactly the vCPUs in `expect` (bit = vCPU) got one `vector` interrupt. */
static void check(const char *name, u64 control, u64 in, u64 out, u64 want_status, u64 expect, u8 vector)
{
    for (u32 i = 0; i < n; i++)
        got[i][0] = got[i][1] = 0;
    u64 status = hv_hypercall(control, in, out);
    u32 want = 0;
    for (u32 i = 0; i < n; i++)
        want += (expect >> i) & 1;
    wait_for(want);
    bool ok = status == want_status;
    int slot = vector == VEC ? 0 : 1;
    for (u32 i = 0; i < n; i++) {
        u32 w = (expect >> i) & 1;
        if (got[i][slot] != w || got[i][slot ^ 1] != 0) {
            printf("  vCPU %u got %u (other vector %u), expected %u\n", i, got[i][slot], got[i][slot ^ 1], w);
            ok = false;
        }
    }
    report(ok, "%s: status %lu, delivered to exactly the set 0x%lx", name, status, expect);
}

static void write_input(const u64 *words, unsigned count)
{
    for (unsigned i = 0; i < count; i++)
        input[i] = words[i];
}

/* bench=K mode=hv|apic|none: K broadcasts to every other vCPU, each waited for, through one
 * SendSyntheticClusterIpiEx (hv), one APIC ICR write per target (apic) or nothing (none, the baseline for exit
 * counts). Prints the TSC ticks per broadcast; the VMM's exit counts give the exits per broadcast. */
static void bench(u64 k)
{
    const char *mode = arg_str("mode");
    bool hv = arg_is("mode", "hv"), apic = arg_is("mode", "apic");
    for (u32 i = 0; i < n; i++)
        got[i][0] = got[i][1] = 0;
    u32 words = (n + 63) / 64;
    input[0] = VEC;
    input[1] = VP_SET_SPARSE;
    input[2] = words == 64 ? ~0ull : (1ull << words) - 1;
    for (u32 w = 0; w < words; w++) {
        u32 lo = w * 64, hi = lo + 64 < n ? lo + 64 : n;
        u64 bits = hi - lo == 64 ? ~0ull : (1ull << (hi - lo)) - 1;
        if (w == 0)
            bits &= ~1ull; /* not the sender */
        input[3 + w] = bits;
    }
    u64 t0 = rdtsc();
    bool ok = true;
    for (u64 it = 1; it <= k && ok; it++) {
        if (hv)
            ok = hv_hypercall(HVCALL_SEND_IPI_EX | VAR_CNT(words), (u64)input, 0) == 0;
        else if (apic)
            for (u32 j = 1; j < n; j++)
                apic_send_ipi(j, VEC);
        if (!hv && !apic)
            continue;
        u64 w0 = rdtsc();
        while (ok) {
            bool all = true;
            for (u32 j = 1; j < n; j++)
                all &= got[j][0] >= it;
            if (all)
                break;
            if (rdtsc() - w0 > 4000000000ull)
                ok = false;
            pause();
        }
    }
    u64 ticks = rdtsc() - t0;
    if (ok && (hv || apic)) {
        /* Settle, then every target must have received each broadcast exactly once, and the sender none. */
        u64 s0 = rdtsc();
        while (rdtsc() - s0 < 20000000ull)
            pause();
        for (u32 j = 1; j < n; j++)
            if (got[j][0] != k || got[j][1] != 0) {
                printf("vCPU %u received %u/%u interrupts for %lu broadcasts\n", j, got[j][0], got[j][1], k);
                ok = false;
            }
        if (got[0][0] != 0 || got[0][1] != 0) {
            printf("the sender received %u/%u interrupts\n", got[0][0], got[0][1]);
            ok = false;
        }
    }
    printf("BENCH ipi-all mode=%s vcpus=%u broadcasts=%lu ticks_per_broadcast=%lu\n", mode ? mode : "?", n, k,
           ticks / k);
    report(ok, "benchmark %s: %lu broadcasts to %u vCPUs, each received exactly once", mode ? mode : "?", k, n - 1);
}

int main(void)
{
    smp_init();
    n = nr_cpus();
    if (n < 3 || n > MAXN) {
        report_skip("needs 3..%u vCPUs, have %u", MAXN, n);
        return 0;
    }
    if (!hv_identified() || !hv_enable_hypercalls()) {
        report(false, "Hyper-V hypercalls are available");
        return 0;
    }
    set_irq_handler(VEC, handler);
    set_irq_handler(VEC2, handler);
    input = alloc_pages(1);
    bool identity = true;
    for (u32 i = 0; i < n; i++) {
        on_cpu(i, read_vp_index, NULL);
        identity &= vp_of[i] == i;
    }
    report(identity, "VP index = vCPU index on all %u vCPUs", n);
    u64 k = arg_u64("bench", 0);
    if (k) {
        bench(k);
        return 0;
    }
    if (n > 64) {
        report_skip("the set checks use 64-bit vCPU bitmaps: run them with at most 64 vCPUs");
        return 0;
    }
    u64 all = n >= 64 ? ~0ull : (1ull << n) - 1;
    u64 last = 1ull << (n - 1);
    /* A set with a hole: vCPUs 1 and n-1 (n >= 3), not 0 (the sender) and not 2..n-2. */
    u64 holes = 2ull | last;

    write_input((u64[]){VEC, holes}, 2);
    check("SendSyntheticClusterIpi, mask with a hole", HVCALL_SEND_IPI, (u64)input, 0, 0, holes, VEC);
    check("SendSyntheticClusterIpi fast, mask {2}", HVCALL_SEND_IPI | HV_HYPERCALL_FAST, VEC2, 4, 0, 4, VEC2);
    write_input((u64[]){VEC, all}, 2);
    check("SendSyntheticClusterIpi, every vCPU including the sender", HVCALL_SEND_IPI, (u64)input, 0, 0, all, VEC);
    write_input((u64[]){VEC, (1ull << 40) | 2}, 2);
    check("SendSyntheticClusterIpi, VP 40 (beyond the partition) ignored", HVCALL_SEND_IPI, (u64)input, 0, 0,
          n > 40 ? ((1ull << 40) | 2) : 2, VEC);
    write_input((u64[]){VEC, 0}, 2);
    check("SendSyntheticClusterIpi, empty mask", HVCALL_SEND_IPI, (u64)input, 0, 0, 0, VEC);
    write_input((u64[]){0x0F, holes}, 2);
    check("SendSyntheticClusterIpi, vector 15 refused", HVCALL_SEND_IPI, (u64)input, 0,
          HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    write_input((u64[]){0x100, holes}, 2);
    check("SendSyntheticClusterIpi, vector 256 refused", HVCALL_SEND_IPI, (u64)input, 0,
          HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    check("SendSyntheticClusterIpi fast, reserved upper half set", HVCALL_SEND_IPI | HV_HYPERCALL_FAST,
          (1ull << 32) | VEC, holes, HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    write_input((u64[]){VEC, holes}, 2);
    check("SendSyntheticClusterIpi with var_cnt refused", HVCALL_SEND_IPI | VAR_CNT(1), (u64)input, 0,
          HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);

    /* Ex: vector, format, valid_bank_mask, banks. */
    write_input((u64[]){VEC, VP_SET_SPARSE, 1, holes}, 4);
    check("SendSyntheticClusterIpiEx, sparse bank 0 with a hole", HVCALL_SEND_IPI_EX | VAR_CNT(1), (u64)input, 0,
          0, holes, VEC);
    write_input((u64[]){VEC, VP_SET_ALL, 0}, 3);
    check("SendSyntheticClusterIpiEx, format ALL (sender included)", HVCALL_SEND_IPI_EX, (u64)input, 0, 0, all,
          VEC);
    /* Banks 0 and 2: bank 2 (VPs 128..191) names no vCPU. */
    write_input((u64[]){VEC2, VP_SET_SPARSE, 0b101, 4, ~0ull}, 5);
    check("SendSyntheticClusterIpiEx, banks 0 and 2 (bank 2 beyond the partition)", HVCALL_SEND_IPI_EX | VAR_CNT(2),
          (u64)input, 0, 0, 4, VEC2);
    write_input((u64[]){VEC, VP_SET_SPARSE, 0b10, ~0ull}, 4);
    check("SendSyntheticClusterIpiEx, bank 1 only (no vCPU)", HVCALL_SEND_IPI_EX | VAR_CNT(1), (u64)input, 0, 0,
          0, VEC);
    write_input((u64[]){0, VP_SET_SPARSE, 0}, 3);
    check("SendSyntheticClusterIpiEx, empty set succeeds without a vector check", HVCALL_SEND_IPI_EX, (u64)input, 0,
          0, 0, VEC);
    write_input((u64[]){VEC, VP_SET_SPARSE, 0b11, holes, 1}, 5);
    check("SendSyntheticClusterIpiEx, var_cnt 1 for 2 banks refused", HVCALL_SEND_IPI_EX | VAR_CNT(1), (u64)input, 0,
          HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    write_input((u64[]){0x0F, VP_SET_ALL, 0}, 3);
    check("SendSyntheticClusterIpiEx, format ALL with vector 15 refused", HVCALL_SEND_IPI_EX, (u64)input, 0,
          HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    write_input((u64[]){VEC, VP_SET_SPARSE, 1, holes}, 4);
    check("SendSyntheticClusterIpiEx as a rep call refused", HVCALL_SEND_IPI_EX | VAR_CNT(1) | (1ull << 32),
          (u64)input, 0, HV_STATUS_INVALID_HYPERCALL_INPUT, 0, VEC);
    return 0;
}

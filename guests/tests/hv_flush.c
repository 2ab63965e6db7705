/*
 * Hyper-V remote TLB flush hypercalls under real KVM. vCPU B (CPU 1) reads a test virtual address in a loop at
 * CPL 3 (the only mode that runs natively here and so keeps TLB entries), which caches the translation. vCPU A
 * (CPU 0) remaps the address to another page and calls a flush hypercall naming B, without flushing anything
 * itself; every read B starts after the hypercall returned must see the new page. A negative control first
 * remaps without any flush and must keep seeing the old page: if it does not, the flush results are reported
 * as unverified. Each form runs ROUNDS times, alternating the two pages.
 * Needs -smp 2 or more and -cpu ...,hv-vpindex,hv-tlbflush. Arguments: rounds=N (default 10).
 */
#include "hv.h"

#define HVCALL_FLUSH_SPACE 0x0002
#define HVCALL_FLUSH_LIST 0x0003
#define HVCALL_FLUSH_SPACE_EX 0x0013
#define HVCALL_FLUSH_LIST_EX 0x0014
#define FLUSH_ALL_PROCESSORS 1ull
#define FLUSH_ALL_SPACES 2ull
#define VP_SET_SPARSE 0ull
#define VP_SET_ALL 1ull
#define VAR_CNT(n) ((u64)(n) << 17)
#define REP_CNT(n) ((u64)(n) << 32)

#define TEST_VA 0x80005000ull
#define MAGIC0 0x1111111111111111ull
#define MAGIC1 0x2222222222222222ull
/* Loop iterations of B that count as "long enough" for the negative control. */
#define STALE_ITERS 200000
/* TSC ticks to wait for B before giving up (B runs natively, so this is generous). */
#define PATIENCE 4000000000ull

struct shared {
    volatile u64 va;
    volatile u64 stop;
    volatile u64 seen;
    volatile u64 iter;
};

static struct shared sh;
static u64 *page[2];
static u64 magic[2] = {MAGIC0, MAGIC1};
static u64 *pte;
static int cur;
static u64 *input;

/* B, at CPL 3: publish the value at the test address and an iteration count until told to stop. */
static u64 reader(u64 arg)
{
    struct shared *s = (struct shared *)arg;
    volatile u64 *p = (volatile u64 *)s->va;
    u64 i = 0;
    while (!s->stop) {
        s->seen = *p;
        s->iter = ++i;
    }
    return i;
}

static void reader_on_cpu(void *arg) { run_user(reader, (u64)arg); }

static volatile u64 b_vp_index;
static void read_vp_index(void *arg)
{
    (void)arg;
    b_vp_index = rdmsr(HV_MSR_VP_INDEX);
}

/* Waits until B has made `more` further iterations; false on timeout. */
static bool wait_iters(u64 more)
{
    u64 target = sh.iter + more;
    u64 t0 = rdtsc();
    while (sh.iter < target) {
        if (rdtsc() - t0 > PATIENCE)
            return false;
        pause();
    }
    return true;
}

/* Writes the PTE at CPL 3. Supervisor code is emulated here, and KVM propagates emulated writes to shadowed
 * page tables at once (write tracking); a native write lets KVM mark the page table out of sync, as a guest
 * kernel's own PTE updates would on hardware, so only a TLB flush makes the change visible to other vCPUs. */
static u64 write_pte(u64 value)
{
    *(volatile u64 *)pte = value;
    return 0;
}

/* Remaps the test address to the other page, without flushing on this CPU. */
static void remap(void)
{
    cur ^= 1;
    run_user(write_pte, (u64)page[cur] | PTE_P | PTE_RW | PTE_US);
}

/* One flush round: B must be reading the current page; remap; call; every later read of B sees the new page. */
static bool flush_round(u64 control, u64 expect_result, u64 *result)
{
    if (!wait_iters(100) || sh.seen != magic[cur])
        return false;
    remap();
    *result = hv_hypercall(control, (u64)input, 0);
    /* Reads that start after the hypercall returned: the one in progress may still be old. */
    if (!wait_iters(3))
        return false;
    return *result == expect_result && sh.seen == magic[cur];
}

#define STORM 100
static volatile u32 storm_calls, storm_failures;

/* STORM flushes of all processors from the calling vCPU, each with its own input page. */
static void flush_storm(void *arg)
{
    (void)arg;
    u64 *in = alloc_pages(1);
    in[0] = 0;
    in[1] = FLUSH_ALL_SPACES | FLUSH_ALL_PROCESSORS;
    in[2] = 0;
    for (u32 i = 0; i < STORM; i++) {
        if (hv_hypercall(HVCALL_FLUSH_SPACE, (u64)in, 0) != 0)
            atomic_inc(&storm_failures);
        atomic_inc(&storm_calls);
    }
}

static void write_input(const u64 *words, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        input[i] = words[i];
}

/* bench=K mode=hv|apic|none: K "flush all other vCPUs" operations, each complete before the next: one
 * FlushVirtualAddressSpaceEx with format ALL (hv) or, as a guest without the enlightenment does it, a fixed IPI
 * to every other vCPU whose handler reloads CR3 and acknowledges, waited for (apic); none is the baseline. */
#define FLUSH_VEC 0xE1
static volatile u32 acks[256];

static void flush_ipi_handler(struct regs *r)
{
    (void)r;
    u64 cr3;
    asm volatile("mov %%cr3, %0" : "=r"(cr3));
    asm volatile("mov %0, %%cr3" ::"r"(cr3) : "memory");
    atomic_inc(&acks[smp_id()]);
    apic_eoi();
}

static void bench(u64 k)
{
    u32 n = nr_cpus();
    bool hv = arg_is("mode", "hv"), apic = arg_is("mode", "apic");
    const char *mode = hv ? "hv" : apic ? "apic" : "none";
    set_irq_handler(FLUSH_VEC, flush_ipi_handler);
    input[0] = 0;
    input[1] = FLUSH_ALL_SPACES;
    input[2] = VP_SET_ALL;
    input[3] = 0;
    bool ok = n <= 256;
    u64 t0 = rdtsc();
    for (u64 it = 1; it <= k && ok; it++) {
        if (hv) {
            ok = hv_hypercall(HVCALL_FLUSH_SPACE_EX, (u64)input, 0) == 0;
        } else if (apic) {
            for (u32 j = 1; j < n; j++)
                apic_send_ipi(j, FLUSH_VEC);
            u64 w0 = rdtsc();
            for (u32 j = 1; j < n && ok; j++)
                while (acks[j] < it && ok) {
                    if (rdtsc() - w0 > PATIENCE)
                        ok = false;
                    pause();
                }
        }
    }
    u64 ticks = rdtsc() - t0;
    printf("BENCH flush-all mode=%s vcpus=%u operations=%lu ticks_per_operation=%lu\n", mode, n, k, ticks / k);
    report(ok, "benchmark %s: %lu flushes of %u other vCPUs completed", mode, k, n - 1);
}

int main(void)
{
    smp_init();
    if (nr_cpus() < 2) {
        report_skip("needs 2 or more vCPUs, have %u", nr_cpus());
        return 0;
    }
    if (!hv_identified() || !hv_enable_hypercalls()) {
        report(false, "Hyper-V hypercalls are available");
        return 0;
    }
    input = alloc_pages(1);
    u64 bench_ops = arg_u64("bench", 0);
    if (bench_ops) {
        bench(bench_ops);
        return 0;
    }
    u64 rounds = arg_u64("rounds", 10);
    on_cpu(1, read_vp_index, NULL);
    u64 vp = b_vp_index;
    report(vp < 64, "B's VP index %lu fits the 64-bit processor mask", vp);
    u64 bit = 1ull << (vp & 63);

    u64 *pages = alloc_pages(2);
    page[0] = pages;
    page[1] = pages + 512;
    page[0][0] = MAGIC0;
    page[1][0] = MAGIC1;
    pte = pte_4k(TEST_VA);
    cur = 0;
    *pte = (u64)page[0] | PTE_P | PTE_RW | PTE_US;
    invlpg((void *)TEST_VA);
    sh.va = TEST_VA;
    on_cpu_async(1, reader_on_cpu, &sh);
    report(wait_iters(1000) && sh.seen == MAGIC0, "B reads the test page at CPL 3");

    /* Negative control: remap without a flush; B keeps the stale translation. */
    if (!wait_iters(100))
        report(false, "B keeps running");
    remap();
    u64 t0 = rdtsc();
    bool waited = wait_iters(STALE_ITERS);
    report_info("B made %u reads in %lu TSC ticks; it reads 0x%lx", STALE_ITERS, rdtsc() - t0, sh.seen);
    bool stale = waited && sh.seen == magic[cur ^ 1];
    report(stale, "negative control: without a flush B still reads the old page after %u reads", STALE_ITERS);
    if (!stale)
        report_info("the flush results below are UNVERIFIED (no stale translation without a flush)");
    /* Resynchronise B with a flush of every processor. */
    write_input((u64[]){0, FLUSH_ALL_SPACES | FLUSH_ALL_PROCESSORS, 0}, 3);
    u64 r = hv_hypercall(HVCALL_FLUSH_SPACE, (u64)input, 0);
    report(r == 0 && wait_iters(3) && sh.seen == magic[cur], "resynchronised by a flush of all processors");

    struct {
        const char *name;
        u64 control;
        u64 words[8];
        unsigned nwords;
        u64 result;
    } cases[] = {
        {"FlushVirtualAddressSpace, processor mask = B", HVCALL_FLUSH_SPACE, {0, FLUSH_ALL_SPACES, bit}, 3, 0},
        {"FlushVirtualAddressSpace, HV_FLUSH_ALL_PROCESSORS", HVCALL_FLUSH_SPACE,
         {0, FLUSH_ALL_SPACES | FLUSH_ALL_PROCESSORS, 0}, 3, 0},
        {"FlushVirtualAddressSpace, empty mask (= all)", HVCALL_FLUSH_SPACE, {0, 0, 0}, 3, 0},
        {"FlushVirtualAddressList, 1 GVA, mask = B", HVCALL_FLUSH_LIST | REP_CNT(1),
         {0, FLUSH_ALL_SPACES, bit, TEST_VA}, 4, REP_CNT(1)},
        {"FlushVirtualAddressList, 2 entries with a page range", HVCALL_FLUSH_LIST | REP_CNT(2),
         {0, 0, bit, 0x70000000ull | 3, (TEST_VA - 0x1000) | 2}, 5, REP_CNT(2)},
        {"FlushVirtualAddressSpaceEx, sparse set {B}", HVCALL_FLUSH_SPACE_EX | VAR_CNT(1),
         {0, FLUSH_ALL_SPACES, VP_SET_SPARSE, 1ull << (vp / 64), bit}, 5, 0},
        {"FlushVirtualAddressSpaceEx, format ALL", HVCALL_FLUSH_SPACE_EX, {0, 0, VP_SET_ALL, 0}, 4, 0},
        {"FlushVirtualAddressListEx, sparse set {B}, GVA after the bank",
         HVCALL_FLUSH_LIST_EX | VAR_CNT(1) | REP_CNT(1),
         {0, FLUSH_ALL_SPACES, VP_SET_SPARSE, 1ull << (vp / 64), bit, TEST_VA}, 6, REP_CNT(1)},
        {"FlushVirtualAddressListEx, format ALL", HVCALL_FLUSH_LIST_EX | REP_CNT(1),
         {0, FLUSH_ALL_SPACES, VP_SET_ALL, 0, TEST_VA}, 5, REP_CNT(1)},
    };
    for (unsigned c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        write_input(cases[c].words, cases[c].nwords);
        unsigned ok = 0;
        u64 result = 0;
        for (u64 i = 0; i < rounds; i++)
            ok += flush_round(cases[c].control, cases[c].result, &result);
        report(ok == rounds, "%s: B sees the new page after every flush (%u/%lu, result 0x%lx)%s", cases[c].name,
               ok, rounds, result, stale ? "" : " [unverified]");
    }
    sh.stop = 1;

    /* Every vCPU flushes all the others at the same time: nobody may wait for a vCPU that waits for it. */
    u32 n = nr_cpus();
    for (u32 c = 1; c < n; c++)
        on_cpu_async(c, flush_storm, NULL);
    flush_storm(NULL);
    t0 = rdtsc();
    bool done = false;
    while (!done && rdtsc() - t0 < 20 * PATIENCE) {
        done = true;
        for (u32 c = 1; c < n; c++)
            done &= cpu_idle(c);
        pause();
    }
    report(done && storm_failures == 0 && storm_calls == STORM * n,
           "concurrent flushes: %u vCPUs flushing each other, %u calls, %u failures, no deadlock", n, storm_calls,
           storm_failures);
    return 0;
}

/*
 * Hostile use of the hypercall page (issue 10).
 *
 * race (default, -smp 2+): CPU 1 calls through the hypercall page in a loop while CPU 0 keeps rewriting that
 * page with other code, re-enables the HYPERCALL MSR on it (the VMM rewrites it), moves it to another page,
 * disables it and clears GUEST_OS_ID. Every call must end in one of the outcomes the bytes in the page at that
 * moment allow: the hypercall's status (2 for the unknown code used), -KVM_ENOSYS while GUEST_OS_ID is 0, or what
 * the replacement code does (#UD from `ud2`, `mov al, 0x77`, `in al, 0xE4`; the exception
 * handlers below return to the caller with a marker in RAX). Never a VMM crash or hang.
 *
 * hammer (mode=hammer iters=N, any -smp up to 1024): every CPU makes N rounds of three hypercalls through the
 * same page at once (NotifyLongSpinWait, an unknown code, a fast SendSyntheticClusterIpi to nobody); each must
 * return its exact status.
 *
 * Needs -cpu host,hv-passthrough (hv-vpindex and hv-ipi at least).
 */
#include "hv.h"

#define UNKNOWN_CODE 0x7FFFul
#define SENTINEL 0x5E5E5E5E5E5E5E00ul
#define MARK_UD 0x0D0D0D0D0D0D0D06ul
#define KVM_ENOSYS ((u64)-1000l)
#define NPAGES 4

/* First 8 bytes of the page; every variant has `ret` at offset 2, so a call that ran the 2-byte first
 * instruction of one version and then fetched offset 2 of another still returns. Only instructions this host's
 * instruction emulator executes are used: guest ring 0 is emulated here, and an opcode the emulator does not
 * know (int3, undefined opcodes such as FE /7, MMX) ends the VM with an emulation failure instead of raising an
 * exception in the guest. versions[0] is the one the page holds when the VMM rewrites it in place (`E6 E4 C3`,
 * in ascending order), so that a fetch torn against that rewrite still decodes to something harmless: B0 E4 is
 * `mov al, 0xE4`, E6 77 an `out` to an unhandled port. */
static const u64 versions[] = {
    0xCCCCCCCCCCC377B0ul, /* mov al, 0x77; ret */
    0xCCCCCCCCCCC30B0Ful, /* ud2; ret */
    0xCCCCCCCCCCC3E4E4ul, /* in al, 0xE4 (a read of the hypercall port); ret */
};

static u8 *pages[NPAGES];
static u8 *volatile cur;
static volatile u32 done;

struct tally {
    u64 ok, enosys, ud, mov, in, no_exit, other, last_other;
};
static struct tally tally;

static bool in_pages(u64 rip)
{
    for (unsigned i = 0; i < NPAGES; i++)
        if (rip >= (u64)pages[i] && rip < (u64)pages[i] + 4096)
            return true;
    return false;
}

/* #UD inside a hypercall page: return to the caller (emulate `ret`) with a marker in RAX. */
static void page_fault_handler(struct regs *r)
{
    if (!in_pages(r->rip))
        fail("exception %lu at rip %lx outside the hypercall pages", r->vector, r->rip);
    r->rax = MARK_UD;
    r->rip = *(u64 *)r->rsp;
    r->rsp += 8;
}

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
        else if (r == MARK_UD)
            t.ud++;
        else if (r == (SENTINEL | 0x77))
            t.mov++;
        else if (r == (SENTINEL | 0xFF))
            t.in++; /* `in al, 0xE4`: the port is write-only, reads give all-ones */
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
    set_irq_handler(6, page_fault_handler);
    wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX);
    wrmsr(HV_MSR_HYPERCALL, (u64)pages[0] | 1);
    cur = pages[0];
    report(call_page(cur, UNKNOWN_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE, "the page works before the race");

    on_cpu_async(1, hammer_race, (void *)calls);
    u64 steps = 0, moves = 0;
    unsigned next = 1;
    while (!READ_ONCE(done)) {
        u8 *p = cur;
        switch (steps++ % 9) {
        case 0:
            set_first_qword(p, versions[1]);
            break;
        case 1:
            set_first_qword(p, versions[2]);
            break;
        case 2:
            set_first_qword(p, versions[0]); /* right before the in-place rewrite */
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
            for (unsigned o = 4096; o > 0; o -= 8)
                WRITE_ONCE(*(volatile u64 *)(p + o - 8), 0x0B0F0B0F0B0F0B0Ful); /* ud2 everywhere */
            break;
        case 6:
            wrmsr(HV_MSR_HYPERCALL, 0); /* disabled: the code stays, calls still work (KVM) */
            break;
        case 7: {
            u8 *q = pages[next++ % NPAGES];
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
    report_info("race: %lu calls: %lu status 2, %lu -KVM_ENOSYS, %lu #UD, %lu mov, %lu in, %lu torn, "
                "%lu other; %lu rewrites, %lu moves",
                calls, t.ok, t.enosys, t.ud, t.mov, t.in, t.no_exit, t.other, steps, moves);
    report(t.other == 0, "every call ended with the status or what the bytes in the page do (other: %lu, last %lx)",
           t.other, t.last_other);
    report(t.ok + t.enosys + t.ud + t.mov + t.in + t.no_exit + t.other == calls && t.ok > 0 && steps > 9,
           "CPU 1 made all %lu calls while CPU 0 rewrote the page %lu times", calls, steps);
    wrmsr(HV_MSR_HYPERCALL, (u64)cur | 1);
    report(call_page(cur, UNKNOWN_CODE, 0, 0) == HV_STATUS_INVALID_HYPERCALL_CODE,
           "re-enabling the page makes it work again");
    set_irq_handler(6, NULL);
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

int main(void)
{
    smp_init();
    if (arg_is("mode", "hammer"))
        hammer(arg_u64("iters", 4));
    else if (nr_cpus() < 2)
        report_skip("the race needs -smp 2");
    else
        race(arg_u64("calls", 3000));
    return 0;
}

/*
 * The Hyper-V hypercall ABI through the page the VMM wrote (64-bit convention): statuses for unknown codes,
 * reserved control bits, misaligned GPAs and GPAs outside RAM, NotifyLongSpinWait, garbage in unused registers,
 * and every register except RAX preserved across the call, and the return path (the VMM may perform the page's
 * `ret` itself: RSP restored, the return address read across two pages in distant frames, no `ret` folded when
 * the byte after the `out` is something else).
 * Arguments: `synic=1` when hv-synic is on (PostMessage checks), `spin=N` the expected NotifyLongSpinWait status
 * (0, or 6 = ACCESS_DENIED under hv-enforce-cpuid without hv-spinlocks).
 */
#include "rt.h"
#include "hv.h"

struct gprs {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
};

/* hv_call_gprs(page, in, out): loads every GPR from *in, calls the page, stores every GPR to *out. */
void hv_call_gprs(void *page, const struct gprs *in, struct gprs *out);
asm(".text\n"
    ".global hv_call_gprs\n"
    "hv_call_gprs:\n"
    "  push %rbx\n  push %rbp\n  push %r12\n  push %r13\n  push %r14\n  push %r15\n"
    "  push %rdx\n" /* out */
    "  push %rdi\n" /* page */
    "  mov 8(%rsi), %rbx\n  mov 16(%rsi), %rcx\n  mov 24(%rsi), %rdx\n  mov 40(%rsi), %rdi\n"
    "  mov 48(%rsi), %rbp\n  mov 56(%rsi), %r8\n  mov 64(%rsi), %r9\n  mov 72(%rsi), %r10\n"
    "  mov 80(%rsi), %r11\n  mov 88(%rsi), %r12\n  mov 96(%rsi), %r13\n  mov 104(%rsi), %r14\n"
    "  mov 112(%rsi), %r15\n  mov 0(%rsi), %rax\n  mov 32(%rsi), %rsi\n"
    "  call *(%rsp)\n"
    "  push %rax\n"
    "  mov 16(%rsp), %rax\n" /* out */
    "  mov %rbx, 8(%rax)\n  mov %rcx, 16(%rax)\n  mov %rdx, 24(%rax)\n  mov %rsi, 32(%rax)\n"
    "  mov %rdi, 40(%rax)\n  mov %rbp, 48(%rax)\n  mov %r8, 56(%rax)\n  mov %r9, 64(%rax)\n"
    "  mov %r10, 72(%rax)\n  mov %r11, 80(%rax)\n  mov %r12, 88(%rax)\n  mov %r13, 96(%rax)\n"
    "  mov %r14, 104(%rax)\n  mov %r15, 112(%rax)\n"
    "  pop %rbx\n  mov %rbx, 0(%rax)\n"
    "  add $16, %rsp\n"
    "  pop %r15\n  pop %r14\n  pop %r13\n  pop %r12\n  pop %rbp\n  pop %rbx\n"
    "  ret\n");

/* hv_call_on_stack(page, top, control, rsp_after): switches RSP to `top`, calls `page` with RCX = control and
 * RDX = R8 = 0, stores RSP right after the call into *rsp_after, switches back and returns RAX. */
u64 hv_call_on_stack(void *page, void *top, u64 control, u64 *rsp_after);
asm(".text\n"
    ".global hv_call_on_stack\n"
    "hv_call_on_stack:\n"
    "  push %rbx\n"
    "  mov %rsp, %rbx\n"
    "  mov %rcx, %r9\n"
    "  mov %rdx, %rcx\n"
    "  xor %edx, %edx\n"
    "  xor %r8d, %r8d\n"
    "  mov %rsi, %rsp\n"
    "  call *%rdi\n"
    "  mov %rsp, (%r9)\n"
    "  mov %rbx, %rsp\n"
    "  pop %rbx\n"
    "  ret\n");

/* The return path through `page` with the stack top at `top`: the call returns right after itself (or the test
 * would crash) with RSP back at `top` and RAX = `expect`. */
static void check_return(const char *what, void *page, void *top, u64 expect)
{
    u64 after = 0;
    u64 rax = hv_call_on_stack(page, top, 0x7FFF, &after);
    report(after == (u64)top && rax == expect, "%s: RSP after the call %lx (expected %lx), RAX %lx (expected %lx)",
           what, after, (u64)top, rax, expect);
}

static void check_return_paths(void)
{
    u8 *stack = alloc_pages(3);
    check_return("return path, stack in one page", hv_hypercall_page, stack + 2048,
                 HV_STATUS_INVALID_HYPERCALL_CODE);
    /* The second stack page maps the third page's frame: the return address the `call` pushes straddles two
     * pages whose frames are not adjacent, and whoever performs the `ret` must read it through the page tables. */
    u64 *pte = pte_4k((u64)stack + 4096);
    u64 saved = *pte;
    *pte = ((u64)stack + 8192) | PTE_P | PTE_RW;
    invlpg(stack + 4096);
    for (unsigned split = 1; split < 8; split++)
        check_return("return path, return address split across two distant frames", hv_hypercall_page,
                     stack + 4096 + 8 - split, HV_STATUS_INVALID_HYPERCALL_CODE);
    *pte = saved;
    invlpg(stack + 4096);
    /* A page whose `out` is followed by `mov al, 0x77; ret`: the instruction after the `out` must run. */
    u8 *other = alloc_pages(1);
    memset(other, 0xCC, 4096);
    static const u8 code[] = {0xE6, 0xE4, 0xB0, 0x77, 0xC3};
    memcpy(other, code, sizeof(code));
    check_return("`out` followed by `mov al, 0x77; ret`", other, stack + 2048, 0x77);
}

static const char *const names[] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                    "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};

static void check_preserved(const char *what, u64 control, u64 rdx, u64 r8, u64 expect_status)
{
    struct gprs in, out;
    u64 *pi = (u64 *)&in, *po = (u64 *)&out;
    for (unsigned i = 0; i < 15; i++)
        pi[i] = 0x1111111111111111ul * (i + 1) ^ 0x0F0F0F0F00000000ul;
    in.rcx = control;
    in.rdx = rdx;
    in.r8 = r8;
    memset(&out, 0, sizeof(out));
    hv_call_gprs(hv_hypercall_page, &in, &out);
    bool ok = out.rax == expect_status;
    for (unsigned i = 1; i < 15; i++) {
        if (po[i] != pi[i]) {
            report(false, "%s: %s changed from %lx to %lx", what, names[i], pi[i], po[i]);
            ok = false;
        }
    }
    report(ok, "%s: status %lx (expected %lx), every register but RAX preserved", what, out.rax, expect_status);
}

int main(void)
{
    if (!hv_enable_hypercalls())
        fail("cannot enable the hypercall page");
    bool synic = arg_u64("synic", 0) != 0;
    u64 spin = arg_u64("spin", 0);
    u64 *buf = alloc_pages(1);
    u64 ram = fw_cfg_ram_size();
    u64 outside = ram + (1ul << 32); /* beyond RAM (and the PCI hole) */

    check_preserved("unknown code 0x7fff (slow)", 0x7FFF, (u64)buf, (u64)buf, HV_STATUS_INVALID_HYPERCALL_CODE);
    check_preserved("unknown code 0x7fff (fast)", 0x7FFF | HV_HYPERCALL_FAST, 0xDEAD, 0xBEEF,
                    HV_STATUS_INVALID_HYPERCALL_CODE);
    check_preserved("NotifyLongSpinWait with garbage RDX/R8", HVCALL_NOTIFY_LONG_SPIN_WAIT, 0xFFFFFFFFFFFFFFF1ul,
                    0x8000000000000007ul, spin);

    static const unsigned reserved[] = {27, 28, 31, 44, 47, 60, 63};
    for (unsigned i = 0; i < ARRAY_SIZE(reserved); i++) {
        u64 st = hv_hypercall(0x7FFF | (1ul << reserved[i]), 0, 0);
        report(st == HV_STATUS_INVALID_HYPERCALL_INPUT || (spin == HV_STATUS_ACCESS_DENIED && st == spin),
               "reserved control bit %u: status %lx (expected 3)", reserved[i], st);
    }
    u64 st = hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT | (1ul << 32), 0, 0);
    report(st == (spin ? spin : HV_STATUS_INVALID_HYPERCALL_INPUT),
           "NotifyLongSpinWait with a rep count: status %lx", st);

    /* SignalEvent (slow) reads an 8-byte input parameter: misaligned or unmapped GPAs are INVALID_ALIGNMENT
     * (KVM's order), and R8 (unused) may hold anything. */
    st = hv_hypercall(HVCALL_SIGNAL_EVENT, (u64)buf + 4, 0x123);
    report(st == HV_STATUS_INVALID_ALIGNMENT, "SignalEvent with a misaligned input GPA: status %lx (expected 4)", st);
    st = hv_hypercall(HVCALL_SIGNAL_EVENT, (u64)buf + 4096 - 4, 0);
    report(st == HV_STATUS_INVALID_ALIGNMENT, "SignalEvent with an input crossing a page: status %lx (expected 4)",
           st);
    st = hv_hypercall(HVCALL_SIGNAL_EVENT, outside, 0);
    report(st == HV_STATUS_INVALID_ALIGNMENT, "SignalEvent with an input GPA outside RAM: status %lx (expected 4)",
           st);
    if (synic) {
        buf[0] = 0x77; /* connection id, nobody listens */
        st = hv_hypercall(HVCALL_POST_MESSAGE, (u64)buf + 4, 0xFFFFFFFFFFFFFFFFul);
        report(st == HV_STATUS_INVALID_ALIGNMENT, "PostMessage with a misaligned input GPA: status %lx (expected 4)",
               st);
        st = hv_hypercall(HVCALL_POST_MESSAGE, outside, 0xFFFFFFFFFFFFFFFFul);
        report(st == HV_STATUS_INSUFFICIENT_MEMORY,
               "PostMessage with an input GPA outside RAM: status %lx (expected 0xb)", st);
    } else {
        st = hv_hypercall(HVCALL_POST_MESSAGE, (u64)buf, 0);
        report(st == HV_STATUS_INVALID_HYPERCALL_INPUT, "PostMessage without hv-synic: status %lx (expected 3)", st);
    }
    check_return_paths();

    /* Many calls in a row: the VMM never loses the return path. */
    bool all = true;
    for (unsigned i = 0; i < 200; i++)
        all &= hv_hypercall(0x7FFF, i * 8, i) == HV_STATUS_INVALID_HYPERCALL_CODE;
    report(all, "200 consecutive calls through the page");
    return 0;
}

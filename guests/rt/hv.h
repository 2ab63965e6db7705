/*
 * Hyper-V helpers for guest programs: MSR numbers, CPUID feature bits, hypercall-page setup and calls through
 * the page (the page the VMM writes is `out 0xE4, al; ret`, so the call must go through the page, never a raw
 * VMCALL), and the reference TSC page formula.
 */
#ifndef HV_H
#define HV_H

#include "rt.h"

#define HV_MSR_GUEST_OS_ID 0x40000000
#define HV_MSR_HYPERCALL 0x40000001
#define HV_MSR_VP_INDEX 0x40000002
#define HV_MSR_RESET 0x40000003
#define HV_MSR_VP_RUNTIME 0x40000010
#define HV_MSR_TIME_REF_COUNT 0x40000020
#define HV_MSR_REFERENCE_TSC 0x40000021
#define HV_MSR_TSC_FREQUENCY 0x40000022
#define HV_MSR_APIC_FREQUENCY 0x40000023
#define HV_MSR_CRASH_P0 0x40000100
#define HV_MSR_CRASH_CTL 0x40000105
#define HV_MSR_REENLIGHTENMENT_CONTROL 0x40000106
#define HV_MSR_TSC_EMULATION_CONTROL 0x40000107
#define HV_MSR_TSC_EMULATION_STATUS 0x40000108

#define HV_CRASH_CTL_NOTIFY (1ul << 63)

/* CPUID 0x40000003 EAX */
#define HV_EAX_VP_RUNTIME (1u << 0)
#define HV_EAX_TIME_REF_COUNT (1u << 1)
#define HV_EAX_SYNIC (1u << 2)
#define HV_EAX_HYPERCALL (1u << 5)
#define HV_EAX_VP_INDEX (1u << 6)
#define HV_EAX_RESET (1u << 7)
#define HV_EAX_REFERENCE_TSC (1u << 9)
#define HV_EAX_FREQUENCY_MSRS (1u << 11)
#define HV_EAX_REENLIGHTENMENT (1u << 13)
/* CPUID 0x40000003 EDX */
#define HV_EDX_CRASH_MSRS (1u << 10)

/* Hypercall status codes. */
#define HV_STATUS_SUCCESS 0
#define HV_STATUS_INVALID_HYPERCALL_CODE 2
#define HV_STATUS_INVALID_HYPERCALL_INPUT 3
#define HV_STATUS_INVALID_ALIGNMENT 4
#define HV_STATUS_ACCESS_DENIED 6
#define HV_STATUS_INSUFFICIENT_MEMORY 11

#define HVCALL_NOTIFY_LONG_SPIN_WAIT 0x0008
#define HVCALL_POST_MESSAGE 0x005C
#define HVCALL_SIGNAL_EVENT 0x005D
#define HV_HYPERCALL_FAST (1ul << 16)

/* A Linux-style guest OS id (open source, Linux). */
#define HV_GUEST_OS_ID_LINUX 0x8100000000000000ul

/* Whether CPUID says Hyper-V ("Hv#1"). */
static inline bool hv_identified(void)
{
    return cpuid(0x1).c >> 31 && cpuid(0x40000001).a == 0x31237648;
}

static inline u32 hv_features_eax(void) { return hv_identified() ? cpuid(0x40000003).a : 0; }
static inline u32 hv_features_edx(void) { return hv_identified() ? cpuid(0x40000003).d : 0; }

/* The hypercall page (set by hv_enable_hypercalls). Header-only: one copy per program. */
static void *hv_hypercall_page __attribute__((unused));

/* Writes GUEST_OS_ID (Linux) and enables the hypercall page in a fresh page. Returns the page or NULL on #GP. */
static inline void *hv_enable_hypercalls(void)
{
    void *page = alloc_pages(1);
    memset(page, 0xCC, 4096);
    if (wrmsr_safe(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_LINUX))
        return NULL;
    if (wrmsr_safe(HV_MSR_HYPERCALL, (u64)page | 1))
        return NULL;
    hv_hypercall_page = page;
    return page;
}

/* A 64-bit hypercall through the page: RCX control, RDX input (GPA or fast value), R8 output. Returns RAX. */
static inline u64 hv_hypercall(u64 control, u64 input, u64 output)
{
    u64 status;
    register u64 r8 asm("r8") = output;
    asm volatile("call *%[page]"
                 : "=a"(status), "+c"(control), "+d"(input), "+r"(r8)
                 : [page] "m"(hv_hypercall_page)
                 : "cc", "memory");
    return status;
}

/* The reference TSC page. */
struct hv_tsc_page {
    volatile u32 sequence;
    u32 reserved;
    volatile u64 scale;
    volatile s64 offset;
};

/* ((tsc * scale) >> 64) + offset without 128-bit division (mul gives the high half). */
static inline u64 hv_scale_tsc(u64 tsc, u64 scale, s64 offset)
{
    u64 hi, lo;
    asm("mulq %3" : "=d"(hi), "=a"(lo) : "a"(tsc), "rm"(scale));
    (void)lo;
    return hi + (u64)offset;
}

/* Reads reference time from the page; returns false if the page is invalid (sequence 0 or 0xFFFFFFFF). Works at
 * CPL 3 (no exit). */
static inline bool hv_tsc_page_read(const struct hv_tsc_page *p, u64 *out)
{
    for (;;) {
        u32 seq = p->sequence;
        if (seq == 0 || seq == 0xFFFFFFFF)
            return false;
        barrier();
        u64 scale = p->scale;
        s64 offset = p->offset;
        u64 tsc = rdtsc();
        barrier();
        if (p->sequence == seq) {
            *out = hv_scale_tsc(tsc, scale, offset);
            return true;
        }
    }
}

#endif

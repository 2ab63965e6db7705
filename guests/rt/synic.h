/*
 * SynIC, synthetic timer and hv-vapic helpers for guest programs (header-only, like hv.h): MSR numbers, the
 * message and event-flag page layouts, PostMessage / SignalEvent through the hypercall page, and QEMU's
 * hyperv-testdev commands at port 0x3000.
 */
#ifndef SYNIC_H
#define SYNIC_H

#include "hv.h"

#define HV_MSR_SCONTROL 0x40000080
#define HV_MSR_SVERSION 0x40000081
#define HV_MSR_SIEFP 0x40000082
#define HV_MSR_SIMP 0x40000083
#define HV_MSR_EOM 0x40000084
#define HV_MSR_SINT0 0x40000090
#define HV_MSR_STIMER0_CONFIG 0x400000B0
#define HV_MSR_STIMER0_COUNT 0x400000B1
#define HV_MSR_EOI 0x40000070
#define HV_MSR_ICR 0x40000071
#define HV_MSR_TPR 0x40000072
#define HV_MSR_VP_ASSIST_PAGE 0x40000073

#define HV_SINT_MASKED (1ul << 16)
#define HV_SINT_AUTO_EOI (1ul << 17)

#define HV_STIMER_ENABLE (1ul << 0)
#define HV_STIMER_PERIODIC (1ul << 1)
#define HV_STIMER_LAZY (1ul << 2)
#define HV_STIMER_AUTO_ENABLE (1ul << 3)
#define HV_STIMER_VECTOR(v) ((u64)(v) << 4)
#define HV_STIMER_DIRECT (1ul << 12)
#define HV_STIMER_SINT(s) ((u64)(s) << 16)

/* CPUID 0x40000003 EAX / EDX */
#define HV_EAX_SYNTIMERS (1u << 3)
#define HV_EAX_APIC_ACCESS (1u << 4)
#define HV_EDX_STIMER_DIRECT (1u << 19)
/* CPUID 0x40000003 EBX */
#define HV_EBX_POST_MESSAGES (1u << 4)
#define HV_EBX_SIGNAL_EVENTS (1u << 5)

#define HV_STATUS_INVALID_PARAMETER 5
#define HV_STATUS_INVALID_PORT_ID 17
#define HV_STATUS_INVALID_CONNECTION_ID 18
#define HV_STATUS_INSUFFICIENT_BUFFERS 19

#define HVMSG_NONE 0u
#define HVMSG_TIMER_EXPIRED 0x80000010u
#define HV_MSG_FLAG_PENDING 1u

struct hv_message {
    volatile u32 type;
    volatile u8 size;
    volatile u8 flags;
    u8 reserved[2];
    volatile u64 sender;
    volatile u8 payload[240];
};

/* HVMSG_TIMER_EXPIRED payload. */
struct hv_timer_payload {
    u32 timer;
    u32 reserved;
    u64 expiration;
    u64 delivery;
};

/* HvCallPostMessage input (256 bytes, 8-aligned). */
struct hv_post_message_input {
    u32 connection_id;
    u32 reserved;
    u32 message_type;
    u32 payload_size;
    u8 payload[240];
};

/* ---- hyperv-testdev (QEMU) */
#define HV_TESTDEV_PORT 0x3000
enum {
    HVT_SINT_ROUTE_CREATE = 1,
    HVT_SINT_ROUTE_DESTROY = 2,
    HVT_SINT_ROUTE_SET_SINT = 3,
    HVT_MSG_CONN_CREATE = 4,
    HVT_MSG_CONN_DESTROY = 5,
    HVT_EVT_CONN_CREATE = 6,
    HVT_EVT_CONN_DESTROY = 7,
    /* enlighten extension: latch VP `vp`'s KVM exit count, read back as two 32-bit reads (low, high). */
    HVT_LATCH_EXITS = 0x80,
};

static inline void hvt_cmd(u8 cmd, u8 vp, u8 sint, u8 conn)
{
    outl(HV_TESTDEV_PORT, (u32)sint | ((u32)vp << 8) | ((u32)cmd << 16) | ((u32)conn << 24));
}

/* KVM exits of VP `vp` so far (enlighten only; 0 under QEMU). The latch write and the two reads are 3 exits. */
static inline u64 hvt_exit_count(u8 vp)
{
    hvt_cmd(HVT_LATCH_EXITS, vp, 0, 0);
    u64 lo = inl(HV_TESTDEV_PORT);
    u64 hi = inl(HV_TESTDEV_PORT);
    return lo | (hi << 32);
}

static inline u64 hv_post_message(struct hv_post_message_input *in)
{
    return hv_hypercall(HVCALL_POST_MESSAGE, (u64)in, 0) & 0xFFFF;
}

static inline u64 hv_signal_event_fast(u32 conn, u16 flag)
{
    return hv_hypercall(HVCALL_SIGNAL_EVENT | HV_HYPERCALL_FAST, (u64)conn | ((u64)flag << 32), 0) & 0xFFFF;
}

static inline u64 hv_ref_time(void) { return rdmsr(HV_MSR_TIME_REF_COUNT); }

/* Enables this CPU's SynIC: SCONTROL = 1, SIMP and SIEFP at the given pages (may be NULL to leave one off). */
static inline void synic_enable(void *simp, void *siefp)
{
    wrmsr(HV_MSR_SCONTROL, 1);
    if (simp)
        wrmsr(HV_MSR_SIMP, (u64)simp | 1);
    if (siefp)
        wrmsr(HV_MSR_SIEFP, (u64)siefp | 1);
}

static inline void synic_set_sint(unsigned sint, u8 vector, bool auto_eoi)
{
    wrmsr(HV_MSR_SINT0 + sint, vector | (auto_eoi ? HV_SINT_AUTO_EOI : 0));
}

static inline void synic_mask_all(void)
{
    for (unsigned i = 0; i < 16; i++)
        wrmsr(HV_MSR_SINT0 + i, HV_SINT_MASKED);
}

static inline void stimer_config(unsigned t, u64 config) { wrmsr(HV_MSR_STIMER0_CONFIG + 2 * t, config); }
static inline void stimer_count(unsigned t, u64 count) { wrmsr(HV_MSR_STIMER0_COUNT + 2 * t, count); }

/* Waits with interrupts enabled until *flag reaches `want` or `tsc_timeout` TSC ticks passed; returns whether it
 * did. Interrupts stay enabled for the whole wait and are disabled again on return. Each iteration makes one
 * exit (a read of port 0x80): this host's KVM emulates ring 0 and does not report the interrupt window opening
 * (after `sti` or `iret`) until the next exit, so an interrupt that became pending while IF was 0 would otherwise
 * wait for some unrelated exit. */
static inline bool wait_count(volatile u32 *flag, u32 want, u64 tsc_timeout)
{
    u64 end = rdtsc() + tsc_timeout;
    bool ok = true;
    sti();
    while (*flag < want) {
        if (rdtsc() > end) {
            ok = false;
            break;
        }
        (void)inb(0x80);
    }
    cli();
    return ok;
}

/* Spends `tsc_ticks` with interrupts enabled (exiting now and then, as wait_count does), then disables them. */
static inline void idle_for(u64 tsc_ticks)
{
    u64 end = rdtsc() + tsc_ticks;
    sti();
    while (rdtsc() < end)
        (void)inb(0x80);
    cli();
}

#endif

//! Synthetic MSR indexes and MSR value layouts.
//!
//! Indexes follow Linux `hyperv-tlfs.h` (values are the TLFS ones). Value layouts are [`bitfield_struct`] types over
//! `u64`; each one converts with `into_bits()` / `from_bits()`.

use bitfield_struct::bitfield;

/// GUEST_OS_ID: the guest's identity; writing it non-zero enables hypercalls.
pub const GUEST_OS_ID: u32 = 0x4000_0000;
/// HYPERCALL: hypercall page enable and location (see [`HypercallMsr`]).
pub const HYPERCALL: u32 = 0x4000_0001;
/// VP_INDEX: the VP index of the current virtual processor (read-only).
pub const VP_INDEX: u32 = 0x4000_0002;
/// RESET: writing 1 resets the partition.
pub const RESET: u32 = 0x4000_0003;
/// VP_RUNTIME: CPU time consumed by the VP, 100 ns units (read-only).
pub const VP_RUNTIME: u32 = 0x4000_0010;
/// TIME_REF_COUNT: partition reference time, 100 ns units (read-only).
pub const TIME_REF_COUNT: u32 = 0x4000_0020;
/// REFERENCE_TSC: reference TSC page enable and location (see [`ReferenceTscMsr`]).
pub const REFERENCE_TSC: u32 = 0x4000_0021;
/// TSC_FREQUENCY: guest TSC frequency in Hz (read-only).
pub const TSC_FREQUENCY: u32 = 0x4000_0022;
/// APIC_FREQUENCY: APIC timer frequency in Hz (read-only).
pub const APIC_FREQUENCY: u32 = 0x4000_0023;
/// EOI: x2APIC-style EOI register access (hv-vapic).
pub const EOI: u32 = 0x4000_0070;
/// ICR: x2APIC-style 64-bit ICR access (hv-vapic).
pub const ICR: u32 = 0x4000_0071;
/// TPR: x2APIC-style TPR access (hv-vapic).
pub const TPR: u32 = 0x4000_0072;
/// VP_ASSIST_PAGE: VP assist page enable and location (see [`VpAssistPageMsr`]).
pub const VP_ASSIST_PAGE: u32 = 0x4000_0073;
/// SCONTROL: SynIC control (bit 0 enable).
pub const SCONTROL: u32 = 0x4000_0080;
/// SVERSION: SynIC version (reads 1, read-only).
pub const SVERSION: u32 = 0x4000_0081;
/// SIEFP: SynIC event-flags page (see [`SynicPageMsr`]).
pub const SIEFP: u32 = 0x4000_0082;
/// SIMP: SynIC message page (see [`SynicPageMsr`]).
pub const SIMP: u32 = 0x4000_0083;
/// EOM: end of message (write-only in effect; reads 0).
pub const EOM: u32 = 0x4000_0084;
/// SINT0; SINTn = `SINT0 + n` for n in 0..16 (see [`SintMsr`]).
pub const SINT0: u32 = 0x4000_0090;
/// SINT15, the last SINT register.
pub const SINT15: u32 = 0x4000_009F;
/// Number of SINTs per VP.
pub const SINT_COUNT: usize = 16;
/// STIMER0_CONFIG; STIMERn_CONFIG = `STIMER0_CONFIG + 2n` (see [`StimerConfig`]).
pub const STIMER0_CONFIG: u32 = 0x4000_00B0;
/// STIMER0_COUNT; STIMERn_COUNT = `STIMER0_COUNT + 2n`.
pub const STIMER0_COUNT: u32 = 0x4000_00B1;
/// STIMER3_COUNT, the last synthetic timer register.
pub const STIMER3_COUNT: u32 = 0x4000_00B7;
/// Number of synthetic timers per VP.
pub const STIMER_COUNT: usize = 4;
/// GUEST_IDLE (not implemented by KVM: #GP).
pub const GUEST_IDLE: u32 = 0x4000_00F0;
/// SYNDBG_CONTROL.
pub const SYNDBG_CONTROL: u32 = 0x4000_00F1;
/// SYNDBG_STATUS.
pub const SYNDBG_STATUS: u32 = 0x4000_00F2;
/// SYNDBG_SEND_BUFFER.
pub const SYNDBG_SEND_BUFFER: u32 = 0x4000_00F3;
/// SYNDBG_RECV_BUFFER.
pub const SYNDBG_RECV_BUFFER: u32 = 0x4000_00F4;
/// SYNDBG_PENDING_BUFFER.
pub const SYNDBG_PENDING_BUFFER: u32 = 0x4000_00F5;
/// SYNDBG_OPTIONS.
pub const SYNDBG_OPTIONS: u32 = 0x4000_00FF;
/// CRASH_P0; CRASH_Pn = `CRASH_P0 + n` for n in 0..5.
pub const CRASH_P0: u32 = 0x4000_0100;
/// CRASH_P4, the last crash parameter.
pub const CRASH_P4: u32 = 0x4000_0104;
/// Number of crash parameter MSRs.
pub const CRASH_PARAM_COUNT: usize = 5;
/// CRASH_CTL (see [`CRASH_CTL_NOTIFY`]).
pub const CRASH_CTL: u32 = 0x4000_0105;
/// REENLIGHTENMENT_CONTROL (see [`ReenlightenmentControl`]).
pub const REENLIGHTENMENT_CONTROL: u32 = 0x4000_0106;
/// TSC_EMULATION_CONTROL.
pub const TSC_EMULATION_CONTROL: u32 = 0x4000_0107;
/// TSC_EMULATION_STATUS.
pub const TSC_EMULATION_STATUS: u32 = 0x4000_0108;
/// TSC_INVARIANT_CONTROL (bit 0 only).
pub const TSC_INVARIANT_CONTROL: u32 = 0x4000_0118;

/// CRASH_CTL bit 63 `HV_CRASH_CTL_CRASH_NOTIFY`: a guest write with it set reports a crash.
pub const CRASH_CTL_NOTIFY: u64 = 1 << 63;
/// TSC_INVARIANT_CONTROL bit 0: expose invariant TSC.
pub const TSC_INVARIANT_CONTROL_EXPOSE: u64 = 1;
/// Initial value of every SINT register: masked, vector 0.
pub const SINT_INITIAL: u64 = 1 << 16;
/// SVERSION read value.
pub const SYNIC_VERSION: u64 = 1;
/// Default APIC_FREQUENCY: 1 GHz (KVM's 1 ns APIC bus cycle).
pub const DEFAULT_APIC_FREQUENCY_HZ: u64 = 1_000_000_000;

/// The HYPERCALL MSR.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct HypercallMsr {
    /// Bit 0: enable the hypercall page.
    pub enable: bool,
    /// Bit 1: locked (TLFS: the MSR can no longer be changed).
    pub locked: bool,
    #[bits(10)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number of the hypercall page.
    #[bits(52)]
    pub gpn: u64,
}

/// The REFERENCE_TSC MSR.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct ReferenceTscMsr {
    /// Bit 0: enable the reference TSC page.
    pub enable: bool,
    #[bits(11)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number of the reference TSC page.
    #[bits(52)]
    pub gpn: u64,
}

/// The VP_ASSIST_PAGE MSR.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct VpAssistPageMsr {
    /// Bit 0: enable the VP assist page.
    pub enable: bool,
    #[bits(11)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number.
    #[bits(52)]
    pub gpn: u64,
}

/// SIMP and SIEFP.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SynicPageMsr {
    /// Bit 0: enable the page.
    pub enable: bool,
    #[bits(11)]
    pub reserved: u16,
    /// Bits 63:12: guest physical page number.
    #[bits(52)]
    pub gpn: u64,
}

/// SCONTROL.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SynicControl {
    /// Bit 0: enable the SynIC.
    pub enable: bool,
    #[bits(63)]
    pub reserved: u64,
}

/// SINT0..SINT15.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SintMsr {
    /// Bits 7:0: interrupt vector (16..=255 when unmasked).
    pub vector: u8,
    #[bits(8)]
    pub reserved1: u8,
    /// Bit 16: masked.
    pub masked: bool,
    /// Bit 17: auto-EOI.
    pub auto_eoi: bool,
    /// Bit 18: polling (stored, ignored).
    pub polling: bool,
    #[bits(45)]
    pub reserved2: u64,
}

/// STIMERn_CONFIG.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct StimerConfig {
    /// Bit 0: enable.
    pub enable: bool,
    /// Bit 1: periodic.
    pub periodic: bool,
    /// Bit 2: lazy (stored, ignored).
    pub lazy: bool,
    /// Bit 3: auto-enable on COUNT write.
    pub auto_enable: bool,
    /// Bits 11:4: APIC vector (direct mode).
    pub apic_vector: u8,
    /// Bit 12: direct mode.
    pub direct_mode: bool,
    #[bits(3)]
    pub reserved1: u8,
    /// Bits 19:16: SINT to post the expiry message to.
    #[bits(4)]
    pub sintx: u8,
    #[bits(44)]
    pub reserved2: u64,
}

/// REENLIGHTENMENT_CONTROL.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct ReenlightenmentControl {
    /// Bits 7:0: notification vector.
    pub vector: u8,
    #[bits(8)]
    pub reserved1: u8,
    /// Bit 16: enable notifications.
    pub enable: bool,
    #[bits(15)]
    pub reserved2: u16,
    /// Bits 63:32: target VP index.
    pub target_vp: u32,
}

/// TSC_EMULATION_CONTROL.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct TscEmulationControl {
    /// Bit 0: enable TSC access emulation.
    pub enabled: bool,
    #[bits(63)]
    pub reserved: u64,
}

/// TSC_EMULATION_STATUS.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct TscEmulationStatus {
    /// Bit 0: a migration is in progress.
    pub in_progress: bool,
    #[bits(63)]
    pub reserved: u64,
}

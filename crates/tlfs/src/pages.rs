//! Guest-visible page and message layouts: reference TSC page, SynIC message and event-flags pages, VP assist page,
//! hypercall input blocks.
//!
//! All layouts are little-endian and use [`zerocopy`] so that they can be read from and written to guest memory as
//! bytes.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Mask of the page-offset bits.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

/// Reference TSC page (first 24 bytes; the rest of the 4 KiB page is reserved).
/// Guest time in 100 ns units is `((tsc * tsc_scale) >> 64) + tsc_offset`.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ReferenceTscPage {
    /// Sequence number; 0 and [`TSC_SEQUENCE_INVALID`] mean "invalid, use the TIME_REF_COUNT MSR".
    pub tsc_sequence: u32,
    /// Reserved.
    pub reserved1: u32,
    /// 0.64 fixed-point multiplier.
    pub tsc_scale: u64,
    /// Signed offset in 100 ns units.
    pub tsc_offset: i64,
}

/// Offset of `tsc_sequence` in the reference TSC page.
pub const TSC_PAGE_SEQUENCE_OFFSET: u64 = 0;
/// Offset of `tsc_scale` in the reference TSC page.
pub const TSC_PAGE_SCALE_OFFSET: u64 = 8;
/// Offset of `tsc_offset` in the reference TSC page.
pub const TSC_PAGE_OFFSET_OFFSET: u64 = 16;
/// Sequence value that marks the page invalid (besides 0).
pub const TSC_SEQUENCE_INVALID: u32 = 0xFFFF_FFFF;

/// Size of one SynIC message slot.
pub const MESSAGE_SIZE: usize = 256;
/// Maximum payload of a SynIC message.
pub const MESSAGE_PAYLOAD_SIZE: usize = 240;
/// Size of one SINT's event-flag slot (2048 bits).
pub const EVENT_FLAGS_SLOT_SIZE: usize = 256;

/// Message type: empty slot.
pub const HVMSG_NONE: u32 = 0;
/// Message type: synthetic timer expired.
pub const HVMSG_TIMER_EXPIRED: u32 = 0x8000_0010;
/// Message header flag bit 0: another message is pending (write EOM after freeing the slot).
pub const MESSAGE_FLAG_PENDING: u8 = 1;

/// SynIC message header (16 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct MessageHeader {
    /// Message type ([`HVMSG_NONE`] when the slot is free).
    pub message_type: u32,
    /// Payload size in bytes (at most 240).
    pub payload_size: u8,
    /// Flags ([`MESSAGE_FLAG_PENDING`]).
    pub message_flags: u8,
    /// Reserved.
    pub reserved: [u8; 2],
    /// Sender / port id.
    pub sender: u64,
}

/// One SynIC message slot (256 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Message {
    /// Header.
    pub header: MessageHeader,
    /// Payload.
    pub payload: [u8; MESSAGE_PAYLOAD_SIZE],
}

/// Payload of [`HVMSG_TIMER_EXPIRED`] (24 bytes).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct TimerMessagePayload {
    /// Timer index (0..4).
    pub timer_index: u32,
    /// Reserved.
    pub reserved: u32,
    /// Scheduled expiration time (reference time, 100 ns).
    pub expiration_time: u64,
    /// Reference time at delivery.
    pub delivery_time: u64,
}

/// HvCallPostMessage input block (256 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PostMessageInput {
    /// Connection id (bits 23:0 valid).
    pub connection_id: u32,
    /// Reserved.
    pub reserved: u32,
    /// Message type.
    pub message_type: u32,
    /// Payload size (at most 240).
    pub payload_size: u32,
    /// Payload.
    pub payload: [u8; MESSAGE_PAYLOAD_SIZE],
}

/// Offset of the first u32 (`apic_assist`, the PV-EOI word) in the VP assist page.
pub const VP_ASSIST_APIC_ASSIST_OFFSET: u64 = 0;
/// Bit 0 of `apic_assist`: no EOI required (exit-less EOI).
pub const VP_ASSIST_NO_EOI_REQUIRED: u32 = 1;

/// VP set format: sparse 4K banks.
pub const VP_SET_SPARSE_4K: u64 = 0;
/// VP set format: all VPs.
pub const VP_SET_ALL: u64 = 1;
/// Flush flag: all processors.
pub const FLUSH_ALL_PROCESSORS: u64 = 1 << 0;
/// Flush flag: all virtual address spaces.
pub const FLUSH_ALL_VIRTUAL_ADDRESS_SPACES: u64 = 1 << 1;
/// Flush flag: non-global mappings only.
pub const FLUSH_NON_GLOBAL_MAPPINGS_ONLY: u64 = 1 << 2;
/// Flush flag: extended GVA range format.
pub const FLUSH_USE_EXTENDED_RANGE_FORMAT: u64 = 1 << 3;

/// Header of a sparse VP set (`hv_vpset`), followed by `popcount(valid_bank_mask)` u64 banks; bank *i* covers VPs
/// 64·i .. 64·i+63 and present banks are packed in ascending order.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct VpSetHeader {
    /// [`VP_SET_SPARSE_4K`] or [`VP_SET_ALL`].
    pub format: u64,
    /// Bit *i*: bank *i* is present.
    pub valid_bank_mask: u64,
}

/// HvCallFlushVirtualAddressSpace / List input header (the GVA list follows for the List form).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FlushInput {
    /// Address space (CR3) to flush.
    pub address_space: u64,
    /// `FLUSH_*` flags.
    pub flags: u64,
    /// VPs 0..63.
    pub processor_mask: u64,
}

/// HvCallFlushVirtualAddressSpaceEx / ListEx input header (a [`VpSetHeader`] and its banks follow, then the GVA
/// list for the ListEx form).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FlushExInput {
    /// Address space (CR3) to flush.
    pub address_space: u64,
    /// `FLUSH_*` flags.
    pub flags: u64,
}

/// HvCallSendSyntheticClusterIpi input.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendIpiInput {
    /// Interrupt vector (0x10..=0xFF).
    pub vector: u32,
    /// Reserved (must be 0 in the fast form).
    pub reserved: u32,
    /// VPs 0..63.
    pub cpu_mask: u64,
}

/// HvCallSendSyntheticClusterIpiEx input header (a [`VpSetHeader`] and its banks follow).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SendIpiExInput {
    /// Interrupt vector (0x10..=0xFF).
    pub vector: u32,
    /// Reserved.
    pub reserved: u32,
}

/// GVA list entry: bits 63:12 page, bits 11:0 number of additional pages.
pub const GVA_ADDITIONAL_PAGES_MASK: u64 = 0xFFF;

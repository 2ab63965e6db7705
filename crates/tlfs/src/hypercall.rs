//! Hypercall codes, the control word, result value and status codes.

use bitfield_struct::bitfield;

/// HvCallFlushVirtualAddressSpace.
pub const FLUSH_VIRTUAL_ADDRESS_SPACE: u16 = 0x0002;
/// HvCallFlushVirtualAddressList (rep).
pub const FLUSH_VIRTUAL_ADDRESS_LIST: u16 = 0x0003;
/// HvCallNotifyLongSpinWait.
pub const NOTIFY_LONG_SPIN_WAIT: u16 = 0x0008;
/// HvCallSendSyntheticClusterIpi.
pub const SEND_SYNTHETIC_CLUSTER_IPI: u16 = 0x000B;
/// HvCallFlushVirtualAddressSpaceEx.
pub const FLUSH_VIRTUAL_ADDRESS_SPACE_EX: u16 = 0x0013;
/// HvCallFlushVirtualAddressListEx (rep).
pub const FLUSH_VIRTUAL_ADDRESS_LIST_EX: u16 = 0x0014;
/// HvCallSendSyntheticClusterIpiEx.
pub const SEND_SYNTHETIC_CLUSTER_IPI_EX: u16 = 0x0015;
/// HvCallPostMessage.
pub const POST_MESSAGE: u16 = 0x005C;
/// HvCallSignalEvent.
pub const SIGNAL_EVENT: u16 = 0x005D;
/// HvCallPostDebugData.
pub const POST_DEBUG_DATA: u16 = 0x0069;
/// HvCallRetrieveDebugData.
pub const RETRIEVE_DEBUG_DATA: u16 = 0x006A;
/// HvCallResetDebugSession.
pub const RESET_DEBUG_SESSION: u16 = 0x006B;
/// First extended hypercall: HvExtCallQueryCapabilities.
pub const EXT_QUERY_CAPABILITIES: u16 = 0x8001;
/// HvExtCallGetBootZeroedMemory.
pub const EXT_GET_BOOT_ZEROED_MEMORY: u16 = 0x8002;
/// HvExtCallMemoryHeatHint.
pub const EXT_MEMORY_HEAT_HINT: u16 = 0x8003;
/// Last extended hypercall code KVM forwards (`HV_EXT_CALL_MAX`).
pub const EXT_CALL_MAX: u16 = 0x8041;

/// HV_STATUS_SUCCESS.
pub const STATUS_SUCCESS: u16 = 0;
/// HV_STATUS_INVALID_HYPERCALL_CODE.
pub const STATUS_INVALID_HYPERCALL_CODE: u16 = 2;
/// HV_STATUS_INVALID_HYPERCALL_INPUT.
pub const STATUS_INVALID_HYPERCALL_INPUT: u16 = 3;
/// HV_STATUS_INVALID_ALIGNMENT.
pub const STATUS_INVALID_ALIGNMENT: u16 = 4;
/// HV_STATUS_INVALID_PARAMETER.
pub const STATUS_INVALID_PARAMETER: u16 = 5;
/// HV_STATUS_ACCESS_DENIED.
pub const STATUS_ACCESS_DENIED: u16 = 6;
/// HV_STATUS_OPERATION_DENIED.
pub const STATUS_OPERATION_DENIED: u16 = 8;
/// HV_STATUS_INSUFFICIENT_MEMORY.
pub const STATUS_INSUFFICIENT_MEMORY: u16 = 11;
/// HV_STATUS_INVALID_PORT_ID.
pub const STATUS_INVALID_PORT_ID: u16 = 17;
/// HV_STATUS_INVALID_CONNECTION_ID.
pub const STATUS_INVALID_CONNECTION_ID: u16 = 18;
/// HV_STATUS_INSUFFICIENT_BUFFERS.
pub const STATUS_INSUFFICIENT_BUFFERS: u16 = 19;
/// HV_STATUS_NOT_ACKNOWLEDGED.
pub const STATUS_NOT_ACKNOWLEDGED: u16 = 20;
/// HV_STATUS_NO_DATA.
pub const STATUS_NO_DATA: u16 = 27;

/// Reserved control-word bits: 31:27 (bit 31 is "nested"), 47:44 and 63:60 (`HV_HYPERCALL_RSVD_MASK`).
pub const CONTROL_RESERVED_MASK: u64 = (0x1F << 27) | (0xF << 44) | (0xF << 60);
/// Bit offset of the rep count in the control word and of "reps completed" in the result.
pub const REP_COUNT_SHIFT: u32 = 32;
/// Maximum payload of HvCallPostMessage.
pub const MESSAGE_PAYLOAD_MAX: u32 = 240;
/// Size of the HvCallPostMessage input block.
pub const POST_MESSAGE_INPUT_SIZE: usize = 256;
/// Connection ids are 24 bits wide.
pub const CONNECTION_ID_MASK: u32 = 0x00FF_FFFF;
/// Number of event flags per SINT.
pub const EVENT_FLAGS_PER_SINT: u32 = 2048;

/// The hypercall input value (control word), RCX in 64-bit mode.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct Control {
    /// Bits 15:0: call code.
    pub code: u16,
    /// Bit 16: fast (register) input.
    pub fast: bool,
    /// Bits 26:17: variable header size in 8-byte units.
    #[bits(10)]
    pub var_header_size: u16,
    /// Bits 30:27: reserved.
    #[bits(4)]
    pub reserved1: u8,
    /// Bit 31: nested (reserved for guests of this hypervisor).
    pub nested: bool,
    /// Bits 43:32: rep count.
    #[bits(12)]
    pub rep_count: u16,
    /// Bits 47:44: reserved.
    #[bits(4)]
    pub reserved2: u8,
    /// Bits 59:48: rep start index.
    #[bits(12)]
    pub rep_start: u16,
    /// Bits 63:60: reserved.
    #[bits(4)]
    pub reserved3: u8,
}

/// The hypercall result value, RAX in 64-bit mode.
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct HypercallResult {
    /// Bits 15:0: status.
    pub status: u16,
    #[bits(16)]
    pub reserved1: u16,
    /// Bits 43:32: reps completed.
    #[bits(12)]
    pub reps_completed: u16,
    #[bits(20)]
    pub reserved2: u32,
}

/// HvCallSignalEvent input (fast: RDX; slow: 8 bytes at the input GPA).
#[bitfield(u64)]
#[derive(PartialEq, Eq)]
pub struct SignalEventInput {
    /// Bits 31:0: connection id (only 23:0 valid).
    pub connection_id: u32,
    /// Bits 47:32: flag number.
    pub flag_number: u16,
    /// Bits 63:48: reserved.
    pub reserved: u16,
}

/// Number of XMM registers (XMM0..5) that carry XMM fast input (`HV_HYPERCALL_MAX_XMM_REGISTERS`).
pub const MAX_XMM_REGISTERS: usize = 6;
/// Lowest vector HvCallSendSyntheticClusterIpi(Ex) accepts (`HV_IPI_LOW_VECTOR`).
pub const IPI_LOW_VECTOR: u32 = 0x10;
/// Highest vector HvCallSendSyntheticClusterIpi(Ex) accepts (`HV_IPI_HIGH_VECTOR`).
pub const IPI_HIGH_VECTOR: u32 = 0xFF;
/// Maximum number of sparse VP-set banks (64 banks × 64 VPs = VP indexes 0..4095).
pub const MAX_SPARSE_VP_BANKS: usize = 64;
/// VPs per sparse VP-set bank.
pub const VPS_PER_SPARSE_BANK: u32 = 64;
/// Largest GVA list KVM reads for the flush-list calls (its per-vCPU FIFO holds 16 entries, one kept for "flush
/// all"); longer lists are not read and become a full flush.
pub const TLB_FLUSH_LIST_MAX: u16 = 15;

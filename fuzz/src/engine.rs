//! The engine driver shared by the `msr_sequence`, `hypercall` and `synic_stimer` targets.
//!
//! A fuzz input is decoded with [`arbitrary::Unstructured`] into an engine configuration (vCPU count, VP-index
//! layout, guest CPUID view, hv-enforce-cpuid, SynIC activation, TSC frequency) and then a sequence of
//! operations: guest MSR reads and writes, hypercalls, guest stores to memory, clock advances with timer
//! expiries, device-side SynIC calls, reset, save/restore. Each target only changes how often each operation is
//! picked ([`Focus`]).
//!
//! After every operation the driver checks invariants that must hold whatever the guest did:
//! - no panic (any panic aborts under libFuzzer);
//! - the engine wrote guest memory only inside one page that the guest designated (hypercall page, reference TSC
//!   page, SIMP, SIEFP, VP assist page) before or after the operation, and reported each write with `mark_dirty`;
//! - every guest-memory access is at most a page long, and the memory model refuses (never performs) accesses
//!   outside its RAM ([`crate::platform`]);
//! - MSR accesses outside the synthetic range, with Hyper-V identification off, or on an unknown VP #GP;
//!   plain-storage MSRs read back what was written; VP_INDEX reads the configured index;
//! - hypercall results carry a status from the TLFS set, no reserved result bits, at most `rep count` reps
//!   completed, and the 32-bit convention's halves fit in 32 bits; #UD only where the TLFS/KVM allow it;
//! - interrupts go to existing VPs, auto-EOI interrupts use vectors >= 16, and a vector below 16 only comes from
//!   a direct-mode synthetic timer programmed with it;
//! - the platform timers armed are exactly the engine's armed stimers, at their deadlines; reset cancels all;
//! - reference time never goes backwards while the guest clock moves forward;
//! - `save` → `restore` → `save` is the identity and the state survives a JSON round trip.

use crate::platform::{AccessKind, FuzzPlatform, Log, HOLE, RAM_END, RAM_PAGES};
use arbitrary::{Result, Unstructured};
use hyperv::guest::{eax3, edx3};
use hyperv::hypercall::{is_xmm_fast_code, KVM_ENOSYS_RESULT, KVM_EPERM_RESULT};
use hyperv::{
    CpuMode, Engine, EngineConfig, EngineState, EventConnection, HvCpuid, HypercallOutcome,
    HypercallRegs, MessageConnection, TimerId, VpId,
};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use tlfs::hypercall as hc;
use tlfs::msr;
use tlfs::pages::PAGE_SIZE;

/// The hypercall status codes of the TLFS that the engine may return (reference §6.7).
pub const TLFS_STATUSES: &[u16] = &[
    hc::STATUS_SUCCESS,
    hc::STATUS_INVALID_HYPERCALL_CODE,
    hc::STATUS_INVALID_HYPERCALL_INPUT,
    hc::STATUS_INVALID_ALIGNMENT,
    hc::STATUS_INVALID_PARAMETER,
    hc::STATUS_ACCESS_DENIED,
    hc::STATUS_OPERATION_DENIED,
    hc::STATUS_INSUFFICIENT_MEMORY,
    hc::STATUS_INVALID_PORT_ID,
    hc::STATUS_INVALID_CONNECTION_ID,
    hc::STATUS_INSUFFICIENT_BUFFERS,
    hc::STATUS_NOT_ACKNOWLEDGED,
    hc::STATUS_NO_DATA,
];

/// Every synthetic MSR the TLFS/KVM define (the engine may implement a subset).
pub const KNOWN_MSRS: &[u32] = &[
    msr::GUEST_OS_ID,
    msr::HYPERCALL,
    msr::VP_INDEX,
    msr::RESET,
    msr::VP_RUNTIME,
    msr::TIME_REF_COUNT,
    msr::REFERENCE_TSC,
    msr::TSC_FREQUENCY,
    msr::APIC_FREQUENCY,
    msr::EOI,
    msr::ICR,
    msr::TPR,
    msr::VP_ASSIST_PAGE,
    msr::SCONTROL,
    msr::SVERSION,
    msr::SIEFP,
    msr::SIMP,
    msr::EOM,
    msr::GUEST_IDLE,
    msr::SYNDBG_CONTROL,
    msr::SYNDBG_STATUS,
    msr::SYNDBG_SEND_BUFFER,
    msr::SYNDBG_RECV_BUFFER,
    msr::SYNDBG_PENDING_BUFFER,
    msr::SYNDBG_OPTIONS,
    msr::CRASH_P0,
    msr::CRASH_P0 + 1,
    msr::CRASH_P0 + 2,
    msr::CRASH_P0 + 3,
    msr::CRASH_P4,
    msr::CRASH_CTL,
    msr::REENLIGHTENMENT_CONTROL,
    msr::TSC_EMULATION_CONTROL,
    msr::TSC_EMULATION_STATUS,
    msr::TSC_INVARIANT_CONTROL,
];

/// MSRs whose successful write must read back verbatim.
fn is_plain_storage(index: u32) -> bool {
    matches!(
        index,
        msr::GUEST_OS_ID
            | msr::CRASH_P0..=msr::CRASH_P4
            | msr::SCONTROL
            | msr::SINT0..=msr::SINT15
            | msr::REENLIGHTENMENT_CONTROL
            | msr::TSC_EMULATION_CONTROL
    ) || (msr::STIMER0_COUNT..=msr::STIMER3_COUNT).contains(&index)
        && (index - msr::STIMER0_CONFIG) % 2 == 1
}

/// Hypercall codes worth trying (implemented, planned, and neighbours).
const CODES: &[u16] = &[
    0,
    1,
    hc::FLUSH_VIRTUAL_ADDRESS_SPACE,
    hc::FLUSH_VIRTUAL_ADDRESS_LIST,
    hc::NOTIFY_LONG_SPIN_WAIT,
    hc::SEND_SYNTHETIC_CLUSTER_IPI,
    hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX,
    hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX,
    hc::SEND_SYNTHETIC_CLUSTER_IPI_EX,
    hc::POST_MESSAGE,
    hc::SIGNAL_EVENT,
    hc::POST_DEBUG_DATA,
    hc::RETRIEVE_DEBUG_DATA,
    hc::RESET_DEBUG_SESSION,
    hc::EXT_QUERY_CAPABILITIES,
    hc::EXT_GET_BOOT_ZEROED_MEMORY,
    hc::EXT_MEMORY_HEAT_HINT,
    hc::EXT_CALL_MAX,
    hc::EXT_CALL_MAX + 1,
    0xFFFF,
];

/// Connection ids with a registered message / event handler.
pub(crate) const MESSAGE_CONNECTIONS: &[u32] = &[1, 2, hc::CONNECTION_ID_MASK];
pub(crate) const EVENT_CONNECTIONS: &[u32] = &[1, 3, hc::CONNECTION_ID_MASK];

/// Counters of what the driver reached (for the harness's own tests and for tuning; relaxed atomics, cheap).
pub mod stats {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// One counter per interesting outcome.
    pub static MSR_WRITES_OK: AtomicU64 = AtomicU64::new(0);
    pub static MSR_READS_OK: AtomicU64 = AtomicU64::new(0);
    pub static HYPERCALLS_HV: AtomicU64 = AtomicU64::new(0);
    pub static HYPERCALL_SUCCESS: AtomicU64 = AtomicU64::new(0);
    pub static HANDLER_CALLS: AtomicU64 = AtomicU64::new(0);
    pub static TIMER_EXPIRIES: AtomicU64 = AtomicU64::new(0);
    pub static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
    pub static ENGINE_WRITES: AtomicU64 = AtomicU64::new(0);
    pub static MESSAGES_POSTED: AtomicU64 = AtomicU64::new(0);
    pub static RESETS: AtomicU64 = AtomicU64::new(0);
    pub static FLUSHES: AtomicU64 = AtomicU64::new(0);

    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot, by name.
    pub fn snapshot() -> Vec<(&'static str, u64)> {
        let all: [(&'static str, &AtomicU64); 11] = [
            ("msr_writes_ok", &MSR_WRITES_OK),
            ("msr_reads_ok", &MSR_READS_OK),
            ("hypercalls_hv", &HYPERCALLS_HV),
            ("hypercall_success", &HYPERCALL_SUCCESS),
            ("handler_calls", &HANDLER_CALLS),
            ("timer_expiries", &TIMER_EXPIRIES),
            ("interrupts", &INTERRUPTS),
            ("engine_writes", &ENGINE_WRITES),
            ("messages_posted", &MESSAGES_POSTED),
            ("resets", &RESETS),
            ("flushes", &FLUSHES),
        ];
        all.iter()
            .map(|(n, c)| (*n, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Which operations a target favours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Focus {
    /// Synthetic MSR reads/writes across VPs.
    Msr,
    /// Hypercalls with arbitrary control words, registers and input pages.
    Hypercall,
    /// SynIC and synthetic-timer traffic with a moving clock.
    SynicStimer,
}

/// One step of a fuzz input.
#[derive(Clone, Debug)]
pub enum Op {
    ReadMsr {
        vp: u32,
        index: u32,
    },
    WriteMsr {
        vp: u32,
        index: u32,
        value: u64,
    },
    /// A hypercall; `input` is stored at the input GPA first (the guest fills its input page, then calls).
    Hypercall {
        vp: u32,
        regs: HypercallRegs,
        input: Option<Vec<u8>>,
    },
    /// The guest stores bytes into its memory.
    Poke {
        gpa: u64,
        data: Vec<u8>,
    },
    /// The guest clock moves forward; due timers fire as a VMM would fire them.
    Advance {
        ticks: u64,
    },
    /// A stale, early or unknown expiry report.
    FireTimer {
        vp: u32,
        timer: u8,
    },
    /// The VMM runs the queued VP work.
    RunWork,
    RaiseSint {
        vp: u32,
        sint: u8,
    },
    PostMessage {
        vp: u32,
        sint: u8,
        message_type: u32,
        payload: Vec<u8>,
    },
    SignalEventFlag {
        vp: u32,
        sint: u8,
        flag: u32,
    },
    ApicEoi {
        vp: u32,
        vector: u8,
    },
    IsAutoEoi {
        vp: u32,
        vector: u8,
    },
    /// Change what the registered connection handlers answer.
    HandlerStatus {
        message: u16,
        event: u16,
    },
    Reset,
    /// Save and restore in place; with `json`, the state also goes through serde_json (slow under coverage
    /// instrumentation, so only sometimes).
    SaveRestore {
        json: bool,
    },
    Rebase,
}

struct MsgHandler {
    vps: usize,
    status: Arc<AtomicU16>,
}

impl MessageConnection for MsgHandler {
    fn post_message(&self, vp: VpId, message_type: u32, payload: &[u8]) -> u16 {
        assert!(
            vp.index() < self.vps,
            "PostMessage handler called for VP {}",
            vp.0
        );
        assert!(
            payload.len() <= hc::MESSAGE_PAYLOAD_MAX as usize,
            "PostMessage payload of {} bytes (type {message_type:#x})",
            payload.len()
        );
        stats::bump(&stats::HANDLER_CALLS);
        self.status.load(Ordering::Relaxed)
    }
}

struct EvtHandler {
    vps: usize,
    status: Arc<AtomicU16>,
}

impl EventConnection for EvtHandler {
    fn signal_event(&self, vp: VpId) -> u16 {
        assert!(
            vp.index() < self.vps,
            "SignalEvent handler called for VP {}",
            vp.0
        );
        stats::bump(&stats::HANDLER_CALLS);
        self.status.load(Ordering::Relaxed)
    }
}

/// The engine under test, its configuration and what the driver tracks between operations.
pub struct Harness {
    engine: Engine<FuzzPlatform>,
    config: EngineConfig,
    vps: usize,
    tsc_hz: u64,
    message_status: Arc<AtomicU16>,
    event_status: Arc<AtomicU16>,
    /// Reference time last seen per VP (monotonicity).
    last_ref: Vec<u64>,
    /// The engine state after the last step (the next step's "before"), saving one `save` per step.
    state: Option<EngineState>,
}

fn pick<T: Copy>(u: &mut Unstructured<'_>, items: &[T]) -> Result<T> {
    Ok(*u.choose(items)?)
}

/// A guest-physical address: mostly page-granular addresses inside, at the edge of and outside RAM.
fn gpa(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=9)? {
        0..=3 => u.int_in_range(0..=RAM_PAGES + 2)? * PAGE_SIZE,
        4 => {
            u.int_in_range(0..=RAM_PAGES + 2)? * PAGE_SIZE + u64::from(u.int_in_range(0u16..=4095)?)
        }
        5 => pick(
            u,
            &[
                HOLE.start,
                HOLE.start - 8,
                HOLE.end - 8,
                RAM_END - 8,
                RAM_END - PAGE_SIZE,
                RAM_END,
                PAGE_SIZE - 8,
                !(PAGE_SIZE - 1),
                u64::MAX - 7,
                1 << 52,
                (1 << 52) - PAGE_SIZE,
            ],
        )?,
        6 => {
            u.int_in_range(0..=RAM_PAGES)? * PAGE_SIZE + PAGE_SIZE
                - u64::from(u.int_in_range(1u8..=16)?)
        }
        _ => u.arbitrary()?,
    })
}

/// A page-MSR value (HYPERCALL, REFERENCE_TSC, SIMP, SIEFP, VP_ASSIST_PAGE): a page with the enable bit, maybe
/// other low bits.
fn page_msr_value(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=5)? {
        0..=2 => (gpa(u)? & !(PAGE_SIZE - 1)) | 1,
        3 => gpa(u)? & !(PAGE_SIZE - 1),
        4 => (gpa(u)? & !(PAGE_SIZE - 1)) | u64::from(u.int_in_range(0u16..=4095)?),
        _ => u.arbitrary()?,
    })
}

fn sint_value(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let vector = if u.ratio(1, 4)? {
        u.int_in_range(0u8..=15)?
    } else {
        u.arbitrary()?
    };
    let masked = u.ratio(1, 4)?;
    let auto_eoi = u.arbitrary::<bool>()?;
    let polling = u.ratio(1, 8)?;
    Ok(msr::SintMsr::new()
        .with_vector(vector)
        .with_masked(masked)
        .with_auto_eoi(auto_eoi)
        .with_polling(polling)
        .into_bits())
}

fn stimer_config_value(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    Ok(msr::StimerConfig::new()
        .with_enable(u.ratio(3, 4)?)
        .with_periodic(u.arbitrary()?)
        .with_lazy(u.ratio(1, 8)?)
        .with_auto_enable(u.arbitrary()?)
        .with_apic_vector(u.arbitrary()?)
        .with_direct_mode(u.ratio(1, 3)?)
        .with_sintx(u.int_in_range(0u8..=15)?)
        .into_bits())
}

fn count_value(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=6)? {
        0 => 0,
        1 => u64::MAX,
        2 => u.int_in_range(1u64..=100)?,
        3 => u.int_in_range(1u64..=100_000)?,
        4 => 1 << u.int_in_range(0u32..=63)?,
        _ => u.arbitrary()?,
    })
}

/// A value suited to the MSR.
fn msr_value(u: &mut Unstructured<'_>, index: u32) -> Result<u64> {
    if u.ratio(1, 10)? {
        return u.arbitrary();
    }
    Ok(match index {
        msr::HYPERCALL | msr::REFERENCE_TSC | msr::SIMP | msr::SIEFP | msr::VP_ASSIST_PAGE => {
            page_msr_value(u)?
        }
        msr::SINT0..=msr::SINT15 => sint_value(u)?,
        msr::STIMER0_CONFIG..=msr::STIMER3_COUNT => {
            if (index - msr::STIMER0_CONFIG).is_multiple_of(2) {
                stimer_config_value(u)?
            } else {
                count_value(u)?
            }
        }
        msr::GUEST_OS_ID => pick(u, &[0, 0x8100_0000_0000_0000, 0x1_0000_0604_0000_u64, 1])?,
        msr::SCONTROL | msr::RESET | msr::TSC_EMULATION_STATUS | msr::TSC_INVARIANT_CONTROL => {
            pick(u, &[0, 1, 2, 3])?
        }
        msr::CRASH_CTL => pick(u, &[0, msr::CRASH_CTL_NOTIFY, u64::MAX])?,
        msr::EOM => 0,
        _ => count_value(u)?,
    })
}

/// An MSR index: mostly a known one, sometimes a neighbour or anything.
fn msr_index(u: &mut Unstructured<'_>, focus: Focus) -> Result<u32> {
    let synic_bias = if focus == Focus::SynicStimer { 6 } else { 2 };
    Ok(match u.int_in_range(0u8..=9)? {
        n if n < synic_bias => match u.int_in_range(0u8..=2)? {
            0 => pick(
                u,
                &[
                    msr::SCONTROL,
                    msr::SVERSION,
                    msr::SIEFP,
                    msr::SIMP,
                    msr::EOM,
                ],
            )?,
            1 => msr::SINT0 + u.int_in_range(0u32..=15)?,
            _ => msr::STIMER0_CONFIG + u.int_in_range(0u32..=7)?,
        },
        6..=7 => pick(u, KNOWN_MSRS)?,
        8 => 0x4000_0000 + u.int_in_range(0u32..=0x1FF)?,
        _ => u.arbitrary()?,
    })
}

fn vp_arg(u: &mut Unstructured<'_>, vps: usize) -> Result<u32> {
    // Mostly a real VP; sometimes one past the end, or anything.
    Ok(match u.int_in_range(0u8..=15)? {
        0 => vps as u32,
        1 => u.arbitrary()?,
        _ => u.int_in_range(0..=vps as u32 - 1)?,
    })
}

fn control_word(u: &mut Unstructured<'_>) -> Result<u64> {
    if u.ratio(1, 10)? {
        return u.arbitrary();
    }
    let code = if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        pick(u, CODES)?
    };
    let rep = pick(u, &[0u16, 0, 0, 1, 2, 64, 0xFFF])?;
    let rep_start = pick(u, &[0u16, 0, 0, 0, 1, 0xFFF])?;
    let var = pick(u, &[0u16, 0, 0, 1, 2, 0x3FF])?;
    let c = hc::Control::new()
        .with_code(code)
        .with_fast(u.ratio(1, 3)?)
        .with_var_header_size(var)
        .with_rep_count(rep)
        .with_rep_start(rep_start)
        .into_bits();
    let reserved = if u.ratio(1, 10)? {
        hc::CONTROL_RESERVED_MASK & u.arbitrary::<u64>()?
    } else {
        0
    };
    Ok(c | reserved)
}

fn post_message_block(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut b = Vec::with_capacity(hc::POST_MESSAGE_INPUT_SIZE);
    let conn = match u.int_in_range(0u8..=3)? {
        0 => 1,
        1 => pick(u, MESSAGE_CONNECTIONS)? | (u32::from(u.arbitrary::<u8>()?) << 24),
        2 => pick(u, MESSAGE_CONNECTIONS)?,
        _ => u.arbitrary()?,
    };
    b.extend_from_slice(&conn.to_le_bytes());
    b.extend_from_slice(&pick(u, &[0u32, 0, 1])?.to_le_bytes());
    b.extend_from_slice(&pick(u, &[1u32, 0, 0x8000_0000, 0xFFFF_FFFF])?.to_le_bytes());
    let size = match u.int_in_range(0u8..=3)? {
        0 | 1 => u.int_in_range(0u32..=240)?,
        2 => pick(u, &[0u32, 240, 241, 256, u32::MAX])?,
        _ => u.arbitrary()?,
    };
    b.extend_from_slice(&size.to_le_bytes());
    let fill: u8 = u.arbitrary()?;
    b.resize(hc::POST_MESSAGE_INPUT_SIZE, fill);
    Ok(b)
}

fn signal_event_param(u: &mut Unstructured<'_>) -> Result<u64> {
    let conn = pick(u, EVENT_CONNECTIONS)?;
    let flag = pick(u, &[0u64, 0, 0, 1, 0xFFFF])?;
    let reserved = pick(u, &[0u64, 0, 0, 1])?;
    Ok(if u.ratio(1, 6)? {
        u.arbitrary()?
    } else {
        u64::from(conn) | (flag << 32) | (reserved << 48)
    })
}

/// A list of u64 words (processor masks, VP-set headers and banks, GVA lists).
fn words(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let n = u.int_in_range(1usize..=40)?;
    let mut b = Vec::with_capacity(n * 8);
    for _ in 0..n {
        let w = match u.int_in_range(0u8..=5)? {
            0 => 0,
            1 => u64::MAX,
            2 => 1,
            3 => u.int_in_range(0u64..=70)?,
            _ => u.arbitrary()?,
        };
        b.extend_from_slice(&w.to_le_bytes());
    }
    Ok(b)
}

/// Bytes for a hypercall input block: a PostMessage block, a SignalEvent parameter or a list of u64 words.
fn input_block(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    match u.int_in_range(0u8..=3)? {
        0 => post_message_block(u),
        1 => Ok(signal_event_param(u)?.to_le_bytes().to_vec()),
        _ => words(u),
    }
}

fn regs_for(
    u: &mut Unstructured<'_>,
    mode: CpuMode,
    cpl: u8,
    control: u64,
    input: u64,
    output: u64,
) -> Result<HypercallRegs> {
    let mut regs = HypercallRegs {
        mode,
        cpl,
        ..HypercallRegs::default()
    };
    match mode {
        CpuMode::Protected32 => {
            regs.rdx = control >> 32;
            regs.rax = control & 0xFFFF_FFFF;
            regs.rbx = input >> 32;
            regs.rcx = input & 0xFFFF_FFFF;
            regs.rdi = output >> 32;
            regs.rsi = output & 0xFFFF_FFFF;
            if u.ratio(1, 8)? {
                // Garbage in the upper halves must be ignored.
                regs.rax |= u.arbitrary::<u64>()? << 32;
                regs.rdx |= u.arbitrary::<u64>()? << 32;
            }
        }
        _ => {
            regs.rcx = control;
            regs.rdx = input;
            regs.r8 = output;
            regs.rax = u.arbitrary()?;
        }
    }
    if u.ratio(1, 4)? {
        let mut x = [0u128; 6];
        for v in x.iter_mut() {
            *v = u.arbitrary()?;
        }
        regs.xmm = Some(x);
    }
    Ok(regs)
}

/// The input GPA of a register snapshot, in its mode's convention.
fn input_gpa(regs: &HypercallRegs) -> u64 {
    match regs.mode {
        CpuMode::Protected32 => ((regs.rbx & 0xFFFF_FFFF) << 32) | (regs.rcx & 0xFFFF_FFFF),
        _ => regs.rdx,
    }
}

/// The output GPA of a register snapshot, in its mode's convention.
fn output_gpa(regs: &HypercallRegs) -> u64 {
    match regs.mode {
        CpuMode::Protected32 => ((regs.rdi & 0xFFFF_FFFF) << 32) | (regs.rsi & 0xFFFF_FFFF),
        _ => regs.r8,
    }
}

/// A hypercall: half the time a well-formed call of an implemented (or planned) code with a matching input
/// block in RAM, otherwise arbitrary registers.
fn hypercall_op(u: &mut Unstructured<'_>, vps: usize) -> Result<Op> {
    let vp = vp_arg(u, vps)?;
    if u.ratio(1, 2)? {
        let mode = if u.ratio(1, 5)? {
            CpuMode::Protected32
        } else {
            CpuMode::Long64
        };
        let page = pick(u, &[0u64, 7, 14, 15])? * PAGE_SIZE + 8 * u.int_in_range(0u64..=3)?;
        let (code, fast, input, block) = match u.int_in_range(0u8..=5)? {
            0 | 1 => (hc::POST_MESSAGE, false, page, Some(post_message_block(u)?)),
            2 => (
                hc::SIGNAL_EVENT,
                false,
                page,
                Some(signal_event_param(u)?.to_le_bytes().to_vec()),
            ),
            3 => (hc::SIGNAL_EVENT, true, signal_event_param(u)?, None),
            4 => (hc::NOTIFY_LONG_SPIN_WAIT, false, 0, None),
            _ => {
                let code = pick(
                    u,
                    &[
                        hc::FLUSH_VIRTUAL_ADDRESS_SPACE,
                        hc::FLUSH_VIRTUAL_ADDRESS_LIST,
                        hc::SEND_SYNTHETIC_CLUSTER_IPI,
                        hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX,
                        hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX,
                        hc::SEND_SYNTHETIC_CLUSTER_IPI_EX,
                    ],
                )?;
                let fast = u.ratio(1, 3)?;
                let input = if fast { u.arbitrary()? } else { page };
                (code, fast, input, Some(words(u)?))
            }
        };
        let rep = match code {
            hc::FLUSH_VIRTUAL_ADDRESS_LIST | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX => {
                pick(u, &[1u16, 2, 16, 0xFFF])?
            }
            _ => 0,
        };
        let var = match code {
            hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX
            | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX
            | hc::SEND_SYNTHETIC_CLUSTER_IPI_EX => pick(u, &[0u16, 1, 2, 8])?,
            _ => 0,
        };
        let control = hc::Control::new()
            .with_code(code)
            .with_fast(fast)
            .with_rep_count(rep)
            .with_var_header_size(var)
            .into_bits();
        let output = pick(u, &[0u64, 13 * PAGE_SIZE, RAM_END])?;
        let regs = regs_for(u, mode, 0, control, input, output)?;
        return Ok(Op::Hypercall {
            vp,
            regs,
            input: block,
        });
    }
    let mode = match u.int_in_range(0u8..=9)? {
        0 => CpuMode::Real,
        1 | 2 => CpuMode::Protected32,
        _ => CpuMode::Long64,
    };
    let cpl = if u.ratio(1, 10)? {
        pick(u, &[1u8, 2, 3, 0xFF])?
    } else {
        0
    };
    let control = control_word(u)?;
    let input = gpa(u)?;
    let output = gpa(u)?;
    let regs = regs_for(u, mode, cpl, control, input, output)?;
    let input = if u.ratio(1, 2)? {
        Some(input_block(u)?)
    } else {
        None
    };
    Ok(Op::Hypercall { vp, regs, input })
}

/// Draws the next operation with the focus's weights.
pub fn next_op(u: &mut Unstructured<'_>, focus: Focus, vps: usize) -> Result<Op> {
    // Weights: [read, write, hypercall, poke, advance, fire, work, device, reset, save/restore, rebase, status]
    let weights: [u32; 12] = match focus {
        Focus::Msr => [30, 45, 2, 4, 6, 1, 1, 2, 2, 3, 1, 0],
        Focus::Hypercall => [4, 12, 55, 15, 2, 0, 1, 2, 1, 1, 0, 4],
        Focus::SynicStimer => [8, 35, 3, 6, 16, 4, 5, 15, 1, 3, 1, 0],
    };
    let total: u32 = weights.iter().sum();
    let mut r = u.int_in_range(0..=total - 1)?;
    let mut which = 0;
    for (i, w) in weights.iter().enumerate() {
        if r < *w {
            which = i;
            break;
        }
        r -= w;
    }
    Ok(match which {
        0 => Op::ReadMsr {
            vp: vp_arg(u, vps)?,
            index: msr_index(u, focus)?,
        },
        1 => {
            let index = msr_index(u, focus)?;
            Op::WriteMsr {
                vp: vp_arg(u, vps)?,
                index,
                value: msr_value(u, index)?,
            }
        }
        2 => hypercall_op(u, vps)?,
        3 => {
            let at = gpa(u)?;
            let data = if u.ratio(1, 2)? {
                input_block(u)?
            } else {
                let n = u.int_in_range(1usize..=64)?;
                u.bytes(n)?.to_vec()
            };
            Op::Poke { gpa: at, data }
        }
        4 => Op::Advance {
            ticks: match u.int_in_range(0u8..=5)? {
                0 => 1,
                1 => u.int_in_range(1u64..=10_000)?,
                2 => u.int_in_range(1u64..=1_000_000_000)?,
                3 => 1 << u.int_in_range(0u32..=62)?,
                4 => u64::MAX,
                _ => u.arbitrary()?,
            },
        },
        5 => Op::FireTimer {
            vp: vp_arg(u, vps)?,
            timer: if u.ratio(1, 8)? {
                u.arbitrary()?
            } else {
                u.int_in_range(0u8..=3)?
            },
        },
        6 => Op::RunWork,
        7 => {
            let vp = vp_arg(u, vps)?;
            let sint = if u.ratio(1, 10)? {
                u.arbitrary()?
            } else {
                u.int_in_range(0u8..=15)?
            };
            match u.int_in_range(0u8..=4)? {
                0 => Op::RaiseSint { vp, sint },
                1 => {
                    let n = pick(u, &[0usize, 1, 16, 240, 241])?;
                    let fill: u8 = u.arbitrary()?;
                    Op::PostMessage {
                        vp,
                        sint,
                        message_type: pick(u, &[1u32, 0, 0x8000_0010, u32::MAX])?,
                        payload: vec![fill; n],
                    }
                }
                2 => Op::SignalEventFlag {
                    vp,
                    sint,
                    flag: pick(u, &[0u32, 1, 63, 64, 2047, 2048, u32::MAX])?,
                },
                3 => Op::ApicEoi {
                    vp,
                    vector: u.arbitrary()?,
                },
                _ => Op::IsAutoEoi {
                    vp,
                    vector: u.arbitrary()?,
                },
            }
        }
        8 => Op::Reset,
        9 => Op::SaveRestore {
            json: u.ratio(1, 16)?,
        },
        10 => Op::Rebase,
        _ => Op::HandlerStatus {
            message: pick(u, TLFS_STATUSES)?,
            event: pick(u, TLFS_STATUSES)?,
        },
    })
}

/// Pages the guest designated for the engine to write, from a state snapshot.
fn designated_pages(s: &EngineState) -> Vec<u64> {
    let page = |v: u64| (v & 1 != 0).then_some(v & !(PAGE_SIZE - 1));
    let mut pages: Vec<u64> = Vec::new();
    pages.extend(page(s.partition.hypercall));
    pages.extend(page(s.partition.reference_tsc));
    for v in &s.vps {
        pages.extend(page(v.synic.simp));
        pages.extend(page(v.synic.siefp));
        pages.extend(page(v.vp_assist_page));
    }
    pages
}

impl Harness {
    /// Decodes a configuration and creates the engine. `None` when the input is too short or the configuration is
    /// one the engine refuses (which is not a finding).
    pub fn new(u: &mut Unstructured<'_>, focus: Focus) -> Result<Option<Harness>> {
        let vps = u.int_in_range(1usize..=4)?;
        Harness::with_vps(u, focus, vps)
    }

    /// [`Harness::new`] with a given vCPU count (1..=4 keeps the model's costs down; any count works).
    pub fn with_vps(u: &mut Unstructured<'_>, focus: Focus, vps: usize) -> Result<Option<Harness>> {
        let vp_indexes: Vec<u32> = match u.int_in_range(0u8..=4)? {
            0 | 1 => (0..vps as u32).collect(),
            2 => (0..vps as u32).map(|i| i * 2).collect(),
            3 => (0..vps as u32).rev().collect(),
            _ => {
                let mut v: Vec<u32> = Vec::new();
                for _ in 0..vps {
                    v.push(u.arbitrary()?);
                }
                v
            }
        };
        let cpuid = match u.int_in_range(0u8..=7)? {
            0..=3 => HvCpuid::ALL,
            4 => HvCpuid::default(),
            5 => HvCpuid {
                syndbg_eax: hyperv::guest::SYNDBG_ALLOW_KERNEL_DEBUGGING,
                features_edx: HvCpuid::ALL.features_edx | edx3::DEBUG_MSRS,
                ..HvCpuid::ALL
            },
            _ => HvCpuid {
                features_eax: u.arbitrary()?,
                features_ebx: u.arbitrary()?,
                features_edx: u.arbitrary()?,
                recommendations_eax: u.arbitrary()?,
                spinlock_retries: pick(u, &[0u32, 0xFFF, u32::MAX])?,
                ..HvCpuid::ALL
            },
        };
        let enforce = u.ratio(1, 4)?;
        let mut config = EngineConfig::new(cpuid, enforce, vps as u32);
        config.vp_indexes = vp_indexes;
        if u.ratio(1, 8)? {
            config.synic = !config.synic;
        }
        let tsc_hz = pick(
            u,
            &[
                2_400_000_000u64,
                2_400_000_000,
                1_000_000_000,
                10_000_001,
                10_000_000,
                3_579_545,
                1,
                0,
            ],
        )?;
        let tsc0 = pick(u, &[0u64, 0, 1 << 40, u64::MAX - (1 << 36)])?;
        let apic_ok = u.arbitrary()?;
        let platform = FuzzPlatform::new(vps, tsc_hz, tsc0, apic_ok);
        let Ok(engine) = Engine::new(config.clone(), platform) else {
            // Duplicate VP indexes: refused by design.
            return Ok(None);
        };
        let message_status = Arc::new(AtomicU16::new(hc::STATUS_SUCCESS));
        let event_status = Arc::new(AtomicU16::new(hc::STATUS_SUCCESS));
        for &id in MESSAGE_CONNECTIONS {
            let h = MsgHandler {
                vps,
                status: message_status.clone(),
            };
            assert!(engine.register_message_connection(id, Arc::new(h)).is_ok());
        }
        for &id in EVENT_CONNECTIONS {
            let h = EvtHandler {
                vps,
                status: event_status.clone(),
            };
            assert!(engine.register_event_connection(id, Arc::new(h)).is_ok());
        }
        assert!(engine
            .register_message_connection(
                1 << 24,
                Arc::new(MsgHandler {
                    vps,
                    status: message_status.clone(),
                })
            )
            .is_err());
        let state = Some(engine.save());
        let mut h = Harness {
            engine,
            config,
            vps,
            tsc_hz,
            message_status,
            event_status,
            last_ref: vec![0; vps],
            state,
        };
        for i in 0..vps {
            h.last_ref[i] = h.engine.reference_time(VpId(i as u32));
        }
        h.prologue(u, focus)?;
        Ok(Some(h))
    }

    fn platform(&self) -> &FuzzPlatform {
        self.engine.platform()
    }

    /// A guest set-up the fuzzer would take long to discover: identification, hypercall page, SynIC pages and
    /// unmasked SINTs, reference TSC page. Chosen per input by a bit mask and applied as ordinary checked steps.
    fn prologue(&mut self, u: &mut Unstructured<'_>, focus: Focus) -> Result<()> {
        let mask: u8 = if focus == Focus::Msr {
            u.int_in_range(0u8..=3)?
        } else {
            u.arbitrary()?
        };
        let mut ops = Vec::new();
        if mask & 1 != 0 {
            ops.push((0, msr::GUEST_OS_ID, 0x8100_0000_0000_0000));
            ops.push((0, msr::HYPERCALL, PAGE_SIZE | 1));
        }
        if mask & 2 != 0 {
            ops.push((0, msr::REFERENCE_TSC, (15 * PAGE_SIZE) | 1));
        }
        for vp in 0..self.vps as u32 {
            let vpu = u64::from(vp);
            if mask & 4 != 0 {
                ops.push((vp, msr::SCONTROL, 1));
                ops.push((vp, msr::SIMP, ((2 + vpu) * PAGE_SIZE) | 1));
                ops.push((vp, msr::SIEFP, ((10 + vpu) * PAGE_SIZE) | 1));
            }
            if mask & 8 != 0 {
                for s in 0..4u32 {
                    let v = msr::SintMsr::new()
                        .with_vector(0x30 + s as u8)
                        .with_auto_eoi(s % 2 == 1)
                        .into_bits();
                    ops.push((vp, msr::SINT0 + s, v));
                }
            }
            if mask & 16 != 0 {
                ops.push((vp, msr::VP_ASSIST_PAGE, (14 * PAGE_SIZE) | 1));
            }
            if mask & 32 != 0 {
                let cfg = msr::StimerConfig::new()
                    .with_enable(true)
                    .with_periodic(vp % 2 == 0)
                    .with_sintx(1)
                    .into_bits();
                ops.push((vp, msr::STIMER0_CONFIG, cfg));
                ops.push((vp, msr::STIMER0_COUNT, 10_000));
            }
        }
        for (vp, index, value) in ops {
            self.step(Op::WriteMsr { vp, index, value });
        }
        Ok(())
    }

    /// Runs a whole input: configuration, prologue, then operations until the input is used up.
    pub fn run(data: &[u8], focus: Focus) {
        let mut u = Unstructured::new(data);
        let Ok(Some(mut h)) = Harness::new(&mut u, focus) else {
            return;
        };
        for _ in 0..512 {
            if u.is_empty() {
                break;
            }
            let Ok(op) = next_op(&mut u, focus, h.vps) else {
                break;
            };
            h.step(op);
        }
    }

    /// The engine's current state.
    pub fn save(&self) -> EngineState {
        self.engine.save()
    }

    /// The engine side of loading a migration stream (the `migration_stream` target): restores a state that came
    /// from the stream, then moves reference time forward to `reference_time` when it is behind, as
    /// `vmm::migration::vm::restore` does. A refused state must leave the engine unchanged; an accepted one must
    /// save back to itself (up to the runtime offsets, which are relative to the VP's runtime) and the
    /// platform's timers must be exactly the engine's armed stimers. Returns whether the state was accepted;
    /// the caller then runs operations with [`Harness::step`], which checks every invariant from there on.
    pub fn restore_foreign(&mut self, state: &EngineState, reference_time: u64) -> bool {
        let before = self.engine.save();
        drop(self.platform().take_log());
        if self.engine.restore(state).is_err() {
            assert_eq!(
                self.engine.save(),
                before,
                "a refused restore changed the state"
            );
            return false;
        }
        if self.engine.reference_time(VpId(0)) < reference_time {
            self.engine.rebase_reference_time(reference_time);
        }
        let after = self.engine.save();
        assert_eq!(after.version, state.version);
        assert_eq!(after.vps.len(), state.vps.len());
        for (a, b) in after.vps.iter().zip(&state.vps) {
            assert_eq!(a.vp_index, b.vp_index, "restore changed a VP index");
        }
        assert_eq!(
            after.partition.guest_os_id, state.partition.guest_os_id,
            "restore changed GUEST_OS_ID"
        );
        // Restoring what was just saved is the identity.
        assert!(
            self.engine.restore(&after).is_ok(),
            "restoring a fresh save failed"
        );
        assert_eq!(
            self.engine.save(),
            after,
            "save → restore → save changed the state"
        );
        // Restore and the reference-time rebase may rewrite a page the restored state designates (the reference
        // TSC page at its new sequence), and nothing else.
        let log = self.platform().take_log();
        let pages = designated_pages(&after);
        for a in log.accesses.iter().filter(|a| a.mutated) {
            let page = a.gpa & !(PAGE_SIZE - 1);
            assert!(
                pages.contains(&page) && a.len <= PAGE_SIZE - (a.gpa - page),
                "restore wrote guest memory outside the designated pages {pages:x?}: {a:?}"
            );
        }
        self.check_timers(&after);
        self.state = Some(after);
        for i in 0..self.vps {
            self.last_ref[i] = self.engine.reference_time(VpId(i as u32));
        }
        true
    }

    /// The vCPU count.
    pub fn vps(&self) -> usize {
        self.vps
    }

    fn valid_vp(&self, vp: u32) -> bool {
        (vp as usize) < self.vps
    }

    /// Executes one operation and checks every invariant.
    pub fn step(&mut self, op: Op) {
        let before = match self.state.take() {
            Some(s) => s,
            None => self.engine.save(),
        };
        drop(self.platform().take_log());
        let mut rebased = false;
        let mut reset_done = false;
        let mut output_page = None;
        match op {
            Op::ReadMsr { vp, index } => self.read_msr(vp, index),
            Op::WriteMsr { vp, index, value } => self.write_msr(vp, index, value),
            Op::Hypercall { vp, regs, input } => {
                if let Some(data) = input {
                    self.platform().guest_write(input_gpa(&regs), &data);
                }
                // A hypercall may write its output page (none implemented today does).
                output_page = Some(output_gpa(&regs) & !(PAGE_SIZE - 1));
                self.hypercall(vp, regs)
            }
            Op::Poke { gpa, data } => self.platform().guest_write(gpa, &data),
            Op::Advance { ticks } => {
                self.platform().advance(ticks);
                self.fire_due_timers();
            }
            Op::FireTimer { vp, timer } => {
                // A VMM reports the expiry of the timer it armed (or a stale one that raced with a cancel).
                self.platform().take_timer(VpId(vp), TimerId(timer));
                self.engine.timer_expired(VpId(vp), TimerId(timer));
            }
            Op::RunWork => {
                for _ in 0..4 {
                    let work = self.platform().take_work();
                    if work.is_empty() {
                        break;
                    }
                    for (vp, w) in work {
                        self.engine.run_vp_work(vp, w);
                    }
                }
            }
            Op::RaiseSint { vp, sint } => {
                let r = self.engine.raise_sint(VpId(vp), sint);
                if !self.valid_vp(vp) || !self.config.synic || sint >= 16 {
                    assert!(
                        r.is_err(),
                        "raise_sint({vp}, {sint}) on a missing target: {r:?}"
                    );
                }
            }
            Op::PostMessage {
                vp,
                sint,
                message_type,
                payload,
            } => {
                let n0 = self.platform().interrupts_total();
                let r = self
                    .engine
                    .post_message(VpId(vp), sint, message_type, &payload);
                if !self.valid_vp(vp) || !self.config.synic || sint >= 16 || payload.len() > 240 {
                    assert!(
                        r.is_err(),
                        "post_message to a missing target or too long: {r:?}"
                    );
                }
                let n = self.platform().interrupts_total() - n0;
                if r.is_ok() {
                    stats::bump(&stats::MESSAGES_POSTED);
                    assert_eq!(n, 1, "a posted message raised {n} interrupts");
                }
            }
            Op::SignalEventFlag { vp, sint, flag } => {
                let n0 = self.platform().interrupts_total();
                let r = self.engine.signal_event_flag(VpId(vp), sint, flag);
                if !self.valid_vp(vp) || !self.config.synic || sint >= 16 || flag >= 2048 {
                    assert!(r.is_err(), "signal_event_flag on a missing target: {r:?}");
                }
                let n = self.platform().interrupts_total() - n0;
                match r {
                    Ok(true) => assert_eq!(n, 1, "a newly set flag raised {n} interrupts"),
                    Ok(false) => assert_eq!(n, 0, "an already set flag raised {n} interrupts"),
                    Err(_) => {}
                }
            }
            Op::ApicEoi { vp, vector } => self.engine.apic_eoi(VpId(vp), vector),
            Op::IsAutoEoi { vp, vector } => {
                let auto = self.engine.is_auto_eoi_vector(VpId(vp), vector);
                if auto {
                    assert!(vector >= 16, "auto-EOI vector {vector}");
                    assert!(self.valid_vp(vp));
                }
            }
            Op::HandlerStatus { message, event } => {
                self.message_status.store(message, Ordering::Relaxed);
                self.event_status.store(event, Ordering::Relaxed);
            }
            Op::Reset => {
                self.engine.reset();
                reset_done = true;
            }
            Op::SaveRestore { json } => self.save_restore(json),
            Op::Rebase => {
                let t = self.engine.reference_time(VpId(0));
                self.engine.rebase_reference_time(t);
                rebased = true;
            }
        }
        let log = self.platform().take_log();
        // A guest reset request is carried out as a VMM would: engine reset with every vCPU stopped.
        let reset_requested = log
            .events
            .iter()
            .any(|e| matches!(e, hyperv::Event::ResetRequested { .. }));
        let after = self.engine.save();
        self.check_memory(&before, &after, &log, output_page);
        self.check_interrupts(&before, &after, &log);
        self.check_timers(&after);
        for _ in &log.interrupts {
            stats::bump(&stats::INTERRUPTS);
        }
        for _ in &log.flushes {
            stats::bump(&stats::FLUSHES);
        }
        for _ in log.accesses.iter().filter(|a| a.mutated) {
            stats::bump(&stats::ENGINE_WRITES);
        }
        if reset_requested {
            stats::bump(&stats::RESETS);
            self.engine.reset();
            reset_done = true;
            drop(self.platform().take_log());
        }
        if reset_done {
            assert!(
                self.platform().timers().is_empty(),
                "timers left armed after reset: {:?}",
                self.platform().timers()
            );
            let s = self.engine.save();
            assert_eq!(s.partition.guest_os_id, 0);
            assert_eq!(s.partition.hypercall, 0);
            assert!(!self.engine.hypercalls_enabled());
            self.state = Some(s);
        } else {
            self.state = Some(after);
        }
        self.check_reference_time(rebased);
    }

    fn read_msr(&mut self, vp: u32, index: u32) {
        let r = self.engine.read_msr(VpId(vp), index);
        self.check_msr_gating("read", vp, index, r.is_ok());
        if let Ok(v) = r {
            stats::bump(&stats::MSR_READS_OK);
            match index {
                msr::VP_INDEX => assert_eq!(
                    v,
                    u64::from(self.config.vp_indexes[vp as usize]),
                    "VP_INDEX of vCPU {vp}"
                ),
                msr::SVERSION => assert_eq!(v, msr::SYNIC_VERSION),
                msr::TIME_REF_COUNT => assert_eq!(v, self.engine.reference_time(VpId(vp))),
                msr::TSC_FREQUENCY => assert_eq!(v, self.tsc_hz),
                _ => {}
            }
        }
    }

    fn write_msr(&mut self, vp: u32, index: u32, value: u64) {
        let r = self.engine.write_msr(VpId(vp), index, value);
        self.check_msr_gating("write", vp, index, r.is_ok());
        if r.is_ok() {
            stats::bump(&stats::MSR_WRITES_OK);
        }
        if r.is_ok() && is_plain_storage(index) {
            let back = self.engine.read_msr(VpId(vp), index);
            assert_eq!(
                back,
                Ok(value),
                "MSR {index:#x} written with {value:#x} on VP {vp} reads back {back:?}"
            );
        }
    }

    fn check_msr_gating(&self, what: &str, vp: u32, index: u32, ok: bool) {
        if !ok {
            return;
        }
        assert!(
            self.valid_vp(vp),
            "{what} of MSR {index:#x} succeeded on missing VP {vp}"
        );
        assert!(
            self.config.cpuid.enabled(),
            "{what} of MSR {index:#x} succeeded with Hyper-V identification off"
        );
        assert!(
            (0x4000_0000..0x4000_0200).contains(&index),
            "{what} of non-synthetic MSR {index:#x} succeeded"
        );
        let synic_msr = matches!(index, msr::SCONTROL..=msr::EOM | msr::SINT0..=msr::SINT15);
        if synic_msr {
            assert!(
                self.config.synic,
                "{what} of SynIC MSR {index:#x} without SynIC"
            );
        }
        if self.config.enforce_cpuid {
            let a = |bit: u32| self.config.cpuid.features_eax & bit != 0;
            let gated = match index {
                msr::GUEST_OS_ID | msr::HYPERCALL => a(eax3::HYPERCALL),
                msr::VP_INDEX => a(eax3::VP_INDEX),
                msr::TIME_REF_COUNT => a(eax3::TIME_REF_COUNT),
                msr::REFERENCE_TSC => a(eax3::REFERENCE_TSC),
                msr::SCONTROL..=msr::EOM | msr::SINT0..=msr::SINT15 => a(eax3::SYNIC),
                msr::STIMER0_CONFIG..=msr::STIMER3_COUNT => a(eax3::SYNTIMERS),
                msr::CRASH_P0..=msr::CRASH_CTL => {
                    self.config.cpuid.features_edx & edx3::CRASH_MSRS != 0
                }
                _ => true,
            };
            assert!(
                gated,
                "{what} of MSR {index:#x} passed hv-enforce-cpuid without its CPUID bit"
            );
        }
    }

    fn hypercall(&mut self, vp: u32, mut regs: HypercallRegs) {
        let enabled = self.engine.hypercalls_enabled();
        if self.engine.hypercall_needs_xmm(&regs) && regs.xmm.is_none() {
            regs.xmm = Some([0x1111_2222_3333_4444_5555_6666_7777_8888; 6]);
        }
        let out = self.engine.hypercall(VpId(vp), &regs);
        let (control, long) = match regs.mode {
            CpuMode::Protected32 => (
                ((regs.rdx & 0xFFFF_FFFF) << 32) | (regs.rax & 0xFFFF_FFFF),
                false,
            ),
            _ => (regs.rcx, true),
        };
        let c = hc::Control::from_bits(control);
        match out {
            HypercallOutcome::InjectUd => {
                assert!(
                    enabled && self.valid_vp(vp),
                    "#UD from a KVM (non-Hyper-V) hypercall: {regs:?}"
                );
                let xmm_gate = c.fast() && is_xmm_fast_code(c.code()) && self.config.enforce_cpuid;
                assert!(
                    regs.cpl != 0 || regs.mode == CpuMode::Real || xmm_gate,
                    "#UD for a CPL-0 protected-mode hypercall: {regs:?}"
                );
            }
            HypercallOutcome::Complete(w) => {
                let result = if long {
                    assert!(w.rdx.is_none(), "64-bit hypercall wrote RDX");
                    w.rax
                } else {
                    let hi = w.rdx.unwrap_or(0);
                    if enabled && self.valid_vp(vp) {
                        assert!(w.rdx.is_some(), "32-bit hypercall result without EDX");
                    }
                    assert!(
                        w.rax <= 0xFFFF_FFFF && hi <= 0xFFFF_FFFF,
                        "32-bit result halves {w:?}"
                    );
                    (hi << 32) | w.rax
                };
                if !enabled || !self.valid_vp(vp) {
                    let m = if regs.mode == CpuMode::Long64 {
                        u64::MAX
                    } else {
                        0xFFFF_FFFF
                    };
                    assert!(
                        result == KVM_ENOSYS_RESULT & m || result == KVM_EPERM_RESULT & m,
                        "KVM hypercall result {result:#x}"
                    );
                    return;
                }
                assert!(
                    regs.cpl == 0 && regs.mode != CpuMode::Real,
                    "hypercall completed at CPL {}",
                    regs.cpl
                );
                stats::bump(&stats::HYPERCALLS_HV);
                let r = hc::HypercallResult::from_bits(result);
                assert!(
                    TLFS_STATUSES.contains(&r.status()),
                    "status {:#x} outside the TLFS set (control {control:#x})",
                    r.status()
                );
                assert_eq!(
                    r.reserved1(),
                    0,
                    "reserved result bits 31:16 in {result:#x}"
                );
                assert_eq!(
                    r.reserved2(),
                    0,
                    "reserved result bits 63:44 in {result:#x}"
                );
                assert!(
                    r.reps_completed() <= c.rep_count(),
                    "{} reps completed of {} (control {control:#x})",
                    r.reps_completed(),
                    c.rep_count()
                );
                if r.status() == hc::STATUS_SUCCESS {
                    stats::bump(&stats::HYPERCALL_SUCCESS);
                }
                if control & hc::CONTROL_RESERVED_MASK != 0 && !self.config.enforce_cpuid {
                    assert_eq!(r.status(), hc::STATUS_INVALID_HYPERCALL_INPUT);
                }
            }
        }
    }

    fn fire_due_timers(&mut self) {
        for _ in 0..8 {
            let due = {
                let e = &self.engine;
                self.platform().take_due_timers(|vp| e.reference_time(vp))
            };
            if due.is_empty() {
                break;
            }
            for (vp, t) in due {
                stats::bump(&stats::TIMER_EXPIRIES);
                self.engine.timer_expired(vp, t);
            }
        }
    }

    fn save_restore(&mut self, json: bool) {
        let s1 = self.engine.save();
        if json {
            let text = serde_json::to_string(&s1).unwrap_or_default();
            let parsed: Option<EngineState> = serde_json::from_str(&text).ok();
            assert_eq!(
                parsed.as_ref(),
                Some(&s1),
                "EngineState does not survive JSON"
            );
        }
        let r = self.engine.restore(&s1);
        assert!(r.is_ok(), "restoring a fresh save failed: {r:?}");
        let s2 = self.engine.save();
        assert_eq!(s1, s2, "save → restore → save changed the state");
        // A state from another layout must be refused without changes.
        let mut bad = s1.clone();
        bad.version = bad.version.wrapping_add(1);
        assert!(self.engine.restore(&bad).is_err());
        let mut bad = s1.clone();
        bad.vps.pop();
        assert!(self.engine.restore(&bad).is_err());
        assert_eq!(
            self.engine.save(),
            s1,
            "a refused restore changed the state"
        );
    }

    fn check_memory(
        &self,
        before: &EngineState,
        after: &EngineState,
        log: &Log,
        output_page: Option<u64>,
    ) {
        let mut allowed = designated_pages(before);
        allowed.extend(designated_pages(after));
        allowed.extend(output_page);
        for a in &log.accesses {
            if !a.mutated {
                continue;
            }
            assert!(a.kind != AccessKind::Read);
            let page = a.gpa & !(PAGE_SIZE - 1);
            assert!(
                a.gpa + a.len <= page + PAGE_SIZE,
                "engine write {:#x}+{:#x} crosses a page",
                a.gpa,
                a.len
            );
            assert!(
                allowed.contains(&page),
                "engine wrote {:#x}+{:#x}, outside the pages the guest designated {allowed:#x?}",
                a.gpa,
                a.len
            );
            assert!(
                log.dirty
                    .iter()
                    .any(|&(g, l)| g <= a.gpa && a.gpa + a.len <= g.saturating_add(l)),
                "engine write {:#x}+{:#x} not marked dirty (dirty: {:#x?})",
                a.gpa,
                a.len,
                log.dirty
            );
        }
    }

    fn check_interrupts(&self, before: &EngineState, after: &EngineState, log: &Log) {
        for &(vp, vector, auto_eoi) in &log.interrupts {
            if auto_eoi {
                assert!(vector >= 16, "auto-EOI interrupt with vector {vector}");
            }
            if vector < 16 {
                // Only a direct-mode stimer programmed with that vector may send it (KVM does not check).
                let direct = |s: &EngineState| {
                    s.vps.get(vp.index()).is_some_and(|v| {
                        v.stimers.iter().any(|t| {
                            let c = msr::StimerConfig::from_bits(t.config);
                            c.direct_mode() && c.apic_vector() == vector
                        })
                    })
                };
                assert!(
                    direct(before) || direct(after),
                    "interrupt vector {vector} to VP {} not from a direct-mode stimer",
                    vp.0
                );
            }
        }
    }

    fn check_timers(&self, after: &EngineState) {
        let timers = self.platform().timers();
        for (i, v) in after.vps.iter().enumerate() {
            for (n, t) in v.stimers.iter().enumerate() {
                let key = (VpId(i as u32), TimerId(n as u8));
                let armed = timers.get(&key);
                if t.armed {
                    assert_eq!(
                        armed,
                        Some(&t.exp_time),
                        "stimer {n} of VP {i} armed at {} but the platform has {armed:?}",
                        t.exp_time
                    );
                } else {
                    assert!(
                        armed.is_none(),
                        "stimer {n} of VP {i} not armed but the platform has {armed:?}"
                    );
                }
            }
        }
        for (vp, t) in timers.keys() {
            assert!(vp.index() < self.vps && t.0 < 4);
        }
    }

    fn check_reference_time(&mut self, rebased: bool) {
        for i in 0..self.vps {
            let now = self.engine.reference_time(VpId(i as u32));
            if !rebased {
                assert!(
                    now >= self.last_ref[i],
                    "reference time of VP {i} went back from {} to {now}",
                    self.last_ref[i]
                );
            }
            self.last_ref[i] = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random inputs hold every invariant and reach the deep states the targets are for.
    #[test]
    fn random_inputs_reach_deep_states() {
        let table = [
            (Focus::Msr, "msr_writes_ok"),
            (Focus::Hypercall, "hypercall_success"),
            (Focus::Hypercall, "handler_calls"),
            (Focus::Hypercall, "flushes"),
            (Focus::SynicStimer, "timer_expiries"),
            (Focus::SynicStimer, "messages_posted"),
            (Focus::SynicStimer, "interrupts"),
        ];
        for (i, (focus, counter)) in table.iter().enumerate() {
            let before = stats::snapshot();
            for data in crate::test_inputs(0x9E37_79B9 + i as u64, 300, 2048) {
                Harness::run(&data, *focus);
            }
            let after = stats::snapshot();
            let get = |s: &[(&str, u64)]| s.iter().find(|(n, _)| n == counter).map_or(0, |x| x.1);
            let reached = get(&after) - get(&before);
            println!("{focus:?}: {counter} += {reached}; totals {after:?}");
            assert!(reached > 0, "{focus:?} never reached {counter}");
        }
    }
}

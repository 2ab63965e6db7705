//! Engine state and its save/restore format.
//!
//! [`EngineState`] is the complete, self-describing engine state (partition + every VP). It is serialised with
//! serde (the VMM picks the encoding; JSON works) and carries [`STATE_VERSION`]. Restore refuses another version or
//! another vCPU count with a [`RestoreError`] naming the mismatch. Guest pages the engine wrote (hypercall, TSC,
//! SynIC, assist pages) travel with guest RAM; they were marked dirty when written.

use crate::refclock::{RefClock, TscPageStatus};
use crate::stimer::StimerState;
use crate::synic::SynicState;
use serde::{Deserialize, Serialize};
use tlfs::msr::{CRASH_CTL_NOTIFY, CRASH_PARAM_COUNT, STIMER_COUNT};

/// Version of [`EngineState`]. Bump on any incompatible change; issue 8 extends it.
pub const STATE_VERSION: u32 = 1;

/// Partition-wide Hyper-V state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// GUEST_OS_ID.
    pub guest_os_id: u64,
    /// HYPERCALL, as stored (all 64 bits).
    pub hypercall: u64,
    /// REFERENCE_TSC, as stored (all 64 bits).
    pub reference_tsc: u64,
    /// What the reference TSC page currently holds.
    pub tsc_page: TscPageStatus,
    /// The reference clock (guest TSC → reference time).
    pub clock: RefClock,
    /// CRASH_P0..P4.
    pub crash_params: [u64; CRASH_PARAM_COUNT],
    /// CRASH_CTL read value (host-set: bit 63, advertising crash notification).
    pub crash_ctl: u64,
    /// REENLIGHTENMENT_CONTROL.
    pub reenlightenment_control: u64,
    /// TSC_EMULATION_CONTROL.
    pub tsc_emulation_control: u64,
    /// TSC_EMULATION_STATUS.
    pub tsc_emulation_status: u64,
    /// TSC_INVARIANT_CONTROL.
    pub tsc_invariant_control: u64,
}

impl PartitionState {
    /// The state after creation or system reset, keeping the reference clock.
    pub fn initial(clock: RefClock) -> PartitionState {
        PartitionState {
            guest_os_id: 0,
            hypercall: 0,
            reference_tsc: 0,
            tsc_page: TscPageStatus::Unset,
            clock,
            crash_params: [0; CRASH_PARAM_COUNT],
            crash_ctl: CRASH_CTL_NOTIFY,
            reenlightenment_control: 0,
            tsc_emulation_control: 0,
            tsc_emulation_status: 0,
            tsc_invariant_control: 0,
        }
    }
}

/// Per-VP Hyper-V state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpState {
    /// VP_INDEX.
    pub vp_index: u32,
    /// Added to the thread's CPU time (100 ns units) to form VP_RUNTIME; set so that VP_RUNTIME restarts at 0 on
    /// reset. In a saved [`EngineState`] it holds the VP_RUNTIME value at save time, so that VP_RUNTIME continues
    /// across migration.
    pub runtime_offset: i64,
    /// VP_ASSIST_PAGE, as stored.
    pub vp_assist_page: u64,
    /// SynIC registers.
    pub synic: SynicState,
    /// Synthetic timers.
    pub stimers: [StimerState; STIMER_COUNT],
}

impl VpState {
    /// The state after creation or reset.
    pub fn initial(vp_index: u32) -> VpState {
        VpState {
            vp_index,
            runtime_offset: 0,
            vp_assist_page: 0,
            synic: SynicState::initial(),
            stimers: [StimerState::default(); STIMER_COUNT],
        }
    }
}

/// The complete engine state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// [`STATE_VERSION`] at save time.
    pub version: u32,
    /// Partition-wide state.
    pub partition: PartitionState,
    /// One entry per vCPU, indexed by [`crate::VpId`].
    pub vps: Vec<VpState>,
}

/// Why a state could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The state was saved by another format version.
    #[error("engine state version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
    /// The state has another number of vCPUs.
    #[error("engine state has {found} vCPUs but this VM has {expected}")]
    VpCount { found: usize, expected: usize },
    /// A VP index in the state differs from the configured one.
    #[error("engine state gives vCPU {vp} VP index {found} but this VM uses {expected}")]
    VpIndex {
        vp: usize,
        found: u32,
        expected: u32,
    },
}

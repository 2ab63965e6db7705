//! Synthetic timers (STIMER0..3 CONFIG and COUNT).
//!
//! Engine I stores the registers and answers reads (KVM lets a guest read them even when the SynIC is not
//! active). Guest writes #GP unless the SynIC is active (KVM); with an active SynIC the timer semantics
//! (arming through [`crate::Platform::arm_timer`], expiry messages, direct mode) are engine II (issue 5) and
//! writes #GP until then.

use crate::state::VpState;
use crate::Gp;
use serde::{Deserialize, Serialize};
use tlfs::msr;

/// One synthetic timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StimerState {
    /// STIMERn_CONFIG.
    pub config: u64,
    /// STIMERn_COUNT.
    pub count: u64,
    /// Absolute reference time of the next expiry (0 = not armed).
    pub exp_time: u64,
    /// An expiry message is waiting for a free slot.
    pub msg_pending: bool,
}

/// Whether `index` is a synthetic timer MSR.
pub fn is_stimer_msr(index: u32) -> bool {
    (msr::STIMER0_CONFIG..=msr::STIMER3_COUNT).contains(&index)
}

/// (timer number, is_config) of a stimer MSR.
pub(crate) fn decode(index: u32) -> (usize, bool) {
    let off = index - msr::STIMER0_CONFIG;
    ((off / 2) as usize, off & 1 == 0)
}

/// Guest read.
pub(crate) fn read(vp: &VpState, index: u32) -> Result<u64, Gp> {
    if !is_stimer_msr(index) {
        return Err(Gp);
    }
    let (n, is_config) = decode(index);
    let t = &vp.stimers[n];
    Ok(if is_config { t.config } else { t.count })
}

/// Guest write with the SynIC active. Not implemented before engine II: #GP.
pub(crate) fn write(_vp: &mut VpState, _index: u32, _value: u64) -> Result<(), Gp> {
    Err(Gp)
}

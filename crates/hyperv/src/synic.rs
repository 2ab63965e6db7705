//! SynIC registers (SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0..15).
//!
//! Engine I implements the registers with KVM's guest-visible rules (storage, read-only SVERSION, the SINT vector
//! check) for a SynIC that QEMU activated with SYNIC2 (pages are not zeroed on enable). Message and event
//! delivery through the pages, the pending/EOM protocol and auto-EOI are engine II (issue 5); EOM is accepted
//! and currently has nothing to acknowledge.

use crate::platform::{Event, Platform, VpId};
use crate::state::VpState;
use crate::Gp;
use serde::{Deserialize, Serialize};
use tlfs::msr;

/// Per-VP SynIC registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynicState {
    /// SCONTROL.
    pub scontrol: u64,
    /// SIMP.
    pub simp: u64,
    /// SIEFP.
    pub siefp: u64,
    /// SINT0..15.
    pub sints: [u64; msr::SINT_COUNT],
}

impl SynicState {
    /// State after creation or reset, as QEMU leaves it: every SINT masked, SCONTROL/SIMP/SIEFP zero.
    pub fn initial() -> SynicState {
        SynicState {
            scontrol: 0,
            simp: 0,
            siefp: 0,
            sints: [msr::SINT_INITIAL; msr::SINT_COUNT],
        }
    }
}

/// Whether `index` is a SynIC MSR handled here.
pub fn is_synic_msr(index: u32) -> bool {
    matches!(index, msr::SCONTROL..=msr::EOM | msr::SINT0..=msr::SINT15)
}

/// Guest read of a SynIC MSR (activation already checked by the caller).
pub(crate) fn read(vp: &VpState, index: u32) -> Result<u64, Gp> {
    let s = &vp.synic;
    Ok(match index {
        msr::SCONTROL => s.scontrol,
        msr::SVERSION => msr::SYNIC_VERSION,
        msr::SIEFP => s.siefp,
        msr::SIMP => s.simp,
        msr::EOM => 0,
        msr::SINT0..=msr::SINT15 => s.sints[(index - msr::SINT0) as usize],
        _ => return Err(Gp),
    })
}

/// Guest write of a SynIC MSR (activation already checked by the caller).
pub(crate) fn write<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    index: u32,
    value: u64,
) -> Result<(), Gp> {
    let s = &mut vp.synic;
    match index {
        msr::SCONTROL => s.scontrol = value,
        msr::SVERSION => return Err(Gp),
        msr::SIEFP => s.siefp = value,
        msr::SIMP => s.simp = value,
        msr::EOM => {}
        msr::SINT0..=msr::SINT15 => {
            let sint = msr::SintMsr::from_bits(value);
            // KVM: a vector below 16 is refused only while the SINT is unmasked.
            if sint.vector() < 16 && !sint.masked() {
                return Err(Gp);
            }
            s.sints[(index - msr::SINT0) as usize] = value;
        }
        _ => return Err(Gp),
    }
    if matches!(index, msr::SCONTROL | msr::SIEFP | msr::SIMP) {
        platform.event(Event::SynicChanged {
            vp: id,
            msr: index,
            value,
        });
    }
    Ok(())
}

//! SynIC: registers (SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0..15), SINT delivery, message posting with the
//! pending/EOM protocol, event flags, and acknowledgement processing.
//!
//! Semantics follow KVM for a SynIC that QEMU activated with SYNIC2, plus QEMU's userspace rules where QEMU owns
//! the behaviour (event flags need SCONTROL and SIEFP enabled):
//! - enabling SIMP/SIEFP at a new page zeroes that page (what the guest sees under QEMU, whose zeroed overlay
//!   page appears there); a page outside RAM is accepted and simply never written;
//! - a SINT write with vector < 16 #GPs only while the SINT is unmasked; every other value is stored;
//! - raising a SINT does not look at SCONTROL; a masked SINT raises nothing;
//! - a message goes to slot `sint` of the SIMP page; a busy slot gets `msg_pending` set and the post fails with
//!   [`SynicError::Busy`] (or is silently dropped with `no_retry`, as for periodic stimers);
//! - EOM and the EOI of a SINT vector run acknowledgement processing: stimers waiting for that SINT retry, and
//!   the VMM is told through [`crate::Platform::sint_acked`] so that its staged messages can be retried.

use crate::engine::Engine;
use crate::platform::{Event, Platform, VpId};
use crate::state::VpState;
use crate::Gp;
use serde::{Deserialize, Serialize};
use tlfs::msr;
use tlfs::pages::{
    EVENT_FLAGS_SLOT_SIZE, MESSAGE_FLAG_PENDING, MESSAGE_PAYLOAD_SIZE, MESSAGE_SIZE,
    PAGE_OFFSET_MASK,
};

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

/// Why a SynIC delivery failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SynicError {
    /// No such vCPU or SINT, or the SynIC is not active.
    #[error("no such SynIC target")]
    NoTarget,
    /// The SINT is masked (KVM: -ENOENT). For messages the slot was already written.
    #[error("SINT masked")]
    Masked,
    /// SIMP (messages) or SCONTROL/SIEFP (events) not enabled (QEMU: -ENXIO).
    #[error("SynIC page not enabled")]
    NotEnabled,
    /// The message slot is occupied; `msg_pending` was set (KVM: -EAGAIN). Retry after the SINT is acknowledged.
    #[error("message slot busy")]
    Busy,
    /// Payload larger than 240 bytes or flag number beyond 2047.
    #[error("invalid message or flag")]
    Invalid,
    /// The page is not in guest RAM.
    #[error("SynIC page not in guest RAM")]
    Memory,
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

/// Raises SINT `sint` of a VP whose state is locked: a fixed interrupt with the SINT's vector (auto-EOI as
/// configured). SCONTROL is not consulted (KVM).
pub(crate) fn raise<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &VpState,
    sint: usize,
) -> Result<(), SynicError> {
    let v = msr::SintMsr::from_bits(*vp.synic.sints.get(sint).ok_or(SynicError::NoTarget)?);
    if v.masked() {
        return Err(SynicError::Masked);
    }
    platform.deliver_interrupt(id, v.vector(), v.auto_eoi());
    Ok(())
}

/// A message to post.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutMessage<'a> {
    pub message_type: u32,
    pub sender: u64,
    pub payload: &'a [u8],
    /// Drop the message silently when the slot is busy (periodic stimers).
    pub no_retry: bool,
}

/// Posts a message into slot `sint` of the SIMP page of a locked VP and raises the SINT (KVM's
/// `synic_deliver_msg`). The header's first 8 bytes change only through compare-exchange, so a guest clearing
/// `message_type` concurrently is never overwritten.
pub(crate) fn deliver_message<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &VpState,
    sint: usize,
    msg: &OutMessage<'_>,
) -> Result<(), SynicError> {
    let OutMessage {
        message_type,
        sender,
        payload,
        no_retry,
    } = *msg;
    if sint >= msr::SINT_COUNT || payload.len() > MESSAGE_PAYLOAD_SIZE || message_type == 0 {
        return Err(SynicError::Invalid);
    }
    let simp = msr::SynicPageMsr::from_bits(vp.synic.simp);
    if !simp.enable() {
        return Err(SynicError::NotEnabled);
    }
    let slot = (vp.synic.simp & !PAGE_OFFSET_MASK) + (sint * MESSAGE_SIZE) as u64;
    let pending_bit = u64::from(MESSAGE_FLAG_PENDING) << 40;
    let new_head = u64::from(message_type) | ((payload.len() as u64) << 32);
    // Bounded retries: only a guest racing on the header makes the compare-exchange fail.
    for _ in 0..16 {
        let mut b = [0u8; 8];
        platform
            .read_gpa(slot, &mut b)
            .map_err(|_| SynicError::Memory)?;
        let head = u64::from_le_bytes(b);
        if head as u32 != 0 {
            if no_retry {
                return Ok(());
            }
            let prev = platform
                .compare_exchange_u64(slot, head, head | pending_bit)
                .map_err(|_| SynicError::Memory)?;
            if prev != head {
                continue;
            }
            platform.mark_dirty(slot, 8);
            return Err(SynicError::Busy);
        }
        let mut body = Vec::with_capacity(8 + payload.len());
        body.extend_from_slice(&sender.to_le_bytes());
        body.extend_from_slice(payload);
        platform
            .write_gpa(slot + 8, &body)
            .map_err(|_| SynicError::Memory)?;
        let prev = platform
            .compare_exchange_u64(slot, head, new_head)
            .map_err(|_| SynicError::Memory)?;
        if prev != head {
            continue;
        }
        platform.mark_dirty(slot, 16 + payload.len() as u64);
        return raise(platform, id, vp, sint);
    }
    Err(SynicError::Busy)
}

/// Guest write of a SynIC MSR (activation already checked by the caller). `now` gives reference time for stimer
/// retries triggered by EOM.
pub(crate) fn write<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    index: u32,
    value: u64,
    now: &dyn Fn() -> u64,
) -> Result<(), Gp> {
    let s = &mut vp.synic;
    match index {
        msr::SCONTROL => s.scontrol = value,
        msr::SVERSION => return Err(Gp),
        msr::SIEFP | msr::SIMP => {
            let old = if index == msr::SIEFP { s.siefp } else { s.simp };
            let moved = old & 1 == 0 || (old ^ value) & !PAGE_OFFSET_MASK != 0;
            if value & 1 != 0 && moved {
                // QEMU shows a fresh (zeroed) overlay page where the guest enables SIMP/SIEFP; without overlays
                // the engine zeroes the page instead. Outside RAM nothing is written and, as with SYNIC2, the
                // write still succeeds.
                let gpa = value & !PAGE_OFFSET_MASK;
                if platform.write_gpa(gpa, &[0u8; 4096]).is_ok() {
                    platform.mark_dirty(gpa, 4096);
                }
            }
            if index == msr::SIEFP {
                s.siefp = value;
            } else {
                s.simp = value;
            }
        }
        msr::EOM => {
            ack(platform, id, vp, 0xFFFF, now);
            return Ok(());
        }
        msr::SINT0..=msr::SINT15 => {
            let sint = msr::SintMsr::from_bits(value);
            // KVM: a vector below 16 is refused only while the SINT is unmasked.
            if sint.vector() < 16 && !sint.masked() {
                return Err(Gp);
            }
            s.sints[(index - msr::SINT0) as usize] = value;
            return Ok(());
        }
        _ => return Err(Gp),
    }
    platform.event(Event::SynicChanged {
        vp: id,
        msr: index,
        value,
    });
    Ok(())
}

/// Acknowledgement processing for the SINTs in `mask` (EOM: all; EOI: those with the EOI'd vector).
pub(crate) fn ack<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    mask: u16,
    now: &dyn Fn() -> u64,
) {
    if mask == 0 {
        return;
    }
    crate::stimer::retry_acked(platform, id, vp, mask, now);
    platform.sint_acked(id, mask);
}

impl<P: Platform> Engine<P> {
    fn synic_vp(&self, vp: VpId) -> Result<std::sync::MutexGuard<'_, VpState>, SynicError> {
        if !self.config.synic {
            return Err(SynicError::NoTarget);
        }
        self.vp(vp).ok_or(SynicError::NoTarget)
    }

    /// Raises SINT `sint` of VP `vp` (for a SINT route, e.g. hyperv-testdev's SET_SINT). Any thread.
    pub fn raise_sint(&self, vp: VpId, sint: u8) -> Result<(), SynicError> {
        let v = self.synic_vp(vp)?;
        raise(&self.platform, vp, &v, usize::from(sint))
    }

    /// Posts a message to SINT `sint` of VP `vp` (QEMU's `hyperv_post_msg` for a device). `Busy` sets
    /// `msg_pending` in the slot: retry after [`Platform::sint_acked`] reports the SINT. Any thread.
    pub fn post_message(
        &self,
        vp: VpId,
        sint: u8,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), SynicError> {
        let v = self.synic_vp(vp)?;
        let msg = OutMessage {
            message_type,
            sender: 0,
            payload,
            no_retry: false,
        };
        deliver_message(&self.platform, vp, &v, usize::from(sint), &msg)
    }

    /// Sets event flag `flag` of SINT `sint` of VP `vp` with an atomic OR and raises the SINT only when the flag
    /// changed from 0 to 1 (QEMU's `hyperv_set_event_flag`). Returns whether the flag was newly set. Needs
    /// SCONTROL bit 0 and SIEFP enabled. Any thread.
    pub fn signal_event_flag(&self, vp: VpId, sint: u8, flag: u32) -> Result<bool, SynicError> {
        let v = self.synic_vp(vp)?;
        if usize::from(sint) >= msr::SINT_COUNT || flag >= tlfs::hypercall::EVENT_FLAGS_PER_SINT {
            return Err(SynicError::Invalid);
        }
        if v.synic.scontrol & 1 == 0 || v.synic.siefp & 1 == 0 {
            return Err(SynicError::NotEnabled);
        }
        let gpa = (v.synic.siefp & !PAGE_OFFSET_MASK)
            + (usize::from(sint) * EVENT_FLAGS_SLOT_SIZE) as u64
            + u64::from(flag / 64) * 8;
        let bit = 1u64 << (flag % 64);
        let old = self
            .platform
            .fetch_or_u64(gpa, bit)
            .map_err(|_| SynicError::Memory)?;
        self.platform.mark_dirty(gpa, 8);
        if old & bit != 0 {
            return Ok(false);
        }
        raise(&self.platform, vp, &v, usize::from(sint)).map(|()| true)
    }

    /// The local APIC of VP `vp` received an EOI for `vector` (a non-auto-EOI vector): acknowledgement processing
    /// for every SINT that uses this vector. Call on VP `vp`'s thread.
    pub fn apic_eoi(&self, vp: VpId, vector: u8) {
        let Ok(mut v) = self.synic_vp(vp) else { return };
        let mut mask = 0u16;
        for (i, &s) in v.synic.sints.iter().enumerate() {
            let s = msr::SintMsr::from_bits(s);
            if !s.masked() && s.vector() == vector {
                mask |= 1 << i;
            }
        }
        let now = || self.reference_time(vp);
        ack(&self.platform, vp, &mut v, mask, &now);
    }

    /// Whether `vector` is the vector of an unmasked auto-EOI SINT of VP `vp` (for an APIC model that must accept
    /// it without setting ISR).
    pub fn is_auto_eoi_vector(&self, vp: VpId, vector: u8) -> bool {
        let Ok(v) = self.synic_vp(vp) else {
            return false;
        };
        v.synic.sints.iter().any(|&s| {
            let s = msr::SintMsr::from_bits(s);
            !s.masked() && s.auto_eoi() && s.vector() == vector
        })
    }
}

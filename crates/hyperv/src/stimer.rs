//! Synthetic timers (STIMER0..3 CONFIG and COUNT), with KVM's semantics (`arch/x86/kvm/hyperv.c`):
//!
//! - CONFIG write: cancel; clear pending state and the expiry; if the timer was enabled and the new value is in
//!   message mode with SINT 0, force enable off; store; start if enabled.
//! - COUNT write: cancel; store; count 0 clears enable, otherwise auto_enable sets it; start if enabled.
//! - Start: one-shot → the deadline is COUNT (absolute reference time), already past → expire now; periodic →
//!   first deadline now + COUNT, later ones stay on the original grid (`exp + k·COUNT`, missed periods skipped).
//!   An enabled timer with COUNT 0 does not run. Deadline arithmetic saturates, so huge counts never wrap into the
//!   past.
//! - Expiry: direct mode → fixed interrupt `apic_vector`; message mode → HVMSG_TIMER_EXPIRED to SINT `sintx`
//!   (periodic timers drop the tick when the slot is busy). On success one-shot timers clear enable, periodic
//!   timers re-arm; on failure the timer waits ("message pending") until its SINT is acknowledged.
//!
//! Guest writes #GP while the SynIC is not active (checked by the caller); reads always work.

use crate::engine::Engine;
use crate::platform::{Platform, TimerId, VpId};
use crate::state::VpState;
use crate::synic::{deliver_message, OutMessage};
use crate::Gp;
use serde::{Deserialize, Serialize};
use tlfs::msr::{self, StimerConfig};
use tlfs::pages::{TimerMessagePayload, HVMSG_TIMER_EXPIRED};
use zerocopy::IntoBytes;

/// One synthetic timer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StimerState {
    /// STIMERn_CONFIG.
    pub config: u64,
    /// STIMERn_COUNT.
    pub count: u64,
    /// Absolute reference time of the current or last deadline (0 = none).
    pub exp_time: u64,
    /// An expiry could not be delivered; waiting for its SINT to be acknowledged.
    pub msg_pending: bool,
    /// A platform timer is armed for `exp_time`.
    pub armed: bool,
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

fn cleanup<P: Platform>(platform: &P, id: VpId, n: usize, t: &mut StimerState) {
    if t.armed {
        platform.cancel_timer(id, TimerId(n as u8));
    }
    t.armed = false;
    t.msg_pending = false;
    t.exp_time = 0;
}

/// Guest write with the SynIC active (activation and the enforce direct-mode check are done by the caller).
pub(crate) fn write<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    index: u32,
    value: u64,
    now: &dyn Fn() -> u64,
) -> Result<(), Gp> {
    if !is_stimer_msr(index) {
        return Err(Gp);
    }
    let (n, is_config) = decode(index);
    let t = &mut vp.stimers[n];
    if is_config {
        let old = StimerConfig::from_bits(t.config);
        let mut new = StimerConfig::from_bits(value);
        cleanup(platform, id, n, t);
        if old.enable() && !new.direct_mode() && new.sintx() == 0 {
            new.set_enable(false);
        }
        t.config = new.into_bits();
    } else {
        cleanup(platform, id, n, t);
        t.count = value;
        let mut c = StimerConfig::from_bits(t.config);
        if value == 0 {
            c.set_enable(false);
        } else if c.auto_enable() {
            c.set_enable(true);
        }
        t.config = c.into_bits();
    }
    process(platform, id, vp, n, now);
    Ok(())
}

/// KVM's `kvm_hv_process_stimers` for one timer: expire it if due, then (re)start or clean it up.
pub(crate) fn process<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    n: usize,
    now: &dyn Fn() -> u64,
) {
    let Some(t) = vp.stimers.get(n).copied() else {
        return;
    };
    if !StimerConfig::from_bits(t.config).enable() {
        return;
    }
    let now = now();
    if t.exp_time != 0 && now >= t.exp_time {
        expire(platform, id, vp, n, now);
    }
    let t = vp.stimers[n];
    if StimerConfig::from_bits(t.config).enable() && t.count != 0 {
        if !t.msg_pending {
            start(platform, id, n, &mut vp.stimers[n], now);
            if !vp.stimers[n].armed {
                // A one-shot deadline already in the past: expire at once, as KVM does.
                expire(platform, id, vp, n, now);
            }
        }
    } else {
        cleanup(platform, id, n, &mut vp.stimers[n]);
    }
}

/// Computes the next deadline and arms the platform timer. A one-shot timer whose deadline is already past is
/// left unarmed (`armed == false`) for the caller to expire.
fn start<P: Platform>(platform: &P, id: VpId, n: usize, t: &mut StimerState, now: u64) {
    let c = StimerConfig::from_bits(t.config);
    if c.periodic() {
        if t.exp_time == 0 {
            t.exp_time = now.saturating_add(t.count);
        } else if now >= t.exp_time {
            let remainder = (now - t.exp_time) % t.count;
            t.exp_time = now.saturating_add(t.count - remainder);
        }
    } else {
        t.exp_time = t.count;
        if now >= t.count {
            t.armed = false;
            return;
        }
    }
    platform.arm_timer(id, TimerId(n as u8), t.exp_time);
    t.armed = true;
}

fn expire<P: Platform>(platform: &P, id: VpId, vp: &mut VpState, n: usize, now: u64) {
    let t = vp.stimers[n];
    let c = StimerConfig::from_bits(t.config);
    vp.stimers[n].msg_pending = true;
    vp.stimers[n].armed = false;
    let delivered = if c.direct_mode() {
        platform.deliver_interrupt(id, c.apic_vector(), false);
        true
    } else {
        let payload = TimerMessagePayload {
            timer_index: n as u32,
            reserved: 0,
            expiration_time: t.exp_time,
            delivery_time: now,
        };
        let msg = OutMessage {
            message_type: HVMSG_TIMER_EXPIRED,
            sender: 0,
            payload: payload.as_bytes(),
            no_retry: c.periodic(),
        };
        deliver_message(platform, id, vp, usize::from(c.sintx()), &msg).is_ok()
    };
    if delivered {
        let t = &mut vp.stimers[n];
        t.msg_pending = false;
        if !c.periodic() {
            let mut c = c;
            c.set_enable(false);
            t.config = c.into_bits();
        }
    }
}

/// Acknowledgement of the SINTs in `mask`: message-mode timers waiting on one of them retry.
pub(crate) fn retry_acked<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    mask: u16,
    now: &dyn Fn() -> u64,
) {
    for n in 0..msr::STIMER_COUNT {
        let t = vp.stimers[n];
        let c = StimerConfig::from_bits(t.config);
        if t.msg_pending && c.enable() && !c.direct_mode() && mask & (1 << c.sintx()) != 0 {
            process(platform, id, vp, n, now);
        }
    }
}

impl<P: Platform> Engine<P> {
    /// Re-arms every running stimer of every VP after [`Engine::restore`] (absolute deadlines keep their phase).
    pub(crate) fn rearm_stimers(&self) {
        for i in 0..self.vp_count() {
            let id = VpId(i as u32);
            let Some(mut v) = self.vp(id) else { continue };
            for n in 0..msr::STIMER_COUNT {
                let t = &mut v.stimers[n];
                t.armed = false;
                if StimerConfig::from_bits(t.config).enable() && !t.msg_pending && t.exp_time != 0 {
                    self.platform.arm_timer(id, TimerId(n as u8), t.exp_time);
                    t.armed = true;
                }
            }
        }
    }
}

//! Engine timers (synthetic timers) on a host thread. Deadlines are absolute reference time (100 ns units); the
//! thread sleeps until the earliest one (no polling), then queues `timer_expired` as work for the vCPU and
//! kicks it. It reads the current reference time from the engine, which is allowed here: the timer thread is not
//! a platform method and holds no engine lock.
//!
//! A halted vCPU claims its own timers while it sleeps ([`HvTimers::claim`], through
//! `VcpuHook::claim_timers`): it sleeps until the earliest deadline itself and expires what is due when it wakes
//! ([`HvTimers::release`]), so the tick that ends a halt costs one thread wake-up instead of two. Re-arming a
//! claimed vCPU's timer gives its timers back to the thread.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use hyperv::{Engine, TimerId, VpId};

use super::platform::VmmPlatform;

/// Longest single sleep: a deadline far away is re-checked now and then (reference time may be re-based).
const MAX_SLEEP: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Queue {
    /// (vCPU, timer) → deadline in reference time.
    armed: BTreeMap<(u32, u8), u64>,
    /// Halted vCPUs that watch their own timers ([`HvTimers::claim`]); the thread leaves those alone.
    claimed: BTreeSet<u32>,
    /// While the thread sleeps: the reference time its sleep ends (`u64::MAX`: no deadline).
    sleeping_until: Option<u64>,
    stop: bool,
}

impl Queue {
    /// Whether the thread sleeps past `deadline` and must be woken for it.
    fn must_wake_for(&self, deadline: u64) -> bool {
        self.sleeping_until.is_some_and(|u| deadline < u)
    }

    /// The earliest deadline of `vp`'s timers.
    fn earliest(&self, vp: u32) -> Option<u64> {
        self.armed
            .range((vp, 0)..=(vp, u8::MAX))
            .map(|(_, &d)| d)
            .min()
    }
}

/// The armed engine timers of a VM.
#[derive(Default)]
pub(crate) struct HvTimers {
    queue: Mutex<Queue>,
    changed: Condvar,
    started: AtomicBool,
}

impl HvTimers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms or re-arms a timer. A vCPU that had claimed its timers gives them back to the thread.
    pub fn arm(&self, vp: VpId, timer: TimerId, deadline: u64) {
        let mut q = self.lock();
        q.armed.insert((vp.0, timer.0), deadline);
        q.claimed.remove(&vp.0);
        if q.must_wake_for(deadline) {
            self.changed.notify_all();
        }
    }

    /// Cancels a timer. (The thread wakes at the old deadline at worst and finds nothing due.)
    pub fn cancel(&self, vp: VpId, timer: TimerId) {
        self.lock().armed.remove(&(vp.0, timer.0));
    }

    /// Halted vCPU `vp` watches its own timers until [`HvTimers::release`]: returns the earliest deadline
    /// (reference time), `None` if none is armed.
    pub fn claim(&self, vp: VpId) -> Option<u64> {
        let mut q = self.lock();
        q.claimed.insert(vp.0);
        q.earliest(vp.0)
    }

    /// `vp` woke: its timers go back to the thread; returns (and disarms) those due at reference time `now()`
    /// (read only if `vp` has a timer armed), for the caller to expire on `vp`'s thread.
    pub fn release(&self, vp: VpId, now: impl FnOnce() -> u64) -> Vec<TimerId> {
        let mut q = self.lock();
        if !q.claimed.remove(&vp.0) || q.earliest(vp.0).is_none() {
            return Vec::new();
        }
        let now = now();
        let due: Vec<u8> = q
            .armed
            .range((vp.0, 0)..=(vp.0, u8::MAX))
            .filter(|(_, &d)| d <= now)
            .map(|(&(_, t), _)| t)
            .collect();
        for &t in &due {
            q.armed.remove(&(vp.0, t));
        }
        if q.earliest(vp.0).is_some_and(|d| q.must_wake_for(d)) {
            self.changed.notify_all();
        }
        due.into_iter().map(TimerId).collect()
    }

    /// Cancels every timer.
    pub fn clear(&self) {
        self.lock().armed.clear();
        self.changed.notify_all();
    }

    /// Stops the thread.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// Starts the timer thread (once).
    pub fn start(self: &Arc<Self>, engine: Weak<Engine<VmmPlatform>>) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("hv-timers".into())
            .spawn(move || me.thread(engine))
            .map(|_| ())
    }

    fn thread(&self, engine: Weak<Engine<VmmPlatform>>) {
        crate::timer::set_precise_timer_slack();
        let mut q = self.lock();
        loop {
            if q.stop {
                return;
            }
            if q.armed.keys().all(|(vp, _)| q.claimed.contains(vp)) {
                q.sleeping_until = Some(u64::MAX);
                q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                q.sleeping_until = None;
                continue;
            }
            let Some(engine) = engine.upgrade() else {
                return;
            };
            // Reference time is partition-wide; VP 0's view is as good as any (guest TSCs are synchronised).
            drop(q);
            let now = engine.reference_time(VpId(0));
            q = self.lock();
            let due: Vec<(u32, u8)> = q
                .armed
                .iter()
                .filter(|((vp, _), &d)| d <= now && !q.claimed.contains(vp))
                .map(|(&k, _)| k)
                .collect();
            if !due.is_empty() {
                for k in &due {
                    q.armed.remove(k);
                }
                drop(q);
                for (vp, t) in due {
                    engine.platform().queue_timer(VpId(vp), TimerId(t));
                }
                drop(engine);
                q = self.lock();
                continue;
            }
            let next = q
                .armed
                .iter()
                .filter(|((vp, _), _)| !q.claimed.contains(vp))
                .map(|(_, &d)| d)
                .min()
                .unwrap_or(now);
            drop(engine);
            let wait =
                Duration::from_nanos(next.saturating_sub(now).saturating_mul(100)).min(MAX_SLEEP);
            q.sleeping_until = Some(next);
            q = self
                .changed
                .wait_timeout(q, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            q.sleeping_until = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn armed(t: &HvTimers, vp: u32) -> Vec<(u8, u64)> {
        let q = t.lock();
        q.armed
            .range((vp, 0)..=(vp, u8::MAX))
            .map(|(&(_, n), &d)| (n, d))
            .collect()
    }

    #[test]
    fn claim_and_release() {
        // (timers armed on VP 1 as (timer, deadline), release time, expected due, expected left armed)
        type Case = (
            &'static [(u8, u64)],
            u64,
            &'static [u8],
            &'static [(u8, u64)],
        );
        let cases: [Case; 4] = [
            (&[], 100, &[], &[]),
            (&[(0, 50), (2, 200)], 100, &[0], &[(2, 200)]),
            (&[(0, 50), (3, 60)], 60, &[0, 3], &[]),
            (&[(1, 500)], 100, &[], &[(1, 500)]),
        ];
        for (arm, now, due, left) in cases {
            let t = HvTimers::default();
            t.arm(VpId(0), TimerId(0), 10); // another VP's timer is never touched
            for &(n, d) in arm {
                t.arm(VpId(1), TimerId(n), d);
            }
            let earliest = arm.iter().map(|&(_, d)| d).min();
            assert_eq!(t.claim(VpId(1)), earliest, "{arm:?}");
            assert!(t.lock().claimed.contains(&1));
            let got: Vec<u8> = t
                .release(VpId(1), || now)
                .into_iter()
                .map(|x| x.0)
                .collect();
            assert_eq!(got, due, "{arm:?} at {now}");
            assert_eq!(armed(&t, 1), left, "{arm:?} at {now}");
            assert!(!t.lock().claimed.contains(&1));
            assert_eq!(armed(&t, 0), [(0, 10)]);
        }
    }

    #[test]
    fn rearming_a_claimed_vp_gives_it_back_and_release_is_then_empty() {
        let t = HvTimers::default();
        t.arm(VpId(2), TimerId(1), 1_000);
        assert_eq!(t.claim(VpId(2)), Some(1_000));
        // The vCPU's own work re-arms the timer while it is claimed: the thread watches it again, and a release
        // afterwards expires nothing (the thread owns the timer).
        t.arm(VpId(2), TimerId(1), 2_000);
        assert!(!t.lock().claimed.contains(&2));
        assert!(t.release(VpId(2), || 5_000).is_empty());
        assert_eq!(armed(&t, 2), [(1, 2_000)]);
    }
}

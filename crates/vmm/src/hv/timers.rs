//! Engine timers (synthetic timers) on a host thread. Deadlines are absolute reference time (100 ns units); the
//! thread sleeps until the earliest one (no polling), then queues `timer_expired` as work for the vCPU and
//! kicks it. It reads the current reference time from the engine, which is allowed here: the timer thread is not
//! a platform method and holds no engine lock.

use std::collections::BTreeMap;
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
    stop: bool,
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

    /// Arms or re-arms a timer.
    pub fn arm(&self, vp: VpId, timer: TimerId, deadline: u64) {
        self.lock().armed.insert((vp.0, timer.0), deadline);
        self.changed.notify_all();
    }

    /// Cancels a timer.
    pub fn cancel(&self, vp: VpId, timer: TimerId) {
        if self.lock().armed.remove(&(vp.0, timer.0)).is_some() {
            self.changed.notify_all();
        }
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
            if q.armed.is_empty() {
                q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
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
                .filter(|(_, &d)| d <= now)
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
            let next = q.armed.values().copied().min().unwrap_or(now);
            drop(engine);
            let wait =
                Duration::from_nanos(next.saturating_sub(now).saturating_mul(100)).min(MAX_SLEEP);
            q = self
                .changed
                .wait_timeout(q, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

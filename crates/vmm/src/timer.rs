//! Host time for the guest: a monotonic nanosecond clock and the guest TSC, plus the timer thread that fires
//! the APIC timers of all vCPUs at their host deadlines (no polling: it sleeps on a condition variable until
//! the earliest deadline or until a deadline changes).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Reads the host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86-64 and touches no memory.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The VM's reference clock: nanoseconds since the VM was created, and the TSC frequency.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    tsc_khz: u32,
}

impl Clock {
    /// A clock starting now, for a TSC running at `tsc_khz`.
    pub fn new(tsc_khz: u32) -> Clock {
        Clock {
            start: Instant::now(),
            tsc_khz: tsc_khz.max(1),
        }
    }

    /// Nanoseconds since the VM was created.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// The TSC frequency in Hz.
    pub fn tsc_hz(&self) -> u64 {
        u64::from(self.tsc_khz) * 1000
    }
}

/// The per-vCPU APIC timer deadlines (host nanoseconds on the [`Clock`]), watched by the timer thread.
#[derive(Debug)]
pub struct TimerQueue {
    deadlines: Mutex<Vec<Option<u64>>>,
    changed: Condvar,
}

impl TimerQueue {
    /// A queue for `n` vCPUs with nothing armed.
    pub fn new(n: usize) -> TimerQueue {
        TimerQueue {
            deadlines: Mutex::new(vec![None; n]),
            changed: Condvar::new(),
        }
    }

    /// Sets (or clears) vCPU `i`'s deadline. Call it with vCPU `i`'s state locked, right after the APIC
    /// operation that changed the deadline, so updates for one vCPU are ordered.
    pub fn set(&self, i: usize, deadline_ns: Option<u64>) {
        let mut d = self.deadlines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = d.get_mut(i) {
            if *slot != deadline_ns {
                *slot = deadline_ns;
                self.changed.notify_all();
            }
        }
    }

    /// Wakes the timer thread (to re-check its stop condition).
    pub fn notify(&self) {
        let _d = self.deadlines.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_all();
    }

    /// Blocks until at least one deadline is due (returns the due vCPUs, whose deadlines are cleared) or
    /// `stop()` returns true (returns `None`).
    pub fn wait_due(&self, clock: &Clock, stop: impl Fn() -> bool) -> Option<Vec<usize>> {
        let mut d = self.deadlines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if stop() {
                return None;
            }
            let now = clock.now_ns();
            let due: Vec<usize> = d
                .iter()
                .enumerate()
                .filter(|(_, x)| x.is_some_and(|t| t <= now))
                .map(|(i, _)| i)
                .collect();
            if !due.is_empty() {
                for &i in &due {
                    d[i] = None;
                }
                return Some(due);
            }
            let next = d.iter().flatten().min().copied();
            d = match next {
                Some(t) => {
                    self.changed
                        .wait_timeout(d, Duration::from_nanos(t - now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(d).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// Makes the calling thread's sleeps precise (the default timer slack is 50 µs).
pub fn set_precise_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn fires_due_deadlines_in_order() {
        let clock = Arc::new(Clock::new(1_000_000));
        let q = Arc::new(TimerQueue::new(3));
        let now = clock.now_ns();
        q.set(2, Some(now + 2_000_000));
        q.set(0, Some(now + 1_000_000));
        // Each vCPU fires once, never before its deadline, and 0 no later than 2 (a loaded host may report
        // both at once).
        let mut fired: Vec<(usize, u64)> = Vec::new();
        while fired.len() < 2 {
            let due = q.wait_due(&clock, || false).unwrap();
            let at = clock.now_ns();
            fired.extend(due.into_iter().map(|i| (i, at)));
        }
        let at = |i: usize| fired.iter().find(|f| f.0 == i).map(|f| f.1).unwrap();
        assert_eq!(fired.len(), 2, "{fired:?}");
        assert!(at(0) >= now + 1_000_000);
        assert!(at(2) >= now + 2_000_000);
        assert!(at(0) <= at(2));
    }

    #[test]
    fn stop_wakes_an_idle_queue() {
        let clock = Arc::new(Clock::new(1_000_000));
        let q = Arc::new(TimerQueue::new(1));
        let stop = Arc::new(AtomicBool::new(false));
        let (q2, c2, s2) = (q.clone(), clock.clone(), stop.clone());
        let t = std::thread::spawn(move || q2.wait_due(&c2, || s2.load(Ordering::SeqCst)));
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::SeqCst);
        q.notify();
        assert_eq!(t.join().unwrap(), None);
    }

    #[test]
    fn a_new_earlier_deadline_is_honoured() {
        let clock = Arc::new(Clock::new(1_000_000));
        let q = Arc::new(TimerQueue::new(2));
        let now = clock.now_ns();
        q.set(0, Some(now + 5_000_000_000));
        let (q2, c2) = (q.clone(), clock.clone());
        let t = std::thread::spawn(move || q2.wait_due(&c2, || false));
        std::thread::sleep(Duration::from_millis(10));
        q.set(1, Some(clock.now_ns() + 1_000_000));
        assert_eq!(t.join().unwrap(), Some(vec![1]));
        assert!(
            clock.now_ns() < now + 1_000_000_000,
            "did not wait for the late deadline"
        );
    }
}

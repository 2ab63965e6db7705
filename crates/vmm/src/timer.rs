//! Host time for the guest: a monotonic nanosecond clock and the guest TSC, plus the queue of APIC timer
//! deadlines that the timer thread fires at their host deadlines (no polling: it sleeps on a condition variable
//! until the earliest deadline or until an earlier one is set). A halted vCPU claims its own deadline and
//! sleeps until it itself ([`TimerQueue::claim`]).

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
///
/// A halted vCPU can *claim* its own deadline ([`TimerQueue::claim`]): it then sleeps with that deadline as
/// its timeout and fires its timer itself when it wakes, so a tick that ends a halt needs one thread wake-up
/// instead of two (timer thread, then vCPU thread). The timer thread ignores claimed deadlines until the vCPU
/// gives them back ([`TimerQueue::release`]) or someone else changes them ([`TimerQueue::set`] un-claims).
#[derive(Debug)]
pub struct TimerQueue {
    slots: Mutex<Slots>,
    changed: Condvar,
}

#[derive(Debug)]
struct Slots {
    deadlines: Vec<Option<u64>>,
    claimed: Vec<bool>,
    /// While the timer thread sleeps: the time its sleep ends (`u64::MAX` without a deadline).
    sleeping_until: Option<u64>,
}

impl Slots {
    /// Whether a deadline at `t` needs the sleeping timer thread woken (it would otherwise sleep past it). When
    /// the thread is awake it re-reads the deadlines before it sleeps again.
    fn must_wake_for(&self, t: u64) -> bool {
        self.sleeping_until.is_some_and(|u| t < u)
    }
}

impl TimerQueue {
    /// A queue for `n` vCPUs with nothing armed.
    pub fn new(n: usize) -> TimerQueue {
        TimerQueue {
            slots: Mutex::new(Slots {
                deadlines: vec![None; n],
                claimed: vec![false; n],
                sleeping_until: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or clears) vCPU `i`'s deadline. Call it with vCPU `i`'s state locked, right after the APIC
    /// operation that changed the deadline, so updates for one vCPU are ordered. A claimed deadline goes back
    /// to the timer thread.
    pub fn set(&self, i: usize, deadline_ns: Option<u64>) {
        let mut s = self.lock();
        let Some(slot) = s.deadlines.get_mut(i) else {
            return;
        };
        let changed = *slot != deadline_ns;
        *slot = deadline_ns;
        let was_claimed = std::mem::take(&mut s.claimed[i]);
        if (changed || was_claimed) && deadline_ns.is_some_and(|t| s.must_wake_for(t)) {
            self.changed.notify_all();
        }
    }

    /// vCPU `i` is about to sleep halted and watches its own deadline until [`TimerQueue::release`]: returns
    /// the deadline (`None`: nothing armed).
    pub fn claim(&self, i: usize) -> Option<u64> {
        let mut s = self.lock();
        let d = *s.deadlines.get(i)?;
        s.claimed[i] = true;
        d
    }

    /// vCPU `i` woke: the timer thread watches its deadline again. Returns whether the deadline is due at
    /// `now_ns` (the caller then fires the timer and [`TimerQueue::set`]s the next deadline).
    pub fn release(&self, i: usize, now_ns: u64) -> bool {
        let mut s = self.lock();
        let Some(&d) = s.deadlines.get(i) else {
            return false;
        };
        s.claimed[i] = false;
        match d {
            Some(t) if t <= now_ns => true,
            Some(t) => {
                if s.must_wake_for(t) {
                    self.changed.notify_all();
                }
                false
            }
            None => false,
        }
    }

    /// Wakes the timer thread (to re-check its stop condition).
    pub fn notify(&self) {
        let _s = self.lock();
        self.changed.notify_all();
    }

    /// Blocks until at least one unclaimed deadline is due (returns the due vCPUs, whose deadlines are cleared)
    /// or `stop()` returns true (returns `None`).
    pub fn wait_due(&self, clock: &Clock, stop: impl Fn() -> bool) -> Option<Vec<usize>> {
        let mut s = self.lock();
        loop {
            if stop() {
                return None;
            }
            let now = clock.now_ns();
            let watched = |s: &Slots| {
                s.deadlines
                    .iter()
                    .zip(&s.claimed)
                    .enumerate()
                    .filter_map(|(i, (d, &c))| if c { None } else { d.map(|t| (i, t)) })
                    .collect::<Vec<(usize, u64)>>()
            };
            let live = watched(&s);
            let due: Vec<usize> = live
                .iter()
                .filter(|&&(_, t)| t <= now)
                .map(|&(i, _)| i)
                .collect();
            if !due.is_empty() {
                for &i in &due {
                    s.deadlines[i] = None;
                }
                return Some(due);
            }
            let next = live.iter().map(|&(_, t)| t).min();
            s.sleeping_until = Some(next.unwrap_or(u64::MAX));
            s = match next {
                Some(t) => {
                    self.changed
                        .wait_timeout(s, Duration::from_nanos(t - now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
            };
            s.sleeping_until = None;
        }
    }
}

/// Makes the calling thread (a vCPU or timer thread) wake up promptly: its sleeps end within 1 ns of their
/// deadline (the default timer slack is 50 µs) and, under the fair scheduler, it asks for the shortest custom
/// slice ([`set_short_fair_slice`]). A tick needs a thread woken on time; on a shared host that is what decides
/// whether a periodic tick is dropped (see docs/performance.md).
pub fn set_precise_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    // Best effort: older kernels reject or ignore the slice, which only costs latency.
    let _ = set_short_fair_slice();
}

/// `struct sched_attr` of sched_setattr(2), up to `sched_period` (SCHED_ATTR_SIZE_VER0, 48 bytes).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// The shortest custom slice the fair scheduler accepts (Linux 6.12+: 100 µs .. 100 ms).
const FAIR_SLICE_NS: u64 = 100_000;

/// Under the fair scheduler (EEVDF, Linux 6.12+), gives the calling thread a 100 µs custom slice (the default
/// is a few ms): its virtual deadline when it wakes is then earlier, so it preempts the running task sooner;
/// its CPU share is unchanged. The thread's policy and nice value are kept; a real-time thread is left alone.
/// On this project's 2-core host with other sessions' processes running, it halved the ticks a 1 ms stimer
/// dropped.
pub fn set_short_fair_slice() -> std::io::Result<()> {
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr writes at most `size` bytes into `attr`, a valid SchedAttr of that size; pid 0 is
    // the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if attr.sched_policy != libc::SCHED_OTHER as u32 {
        return Ok(());
    }
    attr.size = size;
    attr.sched_flags = 0;
    attr.sched_runtime = FAIR_SLICE_NS;
    // SAFETY: sched_setattr reads `attr.size` bytes from a valid, initialised SchedAttr; pid 0 is the calling
    // thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
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
    fn the_short_slice_keeps_policy_and_nice() {
        // On a thread of its own: the slice and nice value must not leak into other tests' threads.
        std::thread::spawn(|| {
            // SAFETY: setpriority/getpriority on the calling thread (who 0) only.
            let nice = |n: Option<i32>| unsafe {
                if let Some(n) = n {
                    libc::setpriority(libc::PRIO_PROCESS, 0, n);
                }
                libc::getpriority(libc::PRIO_PROCESS, 0)
            };
            let before = nice(Some(5));
            match set_short_fair_slice() {
                // Kernels without custom slices reject the attribute: nothing to check then.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                r => r.unwrap(),
            }
            assert_eq!(nice(None), before);
            // SAFETY: sched_getscheduler on the calling thread.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
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
    fn claimed_deadlines_are_left_to_the_vcpu() {
        // (deadline of vCPU 0 relative to now in ms, release delay in ms, due at release). vCPU 0's deadlines
        // that must not fire with vCPU 1's (30 ms) are seconds away: a loaded host can stall a thread for tens
        // of milliseconds.
        let cases: [(Option<u64>, u64, bool); 3] =
            [(None, 0, false), (Some(1), 5, true), (Some(5000), 0, false)];
        for (rel, wait_ms, due) in cases {
            let clock = Arc::new(Clock::new(1_000_000));
            let q = Arc::new(TimerQueue::new(2));
            let now = clock.now_ns();
            let d0 = rel.map(|ms| now + ms * 1_000_000);
            q.set(0, d0);
            q.set(1, Some(now + 30_000_000));
            assert_eq!(q.claim(0), d0);
            // The timer thread skips the claimed deadline: vCPU 1's, later, is the first it reports.
            let (q2, c2) = (q.clone(), clock.clone());
            let t = std::thread::spawn(move || q2.wait_due(&c2, || false));
            std::thread::sleep(Duration::from_millis(wait_ms));
            assert_eq!(q.release(0, clock.now_ns()), due, "{rel:?}");
            if due {
                q.set(0, Some(clock.now_ns() + 5_000_000_000));
            }
            assert_eq!(t.join().unwrap(), Some(vec![1]), "{rel:?}");
        }
    }

    #[test]
    fn setting_a_claimed_deadline_gives_it_back() {
        let clock = Arc::new(Clock::new(1_000_000));
        let q = Arc::new(TimerQueue::new(1));
        q.set(0, Some(clock.now_ns() + 5_000_000_000));
        assert!(q.claim(0).is_some());
        let (q2, c2) = (q.clone(), clock.clone());
        let t = std::thread::spawn(move || q2.wait_due(&c2, || false));
        std::thread::sleep(Duration::from_millis(10));
        // Someone else re-arms the timer (e.g. an APIC write from another thread): the timer thread, asleep
        // without a deadline, must be woken for it.
        q.set(0, Some(clock.now_ns() + 1_000_000));
        assert_eq!(t.join().unwrap(), Some(vec![0]));
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

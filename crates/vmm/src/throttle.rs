//! vCPU throttling for live migration's auto-converge, with QEMU's semantics: at a throttle of `p` % every vCPU
//! runs for a 10 ms timeslice, then sleeps `p / (100 - p)` timeslices, so it gets `100 - p` % of wall time.
//!
//! ```text
//! ticker thread   every TIMESLICE * 100 / (100 - p): tick += 1, kick every vCPU
//! vCPU thread     before each entry into the guest: a tick it has not seen yet starts a sleep of
//!                 TIMESLICE * p / (100 - p) (ticks that arrive during the sleep are absorbed, as QEMU's
//!                 `throttle_thread_scheduled` does); the sleep waits on the vCPU's wake condition, so a
//!                 pause, a stop or an interrupt ends the wait and the run loop re-checks everything first
//! ```
//!
//! The throttle is VM-wide ([`CpuThrottle`] in the machine's shared state); [`ThrottleRun`] owns the ticker and
//! turns the throttle off when dropped (migration completed, failed or cancelled).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::machine::VmShared;

/// QEMU's `CPU_THROTTLE_TIMESLICE_NS`: how long a throttled vCPU runs between two sleeps.
pub const TIMESLICE: Duration = Duration::from_millis(10);

/// The highest throttle (QEMU's `CPU_THROTTLE_PCT_MAX`); the lowest non-zero one is 1.
pub const MAX_PERCENTAGE: u8 = 99;

/// How long a vCPU sleeps per tick at `pct` % (QEMU: `pct / (1 - pct)` timeslices); zero when off.
pub fn sleep_per_tick(pct: u8) -> Duration {
    let pct = u32::from(pct.min(MAX_PERCENTAGE));
    TIMESLICE * pct / (100 - pct)
}

/// The period of the ticks at `pct` % (QEMU: a timeslice over `1 - pct`): a timeslice of run plus the sleep.
pub fn tick_period(pct: u8) -> Duration {
    TIMESLICE + sleep_per_tick(pct)
}

/// The VM-wide throttle state, read by every vCPU before it enters the guest.
#[derive(Debug, Default)]
pub struct CpuThrottle {
    pct: AtomicU8,
    tick: AtomicU64,
}

impl CpuThrottle {
    /// The throttle in percent (0: off).
    pub fn percentage(&self) -> u8 {
        self.pct.load(Ordering::SeqCst)
    }
}

/// One vCPU's side of the throttle (owned by its thread).
#[derive(Debug, Default)]
pub(crate) struct VcpuThrottle {
    seen_tick: u64,
    until: Option<Instant>,
}

impl VcpuThrottle {
    /// Called before each entry into the guest: how long the vCPU must still sleep (`None`: run now). Cheap
    /// when the throttle is off (two atomic loads, no clock read).
    pub(crate) fn before_entry(&mut self, t: &CpuThrottle) -> Option<Duration> {
        let pct = t.percentage();
        let tick = t.tick.load(Ordering::SeqCst);
        if pct == 0 {
            self.seen_tick = tick;
            self.until = None;
            return None;
        }
        if tick == self.seen_tick && self.until.is_none() {
            return None;
        }
        let now = Instant::now();
        if tick != self.seen_tick {
            self.seen_tick = tick;
            if self.until.is_none() {
                self.until = Some(now + sleep_per_tick(pct));
            }
        }
        match self.until {
            Some(u) if u > now => Some(u - now),
            _ => {
                self.until = None;
                None
            }
        }
    }
}

/// A running throttle: the ticker thread. Dropping it turns the throttle off, wakes every sleeping vCPU and
/// ends the ticker.
pub struct ThrottleRun {
    shared: Arc<VmShared>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    ticker: Option<JoinHandle<()>>,
}

impl ThrottleRun {
    pub(crate) fn new(shared: Arc<VmShared>) -> ThrottleRun {
        ThrottleRun {
            shared,
            stop: Arc::new((Mutex::new(false), Condvar::new())),
            ticker: None,
        }
    }

    /// The throttle in percent (0: off).
    pub fn percentage(&self) -> u8 {
        self.shared.throttle.percentage()
    }

    /// Sets the throttle to `pct` %, clamped to 1..=99 as QEMU's `cpu_throttle_set` does, and starts the ticker
    /// on the first call. Returns the percentage in force.
    pub fn set(&mut self, pct: u8) -> u8 {
        let pct = pct.clamp(1, MAX_PERCENTAGE);
        self.shared.throttle.pct.store(pct, Ordering::SeqCst);
        tracing::debug!(pct, "vCPU throttle");
        if self.ticker.is_none() {
            let shared = self.shared.clone();
            let stop = self.stop.clone();
            match std::thread::Builder::new()
                .name("cpu-throttle".into())
                .spawn(move || ticker(&shared, &stop))
            {
                Ok(h) => self.ticker = Some(h),
                Err(e) => {
                    // Without a ticker the vCPUs are never told to sleep: the migration goes on unthrottled.
                    tracing::warn!("cannot start the vCPU throttle thread: {e}");
                    self.shared.throttle.pct.store(0, Ordering::SeqCst);
                    return 0;
                }
            }
        }
        pct
    }
}

impl Drop for ThrottleRun {
    fn drop(&mut self) {
        self.shared.throttle.pct.store(0, Ordering::SeqCst);
        {
            let (m, cv) = &*self.stop;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(h) = self.ticker.take() {
            let _ = h.join();
        }
        // A vCPU sleeping for the throttle re-checks it now.
        for v in &self.shared.vcpus {
            let _st = v.lock();
            v.wake_up();
        }
    }
}

/// The ticker: one tick per period, each followed by a kick of every vCPU (out of `KVM_RUN`, to its sleep).
fn ticker(shared: &VmShared, stop: &(Mutex<bool>, Condvar)) {
    let (m, cv) = stop;
    let mut stopped = m.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let pct = shared.throttle.percentage();
        if *stopped || pct == 0 || shared.stopping() {
            return;
        }
        let deadline = Instant::now() + tick_period(pct);
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            stopped = cv
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if *stopped {
            return;
        }
        shared.throttle.tick.fetch_add(1, Ordering::SeqCst);
        for v in &shared.vcpus {
            // Under the vCPU's lock, as every waker: no lost wake-up against its entry checks.
            let _st = v.lock();
            v.wake_up();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_and_period_follow_qemu() {
        // (pct, sleep per tick, tick period): the vCPU runs one timeslice per period.
        let cases: &[(u8, u64, u64)] = &[
            (0, 0, 10_000),
            (1, 101, 10_101),
            (20, 2_500, 12_500),
            (50, 10_000, 20_000),
            (90, 90_000, 100_000),
            (99, 990_000, 1_000_000),
            (100, 990_000, 1_000_000),
            (255, 990_000, 1_000_000),
        ];
        for &(pct, sleep_us, period_us) in cases {
            assert_eq!(
                sleep_per_tick(pct).as_micros(),
                u128::from(sleep_us),
                "{pct}"
            );
            assert_eq!(tick_period(pct).as_micros(), u128::from(period_us), "{pct}");
            // Share of wall time the vCPU keeps: 100 - pct %.
            let run = TIMESLICE.as_secs_f64() / tick_period(pct).as_secs_f64();
            let expected = f64::from(100 - pct.min(MAX_PERCENTAGE)) / 100.0;
            assert!((run - expected).abs() < 1e-6, "{pct}: {run}");
        }
    }

    #[test]
    fn a_throttled_vcpu_still_pauses_and_stops_promptly() {
        use crate::machine::{Machine, VmConfig};
        use crate::test_support::{NoDevices, NoKernel};
        let cfg = VmConfig {
            ram_size: 16 << 20,
            vcpus: 1,
            ..VmConfig::default()
        };
        // A real machine running zeroed RAM (no KVM here: nothing to check).
        let Ok((m, fds)) = Machine::new(cfg, Arc::new(NoKernel), Arc::new(NoDevices)) else {
            return;
        };
        let handle = m.handle();
        let runner = std::thread::spawn(move || m.run(fds));
        let mut run = ThrottleRun::new(handle.shared().clone());
        assert_eq!(run.set(200), MAX_PERCENTAGE);
        assert_eq!(run.percentage(), 99);
        // After the first tick (1 s at 99 %) the vCPU sleeps 990 ms out of every second.
        std::thread::sleep(tick_period(99) + Duration::from_millis(200));
        let t = Instant::now();
        let paused = handle.pause_all();
        let pause = t.elapsed();
        assert!(
            handle.is_parked(0),
            "the vCPU parked (the machine still runs)"
        );
        assert!(pause < Duration::from_millis(300), "pause took {pause:?}");
        drop(paused);
        // Throttle off: a sleeping vCPU is woken and runs again; a new throttle, then a stop mid-sleep.
        drop(run);
        assert_eq!(handle.shared().throttle.percentage(), 0);
        let mut run = ThrottleRun::new(handle.shared().clone());
        run.set(99);
        std::thread::sleep(tick_period(99) + Duration::from_millis(200));
        let t = Instant::now();
        handle.stop();
        let _ = runner.join();
        let stop = t.elapsed();
        assert!(stop < Duration::from_millis(500), "stop took {stop:?}");
        drop(run);
    }

    #[test]
    fn a_vcpu_sleeps_once_per_tick() {
        let t = CpuThrottle::default();
        let mut v = VcpuThrottle::default();
        // Off: never sleeps, even with ticks.
        assert_eq!(v.before_entry(&t), None);
        t.tick.fetch_add(1, Ordering::SeqCst);
        assert_eq!(v.before_entry(&t), None);
        // On, no new tick yet: runs.
        t.pct.store(50, Ordering::SeqCst);
        assert_eq!(v.before_entry(&t), None);
        // A tick: sleeps up to 10 ms (50 %), and again (the remainder) after a spurious wake-up.
        t.tick.fetch_add(1, Ordering::SeqCst);
        let d = v.before_entry(&t).expect("sleeps");
        assert!(
            d <= Duration::from_millis(10) && d > Duration::from_millis(5),
            "{d:?}"
        );
        let again = v.before_entry(&t).expect("still sleeps");
        assert!(again <= d, "{again:?} > {d:?}");
        // Two more ticks during the sleep are absorbed: no longer sleep.
        t.tick.fetch_add(2, Ordering::SeqCst);
        let d2 = v.before_entry(&t).expect("still sleeps");
        assert!(d2 <= again, "{d2:?}");
        // Throttle off: the sleep ends at once.
        t.pct.store(0, Ordering::SeqCst);
        assert_eq!(v.before_entry(&t), None);
        t.pct.store(1, Ordering::SeqCst);
        assert_eq!(v.before_entry(&t), None, "no tick since");
        // The sleep ends at its deadline.
        t.tick.fetch_add(1, Ordering::SeqCst);
        let d = v.before_entry(&t).expect("1 % sleeps about 101 µs");
        assert!(d <= sleep_per_tick(1), "{d:?}");
        std::thread::sleep(d + Duration::from_millis(1));
        assert_eq!(v.before_entry(&t), None);
    }
}

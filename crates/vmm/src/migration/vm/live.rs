//! Live migration: iterative pre-copy with KVM dirty logging, then stop-and-copy.
//!
//! ```text
//! setup      dirty logging on (KVM_MEM_LOG_DIRTY_PAGES on every RAM slot), the engine's dirty set emptied;
//!            sync 1 = every page                                               MIGRATION_PASS 1
//! pass 1     every non-zero page, while the guest runs (rate-limited)
//! sync k     KVM's dirty log ∪ the pages the VMM wrote (engine, PV EOI) ∪ all of RAM after a reset
//!                                                                              MIGRATION_PASS k
//!            converge when remaining / bandwidth <= downtime limit, or after MAX_SYNCS syncs
//!            auto-converge: at the first sync 1 s or more after the last period, the period's dirtied bytes
//!            against its sent bytes may throttle the vCPUs (see [`ConvergeTrigger`])
//! pass k     the pages dirtied since sync k-1 (zero pages as ZeroPages records), rate-limited
//! stop       every vCPU stopped through the rendezvous (pending exits completed); a last sync
//!            (MIGRATION_PASS), the last dirty pages without rate limit, vCPU/device/engine state, the
//!            source's run state (GlobalState), End
//! ```
//!
//! With auto-converge the vCPUs stay throttled until the stop-and-copy pass stops them, or until the save fails
//! or is cancelled. The caller gets the stopped vCPUs back ([`Paused`]) and keeps the source paused until the destination
//! confirms; dirty logging is turned off whatever the outcome.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{vm_err, write_machine_state, MigrationError};
use crate::hv::HvGlue;
use crate::layout::MemoryLayout;
use crate::machine::{Paused, VmHandle, VmShared};
use crate::migration::format::{ConfigSection, PageBatch, SectionKind, StreamWriter, PAGE_SIZE};

/// Dirty-bitmap syncs before the source stops whatever the estimate (a guest that dirties memory faster than
/// it can be sent never converges; QEMU would iterate forever).
pub const MAX_SYNCS: u64 = 30;

/// QEMU's default downtime limit (ms).
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's default bandwidth limit (bytes/s; `MAX_THROTTLE`).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// Statistics of a live save, as `query-migrate` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LiveStats {
    /// Stream bytes written so far.
    pub bytes: u64,
    /// Bytes written while the guest ran (header, config and the pre-copy passes).
    pub precopy_bytes: u64,
    /// Bytes written while the vCPUs were stopped (last pages and state).
    pub downtime_bytes: u64,
    /// Non-zero pages sent (a page sent in two passes counts twice).
    pub pages: u64,
    /// Zero pages met (elided in pass 1, ZeroPages records later).
    pub zero_pages: u64,
    /// Bytes of RAM still to send: the pages of pass 1 not yet scanned, then the dirty pages of the last sync.
    pub remaining: u64,
    /// Dirty-bitmap syncs so far (QEMU's `dirty-sync-count`; each one is a MIGRATION_PASS).
    pub dirty_syncs: u64,
    /// Send rate of the last pass (bytes/s).
    pub bandwidth: f64,
    /// Pages sent per second in the last pass.
    pub pages_per_second: f64,
    /// Pages the guest dirtied per second between the last two syncs.
    pub dirty_pages_rate: u64,
    /// Estimated downtime (ms) if the source stopped now: the dirty bytes over the last pass's bandwidth (QEMU's
    /// estimate), or the dirty pages over the pages per second (zero pages included) it processed if larger.
    pub expected_downtime_ms: u64,
    /// Time from the start of the save to pass 1 (ms).
    pub setup_ms: u64,
    /// The vCPU throttle of auto-converge in force (%; 0: not throttling).
    pub cpu_throttle_percentage: u8,
}

/// Settings and controls shared between a running live save and its owner (QMP `migrate-set-parameters`
/// and `migrate_cancel` take effect at once).
pub struct LiveControl {
    /// Set to cancel: the save stops at the next section boundary with [`MigrationError::Cancelled`].
    pub cancel: AtomicBool,
    /// Bandwidth limit of the pre-copy passes in bytes/s (0: none). The stop-and-copy pass is not limited,
    /// as in QEMU.
    pub max_bandwidth: AtomicU64,
    /// The downtime the source may be stopped for (ms); pre-copy ends when the estimate is below it.
    pub downtime_limit_ms: AtomicU64,
    /// QEMU's `auto-converge` capability: throttle the vCPUs when pre-copy does not converge.
    pub auto_converge: AtomicBool,
    /// Auto-converge's parameters (QMP `migrate-set-parameters` changes them while the save runs).
    pub cpu_throttle_initial: AtomicU8,
    pub cpu_throttle_increment: AtomicU8,
    pub max_cpu_throttle: AtomicU8,
    pub throttle_trigger_threshold: AtomicU8,
    pub cpu_throttle_tailslow: AtomicBool,
    stats: Mutex<LiveStats>,
}

impl Default for LiveControl {
    fn default() -> Self {
        LiveControl {
            cancel: AtomicBool::new(false),
            max_bandwidth: AtomicU64::new(DEFAULT_MAX_BANDWIDTH),
            downtime_limit_ms: AtomicU64::new(DEFAULT_DOWNTIME_LIMIT_MS),
            auto_converge: AtomicBool::new(false),
            cpu_throttle_initial: AtomicU8::new(ThrottleParams::QEMU.initial),
            cpu_throttle_increment: AtomicU8::new(ThrottleParams::QEMU.increment),
            max_cpu_throttle: AtomicU8::new(ThrottleParams::QEMU.max),
            throttle_trigger_threshold: AtomicU8::new(ThrottleParams::QEMU.trigger_threshold),
            cpu_throttle_tailslow: AtomicBool::new(ThrottleParams::QEMU.tailslow),
            stats: Mutex::new(LiveStats::default()),
        }
    }
}

impl LiveControl {
    /// The statistics so far.
    pub fn stats(&self) -> LiveStats {
        *self.lock()
    }

    /// Auto-converge's parameters in force.
    pub fn throttle_params(&self) -> ThrottleParams {
        ThrottleParams {
            initial: self.cpu_throttle_initial.load(Ordering::SeqCst),
            increment: self.cpu_throttle_increment.load(Ordering::SeqCst),
            max: self.max_cpu_throttle.load(Ordering::SeqCst),
            trigger_threshold: self.throttle_trigger_threshold.load(Ordering::SeqCst),
            tailslow: self.cpu_throttle_tailslow.load(Ordering::SeqCst),
        }
    }

    /// Sets auto-converge's parameters (a running save uses them from its next period).
    pub fn set_throttle_params(&self, p: &ThrottleParams) {
        self.cpu_throttle_initial.store(p.initial, Ordering::SeqCst);
        self.cpu_throttle_increment
            .store(p.increment, Ordering::SeqCst);
        self.max_cpu_throttle.store(p.max, Ordering::SeqCst);
        self.throttle_trigger_threshold
            .store(p.trigger_threshold, Ordering::SeqCst);
        self.cpu_throttle_tailslow
            .store(p.tailslow, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, LiveStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut LiveStats)) {
        f(&mut self.lock());
    }

    fn cancelled(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::SeqCst) {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// QEMU's auto-converge parameters (`migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleParams {
    /// `cpu-throttle-initial`: the first throttle (%, 1..=99).
    pub initial: u8,
    /// `cpu-throttle-increment`: added at each later trigger (%, 1..=99).
    pub increment: u8,
    /// `max-cpu-throttle`: the highest throttle (%, `initial`..=99).
    pub max: u8,
    /// `throttle-trigger-threshold`: a period is "high" when it dirtied more than this share of the bytes it
    /// sent (%, 1..=100).
    pub trigger_threshold: u8,
    /// `cpu-throttle-tailslow`: smaller increments near convergence (the increment that would bring the dirty
    /// rate down to the threshold, at most `increment`).
    pub tailslow: bool,
}

impl ThrottleParams {
    /// QEMU's defaults.
    pub const QEMU: ThrottleParams = ThrottleParams {
        initial: 20,
        increment: 10,
        max: 99,
        trigger_threshold: 50,
        tailslow: false,
    };
}

impl Default for ThrottleParams {
    fn default() -> Self {
        ThrottleParams::QEMU
    }
}

/// The shortest auto-converge period: QEMU evaluates the dirty rate at the first dirty sync that comes 1 s or
/// more after the previous evaluation.
pub const CONVERGE_PERIOD: Duration = Duration::from_secs(1);

/// QEMU's auto-converge trigger: at the end of each period, the bytes the guest dirtied are compared with the
/// bytes sent in the same period. Every second period where the dirtied bytes exceed `trigger_threshold` % of
/// the sent ones (counted since the last trigger, not necessarily in a row) starts the throttle at
/// `initial` % or raises it (see [`throttle_down`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConvergeTrigger {
    high_periods: u32,
}

impl ConvergeTrigger {
    /// A period ended with `dirty` bytes dirtied and `sent` bytes sent, the throttle at `current` % (0: off).
    /// Returns the new throttle when it changes.
    pub fn period_ended(
        &mut self,
        p: &ThrottleParams,
        current: u8,
        dirty: u64,
        sent: u64,
    ) -> Option<u8> {
        let threshold = (u128::from(sent) * u128::from(p.trigger_threshold) / 100) as u64;
        if dirty <= threshold {
            return None;
        }
        self.high_periods += 1;
        if self.high_periods < 2 {
            return None;
        }
        self.high_periods = 0;
        let next = throttle_down(p, current, dirty, threshold);
        (next != current).then_some(next)
    }
}

/// The next throttle after a trigger: `initial` when not throttling yet, else the current one plus `increment`
/// (with `tailslow`: plus the increment that would bring `dirty` down to `threshold`, if smaller), at most
/// `max`; always within 1..=99.
pub fn throttle_down(p: &ThrottleParams, current: u8, dirty: u64, threshold: u64) -> u8 {
    let next = if current == 0 {
        u64::from(p.initial)
    } else {
        let current = u64::from(current.min(99));
        let increment = if p.tailslow && dirty > 0 {
            let cpu_now = 100 - current;
            let cpu_ideal = (cpu_now as f64 * (threshold as f64 / dirty as f64)) as u64;
            cpu_now
                .saturating_sub(cpu_ideal)
                .min(u64::from(p.increment))
        } else {
            u64::from(p.increment)
        };
        (current + increment).min(u64::from(p.max))
    };
    next.clamp(1, u64::from(crate::throttle::MAX_PERCENTAGE)) as u8
}

/// Auto-converge during one save: the period accounting and the throttle (off again when dropped).
struct AutoConverge<'a> {
    ctl: &'a LiveControl,
    shared: &'a std::sync::Arc<VmShared>,
    trigger: ConvergeTrigger,
    run: Option<crate::throttle::ThrottleRun>,
    period_start: Instant,
    period_sent0: u64,
    period_dirty_pages: u64,
}

impl<'a> AutoConverge<'a> {
    fn new(ctl: &'a LiveControl, shared: &'a std::sync::Arc<VmShared>) -> Self {
        AutoConverge {
            ctl,
            shared,
            trigger: ConvergeTrigger::default(),
            run: None,
            period_start: Instant::now(),
            period_sent0: 0,
            period_dirty_pages: 0,
        }
    }

    /// A pre-copy sync found `dirty_pages` new dirty pages, with `sent` stream bytes written so far.
    fn synced(&mut self, dirty_pages: u64, sent: u64) {
        self.period_dirty_pages += dirty_pages;
        if self.period_start.elapsed() < CONVERGE_PERIOD {
            return;
        }
        let dirty = self.period_dirty_pages * PAGE_SIZE as u64;
        let period_sent = sent.saturating_sub(self.period_sent0);
        self.period_start = Instant::now();
        self.period_sent0 = sent;
        self.period_dirty_pages = 0;
        if !self.ctl.auto_converge.load(Ordering::SeqCst) {
            return;
        }
        let current = self.run.as_ref().map_or(0, |r| r.percentage());
        let p = self.ctl.throttle_params();
        if let Some(next) = self.trigger.period_ended(&p, current, dirty, period_sent) {
            let run = self
                .run
                .get_or_insert_with(|| crate::throttle::ThrottleRun::new(self.shared.clone()));
            let pct = run.set(next);
            tracing::debug!(pct, dirty, period_sent, "auto-converge: vCPUs throttled");
            self.ctl.update(|s| s.cpu_throttle_percentage = pct);
        }
    }
}

impl Drop for AutoConverge<'_> {
    fn drop(&mut self) {
        // Throttling ends with the pre-copy (stop-and-copy, failure or cancel).
        self.run = None;
        self.ctl.update(|s| s.cpu_throttle_percentage = 0);
    }
}

/// What a live save tells its owner while it runs (the QMP glue turns them into events and run states).
pub trait LiveEvents {
    /// Dirty-bitmap sync number `n` (from 1): QEMU's MIGRATION_PASS.
    fn pass(&self, n: u64);
    /// The vCPUs are about to be stopped for the stop-and-copy pass (QEMU's STOP, `finish-migrate`). Returns
    /// whether the guest was running (not paused by its owner): the destination runs only if it was.
    fn stopping(&self) -> bool;
}

/// The set of dirty pages, one bitmap per RAM region (KVM's layout: bit `i` = page `i` of the region).
struct DirtySet {
    maps: Vec<Vec<u64>>,
    pages: Vec<u64>,
}

impl DirtySet {
    fn new(layout: &MemoryLayout) -> DirtySet {
        let pages: Vec<u64> = layout
            .regions
            .iter()
            .map(|r| r.size / PAGE_SIZE as u64)
            .collect();
        let maps = pages
            .iter()
            .map(|&p| vec![0u64; p.div_ceil(64) as usize])
            .collect();
        DirtySet { maps, pages }
    }

    fn fill(&mut self) {
        for (m, &p) in self.maps.iter_mut().zip(&self.pages) {
            m.fill(u64::MAX);
            let tail = p % 64;
            if tail != 0 {
                if let Some(last) = m.last_mut() {
                    *last = (1u64 << tail) - 1;
                }
            }
        }
    }

    fn merge_kvm(&mut self, slot: usize, log: &[u64]) {
        if let Some(m) = self.maps.get_mut(slot) {
            for (d, s) in m.iter_mut().zip(log) {
                *d |= *s;
            }
        }
    }

    /// Adds page frame `pfn` if it is RAM.
    fn add_pfn(&mut self, layout: &MemoryLayout, pfn: u64) {
        let Some(gpa) = pfn.checked_mul(PAGE_SIZE as u64) else {
            return;
        };
        for (i, r) in layout.regions.iter().enumerate() {
            if gpa >= r.start && gpa - r.start < r.size {
                let page = (gpa - r.start) / PAGE_SIZE as u64;
                if let Some(w) = self.maps[i].get_mut((page / 64) as usize) {
                    *w |= 1 << (page % 64);
                }
                return;
            }
        }
    }

    fn count(&self) -> u64 {
        self.maps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The dirty pages' addresses, and an empty set.
    fn drain(&mut self, layout: &MemoryLayout) -> Vec<u64> {
        let mut out = Vec::new();
        for (m, r) in self.maps.iter_mut().zip(&layout.regions) {
            for (wi, w) in m.iter_mut().enumerate() {
                let mut bits = std::mem::take(w);
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    out.push(r.start + (wi as u64 * 64 + b) * PAGE_SIZE as u64);
                }
            }
        }
        out
    }
}

/// Turns dirty logging off when dropped (success, failure or cancel).
struct LoggingGuard<'a>(&'a VmShared);

impl Drop for LoggingGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_dirty_logging(false) {
            tracing::warn!("cannot turn dirty logging off: {e}");
        }
    }
}

/// Longest burst the rate limiter allows after a slow period (QEMU's rate limit works in 100 ms windows).
const THROTTLE_WINDOW: Duration = Duration::from_millis(100);

/// Average-rate limiter for the pre-copy passes: after `n` bytes since `start`, waits until
/// `start + n / limit`. Restarts when the limit changes.
struct Throttle {
    start: Instant,
    bytes: u64,
    limit: u64,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            start: Instant::now(),
            bytes: 0,
            limit: 0,
        }
    }

    fn account(&mut self, bytes: u64, ctl: &LiveControl) -> Result<(), MigrationError> {
        let limit = ctl.max_bandwidth.load(Ordering::SeqCst);
        if limit != self.limit {
            *self = Throttle {
                start: Instant::now(),
                bytes: 0,
                limit,
            };
        }
        if limit == 0 {
            return Ok(());
        }
        self.bytes += bytes;
        let mut due = self.start + Duration::from_secs_f64(self.bytes as f64 / limit as f64);
        // No credit for slow periods (scanning zero pages, a slow receiver) beyond one window: what was not
        // sent then does not make a later burst faster than the limit.
        let now = Instant::now();
        if now > due + THROTTLE_WINDOW {
            self.start = now - THROTTLE_WINDOW;
            self.bytes = (limit as f64 * THROTTLE_WINDOW.as_secs_f64()) as u64;
            due = now;
        }
        loop {
            ctl.cancelled()?;
            let now = Instant::now();
            if now >= due || ctl.max_bandwidth.load(Ordering::SeqCst) != limit {
                return Ok(());
            }
            std::thread::sleep((due - now).min(Duration::from_millis(20)));
        }
    }
}

/// Collects every dirty page (KVM's log of each RAM slot, the VMM's own writes, all of RAM after a reset).
fn sync(
    shared: &VmShared,
    hv: Option<&HvGlue>,
    dirty: &mut DirtySet,
    epoch: &mut u64,
) -> Result<(), MigrationError> {
    for slot in 0..shared.layout.regions.len() {
        let log = shared.take_dirty_log(slot).map_err(vm_err)?;
        dirty.merge_kvm(slot, &log);
    }
    if let Some(hv) = hv {
        for pfn in hv.take_dirty_pages() {
            dirty.add_pfn(&shared.layout, pfn);
        }
    }
    let now = shared.ram_epoch();
    if now != *epoch {
        *epoch = now;
        dirty.fill();
    }
    Ok(())
}

/// Sends the pages at `gpas`: non-zero ones as Memory records, zero ones dropped (`first`: the receiver
/// starts from zeroed RAM) or as ZeroPages records. With `throttle`, rate-limited and cancellable.
#[allow(clippy::too_many_arguments)]
fn send_pages<W: Write>(
    shared: &VmShared,
    w: &mut StreamWriter<W>,
    gpas: impl Iterator<Item = u64>,
    first: bool,
    ctl: &LiveControl,
    mut throttle: Option<&mut Throttle>,
    remaining_pages: u64,
) -> Result<(), MigrationError> {
    let mut batch = PageBatch::new(!first);
    let mut page = [0u8; PAGE_SIZE];
    let mut left = remaining_pages;
    let mut last = w.written();
    let (mut sent, mut zero) = (0u64, 0u64);
    for gpa in gpas {
        read_page(shared, gpa, &mut page)?;
        batch.add(w, gpa, &page)?;
        left = left.saturating_sub(1);
        // After each section, and every 8192 pages of a long run of zero pages (progress, cancel).
        if w.written() != last || left.is_multiple_of(8192) {
            let n = w.written() - last;
            last = w.written();
            ctl.update(|s| {
                s.bytes = last;
                s.pages += batch.sent_pages - sent;
                s.zero_pages += batch.zero_pages - zero;
                s.remaining = left * PAGE_SIZE as u64;
            });
            sent = batch.sent_pages;
            zero = batch.zero_pages;
            if let Some(t) = throttle.as_deref_mut() {
                t.account(n, ctl)?;
            } else {
                ctl.cancelled()?;
            }
        }
    }
    batch.flush(w)?;
    let n = w.written() - last;
    ctl.update(|s| {
        s.bytes = w.written();
        s.pages += batch.sent_pages - sent;
        s.zero_pages += batch.zero_pages - zero;
        s.remaining = 0;
    });
    if let Some(t) = throttle {
        t.account(n, ctl)?;
    }
    Ok(())
}

/// Copies the guest page at `gpa` (page-aligned, in RAM) while the guest may be writing it: a torn copy is
/// harmless, since a written page is in the next dirty sync and sent again. One `memcpy` from the host mapping
/// (vm-memory's volatile copy is a word loop, about ten times slower in debug builds).
fn read_page(
    shared: &VmShared,
    gpa: u64,
    page: &mut [u8; PAGE_SIZE],
) -> Result<(), MigrationError> {
    let bad = |e: &dyn std::fmt::Display| vm_err(format!("cannot read guest RAM at {gpa:#x}: {e}"));
    if !shared.layout.contains(gpa, PAGE_SIZE as u64) {
        return Err(bad(&"not RAM"));
    }
    let slice = shared
        .mem
        .get_slice(GuestAddress(gpa), PAGE_SIZE)
        .map_err(|e| bad(&e))?;
    if slice.len() != PAGE_SIZE {
        return Err(bad(&"the page crosses a region boundary"));
    }
    // SAFETY: `slice` covers PAGE_SIZE bytes of the live host mapping of guest RAM (checked above), which `mem`
    // keeps mapped while `shared` lives; `page` is a distinct, writable buffer of PAGE_SIZE bytes. The guest may
    // change the source bytes during the copy (they are shared with the VM, like every access vm-memory makes).
    unsafe {
        std::ptr::copy_nonoverlapping(slice.ptr_guard().as_ptr(), page.as_mut_ptr(), PAGE_SIZE)
    };
    Ok(())
}

/// Every page of RAM, in address order.
fn all_pages(shared: &VmShared) -> impl Iterator<Item = u64> + '_ {
    shared
        .layout
        .regions
        .iter()
        .flat_map(|r| (0..r.size / PAGE_SIZE as u64).map(move |i| r.start + i * PAGE_SIZE as u64))
}

/// Live-migrates the running machine of `vm` into `out`: pre-copy passes while the guest runs, then every vCPU
/// stopped through the rendezvous and the rest (see the module documentation). Returns the output, the
/// stopped vCPUs (the caller resumes them by dropping, or keeps the source paused once the destination
/// confirmed) and the statistics (also in `ctl`). On an error or a cancel the vCPUs are resumed before this
/// returns.
pub fn save_live<W: Write>(
    vm: &VmHandle,
    hv: Option<&HvGlue>,
    config: &ConfigSection,
    out: W,
    ctl: &LiveControl,
    events: &dyn LiveEvents,
) -> Result<(W, Paused, LiveStats), MigrationError> {
    let t0 = Instant::now();
    let shared: &VmShared = vm.shared();
    let total_pages = shared.layout.ram_size / PAGE_SIZE as u64;
    ctl.update(|s| {
        *s = LiveStats {
            remaining: shared.layout.ram_size,
            ..LiveStats::default()
        }
    });
    // Setup: dirty logging on, the VMM's dirty set emptied; pass 1 sends everything.
    shared.set_dirty_logging(true).map_err(vm_err)?;
    let _logging = LoggingGuard(shared);
    let mut dirty = DirtySet::new(&shared.layout);
    let mut epoch = shared.ram_epoch();
    sync(shared, hv, &mut dirty, &mut epoch)?;
    let _ = dirty.drain(&shared.layout);
    let mut w = StreamWriter::new(out)?;
    w.json(SectionKind::Config, config)?;
    let mut syncs = 1u64;
    ctl.update(|s| {
        s.dirty_syncs = syncs;
        s.bytes = w.written();
        s.setup_ms = t0.elapsed().as_millis() as u64;
    });
    events.pass(syncs);
    let mut throttle = Throttle::new();
    let mut converge = AutoConverge::new(ctl, vm.shared());
    throttle.account(w.written(), ctl)?;

    // Pre-copy.
    let mut pass_start = Instant::now();
    let mut pass_bytes0 = w.written();
    let mut pages0 = 0u64;
    let mut pass_pages = total_pages;
    let mut page_rate = 0.0f64;
    let mut sync_at = Instant::now();
    send_pages(
        shared,
        &mut w,
        all_pages(shared),
        true,
        ctl,
        Some(&mut throttle),
        total_pages,
    )?;
    loop {
        // Measure the pass just sent.
        let elapsed = pass_start.elapsed().as_secs_f64().max(1e-6);
        let pass_bytes = w.written() - pass_bytes0;
        let stats = ctl.stats();
        let prev_bw = stats.bandwidth;
        let bandwidth = if pass_bytes >= 64 * 1024 || prev_bw == 0.0 {
            pass_bytes as f64 / elapsed
        } else {
            prev_bw
        };
        let pps = (stats.pages - pages0) as f64 / elapsed;
        // Pages processed per second, zero pages included: the cost of the final pass per dirty page.
        if pass_pages >= 64 || page_rate == 0.0 {
            page_rate = pass_pages as f64 / elapsed;
        }
        // Sync.
        sync(shared, hv, &mut dirty, &mut epoch)?;
        syncs += 1;
        let since = sync_at.elapsed().as_secs_f64().max(1e-6);
        sync_at = Instant::now();
        let n = dirty.count();
        let remaining = n * PAGE_SIZE as u64;
        // QEMU estimates the downtime as the bytes still to send over the measured bandwidth. Pages per second
        // (zero pages included) is the other bound: pass 1 skips untouched zero pages at a rate no link has, so
        // after it a pages-only estimate would call a few MiB of dirty pages converged before auto-converge can
        // act. The larger of the two.
        let expected_ms = if page_rate > 0.0 && bandwidth > 0.0 {
            let by_pages = n as f64 / page_rate;
            let by_bytes = remaining as f64 / bandwidth;
            (by_pages.max(by_bytes) * 1000.0).ceil() as u64
        } else {
            u64::MAX
        };
        ctl.update(|s| {
            s.dirty_syncs = syncs;
            s.bandwidth = bandwidth;
            s.pages_per_second = pps;
            s.dirty_pages_rate = (n as f64 / since) as u64;
            s.remaining = remaining;
            s.expected_downtime_ms = expected_ms;
        });
        events.pass(syncs);
        ctl.cancelled()?;
        converge.synced(n, w.written());
        let limit = ctl.downtime_limit_ms.load(Ordering::SeqCst);
        if expected_ms <= limit || syncs >= MAX_SYNCS {
            tracing::debug!(syncs, remaining, bandwidth, expected_ms, "pre-copy ends");
            break;
        }
        pass_start = Instant::now();
        pass_bytes0 = w.written();
        pages0 = ctl.stats().pages;
        let gpas = dirty.drain(&shared.layout);
        pass_pages = gpas.len() as u64;
        send_pages(
            shared,
            &mut w,
            gpas.into_iter(),
            false,
            ctl,
            Some(&mut throttle),
            pass_pages,
        )?;
    }
    let precopy_bytes = w.written();

    // Stop-and-copy.
    let running = events.stopping();
    let paused = vm.pause_all();
    drop(converge);
    ctl.cancelled()?;
    sync(shared, hv, &mut dirty, &mut epoch)?;
    syncs += 1;
    ctl.update(|s| {
        s.dirty_syncs = syncs;
        s.precopy_bytes = precopy_bytes;
        s.remaining = dirty.count() * PAGE_SIZE as u64;
    });
    events.pass(syncs);
    let gpas = dirty.drain(&shared.layout);
    let count = gpas.len() as u64;
    send_pages(shared, &mut w, gpas.into_iter(), false, ctl, None, count)?;
    write_machine_state(&paused, hv, &mut w)?;
    no_reset_overlap(shared, epoch)?;
    w.json(SectionKind::GlobalState, &super::GlobalSection { running })?;
    ctl.cancelled()?;
    let bytes = w.written() + 16;
    let out = w.finish()?;
    ctl.update(|s| {
        s.bytes = bytes;
        s.downtime_bytes = bytes - precopy_bytes;
        s.remaining = 0;
        s.expected_downtime_ms = 0;
    });
    Ok((out, paused, ctl.stats()))
}

/// Refuses a stop-and-copy pass that a guest reset overlapped. The reset runs on the event loop's thread
/// and pauses the vCPUs itself, so it can run while this pass holds them: it rewrites RAM behind KVM's dirty
/// log (cleared and the kernel reloaded, then `ram_epoch` bumped) and queues a `VcpuRequest::Reset` for each
/// vCPU, which a vCPU only acts on once nobody pauses it, i.e. after this pass. So the race is real, and
/// worse than pages left unsent: even when the final sync saw the new epoch and sent all of RAM, the vCPU
/// state just written is the one from before the reset. Such a pass fails (the source resumes, its vCPUs
/// reset, and `migrate` can be tried again). Detected: any reset that bumped the epoch after the final sync
/// (a reset makes it odd before it touches RAM and even again after), a reset that was rewriting RAM at the
/// final sync (odd epoch), and any reset whose vCPU requests are still queued (posted before or during the
/// pass). A reset that has paused the vCPUs but not yet touched anything when this check runs happens, as
/// far as the destination is concerned, after the migration. A reset of a VM paused by `stop` also leaves its requests queued
/// until `cont`: such a VM cannot be saved before it has run again (its vCPU state is the one from before the
/// reset). [`crate::migration::snapshot::save_snapshot`] applies the same check to its one pass.
pub(crate) fn no_reset_overlap(shared: &VmShared, synced_epoch: u64) -> Result<(), MigrationError> {
    let queued = shared.vcpus.iter().any(|v| {
        v.lock()
            .requests
            .iter()
            .any(|r| matches!(r, crate::machine::VcpuRequest::Reset { .. }))
    });
    if queued || synced_epoch % 2 == 1 || shared.ram_epoch() != synced_epoch {
        return Err(vm_err(
            "the guest was reset while its state was being saved, or a reset is still pending on its \
             vCPUs (a reset cannot be carried over): the VM continues; save it again once it has run",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_waits_for_the_average_rate() {
        let ctl = LiveControl::default();
        ctl.max_bandwidth.store(1 << 20, Ordering::SeqCst);
        let mut t = Throttle::new();
        let start = Instant::now();
        // 200 KiB at 1 MiB/s: at least ~195 ms.
        for _ in 0..50 {
            t.account(4096, &ctl)
                .map_err(|e| e.to_string())
                .unwrap_or(());
        }
        let ms = start.elapsed().as_millis();
        assert!(ms >= 180, "{ms} ms");
        // No limit: no wait.
        ctl.max_bandwidth.store(0, Ordering::SeqCst);
        let start = Instant::now();
        for _ in 0..50 {
            assert!(t.account(1 << 20, &ctl).is_ok());
        }
        assert!(start.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn dirty_sets_follow_the_ram_regions() {
        // 3.5 GiB of RAM: a low region up to the hole (3 GiB) and 512 MiB from 4 GiB.
        let layout = MemoryLayout::new(0xE000_0000);
        assert_eq!(layout.regions.len(), 2, "{:?}", layout.regions);
        let high = layout.regions[1].start;
        let mut d = DirtySet::new(&layout);
        assert_eq!(d.count(), 0);
        // KVM's bitmap for the low slot, the VMM's page frames in both, one outside RAM (in the hole).
        d.merge_kvm(0, &[0b101, 1 << 63]);
        d.add_pfn(&layout, high / PAGE_SIZE as u64 + 1);
        d.add_pfn(&layout, 0xC000_0000 / PAGE_SIZE as u64);
        d.add_pfn(&layout, u64::MAX);
        d.merge_kvm(7, &[u64::MAX]);
        assert_eq!(d.count(), 4);
        assert_eq!(
            d.drain(&layout),
            vec![
                0,
                2 * PAGE_SIZE as u64,
                127 * PAGE_SIZE as u64,
                high + PAGE_SIZE as u64
            ]
        );
        assert_eq!(d.count(), 0);
        // Everything: every page of every region, no bit past a region's end.
        d.fill();
        let pages = layout.ram_size / PAGE_SIZE as u64;
        assert_eq!(d.count(), pages);
        let all = d.drain(&layout);
        assert_eq!(all.len() as u64, pages);
        assert_eq!(all.last(), Some(&(high + (512 << 20) - PAGE_SIZE as u64)));
        assert!(all.iter().all(|&g| layout.contains(g, PAGE_SIZE as u64)));
    }

    #[test]
    fn throttle_down_follows_qemu() {
        let q = ThrottleParams::QEMU;
        let tail = ThrottleParams {
            tailslow: true,
            ..q
        };
        let custom = ThrottleParams {
            initial: 50,
            increment: 30,
            max: 95,
            ..q
        };
        // (params, current %, dirty bytes, threshold bytes, next %)
        let cases: &[(ThrottleParams, u8, u64, u64, u8)] = &[
            (q, 0, 100, 50, 20),
            (q, 20, 100, 50, 30),
            (q, 90, 100, 50, 99),
            (q, 99, 100, 50, 99),
            (custom, 0, 100, 50, 50),
            (custom, 50, 100, 50, 80),
            (custom, 80, 100, 50, 95),
            // Tailslow: 80 % of CPU now, ideal 80 * 50 / 100 = 40: 40 more, at most the increment (10).
            (tail, 20, 100, 50, 30),
            // 40 % of CPU now, ideal 40 * 95 / 100 = 38: 2 more.
            (tail, 60, 100, 95, 62),
            // 10 % now, ideal 9.9 truncated to 9: 1 more.
            (tail, 90, 100, 99, 91),
            (tail, 0, 100, 99, 20),
            // Out-of-range inputs are clamped, never a panic.
            (q, 200, 100, 50, 99),
            (ThrottleParams { initial: 0, ..q }, 0, 1, 0, 1),
        ];
        for &(p, current, dirty, threshold, next) in cases {
            assert_eq!(
                throttle_down(&p, current, dirty, threshold),
                next,
                "{p:?} at {current} %, {dirty}/{threshold}"
            );
        }
    }

    #[test]
    fn the_trigger_fires_every_second_high_period() {
        let q = ThrottleParams::QEMU;
        // (current %, dirty, sent, expected new throttle) in sequence: a period is high when dirty > 50 % of
        // sent; every second high one (low ones in between do not reset the count) throttles.
        let steps: &[(u8, u64, u64, Option<u8>)] = &[
            (0, 50, 100, None),        // exactly the threshold: low
            (0, 51, 100, None),        // high #1
            (0, 10, 100, None),        // low
            (0, 51, 100, Some(20)),    // high #2: start at 20 %
            (20, 1000, 100, None),     // high #1
            (20, 1000, 100, Some(30)), // high #2: +10
            (30, 0, 0, None),          // nothing sent, nothing dirtied: low
            (30, 1, 0, None),          // nothing sent but dirtied: high #1
            (30, u64::MAX, u64::MAX, Some(40)),
            (99, 10, 1, None),
            (99, 10, 1, None), // at the maximum: no change to report
        ];
        let mut t = ConvergeTrigger::default();
        for (i, &(current, dirty, sent, expected)) in steps.iter().enumerate() {
            assert_eq!(
                t.period_ended(&q, current, dirty, sent),
                expected,
                "step {i}: {current} %, {dirty}/{sent}"
            );
        }
        // Another threshold: 100 % needs more dirtied than sent.
        let p = ThrottleParams {
            trigger_threshold: 100,
            ..q
        };
        let mut t = ConvergeTrigger::default();
        assert_eq!(t.period_ended(&p, 0, 100, 100), None);
        assert_eq!(t.period_ended(&p, 0, 100, 100), None);
        assert_eq!(t.period_ended(&p, 0, 101, 100), None);
        assert_eq!(t.period_ended(&p, 0, 101, 100), Some(20));
    }

    #[test]
    fn throttle_is_cancellable() {
        let ctl = LiveControl::default();
        ctl.max_bandwidth.store(1, Ordering::SeqCst);
        ctl.cancel.store(true, Ordering::SeqCst);
        let mut t = Throttle::new();
        assert!(matches!(
            t.account(1 << 20, &ctl),
            Err(MigrationError::Cancelled)
        ));
    }

    #[test]
    fn a_reset_overlapping_the_stop_is_refused() {
        use crate::machine::{Machine, VcpuRequest, VmConfig};
        use crate::test_support::{NoDevices, NoKernel};
        use std::sync::Arc;
        let cfg = VmConfig {
            ram_size: 16 << 20,
            vcpus: 2,
            ..VmConfig::default()
        };
        // A real, never started machine (no KVM here: nothing to check).
        let Ok((m, _fds)) = Machine::new(cfg, Arc::new(NoKernel), Arc::new(NoDevices)) else {
            return;
        };
        let handle = m.handle();
        let shared = handle.shared().clone();
        // (case, requests queued on vCPU 1, RAM epoch at the final sync, at the check, refused)
        let cases: &[(&str, &[VcpuRequest], u64, u64, bool)] = &[
            ("nothing happened", &[], 4, 4, false),
            (
                "a TLB flush is not a reset",
                &[VcpuRequest::FlushTlb],
                4,
                4,
                false,
            ),
            (
                "a reset began rewriting RAM after the final sync",
                &[],
                4,
                5,
                true,
            ),
            ("a reset rewrote RAM after the final sync", &[], 4, 6, true),
            (
                "a reset was rewriting RAM at the final sync",
                &[],
                5,
                5,
                true,
            ),
            ("a reset finished after the final sync", &[], 5, 6, true),
            (
                "vCPU resets still queued",
                &[VcpuRequest::Reset { entry: None }],
                6,
                6,
                true,
            ),
        ];
        for &(name, requests, at_sync, at_check, refused) in cases {
            shared.ram_epoch.store(at_sync, Ordering::SeqCst);
            let synced = shared.ram_epoch();
            let held = handle.hold_all();
            for r in requests.iter() {
                held.post(1, *r);
            }
            shared.ram_epoch.store(at_check, Ordering::SeqCst);
            let r = no_reset_overlap(&shared, synced);
            assert_eq!(r.is_err(), refused, "{name}: {:?}", r.err());
            if let Err(e) = r {
                assert!(e
                    .to_string()
                    .contains("the guest was reset while its state was being saved"));
            }
            shared.vcpus[1].lock().requests.clear();
        }
    }
}

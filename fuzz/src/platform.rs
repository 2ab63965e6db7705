//! A fake [`Platform`] for the engine fuzz targets: a small guest-memory model with an MMIO hole, one shared guest
//! clock, and a log of every guest-memory access and every request the engine made.
//!
//! The model itself never touches memory outside its RAM vector: every access is range-checked with overflow-safe
//! arithmetic and refused with [`MemError`] otherwise, exactly as the VMM's vm-memory glue does. The accesses are
//! logged so that the driver ([`crate::engine`]) can check *where* the engine wrote (only into pages the guest
//! designated) and that it reported every write through `mark_dirty`.
//!
//! Methods assert what the engine must never ask for, whatever the guest did: a VP or timer that does not exist,
//! a guest-memory access longer than a page, a flush target list naming unknown VPs. A failed assertion is a
//! crash, i.e. a finding.

use hyperv::{ApicAccess, Event, Gp, MemError, Platform, TimerId, VpId, VpWork};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use tlfs::pages::PAGE_SIZE;

/// Guest RAM: pages 0..RAM_PAGES at GPA 0 (minus the hole).
pub const RAM_PAGES: u64 = 16;
/// End of guest RAM.
pub const RAM_END: u64 = RAM_PAGES * PAGE_SIZE;
/// A non-RAM hole inside the RAM range (like an MMIO window): pages 8 and 9.
pub const HOLE: std::ops::Range<u64> = 0x8000..0xA000;
/// Longest single guest-memory access the engine may make (a SynIC page zeroing is exactly one page).
pub const MAX_ACCESS: u64 = PAGE_SIZE;

/// The kind of a logged guest-memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    FetchOr,
    CompareExchange,
}

/// One logged guest-memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub gpa: u64,
    pub len: u64,
    /// The access succeeded (the range was RAM and, for atomics, aligned).
    pub ok: bool,
    /// Guest memory may have changed (a successful write, OR, or a compare-exchange that matched).
    pub mutated: bool,
}

/// Everything the platform recorded since the last [`FuzzPlatform::take_log`].
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub accesses: Vec<Access>,
    pub dirty: Vec<(u64, u64)>,
    pub interrupts: Vec<(VpId, u8, bool)>,
    pub events: Vec<Event>,
    pub sint_acks: Vec<(VpId, u16)>,
    pub pv_eoi: Vec<(VpId, Option<u64>)>,
    pub flushes: Vec<(VpId, Vec<VpId>)>,
    pub apic: Vec<(VpId, u32, ApicAccess)>,
    pub kicks: usize,
    pub yields: usize,
}

struct Inner {
    ram: Vec<u8>,
    /// The guest TSC, shared by every VP (KVM keeps them synchronised).
    tsc: u64,
    runtime_ns: Vec<u64>,
    /// Armed timers: (vp, timer) → absolute reference-time deadline.
    timers: BTreeMap<(VpId, TimerId), u64>,
    /// Work queued with `run_on_vp`, in order.
    work: Vec<(VpId, VpWork)>,
    /// Interrupts delivered since creation.
    interrupts_total: usize,
    log: Log,
}

/// The fake platform. See the module documentation.
pub struct FuzzPlatform {
    inner: Mutex<Inner>,
    vps: usize,
    tsc_hz: u64,
    apic_ok: bool,
}

/// `[gpa, gpa + len)` as an index range of the RAM vector, if it is entirely RAM.
pub fn ram_range(gpa: u64, len: u64) -> Option<std::ops::Range<usize>> {
    let end = gpa.checked_add(len)?;
    if end > RAM_END || (gpa < HOLE.end && end > HOLE.start) {
        return None;
    }
    Some(usize::try_from(gpa).ok()?..usize::try_from(end).ok()?)
}

impl FuzzPlatform {
    /// `vps` vCPUs, a `tsc_hz` TSC starting at `tsc`, zeroed RAM. `apic_ok`: APIC-access forwarding succeeds.
    pub fn new(vps: usize, tsc_hz: u64, tsc: u64, apic_ok: bool) -> FuzzPlatform {
        FuzzPlatform {
            inner: Mutex::new(Inner {
                ram: vec![0; RAM_END as usize],
                tsc,
                runtime_ns: vec![0; vps],
                timers: BTreeMap::new(),
                work: Vec::new(),
                interrupts_total: 0,
                log: Log::default(),
            }),
            vps,
            tsc_hz,
            apic_ok,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_vp(&self, what: &str, vp: VpId) {
        assert!(
            vp.index() < self.vps,
            "engine called {what} for VP {} of {}",
            vp.0,
            self.vps
        );
    }

    /// The guest writes memory (not logged: only engine accesses are). Outside RAM the write is dropped, as a
    /// guest store to a hole would be.
    pub fn guest_write(&self, gpa: u64, data: &[u8]) {
        if let Some(r) = ram_range(gpa, data.len() as u64) {
            self.lock().ram[r].copy_from_slice(data);
        }
    }

    /// The guest reads memory (not logged).
    pub fn guest_read(&self, gpa: u64, len: u64) -> Option<Vec<u8>> {
        let r = ram_range(gpa, len)?;
        Some(self.lock().ram[r].to_vec())
    }

    /// A copy of all RAM.
    pub fn ram_snapshot(&self) -> Vec<u8> {
        self.lock().ram.clone()
    }

    /// The current guest TSC.
    pub fn tsc(&self) -> u64 {
        self.lock().tsc
    }

    /// Moves the guest clock forward by `ticks` (saturating) and every VP's CPU time by the equivalent time.
    pub fn advance(&self, ticks: u64) {
        let mut inner = self.lock();
        inner.tsc = inner.tsc.saturating_add(ticks);
        let ns = u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(self.tsc_hz.max(1)))
            .unwrap_or(u64::MAX);
        for r in inner.runtime_ns.iter_mut() {
            *r = r.saturating_add(ns);
        }
    }

    /// The armed timers.
    pub fn timers(&self) -> BTreeMap<(VpId, TimerId), u64> {
        self.lock().timers.clone()
    }

    /// Removes and returns the armed timers whose deadline is at most `now(vp)`.
    pub fn take_due_timers(&self, now: impl Fn(VpId) -> u64) -> Vec<(VpId, TimerId)> {
        let timers = self.timers();
        let due: Vec<(VpId, TimerId)> = timers
            .iter()
            .filter(|((vp, _), deadline)| **deadline <= now(*vp))
            .map(|(k, _)| *k)
            .collect();
        let mut inner = self.lock();
        for k in &due {
            inner.timers.remove(k);
        }
        due
    }

    /// Removes one armed timer (a VMM that lets it fire); returns whether it was armed.
    pub fn take_timer(&self, vp: VpId, timer: TimerId) -> bool {
        self.lock().timers.remove(&(vp, timer)).is_some()
    }

    /// Takes the queued VP work.
    pub fn take_work(&self) -> Vec<(VpId, VpWork)> {
        std::mem::take(&mut self.lock().work)
    }

    /// Interrupts delivered since creation.
    pub fn interrupts_total(&self) -> usize {
        self.lock().interrupts_total
    }

    /// Takes the log.
    pub fn take_log(&self) -> Log {
        std::mem::take(&mut self.lock().log)
    }

    fn log_access(
        &self,
        inner: &mut Inner,
        kind: AccessKind,
        gpa: u64,
        len: u64,
        ok: bool,
        mutated: bool,
    ) {
        assert!(
            len <= MAX_ACCESS,
            "engine made a {kind:?} of {len:#x} bytes at {gpa:#x} (more than a page)"
        );
        inner.log.accesses.push(Access {
            kind,
            gpa,
            len,
            ok,
            mutated,
        });
    }

    fn atomic(
        &self,
        kind: AccessKind,
        gpa: u64,
        f: impl FnOnce(u64) -> Option<u64>,
    ) -> Result<u64, MemError> {
        let mut inner = self.lock();
        if gpa & 7 != 0 {
            self.log_access(&mut inner, kind, gpa, 8, false, false);
            return Err(MemError::Misaligned { gpa });
        }
        let Some(r) = ram_range(gpa, 8) else {
            self.log_access(&mut inner, kind, gpa, 8, false, false);
            return Err(MemError::NotRam { gpa, len: 8 });
        };
        let mut b = [0u8; 8];
        b.copy_from_slice(&inner.ram[r.clone()]);
        let old = u64::from_le_bytes(b);
        let new = f(old);
        if let Some(new) = new {
            inner.ram[r].copy_from_slice(&new.to_le_bytes());
        }
        self.log_access(&mut inner, kind, gpa, 8, true, new.is_some());
        Ok(old)
    }
}

impl Platform for FuzzPlatform {
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let mut inner = self.lock();
        let len = buf.len() as u64;
        match ram_range(gpa, len) {
            Some(r) => {
                buf.copy_from_slice(&inner.ram[r]);
                self.log_access(&mut inner, AccessKind::Read, gpa, len, true, false);
                Ok(())
            }
            None => {
                self.log_access(&mut inner, AccessKind::Read, gpa, len, false, false);
                Err(MemError::NotRam { gpa, len })
            }
        }
    }

    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let mut inner = self.lock();
        let len = data.len() as u64;
        match ram_range(gpa, len) {
            Some(r) => {
                inner.ram[r].copy_from_slice(data);
                self.log_access(&mut inner, AccessKind::Write, gpa, len, true, true);
                Ok(())
            }
            None => {
                self.log_access(&mut inner, AccessKind::Write, gpa, len, false, false);
                Err(MemError::NotRam { gpa, len })
            }
        }
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        self.atomic(AccessKind::FetchOr, gpa, |old| Some(old | bits))
    }

    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError> {
        self.atomic(AccessKind::CompareExchange, gpa, |old| {
            (old == current).then_some(new)
        })
    }

    fn mark_dirty(&self, gpa: u64, len: u64) {
        self.lock().log.dirty.push((gpa, len));
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        ram_range(gpa, len).is_some()
    }

    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool) {
        self.check_vp("deliver_interrupt", vp);
        let mut inner = self.lock();
        inner.interrupts_total += 1;
        inner.log.interrupts.push((vp, vector, auto_eoi));
    }

    fn deliver_interrupt_set(&self, vps: &[VpId], vector: u8) {
        // The contract: distinct VPs in ascending order; a cluster IPI vector is 16..=255 (KVM refuses others).
        assert!(vector >= 16, "IPI with vector {vector}");
        assert!(!vps.is_empty(), "IPI to an empty set");
        let mut sorted = vps.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // Regression guard: with VP indexes not in vCPU order the engine once passed the set in VP-index order
        // (fuzz/corpus/hypercall/regression-ipi-set-order).
        assert_eq!(sorted, vps, "IPI set not distinct and ascending: {vps:?}");
        for &vp in vps {
            self.deliver_interrupt(vp, vector, false);
        }
    }

    fn apic_access(&self, vp: VpId, msr: u32, access: ApicAccess) -> Result<u64, Gp> {
        self.check_vp("apic_access", vp);
        assert!(
            matches!(msr, 0x808 | 0x80B | 0x830),
            "engine forwarded x2APIC MSR {msr:#x}"
        );
        self.lock().log.apic.push((vp, msr, access));
        if self.apic_ok {
            Ok(0)
        } else {
            Err(Gp)
        }
    }

    fn pv_eoi_page_changed(&self, vp: VpId, gpa: Option<u64>) {
        self.check_vp("pv_eoi_page_changed", vp);
        self.lock().log.pv_eoi.push((vp, gpa));
    }

    fn sint_acked(&self, vp: VpId, sints: u16) {
        self.check_vp("sint_acked", vp);
        self.lock().log.sint_acks.push((vp, sints));
    }

    fn guest_tsc(&self, vp: VpId) -> u64 {
        self.check_vp("guest_tsc", vp);
        self.lock().tsc
    }

    fn tsc_frequency_hz(&self) -> u64 {
        self.tsc_hz
    }

    fn vp_runtime_ns(&self, vp: VpId) -> u64 {
        self.check_vp("vp_runtime_ns", vp);
        self.lock().runtime_ns.get(vp.index()).copied().unwrap_or(0)
    }

    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64) {
        self.check_vp("arm_timer", vp);
        assert!(
            usize::from(timer.0) < tlfs::msr::STIMER_COUNT,
            "engine armed timer {}",
            timer.0
        );
        self.lock().timers.insert((vp, timer), deadline);
    }

    fn cancel_timer(&self, vp: VpId, timer: TimerId) {
        self.check_vp("cancel_timer", vp);
        assert!(
            usize::from(timer.0) < tlfs::msr::STIMER_COUNT,
            "engine cancelled timer {}",
            timer.0
        );
        self.lock().timers.remove(&(vp, timer));
    }

    fn run_on_vp(&self, vp: VpId, work: VpWork) {
        self.check_vp("run_on_vp", vp);
        let mut inner = self.lock();
        assert!(inner.work.len() < 4096, "unbounded VP work queue");
        inner.work.push((vp, work));
    }

    fn kick_vp(&self, vp: VpId) {
        self.check_vp("kick_vp", vp);
        self.lock().log.kicks += 1;
    }

    fn yield_vp(&self, vp: VpId) {
        self.check_vp("yield_vp", vp);
        self.lock().log.yields += 1;
    }

    fn flush_remote_tlb(&self, caller: VpId, targets: &[VpId]) {
        self.check_vp("flush_remote_tlb (caller)", caller);
        assert!(
            targets.len() <= self.vps,
            "flush of {} targets with {} VPs",
            targets.len(),
            self.vps
        );
        for &t in targets {
            self.check_vp("flush_remote_tlb (target)", t);
        }
        self.lock().log.flushes.push((caller, targets.to_vec()));
    }

    fn event(&self, event: Event) {
        match &event {
            Event::GuestPanicked { vp, .. }
            | Event::ResetRequested { vp }
            | Event::SynicChanged { vp, .. } => self.check_vp("event", *vp),
            _ => {}
        }
        self.lock().log.events.push(event);
    }
}

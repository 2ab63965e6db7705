//! A fake [`Platform`] for tests and examples: flat RAM with an optional hole, a settable per-VP TSC, and a
//! record of everything the engine asked for (events, interrupts, timers, dirty ranges, work, kicks, flushes).
//! Deterministic and thread-safe.

use crate::msr::Gp;
use crate::platform::{ApicAccess, Event, MemError, Platform, TimerId, VpId, VpWork};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Everything the fake platform recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub events: Vec<Event>,
    /// (vp, vector, auto_eoi).
    pub interrupts: Vec<(VpId, u8, bool)>,
    /// Armed timers: (vp, timer) → deadline.
    pub timers: BTreeMap<(VpId, TimerId), u64>,
    /// (gpa, len) per `mark_dirty`.
    pub dirty: Vec<(u64, u64)>,
    pub work: Vec<(VpId, VpWork)>,
    pub kicks: Vec<VpId>,
    pub yields: Vec<VpId>,
    pub flushes: Vec<(VpId, Vec<VpId>)>,
    /// (targets, vector) per `deliver_interrupt_set` (each target is also recorded in `interrupts`).
    pub ipi_sets: Vec<(Vec<VpId>, u8)>,
    /// (vp, x2apic msr, access) forwarded APIC accesses.
    pub apic: Vec<(VpId, u32, Option<u64>)>,
    /// (vp, page) PV-EOI page changes.
    pub pv_eoi: Vec<(VpId, Option<u64>)>,
    /// (vp, SINT mask) acknowledgements.
    pub sint_acks: Vec<(VpId, u16)>,
}

struct Inner {
    ram: Vec<u8>,
    hole: Option<(u64, u64)>,
    tsc: Vec<u64>,
    runtime_ns: Vec<u64>,
    record: Record,
}

/// The fake platform.
pub struct FakePlatform {
    inner: Mutex<Inner>,
    tsc_hz: u64,
    apic_ok: bool,
}

impl FakePlatform {
    /// `ram_size` bytes of RAM at GPA 0, `vps` vCPUs, a `tsc_hz` TSC starting at 0.
    pub fn new(ram_size: usize, vps: usize, tsc_hz: u64) -> FakePlatform {
        FakePlatform {
            inner: Mutex::new(Inner {
                ram: vec![0; ram_size],
                hole: None,
                tsc: vec![0; vps],
                runtime_ns: vec![0; vps],
                record: Record::default(),
            }),
            tsc_hz,
            apic_ok: false,
        }
    }

    /// Makes `[start, end)` a non-RAM hole (like an MMIO region).
    pub fn with_hole(self, start: u64, end: u64) -> FakePlatform {
        self.lock().hole = Some((start, end));
        self
    }

    /// Accept APIC-access forwarding (reads return 0) instead of #GP.
    pub fn with_apic(mut self) -> FakePlatform {
        self.apic_ok = true;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets every VP's guest TSC.
    pub fn set_tsc(&self, tsc: u64) {
        self.lock().tsc.iter_mut().for_each(|t| *t = tsc);
    }

    /// Sets one VP's guest TSC.
    pub fn set_vp_tsc(&self, vp: VpId, tsc: u64) {
        if let Some(t) = self.lock().tsc.get_mut(vp.index()) {
            *t = tsc;
        }
    }

    /// Sets one VP's consumed CPU time.
    pub fn set_runtime_ns(&self, vp: VpId, ns: u64) {
        if let Some(t) = self.lock().runtime_ns.get_mut(vp.index()) {
            *t = ns;
        }
    }

    /// A copy of the record.
    pub fn record(&self) -> Record {
        self.lock().record.clone()
    }

    /// Takes the record, leaving it empty.
    pub fn take_record(&self) -> Record {
        std::mem::take(&mut self.lock().record)
    }

    /// Reads RAM directly (test helper; `None` outside RAM).
    pub fn peek(&self, gpa: u64, len: usize) -> Option<Vec<u8>> {
        let mut b = vec![0; len];
        self.read_gpa(gpa, &mut b).ok()?;
        Some(b)
    }

    /// Writes RAM directly, as the guest would (test helper; not recorded as dirty).
    pub fn poke(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.write_gpa(gpa, data)
    }

    fn range(inner: &Inner, gpa: u64, len: u64) -> Result<std::ops::Range<usize>, MemError> {
        let err = MemError::NotRam { gpa, len };
        let end = gpa.checked_add(len).ok_or(err)?;
        if end > inner.ram.len() as u64 {
            return Err(err);
        }
        if let Some((hs, he)) = inner.hole {
            if gpa < he && end > hs {
                return Err(err);
            }
        }
        Ok(gpa as usize..end as usize)
    }

    fn atomic<F: FnOnce(u64) -> u64>(&self, gpa: u64, f: F) -> Result<u64, MemError> {
        if gpa & 7 != 0 {
            return Err(MemError::Misaligned { gpa });
        }
        let mut inner = self.lock();
        let r = Self::range(&inner, gpa, 8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&inner.ram[r.clone()]);
        let old = u64::from_le_bytes(b);
        inner.ram[r].copy_from_slice(&f(old).to_le_bytes());
        Ok(old)
    }
}

impl Platform for FakePlatform {
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let inner = self.lock();
        let r = Self::range(&inner, gpa, buf.len() as u64)?;
        buf.copy_from_slice(&inner.ram[r]);
        Ok(())
    }

    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let mut inner = self.lock();
        let r = Self::range(&inner, gpa, data.len() as u64)?;
        inner.ram[r].copy_from_slice(data);
        Ok(())
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        self.atomic(gpa, |old| old | bits)
    }

    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError> {
        self.atomic(gpa, |old| if old == current { new } else { old })
    }

    fn mark_dirty(&self, gpa: u64, len: u64) {
        self.lock().record.dirty.push((gpa, len));
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        Self::range(&self.lock(), gpa, len).is_ok()
    }

    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool) {
        self.lock().record.interrupts.push((vp, vector, auto_eoi));
    }

    fn deliver_interrupt_set(&self, vps: &[VpId], vector: u8) {
        let mut inner = self.lock();
        inner
            .record
            .interrupts
            .extend(vps.iter().map(|&vp| (vp, vector, false)));
        inner.record.ipi_sets.push((vps.to_vec(), vector));
    }

    fn apic_access(&self, vp: VpId, msr: u32, access: ApicAccess) -> Result<u64, Gp> {
        let value = match access {
            ApicAccess::Read => None,
            ApicAccess::Write(v) => Some(v),
        };
        self.lock().record.apic.push((vp, msr, value));
        if self.apic_ok {
            Ok(0)
        } else {
            Err(Gp)
        }
    }

    fn pv_eoi_page_changed(&self, vp: VpId, gpa: Option<u64>) {
        self.lock().record.pv_eoi.push((vp, gpa));
    }

    fn sint_acked(&self, vp: VpId, sints: u16) {
        self.lock().record.sint_acks.push((vp, sints));
    }

    fn guest_tsc(&self, vp: VpId) -> u64 {
        self.lock().tsc.get(vp.index()).copied().unwrap_or(0)
    }

    fn tsc_frequency_hz(&self) -> u64 {
        self.tsc_hz
    }

    fn vp_runtime_ns(&self, vp: VpId) -> u64 {
        self.lock().runtime_ns.get(vp.index()).copied().unwrap_or(0)
    }

    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64) {
        self.lock().record.timers.insert((vp, timer), deadline);
    }

    fn cancel_timer(&self, vp: VpId, timer: TimerId) {
        self.lock().record.timers.remove(&(vp, timer));
    }

    fn run_on_vp(&self, vp: VpId, work: VpWork) {
        self.lock().record.work.push((vp, work));
    }

    fn kick_vp(&self, vp: VpId) {
        self.lock().record.kicks.push(vp);
    }

    fn yield_vp(&self, vp: VpId) {
        self.lock().record.yields.push(vp);
    }

    fn flush_remote_tlb(&self, caller: VpId, targets: &[VpId]) {
        self.lock().record.flushes.push((caller, targets.to_vec()));
    }

    fn event(&self, event: Event) {
        self.lock().record.events.push(event);
    }
}

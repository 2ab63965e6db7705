//! [`hyperv::Platform`] over the KVM machine.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hyperv::{Event, MemError, Platform, TimerId, VpId, VpWork};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::timers::HvTimers;
use crate::lifecycle::PanicAction;
use crate::machine::{IoAction, VmHandle};

const PAGE_SHIFT: u32 = 12;

/// A guest panic, as reported to a [`PanicNotifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPanic {
    /// The vCPU index that wrote CRASH_CTL.
    pub vcpu: usize,
    /// CRASH_P0..P4 (QEMU's `arg1..arg5` of the `hyper-v` panic information), or `None` when hv-crash is off
    /// (QEMU then sends GUEST_PANICKED without `info`).
    pub hyperv_params: Option<[u64; 5]>,
    /// The `-action panic=` applied right after the notification (by the machine's life-cycle path).
    pub action: PanicAction,
}

/// Optional observer of guest panics, called on the crashing vCPU's thread before
/// [`crate::VmHandle::guest_panicked`] (which tells the [`crate::lifecycle::LifecycleHook`] and applies the
/// action). Use either this or the life-cycle hook for QMP's GUEST_PANICKED, not both. Must not block and must
/// not call into the engine.
pub type PanicNotifier = Arc<dyn Fn(&GuestPanic) + Send + Sync>;

/// Work queued for a vCPU's thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    Timer(TimerId),
    Engine(VpWork),
    /// The guest acknowledged these SINTs (EOM or EOI): tell the [`SintAckListener`].
    SintAck(u16),
}

/// Told on a vCPU's thread, with no engine lock held, which SINTs of that VP the guest acknowledged (EOM, or
/// the EOI of a SINT vector): devices with staged SynIC messages retry them (hyperv-testdev).
pub type SintAckListener = Arc<dyn Fn(VpId, u16) + Send + Sync>;

struct VcpuSlot {
    /// `clockid_t` of the vCPU thread's CPU-time clock; `i64::MIN` until the thread registered.
    cpu_clock: AtomicI64,
    has_work: AtomicBool,
    work: Mutex<Vec<Work>>,
}

/// The platform the engine runs on inside this VMM.
pub struct VmmPlatform {
    handle: VmHandle,
    tsc_hz: u64,
    vcpus: Vec<VcpuSlot>,
    timers: Arc<HvTimers>,
    dirty: Mutex<BTreeSet<u64>>,
    panic_action: PanicAction,
    crash_info: bool,
    notifier: Mutex<Option<PanicNotifier>>,
    panics: AtomicU64,
    /// hv-vapic exit-less EOI state (see [`super::pveoi`]).
    pv_eoi: super::pveoi::PvEoi,
    /// The listener and the number of staged messages it waits to retry (acknowledgements are forwarded only
    /// while that is non-zero, so a VM without waiting messages pays nothing per EOI).
    sint_ack: Mutex<Option<(SintAckListener, Arc<AtomicUsize>)>>,
}

/// The page frame numbers `[gpa, gpa + len)` touches (capped at 2^20 pages; the engine writes a few at once).
fn dirty_pfns(gpa: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    if len == 0 {
        #[allow(clippy::reversed_empty_ranges)]
        return 1..=0;
    }
    let first = gpa >> PAGE_SHIFT;
    let last = gpa.saturating_add(len - 1) >> PAGE_SHIFT;
    first..=last.min(first.saturating_add(1 << 20))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmmPlatform {
    pub(crate) fn new(
        handle: VmHandle,
        panic_action: PanicAction,
        crash_info: bool,
    ) -> VmmPlatform {
        let n = handle.vcpu_count();
        VmmPlatform {
            tsc_hz: u64::from(handle.tsc_khz()) * 1000,
            vcpus: (0..n)
                .map(|_| VcpuSlot {
                    cpu_clock: AtomicI64::new(i64::MIN),
                    has_work: AtomicBool::new(false),
                    work: Mutex::new(Vec::new()),
                })
                .collect(),
            handle,
            timers: Arc::new(HvTimers::default()),
            dirty: Mutex::new(BTreeSet::new()),
            panic_action,
            crash_info,
            notifier: Mutex::new(None),
            panics: AtomicU64::new(0),
            pv_eoi: super::pveoi::PvEoi::new(n),
            sint_ack: Mutex::new(None),
        }
    }

    /// The exit-less EOI state.
    pub fn pv_eoi(&self) -> &super::pveoi::PvEoi {
        &self.pv_eoi
    }

    /// Sets the listener told about SINT acknowledgements (replaces a previous one). `waiting` counts the
    /// listener's staged messages: increment it before a post that may find its slot busy, decrement it when a
    /// staged message is gone; acknowledgements are forwarded only while it is non-zero.
    pub fn set_sint_ack_listener(&self, listener: SintAckListener, waiting: Arc<AtomicUsize>) {
        *lock(&self.sint_ack) = Some((listener, waiting));
    }

    pub(crate) fn notify_sint_ack(&self, vp: VpId, sints: u16) {
        let listener = lock(&self.sint_ack).as_ref().map(|(l, _)| l.clone());
        if let Some(l) = listener {
            l(vp, sints);
        }
    }

    pub(crate) fn timers(&self) -> Arc<HvTimers> {
        self.timers.clone()
    }

    /// The machine handle.
    pub fn handle(&self) -> &VmHandle {
        &self.handle
    }

    /// Number of guest panics reported so far.
    pub fn panic_count(&self) -> u64 {
        self.panics.load(Ordering::SeqCst)
    }

    pub(crate) fn set_panic_notifier(&self, n: PanicNotifier) {
        *lock(&self.notifier) = Some(n);
    }

    pub(crate) fn take_dirty_pages(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.dirty))
            .into_iter()
            .collect()
    }

    pub(crate) fn shutdown(&self) {
        self.timers.stop();
    }

    /// Called on vCPU `i`'s thread when it starts: remembers its CPU-time clock.
    pub(crate) fn register_vcpu_thread(&self, i: usize) {
        let Some(slot) = self.vcpus.get(i) else {
            return;
        };
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling thread, which is alive; `clock` is a valid out pointer.
        let ret = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if ret == 0 {
            slot.cpu_clock.store(i64::from(clock), Ordering::SeqCst);
        }
    }

    pub(crate) fn has_work(&self, i: usize) -> bool {
        self.vcpus
            .get(i)
            .is_some_and(|s| s.has_work.load(Ordering::SeqCst))
    }

    pub(crate) fn take_work(&self, i: usize) -> Vec<Work> {
        let Some(slot) = self.vcpus.get(i) else {
            return Vec::new();
        };
        let mut q = lock(&slot.work);
        slot.has_work.store(false, Ordering::SeqCst);
        std::mem::take(&mut *q)
    }

    pub(crate) fn clear_work(&self) {
        self.timers.clear();
        for s in &self.vcpus {
            let mut q = lock(&s.work);
            s.has_work.store(false, Ordering::SeqCst);
            q.clear();
        }
    }

    fn queue(&self, vp: VpId, w: Work) {
        let Some(slot) = self.vcpus.get(vp.index()) else {
            return;
        };
        {
            let mut q = lock(&slot.work);
            if !q.contains(&w) {
                q.push(w);
            }
            slot.has_work.store(true, Ordering::SeqCst);
        }
        self.handle.kick(vp.index());
    }

    pub(crate) fn queue_timer(&self, vp: VpId, t: TimerId) {
        self.queue(vp, Work::Timer(t));
    }

    /// The host address of the naturally aligned u64 at `gpa`.
    fn atomic_u64(&self, gpa: u64) -> Result<&AtomicU64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        let mem = self.handle.memory();
        let not_ram = MemError::NotRam { gpa, len: 8 };
        if !mem.check_range(GuestAddress(gpa), 8) {
            return Err(not_ram);
        }
        let host = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| not_ram)?;
        // SAFETY: `host` points into the live guest RAM mapping (checked above to cover 8 bytes), which lives as
        // long as the machine (and `self.handle` keeps it alive); it is 8-byte aligned because the mapping is
        // page-aligned and `gpa` is 8-aligned. Guest RAM is shared memory that the guest also accesses
        // concurrently, which is exactly what atomic operations are for; no Rust reference to these bytes
        // exists elsewhere.
        Ok(unsafe { AtomicU64::from_ptr(host.cast::<u64>()) })
    }
}

impl Platform for VmmPlatform {
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        if !self.is_ram(gpa, len) {
            return Err(MemError::NotRam { gpa, len });
        }
        self.handle
            .memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam { gpa, len })
    }

    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        if !self.is_ram(gpa, len) {
            return Err(MemError::NotRam { gpa, len });
        }
        self.handle
            .memory()
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam { gpa, len })
    }

    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        Ok(self.atomic_u64(gpa)?.fetch_or(bits, Ordering::SeqCst))
    }

    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError> {
        let a = self.atomic_u64(gpa)?;
        Ok(
            match a.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(v) | Err(v) => v,
            },
        )
    }

    fn mark_dirty(&self, gpa: u64, len: u64) {
        let mut d = lock(&self.dirty);
        d.extend(dirty_pfns(gpa, len));
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        let Ok(len) = usize::try_from(len) else {
            return false;
        };
        if gpa.checked_add(len as u64).is_none() {
            return false;
        }
        len == 0 || self.handle.memory().check_range(GuestAddress(gpa), len)
    }

    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool) {
        let _ = self.handle.with_apic(vp.index(), |apic| {
            apic.set_auto_eoi(vector, auto_eoi);
            apic.accept_fixed(vector, false)
        });
    }

    fn deliver_interrupt_set(&self, vps: &[VpId], vector: u8) {
        // Fixed interrupts from the IPI hypercalls: accepted into each IRR and the receiver woken or kicked, with
        // no timer re-arm per target, and the vector's auto-EOI setting left alone (KVM's auto-EOI is per vector:
        // an IPI on a SINT's auto-EOI vector is auto-EOI'd there too).
        for vp in vps {
            self.handle.deliver_fixed(vp.index(), vector, false);
        }
    }

    fn pv_eoi_page_changed(&self, vp: VpId, gpa: Option<u64>) {
        self.pv_eoi.set_page(
            vp.index(),
            &self.handle,
            gpa.map(|g| g + tlfs::pages::VP_ASSIST_APIC_ASSIST_OFFSET),
            &|gpa, len| self.mark_dirty(gpa, len),
        );
    }

    fn apic_access(
        &self,
        vp: VpId,
        msr: u32,
        access: hyperv::ApicAccess,
    ) -> Result<u64, hyperv::Gp> {
        // hv-vapic EOI/ICR/TPR (called with no engine lock held): the userspace APIC's Hyper-V MSR entry points,
        // with the effects a vCPU exit would apply (IPI routing, EOI hook → SynIC acknowledgement).
        let hv_msr = match msr {
            hyperv::vapic::X2APIC_EOI => crate::apic::HV_MSR_EOI,
            hyperv::vapic::X2APIC_ICR => crate::apic::HV_MSR_ICR,
            hyperv::vapic::X2APIC_TPR => crate::apic::HV_MSR_TPR,
            _ => return Err(hyperv::Gp),
        };
        let i = vp.index();
        match access {
            hyperv::ApicAccess::Read => self
                .handle
                .with_apic(i, |a| a.hv_vapic_msr_read(hv_msr))
                .ok_or(hyperv::Gp)?
                .map_err(|_| hyperv::Gp),
            hyperv::ApicAccess::Write(v) => {
                let fx = self
                    .handle
                    .with_apic(i, |a| a.hv_vapic_msr_write(hv_msr, v))
                    .ok_or(hyperv::Gp)?
                    .map_err(|_| hyperv::Gp)?;
                let shared = self.handle.shared();
                if let Some(ipi) = fx.ipi {
                    shared.route_ipi(&ipi);
                }
                if let (Some(eoi), Some(hook)) = (fx.eoi, shared.eoi_hook.get()) {
                    hook.eoi(i, eoi);
                }
                Ok(0)
            }
        }
    }

    fn sint_acked(&self, vp: VpId, sints: u16) {
        // Called with engine locks held: the listener runs later on the VP's own thread.
        let waiting = lock(&self.sint_ack)
            .as_ref()
            .is_some_and(|(_, w)| w.load(Ordering::SeqCst) > 0);
        if waiting {
            self.queue(vp, Work::SintAck(sints));
        }
    }

    fn guest_tsc(&self, vp: VpId) -> u64 {
        self.handle
            .guest_tsc(vp.index())
            .or_else(|| self.handle.guest_tsc(0))
            .unwrap_or(0)
    }

    fn tsc_frequency_hz(&self) -> u64 {
        self.tsc_hz
    }

    fn vp_runtime_ns(&self, vp: VpId) -> u64 {
        let Some(slot) = self.vcpus.get(vp.index()) else {
            return 0;
        };
        let clock = slot.cpu_clock.load(Ordering::SeqCst);
        let Ok(clock) = libc::clockid_t::try_from(clock) else {
            return 0;
        };
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out pointer; an invalid clock id (thread ended) makes the call fail.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return 0;
        }
        (ts.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec as u64)
    }

    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64) {
        self.timers.arm(vp, timer, deadline);
    }

    fn cancel_timer(&self, vp: VpId, timer: TimerId) {
        self.timers.cancel(vp, timer);
    }

    fn run_on_vp(&self, vp: VpId, work: VpWork) {
        self.queue(vp, Work::Engine(work));
    }

    fn kick_vp(&self, vp: VpId) {
        self.handle.kick(vp.index());
    }

    fn yield_vp(&self, _vp: VpId) {
        // NotifyLongSpinWait: give the host CPU to a preempted lock holder. Only another vCPU of this VM can hold
        // the lock (KVM yields to those alone), so with a single vCPU the sched_yield is a wasted syscall, and on
        // a loaded host it hands the CPU to unrelated tasks for milliseconds.
        if self.vcpus.len() > 1 {
            std::thread::yield_now();
        }
    }

    fn flush_remote_tlb(&self, caller: VpId, targets: &[VpId]) {
        let targets: Vec<usize> = targets.iter().map(|t| t.index()).collect();
        let stats = crate::tlbflush::flush_vcpus(&self.handle, caller.index(), &targets);
        tracing::trace!(caller = caller.0, ?stats, "remote TLB flush");
    }

    fn event(&self, event: Event) {
        match event {
            Event::GuestPanicked { vp, params } => {
                self.panics.fetch_add(1, Ordering::SeqCst);
                // QEMU logs `Guest crashed`, then the parameters when the panic carries Hyper-V information
                // (hv-crash on); the `warning: ` prefix keeps stderr parseable for harnesses that accept only
                // warnings there.
                eprintln!("warning: {}", hyperv::crash::GUEST_CRASHED);
                let params = self.crash_info.then_some(params);
                if let Some(p) = &params {
                    eprintln!("warning: {}", hyperv::crash::format_crash_params(p));
                }
                let notifier = lock(&self.notifier).clone();
                if let Some(n) = notifier {
                    n(&GuestPanic {
                        vcpu: vp.index(),
                        hyperv_params: params,
                        action: self.panic_action,
                    });
                }
                // The machine's life-cycle path tells the QMP glue (GUEST_PANICKED) and applies the action.
                self.handle.guest_panicked(params, self.panic_action);
            }
            Event::ResetRequested { .. } => self.handle.request(IoAction::Reset),
            Event::SynicChanged { vp, msr, value } => {
                tracing::debug!(vp = vp.0, msr, value, "SynIC changed");
            }
            other => tracing::debug!(?other, "unhandled Hyper-V event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Machine, VmConfig};

    #[test]
    fn dirty_page_ranges() {
        let cases: &[(u64, u64, &[u64])] = &[
            (0x1000, 0, &[]),
            (0x1000, 1, &[1]),
            (0x1FFF, 1, &[1]),
            (0x1FFF, 2, &[1, 2]),
            (0x2000, 0x1000, &[2]),
            (0x2000, 0x1001, &[2, 3]),
            (0x3008, 24, &[3]),
            (u64::MAX - 10, 100, &[u64::MAX >> PAGE_SHIFT]),
        ];
        for &(gpa, len, want) in cases {
            let got: Vec<u64> = dirty_pfns(gpa, len).collect();
            assert_eq!(got, want, "{gpa:#x}+{len:#x}");
        }
        assert_eq!(dirty_pfns(0, u64::MAX).count(), (1 << 20) + 1);
    }

    use crate::test_support::{NoDevices, NoKernel};

    /// A real (never started) KVM machine with 2 vCPUs and 16 MiB of RAM, or `None` without /dev/kvm.
    fn platform() -> Option<(Machine, VmmPlatform)> {
        let cfg = VmConfig {
            ram_size: 16 << 20,
            vcpus: 2,
            ..VmConfig::default()
        };
        let (m, _fds) = Machine::new(cfg, Arc::new(NoKernel), Arc::new(NoDevices)).ok()?;
        let p = VmmPlatform::new(m.handle(), PanicAction::None, true);
        Some((m, p))
    }

    #[test]
    fn guest_memory_and_atomics_on_a_kvm_machine() {
        let Some((_m, p)) = platform() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let ram_end = 16u64 << 20;
        // (gpa, len, is RAM)
        let ranges: &[(u64, u64, bool)] = &[
            (0, 8, true),
            (ram_end - 8, 8, true),
            (ram_end - 4, 8, false),
            (ram_end, 1, false),
            (0xFEE0_0000, 4, false),
            (u64::MAX - 3, 8, false),
            (0x1000, 0, true),
        ];
        for &(gpa, len, ram) in ranges {
            assert_eq!(p.is_ram(gpa, len), ram, "{gpa:#x}+{len}");
            let mut buf = vec![0u8; len as usize];
            assert_eq!(
                p.read_gpa(gpa, &mut buf).is_ok(),
                ram,
                "read {gpa:#x}+{len}"
            );
            assert_eq!(p.write_gpa(gpa, &buf).is_ok(), ram, "write {gpa:#x}+{len}");
        }
        p.write_gpa(0x5000, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        p.read_gpa(0x5000, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            p.fetch_or_u64(0x5000, 1 << 63).unwrap(),
            0x0807_0605_0403_0201
        );
        assert_eq!(
            p.compare_exchange_u64(0x5000, 0, 5).unwrap(),
            0x8807_0605_0403_0201,
            "a failed exchange returns the current value"
        );
        assert_eq!(
            p.compare_exchange_u64(0x5000, 0x8807_0605_0403_0201, 5)
                .unwrap(),
            0x8807_0605_0403_0201
        );
        p.read_gpa(0x5000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 5);
        assert_eq!(
            p.fetch_or_u64(0x5004, 1),
            Err(MemError::Misaligned { gpa: 0x5004 })
        );
        assert!(matches!(
            p.fetch_or_u64(ram_end, 1),
            Err(MemError::NotRam { .. })
        ));
        // Dirty set: pages the engine wrote, in order, taken once.
        p.mark_dirty(0x5000, 8);
        p.mark_dirty(0x3FFF, 2);
        assert_eq!(p.take_dirty_pages(), vec![3, 4, 5]);
        assert!(p.take_dirty_pages().is_empty());
    }

    #[test]
    fn time_sources_on_a_kvm_machine() {
        let Some((m, p)) = platform() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        assert_eq!(p.tsc_frequency_hz(), u64::from(m.tsc_khz()) * 1000);
        let a = p.guest_tsc(VpId(0));
        let b = p.guest_tsc(VpId(1));
        let c = p.guest_tsc(VpId(0));
        assert!(a <= b && b <= c, "{a} {b} {c}");
        // No vCPU thread registered yet: no CPU time; this thread's clock after registering.
        assert_eq!(p.vp_runtime_ns(VpId(0)), 0);
        p.register_vcpu_thread(0);
        let t0 = p.vp_runtime_ns(VpId(0));
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(p.vp_runtime_ns(VpId(0)) > t0);
        assert_eq!(p.vp_runtime_ns(VpId(7)), 0, "unknown VP");
    }

    #[test]
    fn interrupts_and_work_queue_on_a_kvm_machine() {
        let Some((m, p)) = platform() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        let h = m.handle();
        p.deliver_interrupt(VpId(1), 0x51, true);
        p.deliver_interrupt(VpId(1), 0x52, false);
        // The auto-EOI flag of each delivery is recorded in the target's APIC.
        let state = h.with_apic(1, |a| (a.is_auto_eoi(0x51), a.is_auto_eoi(0x52)));
        assert_eq!(state, Some((true, false)));
        assert!(!p.has_work(0));
        p.queue_timer(VpId(0), TimerId(2));
        p.queue_timer(VpId(0), TimerId(2));
        assert!(p.has_work(0) && !p.has_work(1));
        assert_eq!(
            p.take_work(0),
            vec![Work::Timer(TimerId(2))],
            "duplicates merged"
        );
        assert!(!p.has_work(0));
        p.queue_timer(VpId(9), TimerId(0));
        assert!(p.take_work(9).is_empty(), "unknown VP ignored");
    }
}

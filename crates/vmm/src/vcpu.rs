//! The vCPU thread: the run loop, exit dispatch (port I/O, MMIO, MSRs, HLT, shutdown, errors), interrupt
//! injection, INIT/SIPI handling and the rendezvous.

use std::sync::Arc;

use kvm_bindings::{kvm_regs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::apic::{
    ApicEffects, Gp, LocalApic, APIC_MMIO_SIZE, MSR_APIC_BASE, MSR_TSC_DEADLINE, X2APIC_MSR_FIRST,
    X2APIC_MSR_LAST,
};
use crate::boot::{self, BootEntry};
use crate::diag;
use crate::machine::{
    InitialState, IoAction, PortResult, RunState, VcpuRequest, VcpuShared, VmEvent, VmShared,
};
use crate::timer::host_tsc;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const MSR_IA32_TSC_ADJUST: u32 = 0x3B;
/// First MSR of the Hyper-V synthetic range.
pub const HV_MSR_FIRST: u32 = 0x4000_0000;
/// Last MSR of the Hyper-V synthetic range.
pub const HV_MSR_LAST: u32 = 0x4000_01FF;

ioctl_iow_nr!(
    KVM_INTERRUPT,
    kvm_bindings::KVMIO,
    0x86,
    kvm_bindings::kvm_interrupt
);

ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe1,
    kvm_bindings::kvm_device_attr
);

/// Sets the vCPU's TSC offset (`KVM_VCPU_TSC_OFFSET`): guest TSC = host TSC + offset.
pub(crate) fn set_tsc_offset(fd: &VcpuFd, offset: u64) -> Result<(), kvm_ioctls::Error> {
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: &offset as *const u64 as u64,
        flags: 0,
    };
    // SAFETY: `fd` is a vCPU fd; `attr` is valid and points to `offset`, which outlives the call; the kernel
    // only reads 8 bytes from it for this attribute.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret < 0 {
        Err(kvm_ioctls::Error::last())
    } else {
        Ok(())
    }
}

/// Injects an external interrupt (`KVM_INTERRUPT`; only valid without an in-kernel irqchip).
fn inject_interrupt(fd: &VcpuFd, vector: u8) -> Result<(), kvm_ioctls::Error> {
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: `fd` is a vCPU fd and `irq` is a valid kvm_interrupt that outlives the call.
    let ret = unsafe { ioctl_with_ref(fd, KVM_INTERRUPT(), &irq) };
    if ret < 0 {
        Err(kvm_ioctls::Error::last())
    } else {
        Ok(())
    }
}

/// XMM0..5 (low 128 bits each) from `KVM_GET_XSAVE`: the legacy FXSAVE area keeps XMMn at byte 160 + 16n.
fn read_xmm0_5(fd: &VcpuFd) -> Option<[u128; 6]> {
    let xsave = fd.get_xsave().ok()?;
    let mut out = [0u128; 6];
    for (n, x) in out.iter_mut().enumerate() {
        let w = 40 + 4 * n;
        let words = xsave.region.get(w..w + 4)?;
        *x = words
            .iter()
            .rev()
            .fold(0u128, |acc, &d| (acc << 32) | u128::from(d));
    }
    Some(out)
}

/// Sets the BSP entry state for `entry`.
pub(crate) fn enter(fd: &VcpuFd, entry: &BootEntry) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = fd.get_sregs()?;
    let mut regs = fd.get_regs()?;
    boot::set_entry_state(entry, &mut sregs, &mut regs);
    fd.set_sregs(&sregs)?;
    fd.set_regs(&regs)
}

/// Fallback TSC synchronisation without `KVM_VCPU_TSC_OFFSET`: write IA32_TSC = 0 to every vCPU back to back
/// (KVM matches the writes to one offset) and estimate the offset from a read bracketed by host TSC reads.
pub(crate) fn sync_tsc_with_msrs(fds: &[VcpuFd]) -> Result<u64, String> {
    let entry = |data| kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        data,
        ..Default::default()
    };
    for fd in fds {
        let msrs = Msrs::from_entries(&[entry(0)]).map_err(|e| format!("{e:?}"))?;
        fd.set_msrs(&msrs).map_err(|e| e.to_string())?;
    }
    let mut msrs = Msrs::from_entries(&[entry(0)]).map_err(|e| format!("{e:?}"))?;
    let before = host_tsc();
    fds[0].get_msrs(&mut msrs).map_err(|e| e.to_string())?;
    let after = host_tsc();
    let guest = msrs.as_slice()[0].data;
    let host_mid = before.wrapping_add(after.wrapping_sub(before) / 2);
    Ok(guest.wrapping_sub(host_mid))
}

/// Measures the guest TSC against the host TSC: runs a real-mode loop (`rdtsc`, two `out`s, `jmp` back) at guest
/// physical 0 on the spare vCPU `fd` and returns `guest TSC - host TSC` (wrapping). Guest RAM at 0..16 is zeroed
/// again afterwards. Some KVMs (this project's PVM host) ignore the TSC offset, so the VMM learns the real
/// relation instead of assuming it.
///
/// Each sample brackets the guest's `rdtsc` between the host TSC before and after the `KVM_RUN` that executed
/// it, so the offset lies in `[guest - after, guest - before]`; the samples' intervals are intersected. The first
/// run is slow (tens of µs), so a single midpoint would be off by far more than the few µs that separate a guest
/// TSC-page read from a TIME_REF_COUNT exit. If one of `candidates` (the offset the VMM tried to set, or 0 for
/// "offsets are ignored") lies in the interval, it is the answer; else the interval's midpoint.
pub(crate) fn probe_tsc_offset(
    fd: &mut VcpuFd,
    mem: &vm_memory::GuestMemoryMmap,
    candidates: &[u64],
) -> Result<u64, String> {
    use vm_memory::{Bytes, GuestAddress};
    const CODE: [u8; 13] = [
        0x0F, 0x31, // rdtsc
        0x66, 0xE7, 0x10, // out %eax, $0x10
        0x66, 0x89, 0xD0, // mov %edx, %eax
        0x66, 0xE7, 0x11, // out %eax, $0x11
        0xEB, 0xF3, // jmp 0
    ];
    const SAMPLES: usize = 16;
    let err = |e: kvm_ioctls::Error| format!("TSC probe: {e}");
    mem.write_slice(&CODE, GuestAddress(0))
        .map_err(|e| format!("TSC probe: {e}"))?;
    let mut sregs = fd.get_sregs().map_err(err)?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).map_err(err)?;
    fd.set_regs(&kvm_regs {
        rip: 0,
        rflags: 2,
        ..Default::default()
    })
    .map_err(err)?;
    // Interval bounds relative to `base` (the first sample's upper bound), as i64: no wrapping trouble.
    let mut base: Option<u64> = None;
    let (mut lower, mut upper) = (i64::MIN, i64::MAX);
    let mut last_mid = None;
    let mut lo: Option<(u32, u64, u64)> = None;
    let mut samples = 0;
    for _ in 0..4 * SAMPLES {
        if samples == SAMPLES {
            break;
        }
        let before = host_tsc();
        let exit = fd.run().map_err(err)?;
        let after = host_tsc();
        match exit {
            VcpuExit::IoOut(0x10, d) if d.len() == 4 => {
                lo = Some((u32::from_le_bytes([d[0], d[1], d[2], d[3]]), before, after));
            }
            VcpuExit::IoOut(0x11, d) if d.len() == 4 => {
                let Some((l, before, after)) = lo.take() else {
                    continue;
                };
                let hi = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                let guest = (u64::from(hi) << 32) | u64::from(l);
                let up = guest.wrapping_sub(before);
                let b = *base.get_or_insert(up);
                let rel = |x: u64| x.wrapping_sub(b) as i64;
                lower = lower.max(rel(guest.wrapping_sub(after)));
                upper = upper.min(rel(up));
                last_mid =
                    Some(guest.wrapping_sub(before.wrapping_add(after.wrapping_sub(before) / 2)));
                samples += 1;
            }
            other => return Err(format!("TSC probe: unexpected exit {other:?}")),
        }
    }
    mem.write_slice(&[0u8; CODE.len()], GuestAddress(0))
        .map_err(|e| format!("TSC probe: {e}"))?;
    let (Some(b), Some(mid)) = (base, last_mid) else {
        return Err("TSC probe: the probe did not report the TSC".to_string());
    };
    if lower > upper {
        // Not a constant relation (should not happen): the last sample's midpoint.
        return Ok(mid);
    }
    let rel = |x: u64| x.wrapping_sub(b) as i64;
    if let Some(&c) = candidates
        .iter()
        .find(|&&c| (lower..=upper).contains(&rel(c)))
    {
        return Ok(c);
    }
    Ok(b.wrapping_add((lower + (upper - lower) / 2) as u64))
}

/// Per-thread context of a vCPU.
struct Ctx {
    shared: Arc<VmShared>,
    index: usize,
    init: InitialState,
    /// The last exit needs one more `KVM_RUN` to complete (port/MMIO read, MSR access).
    needs_completion: bool,
    /// This vCPU already reported itself stuck in the current sleep.
    reported_stuck: bool,
    /// While halted with IF=1: this thread watches its own APIC and hook timers (claimed from their timer
    /// threads), and the earliest deadline (machine-clock ns) is its sleep's timeout.
    halt_claim: Option<Option<u64>>,
    /// Auto-converge: this vCPU's sleeps (see [`crate::throttle`]).
    throttle: crate::throttle::VcpuThrottle,
}

/// A deferred action that needs the vCPU fd, which the exit value borrows.
enum Deferred {
    None,
    SetTsc(u64),
    SetTscAdjust(u64),
    Io(IoAction),
    TripleFault,
    Fatal(String),
    InternalError,
    PortHook(u16, PortBytes),
}

/// The bytes of an `out` for the port hook: inline for ordinary port I/O (1, 2 or 4 bytes), so that a hypercall
/// exit allocates nothing; only string I/O (`rep outs`) longer than 8 bytes goes to the heap.
enum PortBytes {
    Inline([u8; 8], u8),
    Heap(Vec<u8>),
}

impl PortBytes {
    fn new(data: &[u8]) -> Self {
        match u8::try_from(data.len()) {
            Ok(n) if n <= 8 => {
                let mut b = [0u8; 8];
                b[..data.len()].copy_from_slice(data);
                PortBytes::Inline(b, n)
            }
            _ => PortBytes::Heap(data.to_vec()),
        }
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            PortBytes::Inline(b, n) => &b[..usize::from(*n)],
            PortBytes::Heap(v) => v,
        }
    }
}

pub(crate) fn thread_main(shared: Arc<VmShared>, index: usize, mut fd: VcpuFd, init: InitialState) {
    let me = &shared.vcpus[index];
    // A halted vCPU sleeps until its own timer deadline (`Ctx::halt_wait`): keep that sleep precise.
    crate::timer::set_precise_timer_slack();
    let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
    // SAFETY: the pointer refers to the kvm_run mapping owned by `fd`, which outlives the publication: the
    // kicker is unpublished below before `fd` is dropped.
    unsafe { me.kicker.publish(immediate_exit) };
    if let Some(h) = shared.vcpu_hook.get() {
        h.thread_started(index);
    }
    let mut ctx = Ctx {
        shared: shared.clone(),
        index,
        init,
        needs_completion: false,
        reported_stuck: false,
        halt_claim: None,
        throttle: Default::default(),
    };
    let result = ctx.run_loop(&mut fd);
    me.kicker.unpublish();
    if let Err(msg) = result {
        shared.send(VmEvent::Fatal(msg));
    }
    let mut st = me.lock();
    st.exited = true;
    me.parked_cv.notify_all();
}

impl Ctx {
    fn me(&self) -> &VcpuShared {
        &self.shared.vcpus[self.index]
    }

    fn complete_pending(&mut self, fd: &mut VcpuFd) -> Result<(), String> {
        if !self.needs_completion {
            return Ok(());
        }
        self.needs_completion = false;
        self.me().kicker.set_immediate_exit(1);
        let r = fd.run();
        let r = match r {
            Ok(_) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(format!("KVM_RUN failed on vCPU {}: {e}", self.index)),
        };
        self.me().kicker.set_immediate_exit(0);
        r
    }

    /// Forgets the interrupt-window state KVM reported at the last exit: after the registers were replaced
    /// (INIT, SIPI, reset) it no longer describes the vCPU, and injecting on its word could hit IF=0.
    fn forget_window_state(fd: &mut VcpuFd) {
        let run = fd.get_kvm_run();
        run.ready_for_interrupt_injection = 0;
        run.if_flag = 0;
        run.request_interrupt_window = 0;
    }

    fn reset_to_initial(&self, fd: &VcpuFd) -> Result<(), String> {
        let err = |e: kvm_ioctls::Error| format!("cannot reset vCPU {}: {e}", self.index);
        fd.set_sregs(&self.init.sregs).map_err(err)?;
        fd.set_regs(&self.init.regs).map_err(err)?;
        fd.set_fpu(&self.init.fpu).map_err(err)
    }

    fn handle_request(&mut self, fd: &mut VcpuFd, req: VcpuRequest) -> Result<(), String> {
        match req {
            VcpuRequest::FlushTlb => {
                // Finish a pending I/O/MMIO/MSR exit first: the register writes must not race with it.
                self.complete_pending(fd)?;
                crate::tlbflush::flush_own_tlb(fd)
                    .map_err(|e| format!("cannot flush the TLB of vCPU {}: {e}", self.index))
            }
            VcpuRequest::Reset { entry } => {
                self.needs_completion = false;
                self.reset_to_initial(fd)?;
                if let Some(entry) = entry {
                    enter(fd, &entry).map_err(|e| {
                        format!("cannot set the entry state of vCPU {}: {e}", self.index)
                    })?;
                }
                let cfg = self.shared.apic_cfg;
                let index = self.index;
                let mut st = self.me().lock();
                st.apic = LocalApic::new(
                    index as u32,
                    crate::apic::ApicConfig {
                        bsp: index == 0,
                        ..cfg
                    },
                );
                st.nmi = false;
                st.run = if entry.is_some() {
                    RunState::Runnable
                } else {
                    RunState::WaitForSipi
                };
                self.shared.timers.set(index, None);
                Self::forget_window_state(fd);
                fd.get_kvm_run().cr8 = 0;
                Ok(())
            }
        }
    }

    /// Sleeps until woken; reports a VM-wide deadlock once per sleep if this vCPU is stuck.
    fn sleep<'a>(
        &mut self,
        me: &'a VcpuShared,
        st: std::sync::MutexGuard<'a, crate::machine::VcpuState>,
    ) -> std::sync::MutexGuard<'a, crate::machine::VcpuState> {
        if !self.reported_stuck
            && matches!(
                st.run,
                RunState::Halted { if_flag: false } | RunState::WaitForSipi | RunState::Stopped
            )
        {
            self.reported_stuck = true;
            drop(st);
            if self.shared.all_stuck() {
                self.shared.send(VmEvent::Deadlock);
            }
            return me.lock();
        }
        me.wake.wait(st).unwrap_or_else(|e| e.into_inner())
    }

    /// Halted with IF=1 and nothing pending: sleeps until woken or until the claimed timer deadline, then gives
    /// the timers back (firing what is due) so that the loop re-checks for an interrupt.
    fn halt_wait<'a>(
        &mut self,
        me: &'a VcpuShared,
        st: std::sync::MutexGuard<'a, crate::machine::VcpuState>,
    ) -> std::sync::MutexGuard<'a, crate::machine::VcpuState> {
        let Some(deadline) = self.halt_claim else {
            // Claim first, then let the loop re-check everything (the hook is called without the state lock:
            // something may have arrived in between) before it comes back here to sleep.
            let apic = self.shared.timers.claim(self.index);
            drop(st);
            let now = self.shared.clock.now_ns();
            let hook = self
                .shared
                .vcpu_hook
                .get()
                .and_then(|h| h.claim_timers(self.index, now));
            self.halt_claim = Some(match (apic, hook) {
                (Some(a), Some(h)) => Some(a.min(h)),
                (a, h) => a.or(h),
            });
            return me.lock();
        };
        let now = self.shared.clock.now_ns();
        let st = match deadline {
            None => me.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) if d > now => {
                me.wake
                    .wait_timeout(st, std::time::Duration::from_nanos(d - now))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            Some(_) => st,
        };
        drop(st);
        self.release_timers(me)
    }

    /// Gives claimed timers back to their threads, expiring those that are due (the hook queues their work; the
    /// APIC timer fires here). Called without the state lock; returns it.
    fn release_timers<'a>(
        &mut self,
        me: &'a VcpuShared,
    ) -> std::sync::MutexGuard<'a, crate::machine::VcpuState> {
        let shared = &self.shared;
        if self.halt_claim.take().is_some() {
            if let Some(h) = shared.vcpu_hook.get() {
                h.release_timers(self.index);
            }
        }
        let mut st = me.lock();
        let now = shared.clock.now_ns();
        if shared.timers.release(self.index, now) {
            let tsc = shared.guest_tsc(&st);
            // The interrupt it may request is picked up by the loop; nobody else needs waking.
            let _ = st.apic.timer_tick(now, tsc);
            // Never re-arm in the past (as the timer thread does).
            let next = st.apic.next_timer_deadline_ns().map(|d| d.max(now + 1_000));
            shared.timers.set(self.index, next);
        }
        st
    }

    fn run_loop(&mut self, fd: &mut VcpuFd) -> Result<(), String> {
        let shared = self.shared.clone();
        let me = &shared.vcpus[self.index];
        loop {
            // Decide what to do, with the state locked.
            let mut st = me.lock();
            let (inject, nmi, window) = loop {
                if shared.stopping() {
                    return Ok(());
                }
                if self.halt_claim.is_some()
                    && (st.pause > 0 || !matches!(st.run, RunState::Halted { if_flag: true }))
                {
                    // Leaving the halt (or parking): the timer threads watch this vCPU's timers again.
                    drop(st);
                    st = self.release_timers(me);
                    continue;
                }
                if let Some(h) = shared.vcpu_hook.get() {
                    // Exit-less EOI completed by the guest since the last entry: perform it before anything
                    // looks at the APIC (and before parking, so snapshots see it done).
                    if let Some(eoi) = h.sync_from_guest(self.index, &mut st.apic) {
                        drop(st);
                        if let Some(hook) = shared.eoi_hook.get() {
                            hook.eoi(self.index, eoi);
                        }
                        st = me.lock();
                        continue;
                    }
                }
                if st.pause > 0 {
                    if self.needs_completion {
                        drop(st);
                        self.complete_pending(fd)?;
                        st = me.lock();
                        continue;
                    }
                    st.parked = true;
                    me.parked_cv.notify_all();
                    while st.pause > 0 && !shared.stopping() {
                        let op = me
                            .parked_op
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        if let Some(op) = op {
                            // Migration work on this thread's fd (Paused::run_on_vcpu), still parked.
                            drop(st);
                            op(fd);
                            st = me.lock();
                            continue;
                        }
                        st = me.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.parked = false;
                    continue;
                }
                if !st.requests.is_empty() {
                    let reqs = std::mem::take(&mut st.requests);
                    drop(st);
                    for r in reqs {
                        self.handle_request(fd, r)?;
                    }
                    st = me.lock();
                    continue;
                }
                if let Some(h) = shared.vcpu_hook.get() {
                    if h.has_work(self.index) {
                        drop(st);
                        h.run_work(self.index);
                        st = me.lock();
                        continue;
                    }
                }
                if st.apic.take_init() {
                    st.apic.init_reset();
                    st.nmi = false;
                    let bsp = self.index == 0;
                    st.run = if bsp {
                        RunState::Runnable
                    } else {
                        RunState::WaitForSipi
                    };
                    let deadline = st.apic.next_timer_deadline_ns();
                    shared.timers.set(self.index, deadline);
                    drop(st);
                    self.needs_completion = false;
                    self.reset_to_initial(fd)?;
                    Self::forget_window_state(fd);
                    st = me.lock();
                    continue;
                }
                if st.apic.take_nmi() {
                    st.nmi = true;
                }
                match st.run {
                    RunState::WaitForSipi => {
                        if let Some(vector) = st.apic.take_sipi() {
                            st.run = RunState::Runnable;
                            drop(st);
                            let mut sregs = self.init.sregs;
                            let mut regs = self.init.regs;
                            boot::set_sipi_state(vector, &mut sregs, &mut regs);
                            fd.set_sregs(&sregs)
                                .and_then(|_| fd.set_regs(&regs))
                                .map_err(|e| format!("cannot start vCPU {}: {e}", self.index))?;
                            Self::forget_window_state(fd);
                            tracing::debug!(vcpu = self.index, vector, "SIPI");
                            st = me.lock();
                            continue;
                        }
                        st = self.sleep(me, st);
                        continue;
                    }
                    RunState::Halted { if_flag } => {
                        let _ = st.apic.take_sipi();
                        if st.nmi || (if_flag && st.apic.pending_interrupt().is_some()) {
                            st.run = RunState::Runnable;
                            continue;
                        }
                        st = if if_flag {
                            self.halt_wait(me, st)
                        } else {
                            self.sleep(me, st)
                        };
                        continue;
                    }
                    RunState::Stopped => {
                        st = self.sleep(me, st);
                        continue;
                    }
                    RunState::Runnable => {}
                }
                if let Some(d) = self.throttle.before_entry(&shared.throttle) {
                    // Auto-converge: sleep before the next entry. A kick (pause, stop, interrupt) ends the wait
                    // early and the loop re-checks everything first.
                    st = me
                        .wake
                        .wait_timeout(st, d)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
                self.reported_stuck = false;
                let _ = st.apic.take_sipi();
                let nmi = std::mem::take(&mut st.nmi);
                let run = fd.get_kvm_run();
                run.cr8 = st.apic.cr8();
                let can_inject = run.ready_for_interrupt_injection != 0 && run.if_flag != 0;
                let mut inject = None;
                let mut window = false;
                if let Some(v) = st.apic.pending_interrupt() {
                    if can_inject && !nmi {
                        st.apic.ack_interrupt(v);
                        inject = Some(v);
                    } else {
                        window = true;
                    }
                }
                if let Some(h) = shared.vcpu_hook.get() {
                    h.sync_to_guest(self.index, &st.apic);
                }
                // Every kick so far asked for a look at state that was just looked at (wakers change it under
                // this lock before they kick): a leftover `immediate_exit` would only cost an empty KVM_RUN round
                // trip (the usual case for a vCPU woken from a halt, whose kick lands while it sleeps).
                me.kicker.set_immediate_exit(0);
                st.in_guest = true;
                break (inject, nmi, window);
            };
            drop(st);

            if nmi {
                fd.nmi()
                    .map_err(|e| format!("KVM_NMI failed on vCPU {}: {e}", self.index))?;
            }
            if let Some(v) = inject {
                tracing::trace!(vcpu = self.index, v, "inject");
                inject_interrupt(fd, v)
                    .map_err(|e| format!("KVM_INTERRUPT failed on vCPU {}: {e}", self.index))?;
            }
            fd.get_kvm_run().request_interrupt_window = u8::from(window);

            let deferred = self.run_once(fd)?;
            self.apply_deferred(fd, deferred)?;
        }
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self, fd: &mut VcpuFd) -> Result<Deferred, String> {
        let shared = self.shared.clone();
        let me = &shared.vcpus[self.index];
        let index = self.index;
        self.needs_completion = false;
        // CR8 as this entry starts with it; a different value after the exit means the guest wrote CR8.
        let cr8_before = fd.get_kvm_run().cr8;
        let exit = fd.run();
        me.kicker.set_immediate_exit(0);
        crate::tlbflush::left_guest(me);
        let exit = match exit {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (timer, IPI, queued work) ended this KVM_RUN: a round trip to userspace like any
                // other exit, so it counts in the statistics.
                me.lock().exits += 1;
                return Ok(Deferred::None);
            }
            Err(e) => return Err(format!("KVM_RUN failed on vCPU {index}: {e}")),
        };
        let mut fx = ApicEffects::default();
        let deferred = match exit {
            VcpuExit::IoOut(port, data) => {
                // Every I/O, MMIO and MSR exit is finished by the next KVM_RUN (string I/O and emulated
                // accesses in particular), so the rendezvous re-enters once before parking.
                self.needs_completion = true;
                if shared.port_hook.get().is_some_and(|h| h.handles(port)) {
                    // The hook needs the registers (sync regs in kvm_run), which the exit value borrows.
                    Deferred::PortHook(port, PortBytes::new(data))
                } else {
                    Deferred::Io(shared.devices.pio_write(index, port, data))
                }
            }
            VcpuExit::IoIn(port, data) => {
                self.needs_completion = true;
                shared.devices.pio_read(index, port, data);
                Deferred::None
            }
            VcpuExit::MmioRead(addr, data) => {
                self.needs_completion = true;
                let st = me.lock();
                match st.apic.mmio_base() {
                    Some(base) if addr >= base && addr < base + APIC_MMIO_SIZE => {
                        st.apic.mmio_read(addr - base, data, shared.clock.now_ns());
                    }
                    _ => {
                        drop(st);
                        shared.devices.mmio_read(index, addr, data);
                    }
                }
                Deferred::None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.needs_completion = true;
                let mut st = me.lock();
                match st.apic.mmio_base() {
                    Some(base) if addr >= base && addr < base + APIC_MMIO_SIZE => {
                        fx = st.apic.mmio_write(addr - base, data, shared.clock.now_ns());
                        self.after_apic(&mut st, &fx);
                        Deferred::None
                    }
                    _ => {
                        drop(st);
                        Deferred::Io(shared.devices.mmio_write(index, addr, data))
                    }
                }
            }
            VcpuExit::X86Rdmsr(exit) => {
                self.needs_completion = true;
                match self.rdmsr(exit.index) {
                    Ok(v) => {
                        *exit.data = v;
                        *exit.error = 0;
                    }
                    Err(Gp) => {
                        tracing::debug!(vcpu = index, msr = exit.index, "rdmsr #GP");
                        *exit.error = 1;
                    }
                }
                Deferred::None
            }
            VcpuExit::X86Wrmsr(exit) => {
                self.needs_completion = true;
                match self.wrmsr(exit.index, exit.data) {
                    Ok((effects, d)) => {
                        fx = effects;
                        *exit.error = 0;
                        d
                    }
                    Err(Gp) => {
                        tracing::debug!(vcpu = index, msr = exit.index, value = exit.data, "wrmsr #GP");
                        *exit.error = 1;
                        Deferred::None
                    }
                }
            }
            VcpuExit::Hlt => {
                let if_flag = fd.get_kvm_run().if_flag != 0;
                tracing::trace!(vcpu = index, if_flag, "HLT");
                let mut st = me.lock();
                st.run = RunState::Halted { if_flag };
                Deferred::None
            }
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => Deferred::None,
            VcpuExit::SetTpr => Deferred::None,
            VcpuExit::Shutdown => Deferred::TripleFault,
            VcpuExit::InternalError => Deferred::InternalError,
            VcpuExit::FailEntry(reason, cpu) => Deferred::Fatal(format!(
                "KVM could not enter vCPU {index} (hardware entry failure reason {reason:#x} on host CPU \
                 {cpu})"
            )),
            VcpuExit::SystemEvent(kind, _) => Deferred::Fatal(format!(
                "unexpected KVM system event {kind} on vCPU {index}"
            )),
            VcpuExit::MemoryFault { gpa, size, .. } => Deferred::Fatal(format!(
                "guest memory fault on vCPU {index} at {gpa:#x} (size {size:#x})"
            )),
            other => Deferred::Fatal(format!("unexpected KVM exit on vCPU {index}: {other:?}")),
        };
        {
            // CR8 as KVM left it: if the guest wrote it during this run, the TPR follows. (Comparing with the
            // value at entry keeps a TPR written by the exit handler above, e.g. through the x2APIC MSR.)
            let cr8 = fd.get_kvm_run().cr8;
            let mut st = me.lock();
            st.exits += 1;
            if cr8 != cr8_before && st.apic.cr8() != cr8 {
                let f = st.apic.set_cr8(cr8);
                fx = fx.merge(f);
            }
        }
        if let Some(ipi) = fx.ipi {
            shared.route_ipi(&ipi);
        }
        if let (Some(eoi), Some(hook)) = (fx.eoi, shared.eoi_hook.get()) {
            hook.eoi(index, eoi);
        }
        Ok(deferred)
    }

    /// Book-keeping after an APIC operation, with the state still locked.
    fn after_apic(&self, st: &mut crate::machine::VcpuState, fx: &ApicEffects) {
        if fx.timer_changed {
            self.shared
                .timers
                .set(self.index, st.apic.next_timer_deadline_ns());
        }
    }

    fn rdmsr(&self, msr: u32) -> Result<u64, Gp> {
        let shared = &self.shared;
        let me = self.me();
        match msr {
            MSR_APIC_BASE => Ok(me.lock().apic.read_apic_base()),
            MSR_TSC_DEADLINE => Ok(me.lock().apic.read_tsc_deadline()),
            MSR_IA32_TSC => {
                let st = me.lock();
                Ok(shared.guest_tsc(&st))
            }
            MSR_IA32_TSC_ADJUST => Ok(me.lock().tsc_adjust),
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => {
                me.lock().apic.msr_read(msr, shared.clock.now_ns())
            }
            _ => match shared.msr_hook.get().and_then(|h| h.rdmsr(self.index, msr)) {
                Some(r) => r,
                None => Err(Gp),
            },
        }
    }

    fn wrmsr(&self, msr: u32, value: u64) -> Result<(ApicEffects, Deferred), Gp> {
        let shared = &self.shared;
        let me = self.me();
        let apic_op = |f: &dyn Fn(&mut crate::machine::VcpuState) -> Result<ApicEffects, Gp>| {
            let mut st = me.lock();
            let fx = f(&mut st)?;
            self.after_apic(&mut st, &fx);
            Ok((fx, Deferred::None))
        };
        match msr {
            MSR_APIC_BASE => apic_op(&|st| st.apic.write_apic_base(value)),
            MSR_TSC_DEADLINE => apic_op(&|st| {
                let now = shared.clock.now_ns();
                let tsc = shared.guest_tsc(st);
                Ok(st.apic.write_tsc_deadline(value, now, tsc))
            }),
            MSR_IA32_TSC => Ok((ApicEffects::default(), Deferred::SetTsc(value))),
            MSR_IA32_TSC_ADJUST => Ok((ApicEffects::default(), Deferred::SetTscAdjust(value))),
            X2APIC_MSR_FIRST..=X2APIC_MSR_LAST => apic_op(&|st| {
                let now = shared.clock.now_ns();
                st.apic.msr_write(msr, value, now)
            }),
            _ => match shared
                .msr_hook
                .get()
                .and_then(|h| h.wrmsr(self.index, msr, value))
            {
                Some(r) => r.map(|()| (ApicEffects::default(), Deferred::None)),
                None => Err(Gp),
            },
        }
    }

    /// Changes this vCPU's TSC so that it reads `value` now.
    fn write_tsc(&self, fd: &VcpuFd, value: u64) -> Result<(), String> {
        let me = self.me();
        if !self.shared.tsc_offset_attr {
            // This KVM does not apply TSC offsets to what the guest reads: the TSC cannot change.
            tracing::debug!(vcpu = self.index, value, "guest TSC write ignored");
            return Ok(());
        }
        let new_offset = value.wrapping_sub(host_tsc());
        set_tsc_offset(fd, new_offset)
            .map_err(|e| format!("cannot set the TSC of vCPU {}: {e}", self.index))?;
        let mut st = me.lock();
        st.tsc_offset = new_offset;
        let now = self.shared.clock.now_ns();
        let fx = st.apic.resync_tsc(now, value);
        self.after_apic(&mut st, &fx);
        drop(st);
        if fx.reevaluate {
            me.wake_up();
        }
        Ok(())
    }

    fn apply_deferred(&mut self, fd: &mut VcpuFd, d: Deferred) -> Result<(), String> {
        let index = self.index;
        match d {
            Deferred::None => Ok(()),
            Deferred::PortHook(port, data) => {
                if let Some(hook) = self.shared.port_hook.get().cloned() {
                    let sync = fd.sync_regs();
                    let mut regs: kvm_regs = sync.regs;
                    let sregs = sync.sregs;
                    let result = {
                        let fd_ref: &VcpuFd = fd;
                        let mut xmm = || read_xmm0_5(fd_ref);
                        hook.pio_write_full(
                            index,
                            port,
                            data.as_slice(),
                            &mut regs,
                            &sregs,
                            &mut xmm,
                        )
                    };
                    match result {
                        PortResult::Unchanged => {}
                        PortResult::RegsChanged => {
                            // Handed back through the sync-regs area: KVM loads it on the next entry, no ioctl.
                            fd.sync_regs_mut().regs = regs;
                            fd.set_sync_dirty_reg(kvm_ioctls::SyncReg::Register);
                        }
                        PortResult::InjectUd => {
                            let mut ev = fd.get_vcpu_events().map_err(|e| {
                                format!("KVM_GET_VCPU_EVENTS failed on vCPU {index}: {e}")
                            })?;
                            ev.exception.injected = 1;
                            ev.exception.nr = 6;
                            ev.exception.has_error_code = 0;
                            ev.exception.error_code = 0;
                            ev.flags = 0;
                            fd.set_vcpu_events(&ev).map_err(|e| {
                                format!("KVM_SET_VCPU_EVENTS failed on vCPU {index}: {e}")
                            })?;
                        }
                    }
                }
                Ok(())
            }
            Deferred::SetTsc(value) => {
                let (old_tsc, adjust) = {
                    let st = self.me().lock();
                    (self.shared.guest_tsc(&st), st.tsc_adjust)
                };
                self.write_tsc(fd, value)?;
                // SDM: a write to IA32_TSC adds the same difference to IA32_TSC_ADJUST.
                self.me().lock().tsc_adjust = adjust.wrapping_add(value.wrapping_sub(old_tsc));
                Ok(())
            }
            Deferred::SetTscAdjust(value) => {
                let (now_tsc, adjust) = {
                    let st = self.me().lock();
                    (self.shared.guest_tsc(&st), st.tsc_adjust)
                };
                self.write_tsc(fd, now_tsc.wrapping_add(value.wrapping_sub(adjust)))?;
                self.me().lock().tsc_adjust = value;
                Ok(())
            }
            Deferred::Io(IoAction::None) => Ok(()),
            Deferred::Io(action) => {
                if matches!(action, IoAction::Exit(_) | IoAction::PowerOff) {
                    // Let the main thread end the VM; this vCPU must not run any further.
                    self.me().lock().run = RunState::Stopped;
                }
                self.shared.send(VmEvent::Io(action));
                Ok(())
            }
            Deferred::TripleFault => {
                let dump = self.dump(fd);
                self.me().lock().run = RunState::Stopped;
                self.shared.send(VmEvent::TripleFault { vcpu: index, dump });
                Ok(())
            }
            Deferred::InternalError => {
                // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the `internal` member of the union
                // is the valid one.
                let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
                let what = match internal.suberror {
                    1 => "emulation failure (KVM cannot emulate the instruction)",
                    2 => "simultaneous exceptions",
                    3 => "delivery event",
                    4 => "unexpected exit",
                    _ => "internal error",
                };
                let fetched = if internal.suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
                    // SAFETY: the suberror is KVM_INTERNAL_ERROR_EMULATION, for which KVM fills the
                    // `emulation_failure` member of the union (a plain-data struct; its bytes are only used
                    // when KVM set the instruction-bytes flag).
                    let ef = unsafe { fd.get_kvm_run().__bindgen_anon_1.emulation_failure };
                    // SAFETY: the inner union has a single plain-data member.
                    let insn = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                    diag::emulation_failure_bytes(
                        internal.ndata,
                        ef.flags,
                        insn.insn_size,
                        &insn.insn_bytes,
                    )
                } else {
                    String::new()
                };
                let dump = self.dump(fd);
                let err = format!(
                    "KVM internal error on vCPU {index}: suberror {} ({what}){fetched}; {dump}",
                    internal.suberror
                );
                self.me().lock().run = RunState::Stopped;
                Err(err)
            }
            Deferred::Fatal(msg) => {
                let dump = self.dump(fd);
                self.me().lock().run = RunState::Stopped;
                Err(format!("{msg}; {dump}"))
            }
        }
    }

    /// Registers and instruction bytes, for diagnostics.
    fn dump(&self, fd: &mut VcpuFd) -> String {
        let (regs, sregs) = match (fd.get_regs(), fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            _ => {
                let s = fd.sync_regs();
                (s.regs, s.sregs)
            }
        };
        let bytes = diag::instruction_bytes(&self.shared.mem, &regs, &sregs, 16);
        format!(
            "{}; code at CS:RIP: {}",
            diag::format_regs(&regs, &sregs),
            diag::hex_bytes(&bytes)
        )
    }
}

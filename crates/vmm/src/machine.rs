//! The KVM machine: guest RAM, vCPU threads, the userspace local APICs, interrupt routing and injection, the
//! timer thread, the pause/kick rendezvous, reset and shutdown.
//!
//! Threads: one per vCPU (it owns its `VcpuFd` and runs `KVM_RUN`), one timer thread (fires APIC timers at
//! host deadlines), and the caller's thread, which runs [`Machine::run`]: it receives [`VmEvent`]s from the
//! vCPUs and performs VM-wide operations (reset, stop) with the rendezvous. Lock order: a vCPU's state lock may
//! be held while taking the timer-queue lock; never hold two vCPU state locks at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use hyperv::cpuid::CpuidEntry;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::apic::{ApicConfig, DeliveryMode, Eoi, Gp, Ipi, LocalApic};
use crate::boot::{self, BootEntry};
use crate::cpu;
use crate::kick::{self, Kicker};
use crate::layout::MemoryLayout;
use crate::timer::{self, host_tsc, Clock, TimerQueue};
use crate::vcpu;

/// What a device asks the machine to do after an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoAction {
    /// Nothing.
    #[default]
    None,
    /// End the process with this exit status (isa-debug-exit: `(value << 1) | 1`).
    Exit(i32),
    /// Power off (Bochs/QEMU shutdown port): exit status 0.
    PowerOff,
    /// Reset the VM (as a guest-requested reset; with `--no-reboot` it stops the VM).
    Reset,
}

/// The devices of the machine, as the vCPU threads see them. Unhandled ports and MMIO addresses should read
/// as all-ones and drop writes.
pub trait IoDevices: Send + Sync {
    /// Port read of `data.len()` bytes.
    fn pio_read(&self, vcpu: usize, port: u16, data: &mut [u8]);
    /// Port write.
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8]) -> IoAction;
    /// MMIO read outside RAM and the local APIC page.
    fn mmio_read(&self, _vcpu: usize, _addr: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    /// MMIO write outside RAM and the local APIC page.
    fn mmio_write(&self, _vcpu: usize, _addr: u64, _data: &[u8]) -> IoAction {
        IoAction::None
    }
    /// The VM is being reset (called with every vCPU paused).
    fn reset(&self) {}
    /// The devices' state for a snapshot or migration (every vCPU stopped); none by default.
    fn save_state(&self) -> Vec<crate::devices::DeviceState> {
        Vec::new()
    }
    /// Loads device states from a snapshot or migration (every vCPU held). By default only an empty list is
    /// accepted.
    fn restore_state(&self, states: &[crate::devices::DeviceState]) -> Result<(), String> {
        match states.first() {
            None => Ok(()),
            Some(s) => Err(format!(
                "the stream has the state of device '{}', which this VM does not have",
                s.id
            )),
        }
    }
}

/// Loads the guest kernel into RAM; called at start and again on every reset (after RAM was cleared).
pub trait BootLoader: Send + Sync {
    /// Loads the kernel and returns the BSP's entry.
    fn load(&self, mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Result<BootEntry, String>;
}

/// A handler for MSRs the VMM itself does not implement (the Hyper-V range 0x40000000..=0x400001FF goes here
/// first). Return `None` for "not mine": the MSR then raises #GP.
pub trait MsrHook: Send + Sync {
    /// RDMSR.
    fn rdmsr(&self, vcpu: usize, msr: u32) -> Option<Result<u64, Gp>>;
    /// WRMSR.
    fn wrmsr(&self, vcpu: usize, msr: u32, value: u64) -> Option<Result<(), Gp>>;
}

/// A private I/O port handler that needs the vCPU's registers (the Hyper-V hypercall port). Consulted before
/// the devices.
pub trait PortHook: Send + Sync {
    /// Whether `port` belongs to this hook.
    fn handles(&self, port: u16) -> bool;
    /// A port write; `regs` are the vCPU's general-purpose registers, which the hook may change (return true
    /// if it did).
    fn pio_write(&self, vcpu: usize, port: u16, data: &[u8], regs: &mut kvm_regs) -> bool;
    /// A port write with the system registers too (processor mode, CPL) and the option to inject #UD. `xmm`
    /// reads XMM0..5 (low 128 bits each) with `KVM_GET_XSAVE` when called (an extra ioctl: only when needed, e.g.
    /// for Hyper-V XMM fast hypercall input); `None` if the read failed. The machine calls this one; the default
    /// forwards to [`PortHook::pio_write`].
    fn pio_write_full(
        &self,
        vcpu: usize,
        port: u16,
        data: &[u8],
        regs: &mut kvm_regs,
        _sregs: &kvm_sregs,
        _xmm: &mut dyn FnMut() -> Option<[u128; 6]>,
    ) -> PortResult {
        if self.pio_write(vcpu, port, data, regs) {
            PortResult::RegsChanged
        } else {
            PortResult::Unchanged
        }
    }
}

/// What the machine does after a [`PortHook::pio_write_full`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortResult {
    /// Nothing changed.
    Unchanged,
    /// The hook changed the general-purpose registers: hand them back to KVM (through the sync-regs area).
    RegsChanged,
    /// Inject #UD into the vCPU (no register change).
    InjectUd,
}

/// Work that must run on a vCPU's own thread (the Hyper-V engine's timer expiries and deferred work), plus
/// life-cycle notifications. Installed with [`Machine::set_vcpu_hook`].
pub trait VcpuHook: Send + Sync {
    /// Called once on vCPU `vcpu`'s thread when the thread starts (e.g. to find its CPU-time clock).
    fn thread_started(&self, _vcpu: usize) {}
    /// Whether vCPU `vcpu` has queued work. Called with the vCPU's state locked before every entry and on every
    /// wake-up (also while halted), so it must be cheap and must not take machine locks. Whoever queues work
    /// wakes the vCPU with [`VmHandle::kick`].
    fn has_work(&self, vcpu: usize) -> bool;
    /// Runs vCPU `vcpu`'s queued work, on its thread, with no machine lock held.
    fn run_work(&self, vcpu: usize);
    /// The VM is being reset: every vCPU is paused, RAM was reloaded and the devices were reset.
    fn vm_reset(&self) {}
    /// vCPU `vcpu` is about to sleep halted and will watch its own hook timers until
    /// [`VcpuHook::release_timers`] (the hook's timer thread leaves them alone, unless they are re-armed):
    /// returns the earliest deadline in nanoseconds on the machine clock (`now_ns` is now), `None` if none.
    /// Called on the vCPU's thread with no machine lock held.
    fn claim_timers(&self, _vcpu: usize, _now_ns: u64) -> Option<u64> {
        None
    }
    /// The halted vCPU woke: its hook timers go back to the hook's timer thread, and those due now expire
    /// (their work is queued for the vCPU). Called on the vCPU's thread with no machine lock held.
    fn release_timers(&self, _vcpu: usize) {}
    /// Called on vCPU `vcpu`'s thread with its state locked, after every exit and before pending interrupts
    /// are evaluated or the vCPU parks (hv-vapic exit-less EOI: the hook may complete an EOI the guest
    /// signalled through memory). Returns the EOI it performed; the machine reports it to the [`EoiHook`].
    /// Must be cheap and must not take machine locks.
    fn sync_from_guest(&self, _vcpu: usize, _apic: &mut LocalApic) -> Option<Eoi> {
        None
    }
    /// Called on vCPU `vcpu`'s thread with its state locked, right before `KVM_RUN`, after the injection for
    /// this entry was decided (and acknowledged in the APIC). Must not take machine locks.
    fn sync_to_guest(&self, _vcpu: usize, _apic: &LocalApic) {}
}

/// Observes every EOI that cleared an ISR bit (the Hyper-V engine redelivers pending SynIC messages from
/// here). Called on the vCPU's thread, with no machine lock held.
pub trait EoiHook: Send + Sync {
    /// vCPU `vcpu` performed an EOI of `eoi.vector`.
    fn eoi(&self, vcpu: usize, eoi: Eoi);
}

/// Static configuration of a machine.
#[derive(Clone)]
pub struct VmConfig {
    /// RAM size in bytes.
    pub ram_size: u64,
    /// Number of vCPUs (APIC IDs 0..n, vCPU 0 is the BSP).
    pub vcpus: u32,
    /// `--no-reboot`: a triple fault or guest reset stops the VM (exit status 0) instead of resetting it.
    pub no_reboot: bool,
    /// The CPUID table before the per-vCPU patches (APIC IDs); `None` uses KVM's supported CPUID.
    pub cpuid: Option<Vec<CpuidEntry>>,
    /// Whether the guest may use x2APIC mode (CPUID.1:ECX[21]).
    pub x2apic: bool,
    /// The APIC timer's input clock in Hz (what HV_X64_MSR_APIC_FREQUENCY reports).
    pub apic_bus_hz: u64,
    /// Handler for otherwise unhandled MSRs (the Hyper-V engine).
    pub msr_hook: Option<Arc<dyn MsrHook>>,
    /// Handler for private ports (the Hyper-V hypercall port).
    pub port_hook: Option<Arc<dyn PortHook>>,
    /// EOI observer.
    pub eoi_hook: Option<Arc<dyn EoiHook>>,
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("ram_size", &self.ram_size)
            .field("vcpus", &self.vcpus)
            .field("no_reboot", &self.no_reboot)
            .field("cpuid_entries", &self.cpuid.as_ref().map(Vec::len))
            .field("x2apic", &self.x2apic)
            .field("apic_bus_hz", &self.apic_bus_hz)
            .field("msr_hook", &self.msr_hook.is_some())
            .field("port_hook", &self.port_hook.is_some())
            .field("eoi_hook", &self.eoi_hook.is_some())
            .finish()
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            ram_size: crate::layout::DEFAULT_RAM_SIZE,
            vcpus: 1,
            no_reboot: false,
            cpuid: None,
            x2apic: true,
            apic_bus_hz: 1_000_000_000,
            msr_hook: None,
            port_hook: None,
            eoi_hook: None,
        }
    }
}

/// Largest vCPU count accepted: KVM's `KVM_CAP_MAX_VCPUS` on the project's hosts. Above
/// [`MAX_XAPIC_VCPUS`] the guest must be able to use x2APIC.
pub const MAX_VCPUS: u32 = 1024;

/// Largest vCPU count without x2APIC: xAPIC physical IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_XAPIC_VCPUS: u32 = 255;

/// Errors creating or running the machine.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open KVM: {0}")]
    Kvm(String),
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("KVM setup failed ({what}): {err}")]
    Setup { what: &'static str, err: String },
    #[error("cannot allocate guest RAM: {0}")]
    Memory(String),
    #[error("{0}")]
    Load(String),
}

fn once<T>(v: Option<T>) -> OnceLock<T> {
    let cell = OnceLock::new();
    if let Some(v) = v {
        let _ = cell.set(v);
    }
    cell
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Setup {
        what,
        err: e.to_string(),
    }
}

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A device asked for this process exit status (isa-debug-exit).
    Exit(i32),
    /// The guest powered off (exit status 0).
    PowerOff,
    /// A triple fault or reset with `--no-reboot` (exit status 0; the warning was printed).
    Stopped,
    /// A fatal error (message without the `error: ` prefix); exit status non-zero.
    Error(String),
    /// [`VmHandle::stop`] was called.
    Cancelled,
}

/// Events from the vCPU threads to the thread running [`Machine::run`].
#[derive(Debug)]
pub(crate) enum VmEvent {
    Io(IoAction),
    TripleFault {
        vcpu: usize,
        dump: String,
    },
    Fatal(String),
    Deadlock,
    /// [`VmHandle::stop`] was called (wakes the event loop).
    Cancel,
    /// [`VmHandle::request_reset`] was called (QMP `system_reset`).
    HostReset,
}

/// The run state of a vCPU, owned by the VMM (no in-kernel irqchip, so no KVM mp state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    /// Runs guest code.
    Runnable,
    /// Executed HLT; `if_flag` is RFLAGS.IF at that point.
    Halted { if_flag: bool },
    /// Waits for a SIPI (APs at power-on and after INIT).
    WaitForSipi,
    /// Stopped after a triple fault, until a reset.
    Stopped,
}

/// Work a vCPU does on itself when it next runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRequest {
    /// Power-on reset: the BSP enters `entry` (when given), APs wait for a SIPI.
    Reset { entry: Option<BootEntry> },
    /// Flush the vCPU's guest TLB before it next runs guest code (Hyper-V remote TLB flush; see
    /// [`crate::tlbflush`]).
    FlushTlb,
}

/// Mutable per-vCPU state shared between the vCPU thread and the others.
pub(crate) struct VcpuState {
    pub apic: LocalApic,
    pub run: RunState,
    /// An NMI taken from the APIC and not yet injected.
    pub nmi: bool,
    /// Outstanding pause requests.
    pub pause: u32,
    /// The vCPU is parked at the rendezvous (all exits completed).
    pub parked: bool,
    /// The vCPU thread has ended.
    pub exited: bool,
    pub requests: Vec<VcpuRequest>,
    /// Guest TSC = host TSC + `tsc_offset` (wrapping).
    pub tsc_offset: u64,
    /// IA32_TSC_ADJUST.
    pub tsc_adjust: u64,
    /// Number of KVM exits handled (for tests and statistics).
    pub exits: u64,
    /// The thread is in (or about to enter) `KVM_RUN` and has checked `requests` for this entry
    /// ([`crate::tlbflush`]).
    pub in_guest: bool,
    /// Someone waits on `parked_cv` for `in_guest` to become false.
    pub exit_waiters: bool,
}

impl VcpuState {
    /// Whether the vCPU can never run again on its own: only another vCPU could wake it.
    fn is_stuck(&self) -> bool {
        if self.exited {
            return true;
        }
        if self.pause > 0 || !self.requests.is_empty() || self.nmi {
            return false;
        }
        match self.run {
            RunState::Runnable => false,
            RunState::Halted { if_flag: true } => false,
            // A halted vCPU with IF=0 wakes only for NMI or INIT; wait-for-SIPI only for INIT/SIPI. Any of
            // these latched means it is not stuck.
            RunState::Halted { if_flag: false } => {
                !(self.apic.nmi_latched() || self.apic.init_latched())
            }
            RunState::WaitForSipi => {
                !(self.apic.init_latched() || self.apic.sipi_latched().is_some())
            }
            RunState::Stopped => true,
        }
    }
}

/// The shared half of one vCPU.
pub(crate) struct VcpuShared {
    pub state: Mutex<VcpuState>,
    /// The vCPU thread waits on this (halted, wait-for-SIPI, parked).
    pub wake: Condvar,
    /// Pausers wait on this for the vCPU to park.
    pub parked_cv: Condvar,
    pub kicker: Kicker,
    /// Work to run on the vCPU's own thread while it is parked ([`Paused::run_on_vcpu`]: migration).
    pub parked_op: Mutex<Option<ParkedOp>>,
}

/// A closure run on a parked vCPU's thread with its vCPU fd.
pub(crate) type ParkedOp = Box<dyn FnOnce(&mut VcpuFd) + Send>;

impl VcpuShared {
    pub fn lock(&self) -> MutexGuard<'_, VcpuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the vCPU thread wherever it is: sleeping (condition variable) or in `KVM_RUN` (kick).
    pub fn wake_up(&self) {
        self.wake.notify_all();
        self.kicker.kick();
    }
}

/// State shared by all threads of one machine.
pub(crate) struct VmShared {
    /// The VM; kept open as long as any thread of the machine runs.
    pub _vm: VmFd,
    pub mem: GuestMemoryMmap,
    pub layout: MemoryLayout,
    pub vcpus: Vec<VcpuShared>,
    pub clock: Clock,
    pub timers: TimerQueue,
    pub events: Mutex<Sender<VmEvent>>,
    pub stop: AtomicBool,
    pub devices: Arc<dyn IoDevices>,
    pub msr_hook: OnceLock<Arc<dyn MsrHook>>,
    pub port_hook: OnceLock<Arc<dyn PortHook>>,
    pub eoi_hook: OnceLock<Arc<dyn EoiHook>>,
    pub vcpu_hook: OnceLock<Arc<dyn VcpuHook>>,
    pub apic_cfg: ApicConfig,
    /// Whether `KVM_VCPU_TSC_OFFSET` works and the guest really sees the offset; otherwise guest writes to
    /// IA32_TSC / IA32_TSC_ADJUST leave the TSC unchanged (as the host would anyway).
    pub tsc_offset_attr: bool,
    /// One rendezvous at a time.
    pub rendezvous: Mutex<()>,
    /// Life-cycle observer (the QMP glue).
    pub lifecycle_hook: OnceLock<Arc<dyn crate::lifecycle::LifecycleHook>>,
    /// Bumped twice by every reset, which rewrites guest RAM where KVM's dirty log cannot see it (migration):
    /// to an odd value before the reset touches RAM, to an even one after. Odd = a reset is rewriting RAM.
    pub ram_epoch: AtomicU64,
    /// vCPU throttle of live migration's auto-converge (off unless a migration set it).
    pub throttle: crate::throttle::CpuThrottle,
}

impl VmShared {
    pub fn send(&self, ev: VmEvent) {
        let tx = self.events.lock().unwrap_or_else(|e| e.into_inner());
        // The receiver only disappears when the machine is being torn down; nothing to do then.
        let _ = tx.send(ev);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The guest TSC of a vCPU whose state is locked.
    pub fn guest_tsc(&self, st: &VcpuState) -> u64 {
        host_tsc().wrapping_add(st.tsc_offset)
    }

    /// Routes an IPI from a vCPU's APIC to every matching APIC and wakes the receivers.
    pub fn route_ipi(&self, ipi: &Ipi) {
        route_ipi(
            self.vcpus.len(),
            ipi,
            &mut |i, f| f(&mut self.vcpus[i].lock().apic),
            &mut |i| self.vcpus[i].wake_up(),
        );
    }

    /// Whether every vCPU is stuck (see [`VcpuState::is_stuck`]); checks one vCPU at a time.
    pub fn all_stuck(&self) -> bool {
        self.vcpus.iter().all(|v| v.lock().is_stuck())
    }

    /// Stops every thread of the machine.
    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for v in &self.vcpus {
            let _st = v.lock();
            v.wake_up();
        }
        self.timers.notify();
    }
}

/// Runs a closure on one APIC (by index) with its lock held.
pub(crate) type WithApic<'a> = dyn FnMut(usize, &mut dyn FnMut(&mut LocalApic)) + 'a;

/// Routes `ipi` over `n` APICs: `with_apic(i, f)` runs `f` on APIC `i` with its lock held (one at a time),
/// `wake(i)` is called, with no lock held, for each APIC that accepted the IPI. Fixed, NMI, INIT and SIPI go
/// to every matching APIC; lowest priority goes to the matching APIC with the lowest APIC ID.
pub(crate) fn route_ipi(
    n: usize,
    ipi: &Ipi,
    with_apic: &mut WithApic<'_>,
    wake: &mut dyn FnMut(usize),
) {
    if ipi.delivery_mode == DeliveryMode::LowestPriority {
        let mut best: Option<(u32, usize)> = None;
        for i in 0..n {
            with_apic(i, &mut |apic| {
                if apic.matches_destination(&ipi.dest, ipi.source_id) {
                    let id = apic.id();
                    if best.is_none_or(|(b, _)| id < b) {
                        best = Some((id, i));
                    }
                }
            });
        }
        if let Some((_, i)) = best {
            let mut accepted = false;
            with_apic(i, &mut |apic| accepted = apic.deliver(ipi));
            if accepted {
                wake(i);
            }
        }
        return;
    }
    for i in 0..n {
        let mut accepted = false;
        with_apic(i, &mut |apic| {
            accepted = apic.matches_destination(&ipi.dest, ipi.source_id) && apic.deliver(ipi);
        });
        if accepted {
            wake(i);
        }
    }
}

/// A handle to a running machine, usable from any thread.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<VmShared>,
}

/// vCPUs paused by [`VmHandle::pause`]; resumed when dropped.
pub struct Paused {
    shared: Arc<VmShared>,
    which: Vec<usize>,
}

impl Paused {
    /// The paused vCPUs.
    pub fn vcpus(&self) -> &[usize] {
        &self.which
    }

    /// Queues `req` for vCPU `i` (executed when it resumes, before it runs guest code).
    pub fn post(&self, i: usize, req: VcpuRequest) {
        if let Some(v) = self.shared.vcpus.get(i) {
            v.lock().requests.push(req);
        }
    }

    /// Number of KVM exits vCPU `i` has handled so far.
    pub fn exit_count(&self, i: usize) -> Option<u64> {
        self.shared.vcpus.get(i).map(|v| v.lock().exits)
    }

    /// Resumes the vCPUs (same as dropping).
    pub fn resume(self) {}

    /// The machine's shared state (for [`crate::migration`]).
    pub(crate) fn machine(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Runs `f` with vCPU `i`'s fd on that vCPU's own thread, once it is parked, and returns the result. `None`
    /// if `i` is not one of the paused vCPUs or its thread ended (or the machine stops) before running `f`.
    /// Works before [`Machine::run`] too (with [`VmHandle::hold_all`]): `f` runs when the thread starts.
    pub(crate) fn run_on_vcpu<R: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Option<R> {
        use std::sync::mpsc::RecvTimeoutError;
        if !self.which.contains(&i) {
            return None;
        }
        let v = self.shared.vcpus.get(i)?;
        let (tx, rx) = channel();
        let op: ParkedOp = Box::new(move |fd| {
            let _ = tx.send(f(fd));
        });
        *v.parked_op.lock().unwrap_or_else(|e| e.into_inner()) = Some(op);
        {
            // Notify under the state lock: the parked thread checks `parked_op` with it held.
            let _st = v.lock();
            v.wake.notify_all();
        }
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    let gone = v.lock().exited || self.shared.stopping();
                    if gone {
                        v.parked_op.lock().unwrap_or_else(|e| e.into_inner()).take();
                        return rx.try_recv().ok();
                    }
                }
            }
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        for &i in &self.which {
            let v = &self.shared.vcpus[i];
            let mut st = v.lock();
            st.pause = st.pause.saturating_sub(1);
            v.wake.notify_all();
        }
    }
}

impl VmHandle {
    /// The machine's shared state (for [`crate::tlbflush`]).
    pub(crate) fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Stops `which` vCPUs at a consistent point: each completes its pending I/O or MSR exit (re-entering
    /// `KVM_RUN` with `immediate_exit`) and parks. Returns when all are parked (or have ended). Not for use
    /// from a vCPU thread.
    pub fn pause(&self, which: &[usize]) -> Paused {
        let _one_at_a_time = self
            .shared
            .rendezvous
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let which: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| i < self.shared.vcpus.len())
            .collect();
        for &i in &which {
            let v = &self.shared.vcpus[i];
            v.lock().pause += 1;
            v.wake_up();
        }
        for &i in &which {
            let v = &self.shared.vcpus[i];
            let mut st = v.lock();
            while !st.parked && !st.exited && !self.shared.stopping() {
                st = v.parked_cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        }
        Paused {
            shared: self.shared.clone(),
            which,
        }
    }

    /// Pauses every vCPU.
    pub fn pause_all(&self) -> Paused {
        let all: Vec<usize> = (0..self.shared.vcpus.len()).collect();
        self.pause(&all)
    }

    /// Asks the machine to stop; [`Machine::run`] returns [`Outcome::Cancelled`].
    pub fn stop(&self) {
        self.shared.stop_all();
        self.shared.send(VmEvent::Cancel);
    }

    /// Like [`VmHandle::pause_all`] but without waiting for the vCPUs to park: each parks before it next
    /// enters the guest. Safe from any thread, including a vCPU thread, and before [`Machine::run`] (`-S`).
    pub fn hold_all(&self) -> Paused {
        let which: Vec<usize> = (0..self.shared.vcpus.len()).collect();
        for v in &self.shared.vcpus {
            let mut st = v.lock();
            st.pause += 1;
            v.wake_up();
        }
        Paused {
            shared: self.shared.clone(),
            which,
        }
    }

    /// Asks the event loop for a system reset (QMP `system_reset`); with `--no-reboot` the machine ends
    /// instead, as in QEMU. The [`crate::lifecycle::LifecycleHook`] is told first.
    pub fn request_reset(&self) {
        self.shared.send(VmEvent::HostReset);
    }

    /// Ends the machine with [`Outcome::Exit`]`(status)` (`-action panic=exit-failure`).
    pub fn request_exit(&self, status: i32) {
        self.shared.send(VmEvent::Io(IoAction::Exit(status)));
    }

    /// Reports a guest panic (the Hyper-V crash path: `params` = CRASH_P0..P4). The life-cycle hook applies
    /// `action`; without one, `Pause` holds the vCPUs for good, `Shutdown` stops the machine and
    /// `ExitFailure` ends it with status 1. Call it with no machine lock held; safe on a vCPU thread.
    pub fn guest_panicked(&self, params: Option<[u64; 5]>, action: crate::lifecycle::PanicAction) {
        use crate::lifecycle::PanicAction;
        if let Some(hook) = self.shared.lifecycle_hook.get() {
            hook.guest_panicked(params, action);
            return;
        }
        match action {
            PanicAction::None => {}
            PanicAction::Pause => std::mem::forget(self.hold_all()),
            PanicAction::Shutdown => self.stop(),
            PanicAction::ExitFailure => {
                std::mem::forget(self.hold_all());
                self.request_exit(1);
            }
        }
    }

    /// Installs the life-cycle hook. Fails if one is already installed.
    pub fn set_lifecycle_hook(
        &self,
        hook: Arc<dyn crate::lifecycle::LifecycleHook>,
    ) -> Result<(), VmError> {
        self.shared
            .lifecycle_hook
            .set(hook)
            .map_err(|_| VmError::Config("a life-cycle hook is already installed".into()))
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.shared.mem
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.shared.vcpus.len()
    }

    /// Sets a fixed interrupt `vector` pending in vCPU `i`'s APIC (as an external source such as a SynIC
    /// SINT would) and wakes the vCPU. Returns whether the APIC accepted it.
    pub fn deliver_fixed(&self, i: usize, vector: u8, level_triggered: bool) -> bool {
        let Some(v) = self.shared.vcpus.get(i) else {
            return false;
        };
        let accepted = v.lock().apic.accept_fixed(vector, level_triggered);
        if accepted {
            v.wake_up();
        }
        accepted
    }

    /// Latches an NMI for vCPU `i` and wakes it.
    pub fn raise_nmi(&self, i: usize) {
        if let Some(v) = self.shared.vcpus.get(i) {
            v.lock().apic.raise_nmi();
            v.wake_up();
        }
    }

    /// Runs `f` on vCPU `i`'s APIC with its state locked, then re-arms its timer and wakes it (so changes to
    /// the IRR, timer or auto-EOI set take effect). `None` if there is no such vCPU.
    pub fn with_apic<R>(&self, i: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        let v = self.shared.vcpus.get(i)?;
        let r = {
            let mut st = v.lock();
            let r = f(&mut st.apic);
            let next = st.apic.next_timer_deadline_ns();
            self.shared.timers.set(i, next);
            r
        };
        v.wake_up();
        Some(r)
    }

    /// Nanoseconds on the machine's reference clock (the clock the APIC timers run on).
    pub fn now_ns(&self) -> u64 {
        self.shared.clock.now_ns()
    }

    /// The TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.shared.clock.tsc_khz()
    }

    /// vCPU `i`'s current guest TSC.
    pub fn guest_tsc(&self, i: usize) -> Option<u64> {
        let v = self.shared.vcpus.get(i)?;
        let st = v.lock();
        Some(self.shared.guest_tsc(&st))
    }

    /// Wakes vCPU `i` wherever it is (in `KVM_RUN`, halted, waiting), so that it re-checks its queued work
    /// ([`VcpuHook::has_work`]) and pending interrupts. Safe from any thread, including vCPU `i`'s own.
    pub fn kick(&self, i: usize) {
        if let Some(v) = self.shared.vcpus.get(i) {
            // Taking the state lock orders the kick after any check made under it: no lost wake-up.
            let _st = v.lock();
            v.wake_up();
        }
    }

    /// Asks the machine's main thread to perform `action` (power off, exit with a status, reset) as if a
    /// device had requested it. Safe from any thread.
    pub fn request(&self, action: IoAction) {
        if action != IoAction::None {
            self.shared.send(VmEvent::Io(action));
        }
    }

    /// Number of KVM exits vCPU `i` has handled so far.
    pub fn exit_count(&self, i: usize) -> Option<u64> {
        self.shared.vcpus.get(i).map(|v| v.lock().exits)
    }

    /// Whether vCPU `i` is parked right now.
    pub fn is_parked(&self, i: usize) -> bool {
        self.shared.vcpus.get(i).is_some_and(|v| v.lock().parked)
    }
}

/// Registers RAM region `slot` of `layout` as KVM memory slot `slot` with `flags` (0, or
/// `KVM_MEM_LOG_DIRTY_PAGES` while a live migration runs). Registering a slot again with the same addresses
/// only changes its flags.
fn register_ram_slot(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    slot: usize,
    flags: u32,
) -> Result<(), String> {
    let r = layout
        .regions
        .get(slot)
        .ok_or_else(|| format!("no RAM region {slot}"))?;
    let host = mem
        .get_host_address(GuestAddress(r.start))
        .map_err(|e| e.to_string())?;
    let region = kvm_userspace_memory_region {
        slot: slot as u32,
        flags,
        guest_phys_addr: r.start,
        memory_size: r.size,
        userspace_addr: host as u64,
    };
    // SAFETY: the host range [host, host + size) is the live mapping `mem` owns for this region (its host address
    // for the region's start and the region's size), and `mem` lives in the shared VM state for as long as the
    // VM fd does.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION (slot {slot}, flags {flags:#x}): {e}"))
}

impl VmShared {
    /// Turns KVM's dirty-page logging on or off for every RAM slot (live migration). Turning it on starts
    /// with an empty log.
    pub(crate) fn set_dirty_logging(&self, on: bool) -> Result<(), String> {
        let flags = if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for slot in 0..self.layout.regions.len() {
            register_ram_slot(&self._vm, &self.mem, &self.layout, slot, flags)?;
        }
        Ok(())
    }

    /// Takes KVM's dirty log of RAM region `slot` (one bit per 4 KiB page of the region, bit `i` of word `w`
    /// = page `64 * w + i`) and clears it; the guest's later writes show in the next call. Needs dirty logging
    /// on ([`VmShared::set_dirty_logging`]). Guest RAM written by the VMM is not in it.
    pub(crate) fn take_dirty_log(&self, slot: usize) -> Result<Vec<u64>, String> {
        let r = self
            .layout
            .regions
            .get(slot)
            .ok_or_else(|| format!("no RAM region {slot}"))?;
        let size = usize::try_from(r.size).map_err(|e| e.to_string())?;
        self._vm
            .get_dirty_log(slot as u32, size)
            .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))
    }

    /// Counts guest RAM resets, twice each (a reset rewrites all of RAM behind KVM's dirty log): odd while one
    /// is rewriting RAM.
    pub(crate) fn ram_epoch(&self) -> u64 {
        self.ram_epoch.load(Ordering::SeqCst)
    }
}

/// A KVM virtual machine with its vCPU threads.
pub struct Machine {
    shared: Arc<VmShared>,
    events: Receiver<VmEvent>,
    threads: Vec<JoinHandle<()>>,
    loader: Arc<dyn BootLoader>,
    no_reboot: bool,
    _kvm: Kvm,
}

/// Initial register state of a vCPU, restored on INIT and reset.
#[derive(Clone)]
pub(crate) struct InitialState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
}

fn enable_msr_exits(vm: &VmFd) -> Result<(), VmError> {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        ..Default::default()
    };
    cap.args[0] = u64::from(
        kvm_bindings::KVM_MSR_EXIT_REASON_INVAL
            | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN
            | kvm_bindings::KVM_MSR_EXIT_REASON_FILTER,
    );
    vm.enable_cap(&cap)
        .map_err(setup("KVM_CAP_X86_USER_SPACE_MSR"))?;
    // Force exits for the MSRs the VMM owns. A 0 bit denies, which exits with reason FILTER.
    let deny = [0u8; 1];
    let msrs = [
        crate::vcpu::MSR_IA32_TSC,
        crate::apic::MSR_APIC_BASE,
        crate::vcpu::MSR_IA32_TSC_ADJUST,
        crate::apic::MSR_TSC_DEADLINE,
    ];
    let ranges: Vec<kvm_ioctls::MsrFilterRange<'_>> = msrs
        .iter()
        .map(|&base| kvm_ioctls::MsrFilterRange {
            flags: kvm_ioctls::MsrFilterRangeFlags::READ | kvm_ioctls::MsrFilterRangeFlags::WRITE,
            base,
            msr_count: 1,
            bitmap: &deny,
        })
        .collect();
    vm.set_msr_filter(kvm_ioctls::MsrFilterDefaultAction::ALLOW, &ranges)
        .map_err(setup("KVM_X86_SET_MSR_FILTER"))
}

impl Machine {
    /// Creates the VM: RAM, vCPUs with their CPUID, APICs and TSCs, loads the kernel and prepares the BSP.
    /// The vCPU threads start in [`Machine::run`].
    pub fn new(
        cfg: VmConfig,
        loader: Arc<dyn BootLoader>,
        devices: Arc<dyn IoDevices>,
    ) -> Result<(Machine, Vec<VcpuFd>), VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
            return Err(VmError::Config(format!(
                "the vCPU count must be between 1 and {MAX_VCPUS}, not {}",
                cfg.vcpus
            )));
        }
        let kvm = crate::host::open_kvm().map_err(|e| VmError::Kvm(e.to_string()))?;
        let kvm_max = kvm.get_max_vcpus();
        if cfg.vcpus as usize > kvm_max {
            return Err(VmError::Config(format!(
                "{} vCPUs requested, but this host's KVM allows at most {kvm_max}",
                cfg.vcpus
            )));
        }
        for (cap, name) in [
            (
                kvm_ioctls::Cap::X86UserSpaceMsr,
                "KVM_CAP_X86_USER_SPACE_MSR",
            ),
            (kvm_ioctls::Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
            (kvm_ioctls::Cap::SyncRegs, "KVM_CAP_SYNC_REGS"),
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        kick::install_kick_handler().map_err(|e| VmError::Setup {
            what: "signal handler",
            err: e,
        })?;
        let vm = kvm.create_vm().map_err(setup("KVM_CREATE_VM"))?;
        enable_msr_exits(&vm)?;

        // RAM.
        let layout = MemoryLayout::new(cfg.ram_size);
        let ranges: Vec<(GuestAddress, usize)> = layout
            .regions
            .iter()
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect();
        let mem =
            GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmError::Memory(format!("{e:?}")))?;
        for slot in 0..layout.regions.len() {
            register_ram_slot(&vm, &mem, &layout, slot, 0).map_err(VmError::Memory)?;
        }

        // CPUID.
        // A table from the CPUID builder is final (its x2APIC bit decides whether the APIC allows x2APIC
        // mode); without one, KVM's supported CPUID is adjusted for the userspace APIC.
        let (mut table, x2apic) = match cfg.cpuid.clone() {
            Some(t) => {
                let x2apic = t
                    .iter()
                    .any(|e| e.function == 1 && e.ecx & cpu::CPUID_1_ECX_X2APIC != 0);
                (t, x2apic)
            }
            None => {
                let mut t =
                    crate::host::supported_cpuid(&kvm).map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
                cpu::adjust_for_userspace_apic(&mut t, cfg.x2apic);
                (t, cfg.x2apic)
            }
        };
        if cfg.vcpus > MAX_XAPIC_VCPUS && !x2apic {
            return Err(VmError::Config(format!(
                "{} vCPUs need x2APIC (APIC ID 255 is the xAPIC broadcast ID): use a -cpu with x2apic \
                 (e.g. add +x2apic) or at most {MAX_XAPIC_VCPUS} vCPUs",
                cfg.vcpus
            )));
        }
        cpu::ensure_topology_leaves(&mut table);
        let phys_bits = table
            .iter()
            .find(|e| e.function == 0x8000_0008)
            .map_or(36, |e| (e.eax & 0xFF) as u8);

        // vCPUs.
        let mut fds = Vec::new();
        for i in 0..cfg.vcpus {
            let mut fd = vm
                .create_vcpu(u64::from(i))
                .map_err(setup("KVM_CREATE_VCPU"))?;
            let entries = hyperv::cpuid::for_vcpu(&table, i, cfg.vcpus);
            let kvm_cpuid = cpu::to_kvm(&entries).map_err(|e| VmError::Setup {
                what: "CPUID",
                err: e,
            })?;
            fd.set_cpuid2(&kvm_cpuid).map_err(setup("KVM_SET_CPUID2"))?;
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
            fds.push(fd);
        }
        let tsc_khz = fds[0].get_tsc_khz().map_err(setup("KVM_GET_TSC_KHZ"))?;

        // Identical TSCs: one explicit offset for every vCPU (plus a spare one for the probe), then measure
        // what the guest really reads: some KVMs ignore the offset. At KVM's vCPU limit there is no room for a
        // spare, so the last vCPU (an AP, which starts from a SIPI) runs the probe and gets its state back.
        let mut spare_fd = if (cfg.vcpus as usize) < kvm_max {
            Some(
                vm.create_vcpu(u64::from(cfg.vcpus))
                    .map_err(setup("KVM_CREATE_VCPU (TSC probe)"))?,
            )
        } else {
            None
        };
        let offset = 0u64.wrapping_sub(host_tsc());
        let offset_attr_ok = fds
            .iter()
            .chain(spare_fd.iter())
            .all(|fd| vcpu::set_tsc_offset(fd, offset).is_ok());
        if !offset_attr_ok {
            vcpu::sync_tsc_with_msrs(&fds).map_err(|e| VmError::Setup {
                what: "TSC synchronisation",
                err: e,
            })?;
        }
        let probe_err = |e| VmError::Setup {
            what: "TSC probe",
            err: e,
        };
        let tsc_offset = match spare_fd.as_mut() {
            Some(fd) => vcpu::probe_tsc_offset(fd, &mem, &[offset, 0]).map_err(probe_err)?,
            None => {
                let fd = fds
                    .last_mut()
                    .ok_or_else(|| VmError::Config("no vCPUs".to_string()))?;
                let regs = fd.get_regs().map_err(setup("KVM_GET_REGS"))?;
                let sregs = fd.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
                let probed = vcpu::probe_tsc_offset(fd, &mem, &[offset, 0]).map_err(probe_err)?;
                fd.set_sregs(&sregs).map_err(setup("KVM_SET_SREGS"))?;
                fd.set_regs(&regs).map_err(setup("KVM_SET_REGS"))?;
                probed
            }
        };
        drop(spare_fd);
        // Guest TSC writes can be honoured only when the offset really applies (within 1 ms of slack).
        let tsc_offset_attr = offset_attr_ok
            && (tsc_offset.wrapping_sub(offset) as i64).unsigned_abs() < u64::from(tsc_khz);
        tracing::debug!(tsc_offset, tsc_offset_attr, "TSC");

        let apic_cfg = ApicConfig {
            bus_freq_hz: cfg.apic_bus_hz.max(1),
            tsc_freq_hz: u64::from(tsc_khz) * 1000,
            x2apic_allowed: x2apic,
            bsp: false,
            phys_addr_bits: phys_bits,
        };
        let vcpus = (0..cfg.vcpus)
            .map(|i| VcpuShared {
                state: Mutex::new(VcpuState {
                    apic: LocalApic::new(
                        i,
                        ApicConfig {
                            bsp: i == 0,
                            ..apic_cfg
                        },
                    ),
                    run: if i == 0 {
                        RunState::Runnable
                    } else {
                        RunState::WaitForSipi
                    },
                    nmi: false,
                    pause: 0,
                    parked: false,
                    exited: false,
                    requests: Vec::new(),
                    tsc_offset,
                    tsc_adjust: 0,
                    exits: 0,
                    in_guest: false,
                    exit_waiters: false,
                }),
                wake: Condvar::new(),
                parked_cv: Condvar::new(),
                kicker: Kicker::default(),
                parked_op: Mutex::new(None),
            })
            .collect();

        let (tx, rx) = channel();
        let shared = Arc::new(VmShared {
            _vm: vm,
            mem,
            layout,
            vcpus,
            clock: Clock::new(tsc_khz),
            timers: TimerQueue::new(cfg.vcpus as usize),
            events: Mutex::new(tx),
            stop: AtomicBool::new(false),
            devices,
            msr_hook: once(cfg.msr_hook.clone()),
            port_hook: once(cfg.port_hook.clone()),
            eoi_hook: once(cfg.eoi_hook.clone()),
            vcpu_hook: OnceLock::new(),
            apic_cfg,
            tsc_offset_attr,
            rendezvous: Mutex::new(()),
            lifecycle_hook: OnceLock::new(),
            ram_epoch: AtomicU64::new(0),
            throttle: Default::default(),
        });

        // Load the kernel and set the BSP's entry state.
        let entry = loader
            .load(&shared.mem, &shared.layout)
            .map_err(VmError::Load)?;
        boot::write_boot_structures(&shared.mem, entry.mode).map_err(VmError::Load)?;
        vcpu::enter(&fds[0], &entry).map_err(setup("BSP entry state"))?;

        Ok((
            Machine {
                shared,
                events: rx,
                threads: Vec::new(),
                loader,
                no_reboot: cfg.no_reboot,
                _kvm: kvm,
            },
            fds,
        ))
    }

    /// Installs the MSR hook (before [`Machine::run`]; hooks often need a [`VmHandle`], which exists only
    /// after [`Machine::new`]). Fails if one is already installed.
    pub fn set_msr_hook(&self, hook: Arc<dyn MsrHook>) -> Result<(), VmError> {
        self.shared
            .msr_hook
            .set(hook)
            .map_err(|_| VmError::Config("an MSR hook is already installed".into()))
    }

    /// Installs the private port hook. Fails if one is already installed.
    pub fn set_port_hook(&self, hook: Arc<dyn PortHook>) -> Result<(), VmError> {
        self.shared
            .port_hook
            .set(hook)
            .map_err(|_| VmError::Config("a port hook is already installed".into()))
    }

    /// Installs the EOI hook. Fails if one is already installed.
    pub fn set_eoi_hook(&self, hook: Arc<dyn EoiHook>) -> Result<(), VmError> {
        self.shared
            .eoi_hook
            .set(hook)
            .map_err(|_| VmError::Config("an EOI hook is already installed".into()))
    }

    /// Installs the per-vCPU work hook. Fails if one is already installed.
    pub fn set_vcpu_hook(&self, hook: Arc<dyn VcpuHook>) -> Result<(), VmError> {
        self.shared
            .vcpu_hook
            .set(hook)
            .map_err(|_| VmError::Config("a vCPU hook is already installed".into()))
    }

    /// A handle for other threads (pause/resume, stop, memory).
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            shared: self.shared.clone(),
        }
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.shared.mem
    }

    /// The RAM layout.
    pub fn layout(&self) -> &MemoryLayout {
        &self.shared.layout
    }

    /// The TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.shared.clock.tsc_khz()
    }

    /// Starts the vCPU threads (with the fds [`Machine::new`] returned) and the timer thread, then handles VM
    /// events until the machine ends. Joins every thread before returning.
    ///
    /// With `ENLIGHTEN_STATS` set in the environment, prints `stats: run_ms=<wall ms> exits=<n0>,<n1>,...`
    /// (KVM exits handled per vCPU) on stderr when the machine ends; the benchmark suite (`bench/run`) uses it.
    pub fn run(mut self, fds: Vec<VcpuFd>) -> Outcome {
        let started = std::time::Instant::now();
        let mut inits = Vec::new();
        for fd in &fds {
            match (fd.get_regs(), fd.get_sregs(), fd.get_fpu()) {
                (Ok(regs), Ok(sregs), Ok(fpu)) => inits.push(InitialState { regs, sregs, fpu }),
                _ => return Outcome::Error("cannot read the initial vCPU state".to_string()),
            }
        }
        // The BSP's reset state is the real-mode one; its entry state was already set.
        if let Some(first) = inits.first_mut() {
            if let Some(ap) = fds.get(1).and_then(|fd| fd.get_sregs().ok()) {
                first.sregs = ap;
            } else {
                first.sregs.cs.selector = 0xF000;
                first.sregs.cs.base = 0xFFFF_0000;
                first.sregs.cr0 = 0x6000_0010;
                first.sregs.efer = 0;
                first.sregs.cr4 = 0;
                first.sregs.cr3 = 0;
                first.regs = kvm_regs {
                    rflags: 2,
                    rip: 0xFFF0,
                    ..Default::default()
                };
            }
        }
        for (i, (fd, init)) in fds.into_iter().zip(inits).enumerate() {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::thread_main(shared, i, fd, init));
            match spawned {
                Ok(h) => self.threads.push(h),
                Err(e) => {
                    self.shared.stop_all();
                    self.join();
                    return Outcome::Error(format!("cannot start a vCPU thread: {e}"));
                }
            }
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("apic-timer".into())
            .spawn(move || timer_thread(shared))
        {
            Ok(h) => self.threads.push(h),
            Err(e) => {
                self.shared.stop_all();
                self.join();
                return Outcome::Error(format!("cannot start the timer thread: {e}"));
            }
        }
        let outcome = self.event_loop();
        self.shared.stop_all();
        self.join();
        if std::env::var_os("ENLIGHTEN_STATS").is_some() {
            let exits: Vec<String> = self
                .shared
                .vcpus
                .iter()
                .map(|v| v.lock().exits.to_string())
                .collect();
            eprintln!(
                "stats: run_ms={} exits={}",
                started.elapsed().as_millis(),
                exits.join(",")
            );
        }
        outcome
    }

    fn join(&mut self) {
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }

    fn event_loop(&mut self) -> Outcome {
        // An event taken out of the channel while a deadlock report was being checked.
        let mut pending: Option<VmEvent> = None;
        loop {
            if self.shared.stopping() {
                return Outcome::Cancelled;
            }
            let ev = match pending.take() {
                Some(ev) => ev,
                None => match self.events.recv() {
                    Ok(ev) => ev,
                    Err(_) => return Outcome::Error("the VM event channel closed".to_string()),
                },
            };
            tracing::debug!(?ev, "vm event");
            match ev {
                VmEvent::Io(IoAction::None) => {}
                VmEvent::Io(IoAction::Exit(code)) => return Outcome::Exit(code),
                VmEvent::Io(IoAction::PowerOff) => {
                    if let Some(hook) = self.shared.lifecycle_hook.get() {
                        hook.power_off();
                    }
                    return Outcome::PowerOff;
                }
                VmEvent::HostReset | VmEvent::Io(IoAction::Reset) => {
                    let guest = !matches!(ev, VmEvent::HostReset);
                    if self.no_reboot {
                        self.notify_reset(guest, false);
                        return Outcome::Stopped;
                    }
                    if let Err(e) = self.reset() {
                        return Outcome::Error(e);
                    }
                    // As QEMU's qemu_system_reset(): the RESET event follows the reset.
                    self.notify_reset(guest, true);
                }
                VmEvent::TripleFault { vcpu, dump } => {
                    if self.no_reboot {
                        self.notify_reset(true, false);
                        eprintln!(
                            "warning: triple fault on vCPU {vcpu}; stopping (--no-reboot): {dump}"
                        );
                        return Outcome::Stopped;
                    }
                    eprintln!("warning: triple fault on vCPU {vcpu}; resetting the VM: {dump}");
                    if let Err(e) = self.reset() {
                        return Outcome::Error(e);
                    }
                    self.notify_reset(true, true);
                }
                VmEvent::Fatal(msg) => return Outcome::Error(msg),
                VmEvent::Cancel => return Outcome::Cancelled,
                VmEvent::Deadlock => {
                    // Re-check with everything quiet: a racing IPI may have woken someone.
                    let handle = self.handle();
                    let paused = handle.pause_all();
                    let stuck = self.shared.all_stuck_ignoring_pause();
                    drop(paused);
                    // Anything a vCPU sent before it went quiet (a debug-exit, a reset) comes first: the
                    // deadlock report may be stale (e.g. sent before a reset the loop has just done).
                    if let Ok(other) = self.events.try_recv() {
                        pending = Some(other);
                        continue;
                    }
                    if stuck {
                        return Outcome::Error(
                            "every vCPU is halted with interrupts disabled and nothing can wake it; the \
                             guest can never run again"
                                .to_string(),
                        );
                    }
                }
            }
        }
    }

    /// Tells the life-cycle hook about a reset (`reboot`) or about the end of the VM that `--no-reboot`
    /// makes of it.
    fn notify_reset(&self, guest: bool, reboot: bool) {
        if let Some(hook) = self.shared.lifecycle_hook.get() {
            hook.reset(guest, reboot);
        }
    }

    /// Resets the VM: pause all vCPUs, clear RAM, reload the kernel, reset devices and vCPUs, resume.
    fn reset(&mut self) -> Result<(), String> {
        let handle = self.handle();
        let paused = handle.pause_all();
        if self.shared.stopping() {
            return Ok(());
        }
        // Before the rewrite (odd: a migration pass that ends now must not trust its vCPU state or RAM) and
        // after it (a migration that sees the new epoch resends all of RAM).
        self.shared.ram_epoch.fetch_add(1, Ordering::SeqCst);
        let rewritten = clear_ram(&self.shared.mem, &self.shared.layout).and_then(|()| {
            let entry = self.loader.load(&self.shared.mem, &self.shared.layout)?;
            boot::write_boot_structures(&self.shared.mem, entry.mode)?;
            Ok(entry)
        });
        self.shared.ram_epoch.fetch_add(1, Ordering::SeqCst);
        let entry = rewritten?;
        self.shared.devices.reset();
        if let Some(h) = self.shared.vcpu_hook.get() {
            h.vm_reset();
        }
        for i in 0..self.shared.vcpus.len() {
            paused.post(
                i,
                VcpuRequest::Reset {
                    entry: (i == 0).then_some(entry),
                },
            );
        }
        drop(paused);
        Ok(())
    }
}

impl VmShared {
    fn all_stuck_ignoring_pause(&self) -> bool {
        self.vcpus.iter().all(|v| {
            let mut st = v.lock();
            let pause = std::mem::take(&mut st.pause);
            let stuck = st.is_stuck();
            st.pause = pause;
            stuck
        })
    }
}

/// Zeroes guest RAM (the kernel is reloaded after a reset).
fn clear_ram(mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Result<(), String> {
    // Fresh anonymous pages, also where a snapshot's memory file backed RAM (MADV_DONTNEED would bring the
    // file's pages back).
    crate::migration::snapshot::clear_ram(mem, layout)
}

fn timer_thread(shared: Arc<VmShared>) {
    timer::set_precise_timer_slack();
    while let Some(due) = shared.timers.wait_due(&shared.clock, || shared.stopping()) {
        for i in due {
            let v = &shared.vcpus[i];
            let wake = {
                let mut st = v.lock();
                let now = shared.clock.now_ns();
                let tsc = shared.guest_tsc(&st);
                let fx = st.apic.timer_tick(now, tsc);
                // Never re-arm in the past (a deadline the APIC could not advance would spin here).
                let next = st.apic.next_timer_deadline_ns().map(|d| d.max(now + 1_000));
                shared.timers.set(i, next);
                fx.reevaluate
            };
            if wake {
                v.wake_up();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apic::{reg, Destination, APIC_BASE_BSP, APIC_BASE_ENABLE, APIC_BASE_EXTD};

    /// `n` enabled APICs with IDs 0..n, software-enabled, in xAPIC (flat logical, LDR bit i) or x2APIC mode.
    fn apics(n: u32, x2apic: bool) -> Vec<Mutex<LocalApic>> {
        (0..n)
            .map(|i| {
                let mut a = LocalApic::new(
                    i,
                    ApicConfig {
                        bsp: i == 0,
                        ..ApicConfig::default()
                    },
                );
                let mut base = 0xFEE0_0000 | APIC_BASE_ENABLE;
                if i == 0 {
                    base |= APIC_BASE_BSP;
                }
                let _ = a.write_apic_base(base).unwrap();
                if x2apic {
                    let _ = a.write_apic_base(base | APIC_BASE_EXTD).unwrap();
                    let _ = a.msr_write(0x80F, 0x1FF, 0).unwrap();
                } else {
                    let _ = a.mmio_write(reg::SVR, &0x1FFu32.to_le_bytes(), 0);
                    let _ = a.mmio_write(reg::DFR, &0xFFFF_FFFFu32.to_le_bytes(), 0);
                    let ldr = (1u32 << i) << 24;
                    let _ = a.mmio_write(reg::LDR, &ldr.to_le_bytes(), 0);
                }
                Mutex::new(a)
            })
            .collect()
    }

    fn route(apics: &[Mutex<LocalApic>], ipi: &Ipi) -> Vec<usize> {
        let mut woken = Vec::new();
        route_ipi(
            apics.len(),
            ipi,
            &mut |i, f| f(&mut apics[i].lock().unwrap()),
            &mut |i| woken.push(i),
        );
        woken
    }

    fn ipi(mode: DeliveryMode, vector: u8, dest: Destination, source_id: u32) -> Ipi {
        Ipi {
            delivery_mode: mode,
            vector,
            level_triggered: false,
            dest,
            source_id,
        }
    }

    #[test]
    fn routes_to_the_matching_apics() {
        use DeliveryMode::*;
        use Destination::*;
        let cases: &[(bool, Ipi, &[usize])] = &[
            (false, ipi(Fixed, 0x40, Physical(2), 0), &[2]),
            (false, ipi(Fixed, 0x40, Physical(7), 0), &[]),
            (false, ipi(Fixed, 0x40, SelfOnly, 1), &[1]),
            (false, ipi(Fixed, 0x40, AllIncludingSelf, 1), &[0, 1, 2, 3]),
            (false, ipi(Fixed, 0x40, AllExcludingSelf, 1), &[0, 2, 3]),
            (false, ipi(Fixed, 0x40, Logical(0b1010), 0), &[1, 3]),
            (false, ipi(LowestPriority, 0x40, Logical(0b1100), 0), &[2]),
            (false, ipi(LowestPriority, 0x40, AllExcludingSelf, 0), &[1]),
            (false, ipi(Nmi, 0, Physical(3), 0), &[3]),
            (false, ipi(Init, 0, AllExcludingSelf, 0), &[1, 2, 3]),
            (false, ipi(StartUp, 8, AllExcludingSelf, 0), &[1, 2, 3]),
            (true, ipi(Fixed, 0x40, Physical(3), 0), &[3]),
            (true, ipi(Fixed, 0x40, AllExcludingSelf, 3), &[0, 1, 2]),
            // x2APIC logical: cluster 0, members 0 and 2 (LDR = cluster << 16 | 1 << (id & 15)).
            (true, ipi(Fixed, 0x40, Logical(0b101), 0), &[0, 2]),
            (true, ipi(LowestPriority, 0x40, Logical(0b1110), 0), &[1]),
        ];
        for (x2apic, ipi, expected) in cases {
            let apics = apics(4, *x2apic);
            let woken = route(&apics, ipi);
            assert_eq!(woken, expected.to_vec(), "{ipi:?} x2apic={x2apic}");
            for (i, a) in apics.iter().enumerate() {
                let mut a = a.lock().unwrap();
                let got = expected.contains(&i);
                match ipi.delivery_mode {
                    Fixed | LowestPriority => {
                        assert_eq!(a.is_requested(ipi.vector), got, "IRR of {i} for {ipi:?}")
                    }
                    Nmi => assert_eq!(a.take_nmi(), got),
                    Init => assert_eq!(a.take_init(), got),
                    StartUp => assert_eq!(a.take_sipi(), got.then_some(ipi.vector)),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn stuck_states() {
        let mk = |run| VcpuState {
            apic: LocalApic::new(1, ApicConfig::default()),
            run,
            nmi: false,
            pause: 0,
            parked: false,
            exited: false,
            requests: Vec::new(),
            tsc_offset: 0,
            tsc_adjust: 0,
            exits: 0,
            in_guest: false,
            exit_waiters: false,
        };
        let cases: &[(RunState, bool)] = &[
            (RunState::Runnable, false),
            (RunState::Halted { if_flag: true }, false),
            (RunState::Halted { if_flag: false }, true),
            (RunState::WaitForSipi, true),
            (RunState::Stopped, true),
        ];
        for &(run, stuck) in cases {
            assert_eq!(mk(run).is_stuck(), stuck, "{run:?}");
            let mut st = mk(run);
            st.apic.raise_nmi();
            let expect = stuck && !matches!(run, RunState::Halted { if_flag: false });
            assert_eq!(st.is_stuck(), expect, "{run:?} with an NMI latched");
            let mut st = mk(run);
            st.pause = 1;
            assert!(!st.is_stuck(), "{run:?} paused");
        }
    }
}

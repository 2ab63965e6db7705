//! The Hyper-V engine connected to the KVM machine: a [`hyperv::Platform`] over the machine, and the machine
//! hooks that forward synthetic-MSR accesses, hypercall-port exits, EOIs and per-vCPU work to the engine.
//!
//! # Data path
//!
//! ```text
//! guest rdmsr/wrmsr 0x4000_0000..=0x4000_01FF
//!   → KVM_EXIT_X86_RDMSR/WRMSR (reason UNKNOWN)            vcpu.rs run_once
//!   → MsrHook::rdmsr/wrmsr (HvMsrHook)                      on the vCPU thread, no machine lock held
//!   → Engine::read_msr/write_msr → Ok(value) | Err(Gp)      kvm_run.msr.error = 1 for #GP
//!
//! guest `call` into the hypercall page: `out 0xE4, al; ret`
//!   → KVM_EXIT_IO (port 0xE4, 1 byte)                       registers from KVM_CAP_SYNC_REGS (no ioctl)
//!   → PortHook::pio_write_full (HvPortHook)                  mode/CPL from the synced sregs
//!   → Engine::hypercall → Complete{rax, rdx} | InjectUd      RAX (and RDX, 32-bit) back through sync regs;
//!                                                            #UD with KVM_SET_VCPU_EVENTS (rare path)
//!   → Complete, 64-bit: retfold::fold_ret                    the page's `ret` too when certain (RIP = `[RSP]`,
//!                                                            RSP += 8), in the same sync-regs write
//!
//! APIC EOI of a vector (userspace APIC)       → EoiHook::eoi → Engine::apic_eoi
//! engine → Platform (VmmPlatform):
//!   read_gpa/write_gpa/atomics  → guest RAM through vm-memory / atomics on the host mapping; mark_dirty → set
//!   deliver_interrupt           → LocalApic::set_auto_eoi + accept_fixed, vCPU woken (VmHandle::with_apic)
//!   guest_tsc                   → host RDTSC + the vCPU's TSC offset (userspace, no ioctl)
//!   vp_runtime_ns               → CLOCK of the vCPU thread (pthread_getcpuclockid, found on that thread)
//!   arm_timer/cancel_timer      → the hv timer thread (deadlines in reference time); expiry queues
//!                                 `timer_expired` as work for that vCPU and kicks it
//!   run_on_vp/kick_vp           → per-vCPU work queue + VmHandle::kick; the vCPU runs it through
//!                                 VcpuHook::run_work on its own thread before it next enters the guest
//!   event(GuestPanicked)        → `warning: Guest crashed` (+ `warning: HV crash parameters: (...)` with
//!                                 hv-crash) on stderr, the optional PanicNotifier, then
//!                                 VmHandle::guest_panicked(params, -action panic=): the life-cycle hook
//!                                 (QMP GUEST_PANICKED) applies the action, or the machine does without one
//!   event(ResetRequested)       → IoAction::Reset to the machine's main thread (system reset, or stop with
//!                                 --no-reboot); the machine calls VcpuHook::vm_reset → Engine::reset
//! ```
//!
//! # Behaviour worth knowing (deliberate)
//!
//! - **Crash output.** QEMU logs `Guest crashed` and `HV crash parameters: (...)` only with `-d guest_errors`;
//!   enlighten always prints them on a guest panic, each line prefixed with `warning: ` so that harnesses that
//!   accept only warnings on stderr keep working. The parameters use QEMU's `%#lx` formatting.
//! - **#UD from the hypercall page** (real mode, CPL > 0, XMM input refused under hv-enforce-cpuid): KVM has
//!   already moved RIP past the `out` when the exit reaches the VMM, so the #UD is reported at the page's `ret`
//!   (offset 2) rather than at the hypercall instruction. Guests do not recover from this #UD anyway.
//! - **The page's `ret`** is performed by the VMM after a completed 64-bit CPL-0 hypercall when the processor's
//!   own `ret` is certain to do the same ([`retfold`]); otherwise, and always with RFLAGS.TF set, the guest
//!   executes it. A debug-register breakpoint on that `ret` is then not seen. `ENLIGHTEN_NO_RET_FOLD=1` turns it
//!   off.
//! - **XMM fast input** is read with one `KVM_GET_XSAVE`, only for the calls whose fast form takes XMM input.
//! - **Guest TSC** is computed in userspace from the host TSC and the offset the machine measured at start (this
//!   KVM ignores TSC offsets; the probe brackets the guest's RDTSC between host reads and prefers the exact
//!   candidate offset inside the bracket), so TIME_REF_COUNT and the TSC page agree to within the exit latency:
//!   page <= MSR <= page holds on every vCPU (guest test `hv_reftime`).
//! - **Reset.** Reference time keeps running across a guest reset (as KVM's clock does); the engine's Hyper-V
//!   state is cleared and the reference clock re-based at its current value.
//!
//! Platform methods never call back into the engine (the engine may hold its locks while it calls them); the
//! follow-up engine calls are made later from the vCPU's thread (work queue), from the timer thread, or from the
//! machine's reset path.

mod platform;
pub mod pveoi;
pub mod retfold;
mod timers;

use std::sync::Arc;

use hyperv::cpuid::CpuidEntry;
use hyperv::{CpuMode, Engine, EngineConfig, HvCpuid, HypercallOutcome, HypercallRegs, VpId};
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::apic::{Eoi, Gp};
use crate::machine::{EoiHook, Machine, MsrHook, PortHook, PortResult, VcpuHook, VmError};
use crate::{HV_MSR_FIRST, HV_MSR_LAST};

pub use platform::{GuestPanic, PanicNotifier, SintAckListener, VmmPlatform};

pub use crate::lifecycle::PanicAction;

/// How to build the engine for a machine.
#[derive(Clone)]
pub struct HvSetup {
    /// The CPUID table the guest gets (the engine gates MSRs and hypercalls on it).
    pub cpuid: Vec<CpuidEntry>,
    /// `hv-enforce-cpuid`.
    pub enforce_cpuid: bool,
    /// The APIC bus frequency (HV_X64_MSR_APIC_FREQUENCY).
    pub apic_frequency_hz: u64,
    /// `-action panic=`.
    pub panic_action: PanicAction,
}

/// Whether `cpuid` turns Hyper-V identification on (0x40000001.EAX = "Hv#1"): only then is the engine
/// installed.
pub fn hyperv_enabled(cpuid: &[CpuidEntry]) -> bool {
    HvCpuid::from_entries(cpuid).enabled()
}

/// The engine installed on a machine. Keep it for the machine's lifetime; call [`HvGlue::shutdown`] after
/// [`Machine::run`] returned.
pub struct HvGlue {
    engine: Arc<Engine<VmmPlatform>>,
}

impl HvGlue {
    /// Creates the engine for `machine` (after [`Machine::new`], before [`Machine::run`]) and installs the MSR,
    /// port, EOI and vCPU hooks. VP indexes are the vCPUs' APIC IDs.
    pub fn install(machine: &Machine, setup: HvSetup) -> Result<Arc<HvGlue>, VmError> {
        let handle = machine.handle();
        let n = handle.vcpu_count();
        let hv_cpuid = HvCpuid::from_entries(&setup.cpuid);
        let mut config = EngineConfig::new(hv_cpuid, setup.enforce_cpuid, n as u32);
        config.vp_indexes = (0..n)
            .map(|i| handle.with_apic(i, |a| a.initial_id()).unwrap_or(i as u32))
            .collect();
        config.apic_frequency_hz = setup.apic_frequency_hz;
        let crash_info = hv_cpuid.features_edx & hyperv::guest::edx3::CRASH_MSRS != 0;
        let platform = VmmPlatform::new(handle, setup.panic_action, crash_info);
        let timers = platform.timers();
        let engine =
            Arc::new(Engine::new(config, platform).map_err(|e| VmError::Config(e.to_string()))?);
        timers
            .start(Arc::downgrade(&engine))
            .map_err(|e| VmError::Setup {
                what: "Hyper-V timer thread",
                err: e.to_string(),
            })?;
        let glue = Arc::new(HvGlue { engine });
        machine.set_msr_hook(Arc::new(HvMsrHook(glue.engine.clone())))?;
        machine.set_port_hook(Arc::new(HvPortHook {
            engine: glue.engine.clone(),
            fold: retfold::FoldConfig::new(&setup.cpuid),
        }))?;
        machine.set_eoi_hook(Arc::new(HvEoiHook(glue.engine.clone())))?;
        machine.set_vcpu_hook(Arc::new(HvVcpuHook(glue.engine.clone())))?;
        Ok(glue)
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<VmmPlatform>> {
        &self.engine
    }

    /// Sets an observer told about every guest panic (vCPU, Hyper-V parameters, action) before the machine's
    /// life-cycle path applies `-action panic=`. Replaces a previous one.
    pub fn set_panic_notifier(&self, notifier: PanicNotifier) {
        self.engine.platform().set_panic_notifier(notifier);
    }

    /// Takes the set of guest pages the engine wrote since the last call (page frame numbers), for migration.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        self.engine.platform().take_dirty_pages()
    }

    /// Stops the timer thread and releases paused vCPUs. Call after [`Machine::run`] returned.
    pub fn shutdown(&self) {
        self.engine.platform().shutdown();
    }
}

/// The synthetic MSR range → the engine.
struct HvMsrHook(Arc<Engine<VmmPlatform>>);

impl MsrHook for HvMsrHook {
    fn rdmsr(&self, vcpu: usize, msr: u32) -> Option<Result<u64, Gp>> {
        if !(HV_MSR_FIRST..=HV_MSR_LAST).contains(&msr) {
            return None;
        }
        Some(self.0.read_msr(VpId(vcpu as u32), msr).map_err(|_| Gp))
    }

    fn wrmsr(&self, vcpu: usize, msr: u32, value: u64) -> Option<Result<(), Gp>> {
        if !(HV_MSR_FIRST..=HV_MSR_LAST).contains(&msr) {
            return None;
        }
        Some(
            self.0
                .write_msr(VpId(vcpu as u32), msr, value)
                .map_err(|_| Gp),
        )
    }
}

/// The processor mode and CPL for the hypercall calling convention, from the synced system registers.
pub fn cpu_mode(sregs: &kvm_sregs, rflags: u64) -> (CpuMode, u8) {
    const CR0_PE: u64 = 1;
    const EFER_LMA: u64 = 1 << 10;
    const RFLAGS_VM: u64 = 1 << 17;
    // KVM takes the CPL from SS.DPL.
    let cpl = sregs.ss.dpl & 3;
    let mode = if sregs.cr0 & CR0_PE == 0 || rflags & RFLAGS_VM != 0 {
        CpuMode::Real
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        CpuMode::Long64
    } else {
        CpuMode::Protected32
    };
    (mode, cpl)
}

/// The hypercall port (`out 0xE4, al` in the hypercall page) → the engine.
struct HvPortHook {
    engine: Arc<Engine<VmmPlatform>>,
    /// Whether and how the page's `ret` is folded into the exit ([`retfold`]).
    fold: retfold::FoldConfig,
}

impl PortHook for HvPortHook {
    fn handles(&self, port: u16) -> bool {
        port == u16::from(hyperv::hcpage::HYPERCALL_PORT)
    }

    fn pio_write(&self, _vcpu: usize, _port: u16, _data: &[u8], _regs: &mut kvm_regs) -> bool {
        // Only reached by a machine that does not call `pio_write_full`; a hypercall needs the mode.
        false
    }

    fn pio_write_full(
        &self,
        vcpu: usize,
        port: u16,
        data: &[u8],
        regs: &mut kvm_regs,
        sregs: &kvm_sregs,
        xmm: &mut dyn FnMut() -> Option<[u128; 6]>,
    ) -> PortResult {
        if !hyperv::hcpage::is_hypercall_port_exit(port, data.len(), true) {
            // A wider access to the private port: ignored like any unassigned port write.
            return PortResult::Unchanged;
        }
        let (mode, cpl) = cpu_mode(sregs, regs.rflags);
        let mut hregs = HypercallRegs {
            mode,
            cpl,
            rax: regs.rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsi: regs.rsi,
            rdi: regs.rdi,
            r8: regs.r8,
            xmm: None,
        };
        // XMM fast input: one KVM_GET_XSAVE, only for the calls that use it.
        if self.engine.hypercall_needs_xmm(&hregs) {
            hregs.xmm = xmm();
        }
        match self.engine.hypercall(VpId(vcpu as u32), &hregs) {
            HypercallOutcome::Complete(w) => {
                regs.rax = w.rax;
                if let Some(rdx) = w.rdx {
                    regs.rdx = rdx;
                }
                // The page's `ret` too, when that is certain to do what the guest's `ret` would (64-bit CPL 0
                // only; the 32-bit convention and every doubtful case leave it to the guest).
                if mode == CpuMode::Long64 {
                    let mem = self.engine.platform().handle().memory();
                    if let Err(why) = retfold::fold_ret(mem, self.fold, regs, sregs) {
                        tracing::trace!(vcpu, ?why, "hypercall: the guest executes the page's ret");
                    }
                }
                PortResult::RegsChanged
            }
            HypercallOutcome::InjectUd => PortResult::InjectUd,
        }
    }
}

/// EOIs of the userspace APIC → SynIC acknowledgement.
struct HvEoiHook(Arc<Engine<VmmPlatform>>);

impl EoiHook for HvEoiHook {
    fn eoi(&self, vcpu: usize, eoi: Eoi) {
        self.0.apic_eoi(VpId(vcpu as u32), eoi.vector);
    }
}

/// Per-vCPU work (timer expiries, deferred engine work) and the VM reset.
struct HvVcpuHook(Arc<Engine<VmmPlatform>>);

impl VcpuHook for HvVcpuHook {
    fn thread_started(&self, vcpu: usize) {
        self.0.platform().register_vcpu_thread(vcpu);
    }

    fn has_work(&self, vcpu: usize) -> bool {
        self.0.platform().has_work(vcpu)
    }

    fn run_work(&self, vcpu: usize) {
        for w in self.0.platform().take_work(vcpu) {
            match w {
                platform::Work::Timer(t) => self.0.timer_expired(VpId(vcpu as u32), t),
                platform::Work::Engine(work) => self.0.run_vp_work(VpId(vcpu as u32), work),
                platform::Work::SintAck(sints) => {
                    self.0.platform().notify_sint_ack(VpId(vcpu as u32), sints)
                }
            }
        }
    }

    fn claim_timers(&self, vcpu: usize, now_ns: u64) -> Option<u64> {
        let vp = VpId(vcpu as u32);
        let deadline = self.0.platform().timers().claim(vp)?;
        let now = self.0.reference_time(vp);
        // Reference time counts 100 ns units; round the host deadline up, so the vCPU never wakes early.
        Some(now_ns.saturating_add(deadline.saturating_sub(now).saturating_mul(100)))
    }

    fn release_timers(&self, vcpu: usize) {
        let vp = VpId(vcpu as u32);
        let p = self.0.platform();
        for t in p.timers().release(vp, || self.0.reference_time(vp)) {
            p.queue_timer(vp, t);
        }
    }

    fn sync_from_guest(&self, vcpu: usize, apic: &mut crate::apic::LocalApic) -> Option<Eoi> {
        let p = self.0.platform();
        p.pv_eoi()
            .sync_from_guest(vcpu, p.handle(), apic, &|gpa, len| {
                hyperv::Platform::mark_dirty(p, gpa, len)
            })
    }

    fn sync_to_guest(&self, vcpu: usize, apic: &crate::apic::LocalApic) {
        let p = self.0.platform();
        p.pv_eoi()
            .sync_to_guest(vcpu, p.handle(), apic, &|gpa, len| {
                hyperv::Platform::mark_dirty(p, gpa, len)
            });
    }

    fn vm_reset(&self) {
        // QEMU's system reset clears the Hyper-V state; the guest TSCs keep running here, and re-basing at the
        // current reference time keeps TIME_REF_COUNT continuous either way.
        let now = self.0.reference_time(VpId(0));
        self.0.platform().clear_work();
        self.0.reset();
        self.0.rebase_reference_time(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::machine::VmConfig;

    use crate::test_support::{NoDevices, NoKernel};

    fn entry(function: u32, eax: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx: 0,
            ecx: 0,
            edx: 0,
        }
    }

    /// The hooks of a real (never started) KVM machine with the engine installed: Hyper-V identified, HYPERCALL
    /// and VP_INDEX advertised.
    fn hooks() -> Option<(Machine, HvMsrHook, HvPortHook)> {
        let cfg = VmConfig {
            ram_size: 16 << 20,
            vcpus: 2,
            ..VmConfig::default()
        };
        let (m, _fds) = Machine::new(cfg, Arc::new(NoKernel), Arc::new(NoDevices)).ok()?;
        let cpuid = vec![
            entry(0x4000_0000, 0x4000_0005),
            entry(0x4000_0001, 0x3123_7648),
            entry(0x4000_0003, (1 << 5) | (1 << 6)),
        ];
        assert!(hyperv_enabled(&cpuid));
        let glue = HvGlue::install(
            &m,
            HvSetup {
                cpuid,
                enforce_cpuid: false,
                apic_frequency_hz: 1_000_000_000,
                panic_action: PanicAction::None,
            },
        )
        .ok()?;
        let msr = HvMsrHook(glue.engine().clone());
        let port = HvPortHook {
            engine: glue.engine().clone(),
            fold: retfold::FoldConfig {
                enabled: true,
                gib_pages: false,
            },
        };
        Some((m, msr, port))
    }

    fn long_mode(cpl: u8) -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        s.cs.l = 1;
        s.ss.dpl = cpl;
        s
    }

    #[test]
    fn msr_and_port_hooks_route_to_the_engine() {
        let Some((_m, msr, port)) = hooks() else {
            eprintln!("skipped: no usable /dev/kvm");
            return;
        };
        // Outside the synthetic range: not the engine's.
        assert_eq!(msr.rdmsr(0, 0x3FFF_FFFF), None);
        assert_eq!(msr.wrmsr(0, 0x4000_0200, 0), None);
        // VP_INDEX = APIC ID on each vCPU, read-only.
        assert_eq!(msr.rdmsr(1, 0x4000_0002), Some(Ok(1)));
        assert_eq!(msr.wrmsr(1, 0x4000_0002, 1), Some(Err(Gp)));
        assert_eq!(
            msr.wrmsr(0, 0x4000_0000, 0x8100_0000_0000_0000),
            Some(Ok(()))
        );
        assert!(!port.handles(0xE5) && port.handles(0xE4));
        let mut no_xmm = || None;
        /// (sregs, RFLAGS, port, access width, control word, result, RAX afterwards if written)
        type Case = (kvm_sregs, u64, u16, usize, u64, PortResult, Option<u64>);
        let cases: &[Case] = &[
            (
                long_mode(0),
                2,
                0xE4,
                1,
                0x7FFF,
                PortResult::RegsChanged,
                Some(2),
            ),
            (
                long_mode(0),
                2,
                0xE4,
                1,
                0x7FFF | (1 << 31),
                PortResult::RegsChanged,
                Some(3),
            ),
            (
                long_mode(0),
                2,
                0xE4,
                1,
                0x0008,
                PortResult::RegsChanged,
                Some(0),
            ),
            (long_mode(3), 2, 0xE4, 1, 0x7FFF, PortResult::InjectUd, None),
            (
                kvm_sregs::default(),
                2,
                0xE4,
                1,
                0x7FFF,
                PortResult::InjectUd,
                None,
            ),
            (
                long_mode(0),
                2,
                0xE4,
                2,
                0x7FFF,
                PortResult::Unchanged,
                None,
            ),
        ];
        for (i, &(sregs, rflags, p, width, control, want, rax)) in cases.iter().enumerate() {
            let mut regs = kvm_regs {
                rax: 0xAAAA,
                rcx: control,
                rflags,
                ..Default::default()
            };
            let before = regs;
            let got = port.pio_write_full(0, p, &vec![0u8; width], &mut regs, &sregs, &mut no_xmm);
            assert_eq!(got, want, "case {i}");
            assert_eq!(regs.rax, rax.unwrap_or(before.rax), "case {i}");
            assert_eq!(
                (regs.rcx, regs.rdx, regs.r8, regs.rbx, regs.rip, regs.rsp),
                (before.rcx, before.rdx, before.r8, before.rbx, before.rip, before.rsp),
                "case {i}: only RAX changes (no page tables in this RAM: the page's ret is not folded)"
            );
        }
    }

    #[test]
    fn modes_from_sregs() {
        let mut long = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        long.cs.l = 1;
        let mut user = long;
        user.ss.dpl = 3;
        let mut compat = long;
        compat.cs.l = 0;
        let prot = kvm_sregs {
            cr0: 0x11,
            ..Default::default()
        };
        let real = kvm_sregs::default();
        let cases = [
            (long, 2u64, CpuMode::Long64, 0u8),
            (user, 2, CpuMode::Long64, 3),
            (compat, 2, CpuMode::Protected32, 0),
            (prot, 2, CpuMode::Protected32, 0),
            (prot, 2 | (1 << 17), CpuMode::Real, 0),
            (real, 2, CpuMode::Real, 0),
        ];
        for (i, (s, flags, mode, cpl)) in cases.into_iter().enumerate() {
            assert_eq!(cpu_mode(&s, flags), (mode, cpl), "case {i}");
        }
    }
}

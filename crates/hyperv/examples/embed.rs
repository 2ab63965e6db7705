//! How another VMM drives the enlighten engine through the platform trait.
//!
//! This "VMM" has no KVM: guest memory is a `Vec<u8>`, the guest TSC is derived from `std::time::Instant`, and the
//! "guest" is a scripted sequence of the exits a real vCPU would produce (MSR exits, the hypercall page's port
//! exit). A real VMM makes exactly the same engine calls from its vCPU run loop.
//!
//! Run it with `cargo run -p hyperv --example embed`.

use hyperv::crash::{format_crash_params, GUEST_CRASHED};
use hyperv::hcpage::{is_hypercall_port_exit, HYPERCALL_PAGE_CODE, HYPERCALL_PORT};
use hyperv::{
    CpuMode, Engine, EngineConfig, Event, HvCpuid, HypercallOutcome, HypercallRegs, MemError,
    Platform, TimerId, VpId, VpWork,
};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tlfs::msr;

/// The embedding VMM's side of the contract.
struct ToyPlatform {
    ram: Mutex<Vec<u8>>,
    start: Instant,
    tsc_hz: u64,
    /// Events the vCPU loop acts on after the engine call returns (the platform must not re-enter the engine).
    events: Mutex<Vec<Event>>,
    /// Work the engine queued per VP; a real VMM runs it on the VP's thread before the next KVM_RUN.
    work: Mutex<Vec<(VpId, VpWork)>>,
}

impl ToyPlatform {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, MemError> {
        let size = self.ram.lock().map(|r| r.len()).unwrap_or(0) as u64;
        let err = MemError::NotRam {
            gpa,
            len: len as u64,
        };
        let end = gpa.checked_add(len as u64).ok_or(err)?;
        if end > size {
            return Err(err);
        }
        Ok(gpa as usize..end as usize)
    }

    fn atomic(&self, gpa: u64, f: impl FnOnce(u64) -> u64) -> Result<u64, MemError> {
        if gpa & 7 != 0 {
            return Err(MemError::Misaligned { gpa });
        }
        let r = self.range(gpa, 8)?;
        let mut ram = self
            .ram
            .lock()
            .map_err(|_| MemError::NotRam { gpa, len: 8 })?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&ram[r.clone()]);
        let old = u64::from_le_bytes(b);
        ram[r].copy_from_slice(&f(old).to_le_bytes());
        Ok(old)
    }
}

impl Platform for ToyPlatform {
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let r = self.range(gpa, buf.len())?;
        let ram = self.ram.lock().map_err(|_| MemError::NotRam {
            gpa,
            len: buf.len() as u64,
        })?;
        buf.copy_from_slice(&ram[r]);
        Ok(())
    }
    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let r = self.range(gpa, data.len())?;
        let mut ram = self.ram.lock().map_err(|_| MemError::NotRam {
            gpa,
            len: data.len() as u64,
        })?;
        ram[r].copy_from_slice(data);
        Ok(())
    }
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        self.atomic(gpa, |old| old | bits)
    }
    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError> {
        self.atomic(gpa, |old| if old == current { new } else { old })
    }
    fn mark_dirty(&self, gpa: u64, len: u64) {
        // A real VMM sets the bits in its own dirty bitmap (KVM's dirty log does not see these writes).
        println!("  dirty: {gpa:#x}+{len}");
    }
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.range(gpa, len as usize).is_ok()
    }
    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool) {
        println!("  interrupt {vector:#x} to {vp:?} (auto-EOI {auto_eoi})");
    }
    fn guest_tsc(&self, _vp: VpId) -> u64 {
        // A real VMM: rdtsc scaled by the vCPU's TSC ratio plus its TSC offset, no ioctl.
        let ns = self.start.elapsed().as_nanos();
        (ns * u128::from(self.tsc_hz) / 1_000_000_000) as u64
    }
    fn tsc_frequency_hz(&self) -> u64 {
        self.tsc_hz
    }
    fn vp_runtime_ns(&self, _vp: VpId) -> u64 {
        // A real VMM: clock_gettime(CLOCK_THREAD_CPUTIME_ID) of the vCPU thread.
        self.start.elapsed().as_nanos() as u64
    }
    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64) {
        println!("  arm {timer:?} of {vp:?} at reference time {deadline}");
    }
    fn cancel_timer(&self, vp: VpId, timer: TimerId) {
        println!("  cancel {timer:?} of {vp:?}");
    }
    fn run_on_vp(&self, vp: VpId, work: VpWork) {
        if let Ok(mut w) = self.work.lock() {
            w.push((vp, work));
        }
    }
    fn kick_vp(&self, _vp: VpId) {}
    fn yield_vp(&self, _vp: VpId) {
        std::thread::yield_now();
    }
    fn flush_remote_tlb(&self, _caller: VpId, _targets: &[VpId]) {}
    fn event(&self, event: Event) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event);
        }
    }
}

/// What the vCPU loop does on an MSR exit in the 0x4000_0000 range.
fn on_msr_write(engine: &Engine<ToyPlatform>, vp: VpId, index: u32, value: u64) {
    match engine.write_msr(vp, index, value) {
        Ok(()) => println!("wrmsr {index:#x} <- {value:#x}"),
        Err(gp) => println!("wrmsr {index:#x} <- {value:#x}: inject {gp}"),
    }
    handle_events(engine);
}

fn on_msr_read(engine: &Engine<ToyPlatform>, vp: VpId, index: u32) -> Option<u64> {
    let r = engine.read_msr(vp, index);
    match r {
        Ok(v) => println!("rdmsr {index:#x} -> {v:#x}"),
        Err(gp) => println!("rdmsr {index:#x}: inject {gp}"),
    }
    r.ok()
}

/// What the vCPU loop does on an I/O exit: the hypercall page's `out` is recognised by port and size.
fn on_io_out(
    engine: &Engine<ToyPlatform>,
    vp: VpId,
    port: u16,
    size: usize,
    regs: &mut HypercallRegs,
) {
    if !is_hypercall_port_exit(port, size, true) {
        return; // some other device
    }
    // Read XMM0..5 (GET_XSAVE) only when the engine needs them.
    if engine.hypercall_needs_xmm(regs) {
        regs.xmm = Some([0; 6]);
    }
    match engine.hypercall(vp, regs) {
        HypercallOutcome::Complete(w) => {
            regs.rax = w.rax;
            if let Some(rdx) = w.rdx {
                regs.rdx = rdx;
            }
            println!("hypercall control={:#x}: RAX <- {:#x}", regs.rcx, w.rax);
        }
        HypercallOutcome::InjectUd => println!("hypercall: inject #UD"),
    }
}

fn handle_events(engine: &Engine<ToyPlatform>) {
    let events: Vec<Event> = engine
        .platform()
        .events
        .lock()
        .map(|mut e| std::mem::take(&mut *e))
        .unwrap_or_default();
    for event in events {
        match event {
            Event::GuestPanicked { params, .. } => {
                println!("{GUEST_CRASHED}");
                println!("{}", format_crash_params(&params));
                // then apply -action panic=shutdown|pause|none|exit-failure
            }
            Event::ResetRequested { .. } => {
                // Reset every vCPU, keep reference time continuous, clear the Hyper-V state, reload the kernel.
                let t = engine.reference_time(VpId(0));
                engine.reset();
                engine.rebase_reference_time(t);
                println!("system reset");
            }
            other => println!("event {other:?}"),
        }
    }
}

fn main() {
    let platform = ToyPlatform {
        ram: Mutex::new(vec![0; 1 << 20]),
        start: Instant::now(),
        tsc_hz: 2_500_000_000,
        events: Mutex::new(Vec::new()),
        work: Mutex::new(Vec::new()),
    };
    // Normally from the CPUID entries the VMM installs: HvCpuid::from_entries(&entries).
    let config = EngineConfig::new(HvCpuid::ALL, false, 1);
    let engine = match Engine::new(config, platform) {
        Ok(e) => Arc::new(e),
        Err(err) => {
            eprintln!("engine: {err}");
            std::process::exit(1);
        }
    };
    let vp = VpId(0);

    // The guest identifies itself and enables the hypercall page at 0x10000.
    on_msr_write(&engine, vp, msr::GUEST_OS_ID, 0x8100 << 48);
    on_msr_write(&engine, vp, msr::HYPERCALL, 0x10000 | 1);
    let mut code = [0u8; 3];
    if engine.platform().read_gpa(0x10000, &mut code).is_ok() {
        println!("hypercall page: {code:02x?} (expected {HYPERCALL_PAGE_CODE:02x?})");
    }

    // The guest calls the page: HvCallNotifyLongSpinWait (fast), then an unknown code.
    for control in [0x0001_0008u64, 0xBEEF] {
        let mut regs = HypercallRegs {
            mode: CpuMode::Long64,
            rcx: control,
            ..HypercallRegs::default()
        };
        on_io_out(&engine, vp, u16::from(HYPERCALL_PORT), 1, &mut regs);
    }

    // Reference time: the TSC page and the MSR agree.
    on_msr_write(&engine, vp, msr::REFERENCE_TSC, 0x11000 | 1);
    let mut page = [0u8; 24];
    if engine.platform().read_gpa(0x11000, &mut page).is_ok() {
        let seq = u32::from_le_bytes([page[0], page[1], page[2], page[3]]);
        let scale = u64::from_le_bytes(page[8..16].try_into().unwrap_or_default());
        let offset = i64::from_le_bytes(page[16..24].try_into().unwrap_or_default());
        println!("TSC page: sequence {seq}, scale {scale:#x}, offset {offset}");
    }
    let _ = on_msr_read(&engine, vp, msr::TIME_REF_COUNT);

    // A crash report, then a reset request.
    on_msr_write(&engine, vp, msr::CRASH_P0, 0x1e);
    on_msr_write(&engine, vp, msr::CRASH_CTL, msr::CRASH_CTL_NOTIFY);
    on_msr_write(&engine, vp, msr::RESET, 1);
    let _ = on_msr_read(&engine, vp, msr::GUEST_OS_ID);

    // Snapshot the engine state (the VMM chooses the encoding).
    match serde_json::to_string(&engine.save()) {
        Ok(json) => println!("saved engine state: {} bytes of JSON", json.len()),
        Err(err) => eprintln!("save: {err}"),
    }
    let pending = engine.platform().work.lock().map(|w| w.len()).unwrap_or(0);
    println!("pending VP work items: {pending}");
}

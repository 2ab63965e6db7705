//! Capturing a machine into a stream and restoring it into a freshly created machine with the same
//! configuration. Both run with every vCPU stopped through the rendezvous ([`crate::VmHandle::pause_all`],
//! which completes pending I/O/MMIO/MSR exits): the KVM-owned state is read and written on each vCPU's own
//! thread ([`Paused::run_on_vcpu`]), the VMM-owned state (userspace APIC, run state, TSC_ADJUST) under the
//! vCPU's state lock.

use std::io::{Read, Write};

use hyperv::state::EngineState;
use hyperv::VpId;
use kvm_bindings::{
    kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::format::{
    ConfigSection, Section, SectionKind, StreamError, StreamReader, StreamWriter, PAGE_SIZE,
};
use crate::apic::ApicState;
use crate::hv::HvGlue;
use crate::machine::{Paused, RunState, VmShared};

mod live;
pub(crate) use live::no_reset_overlap;
pub use live::{
    save_live, throttle_down, ConvergeTrigger, LiveControl, LiveEvents, LiveStats, ThrottleParams,
    CONVERGE_PERIOD, DEFAULT_DOWNTIME_LIMIT_MS, DEFAULT_MAX_BANDWIDTH, MAX_SYNCS,
};

/// QEMU's load-time refusal (`cpu/msr_hyperv_reenlightenment` post_load) when the guest enabled
/// re-enlightenment notifications and the destination has no `tsc-frequency=`.
pub const REENLIGHTENMENT_NEEDS_TSC_FREQUENCY: &str =
    "Guest enabled re-enlightenment notifications, 'tsc-frequency=' has to be specified";

/// The MSRs KVM keeps for the guest that a snapshot carries (those KVM_GET_MSR_INDEX_LIST also reports).
/// The VMM-owned ones (IA32_TSC, TSC_ADJUST, APIC_BASE, TSC_DEADLINE, the x2APIC and Hyper-V ranges) travel
/// in the VMM and engine state instead.
pub const SAVED_MSRS: &[u32] = &[
    0x48,  // IA32_SPEC_CTRL
    0x174, // SYSENTER_CS
    0x175, // SYSENTER_ESP
    0x176, // SYSENTER_EIP
    0x1A0, // IA32_MISC_ENABLE
    0x200,
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207, // variable MTRRs 0..3
    0x208,
    0x209,
    0x20A,
    0x20B,
    0x20C,
    0x20D,
    0x20E,
    0x20F, // variable MTRRs 4..7
    0x250,
    0x258,
    0x259, // fixed MTRRs
    0x268,
    0x269,
    0x26A,
    0x26B,
    0x26C,
    0x26D,
    0x26E,
    0x26F,
    0x277,       // IA32_PAT
    0x2FF,       // MTRR default type
    0xDA0,       // IA32_XSS
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
    0xC000_0103, // TSC_AUX
];

/// The VMM's run state of a vCPU (there is no in-kernel irqchip, so this is the mp state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedRunState {
    Runnable,
    Halted { if_flag: bool },
    WaitForSipi,
    Stopped,
}

impl From<RunState> for SavedRunState {
    fn from(r: RunState) -> Self {
        match r {
            RunState::Runnable => SavedRunState::Runnable,
            RunState::Halted { if_flag } => SavedRunState::Halted { if_flag },
            RunState::WaitForSipi => SavedRunState::WaitForSipi,
            RunState::Stopped => SavedRunState::Stopped,
        }
    }
}

impl From<SavedRunState> for RunState {
    fn from(r: SavedRunState) -> Self {
        match r {
            SavedRunState::Runnable => RunState::Runnable,
            SavedRunState::Halted { if_flag } => RunState::Halted { if_flag },
            SavedRunState::WaitForSipi => RunState::WaitForSipi,
            SavedRunState::Stopped => RunState::Stopped,
        }
    }
}

/// The KVM-owned state of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    /// `(index, value)` of the [`SAVED_MSRS`] KVM reported.
    pub msrs: Vec<(u32, u64)>,
}

/// One vCPU's section.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSection {
    /// The vCPU index.
    pub index: u32,
    /// KVM's registers and MSRs.
    pub kvm: KvmVcpuState,
    /// The userspace local APIC (timer times relative to the save).
    pub apic: ApicState,
    /// The VMM's run state (mp state).
    pub run: SavedRunState,
    /// An NMI taken from the APIC and not yet injected.
    pub nmi: bool,
    /// The guest TSC at save time.
    pub tsc: u64,
    /// IA32_TSC_ADJUST.
    pub tsc_adjust: u64,
}

/// The engine's section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineSection {
    /// The engine's own state (versioned by the engine).
    pub state: EngineState,
    /// Partition reference time (100 ns) at save time, so the destination never steps back.
    pub reference_time: u64,
}

/// Why a save or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Vm(String),
    /// `migrate_cancel` (a live save stopped at a section boundary).
    #[error("migration cancelled")]
    Cancelled,
}

fn vm_err(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Vm(e.to_string())
}

/// What a save or restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of stream written or read.
    pub bytes: u64,
    /// Pages sent (non-zero).
    pub pages: u64,
    /// Zero pages elided.
    pub zero_pages: u64,
}

/// Progress: `(bytes of RAM done, bytes of RAM in total)`.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// The configuration section describing a machine.
pub fn config_section(
    ram_size: u64,
    vcpus: u32,
    cpuid: &[hyperv::cpuid::CpuidEntry],
    tsc_khz: u32,
    user_tsc_khz: Option<u32>,
) -> ConfigSection {
    ConfigSection {
        ram_size,
        vcpus,
        hyperv: crate::hv::hyperv_enabled(cpuid),
        cpuid_digest: super::format::cpuid_digest(cpuid),
        hv_features: super::format::hv_features(cpuid),
        tsc_khz,
        user_tsc_khz,
    }
}

fn capture_kvm(fd: &mut VcpuFd, msr_list: &[u32]) -> Result<KvmVcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
    let n = fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
    Ok(KvmVcpuState {
        regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        msrs: msrs.as_slice()[..n.min(msrs.as_slice().len())]
            .iter()
            .map(|m| (m.index, m.data))
            .collect(),
    })
}

fn apply_kvm(fd: &mut VcpuFd, s: &KvmVcpuState) -> Result<(), String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    // SAFETY: `s.xsave` is a complete `kvm_xsave` (4 KiB region) read by KVM_GET_XSAVE on a vCPU of the same
    // configuration; KVM_SET_XSAVE reads exactly that structure.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
    let n = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let bad = entries.get(n).map_or(0, |m| m.index);
        return Err(format!("KVM_SET_MSRS refused MSR {bad:#x}"));
    }
    // The interrupt-window state KVM reported at the last exit no longer describes this vCPU.
    let run = fd.get_kvm_run();
    run.ready_for_interrupt_injection = 0;
    run.if_flag = 0;
    run.request_interrupt_window = 0;
    Ok(())
}

/// The MSRs to save on this host: [`SAVED_MSRS`] ∩ KVM_GET_MSR_INDEX_LIST.
fn msr_list() -> Result<Vec<u32>, MigrationError> {
    let kvm = crate::host::open_kvm().map_err(vm_err)?;
    let host = kvm
        .get_msr_index_list()
        .map_err(|e| vm_err(format!("KVM_GET_MSR_INDEX_LIST: {e}")))?;
    let host = host.as_slice();
    Ok(SAVED_MSRS
        .iter()
        .copied()
        .filter(|m| host.contains(m))
        .collect())
}

/// Writes the machine's state sections (everything but guest RAM): Config, every vCPU, the devices and the
/// engine. Used by [`save`] and by the snapshot's state file ([`super::snapshot`]). `paused` must cover every
/// vCPU.
pub(crate) fn write_state<W: Write>(
    paused: &Paused,
    hv: Option<&HvGlue>,
    config: &ConfigSection,
    w: &mut StreamWriter<W>,
) -> Result<(), MigrationError> {
    w.json(SectionKind::Config, config)?;
    write_machine_state(paused, hv, w)
}

/// Writes the vCPU, device and engine sections of the paused machine ([`write_state`] without the Config; a
/// live migration writes them after guest RAM). `paused` must cover every vCPU.
pub(crate) fn write_machine_state<W: Write>(
    paused: &Paused,
    hv: Option<&HvGlue>,
    w: &mut StreamWriter<W>,
) -> Result<(), MigrationError> {
    let shared = paused.machine().clone();
    let n = shared.vcpus.len();
    if paused.vcpus().len() != n {
        return Err(vm_err("a snapshot needs every vCPU stopped"));
    }
    let list = msr_list()?;
    for i in 0..n {
        let l = list.clone();
        let kvm = paused
            .run_on_vcpu(i, move |fd| capture_kvm(fd, &l))
            .ok_or_else(|| vm_err(format!("vCPU {i} ended before its state was saved")))?
            .map_err(|e| vm_err(format!("cannot save vCPU {i}: {e}")))?;
        let st = shared.vcpus[i].lock();
        let section = VcpuSection {
            index: i as u32,
            kvm,
            apic: st.apic.save(shared.clock.now_ns()),
            run: st.run.into(),
            nmi: st.nmi,
            tsc: shared.guest_tsc(&st),
            tsc_adjust: st.tsc_adjust,
        };
        drop(st);
        w.json(SectionKind::Vcpu, &section)?;
    }
    for d in shared.devices.save_state() {
        w.json(SectionKind::Device, &d)?;
    }
    if let Some(hv) = hv {
        let engine = hv.engine();
        let section = EngineSection {
            state: engine.save(),
            reference_time: engine.reference_time(VpId(0)),
        };
        w.json(SectionKind::Engine, &section)?;
        // Every page is sent below; the engine's dirty set starts afresh.
        let _ = hv.take_dirty_pages();
    }
    Ok(())
}

/// Zeroes guest RAM (pages elided from the stream are zero).
fn zero_ram(shared: &crate::machine::VmShared) -> Result<(), MigrationError> {
    super::snapshot::clear_ram(&shared.mem, &shared.layout).map_err(vm_err)
}

/// Writes the pages of a Memory or ZeroPages section into guest RAM, checking every address.
fn load_pages(
    shared: &VmShared,
    section: &Section,
    stats: &mut Stats,
    done: &mut u64,
    progress: Progress<'_>,
) -> Result<(), MigrationError> {
    let in_ram = |gpa: u64| -> Result<(), MigrationError> {
        // Overflow-safe: a page at the top of the address space must not wrap around to pass the check.
        if shared.layout.contains(gpa, PAGE_SIZE as u64) {
            Ok(())
        } else {
            Err(StreamError::Corrupt(format!("page at {gpa:#x} is outside this VM's RAM")).into())
        }
    };
    let mut one = |gpa: u64, page: &[u8]| -> Result<(), MigrationError> {
        in_ram(gpa)?;
        shared
            .mem
            .write_slice(page, GuestAddress(gpa))
            .map_err(|e| vm_err(format!("cannot write guest RAM at {gpa:#x}: {e}")))?;
        *done += PAGE_SIZE as u64;
        if done.is_multiple_of(64 << 20) {
            progress(*done, shared.layout.ram_size);
        }
        Ok(())
    };
    if section.kind == SectionKind::ZeroPages {
        for gpa in section.zero_pages()? {
            one(gpa, &[0u8; PAGE_SIZE])?;
            stats.zero_pages += 1;
        }
    } else {
        for (gpa, page) in section.pages()? {
            one(gpa, page)?;
            stats.pages += 1;
        }
    }
    Ok(())
}

/// The source's run state at the stop (the GlobalState section of a live migration; QEMU's global state):
/// a destination without `-S` runs only if the source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalSection {
    /// Whether the source's guest was running when the migration stopped it.
    pub running: bool,
}

/// The machine-state sections of a stream, read by [`read_state_sections`].
#[derive(Debug)]
pub struct StateSections {
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuSection>,
    /// The Hyper-V engine's state (present iff the source ran the engine).
    pub engine: Option<EngineSection>,
    /// Device states, in stream order.
    pub devices: Vec<crate::devices::DeviceState>,
    /// The source's run state (live streams).
    pub global: Option<GlobalSection>,
    /// The first section after the state (memory, memory file or End), not yet interpreted.
    pub next: Section,
}

/// Reads and checks the vCPU, device, engine and global-state sections that follow the config (and, in a
/// live stream, the pre-copied pages), starting with `first`, up to the first memory, memory-file or End
/// section. Checks that every vCPU of `dest` has exactly one state, in order; that the engine's state is
/// present iff `dest_has_engine`; and QEMU's re-enlightenment rule. Pure: touches no machine, so the
/// migration-stream fuzz target drives it directly.
pub fn read_state_sections<R: Read>(
    r: &mut StreamReader<R>,
    first: Section,
    dest: &ConfigSection,
    dest_has_engine: bool,
) -> Result<StateSections, MigrationError> {
    let n = dest.vcpus as usize;
    let mut next = Some(first);
    let mut vcpus: Vec<VcpuSection> = Vec::with_capacity(n);
    let mut engine: Option<EngineSection> = None;
    let mut devices: Vec<crate::devices::DeviceState> = Vec::new();
    let mut global: Option<GlobalSection> = None;
    let next = loop {
        let s = match next.take() {
            Some(s) => s,
            None => r.expect_section()?,
        };
        match s.kind {
            SectionKind::Vcpu => {
                let v: VcpuSection = s.json()?;
                if v.index as usize != vcpus.len() || vcpus.len() >= n {
                    return Err(StreamError::Corrupt(format!(
                        "unexpected state for vCPU {} (expected vCPU {} of {n})",
                        v.index,
                        vcpus.len()
                    ))
                    .into());
                }
                vcpus.push(v);
            }
            SectionKind::Engine => {
                if engine.is_some() {
                    return Err(StreamError::Corrupt("two engine sections".to_string()).into());
                }
                engine = Some(s.json()?);
            }
            SectionKind::Device => devices.push(s.json()?),
            SectionKind::GlobalState => {
                if global.is_some() {
                    return Err(
                        StreamError::Corrupt("two global state sections".to_string()).into(),
                    );
                }
                global = Some(s.json()?);
            }
            SectionKind::Config => {
                return Err(StreamError::Corrupt("a second config section".to_string()).into())
            }
            SectionKind::Memory
            | SectionKind::ZeroPages
            | SectionKind::MemoryFile
            | SectionKind::End => break s,
        }
    };
    if vcpus.len() != n {
        return Err(StreamError::Corrupt(format!(
            "the stream has the state of {} vCPUs, its config says {n}",
            vcpus.len()
        ))
        .into());
    }
    match (&engine, dest_has_engine) {
        (Some(e), true) => {
            let enabled = tlfs::msr::ReenlightenmentControl::from_bits(
                e.state.partition.reenlightenment_control,
            )
            .enable();
            if enabled && dest.user_tsc_khz.is_none() {
                return Err(vm_err(REENLIGHTENMENT_NEEDS_TSC_FREQUENCY));
            }
        }
        (None, false) => {}
        (Some(_), false) => {
            return Err(StreamError::Mismatch(
                "the stream has Hyper-V state but this VM runs without the Hyper-V engine"
                    .to_string(),
            )
            .into())
        }
        (None, true) => {
            return Err(StreamError::Mismatch(
                "the stream has no Hyper-V state but this VM runs the Hyper-V engine".to_string(),
            )
            .into())
        }
    }
    Ok(StateSections {
        vcpus,
        engine,
        devices,
        global,
        next,
    })
}

/// Loads a stream into a freshly created, paused machine of the same configuration (`dest` describes it).
/// Everything is validated (header, config, every vCPU and the engine section, QEMU's re-enlightenment
/// rule) before guest RAM or any vCPU is touched; a stream that fails later (truncated or corrupted memory)
/// leaves the machine unusable and the caller must not resume it.
/// `opts` says how a snapshot's memory file is found and checked; a memory file given there for a stream that
/// has none (not a snapshot's state file) is refused before RAM is touched. Returns the statistics and the
/// source's run state when the stream carries it (live migration).
pub fn restore<R: Read>(
    paused: &Paused,
    hv: Option<&HvGlue>,
    dest: &ConfigSection,
    input: R,
    progress: Progress<'_>,
    opts: &super::snapshot::MemoryFileOptions,
) -> Result<(Stats, Option<GlobalSection>), MigrationError> {
    let shared = paused.machine().clone();
    let n = shared.vcpus.len();
    if paused.vcpus().len() != n {
        return Err(vm_err("a restore needs every vCPU stopped"));
    }
    if dest.vcpus as usize != n {
        return Err(vm_err(
            "the destination's config does not describe this machine",
        ));
    }
    let mut r = StreamReader::new(input)?;
    let first = r.expect_section()?;
    if first.kind != SectionKind::Config {
        return Err(StreamError::Corrupt(format!(
            "the stream starts with a {} section instead of the config",
            first.kind.name()
        ))
        .into());
    }
    let src: ConfigSection = first.json()?;
    src.check_against(dest)?;
    // A live migration's pre-copy passes: guest RAM comes before the vCPU and engine state.
    let total = shared.layout.ram_size;
    let mut stats = Stats::default();
    let mut done = 0u64;
    let mut next = r.expect_section()?;
    let precopied = matches!(next.kind, SectionKind::Memory | SectionKind::ZeroPages);
    if precopied {
        zero_ram(&shared)?;
        while matches!(next.kind, SectionKind::Memory | SectionKind::ZeroPages) {
            load_pages(&shared, &next, &mut stats, &mut done, progress)?;
            next = r.expect_section()?;
        }
    }
    let StateSections {
        vcpus,
        engine,
        devices,
        global,
        next: mut pending,
    } = read_state_sections(&mut r, next, dest, hv.is_some())?;

    // Guest RAM: a snapshot's memory file mapped copy-on-write, or the stream's pages (after the state in a
    // one-pass stream; a live migration has sent them already).
    if pending.kind == SectionKind::MemoryFile {
        if precopied {
            return Err(StreamError::Corrupt(
                "a memory file section after guest pages".to_string(),
            )
            .into());
        }
        let m: super::snapshot::MemoryFileSection = pending.json()?;
        stats.pages = super::snapshot::map_memory_file(&shared, &m, opts)?;
        pending = r.expect_section()?;
    } else if let Some(p) = &opts.memory {
        return Err(vm_err(format!(
            "a memory file ({}) was given, but this is a migration stream, not a snapshot's state file",
            p.display()
        )));
    } else if !precopied {
        zero_ram(&shared)?;
    }
    while matches!(pending.kind, SectionKind::Memory | SectionKind::ZeroPages) {
        load_pages(&shared, &pending, &mut stats, &mut done, progress)?;
        pending = r.expect_section()?;
    }
    if pending.kind != SectionKind::End {
        return Err(StreamError::Corrupt(format!(
            "a {} section after guest memory",
            pending.kind.name()
        ))
        .into());
    }
    progress(total, total);

    // vCPUs: KVM state on their threads, then the VMM-owned state.
    for v in vcpus {
        let apic_state = v.apic.clone();
        let (run, nmi, saved_tsc, tsc_adjust) = (v.run, v.nmi, v.tsc, v.tsc_adjust);
        let i = v.index as usize;
        let kvm = v.kvm;
        paused
            .run_on_vcpu(i, move |fd| apply_kvm(fd, &kvm))
            .ok_or_else(|| vm_err(format!("vCPU {i} ended before its state was restored")))?
            .map_err(|e| vm_err(format!("cannot restore vCPU {i}: {e}")))?;
        let me = &shared.vcpus[i];
        let mut st = me.lock();
        let now = shared.clock.now_ns();
        let tsc = shared.guest_tsc(&st);
        st.apic
            .restore(&apic_state, now, tsc)
            .map_err(|e| vm_err(format!("cannot restore the local APIC of vCPU {i}: {e}")))?;
        st.run = run.into();
        st.nmi = nmi;
        st.tsc_adjust = tsc_adjust;
        let deadline = st.apic.next_timer_deadline_ns();
        shared.timers.set(i, deadline);
        if tsc < saved_tsc {
            tracing::warn!(
                vcpu = i,
                saved = saved_tsc,
                now = tsc,
                "the guest TSC is behind the saved one (another host, or TSC offsets ignored)"
            );
        }
    }
    // Devices before the engine: hyperv-testdev registers its SynIC connections again, which the engine's
    // restore checks.
    shared
        .devices
        .restore_state(&devices)
        .map_err(|e| vm_err(format!("cannot restore the devices: {e}")))?;
    if let (Some(e), Some(hv)) = (engine, hv) {
        let engine = hv.engine();
        engine
            .restore(&e.state)
            .map_err(|err| vm_err(format!("cannot restore the Hyper-V state: {err}")))?;
        // Reference time must not step back (another host, or a TSC that restarted).
        if engine.reference_time(VpId(0)) < e.reference_time {
            engine.rebase_reference_time(e.reference_time);
        }
    }
    stats.bytes = r.read_bytes();
    Ok((stats, global))
}

//! The CPUID builder: the Hyper-V leaves (0x40000000..), the relocated KVM leaves and the base leaves.
//!
//! CONTRACT (the VMM builds against these names; keep them stable):
//! - [`CpuidEntry`] is a KVM-free mirror of `kvm_cpuid_entry2`.
//! - [`build`] returns every leaf the guest sees, given the parsed config and the host's supported leaves
//!   (from `KVM_GET_SUPPORTED_CPUID`, converted by the VMM), sorted by (function, index).
//! - [`build_report`] returns the same leaves plus the effective hv features, warnings and migration blockers.
//! - [`for_vcpu`] patches the per-vCPU APIC ID and topology fields; [`hypervisor_leaves`] filters the
//!   0x40000000-and-up range for `enlighten cpuid`.
//!
//! # What is built
//!
//! **Hyper-V leaves** (only when [`CpuConfig::hyperv_enabled`]), exactly as QEMU's `hyperv_fill_cpuids`
//! (reference §5, §6): 0x40000000..0x40000005 always; 0x40000006..0x4000000A only when a nested flag (hv-evmcs,
//! hv-emsr-bitmap, hv-tlbflush-direct) makes the nested EAX non-zero; 0x40000080..0x40000082 only with hv-syndbg.
//! Deliberate deviation: QEMU writes 0 into 0x40000080 EAX (a bug, reference §11); enlighten writes the maximum
//! synthetic-debugger leaf, 0x40000082.
//!
//! **KVM leaves**: at 0x40000100/0x40000101 when Hyper-V is on, at 0x40000000/0x40000001 otherwise, absent with
//! `kvm=off`. The feature word is the host's 0x40000001 EAX (plus/minus `kvm-*` toggles) restricted to
//! [`KVM_FEATURES_USERSPACE_APIC`]; see that constant for why each other bit is hidden. The hints word (EDX) is 0.
//!
//! **Base leaves** 0x0..0x1F and 0x80000000..0x80000008 from the host's supported list: `host`/`max` keep every
//! supported feature, the fixed models keep the features of their table (see [`crate::config::model_features`])
//! with the host's vendor, family, model and stepping (unless `vendor=`). Then the `+`/`-` toggles apply, the
//! hypervisor bit (1.ECX[31]) is set unless `-hypervisor`, and features the host lacks are dropped with QEMU's
//! `host doesn't support requested feature` warning (`enforce` turns that into an error).
//! Bits the VMM itself provides, whatever KVM reports: `hypervisor`, and `x2apic` and `tsc-deadline`, which
//! enlighten's userspace local APIC implements. (QEMU hides x2apic without an in-kernel irqchip; enlighten does
//! not, because its userspace APIC has an x2APIC mode.) `invtsc` is hidden from `host`/`max` unless
//! `migratable=off` or `+invtsc`, as in QEMU. Nothing else is masked.

use crate::config::{
    blockers, lookup_x86_feature, model_features, Backend, ConfigError, CpuConfig, Feature,
    FeatureSet, HostInfo, Reg, X86FeatureBit, X86_FEATURES,
};
use tlfs::cpuid as hv;

/// One CPUID leaf/subleaf, independent of KVM's types.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX` (1) when `index` matters.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`.
pub const FLAG_SIGNIFICANT_INDEX: u32 = 1;

impl CpuidEntry {
    /// A leaf with subleaf 0 and no flags.
    pub const fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index: 0,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
        }
    }

    /// The value of one register.
    pub fn reg(&self, reg: Reg) -> u32 {
        match reg {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }

    /// A mutable reference to one register.
    pub fn reg_mut(&mut self, reg: Reg) -> &mut u32 {
        match reg {
            Reg::Eax => &mut self.eax,
            Reg::Ebx => &mut self.ebx,
            Reg::Ecx => &mut self.ecx,
            Reg::Edx => &mut self.edx,
        }
    }
}

/// What the builder needs to know about the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCpuid {
    /// `KVM_GET_SUPPORTED_CPUID`, converted by the VMM.
    pub entries: Vec<CpuidEntry>,
    /// SMT state and TSC frequency.
    pub info: HostInfo,
    /// Which backend provides the enlightenments (decides what hv features are supported).
    pub backend: Backend,
}

impl HostCpuid {
    /// A host description with the userspace backend and default [`HostInfo`].
    pub fn new(entries: Vec<CpuidEntry>) -> HostCpuid {
        HostCpuid {
            entries,
            info: HostInfo::default(),
            backend: Backend::Userspace,
        }
    }
}

/// The full result of a CPUID build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidBuild {
    /// Every leaf the guest sees, sorted by (function, index).
    pub entries: Vec<CpuidEntry>,
    /// Whether Hyper-V identification is on (the Hyper-V leaves exist).
    pub hyperv: bool,
    /// The hv features the guest gets (after passthrough expansion and checks).
    pub features: FeatureSet,
    /// Warnings QEMU would print (parse warnings included), without the `warning: ` prefix.
    pub warnings: Vec<String>,
    /// Migration blockers with QEMU's texts.
    pub migration_blockers: Vec<&'static str>,
}

/// KVM paravirtual features that enlighten passes through from the host. Everything else is hidden:
///
/// | bit | feature | why hidden |
/// |---|---|---|
/// | 2 | MMU_OP | removed from KVM long ago |
/// | 4 | ASYNC_PF | "page ready" is injected through KVM's in-kernel local APIC |
/// | 6 | PV_EOI | the EOI shortcut is handled by KVM's in-kernel local APIC; with a userspace APIC the guest's EOIs are lost |
/// | 7 | PV_UNHALT | the kick hypercall delivers an interrupt through KVM's in-kernel local APIC; halted vCPUs would never wake |
/// | 9 | PV_TLB_FLUSH | skips flush IPIs for vCPUs KVM marks preempted and relies on KVM flushing at entry; unverified on this nested KVM, and it would bypass the flush paths enlighten implements |
/// | 10 | ASYNC_PF_VMEXIT | async PF for nested guests, same APIC dependency as ASYNC_PF |
/// | 11 | PV_SEND_IPI | the IPI hypercall is delivered by KVM's in-kernel local APIC; IPIs would be lost |
/// | 12 | POLL_CONTROL | controls KVM's in-kernel halt polling, which never runs when HLT exits to userspace |
/// | 13 | PV_SCHED_YIELD | looks up the target vCPU in KVM's in-kernel APIC map, which does not exist here |
/// | 14 | ASYNC_PF_INT | "page ready" as an interrupt through KVM's in-kernel local APIC |
/// | 15 | MSI_EXT_DEST_ID | a promise about the VMM's MSI/IOAPIC routing, which enlighten does not make |
/// | 16 | HC_MAP_GPA_RANGE | confidential-guest hypercall that exits to a VMM handler enlighten does not have |
/// | 17 | MIGRATION_CONTROL | confidential-guest migration control |
///
/// Kept: CLOCKSOURCE (0), NOP_IO_DELAY (1), CLOCKSOURCE2 (3), STEAL_TIME (5) and CLOCKSOURCE_STABLE_BIT (24):
/// kvmclock and steal time are written by KVM into guest memory and need no local APIC.
pub const KVM_FEATURES_USERSPACE_APIC: u32 = (1 << hv::KVM_FEATURE_CLOCKSOURCE)
    | (1 << hv::KVM_FEATURE_NOP_IO_DELAY)
    | (1 << hv::KVM_FEATURE_CLOCKSOURCE2)
    | (1 << hv::KVM_FEATURE_STEAL_TIME)
    | (1 << hv::KVM_FEATURE_CLOCKSOURCE_STABLE_BIT);

/// The CPUID bits one hv feature sets, register by register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HvFeatureBits {
    /// 0x40000003 EAX.
    pub features_eax: u32,
    /// 0x40000003 EBX.
    pub features_ebx: u32,
    /// 0x40000003 EDX.
    pub features_edx: u32,
    /// 0x40000004 EAX.
    pub recommendations_eax: u32,
    /// 0x4000000A EAX.
    pub nested_eax: u32,
}

/// The bits QEMU's table row for `f` sets (reference §4.1/§5). Two rows are conditional and are adjusted by the
/// builder: hv-vapic's 4.EAX[3] is dropped when hv-avic is on, and hv-synic's 3.EBX[4,5] with
/// `x-hv-synic-kvm-only`.
pub fn feature_bits(f: Feature) -> HvFeatureBits {
    let fa = hv::FeaturesEax::new;
    let fd = hv::FeaturesEdx::new;
    let ra = hv::RecommendationsEax::new;
    let na = hv::NestedFeaturesEax::new;
    let mut b = HvFeatureBits::default();
    match f {
        Feature::Relaxed => b.recommendations_eax = ra().with_use_relaxed_timing(true).into_bits(),
        Feature::Vapic => {
            b.features_eax = fa().with_access_intr_ctrl_regs(true).into_bits();
            b.recommendations_eax = ra().with_use_apic_msrs(true).into_bits();
        }
        Feature::Time => {
            b.features_eax = fa()
                .with_access_partition_reference_counter(true)
                .with_access_partition_reference_tsc(true)
                .into_bits();
        }
        Feature::Crash => b.features_edx = fd().with_guest_crash_regs_available(true).into_bits(),
        Feature::Reset => b.features_eax = fa().with_access_reset_reg(true).into_bits(),
        Feature::VpIndex => b.features_eax = fa().with_access_vp_index(true).into_bits(),
        Feature::Runtime => b.features_eax = fa().with_access_vp_run_time_reg(true).into_bits(),
        Feature::Synic => {
            b.features_eax = fa().with_access_synic_regs(true).into_bits();
            b.features_ebx = hv::FeaturesEbx::new()
                .with_post_messages(true)
                .with_signal_events(true)
                .into_bits();
        }
        Feature::Stimer => b.features_eax = fa().with_access_synthetic_timer_regs(true).into_bits(),
        Feature::Frequencies => {
            b.features_eax = fa().with_access_frequency_regs(true).into_bits();
            b.features_edx = fd().with_frequency_regs_available(true).into_bits();
        }
        Feature::Reenlightenment => {
            b.features_eax = fa().with_access_reenlightenment_controls(true).into_bits();
        }
        Feature::TlbFlush => {
            b.recommendations_eax = ra()
                .with_use_hypercall_for_remote_flush(true)
                .with_use_ex_processor_masks(true)
                .into_bits();
        }
        Feature::Evmcs => {
            b.recommendations_eax = ra().with_use_vmcs_enlightenments(true).into_bits();
            b.nested_eax = u32::from(hv::HV_EVMCS_VERSION_RANGE_1_1);
        }
        Feature::Ipi => {
            b.recommendations_eax = ra()
                .with_use_synthetic_cluster_ipi(true)
                .with_use_ex_processor_masks(true)
                .into_bits();
        }
        Feature::StimerDirect => {
            b.features_edx = fd().with_direct_synthetic_timers(true).into_bits()
        }
        Feature::Avic => b.recommendations_eax = ra().with_deprecate_auto_eoi(true).into_bits(),
        Feature::Syndbg => b.features_edx = fd().with_debug_regs_available(true).into_bits(),
        Feature::EmsrBitmap => b.nested_eax = na().with_enlightened_msr_bitmap(true).into_bits(),
        Feature::XmmInput => {
            b.features_edx = fd()
                .with_xmm_registers_for_fast_hypercall_available(true)
                .into_bits();
        }
        Feature::TlbFlushExt => {
            b.features_edx = fd()
                .with_extended_gva_ranges_for_flush_available(true)
                .into_bits();
        }
        Feature::TlbFlushDirect => b.nested_eax = na().with_direct_virtual_flush(true).into_bits(),
    }
    b
}

fn vendor_words(bytes: &[u8]) -> [u32; 3] {
    let mut padded = [0u8; 12];
    for (d, s) in padded.iter_mut().zip(bytes.iter()) {
        *d = *s;
    }
    [
        u32::from_le_bytes([padded[0], padded[1], padded[2], padded[3]]),
        u32::from_le_bytes([padded[4], padded[5], padded[6], padded[7]]),
        u32::from_le_bytes([padded[8], padded[9], padded[10], padded[11]]),
    ]
}

/// The Hyper-V leaves for an already checked feature set (reference §6). With `passthrough`, the vendor,
/// interface, version, limits and spinlock count come from the backend's own identity, which for both backends
/// is QEMU's defaults ("Microsoft Hv", 10.0.14393, {0xFFFFFFFF, 64, 0, 0}, never-notify), instead of the
/// `-cpu` values, as QEMU copies the host's values.
pub fn hyperv_leaves(cfg: &CpuConfig, features: FeatureSet, host: &HostInfo) -> Vec<CpuidEntry> {
    let mut f3a = hv::FeaturesEax::new()
        .with_access_hypercall_msrs(true)
        .into_bits();
    let mut f3b = 0u32;
    let mut f3d = hv::FeaturesEdx::new()
        .with_cpu_dynamic_partitioning_available(true)
        .into_bits();
    let mut r4a = 0u32;
    let mut nested = 0u32;
    for f in features.iter() {
        let mut b = feature_bits(f);
        if f == Feature::Vapic && features.contains(Feature::Avic) {
            b.recommendations_eax &= !hv::RecommendationsEax::new()
                .with_use_apic_msrs(true)
                .into_bits();
        }
        if f == Feature::Synic && cfg.synic_kvm_only {
            b.features_ebx = 0;
        }
        f3a |= b.features_eax;
        f3b |= b.features_ebx;
        f3d |= b.features_edx;
        r4a |= b.recommendations_eax;
        nested |= b.nested_eax;
    }
    if cfg.no_nonarch_coresharing_bit(host) {
        r4a |= hv::RecommendationsEax::new()
            .with_no_non_architectural_core_sharing(true)
            .into_bits();
    }

    let default_cfg = CpuConfig::default();
    let id = if cfg.passthrough { &default_cfg } else { cfg };
    let syndbg = features.contains(Feature::Syndbg);
    let mut max = if nested != 0 {
        hv::LEAF_NESTED_FEATURES
    } else {
        hv::LEAF_IMPLEMENT_LIMITS
    };
    if syndbg {
        max = hv::LEAF_SYNDBG_PLATFORM_CAPABILITIES;
    }
    let [v0, v1, v2] = vendor_words(&id.vendor_id);
    let ver = id.version;
    let mut out = vec![
        CpuidEntry::leaf(hv::LEAF_VENDOR_AND_MAX_FUNCTIONS, max, v0, v1, v2),
        CpuidEntry::leaf(hv::LEAF_INTERFACE, hv::HV_INTERFACE_SIGNATURE, 0, 0, 0),
        CpuidEntry::leaf(
            hv::LEAF_VERSION,
            ver.build,
            hv::VersionEbx::new()
                .with_major(ver.major)
                .with_minor(ver.minor)
                .into_bits(),
            ver.spack,
            hv::VersionEdx::new()
                .with_service_branch(ver.sbranch)
                .with_service_number(ver.snumber & 0xFF_FFFF)
                .into_bits(),
        ),
        CpuidEntry::leaf(hv::LEAF_FEATURES, f3a, f3b, 0, f3d),
        CpuidEntry::leaf(hv::LEAF_ENLIGHTENMENT_INFO, r4a, id.spinlocks, 0, 0),
        CpuidEntry::leaf(
            hv::LEAF_IMPLEMENT_LIMITS,
            id.max_vps as u32,
            hv::HV_DEFAULT_MAX_LPS,
            0,
            0,
        ),
    ];
    if nested != 0 {
        for leaf in hv::LEAF_HARDWARE_FEATURES..hv::LEAF_NESTED_FEATURES {
            out.push(CpuidEntry::leaf(leaf, 0, 0, 0, 0));
        }
        out.push(CpuidEntry::leaf(hv::LEAF_NESTED_FEATURES, nested, 0, 0, 0));
    }
    if syndbg {
        out.push(CpuidEntry::leaf(
            hv::LEAF_SYNDBG_VENDOR_AND_MAX_FUNCTIONS,
            // QEMU writes 0 here (reference §11 bug 1); the correct value is the maximum syndbg leaf.
            hv::LEAF_SYNDBG_PLATFORM_CAPABILITIES,
            hv::HV_SYNDBG_VENDOR_EBX,
            hv::HV_SYNDBG_VENDOR_ECX,
            hv::HV_SYNDBG_VENDOR_EDX,
        ));
        out.push(CpuidEntry::leaf(
            hv::LEAF_SYNDBG_INTERFACE,
            hv::HV_SYNDBG_INTERFACE_SIGNATURE,
            0,
            0,
            0,
        ));
        out.push(CpuidEntry::leaf(
            hv::LEAF_SYNDBG_PLATFORM_CAPABILITIES,
            hv::SyndbgCapabilitiesEax::new()
                .with_allow_kernel_debugging(true)
                .into_bits(),
            0,
            0,
            0,
        ));
    }
    out
}

/// Every leaf the guest sees, sorted by (function, index). See the module documentation.
pub fn build(cfg: &CpuConfig, host: &HostCpuid) -> Result<Vec<CpuidEntry>, ConfigError> {
    build_report(cfg, host).map(|b| b.entries)
}

/// The hypervisor-range leaves, 0x40000000..=0x4FFFFFFF (what `enlighten cpuid` prints), in input order.
pub fn hypervisor_leaves(entries: &[CpuidEntry]) -> impl Iterator<Item = &CpuidEntry> + '_ {
    entries
        .iter()
        .filter(|e| (hv::HYPERVISOR_RANGE_START..0x5000_0000).contains(&e.function))
}

/// A feature word: one register of one (leaf, subleaf) holding feature flags.
type Word = (u32, u32, Reg);

fn word_of(b: &X86FeatureBit) -> Word {
    (b.leaf, b.subleaf, b.reg)
}

/// The feature words of the base range, in a stable order (the order of first appearance in the name table).
fn base_feature_words() -> Vec<Word> {
    let mut v: Vec<Word> = Vec::new();
    for (_, b) in X86_FEATURES {
        if b.leaf == hv::KVM_CPUID_FEATURES {
            continue;
        }
        let w = word_of(b);
        if !v.contains(&w) {
            v.push(w);
        }
    }
    v
}

fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn find_mut(entries: &mut [CpuidEntry], function: u32, index: u32) -> Option<&mut CpuidEntry> {
    entries
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

/// QEMU's description of a feature bit for warnings: `CPUID.07H:EBX.avx2 [bit 5]`.
fn describe_bit(word: Word, bit: u8) -> String {
    let name = X86_FEATURES
        .iter()
        .find(|(_, b)| word_of(b) == word && b.bit == bit)
        .map(|(n, _)| *n);
    match name {
        Some(n) => format!("CPUID.{:02X}H:{}.{} [bit {}]", word.0, word.2, n, bit),
        None => format!("CPUID.{:02X}H:{} [bit {}]", word.0, word.2, bit),
    }
}

/// XSAVE components (XCR0 bit numbers) that depend on a feature flag.
const XSAVE_COMPONENTS: &[(&str, &[u32])] = &[
    ("avx", &[2]),
    ("mpx", &[3, 4]),
    ("avx512f", &[5, 6, 7]),
    ("pku", &[9]),
];

/// Builds every leaf, with warnings and migration blockers.
pub fn build_report(cfg: &CpuConfig, host: &HostCpuid) -> Result<CpuidBuild, ConfigError> {
    let mut warnings = cfg.warnings.clone();
    let hyperv = cfg.hyperv_enabled();
    let features = if hyperv {
        cfg.effective_features(&host.backend)?
    } else {
        FeatureSet::EMPTY
    };

    // ---- Base leaves ---------------------------------------------------------------------------------------
    let mut base: Vec<CpuidEntry> = host
        .entries
        .iter()
        .filter(|e| e.function <= 0x1F || (0x8000_0000..=0x8000_0008).contains(&e.function))
        .copied()
        .collect();
    if let Some(e) = find_mut(&mut base, 0, 0) {
        e.eax = e.eax.min(0x1F);
    }
    if let Some(e) = find_mut(&mut base, 0x8000_0000, 0) {
        e.eax = e.eax.min(0x8000_0008);
    }
    let words = base_feature_words();
    let bit_of = |name: &str| lookup_x86_feature(name).map(|(_, b)| b);
    // Bits the VMM provides whatever KVM reports.
    let vmm_provided: Vec<X86FeatureBit> = ["hypervisor", "x2apic", "tsc-deadline"]
        .iter()
        .filter_map(|n| bit_of(n))
        .collect();
    let available_words: Vec<(Word, u32)> = words
        .iter()
        .map(|w| {
            let host_bits = find(&base, w.0, w.1).map_or(0, |e| e.reg(w.2));
            let bits = vmm_provided
                .iter()
                .filter(|b| word_of(b) == *w)
                .fold(host_bits, |acc, b| acc | b.mask());
            (*w, bits)
        })
        .collect();
    let available = |w: Word| -> u32 {
        available_words
            .iter()
            .find(|(x, _)| *x == w)
            .map_or(0, |(_, b)| *b)
    };
    // Requested bits per word: the model's set, then the toggles.
    let fixed = model_features(&cfg.model);
    let mut requested: Vec<(Word, u32)> = words
        .iter()
        .map(|w| {
            let bits = match &fixed {
                None => {
                    let mut a = available(*w);
                    if cfg.migratable {
                        if let Some(b) = bit_of("invtsc").filter(|b| word_of(b) == *w) {
                            a &= !b.mask();
                        }
                    }
                    a
                }
                Some(names) => names
                    .iter()
                    .filter_map(|n| bit_of(n))
                    .filter(|b| word_of(b) == *w)
                    .fold(0, |acc, b| acc | b.mask()),
            };
            (*w, bits)
        })
        .collect();
    let hypervisor_bit = bit_of("hypervisor");
    for (w, bits) in requested.iter_mut() {
        if let Some(b) = hypervisor_bit.filter(|b| word_of(b) == *w) {
            *bits |= b.mask();
        }
        for t in cfg.x86.iter().filter(|t| word_of(&t.bit) == *w) {
            if t.on {
                *bits |= t.bit.mask();
            } else {
                *bits &= !t.bit.mask();
            }
        }
    }
    let mut missing_any = false;
    for (w, bits) in &requested {
        let missing = bits & !available(*w);
        for bit in 0..32u8 {
            if missing & (1 << bit) != 0 {
                missing_any = true;
                if cfg.check || cfg.enforce {
                    warnings.push(format!(
                        "host doesn't support requested feature: {}",
                        describe_bit(*w, bit)
                    ));
                }
            }
        }
    }
    if cfg.enforce && missing_any {
        return Err(ConfigError::Message(
            "Host doesn't support requested features".into(),
        ));
    }
    for (w, bits) in &requested {
        let value = bits & available(*w);
        match find_mut(&mut base, w.0, w.1) {
            Some(e) => *e.reg_mut(w.2) = value,
            None if value != 0 => {
                // Only VMM-provided bits can land here (leaf 1 is always in KVM's list in practice).
                let mut e = CpuidEntry {
                    function: w.0,
                    index: w.1,
                    ..CpuidEntry::default()
                };
                *e.reg_mut(w.2) = value;
                base.push(e);
            }
            None => {}
        }
    }
    let enabled = |name: &str, base: &[CpuidEntry]| -> bool {
        bit_of(name).is_some_and(|b| {
            find(base, b.leaf, b.subleaf).is_some_and(|e| e.reg(b.reg) & b.mask() != 0)
        })
    };
    // Fixed models: no leaves describing features the model does not have.
    if fixed.is_some() {
        base.retain(|e| {
            !(matches!(e.function, 0x12 | 0x14 | 0x1D | 0x1E) || (e.function == 7 && e.index > 0))
        });
        if let Some(e) = find_mut(&mut base, 7, 0) {
            e.eax = 0;
        }
    }
    // XSAVE state components of features that are off.
    let mut dropped_components: Vec<u32> = Vec::new();
    for (name, comps) in XSAVE_COMPONENTS {
        if !enabled(name, &base) {
            dropped_components.extend_from_slice(comps);
        }
    }
    if let Some(e) = find_mut(&mut base, 0xD, 0) {
        for c in &dropped_components {
            e.eax &= !(1u32 << c);
        }
        if fixed.is_some() {
            // Fixed models know no XSAVE state beyond x87, SSE, AVX, MPX, AVX-512 and PKRU (no AMX tiles etc.).
            e.eax &= 0x2FF;
            e.edx = 0;
        }
        let kept = e.eax;
        base.retain(|x| {
            !(x.function == 0xD && x.index >= 2 && x.index < 32 && kept & (1u32 << x.index) == 0)
        });
        let max_size = base
            .iter()
            .filter(|x| {
                x.function == 0xD && (2..32).contains(&x.index) && kept & (1u32 << x.index) != 0
            })
            .map(|x| x.ebx.saturating_add(x.eax))
            .fold(576u32, u32::max);
        if let Some(e) = find_mut(&mut base, 0xD, 0) {
            e.ecx = max_size;
        }
    }
    if let Some(v) = &cfg.vendor {
        let [b, d, c] = vendor_words(v.as_bytes());
        for f in [0u32, 0x8000_0000] {
            if let Some(e) = find_mut(&mut base, f, 0) {
                e.ebx = b;
                e.edx = d;
                e.ecx = c;
            }
        }
    }

    // ---- Hypervisor range --------------------------------------------------------------------------------
    let mut out = base;
    if hyperv {
        out.extend(hyperv_leaves(cfg, features, &host.info));
    }
    if cfg.kvm {
        let kvm_base = if hyperv {
            hv::KVM_CPUID_SIGNATURE_NEXT
        } else {
            hv::KVM_CPUID_SIGNATURE
        };
        let host_word = find(&host.entries, hv::KVM_CPUID_FEATURES, 0).map_or(0, |e| e.eax);
        let available_kvm = host_word & KVM_FEATURES_USERSPACE_APIC;
        let mut word = available_kvm;
        for t in cfg
            .x86
            .iter()
            .filter(|t| t.bit.leaf == hv::KVM_CPUID_FEATURES)
        {
            let mut mask = t.bit.mask();
            if t.name == "kvmclock" {
                mask |= 1 << hv::KVM_FEATURE_CLOCKSOURCE2;
            }
            if t.on {
                for bit in 0..32u8 {
                    if mask & (1 << bit) != 0
                        && available_kvm & (1 << bit) == 0
                        && (cfg.check || cfg.enforce)
                    {
                        warnings.push(format!(
                            "host doesn't support requested feature: CPUID.{:02X}H:EAX.{} [bit {}]",
                            hv::KVM_CPUID_FEATURES,
                            t.name,
                            bit
                        ));
                    }
                }
                if cfg.enforce && mask & !available_kvm != 0 {
                    return Err(ConfigError::Message(
                        "Host doesn't support requested features".into(),
                    ));
                }
                word |= mask & available_kvm;
            } else {
                word &= !mask;
            }
        }
        out.push(CpuidEntry::leaf(
            kvm_base,
            kvm_base + 1,
            hv::KVM_SIGNATURE_EBX,
            hv::KVM_SIGNATURE_ECX,
            hv::KVM_SIGNATURE_EDX,
        ));
        out.push(CpuidEntry::leaf(kvm_base + 1, word, 0, 0, 0));
    }
    out.sort_by_key(|e| (e.function, e.index));
    out.dedup_by_key(|e| (e.function, e.index));

    // ---- Migration blockers ----------------------------------------------------------------------------
    let mut migration_blockers = Vec::new();
    if hyperv {
        if cfg.passthrough {
            migration_blockers.push(blockers::PASSTHROUGH);
        }
        if cfg.no_nonarch_coresharing == crate::config::OnOffAuto::Auto {
            migration_blockers.push(blockers::NO_NONARCH_CORESHARING_AUTO);
        }
    }
    if enabled("invtsc", &out) && cfg.tsc_frequency.is_none() {
        migration_blockers.push(blockers::INVTSC);
    }
    Ok(CpuidBuild {
        entries: out,
        hyperv,
        features,
        warnings,
        migration_blockers,
    })
}

/// Patches the per-vCPU fields into a copy of `entries` (pure logic; the VMM calls it once per vCPU).
///
/// Topology model: one package, `nr_vcpus` cores, one thread per core, APIC IDs chosen by the VMM.
/// - 1.EBX[31:24] = initial APIC ID (low 8 bits), 1.EBX[23:16] = logical processors per package, 1.EDX[28]
///   (HTT) set when there is more than one;
/// - leaf 4 EAX[31:26] = cores per package - 1 (Intel), EAX[25:14] = 0 (no cache shared between threads);
/// - leaves 0xB and 0x1F (when present) are rewritten: subleaf 0 = SMT level (shift 0, 1 thread), subleaf 1 =
///   core level (shift = bits needed for `nr_vcpus`, `nr_vcpus` processors), subleaf 2 = invalid level; EDX of
///   every subleaf = the x2APIC ID;
/// - 0x80000008 ECX[7:0] = `nr_vcpus` - 1 and ECX[15:12] = the core-ID width (AMD);
/// - 0x8000001E EAX = the extended APIC ID when present.
pub fn for_vcpu(entries: &[CpuidEntry], apic_id: u32, nr_vcpus: u32) -> Vec<CpuidEntry> {
    let n = nr_vcpus.max(1);
    let shift = 32 - (n - 1).leading_zeros(); // bits needed to number n cores (0 for one core)
    let mut out: Vec<CpuidEntry> = Vec::with_capacity(entries.len() + 4);
    let mut topo_leaves: Vec<u32> = Vec::new();
    for e in entries {
        if e.function == 0xB || e.function == 0x1F {
            if !topo_leaves.contains(&e.function) {
                topo_leaves.push(e.function);
            }
            continue;
        }
        let mut e = *e;
        match e.function {
            1 => {
                let lps = n.min(255);
                e.ebx = (e.ebx & 0x0000_FFFF) | (lps << 16) | ((apic_id & 0xFF) << 24);
                if n > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Only real cache descriptors (type != 0) carry the core count.
            4 if e.eax & 0x1F != 0 => {
                let cores = (n.min(64) - 1) << 26;
                e.eax = (e.eax & 0x0000_3FFF) | cores;
            }
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xF0FF) | ((n - 1).min(255)) | (shift.min(15) << 12);
            }
            0x8000_001E => e.eax = apic_id,
            _ => {}
        }
        out.push(e);
    }
    for f in topo_leaves {
        let flags = FLAG_SIGNIFICANT_INDEX;
        out.push(CpuidEntry {
            function: f,
            index: 0,
            flags,
            eax: 0,
            ebx: 1,
            ecx: (1 << 8),
            edx: apic_id,
        });
        out.push(CpuidEntry {
            function: f,
            index: 1,
            flags,
            eax: shift,
            ebx: n & 0xFFFF,
            ecx: (2 << 8) | 1,
            edx: apic_id,
        });
        out.push(CpuidEntry {
            function: f,
            index: 2,
            flags,
            eax: 0,
            ebx: 0,
            ecx: 2,
            edx: apic_id,
        });
    }
    out.sort_by_key(|e| (e.function, e.index));
    out
}

//! Enlightenment configuration: the `-cpu` option, parsed exactly as QEMU parses it.
//!
//! CONTRACT (other crates build against these names; keep them stable):
//! - [`CpuConfig::parse`] turns a `-cpu` string into a [`CpuConfig`] or a [`ConfigError`] whose `Display` is
//!   QEMU's message text (without the `qemu-system-x86_64: ` prefix).
//! - [`CpuConfig::validate`] runs QEMU's dependency and backend-support checks against a [`Backend`].
//! - [`Feature`] lists the hv features in QEMU's internal bit order; [`FeatureSet`] is a set of them.
//!
//! # How QEMU parses `-cpu` (and how this module follows it)
//!
//! 1. The text before the first comma is the model name (`host`, `max`, `qemu64`, ...). An empty option is
//!    `-cpu option cannot be empty`; an unknown model is `unable to find CPU model 'NAME'`.
//! 2. The rest is split on commas; empty items are skipped (QEMU uses `strtok`).
//! 3. `+name` / `-name` (legacy syntax) mean `name=on` / `name=off`, applied *after* every `name=value` item,
//!    all `+` first, then all `-`, whatever their position (newer QEMU registers them as global properties after
//!    the others). Mixing `+name` with a later `name=value` gives QEMU's two "Ambiguous CPU model string"
//!    warnings.
//! 4. `name=value` and bare `name` (= `name=on`) are applied in order, so a later setting wins:
//!    `hv-relaxed,hv-relaxed=off` leaves hv-relaxed off. Every `_` in a name becomes `-` (QEMU `feat2prop`).
//!    This module also converts the names of `+`/`-` items, which QEMU does not do itself (it registers explicit
//!    underscore aliases instead); the accepted spellings are the same for every flag listed here.
//! 5. Values are parsed as QEMU's string input visitor does: booleans `on|yes|true|y|off|no|false|n`, integers
//!    with C `strtoull`/`strtoll` base-0 rules (`0x` hex, leading `0` octal), enum `on|off|auto`.
//!
//! Error texts are QEMU's inner messages. Real QEMU applies `name=value` items as global properties and prefixes
//! their errors with `can't apply global <model>-x86_64-cpu.<name>=<value>: `; that prefix is left out here.
//!
//! Warnings are returned as data in [`CpuConfig::warnings`], never printed.

use std::fmt;

use thiserror::Error;

/// Hyper-V features in QEMU's internal bit order (`cpu->hyperv_features`), which is also the order of its
/// dependency checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Feature {
    Relaxed = 0,
    Vapic = 1,
    Time = 2,
    Crash = 3,
    Reset = 4,
    VpIndex = 5,
    Runtime = 6,
    Synic = 7,
    Stimer = 8,
    Frequencies = 9,
    Reenlightenment = 10,
    TlbFlush = 11,
    Evmcs = 12,
    Ipi = 13,
    StimerDirect = 14,
    Avic = 15,
    Syndbg = 16,
    EmsrBitmap = 17,
    XmmInput = 18,
    TlbFlushExt = 19,
    TlbFlushDirect = 20,
}

impl Feature {
    /// Every feature, in bit order.
    pub const ALL: [Feature; 21] = [
        Feature::Relaxed,
        Feature::Vapic,
        Feature::Time,
        Feature::Crash,
        Feature::Reset,
        Feature::VpIndex,
        Feature::Runtime,
        Feature::Synic,
        Feature::Stimer,
        Feature::Frequencies,
        Feature::Reenlightenment,
        Feature::TlbFlush,
        Feature::Evmcs,
        Feature::Ipi,
        Feature::StimerDirect,
        Feature::Avic,
        Feature::Syndbg,
        Feature::EmsrBitmap,
        Feature::XmmInput,
        Feature::TlbFlushExt,
        Feature::TlbFlushDirect,
    ];

    /// The feature with QEMU bit number `bit`, if any.
    pub fn from_bit(bit: u8) -> Option<Feature> {
        Feature::ALL.get(usize::from(bit)).copied()
    }

    /// The `-cpu` property name (`hv-apicv` is accepted as an alias of `hv-avic`).
    pub const fn name(self) -> &'static str {
        match self {
            Feature::Relaxed => "hv-relaxed",
            Feature::Vapic => "hv-vapic",
            Feature::Time => "hv-time",
            Feature::Crash => "hv-crash",
            Feature::Reset => "hv-reset",
            Feature::VpIndex => "hv-vpindex",
            Feature::Runtime => "hv-runtime",
            Feature::Synic => "hv-synic",
            Feature::Stimer => "hv-stimer",
            Feature::Frequencies => "hv-frequencies",
            Feature::Reenlightenment => "hv-reenlightenment",
            Feature::TlbFlush => "hv-tlbflush",
            Feature::Evmcs => "hv-evmcs",
            Feature::Ipi => "hv-ipi",
            Feature::StimerDirect => "hv-stimer-direct",
            Feature::Avic => "hv-avic",
            Feature::Syndbg => "hv-syndbg",
            Feature::EmsrBitmap => "hv-emsr-bitmap",
            Feature::XmmInput => "hv-xmm-input",
            Feature::TlbFlushExt => "hv-tlbflush-ext",
            Feature::TlbFlushDirect => "hv-tlbflush-direct",
        }
    }

    /// QEMU's "desc" string, used in `Hyper-V %s is not supported by kernel` and `Hyper-V %s requires Hyper-V %s`.
    pub const fn desc(self) -> &'static str {
        match self {
            Feature::Relaxed => "relaxed timing (hv-relaxed)",
            Feature::Vapic => "virtual APIC (hv-vapic)",
            Feature::Time => "clocksources (hv-time)",
            Feature::Crash => "crash MSRs (hv-crash)",
            Feature::Reset => "reset MSR (hv-reset)",
            Feature::VpIndex => "VP_INDEX MSR (hv-vpindex)",
            Feature::Runtime => "VP_RUNTIME MSR (hv-runtime)",
            Feature::Synic => "synthetic interrupt controller (hv-synic)",
            Feature::Stimer => "synthetic timers (hv-stimer)",
            Feature::Frequencies => "frequency MSRs (hv-frequencies)",
            Feature::Reenlightenment => "reenlightenment MSRs (hv-reenlightenment)",
            Feature::TlbFlush => "paravirtualized TLB flush (hv-tlbflush)",
            Feature::Evmcs => "enlightened VMCS (hv-evmcs)",
            Feature::Ipi => "paravirtualized IPI (hv-ipi)",
            Feature::StimerDirect => "direct mode synthetic timers (hv-stimer-direct)",
            Feature::Avic => "AVIC/APICv support (hv-avic/hv-apicv)",
            Feature::Syndbg => "Enable synthetic kernel debugger channel (hv-syndbg)",
            Feature::EmsrBitmap => "enlightened MSR-Bitmap (hv-emsr-bitmap)",
            Feature::XmmInput => "XMM fast hypercall input (hv-xmm-input)",
            Feature::TlbFlushExt => {
                "Extended gva ranges for TLB flush hypercalls (hv-tlbflush-ext)"
            }
            Feature::TlbFlushDirect => "direct TLB flush (hv-tlbflush-direct)",
        }
    }

    /// The dependencies QEMU's table enforces (checked lowest bit first). The synic→vpindex rule is not in the
    /// table: QEMU checks it after the walk (see [`CpuConfig::effective_features`]).
    pub const fn deps(self) -> FeatureSet {
        let bits: u32 = match self {
            Feature::Stimer => (1 << Feature::Time as u8) | (1 << Feature::Synic as u8),
            Feature::TlbFlush | Feature::Ipi => 1 << Feature::VpIndex as u8,
            Feature::Evmcs | Feature::TlbFlushDirect => 1 << Feature::Vapic as u8,
            Feature::StimerDirect => 1 << Feature::Stimer as u8,
            Feature::Syndbg => (1 << Feature::Synic as u8) | (1 << Feature::Relaxed as u8),
            Feature::TlbFlushExt => 1 << Feature::TlbFlush as u8,
            _ => 0,
        };
        FeatureSet(bits)
    }

    /// QEMU's `skip_passthrough`: never turned on by `hv-passthrough`.
    pub const fn skip_passthrough(self) -> bool {
        matches!(self, Feature::Syndbg)
    }

    /// Looks up a (dash-spelled) property name, including the `hv-apicv` alias.
    pub fn from_name(name: &str) -> Option<Feature> {
        if name == "hv-apicv" {
            return Some(Feature::Avic);
        }
        Feature::ALL.iter().copied().find(|f| f.name() == name)
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Feature`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet(pub u32);

impl FeatureSet {
    pub const EMPTY: FeatureSet = FeatureSet(0);
    /// Every feature.
    pub const ALL: FeatureSet = FeatureSet((1 << 21) - 1);

    pub fn contains(self, f: Feature) -> bool {
        self.0 & (1 << f as u8) != 0
    }
    pub fn insert(&mut self, f: Feature) {
        self.0 |= 1 << f as u8;
    }
    pub fn remove(&mut self, f: Feature) {
        self.0 &= !(1 << f as u8);
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// A set holding exactly `features`.
    pub fn of(features: &[Feature]) -> FeatureSet {
        let mut s = FeatureSet::EMPTY;
        for f in features {
            s.insert(*f);
        }
        s
    }
    /// The set with `f` added.
    pub fn with(mut self, f: Feature) -> FeatureSet {
        self.insert(f);
        self
    }
    /// The set with `f` removed.
    pub fn without(mut self, f: Feature) -> FeatureSet {
        self.remove(f);
        self
    }
    pub fn union(self, other: FeatureSet) -> FeatureSet {
        FeatureSet(self.0 | other.0)
    }
    pub fn intersection(self, other: FeatureSet) -> FeatureSet {
        FeatureSet(self.0 & other.0)
    }
    /// The members, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

/// `hv-no-nonarch-coresharing=on|off|auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnOffAuto {
    On,
    #[default]
    Off,
    Auto,
}

/// Which implementation provides the enlightenments, and therefore which features are "supported".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// enlighten's own userspace implementation: the engine's feature list.
    Userspace,
    /// A future kernel-offload backend reporting the kernel's supported set.
    Kernel(FeatureSet),
}

impl Backend {
    /// The features the userspace engine implements: everything except the nested-virtualization features
    /// (hv-evmcs, hv-emsr-bitmap, hv-tlbflush-direct: there is no nested VMX/SVM to enlighten) and the synthetic
    /// kernel debugger (hv-syndbg: no vmbus-bridge / syndbg device).
    pub const USERSPACE_FEATURES: FeatureSet = FeatureSet(
        FeatureSet::ALL.0
            & !(1 << Feature::Evmcs as u8)
            & !(1 << Feature::EmsrBitmap as u8)
            & !(1 << Feature::TlbFlushDirect as u8)
            & !(1 << Feature::Syndbg as u8),
    );

    /// The features this backend can provide.
    pub fn supported(&self) -> FeatureSet {
        match self {
            Backend::Userspace => Backend::USERSPACE_FEATURES,
            Backend::Kernel(set) => *set,
        }
    }
}

/// Facts about the host that the configuration needs and that the library must not probe itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// Simultaneous multithreading is active on the host (`/sys/devices/system/cpu/smt/active`). KVM reports
    /// 4.EAX[18] (NoNonArchitecturalCoreSharing) exactly when SMT is *not* possible, and
    /// `hv-no-nonarch-coresharing=auto` copies that bit.
    pub smt_active: bool,
    /// The host TSC frequency in kHz, when known.
    pub tsc_khz: Option<u32>,
}

/// The hypervisor version reported in leaf 0x40000002 (`hv-version-id-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HvVersion {
    /// `hv-version-id-build` (uint32): EAX.
    pub build: u32,
    /// `hv-version-id-major` (uint16): EBX[31:16].
    pub major: u16,
    /// `hv-version-id-minor` (uint16): EBX[15:0].
    pub minor: u16,
    /// `hv-version-id-spack` (uint32): ECX.
    pub spack: u32,
    /// `hv-version-id-sbranch` (uint8): EDX[31:24].
    pub sbranch: u8,
    /// `hv-version-id-snumber` (uint32, only the low 24 bits reach EDX).
    pub snumber: u32,
}

impl Default for HvVersion {
    /// 10.0.14393 (Windows Server 2016), QEMU's default since 6.2.
    fn default() -> Self {
        HvVersion {
            build: tlfs::cpuid::HV_DEFAULT_VERSION_BUILD,
            major: tlfs::cpuid::HV_DEFAULT_VERSION_MAJOR,
            minor: tlfs::cpuid::HV_DEFAULT_VERSION_MINOR,
            spack: 0,
            sbranch: 0,
            snumber: 0,
        }
    }
}

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        })
    }
}

/// Where a plain x86 feature flag lives in CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct X86FeatureBit {
    /// The leaf. KVM paravirtual features use [`tlfs::cpuid::KVM_CPUID_FEATURES`] (0x40000001); the builder
    /// moves them to wherever the KVM block ends up.
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

impl X86FeatureBit {
    /// The bit as a mask.
    pub const fn mask(self) -> u32 {
        1u32 << self.bit
    }
}

/// One plain x86 feature toggle from the `-cpu` string, in the order QEMU applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X86Toggle {
    /// The canonical QEMU name (`x2apic`, `sse4.1`, `kvm-pv-eoi`, ...).
    pub name: &'static str,
    pub bit: X86FeatureBit,
    pub on: bool,
}

/// A configuration error. `Display` is QEMU's exact text.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Message(String),
}

impl ConfigError {
    fn msg(s: impl Into<String>) -> ConfigError {
        ConfigError::Message(s.into())
    }
}

/// The QEMU migration-blocker texts (reference §8.1).
pub mod blockers {
    /// Added when `hv-passthrough` is on.
    pub const PASSTHROUGH: &str =
        "'hv-passthrough' CPU flag prevents migration, use explicit set of hv-* flags instead";
    /// Added when `hv-no-nonarch-coresharing=auto` (the missing comma is QEMU's).
    pub const NO_NONARCH_CORESHARING_AUTO: &str = "'hv-no-nonarch-coresharing=auto' CPU flag prevents migration use explicit 'hv-no-nonarch-coresharing=on' instead (but make sure SMT is disabled and/or that vCPUs are properly pinned)";
    /// Added when invtsc is exposed and no `tsc-frequency` was given.
    pub const INVTSC: &str = "State blocked by non-migratable CPU device (invtsc flag)";
}

/// The QEMU warning for an over-long `hv-vendor-id`.
pub const WARN_VENDOR_ID_TRUNCATED: &str = "hv-vendor-id truncated to 12 characters";

/// The parsed `-cpu` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuConfig {
    /// The CPU model name (`host`, `max`, `kvm64`, `qemu64`, ...).
    pub model: String,
    /// The hv feature flags that are on after every `hv-x[=on|off]` item (not yet expanded by passthrough).
    pub hv: FeatureSet,
    /// `hv-passthrough`.
    pub passthrough: bool,
    /// `hv-spinlocks` (default [`tlfs::cpuid::HV_SPINLOCK_NEVER_NOTIFY`]).
    pub spinlocks: u32,
    /// `hv-vendor-id`, already cut to at most 12 bytes (default "Microsoft Hv").
    pub vendor_id: Vec<u8>,
    /// `hv-version-id-*`.
    pub version: HvVersion,
    /// `x-hv-max-vps` (int32, default -1 = 0xFFFFFFFF).
    pub max_vps: i32,
    /// `x-hv-synic-kvm-only`: no PostMessages/SignalEvents bits and no synic→vpindex rule.
    pub synic_kvm_only: bool,
    /// `hv-enforce-cpuid`.
    pub enforce_cpuid: bool,
    /// `hv-no-nonarch-coresharing`.
    pub no_nonarch_coresharing: OnOffAuto,
    /// `kvm=on|off` (default on): whether the KVM signature leaves are shown.
    pub kvm: bool,
    /// `enforce`: fail when a requested x86 feature is not available.
    pub enforce: bool,
    /// `check` (default on): warn when a requested x86 feature is not available.
    pub check: bool,
    /// `migratable` (default on): hide unmigratable host features (invtsc) from `host`/`max`.
    pub migratable: bool,
    /// `vendor=` (exactly 12 characters), replacing leaf 0 EBX/EDX/ECX.
    pub vendor: Option<String>,
    /// `tsc-frequency=` (or legacy `tsc-freq=`) in Hz.
    pub tsc_frequency: Option<u64>,
    /// Plain x86 (and KVM paravirtual) feature toggles in application order; a later toggle of the same bit wins.
    pub x86: Vec<X86Toggle>,
    /// Warnings QEMU would print (without the `warning: ` prefix).
    pub warnings: Vec<String>,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            model: String::from("host"),
            hv: FeatureSet::EMPTY,
            passthrough: false,
            spinlocks: tlfs::cpuid::HV_SPINLOCK_NEVER_NOTIFY,
            vendor_id: tlfs::cpuid::HV_VENDOR_MICROSOFT.to_vec(),
            version: HvVersion::default(),
            max_vps: -1,
            synic_kvm_only: false,
            enforce_cpuid: false,
            no_nonarch_coresharing: OnOffAuto::Off,
            kvm: true,
            enforce: false,
            check: true,
            migratable: true,
            vendor: None,
            tsc_frequency: None,
            x86: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// The CPU models accepted by [`CpuConfig::parse`], with a short description.
pub const MODELS: &[(&str, &str)] = &[
    ("host", "all features the host (KVM) supports"),
    ("max", "all features the host (KVM) supports"),
    ("base", "no optional features"),
    ("qemu64", "QEMU 64-bit virtual CPU feature set"),
    ("kvm64", "Common KVM processor feature set"),
    ("qemu32", "QEMU 32-bit virtual CPU feature set"),
    ("kvm32", "Common 32-bit KVM processor feature set"),
    (
        "Nehalem",
        "Intel Core i7 9xx (Nehalem Class Core i7) feature set",
    ),
    (
        "Westmere",
        "Westmere E56xx/L56xx/X56xx (Nehalem-C) feature set",
    ),
    (
        "SandyBridge",
        "Intel Xeon E312xx (Sandy Bridge) feature set",
    ),
    (
        "IvyBridge",
        "Intel Xeon E3-12xx v2 (Ivy Bridge) feature set",
    ),
    (
        "Haswell-noTSX",
        "Intel Core Processor (Haswell, no TSX) feature set",
    ),
    (
        "Broadwell-noTSX",
        "Intel Core Processor (Broadwell, no TSX) feature set",
    ),
    (
        "Skylake-Client-noTSX-IBRS",
        "Intel Core Processor (Skylake, IBRS, no TSX) feature set",
    ),
];

/// Whether `model` passes the host's feature set through (as opposed to a fixed feature table).
pub fn model_is_host(model: &str) -> bool {
    model == "host" || model == "max"
}

// ----------------------------------------------------------------------------------------------------------------
// x86 feature names
// ----------------------------------------------------------------------------------------------------------------

const L1: u32 = 0x1;
const L6: u32 = 0x6;
const L7: u32 = 0x7;
const LD: u32 = 0xD;
const E1: u32 = 0x8000_0001;
const E7: u32 = 0x8000_0007;
const E8: u32 = 0x8000_0008;
const KVMF: u32 = tlfs::cpuid::KVM_CPUID_FEATURES;

const fn fb(leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> X86FeatureBit {
    X86FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// QEMU's x86 feature names (the common ones) and their CPUID location.
pub const X86_FEATURES: &[(&str, X86FeatureBit)] = &[
    // CPUID.01H:EDX
    ("fpu", fb(L1, 0, Reg::Edx, 0)),
    ("vme", fb(L1, 0, Reg::Edx, 1)),
    ("de", fb(L1, 0, Reg::Edx, 2)),
    ("pse", fb(L1, 0, Reg::Edx, 3)),
    ("tsc", fb(L1, 0, Reg::Edx, 4)),
    ("msr", fb(L1, 0, Reg::Edx, 5)),
    ("pae", fb(L1, 0, Reg::Edx, 6)),
    ("mce", fb(L1, 0, Reg::Edx, 7)),
    ("cx8", fb(L1, 0, Reg::Edx, 8)),
    ("apic", fb(L1, 0, Reg::Edx, 9)),
    ("sep", fb(L1, 0, Reg::Edx, 11)),
    ("mtrr", fb(L1, 0, Reg::Edx, 12)),
    ("pge", fb(L1, 0, Reg::Edx, 13)),
    ("mca", fb(L1, 0, Reg::Edx, 14)),
    ("cmov", fb(L1, 0, Reg::Edx, 15)),
    ("pat", fb(L1, 0, Reg::Edx, 16)),
    ("pse36", fb(L1, 0, Reg::Edx, 17)),
    ("pn", fb(L1, 0, Reg::Edx, 18)),
    ("clflush", fb(L1, 0, Reg::Edx, 19)),
    ("ds", fb(L1, 0, Reg::Edx, 21)),
    ("acpi", fb(L1, 0, Reg::Edx, 22)),
    ("mmx", fb(L1, 0, Reg::Edx, 23)),
    ("fxsr", fb(L1, 0, Reg::Edx, 24)),
    ("sse", fb(L1, 0, Reg::Edx, 25)),
    ("sse2", fb(L1, 0, Reg::Edx, 26)),
    ("ss", fb(L1, 0, Reg::Edx, 27)),
    ("ht", fb(L1, 0, Reg::Edx, 28)),
    ("tm", fb(L1, 0, Reg::Edx, 29)),
    ("ia64", fb(L1, 0, Reg::Edx, 30)),
    ("pbe", fb(L1, 0, Reg::Edx, 31)),
    // CPUID.01H:ECX
    ("pni", fb(L1, 0, Reg::Ecx, 0)),
    ("pclmulqdq", fb(L1, 0, Reg::Ecx, 1)),
    ("dtes64", fb(L1, 0, Reg::Ecx, 2)),
    ("monitor", fb(L1, 0, Reg::Ecx, 3)),
    ("ds-cpl", fb(L1, 0, Reg::Ecx, 4)),
    ("vmx", fb(L1, 0, Reg::Ecx, 5)),
    ("smx", fb(L1, 0, Reg::Ecx, 6)),
    ("est", fb(L1, 0, Reg::Ecx, 7)),
    ("tm2", fb(L1, 0, Reg::Ecx, 8)),
    ("ssse3", fb(L1, 0, Reg::Ecx, 9)),
    ("cid", fb(L1, 0, Reg::Ecx, 10)),
    ("fma", fb(L1, 0, Reg::Ecx, 12)),
    ("cx16", fb(L1, 0, Reg::Ecx, 13)),
    ("xtpr", fb(L1, 0, Reg::Ecx, 14)),
    ("pdcm", fb(L1, 0, Reg::Ecx, 15)),
    ("pcid", fb(L1, 0, Reg::Ecx, 17)),
    ("dca", fb(L1, 0, Reg::Ecx, 18)),
    ("sse4.1", fb(L1, 0, Reg::Ecx, 19)),
    ("sse4.2", fb(L1, 0, Reg::Ecx, 20)),
    ("x2apic", fb(L1, 0, Reg::Ecx, 21)),
    ("movbe", fb(L1, 0, Reg::Ecx, 22)),
    ("popcnt", fb(L1, 0, Reg::Ecx, 23)),
    ("tsc-deadline", fb(L1, 0, Reg::Ecx, 24)),
    ("aes", fb(L1, 0, Reg::Ecx, 25)),
    ("xsave", fb(L1, 0, Reg::Ecx, 26)),
    ("avx", fb(L1, 0, Reg::Ecx, 28)),
    ("f16c", fb(L1, 0, Reg::Ecx, 29)),
    ("rdrand", fb(L1, 0, Reg::Ecx, 30)),
    ("hypervisor", fb(L1, 0, Reg::Ecx, 31)),
    // CPUID.06H:EAX
    ("arat", fb(L6, 0, Reg::Eax, 2)),
    // CPUID.07H.0:EBX
    ("fsgsbase", fb(L7, 0, Reg::Ebx, 0)),
    ("tsc-adjust", fb(L7, 0, Reg::Ebx, 1)),
    ("sgx", fb(L7, 0, Reg::Ebx, 2)),
    ("bmi1", fb(L7, 0, Reg::Ebx, 3)),
    ("hle", fb(L7, 0, Reg::Ebx, 4)),
    ("avx2", fb(L7, 0, Reg::Ebx, 5)),
    ("smep", fb(L7, 0, Reg::Ebx, 7)),
    ("bmi2", fb(L7, 0, Reg::Ebx, 8)),
    ("erms", fb(L7, 0, Reg::Ebx, 9)),
    ("invpcid", fb(L7, 0, Reg::Ebx, 10)),
    ("rtm", fb(L7, 0, Reg::Ebx, 11)),
    ("mpx", fb(L7, 0, Reg::Ebx, 14)),
    ("avx512f", fb(L7, 0, Reg::Ebx, 16)),
    ("avx512dq", fb(L7, 0, Reg::Ebx, 17)),
    ("rdseed", fb(L7, 0, Reg::Ebx, 18)),
    ("adx", fb(L7, 0, Reg::Ebx, 19)),
    ("smap", fb(L7, 0, Reg::Ebx, 20)),
    ("avx512ifma", fb(L7, 0, Reg::Ebx, 21)),
    ("clflushopt", fb(L7, 0, Reg::Ebx, 23)),
    ("clwb", fb(L7, 0, Reg::Ebx, 24)),
    ("intel-pt", fb(L7, 0, Reg::Ebx, 25)),
    ("avx512pf", fb(L7, 0, Reg::Ebx, 26)),
    ("avx512er", fb(L7, 0, Reg::Ebx, 27)),
    ("avx512cd", fb(L7, 0, Reg::Ebx, 28)),
    ("sha-ni", fb(L7, 0, Reg::Ebx, 29)),
    ("avx512bw", fb(L7, 0, Reg::Ebx, 30)),
    ("avx512vl", fb(L7, 0, Reg::Ebx, 31)),
    // CPUID.07H.0:ECX
    ("avx512vbmi", fb(L7, 0, Reg::Ecx, 1)),
    ("umip", fb(L7, 0, Reg::Ecx, 2)),
    ("pku", fb(L7, 0, Reg::Ecx, 3)),
    ("waitpkg", fb(L7, 0, Reg::Ecx, 5)),
    ("avx512vbmi2", fb(L7, 0, Reg::Ecx, 6)),
    ("gfni", fb(L7, 0, Reg::Ecx, 8)),
    ("vaes", fb(L7, 0, Reg::Ecx, 9)),
    ("vpclmulqdq", fb(L7, 0, Reg::Ecx, 10)),
    ("avx512vnni", fb(L7, 0, Reg::Ecx, 11)),
    ("avx512bitalg", fb(L7, 0, Reg::Ecx, 12)),
    ("avx512-vpopcntdq", fb(L7, 0, Reg::Ecx, 14)),
    ("la57", fb(L7, 0, Reg::Ecx, 16)),
    ("rdpid", fb(L7, 0, Reg::Ecx, 22)),
    ("cldemote", fb(L7, 0, Reg::Ecx, 25)),
    ("movdiri", fb(L7, 0, Reg::Ecx, 27)),
    ("movdir64b", fb(L7, 0, Reg::Ecx, 28)),
    // CPUID.07H.0:EDX
    ("avx512-4vnniw", fb(L7, 0, Reg::Edx, 2)),
    ("avx512-4fmaps", fb(L7, 0, Reg::Edx, 3)),
    ("fsrm", fb(L7, 0, Reg::Edx, 4)),
    ("md-clear", fb(L7, 0, Reg::Edx, 10)),
    ("serialize", fb(L7, 0, Reg::Edx, 14)),
    ("tsx-ldtrk", fb(L7, 0, Reg::Edx, 16)),
    ("spec-ctrl", fb(L7, 0, Reg::Edx, 26)),
    ("stibp", fb(L7, 0, Reg::Edx, 27)),
    ("arch-capabilities", fb(L7, 0, Reg::Edx, 29)),
    ("core-capability", fb(L7, 0, Reg::Edx, 30)),
    ("ssbd", fb(L7, 0, Reg::Edx, 31)),
    // CPUID.0DH.1:EAX
    ("xsaveopt", fb(LD, 1, Reg::Eax, 0)),
    ("xsavec", fb(LD, 1, Reg::Eax, 1)),
    ("xgetbv1", fb(LD, 1, Reg::Eax, 2)),
    ("xsaves", fb(LD, 1, Reg::Eax, 3)),
    // CPUID.80000001H:EDX
    ("syscall", fb(E1, 0, Reg::Edx, 11)),
    ("nx", fb(E1, 0, Reg::Edx, 20)),
    ("mmxext", fb(E1, 0, Reg::Edx, 22)),
    ("fxsr-opt", fb(E1, 0, Reg::Edx, 25)),
    ("pdpe1gb", fb(E1, 0, Reg::Edx, 26)),
    ("rdtscp", fb(E1, 0, Reg::Edx, 27)),
    ("lm", fb(E1, 0, Reg::Edx, 29)),
    ("3dnowext", fb(E1, 0, Reg::Edx, 30)),
    ("3dnow", fb(E1, 0, Reg::Edx, 31)),
    // CPUID.80000001H:ECX
    ("lahf-lm", fb(E1, 0, Reg::Ecx, 0)),
    ("cmp-legacy", fb(E1, 0, Reg::Ecx, 1)),
    ("svm", fb(E1, 0, Reg::Ecx, 2)),
    ("extapic", fb(E1, 0, Reg::Ecx, 3)),
    ("cr8legacy", fb(E1, 0, Reg::Ecx, 4)),
    ("abm", fb(E1, 0, Reg::Ecx, 5)),
    ("sse4a", fb(E1, 0, Reg::Ecx, 6)),
    ("misalignsse", fb(E1, 0, Reg::Ecx, 7)),
    ("3dnowprefetch", fb(E1, 0, Reg::Ecx, 8)),
    ("osvw", fb(E1, 0, Reg::Ecx, 9)),
    ("ibs", fb(E1, 0, Reg::Ecx, 10)),
    ("xop", fb(E1, 0, Reg::Ecx, 11)),
    ("skinit", fb(E1, 0, Reg::Ecx, 12)),
    ("wdt", fb(E1, 0, Reg::Ecx, 13)),
    ("lwp", fb(E1, 0, Reg::Ecx, 15)),
    ("fma4", fb(E1, 0, Reg::Ecx, 16)),
    ("tce", fb(E1, 0, Reg::Ecx, 17)),
    ("nodeid-msr", fb(E1, 0, Reg::Ecx, 19)),
    ("tbm", fb(E1, 0, Reg::Ecx, 21)),
    ("topoext", fb(E1, 0, Reg::Ecx, 22)),
    ("perfctr-core", fb(E1, 0, Reg::Ecx, 23)),
    ("perfctr-nb", fb(E1, 0, Reg::Ecx, 24)),
    // CPUID.80000007H:EDX
    ("invtsc", fb(E7, 0, Reg::Edx, 8)),
    // CPUID.80000008H:EBX
    ("clzero", fb(E8, 0, Reg::Ebx, 0)),
    ("xsaveerptr", fb(E8, 0, Reg::Ebx, 2)),
    ("wbnoinvd", fb(E8, 0, Reg::Ebx, 9)),
    ("ibpb", fb(E8, 0, Reg::Ebx, 12)),
    ("ibrs", fb(E8, 0, Reg::Ebx, 14)),
    ("amd-stibp", fb(E8, 0, Reg::Ebx, 15)),
    ("amd-ssbd", fb(E8, 0, Reg::Ebx, 24)),
    ("virt-ssbd", fb(E8, 0, Reg::Ebx, 25)),
    ("amd-no-ssb", fb(E8, 0, Reg::Ebx, 26)),
    // KVM paravirtual features (CPUID.40000001H:EAX, or 40000101H with Hyper-V on). QEMU names both bit 0 and
    // bit 3 "kvmclock"; the CPUID builder applies a "kvmclock" toggle to both.
    ("kvmclock", fb(KVMF, 0, Reg::Eax, 0)),
    ("kvm-nopiodelay", fb(KVMF, 0, Reg::Eax, 1)),
    ("kvm-mmu", fb(KVMF, 0, Reg::Eax, 2)),
    ("kvm-asyncpf", fb(KVMF, 0, Reg::Eax, 4)),
    ("kvm-steal-time", fb(KVMF, 0, Reg::Eax, 5)),
    ("kvm-pv-eoi", fb(KVMF, 0, Reg::Eax, 6)),
    ("kvm-pv-unhalt", fb(KVMF, 0, Reg::Eax, 7)),
    ("kvm-pv-tlb-flush", fb(KVMF, 0, Reg::Eax, 9)),
    ("kvm-asyncpf-vmexit", fb(KVMF, 0, Reg::Eax, 10)),
    ("kvm-pv-ipi", fb(KVMF, 0, Reg::Eax, 11)),
    ("kvm-poll-control", fb(KVMF, 0, Reg::Eax, 12)),
    ("kvm-pv-sched-yield", fb(KVMF, 0, Reg::Eax, 13)),
    ("kvm-asyncpf-int", fb(KVMF, 0, Reg::Eax, 14)),
    ("kvm-msi-ext-dest-id", fb(KVMF, 0, Reg::Eax, 15)),
    ("kvmclock-stable-bit", fb(KVMF, 0, Reg::Eax, 24)),
];

/// QEMU's alias property names for x86 features (after `_` → `-`).
const X86_ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("sse4-1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("xd", "nx"),
    ("ffxsr", "fxsr-opt"),
    ("i64", "lm"),
];

/// Looks up an x86 feature by its (dash-spelled) property name or alias. Returns the canonical name and bit.
pub fn lookup_x86_feature(name: &str) -> Option<(&'static str, X86FeatureBit)> {
    let canonical = X86_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, c)| *c);
    X86_FEATURES
        .iter()
        .find(|(n, _)| *n == canonical)
        .map(|(n, b)| (*n, *b))
}

/// QEMU's `feat2prop`: every `_` becomes `-`.
pub fn feat2prop(name: &str) -> String {
    name.replace('_', "-")
}

// ----------------------------------------------------------------------------------------------------------------
// Value parsing with QEMU's string-input-visitor rules
// ----------------------------------------------------------------------------------------------------------------

/// `qapi_bool_parse`.
fn parse_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ConfigError::msg(format!(
            "Parameter '{name}' expects 'on' or 'off'"
        ))),
    }
}

/// Splits C `strtoull`/`strtoll` base-0 syntax: optional leading whitespace, sign, `0x` hex / `0` octal /
/// decimal digits, nothing after. Returns (negative, magnitude) or None on any syntax error or overflow.
fn parse_c_integer(text: &str) -> Option<(bool, u64)> {
    let s = text.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(rest) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))
    {
        (16, rest)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok().map(|v| (neg, v))
}

/// `visit_type_uintN` through the string input visitor (`qemu_strtou64` accepts a sign and wraps negatives).
fn parse_uint(name: &str, value: &str, max: u64, type_name: &str) -> Result<u64, ConfigError> {
    let v = match parse_c_integer(value) {
        Some((false, v)) => v,
        Some((true, v)) => v.wrapping_neg(),
        None => {
            return Err(ConfigError::msg(format!(
                "Parameter '{name}' expects uint64"
            )))
        }
    };
    if v > max {
        return Err(ConfigError::msg(format!(
            "Parameter '{name}' expects {type_name}"
        )));
    }
    Ok(v)
}

/// `visit_type_intN` through the string input visitor.
fn parse_int(
    name: &str,
    value: &str,
    min: i64,
    max: i64,
    type_name: &str,
) -> Result<i64, ConfigError> {
    let expects_int64 = || ConfigError::msg(format!("Parameter '{name}' expects int64"));
    let v = match parse_c_integer(value) {
        Some((false, v)) => i64::try_from(v).map_err(|_| expects_int64())?,
        Some((true, v)) => {
            if v > i64::MAX as u64 + 1 {
                return Err(expects_int64());
            }
            (v as i128).wrapping_neg() as i64
        }
        None => return Err(expects_int64()),
    };
    if v < min || v > max {
        return Err(ConfigError::msg(format!(
            "Parameter '{name}' expects {type_name}"
        )));
    }
    Ok(v)
}

/// A frequency in Hz with an optional metric suffix (`k`/`K`, `M`, `G`, `T`, `P`, `E`), as QEMU's
/// `qemu_strtosz_metric` accepts for the legacy `tsc-freq=` (`2.5G` = 2500000000). Also accepted for
/// `tsc-frequency=` (QEMU itself takes only a plain integer there).
pub fn parse_frequency(value: &str) -> Option<u64> {
    let v = value.trim();
    let (num, mult): (&str, u64) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c {
                'b' | 'B' => 1,
                'k' | 'K' => 1_000,
                'm' | 'M' => 1_000_000,
                'g' | 'G' => 1_000_000_000,
                't' | 'T' => 1_000_000_000_000,
                'p' | 'P' => 1_000_000_000_000_000,
                'e' | 'E' => 1_000_000_000_000_000_000,
                _ => return None,
            };
            (&v[..i], m)
        }
        _ => (v, 1),
    };
    if num.is_empty() {
        return None;
    }
    if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        if mult != 1 || hex.is_empty() {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let (int_part, frac_part) = match num.split_once('.') {
        // A fraction needs a unit: "1.5" Hz is not a frequency QEMU accepts.
        Some(_) if mult == 1 => return None,
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().ok()?
    };
    let mut total = int.checked_mul(mult)?;
    // Fraction: exact decimal arithmetic, truncating below 1 Hz.
    let mut scale = mult;
    for d in frac_part.chars().take(19) {
        scale /= 10;
        let digit = u64::from(d.to_digit(10)?);
        total = total.checked_add(digit.checked_mul(scale)?)?;
    }
    if total > i64::MAX as u64 {
        return None;
    }
    Some(total)
}

// ----------------------------------------------------------------------------------------------------------------
// Model feature tables
// ----------------------------------------------------------------------------------------------------------------

const PPRO: &[&str] = &[
    "fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "mtrr", "pge", "mca",
    "cmov", "pat", "pse36", "clflush", "mmx", "fxsr", "sse", "sse2",
];
/// Features QEMU turns on for every model under KVM (`kvm_default_props`), minus the paravirtual ones, which are
/// handled on the KVM leaf.
const KVM_DEFAULTS: &[&str] = &["x2apic"];
const X64_BASE: &[&str] = &["pni", "cx16", "lm", "syscall", "nx"];
const NEHALEM: &[&str] = &["vme", "ssse3", "sse4.1", "sse4.2", "popcnt", "lahf-lm"];
const WESTMERE: &[&str] = &["aes", "pclmulqdq", "rdtscp"];
const SANDYBRIDGE: &[&str] = &["avx", "xsave", "tsc-deadline", "xsaveopt", "arat"];
const IVYBRIDGE: &[&str] = &["f16c", "rdrand", "fsgsbase", "smep", "erms"];
const HASWELL: &[&str] = &[
    "fma", "movbe", "pcid", "avx2", "bmi1", "bmi2", "invpcid", "abm",
];
const BROADWELL: &[&str] = &["adx", "rdseed", "smap", "3dnowprefetch"];
const SKYLAKE: &[&str] = &[
    "clflushopt",
    "xsavec",
    "xgetbv1",
    "pdpe1gb",
    "spec-ctrl",
    "mpx",
];

/// The feature names a fixed (non-host) model allows, or None for `host`/`max` (the host's full set) and for
/// unknown models.
pub fn model_features(model: &str) -> Option<Vec<&'static str>> {
    let mut v: Vec<&'static str> = Vec::new();
    let layers: &[&[&'static str]] = match model {
        "base" => &[],
        "qemu64" => &[PPRO, KVM_DEFAULTS, X64_BASE],
        "kvm64" => &[PPRO, KVM_DEFAULTS, X64_BASE, &["vme"]],
        "qemu32" => &[PPRO, KVM_DEFAULTS, &["pni"]],
        "kvm32" => &[PPRO, KVM_DEFAULTS, &["vme", "pni"]],
        "Nehalem" => &[PPRO, KVM_DEFAULTS, X64_BASE, NEHALEM],
        "Westmere" => &[PPRO, KVM_DEFAULTS, X64_BASE, NEHALEM, WESTMERE],
        "SandyBridge" => &[PPRO, KVM_DEFAULTS, X64_BASE, NEHALEM, WESTMERE, SANDYBRIDGE],
        "IvyBridge" => &[
            PPRO,
            KVM_DEFAULTS,
            X64_BASE,
            NEHALEM,
            WESTMERE,
            SANDYBRIDGE,
            IVYBRIDGE,
        ],
        "Haswell-noTSX" => &[
            PPRO,
            KVM_DEFAULTS,
            X64_BASE,
            NEHALEM,
            WESTMERE,
            SANDYBRIDGE,
            IVYBRIDGE,
            HASWELL,
        ],
        "Broadwell-noTSX" => &[
            PPRO,
            KVM_DEFAULTS,
            X64_BASE,
            NEHALEM,
            WESTMERE,
            SANDYBRIDGE,
            IVYBRIDGE,
            HASWELL,
            BROADWELL,
        ],
        "Skylake-Client-noTSX-IBRS" => &[
            PPRO,
            KVM_DEFAULTS,
            X64_BASE,
            NEHALEM,
            WESTMERE,
            SANDYBRIDGE,
            IVYBRIDGE,
            HASWELL,
            BROADWELL,
            SKYLAKE,
        ],
        _ => return None,
    };
    for layer in layers {
        v.extend_from_slice(layer);
    }
    Some(v)
}

fn known_model(model: &str) -> bool {
    MODELS.iter().any(|(m, _)| *m == model)
}

// ----------------------------------------------------------------------------------------------------------------
// Parsing
// ----------------------------------------------------------------------------------------------------------------

impl CpuConfig {
    /// Parses a QEMU `-cpu` option (`MODEL[,feature...]`). Never panics.
    pub fn parse(spec: &str) -> Result<CpuConfig, ConfigError> {
        let (model, rest) = match spec.split_once(',') {
            Some((m, r)) => (m, r),
            None => (spec, ""),
        };
        if spec.is_empty() {
            return Err(ConfigError::msg("-cpu option cannot be empty"));
        }
        if !known_model(model) {
            return Err(ConfigError::msg(format!(
                "unable to find CPU model '{model}'"
            )));
        }
        let mut cfg = CpuConfig {
            model: model.to_string(),
            ..CpuConfig::default()
        };
        let mut plus: Vec<String> = Vec::new();
        let mut minus: Vec<String> = Vec::new();
        let mut ambiguous = false;

        for item in rest.split(',').filter(|s| !s.is_empty()) {
            if let Some(name) = item.strip_prefix('+') {
                plus.push(feat2prop(name));
                continue;
            }
            if let Some(name) = item.strip_prefix('-') {
                minus.push(feat2prop(name));
                continue;
            }
            let (raw_name, value) = match item.split_once('=') {
                Some((n, v)) => (n, v),
                None => (item, "on"),
            };
            let name = feat2prop(raw_name);
            if plus.contains(&name) {
                cfg.warnings.push(format!(
                    "Ambiguous CPU model string. Don't mix both \"+{name}\" and \"{name}={value}\""
                ));
                ambiguous = true;
            }
            if minus.contains(&name) {
                cfg.warnings.push(format!(
                    "Ambiguous CPU model string. Don't mix both \"-{name}\" and \"{name}={value}\""
                ));
                ambiguous = true;
            }
            if name == "tsc-freq" {
                // QEMU's special case: a metric size, rewritten to tsc-frequency.
                match parse_frequency(value) {
                    Some(hz) => cfg.tsc_frequency = Some(hz),
                    None => return Err(ConfigError::msg(format!("bad numerical value {value}"))),
                }
                continue;
            }
            cfg.set_property(&name, value)?;
        }
        if ambiguous {
            cfg.warnings
                .push("Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions".into());
        }
        // Newer QEMU registers "+name" as "name=on" and "-name" as "name=off" after every other item, all "+"
        // first, then all "-".
        for name in &plus {
            cfg.set_property(name, "on")?;
        }
        for name in &minus {
            cfg.set_property(name, "off")?;
        }
        // x86_cpu_hyperv_realize: cut the vendor id to 12 bytes, with QEMU's warning.
        if cfg.vendor_id.len() > 12 {
            cfg.warnings.push(WARN_VENDOR_ID_TRUNCATED.to_string());
            cfg.vendor_id.truncate(12);
        }
        Ok(cfg)
    }

    fn not_found(&self, name: &str) -> ConfigError {
        ConfigError::msg(format!(
            "Property '{}-x86_64-cpu.{name}' not found",
            self.model
        ))
    }

    fn set_property(&mut self, name: &str, value: &str) -> Result<(), ConfigError> {
        if let Some(f) = Feature::from_name(name) {
            if parse_bool(name, value)? {
                self.hv.insert(f);
            } else {
                self.hv.remove(f);
            }
            return Ok(());
        }
        match name {
            "hv-passthrough" => self.passthrough = parse_bool(name, value)?,
            "hv-enforce-cpuid" => self.enforce_cpuid = parse_bool(name, value)?,
            "x-hv-synic-kvm-only" => self.synic_kvm_only = parse_bool(name, value)?,
            "kvm" => self.kvm = parse_bool(name, value)?,
            "enforce" => self.enforce = parse_bool(name, value)?,
            "check" => self.check = parse_bool(name, value)?,
            "migratable" => self.migratable = parse_bool(name, value)?,
            "hv-spinlocks" => {
                let t = value;
                self.spinlocks = parse_uint(name, t, u64::from(u32::MAX), "uint32")? as u32;
            }
            // Kept whole here and cut to 12 bytes at the end, as QEMU does at realize time.
            "hv-vendor-id" => self.vendor_id = value.as_bytes().to_vec(),
            "hv-no-nonarch-coresharing" => {
                let t = value;
                self.no_nonarch_coresharing = match t {
                    "on" => OnOffAuto::On,
                    "off" => OnOffAuto::Off,
                    "auto" => OnOffAuto::Auto,
                    _ => {
                        return Err(ConfigError::msg(format!(
                            "Parameter '{name}' does not accept value '{t}'"
                        )));
                    }
                };
            }
            "hv-version-id-build" => {
                let t = value;
                self.version.build = parse_uint(name, t, u64::from(u32::MAX), "uint32")? as u32;
            }
            "hv-version-id-major" => {
                let t = value;
                self.version.major = parse_uint(name, t, u64::from(u16::MAX), "uint16")? as u16;
            }
            "hv-version-id-minor" => {
                let t = value;
                self.version.minor = parse_uint(name, t, u64::from(u16::MAX), "uint16")? as u16;
            }
            "hv-version-id-spack" => {
                let t = value;
                self.version.spack = parse_uint(name, t, u64::from(u32::MAX), "uint32")? as u32;
            }
            "hv-version-id-sbranch" => {
                let t = value;
                self.version.sbranch = parse_uint(name, t, u64::from(u8::MAX), "uint8")? as u8;
            }
            "hv-version-id-snumber" => {
                let t = value;
                self.version.snumber = parse_uint(name, t, u64::from(u32::MAX), "uint32")? as u32;
            }
            "x-hv-max-vps" => {
                let t = value;
                self.max_vps =
                    parse_int(name, t, i64::from(i32::MIN), i64::from(i32::MAX), "int32")? as i32;
            }
            "vendor" => {
                let t = value;
                if t.len() != 12 {
                    return Err(ConfigError::msg(format!(
                        "Property 'vendor' doesn't take value '{t}'"
                    )));
                }
                self.vendor = Some(t.to_string());
            }
            "tsc-frequency" => {
                let t = value;
                // QEMU: an int64; a negative value is "doesn't take value". Metric suffixes are accepted too.
                let hz = match parse_c_integer(t) {
                    Some((true, v)) if v != 0 => {
                        return Err(ConfigError::msg(format!(
                            "Property 'tsc-frequency' doesn't take value '-{v}'"
                        )));
                    }
                    Some((_, v)) if v <= i64::MAX as u64 => v,
                    Some(_) => {
                        return Err(ConfigError::msg(format!(
                            "Parameter '{name}' expects int64"
                        )))
                    }
                    None => parse_frequency(t).ok_or_else(|| {
                        ConfigError::msg(format!("Parameter '{name}' expects int64"))
                    })?,
                };
                self.tsc_frequency = Some(hz);
            }
            _ => {
                let Some((canonical, bit)) = lookup_x86_feature(name) else {
                    return Err(self.not_found(name));
                };
                let on = parse_bool(name, value)?;
                self.x86.push(X86Toggle {
                    name: canonical,
                    bit,
                    on,
                });
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------------------
    // Semantics
    // ------------------------------------------------------------------------------------------------------------

    /// QEMU's `hyperv_enabled()` (reference §2): a real hv feature flag, `hv-passthrough`, or a non-default
    /// `hv-spinlocks`. `hv-vendor-id`, `hv-version-id-*`, `hv-enforce-cpuid`, `hv-no-nonarch-coresharing` and
    /// `x-hv-max-vps` alone do not switch Hyper-V identification on. (QEMU also requires `KVM_CAP_HYPERV`; the
    /// userspace implementation does not depend on it.)
    pub fn hyperv_enabled(&self) -> bool {
        self.spinlocks != tlfs::cpuid::HV_SPINLOCK_NEVER_NOTIFY
            || !self.hv.is_empty()
            || self.passthrough
    }

    /// QEMU's feature expansion and checks (`kvm_hyperv_expand_features`), giving the features the guest gets.
    ///
    /// - With `hv-passthrough`, every feature the backend supports is OR-ed in (never hv-syndbg), explicit
    ///   `hv-foo=off` is not honoured, and the dependency checks are skipped.
    /// - Otherwise the features are walked in bit order; for each one that is on, the backend must support it
    ///   (`Hyper-V %s is not supported by kernel`) and its dependencies must be on, lowest bit first
    ///   (`Hyper-V %s requires Hyper-V %s`). The first failure is returned.
    /// - Then the synic→vpindex rule runs (also with passthrough; skipped with `x-hv-synic-kvm-only`).
    ///
    /// Deliberate deviation: with passthrough, QEMU leaves an explicitly requested feature that the host lacks
    /// set without a check. enlighten cannot advertise what its backend does not implement, so that case is
    /// reported with the "not supported" message instead.
    pub fn effective_features(&self, backend: &Backend) -> Result<FeatureSet, ConfigError> {
        let supported = backend.supported();
        let mut features = self.hv;
        if self.passthrough {
            for f in supported.iter() {
                if !f.skip_passthrough() {
                    features.insert(f);
                }
            }
            if let Some(f) = features.iter().find(|f| !supported.contains(*f)) {
                return Err(ConfigError::msg(format!(
                    "Hyper-V {} is not supported by kernel",
                    f.desc()
                )));
            }
        } else {
            for f in features.iter() {
                if !supported.contains(f) {
                    return Err(ConfigError::msg(format!(
                        "Hyper-V {} is not supported by kernel",
                        f.desc()
                    )));
                }
                if let Some(dep) = f.deps().iter().find(|d| !features.contains(*d)) {
                    return Err(ConfigError::msg(format!(
                        "Hyper-V {} requires Hyper-V {}",
                        f.desc(),
                        dep.desc()
                    )));
                }
            }
        }
        if features.contains(Feature::Synic)
            && !self.synic_kvm_only
            && !features.contains(Feature::VpIndex)
        {
            return Err(ConfigError::msg(format!(
                "Hyper-V {} requires Hyper-V {}",
                Feature::Synic.desc(),
                Feature::VpIndex.desc()
            )));
        }
        Ok(features)
    }

    /// Runs QEMU's backend-support and dependency checks (see [`CpuConfig::effective_features`]).
    pub fn validate(&self, backend: &Backend) -> Result<(), ConfigError> {
        self.effective_features(backend).map(|_| ())
    }

    /// Whether 4.EAX[18] (NoNonArchitecturalCoreSharing) is set: `on` always, `auto` when the host's SMT is off.
    pub fn no_nonarch_coresharing_bit(&self, host: &HostInfo) -> bool {
        match self.no_nonarch_coresharing {
            OnOffAuto::On => true,
            OnOffAuto::Off => false,
            OnOffAuto::Auto => !host.smt_active,
        }
    }

    /// The final state of an x86 toggle for `name` (canonical name), if the `-cpu` string set it.
    pub fn x86_toggle(&self, name: &str) -> Option<bool> {
        self.x86.iter().rev().find(|t| t.name == name).map(|t| t.on)
    }

    /// QEMU's migration blockers for this configuration, with QEMU's exact texts (reference §8.1):
    /// hv-passthrough; hv-no-nonarch-coresharing=auto (only when Hyper-V is enabled, as QEMU adds it in
    /// `hyperv_init_vcpu`); invtsc without `tsc-frequency`. The invtsc check here sees the `-cpu` string only
    /// (explicit `invtsc`, or `migratable=off` on `host`/`max`, which exposes the host's invtsc);
    /// [`crate::cpuid::build_report`] gives the answer for the final CPUID.
    pub fn migration_blockers(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.hyperv_enabled() {
            if self.passthrough {
                v.push(blockers::PASSTHROUGH);
            }
            if self.no_nonarch_coresharing == OnOffAuto::Auto {
                v.push(blockers::NO_NONARCH_CORESHARING_AUTO);
            }
        }
        let invtsc = match self.x86_toggle("invtsc") {
            Some(on) => on,
            None => model_is_host(&self.model) && !self.migratable,
        };
        if invtsc && self.tsc_frequency.is_none() {
            v.push(blockers::INVTSC);
        }
        v
    }
}

//! Enlightenment configuration: the `-cpu` option, parsed exactly as QEMU parses it.
//!
//! CONTRACT (other crates build against these names; keep them stable):
//! - [`CpuConfig::parse`] turns a `-cpu` string into a [`CpuConfig`] or a [`ConfigError`] whose `Display` is
//!   QEMU's message text (without the `qemu-system-x86_64: ` prefix).
//! - [`CpuConfig::validate`] runs QEMU's dependency and backend-support checks against a [`Backend`].
//! - [`Feature`] lists the hv features in QEMU's internal bit order; [`FeatureSet`] is a set of them.

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

/// A set of [`Feature`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet(pub u32);

impl FeatureSet {
    pub const EMPTY: FeatureSet = FeatureSet(0);
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

/// The parsed `-cpu` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuConfig {
    /// The CPU model name (`host`, `max`, `kvm64`, `qemu64`, ...).
    pub model: String,
    // H1 fills the rest: hv features, spinlocks, vendor id, version id, passthrough, enforce-cpuid,
    // no-nonarch-coresharing, kvm=on|off, enforce/check, x86 toggles, vendor=, tsc-frequency=...
}

/// A configuration error. `Display` is QEMU's exact text.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Message(String),
}

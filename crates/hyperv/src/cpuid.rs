//! The CPUID builder: the Hyper-V leaves (0x40000000..), the relocated KVM leaves and the base leaves.
//!
//! CONTRACT (the VMM builds against these names; keep them stable):
//! - [`CpuidEntry`] is a KVM-free mirror of `kvm_cpuid_entry2`.
//! - [`build`] returns every leaf the guest sees, given the parsed config and the host's supported leaves
//!   (from `KVM_GET_SUPPORTED_CPUID`, converted by the VMM), sorted by (function, index).

/// One CPUID leaf/subleaf, independent of KVM's types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
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

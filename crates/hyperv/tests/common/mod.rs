//! Helpers shared by the CPUID test files for writing synthetic host tables.

use hyperv::cpuid::CpuidEntry;

/// A leaf without a significant index.
pub fn e(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    leaf(function, index, 0, [eax, ebx, ecx, edx])
}

/// A leaf whose index is significant (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
#[allow(dead_code)] // not every test file has indexed leaves
pub fn ei(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
    leaf(function, index, 1, [eax, ebx, ecx, edx])
}

fn leaf(function: u32, index: u32, flags: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
    }
}

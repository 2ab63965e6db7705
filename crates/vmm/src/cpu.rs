//! CPUID for the VMM: the fallback table used when no `-cpu` table is given, and the per-vCPU patches
//! (APIC IDs in leaves 0x1, 0xB and 0x1F, the features the userspace APIC provides, KVM PV features that need
//! the in-kernel APIC masked).

use hyperv::cpuid::CpuidEntry;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID.1:ECX bit 21: x2APIC.
pub const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 24: TSC-deadline timer.
pub const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31: hypervisor present.
pub const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 9: on-chip APIC.
pub const CPUID_1_EDX_APIC: u32 = 1 << 9;
/// CPUID.1:EDX bit 28: HTT (EBX[23:16] is valid).
pub const CPUID_1_EDX_HTT: u32 = 1 << 28;

/// KVM PV features that need KVM's in-kernel local APIC (PV_EOI, PV_UNHALT, PV_SEND_IPI, ASYNC_PF_INT), and
/// PV_SCHED_YIELD / POLL_CONTROL which make no sense without it either.
pub const KVM_PV_FEATURES_NEEDING_KERNEL_APIC: u32 =
    (1 << 6) | (1 << 7) | (1 << 11) | (1 << 13) | (1 << 14) | (1 << 12);

/// Number of bits needed to hold `n - 1` (the x2APIC ID shift for `n` logical processors).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fixes up a full CPUID table for what this VMM provides, independent of the vCPU: the APIC, x2APIC and
/// TSC-deadline bits (the userspace APIC implements them) and no KVM PV features that need KVM's APIC.
pub fn adjust_for_userspace_apic(entries: &mut [CpuidEntry], x2apic: bool) {
    // KVM's PV-feature leaf is base + 1 for every base whose signature is "KVMKVMKVM" (0x40000000, or
    // 0x40000100 when the Hyper-V leaves sit at the bottom of the range).
    let kvm_feature_leaves: Vec<u32> = entries
        .iter()
        .filter(|e| is_kvm_signature(e))
        .map(|e| e.function + 1)
        .collect();
    for e in entries.iter_mut() {
        if e.function == 0x1 {
            e.edx |= CPUID_1_EDX_APIC;
            e.ecx |= CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_HYPERVISOR;
            if x2apic {
                e.ecx |= CPUID_1_ECX_X2APIC;
            } else {
                e.ecx &= !CPUID_1_ECX_X2APIC;
            }
        } else if kvm_feature_leaves.contains(&e.function) {
            e.eax &= !KVM_PV_FEATURES_NEEDING_KERNEL_APIC;
        }
    }
}

/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX of a hypervisor base leaf.
fn is_kvm_signature(e: &CpuidEntry) -> bool {
    e.function & 0xFFFF_00FF == 0x4000_0000
        && e.ebx == u32::from_le_bytes(*b"KVMK")
        && e.ecx == u32::from_le_bytes(*b"VMKV")
        && e.edx == u32::from_le_bytes([b'M', 0, 0, 0])
}

/// The per-vCPU CPUID table: `entries` with the APIC ID of vCPU `index` (of `count`) in leaves 0x1, 0xB and
/// 0x1F, and the logical-processor count in 0x1.EBX. Hyper-V leaves (0x40000000..) are left alone except for
/// KVM's PV-feature masking done by [`adjust_for_userspace_apic`].
pub fn for_vcpu(entries: &[CpuidEntry], index: u32, count: u32) -> Vec<CpuidEntry> {
    let apic_id = index;
    let shift = id_bits(count.max(1));
    entries
        .iter()
        .map(|e| {
            let mut e = *e;
            match e.function {
                0x1 => {
                    e.ebx = (e.ebx & 0x0000_FFFF) | (apic_id << 24) | (count.clamp(1, 255) << 16);
                    if count > 1 {
                        e.edx |= CPUID_1_EDX_HTT;
                    }
                }
                0xB | 0x1F => {
                    // Level 0: SMT (one thread per core); level 1: cores (all vCPUs in one package).
                    match e.index {
                        0 => {
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = 1 << 8;
                        }
                        1 => {
                            e.eax = shift;
                            e.ebx = count;
                            e.ecx = 1 | (2 << 8);
                        }
                        n => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = n & 0xFF;
                        }
                    }
                    e.edx = apic_id;
                }
                _ => {}
            }
            e
        })
        .collect()
}

/// Makes sure leaves 0xB (two subleaves plus the terminating one) exist when the maximum basic leaf covers
/// them, so that [`for_vcpu`] can fill them.
pub fn ensure_topology_leaves(entries: &mut Vec<CpuidEntry>) {
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    if max_basic < 0xB {
        return;
    }
    for sub in 0..3 {
        if !entries.iter().any(|e| e.function == 0xB && e.index == sub) {
            entries.push(CpuidEntry {
                function: 0xB,
                index: sub,
                flags: 1,
                ..Default::default()
            });
        }
    }
    entries.sort_by_key(|e| (e.function, e.index));
}

/// Converts entries to KVM's `CpuId`.
pub fn to_kvm(entries: &[CpuidEntry]) -> Result<CpuId, String> {
    let kvm_entries: Vec<kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&kvm_entries).map_err(|e| format!("CPUID table too large: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<CpuidEntry> {
        let mut t = vec![
            CpuidEntry {
                function: 0,
                eax: 0xD,
                ..Default::default()
            },
            CpuidEntry {
                function: 1,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0000,
                eax: 0x4000_0001,
                ebx: u32::from_le_bytes(*b"KVMK"),
                ecx: u32::from_le_bytes(*b"VMKV"),
                edx: u32::from_le_bytes([b'M', 0, 0, 0]),
                ..Default::default()
            },
            CpuidEntry {
                function: 0x4000_0001,
                eax: 0xFFFF_FFFF,
                ..Default::default()
            },
        ];
        ensure_topology_leaves(&mut t);
        adjust_for_userspace_apic(&mut t, true);
        t
    }

    #[test]
    fn apic_ids_per_vcpu() {
        let t = table();
        let cases: &[(u32, u32, u32)] = &[(0, 1, 0), (1, 2, 1), (3, 4, 2), (5, 8, 3), (0, 255, 8)];
        for &(index, count, shift) in cases {
            let v = for_vcpu(&t, index, count);
            let l1 = v.iter().find(|e| e.function == 1).unwrap();
            assert_eq!(l1.ebx >> 24, index, "leaf 1 APIC ID");
            assert_eq!((l1.ebx >> 16) & 0xFF, count);
            assert_eq!(l1.ebx & 0xFFFF, 0x0800, "low bits kept");
            assert_eq!(l1.edx & CPUID_1_EDX_HTT != 0, count > 1);
            let b: Vec<&CpuidEntry> = v.iter().filter(|e| e.function == 0xB).collect();
            assert_eq!(b.len(), 3);
            assert!(b.iter().all(|e| e.edx == index), "leaf 0xB x2APIC ID");
            assert_eq!(b[1].eax, shift);
            assert_eq!(b[1].ebx, count);
            assert_eq!((b[2].ecx >> 8) & 0xFF, 0, "terminating subleaf");
        }
    }

    #[test]
    fn userspace_apic_features() {
        let t = table();
        let l1 = t.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & CPUID_1_ECX_X2APIC, 0);
        assert_ne!(l1.ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & CPUID_1_EDX_APIC, 0);
        let kvm = t.iter().find(|e| e.function == 0x4000_0001).unwrap();
        assert_eq!(kvm.eax & KVM_PV_FEATURES_NEEDING_KERNEL_APIC, 0);
        assert_ne!(kvm.eax & 1, 0, "other KVM features stay");
    }
}

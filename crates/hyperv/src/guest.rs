//! The engine's configuration: the guest's Hyper-V CPUID view, `hv-enforce-cpuid`, SynIC activation and the VP
//! index of each vCPU.
//!
//! The engine gates MSRs and hypercalls exactly as KVM does: on the CPUID bits the guest was given. The VMM
//! therefore builds [`EngineConfig`] from the very CPUID entries it installs ([`HvCpuid::from_entries`]).

use crate::cpuid::CpuidEntry;
use serde::{Deserialize, Serialize};
use tlfs::cpuid as leaf;

/// Bits of 0x40000003 EAX the engine looks at.
pub mod eax3 {
    pub const VP_RUNTIME: u32 = 1 << 0;
    pub const TIME_REF_COUNT: u32 = 1 << 1;
    pub const SYNIC: u32 = 1 << 2;
    pub const SYNTIMERS: u32 = 1 << 3;
    pub const APIC_ACCESS: u32 = 1 << 4;
    pub const HYPERCALL: u32 = 1 << 5;
    pub const VP_INDEX: u32 = 1 << 6;
    pub const RESET: u32 = 1 << 7;
    pub const REFERENCE_TSC: u32 = 1 << 9;
    pub const FREQUENCY_MSRS: u32 = 1 << 11;
    pub const REENLIGHTENMENT: u32 = 1 << 13;
    pub const TSC_INVARIANT: u32 = 1 << 15;
}
/// Bits of 0x40000003 EBX the engine looks at.
pub mod ebx3 {
    pub const POST_MESSAGES: u32 = 1 << 4;
    pub const SIGNAL_EVENTS: u32 = 1 << 5;
    pub const DEBUGGING: u32 = 1 << 11;
    pub const EXTENDED_HYPERCALLS: u32 = 1 << 20;
}
/// Bits of 0x40000003 EDX the engine looks at.
pub mod edx3 {
    pub const XMM_HYPERCALL_INPUT: u32 = 1 << 4;
    pub const CRASH_MSRS: u32 = 1 << 10;
    pub const DEBUG_MSRS: u32 = 1 << 11;
    pub const STIMER_DIRECT: u32 = 1 << 19;
}
/// Bits of 0x40000004 EAX the engine looks at.
pub mod eax4 {
    pub const REMOTE_TLB_FLUSH: u32 = 1 << 2;
    pub const CLUSTER_IPI: u32 = 1 << 10;
    pub const EX_PROCESSOR_MASKS: u32 = 1 << 11;
}
/// Bit of 0x40000082 EAX: kernel debugging allowed (SynDbg enabled).
pub const SYNDBG_ALLOW_KERNEL_DEBUGGING: u32 = 1 << 1;

/// The Hyper-V CPUID leaves as the guest sees them (only the registers the engine needs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HvCpuid {
    /// 0x40000001 EAX: `0x31237648` ("Hv#1") when Hyper-V identification is on.
    pub interface_eax: u32,
    /// 0x40000003 EAX (privileges: MSR access).
    pub features_eax: u32,
    /// 0x40000003 EBX (privileges: hypercalls).
    pub features_ebx: u32,
    /// 0x40000003 EDX (feature identification).
    pub features_edx: u32,
    /// 0x40000004 EAX (recommendations).
    pub recommendations_eax: u32,
    /// 0x40000004 EBX (spinlock retry count; 0xFFFFFFFF = never notify).
    pub spinlock_retries: u32,
    /// 0x40000082 EAX (SynDbg capabilities).
    pub syndbg_eax: u32,
}

impl HvCpuid {
    /// Everything on: Hyper-V identification, every MSR and hypercall bit the engine knows, spinlock retries
    /// 0xFFF. Useful for tests and for embedders that do not gate.
    pub const ALL: HvCpuid = HvCpuid {
        interface_eax: leaf::HV_INTERFACE_SIGNATURE,
        features_eax: 0xAAFF,
        features_ebx: ebx3::POST_MESSAGES
            | ebx3::SIGNAL_EVENTS
            | ebx3::DEBUGGING
            | ebx3::EXTENDED_HYPERCALLS,
        features_edx: edx3::XMM_HYPERCALL_INPUT | edx3::CRASH_MSRS | edx3::STIMER_DIRECT | (1 << 8),
        recommendations_eax: eax4::REMOTE_TLB_FLUSH | eax4::CLUSTER_IPI | eax4::EX_PROCESSOR_MASKS,
        spinlock_retries: 0xFFF,
        syndbg_eax: 0,
    };

    /// Extracts the Hyper-V view from the CPUID entries the guest is given. Missing leaves read as zero, so a
    /// guest without the Hyper-V leaves gets a disabled engine (every synthetic MSR #GPs).
    pub fn from_entries(entries: &[CpuidEntry]) -> HvCpuid {
        let find = |function: u32| {
            entries
                .iter()
                .find(|e| e.function == function && e.index == 0)
        };
        let mut v = HvCpuid::default();
        if let Some(e) = find(leaf::LEAF_INTERFACE) {
            v.interface_eax = e.eax;
        }
        if v.interface_eax != leaf::HV_INTERFACE_SIGNATURE {
            // 0x40000001 is then the KVM features leaf: nothing else applies.
            return HvCpuid {
                interface_eax: v.interface_eax,
                ..HvCpuid::default()
            };
        }
        if let Some(e) = find(leaf::LEAF_FEATURES) {
            v.features_eax = e.eax;
            v.features_ebx = e.ebx;
            v.features_edx = e.edx;
        }
        if let Some(e) = find(leaf::LEAF_ENLIGHTENMENT_INFO) {
            v.recommendations_eax = e.eax;
            v.spinlock_retries = e.ebx;
        }
        if let Some(e) = find(leaf::LEAF_SYNDBG_PLATFORM_CAPABILITIES) {
            v.syndbg_eax = e.eax;
        }
        v
    }

    /// Hyper-V identification is on: 0x40000001.EAX == "Hv#1".
    pub fn enabled(&self) -> bool {
        self.interface_eax == leaf::HV_INTERFACE_SIGNATURE
    }
}

/// Everything the engine is told at creation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// The guest's Hyper-V CPUID view.
    pub cpuid: HvCpuid,
    /// `hv-enforce-cpuid`: gate every MSR and hypercall on its CPUID bit (KVM's ENFORCE_CPUID table).
    pub enforce_cpuid: bool,
    /// SynIC activated (QEMU activates it for `hv-synic`). Without it the SynIC MSRs, writes to the stimer MSRs,
    /// PostMessage and SignalEvent fail as in KVM.
    pub synic: bool,
    /// The Hyper-V VP index of each vCPU, indexed by [`crate::VpId`]; QEMU uses the vCPU index, which equals the
    /// APIC ID on this VMM. The length is the vCPU count.
    pub vp_indexes: Vec<u32>,
    /// APIC_FREQUENCY in Hz (KVM: 1 GHz).
    pub apic_frequency_hz: u64,
}

impl EngineConfig {
    /// A configuration for `vp_count` vCPUs with VP index = vCPU index, SynIC activated exactly when the guest
    /// CPUID advertises it (3.EAX bit 2, as QEMU does for hv-synic), and the default APIC frequency.
    pub fn new(cpuid: HvCpuid, enforce_cpuid: bool, vp_count: u32) -> EngineConfig {
        EngineConfig {
            cpuid,
            enforce_cpuid,
            synic: cpuid.features_eax & eax3::SYNIC != 0,
            vp_indexes: (0..vp_count).collect(),
            apic_frequency_hz: tlfs::msr::DEFAULT_APIC_FREQUENCY_HZ,
        }
    }
}

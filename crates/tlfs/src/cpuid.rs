//! CPUID leaves and bits of the Hyper-V interface (0x40000000 range), the synthetic-debugger leaves and the KVM
//! paravirtual leaves.
//!
//! Register layouts are [`bitfield_struct`] types over `u32`; each one converts with `into_bits()` /
//! `from_bits()` (or `u32::from` / `From<u32>`), and every field also has `<NAME>_OFFSET` / `<NAME>_BITS`
//! constants. Field names follow the TLFS; the doc comment of each field gives QEMU's `hyperv-proto.h` name and
//! the `-cpu` flag that sets it, where one does.
//!
//! Bit numbers were cross-checked against `shared/reference/hyperv-cpuid-and-flags.md` §5 and §6.

use bitfield_struct::bitfield;

// ---------------------------------------------------------------------------------------------------------------
// Leaf numbers
// ---------------------------------------------------------------------------------------------------------------

/// Maximum hypervisor leaf (EAX) and vendor string (EBX, ECX, EDX).
pub const LEAF_VENDOR_AND_MAX_FUNCTIONS: u32 = 0x4000_0000;
/// Interface signature ("Hv#1" in EAX).
pub const LEAF_INTERFACE: u32 = 0x4000_0001;
/// Hypervisor version: build, major/minor, service pack, service branch/number.
pub const LEAF_VERSION: u32 = 0x4000_0002;
/// Features: partition privileges (EAX low, EBX high), power management (ECX), misc features (EDX).
pub const LEAF_FEATURES: u32 = 0x4000_0003;
/// Enlightenment recommendations (EAX) and the spinlock retry count (EBX).
pub const LEAF_ENLIGHTENMENT_INFO: u32 = 0x4000_0004;
/// Implementation limits: max virtual processors, max logical processors, interrupt vectors.
pub const LEAF_IMPLEMENT_LIMITS: u32 = 0x4000_0005;
/// Hardware features in use by the hypervisor (QEMU leaves it zero).
pub const LEAF_HARDWARE_FEATURES: u32 = 0x4000_0006;
/// CPU management features (root partition only; zero for guests).
pub const LEAF_CPU_MANAGEMENT_FEATURES: u32 = 0x4000_0007;
/// Shared virtual memory features (zero for guests).
pub const LEAF_SVM_FEATURES: u32 = 0x4000_0008;
/// Nested hypervisor feature identification (zero in QEMU).
pub const LEAF_NESTED_HYPERVISOR_FEATURES: u32 = 0x4000_0009;
/// Nested virtualization features (eVMCS version range, nested flush, enlightened MSR bitmap).
pub const LEAF_NESTED_FEATURES: u32 = 0x4000_000A;

/// Synthetic debugger: maximum leaf (EAX) and vendor "Microsoft VS" (EBX..EDX).
pub const LEAF_SYNDBG_VENDOR_AND_MAX_FUNCTIONS: u32 = 0x4000_0080;
/// Synthetic debugger interface signature ("VS#1" in EAX).
pub const LEAF_SYNDBG_INTERFACE: u32 = 0x4000_0081;
/// Synthetic debugger platform capabilities ([`SyndbgCapabilitiesEax`] in EAX).
pub const LEAF_SYNDBG_PLATFORM_CAPABILITIES: u32 = 0x4000_0082;

/// KVM signature leaf when no other hypervisor interface occupies 0x40000000.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirtual features (EAX: `KVM_FEATURE_*` bit numbers, EDX: `KVM_HINTS_*` bit numbers).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM signature leaf when Hyper-V identification occupies 0x40000000 (QEMU `KVM_CPUID_SIGNATURE_NEXT`).
pub const KVM_CPUID_SIGNATURE_NEXT: u32 = 0x4000_0100;
/// KVM features leaf next to [`KVM_CPUID_SIGNATURE_NEXT`].
pub const KVM_CPUID_FEATURES_NEXT: u32 = 0x4000_0101;

/// The lowest leaf of the hypervisor range (the "hypervisor-range leaves" are this and above).
pub const HYPERVISOR_RANGE_START: u32 = 0x4000_0000;

// ---------------------------------------------------------------------------------------------------------------
// Signatures and default values
// ---------------------------------------------------------------------------------------------------------------

/// 0x40000001 EAX: the "Hv#1" interface signature.
pub const HV_INTERFACE_SIGNATURE: u32 = 0x3123_7648;
/// The default vendor string of 0x40000000 EBX..EDX (12 bytes).
pub const HV_VENDOR_MICROSOFT: &[u8; 12] = b"Microsoft Hv";
/// "Micr": 0x40000000 EBX for the default vendor.
pub const HV_VENDOR_MICROSOFT_EBX: u32 = 0x7263_694D;
/// "osof": 0x40000000 ECX for the default vendor.
pub const HV_VENDOR_MICROSOFT_ECX: u32 = 0x666F_736F;
/// "t Hv": 0x40000000 EDX for the default vendor.
pub const HV_VENDOR_MICROSOFT_EDX: u32 = 0x7648_2074;
/// The vendor string KVM's own supported Hyper-V CPUID reports ("Linux KVM Hv"); for reference only.
pub const HV_VENDOR_LINUX_KVM: &[u8; 12] = b"Linux KVM Hv";

/// Default 0x40000002 EAX: build number 14393 (Windows Server 2016).
pub const HV_DEFAULT_VERSION_BUILD: u32 = 14393;
/// Default 0x40000002 EBX[31:16]: major version 10.
pub const HV_DEFAULT_VERSION_MAJOR: u16 = 10;
/// Default 0x40000002 EBX[15:0]: minor version 0.
pub const HV_DEFAULT_VERSION_MINOR: u16 = 0;

/// Default 0x40000004 EBX: never notify about long spin waits (QEMU `HYPERV_SPINLOCK_NEVER_NOTIFY`).
pub const HV_SPINLOCK_NEVER_NOTIFY: u32 = 0xFFFF_FFFF;
/// Default 0x40000005 EAX: no specific limit on virtual processors.
pub const HV_DEFAULT_MAX_VPS: u32 = 0xFFFF_FFFF;
/// 0x40000005 EBX as QEMU builds it: maximum logical processors.
pub const HV_DEFAULT_MAX_LPS: u32 = 64;

/// The eVMCS version range QEMU advertises in 0x4000000A EAX[15:0]: lowest 1, highest 1.
pub const HV_EVMCS_VERSION_RANGE_1_1: u16 = 0x0101;

/// The synthetic debugger vendor string ("Microsoft VS").
pub const HV_SYNDBG_VENDOR: &[u8; 12] = b"Microsoft VS";
/// "Micr": 0x40000080 EBX.
pub const HV_SYNDBG_VENDOR_EBX: u32 = 0x7263_694D;
/// "osof": 0x40000080 ECX.
pub const HV_SYNDBG_VENDOR_ECX: u32 = 0x666F_736F;
/// "t VS": 0x40000080 EDX.
pub const HV_SYNDBG_VENDOR_EDX: u32 = 0x5356_2074;
/// 0x40000081 EAX: the "VS#1" synthetic debugger interface signature.
pub const HV_SYNDBG_INTERFACE_SIGNATURE: u32 = 0x3123_5356;

/// The KVM signature as a 12-byte string ("KVMKVMKVM\0\0\0").
pub const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// "KVMK": KVM signature EBX.
pub const KVM_SIGNATURE_EBX: u32 = 0x4B4D_564B;
/// "VMKV": KVM signature ECX.
pub const KVM_SIGNATURE_ECX: u32 = 0x564B_4D56;
/// "M\0\0\0": KVM signature EDX.
pub const KVM_SIGNATURE_EDX: u32 = 0x0000_004D;

// ---------------------------------------------------------------------------------------------------------------
// KVM paravirtual feature bit numbers (0x40000001 / 0x40000101 EAX) and hints (EDX)
// ---------------------------------------------------------------------------------------------------------------

/// kvmclock through MSRs 0x11/0x12 (deprecated pair).
pub const KVM_FEATURE_CLOCKSOURCE: u32 = 0;
/// No delay needed on port 0x80 I/O.
pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1;
/// Deprecated MMU operations hypercall.
pub const KVM_FEATURE_MMU_OP: u32 = 2;
/// kvmclock through MSRs 0x4b564d00/0x4b564d01.
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 3;
/// Asynchronous page faults.
pub const KVM_FEATURE_ASYNC_PF: u32 = 4;
/// Steal time accounting.
pub const KVM_FEATURE_STEAL_TIME: u32 = 5;
/// Paravirtual end-of-interrupt (needs KVM's in-kernel local APIC).
pub const KVM_FEATURE_PV_EOI: u32 = 6;
/// Paravirtual spinlock unhalt (kick hypercall; needs KVM's in-kernel local APIC).
pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
/// Paravirtual TLB flush.
pub const KVM_FEATURE_PV_TLB_FLUSH: u32 = 9;
/// Async PF delivered as a VM exit for nested guests.
pub const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 10;
/// Paravirtual send-IPI hypercall (needs KVM's in-kernel local APIC).
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
/// Host-side HLT polling control MSR.
pub const KVM_FEATURE_POLL_CONTROL: u32 = 12;
/// Paravirtual sched-yield hypercall.
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
/// Async PF "page ready" notification as an interrupt (needs KVM's in-kernel local APIC).
pub const KVM_FEATURE_ASYNC_PF_INT: u32 = 14;
/// Extended destination ID bits in MSI addresses.
pub const KVM_FEATURE_MSI_EXT_DEST_ID: u32 = 15;
/// MAP_GPA_RANGE hypercall.
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 16;
/// MSR_KVM_MIGRATION_CONTROL.
pub const KVM_FEATURE_MIGRATION_CONTROL: u32 = 17;
/// kvmclock's PVCLOCK_TSC_STABLE_BIT may be trusted.
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 24;
/// EDX hint: vCPUs are never preempted for an unlimited time.
pub const KVM_HINTS_REALTIME: u32 = 0;

// ---------------------------------------------------------------------------------------------------------------
// 0x40000003: features
// ---------------------------------------------------------------------------------------------------------------

/// 0x40000003 EAX: partition privilege mask, low half (which synthetic MSRs the partition may access).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct FeaturesEax {
    /// Bit 0 `HV_VP_RUNTIME_AVAILABLE` [AccessVpRunTimeReg]: hv-runtime.
    pub access_vp_run_time_reg: bool,
    /// Bit 1 `HV_TIME_REF_COUNT_AVAILABLE` [AccessPartitionReferenceCounter]: hv-time.
    pub access_partition_reference_counter: bool,
    /// Bit 2 `HV_SYNIC_AVAILABLE` [AccessSynicRegs]: hv-synic.
    pub access_synic_regs: bool,
    /// Bit 3 `HV_SYNTIMERS_AVAILABLE` [AccessSyntheticTimerRegs]: hv-stimer.
    pub access_synthetic_timer_regs: bool,
    /// Bit 4 `HV_APIC_ACCESS_AVAILABLE` [AccessIntrCtrlRegs]: hv-vapic.
    pub access_intr_ctrl_regs: bool,
    /// Bit 5 `HV_HYPERCALL_AVAILABLE` [AccessHypercallMsrs]: always set once identification is on.
    pub access_hypercall_msrs: bool,
    /// Bit 6 `HV_VP_INDEX_AVAILABLE` [AccessVpIndex]: hv-vpindex.
    pub access_vp_index: bool,
    /// Bit 7 `HV_RESET_AVAILABLE` [AccessResetReg]: hv-reset.
    pub access_reset_reg: bool,
    /// Bit 8 [AccessStatsReg]: statistics pages (never set by QEMU).
    pub access_stats_reg: bool,
    /// Bit 9 `HV_REFERENCE_TSC_AVAILABLE` [AccessPartitionReferenceTsc]: hv-time.
    pub access_partition_reference_tsc: bool,
    /// Bit 10 [AccessGuestIdleReg]: guest idle MSR (never set by QEMU).
    pub access_guest_idle_reg: bool,
    /// Bit 11 `HV_ACCESS_FREQUENCY_MSRS` [AccessFrequencyRegs]: hv-frequencies.
    pub access_frequency_regs: bool,
    /// Bit 12 [AccessDebugRegs] (never set by QEMU).
    pub access_debug_regs: bool,
    /// Bit 13 `HV_ACCESS_REENLIGHTENMENTS_CONTROL` [AccessReenlightenmentControls]: hv-reenlightenment.
    pub access_reenlightenment_controls: bool,
    #[bits(18)]
    __: u32,
}

/// 0x40000003 EBX: partition privilege mask, high half (which hypercalls the partition may use).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct FeaturesEbx {
    /// Bit 0 [CreatePartitions].
    pub create_partitions: bool,
    /// Bit 1 [AccessPartitionId].
    pub access_partition_id: bool,
    /// Bit 2 [AccessMemoryPool].
    pub access_memory_pool: bool,
    /// Bit 3 (reserved; formerly AdjustMessageBuffers).
    pub adjust_message_buffers: bool,
    /// Bit 4 `HV_POST_MESSAGES` [PostMessages]: hv-synic.
    pub post_messages: bool,
    /// Bit 5 `HV_SIGNAL_EVENTS` [SignalEvents]: hv-synic.
    pub signal_events: bool,
    /// Bit 6 [CreatePort].
    pub create_port: bool,
    /// Bit 7 [ConnectPort].
    pub connect_port: bool,
    /// Bit 8 [AccessStats].
    pub access_stats: bool,
    #[bits(2)]
    __: u8,
    /// Bit 11 [Debugging]: KVM reports and gates the synthetic-debugger hypercalls on this bit.
    pub debugging: bool,
    /// Bit 12 [CpuManagement]. QEMU's legacy synthesis calls it `HV_PARTITION_DEBUGGING_ALLOWED` and sets it for
    /// hv-syndbg (reference §11 quirk 9).
    pub cpu_management: bool,
    #[bits(19)]
    __: u32,
}

/// 0x40000003 EDX: miscellaneous features.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct FeaturesEdx {
    /// Bit 0 [MwaitAvailable] (deprecated).
    pub mwait_available: bool,
    /// Bit 1 `HV_GUEST_DEBUGGING_AVAILABLE` [GuestDebuggingAvailable].
    pub guest_debugging_available: bool,
    /// Bit 2 [PerformanceMonitorsAvailable].
    pub performance_monitors_available: bool,
    /// Bit 3 `HV_CPU_DYNAMIC_PARTITIONING_AVAILABLE` [CpuDynamicPartitioningAvailable]: always set once
    /// identification is on.
    pub cpu_dynamic_partitioning_available: bool,
    /// Bit 4 `HV_HYPERCALL_XMM_INPUT_AVAILABLE` [XmmRegistersForFastHypercallAvailable]: hv-xmm-input.
    pub xmm_registers_for_fast_hypercall_available: bool,
    /// Bit 5 [GuestIdleAvailable].
    pub guest_idle_available: bool,
    #[bits(2)]
    __: u8,
    /// Bit 8 `HV_FREQUENCY_MSRS_AVAILABLE` [FrequencyRegsAvailable]: hv-frequencies.
    pub frequency_regs_available: bool,
    #[bits(1)]
    __: u8,
    /// Bit 10 `HV_GUEST_CRASH_MSR_AVAILABLE` [GuestCrashRegsAvailable]: hv-crash.
    pub guest_crash_regs_available: bool,
    /// Bit 11 `HV_FEATURE_DEBUG_MSRS_AVAILABLE` [DebugRegsAvailable]: hv-syndbg.
    pub debug_regs_available: bool,
    #[bits(2)]
    __: u8,
    /// Bit 14 `HV_EXT_GVA_RANGES_FLUSH_AVAILABLE` [ExtendedGvaRangesForFlushVirtualAddressListAvailable]:
    /// hv-tlbflush-ext.
    pub extended_gva_ranges_for_flush_available: bool,
    /// Bit 15 [FastHypercallOutputAvailable] (XMM output; never set by QEMU).
    pub fast_hypercall_output_available: bool,
    #[bits(3)]
    __: u8,
    /// Bit 19 `HV_STIMER_DIRECT_MODE_AVAILABLE` [DirectSyntheticTimers]: hv-stimer-direct.
    pub direct_synthetic_timers: bool,
    #[bits(12)]
    __: u16,
}

// ---------------------------------------------------------------------------------------------------------------
// 0x40000004: enlightenment recommendations
// ---------------------------------------------------------------------------------------------------------------

/// 0x40000004 EAX: enlightenment recommendations. (EBX holds the spinlock retry count; ECX/EDX are zero.)
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct RecommendationsEax {
    /// Bit 0 `HV_AS_SWITCH_RECOMMENDED` [UseHypercallForAddressSpaceSwitch] (never set by QEMU).
    pub use_hypercall_for_address_space_switch: bool,
    /// Bit 1 `HV_LOCAL_TLB_FLUSH_RECOMMENDED` [UseHypercallForLocalFlush] (never set by QEMU).
    pub use_hypercall_for_local_flush: bool,
    /// Bit 2 `HV_REMOTE_TLB_FLUSH_RECOMMENDED` [UseHypercallForRemoteFlushAndLocalFlushEntire]: hv-tlbflush.
    pub use_hypercall_for_remote_flush: bool,
    /// Bit 3 `HV_APIC_ACCESS_RECOMMENDED` [UseApicMsrs]: hv-vapic, only when hv-avic is off.
    pub use_apic_msrs: bool,
    /// Bit 4 `HV_SYSTEM_RESET_RECOMMENDED` [UseHvRegisterForReset] (never set by QEMU).
    pub use_hv_register_for_reset: bool,
    /// Bit 5 `HV_RELAXED_TIMING_RECOMMENDED` [UseRelaxedTiming]: hv-relaxed.
    pub use_relaxed_timing: bool,
    /// Bit 6 [UseDmaRemapping] (deprecated).
    pub use_dma_remapping: bool,
    /// Bit 7 [UseInterruptRemapping] (deprecated).
    pub use_interrupt_remapping: bool,
    /// Bit 8 [UseX2ApicMsrs].
    pub use_x2apic_msrs: bool,
    /// Bit 9 `HV_DEPRECATING_AEOI_RECOMMENDED` [DeprecateAutoEoi]: hv-avic / hv-apicv.
    pub deprecate_auto_eoi: bool,
    /// Bit 10 `HV_CLUSTER_IPI_RECOMMENDED` [UseSyntheticClusterIpi]: hv-ipi.
    pub use_synthetic_cluster_ipi: bool,
    /// Bit 11 `HV_EX_PROCESSOR_MASKS_RECOMMENDED` [UseExProcessorMasks]: hv-tlbflush or hv-ipi.
    pub use_ex_processor_masks: bool,
    /// Bit 12 [Nested]: the hypervisor itself runs nested.
    pub nested: bool,
    /// Bit 13 [UseIntForMbecSystemCalls].
    pub use_int_for_mbec_system_calls: bool,
    /// Bit 14 `HV_ENLIGHTENED_VMCS_RECOMMENDED` [UseVmcsEnlightenments]: hv-evmcs.
    pub use_vmcs_enlightenments: bool,
    /// Bit 15 [UseSyncedTimeline].
    pub use_synced_timeline: bool,
    #[bits(1)]
    __: u8,
    /// Bit 17 [UseDirectLocalFlushEntire].
    pub use_direct_local_flush_entire: bool,
    /// Bit 18 `HV_NO_NONARCH_CORESHARING` [NoNonArchitecturalCoreSharing]: hv-no-nonarch-coresharing.
    pub no_non_architectural_core_sharing: bool,
    #[bits(13)]
    __: u16,
}

// ---------------------------------------------------------------------------------------------------------------
// 0x4000000A: nested features
// ---------------------------------------------------------------------------------------------------------------

/// 0x4000000A EAX: nested virtualization features. EBX..EDX are zero in QEMU's leaf.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct NestedFeaturesEax {
    /// Bits 7:0: lowest supported eVMCS version (hv-evmcs; QEMU uses 1).
    #[bits(8)]
    pub evmcs_version_low: u8,
    /// Bits 15:8: highest supported eVMCS version (hv-evmcs; QEMU uses 1).
    #[bits(8)]
    pub evmcs_version_high: u8,
    #[bits(1)]
    __: u8,
    /// Bit 17 `HV_NESTED_DIRECT_FLUSH` [DirectVirtualFlush]: hv-tlbflush-direct.
    pub direct_virtual_flush: bool,
    /// Bit 18 [FlushGuestPhysicalHypercall] (never set by QEMU).
    pub flush_guest_physical_hypercall: bool,
    /// Bit 19 `HV_NESTED_MSR_BITMAP` [EnlightenedMsrBitmap]: hv-emsr-bitmap.
    pub enlightened_msr_bitmap: bool,
    #[bits(12)]
    __: u16,
}

/// 0x4000000A EBX: nested features, second word (KVM offers bit 0; QEMU never sets it).
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct NestedFeaturesEbx {
    /// Bit 0: the eVMCS v1 has the GUEST_IA32_PERF_GLOBAL_CTRL fields.
    pub evmcs1_perf_global_ctrl: bool,
    #[bits(31)]
    __: u32,
}

// ---------------------------------------------------------------------------------------------------------------
// 0x40000082: synthetic debugger capabilities
// ---------------------------------------------------------------------------------------------------------------

/// 0x40000082 EAX: synthetic debugger platform capabilities.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct SyndbgCapabilitiesEax {
    #[bits(1)]
    __: u8,
    /// Bit 1 `HV_SYNDBG_CAP_ALLOW_KERNEL_DEBUGGING`.
    pub allow_kernel_debugging: bool,
    #[bits(30)]
    __: u32,
}

// ---------------------------------------------------------------------------------------------------------------
// 0x40000002: version
// ---------------------------------------------------------------------------------------------------------------

/// 0x40000002 EBX: major and minor version.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct VersionEbx {
    /// Bits 15:0: minor version.
    pub minor: u16,
    /// Bits 31:16: major version.
    pub major: u16,
}

/// 0x40000002 EDX: service branch and service number.
#[bitfield(u32)]
#[derive(PartialEq, Eq)]
pub struct VersionEdx {
    /// Bits 23:0: service number.
    #[bits(24)]
    pub service_number: u32,
    /// Bits 31:24: service branch.
    pub service_branch: u8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_positions_match_the_reference() {
        // Reference §5.1.
        let cases: &[(u32, u32)] = &[
            (
                FeaturesEax::new()
                    .with_access_vp_run_time_reg(true)
                    .into_bits(),
                1 << 0,
            ),
            (
                FeaturesEax::new()
                    .with_access_partition_reference_counter(true)
                    .into_bits(),
                1 << 1,
            ),
            (
                FeaturesEax::new().with_access_synic_regs(true).into_bits(),
                1 << 2,
            ),
            (
                FeaturesEax::new()
                    .with_access_synthetic_timer_regs(true)
                    .into_bits(),
                1 << 3,
            ),
            (
                FeaturesEax::new()
                    .with_access_intr_ctrl_regs(true)
                    .into_bits(),
                1 << 4,
            ),
            (
                FeaturesEax::new()
                    .with_access_hypercall_msrs(true)
                    .into_bits(),
                1 << 5,
            ),
            (
                FeaturesEax::new().with_access_vp_index(true).into_bits(),
                1 << 6,
            ),
            (
                FeaturesEax::new().with_access_reset_reg(true).into_bits(),
                1 << 7,
            ),
            (
                FeaturesEax::new()
                    .with_access_partition_reference_tsc(true)
                    .into_bits(),
                1 << 9,
            ),
            (
                FeaturesEax::new()
                    .with_access_frequency_regs(true)
                    .into_bits(),
                1 << 11,
            ),
            (
                FeaturesEax::new()
                    .with_access_reenlightenment_controls(true)
                    .into_bits(),
                1 << 13,
            ),
            (
                FeaturesEbx::new().with_post_messages(true).into_bits(),
                1 << 4,
            ),
            (
                FeaturesEbx::new().with_signal_events(true).into_bits(),
                1 << 5,
            ),
            (FeaturesEbx::new().with_debugging(true).into_bits(), 1 << 11),
            (
                FeaturesEbx::new().with_cpu_management(true).into_bits(),
                1 << 12,
            ),
            (
                FeaturesEdx::new()
                    .with_guest_debugging_available(true)
                    .into_bits(),
                1 << 1,
            ),
            (
                FeaturesEdx::new()
                    .with_cpu_dynamic_partitioning_available(true)
                    .into_bits(),
                1 << 3,
            ),
            (
                FeaturesEdx::new()
                    .with_xmm_registers_for_fast_hypercall_available(true)
                    .into_bits(),
                1 << 4,
            ),
            (
                FeaturesEdx::new()
                    .with_frequency_regs_available(true)
                    .into_bits(),
                1 << 8,
            ),
            (
                FeaturesEdx::new()
                    .with_guest_crash_regs_available(true)
                    .into_bits(),
                1 << 10,
            ),
            (
                FeaturesEdx::new()
                    .with_debug_regs_available(true)
                    .into_bits(),
                1 << 11,
            ),
            (
                FeaturesEdx::new()
                    .with_extended_gva_ranges_for_flush_available(true)
                    .into_bits(),
                1 << 14,
            ),
            (
                FeaturesEdx::new()
                    .with_direct_synthetic_timers(true)
                    .into_bits(),
                1 << 19,
            ),
            // Reference §5.2.
            (
                RecommendationsEax::new()
                    .with_use_hypercall_for_remote_flush(true)
                    .into_bits(),
                1 << 2,
            ),
            (
                RecommendationsEax::new()
                    .with_use_apic_msrs(true)
                    .into_bits(),
                1 << 3,
            ),
            (
                RecommendationsEax::new()
                    .with_use_relaxed_timing(true)
                    .into_bits(),
                1 << 5,
            ),
            (
                RecommendationsEax::new()
                    .with_deprecate_auto_eoi(true)
                    .into_bits(),
                1 << 9,
            ),
            (
                RecommendationsEax::new()
                    .with_use_synthetic_cluster_ipi(true)
                    .into_bits(),
                1 << 10,
            ),
            (
                RecommendationsEax::new()
                    .with_use_ex_processor_masks(true)
                    .into_bits(),
                1 << 11,
            ),
            (
                RecommendationsEax::new()
                    .with_use_vmcs_enlightenments(true)
                    .into_bits(),
                1 << 14,
            ),
            (
                RecommendationsEax::new()
                    .with_no_non_architectural_core_sharing(true)
                    .into_bits(),
                1 << 18,
            ),
            // Reference §5.3.
            (
                NestedFeaturesEax::new()
                    .with_evmcs_version_low(1)
                    .with_evmcs_version_high(1)
                    .into_bits(),
                HV_EVMCS_VERSION_RANGE_1_1 as u32,
            ),
            (
                NestedFeaturesEax::new()
                    .with_direct_virtual_flush(true)
                    .into_bits(),
                1 << 17,
            ),
            (
                NestedFeaturesEax::new()
                    .with_enlightened_msr_bitmap(true)
                    .into_bits(),
                1 << 19,
            ),
            (
                SyndbgCapabilitiesEax::new()
                    .with_allow_kernel_debugging(true)
                    .into_bits(),
                1 << 1,
            ),
            (
                VersionEbx::new().with_major(10).with_minor(0).into_bits(),
                0x000A_0000,
            ),
            (
                VersionEdx::new()
                    .with_service_branch(2)
                    .with_service_number(3)
                    .into_bits(),
                0x0200_0003,
            ),
        ];
        for (i, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn signatures_spell_their_strings() {
        let words = |s: &[u8; 12]| {
            [
                u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
                u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
                u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
            ]
        };
        assert_eq!(
            words(HV_VENDOR_MICROSOFT),
            [
                HV_VENDOR_MICROSOFT_EBX,
                HV_VENDOR_MICROSOFT_ECX,
                HV_VENDOR_MICROSOFT_EDX
            ]
        );
        assert_eq!(
            words(HV_SYNDBG_VENDOR),
            [
                HV_SYNDBG_VENDOR_EBX,
                HV_SYNDBG_VENDOR_ECX,
                HV_SYNDBG_VENDOR_EDX
            ]
        );
        assert_eq!(
            words(KVM_SIGNATURE),
            [KVM_SIGNATURE_EBX, KVM_SIGNATURE_ECX, KVM_SIGNATURE_EDX]
        );
        assert_eq!(HV_INTERFACE_SIGNATURE.to_le_bytes(), *b"Hv#1");
        assert_eq!(HV_SYNDBG_INTERFACE_SIGNATURE.to_le_bytes(), *b"VS#1");
        assert_eq!(HV_DEFAULT_VERSION_BUILD, 0x3839);
    }
}

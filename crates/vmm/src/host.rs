//! Host capability probing for `enlighten host` and for choosing the backend.
//!
//! Everything here is read-only: it opens `/dev/kvm`, asks capabilities, and (to read the TSC frequency) creates
//! a throw-away VM with one vCPU that never runs.

use std::os::unix::io::AsRawFd;

use hyperv::cpuid::CpuidEntry;
use kvm_bindings::{kvm_cpuid2, CpuId, KVMIO};
use kvm_ioctls::Kvm;
use serde::Serialize;
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;
use vmm_sys_util::ioctl_iowr_nr;

// kvm-ioctls has no wrapper for KVM_GET_SUPPORTED_HV_CPUID (see rust-vmm-ecosystem notes), so the request number
// is defined here by hand: _IOWR(KVMIO, 0xc1, struct kvm_cpuid2).
ioctl_iowr_nr!(KVM_GET_SUPPORTED_HV_CPUID, KVMIO, 0xc1, kvm_cpuid2);

/// Room for the answer of KVM_GET_SUPPORTED_CPUID / KVM_GET_SUPPORTED_HV_CPUID.
const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;

/// One capability as reported by `KVM_CHECK_EXTENSION`.
#[derive(Clone, Debug, Serialize)]
pub struct CapReport {
    pub name: &'static str,
    pub value: i32,
    /// Whether enlighten needs this capability (a missing required one makes userspace mode unavailable).
    pub required: bool,
}

/// What `enlighten host` reports.
#[derive(Clone, Debug, Serialize)]
pub struct HostReport {
    pub kvm_device: String,
    pub kvm_api_version: i32,
    pub capabilities: Vec<CapReport>,
    /// Does the kernel emulate Hyper-V itself (any `KVM_CAP_HYPERV*` capability, or a working
    /// `KVM_GET_SUPPORTED_HV_CPUID`)?
    pub kernel_hyperv_emulation: bool,
    /// The error `KVM_GET_SUPPORTED_HV_CPUID` returned, if it failed.
    pub kernel_hv_cpuid_error: Option<String>,
    /// Can enlighten provide the enlightenments in userspace here (user-space MSR exits and the MSR filter)?
    pub userspace_mode_available: bool,
    /// The enlightenments the userspace backend offers (`-cpu` flag names).
    pub userspace_enlightenments: Vec<&'static str>,
    /// Host TSC frequency as KVM reports it for a new vCPU, in kHz.
    pub tsc_khz: Option<u32>,
    /// `/sys/devices/system/cpu/smt/active`, when readable.
    pub smt_active: Option<bool>,
    /// Reasons userspace mode is unavailable (empty when it is available).
    pub problems: Vec<String>,
}

/// Capabilities worth reporting, with whether enlighten requires them.
const CAPS: &[(&str, u32, bool)] = &[
    (
        "KVM_CAP_X86_USER_SPACE_MSR",
        kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        true,
    ),
    (
        "KVM_CAP_X86_MSR_FILTER",
        kvm_bindings::KVM_CAP_X86_MSR_FILTER,
        true,
    ),
    ("KVM_CAP_SYNC_REGS", kvm_bindings::KVM_CAP_SYNC_REGS, false),
    (
        "KVM_CAP_TSC_CONTROL",
        kvm_bindings::KVM_CAP_TSC_CONTROL,
        false,
    ),
    (
        "KVM_CAP_VM_TSC_CONTROL",
        kvm_bindings::KVM_CAP_VM_TSC_CONTROL,
        false,
    ),
    ("KVM_CAP_MAX_VCPUS", kvm_bindings::KVM_CAP_MAX_VCPUS, false),
    ("KVM_CAP_NR_VCPUS", kvm_bindings::KVM_CAP_NR_VCPUS, false),
    ("KVM_CAP_IRQCHIP", kvm_bindings::KVM_CAP_IRQCHIP, false),
    (
        "KVM_CAP_SPLIT_IRQCHIP",
        kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
        false,
    ),
    (
        "KVM_CAP_X2APIC_API",
        kvm_bindings::KVM_CAP_X2APIC_API,
        false,
    ),
    (
        "KVM_CAP_EXIT_HYPERCALL",
        kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
        false,
    ),
    ("KVM_CAP_HYPERV", kvm_bindings::KVM_CAP_HYPERV, false),
    (
        "KVM_CAP_HYPERV_VAPIC",
        kvm_bindings::KVM_CAP_HYPERV_VAPIC,
        false,
    ),
    (
        "KVM_CAP_HYPERV_SPIN",
        kvm_bindings::KVM_CAP_HYPERV_SPIN,
        false,
    ),
    (
        "KVM_CAP_HYPERV_TIME",
        kvm_bindings::KVM_CAP_HYPERV_TIME,
        false,
    ),
    (
        "KVM_CAP_HYPERV_SYNIC",
        kvm_bindings::KVM_CAP_HYPERV_SYNIC,
        false,
    ),
    (
        "KVM_CAP_HYPERV_SYNIC2",
        kvm_bindings::KVM_CAP_HYPERV_SYNIC2,
        false,
    ),
    (
        "KVM_CAP_HYPERV_VP_INDEX",
        kvm_bindings::KVM_CAP_HYPERV_VP_INDEX,
        false,
    ),
    (
        "KVM_CAP_HYPERV_EVENTFD",
        kvm_bindings::KVM_CAP_HYPERV_EVENTFD,
        false,
    ),
    (
        "KVM_CAP_HYPERV_TLBFLUSH",
        kvm_bindings::KVM_CAP_HYPERV_TLBFLUSH,
        false,
    ),
    (
        "KVM_CAP_HYPERV_SEND_IPI",
        kvm_bindings::KVM_CAP_HYPERV_SEND_IPI,
        false,
    ),
    (
        "KVM_CAP_HYPERV_ENLIGHTENED_VMCS",
        kvm_bindings::KVM_CAP_HYPERV_ENLIGHTENED_VMCS,
        false,
    ),
    (
        "KVM_CAP_HYPERV_CPUID",
        kvm_bindings::KVM_CAP_HYPERV_CPUID,
        false,
    ),
    (
        "KVM_CAP_HYPERV_DIRECT_TLBFLUSH",
        kvm_bindings::KVM_CAP_HYPERV_DIRECT_TLBFLUSH,
        false,
    ),
    (
        "KVM_CAP_SYS_HYPERV_CPUID",
        kvm_bindings::KVM_CAP_SYS_HYPERV_CPUID,
        false,
    ),
    (
        "KVM_CAP_HYPERV_ENFORCE_CPUID",
        kvm_bindings::KVM_CAP_HYPERV_ENFORCE_CPUID,
        false,
    ),
];

/// An error opening or querying `/dev/kvm`.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("could not access KVM ({path}): {source}")]
    Open {
        path: String,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
}

/// The KVM device path: `/dev/kvm`, unless `ENLIGHTEN_KVM_DEVICE` names another.
pub fn kvm_device_path() -> String {
    std::env::var("ENLIGHTEN_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".to_string())
}

/// Opens the KVM device.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let path = kvm_device_path();
    let c_path = std::ffi::CString::new(path.clone()).map_err(|_| HostError::Open {
        path: path.clone(),
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    Kvm::new_with_path(&c_path).map_err(|source| HostError::Open { path, source })
}

fn entry_from_kvm(e: &kvm_bindings::kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

/// The host's `KVM_GET_SUPPORTED_CPUID`, as engine-side entries.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Vec<CpuidEntry>, HostError> {
    let cpuid = kvm
        .get_supported_cpuid(MAX_CPUID_ENTRIES)
        .map_err(HostError::SupportedCpuid)?;
    Ok(cpuid.as_slice().iter().map(entry_from_kvm).collect())
}

/// `KVM_GET_SUPPORTED_HV_CPUID` on the system fd. Fails with EINVAL on kernels without Hyper-V emulation.
pub fn supported_hv_cpuid(kvm: &Kvm) -> Result<Vec<CpuidEntry>, kvm_ioctls::Error> {
    let mut cpuid =
        CpuId::new(MAX_CPUID_ENTRIES).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    // SAFETY: the fd is a valid KVM system fd; the pointer refers to a properly sized kvm_cpuid2 with
    // `nent` entries that the kernel writes at most, and `cpuid` outlives the call.
    let ret = unsafe {
        ioctl_with_mut_ptr(
            &FdRef(kvm.as_raw_fd()),
            KVM_GET_SUPPORTED_HV_CPUID(),
            cpuid.as_mut_fam_struct_ptr(),
        )
    };
    if ret < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(cpuid.as_slice().iter().map(entry_from_kvm).collect())
}

/// Borrowed raw fd, so the ioctl helpers (which take `&impl AsRawFd`) can be used on `Kvm`'s fd.
struct FdRef(std::os::unix::io::RawFd);

impl AsRawFd for FdRef {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.0
    }
}

/// The host facts the CPUID builder needs, probed from a KVM handle: supported CPUID, SMT state, TSC frequency.
pub fn host_cpuid(kvm: &Kvm) -> Result<hyperv::cpuid::HostCpuid, HostError> {
    let mut host = hyperv::cpuid::HostCpuid::new(supported_cpuid(kvm)?);
    host.info = hyperv::config::HostInfo {
        smt_active: smt_active().unwrap_or(true),
        tsc_khz: host_tsc_khz(kvm),
    };
    Ok(host)
}

/// The host's SMT state from `/sys/devices/system/cpu/smt/active` (`None` when unreadable).
pub fn smt_active() -> Option<bool> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/smt/active").ok()?;
    match text.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// The TSC frequency KVM gives a new vCPU, in kHz.
pub fn host_tsc_khz(kvm: &Kvm) -> Option<u32> {
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok()
}

/// Probes the host.
pub fn probe() -> Result<HostReport, HostError> {
    let kvm = open_kvm()?;
    let capabilities: Vec<CapReport> = CAPS
        .iter()
        .map(|&(name, cap, required)| CapReport {
            name,
            value: kvm.check_extension_raw(cap.into()),
            required,
        })
        .collect();
    let hv_cap = capabilities
        .iter()
        .any(|c| c.name.starts_with("KVM_CAP_HYPERV") && c.value > 0);
    let hv_cpuid = supported_hv_cpuid(&kvm);
    let kernel_hv_cpuid_error = hv_cpuid.as_ref().err().map(|e| e.to_string());
    let kernel_hyperv_emulation = hv_cap || hv_cpuid.is_ok();
    let problems: Vec<String> = capabilities
        .iter()
        .filter(|c| c.required && c.value <= 0)
        .map(|c| format!("{} is not available", c.name))
        .collect();
    let userspace_mode_available = problems.is_empty();
    let userspace_enlightenments = if userspace_mode_available {
        let supported = hyperv::config::Backend::Userspace.supported();
        supported.iter().map(|f| f.name()).collect()
    } else {
        Vec::new()
    };
    Ok(HostReport {
        kvm_device: kvm_device_path(),
        kvm_api_version: kvm.get_api_version(),
        capabilities,
        kernel_hyperv_emulation,
        kernel_hv_cpuid_error,
        userspace_mode_available,
        userspace_enlightenments,
        tsc_khz: host_tsc_khz(&kvm),
        smt_active: smt_active(),
        problems,
    })
}

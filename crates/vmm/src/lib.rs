//! The enlighten VMM: KVM glue, vCPU threads, the userspace local APIC, devices, loaders.

pub mod apic;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod diag;
pub mod host;
pub mod hv;
pub mod kick;
pub mod layout;
pub mod lifecycle;
pub mod loader;
pub mod machine;
pub mod migration;
pub mod platform;
#[cfg(test)]
mod test_support;
pub mod throttle;
pub mod timer;
pub mod tlbflush;
mod vcpu;

pub use boot::{BootEntry, EntryMode};
pub use layout::{parse_mem_size, MemoryLayout, RamRegion};
pub use machine::{
    BootLoader, EoiHook, IoAction, IoDevices, Machine, MsrHook, Outcome, Paused, PortHook,
    PortResult, VcpuHook, VcpuRequest, VmConfig, VmError, VmHandle,
};
pub use vcpu::{HV_MSR_FIRST, HV_MSR_LAST, MSR_IA32_TSC, MSR_IA32_TSC_ADJUST};

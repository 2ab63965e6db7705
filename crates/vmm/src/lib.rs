//! The enlighten VMM: KVM glue, vCPU threads, the userspace local APIC, devices, loaders.

pub mod apic;
pub mod host;

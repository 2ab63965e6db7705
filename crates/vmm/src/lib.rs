//! The enlighten VMM: KVM glue, vCPU threads, the userspace local APIC, devices, loaders.

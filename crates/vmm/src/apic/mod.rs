//! The userspace local APIC (xAPIC MMIO and x2APIC MSRs), owned by the VMM instead of KVM's in-kernel one.

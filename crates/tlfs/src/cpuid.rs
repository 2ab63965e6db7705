//! CPUID leaves and bits of the Hyper-V interface (0x40000000 range).

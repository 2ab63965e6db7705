//! The enlighten engine: every Hyper-V enlightenment, implemented as pure logic.
//!
//! The engine owns partition and VP state, the synthetic MSR and hypercall handlers, SynIC, synthetic timers,
//! reference time, crash, reset and save/restore. It never touches KVM and spawns no threads: it talks to the
//! VMM through the [`platform`] trait, so it is deterministic and unit-testable with a fake platform.
//!
//! Configuration (`-cpu` parsing with QEMU's rules) lives in [`config`]; the CPUID builder in [`cpuid`].
#![forbid(unsafe_code)]

pub mod config;
pub mod cpuid;

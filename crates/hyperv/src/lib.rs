//! The enlighten engine: every Hyper-V enlightenment, implemented as pure logic.
//!
//! The engine owns partition and VP state, the synthetic MSR and hypercall handlers, SynIC, synthetic timers,
//! reference time, crash, reset and save/restore. It never touches KVM and spawns no threads: it talks to the
//! VMM through the [`platform`] trait, so it is deterministic and unit-testable with a fake platform
//! ([`testing::FakePlatform`]).
//!
//! Entry points (all on [`Engine`]): [`Engine::new`], [`Engine::read_msr`] / [`Engine::write_msr`],
//! [`Engine::hypercall`] (from the hypercall page's port exit, see [`hcpage`]), [`Engine::reference_time`],
//! [`Engine::timer_expired`], [`Engine::run_vp_work`], [`Engine::reset`], [`Engine::save`] / [`Engine::restore`],
//! and for devices and the APIC model [`Engine::raise_sint`], [`Engine::post_message`],
//! [`Engine::signal_event_flag`], [`Engine::apic_eoi`], [`Engine::is_auto_eoi_vector`].
//! `docs/embedding.md` walks through an integration.
//!
//! Configuration (`-cpu` parsing with QEMU's rules) lives in [`config`]; the CPUID builder in [`cpuid`]; the
//! engine is configured from the resulting guest CPUID through [`EngineConfig`].
#![forbid(unsafe_code)]
// Guest- and client-controlled data flows through this crate: no unwrap/expect outside tests (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod connections;
pub mod cpuid;
pub mod crash;
mod engine;
pub mod flush_ipi;
pub mod guest;
pub mod hcpage;
pub mod hypercall;
pub mod msr;
pub mod platform;
pub mod refclock;
pub mod state;
pub mod stimer;
pub mod synic;
pub mod testing;
pub mod vapic;

#[cfg(test)]
mod synic_tests;
#[cfg(test)]
mod tests;

pub use connections::{ConnectionError, EventConnection, MessageConnection};
pub use engine::{Engine, EngineError};
pub use guest::{EngineConfig, HvCpuid};
pub use hypercall::{CpuMode, HypercallOutcome, HypercallRegs, RegisterWrites};
pub use msr::Gp;
pub use platform::{ApicAccess, Event, MemError, Platform, TimerId, VpId, VpWork};
pub use state::{EngineState, RestoreError};
pub use synic::SynicError;

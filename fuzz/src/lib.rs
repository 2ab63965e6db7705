//! Fuzz harnesses for enlighten (issue 10). The libFuzzer entry points in `fuzz_targets/` are one-liners that call
//! into this library, so the harness code is ordinary, testable Rust:
//!
//! - [`cpu`]: the `-cpu` parser, validation and the CPUID builder;
//! - [`qmp_stream`]: QMP framing, negotiation and dispatch;
//! - [`engine`] with [`platform`]: the Hyper-V engine behind a fake platform with a small guest-memory model
//!   (`msr_sequence`, `hypercall`, `synic_stimer`).
//!
//! Every harness asserts its invariants; a failed assertion is a crash that libFuzzer reports and minimises.
#![forbid(unsafe_code)]

pub mod cpu;
pub mod engine;
pub mod platform;
pub mod qmp_stream;

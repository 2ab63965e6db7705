//! Fuzz harnesses for enlighten (issue 10). The libFuzzer entry points in `fuzz_targets/` are one-liners that call
//! into this library, so the harness code is ordinary, testable Rust:
//!
//! - [`cpu`]: the `-cpu` parser, validation and the CPUID builder;
//! - [`qmp_stream`]: QMP framing, negotiation and dispatch;
//! - [`engine`] with [`platform`]: the Hyper-V engine behind a fake platform with a small guest-memory model
//!   (`msr_sequence`, `hypercall`, `synic_stimer`);
//! - [`migration`]: the migration-stream loader (`migration_stream`), with the engine harness after a restore.
//!
//! Every harness asserts its invariants; a failed assertion is a crash that libFuzzer reports and minimises.
#![forbid(unsafe_code)]

pub mod cpu;
pub mod engine;
pub mod migration;
pub mod platform;
pub mod qmp_stream;

/// Deterministic pseudo-random inputs (xorshift64*) for the harnesses' own tests.
#[cfg(test)]
pub(crate) fn test_inputs(seed: u64, n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x >> 12;
                    x ^= x << 25;
                    x ^= x >> 27;
                    (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
                })
                .collect()
        })
        .collect()
}

//! Definitions from the Hyper-V Top-Level Functional Specification (TLFS).
//!
//! This crate holds numbers and layouts only: CPUID leaves and bits, synthetic MSR indexes, hypercall codes,
//! hypercall status codes, the control word, and the guest-visible page and message layouts. It has no logic.
#![forbid(unsafe_code)]
// Guest- and client-controlled data flows through this crate: no unwrap/expect outside tests (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
#![no_std]

pub mod cpuid;
pub mod hypercall;
pub mod msr;
pub mod pages;

//! Definitions from the Hyper-V Top-Level Functional Specification (TLFS).
//!
//! This crate holds numbers and layouts only: CPUID leaves and bits, synthetic MSR indexes, hypercall codes,
//! hypercall status codes, the control word, and the guest-visible page and message layouts. It has no logic.
#![forbid(unsafe_code)]
#![no_std]

pub mod cpuid;
pub mod hypercall;
pub mod msr;
pub mod pages;

#![no_main]
//! The engine driven through its public entry points with `Focus::Hypercall`; see `enlighten_fuzz::engine` for the
//! input format and the invariants.

use enlighten_fuzz::engine::{Focus, Harness};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    Harness::run(data, Focus::Hypercall);
});

#![no_main]
//! See `enlighten_fuzz::cpu` for the input format and the invariants.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enlighten_fuzz::cpu::run(data);
});

#![no_main]
//! See `enlighten_fuzz::qmp_stream` for the input format and the invariants.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enlighten_fuzz::qmp_stream::run(data);
});

#![no_main]
//! A migration stream loaded as the destination's restore does, without KVM; see `enlighten_fuzz::migration` for
//! the input format and the invariants.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    enlighten_fuzz::migration::run(data);
});

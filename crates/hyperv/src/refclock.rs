//! Reference time: the partition reference counter (TIME_REF_COUNT) and the reference TSC page.
//!
//! Reference time is in 100 ns units and is computed from the guest TSC with the TLFS formula
//! `ref = ((tsc * scale) >> 64) + offset` (128-bit product), where `scale = floor(2^64 * 10^7 / tsc_hz)`.
//! TIME_REF_COUNT uses **the same** parameters as the page, so that for any TSC readings `t1 <= t2 <= t3` the
//! values page(t1) <= MSR(t2) <= page(t3) hold: the function is monotonic in the TSC.
//!
//! The scale fits in 64 bits only when the TSC runs faster than 10 MHz. Slower (or unknown, 0) frequencies make
//! the page invalid (sequence 0) and TIME_REF_COUNT falls back to an exact 128-bit division.

use serde::{Deserialize, Serialize};
use tlfs::pages::TSC_SEQUENCE_INVALID;

/// 100 ns ticks per second.
pub const REF_TICKS_PER_SEC: u64 = 10_000_000;

/// The TSC-page parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscPageParams {
    /// 0.64 fixed-point multiplier.
    pub scale: u64,
    /// Signed offset in 100 ns units.
    pub offset: i64,
}

impl TscPageParams {
    /// The reference time for a TSC value, exactly as the guest computes it from the page (wrapping add).
    pub fn ref_time(&self, tsc: u64) -> u64 {
        let hi = ((u128::from(tsc) * u128::from(self.scale)) >> 64) as u64;
        hi.wrapping_add(self.offset as u64)
    }
}

/// `floor(2^64 * 10^7 / tsc_hz)`, or `None` when it does not fit in 64 bits (tsc_hz <= 10^7, including 0).
pub fn tsc_scale(tsc_hz: u64) -> Option<u64> {
    if tsc_hz <= REF_TICKS_PER_SEC {
        return None;
    }
    let scale = (u128::from(REF_TICKS_PER_SEC) << 64) / u128::from(tsc_hz);
    u64::try_from(scale).ok()
}

/// The partition's reference clock: a function from guest TSC to reference time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefClock {
    /// The normal case: the TSC-page formula with these parameters.
    Scaled(TscPageParams),
    /// TSC at 10 MHz or slower: exact division, no valid TSC page. `ref = base_ref + (tsc - base_tsc) * 10^7 / hz`
    /// (saturating at `base_ref` below `base_tsc` and at `u64::MAX` above; constant when `hz` is 0).
    Slow {
        tsc_hz: u64,
        base_tsc: u64,
        base_ref: u64,
    },
}

impl RefClock {
    /// A clock for a `tsc_hz` TSC such that `ref_time(base_tsc) == base_ref` (up to rounding of at most one tick
    /// downwards, never upwards).
    pub fn new(tsc_hz: u64, base_tsc: u64, base_ref: u64) -> RefClock {
        match tsc_scale(tsc_hz) {
            Some(scale) => {
                let hi = ((u128::from(base_tsc) * u128::from(scale)) >> 64) as u64;
                RefClock::Scaled(TscPageParams {
                    scale,
                    offset: base_ref.wrapping_sub(hi) as i64,
                })
            }
            None => RefClock::Slow {
                tsc_hz,
                base_tsc,
                base_ref,
            },
        }
    }

    /// Reference time at guest TSC `tsc`.
    pub fn ref_time(&self, tsc: u64) -> u64 {
        match *self {
            RefClock::Scaled(p) => p.ref_time(tsc),
            RefClock::Slow {
                tsc_hz,
                base_tsc,
                base_ref,
            } => {
                if tsc_hz == 0 {
                    return base_ref;
                }
                let delta = u128::from(tsc.saturating_sub(base_tsc))
                    * u128::from(REF_TICKS_PER_SEC)
                    / u128::from(tsc_hz);
                base_ref.saturating_add(u64::try_from(delta).unwrap_or(u64::MAX))
            }
        }
    }

    /// The TSC-page parameters, when a valid page can describe this clock.
    pub fn page_params(&self) -> Option<TscPageParams> {
        match *self {
            RefClock::Scaled(p) => Some(p),
            RefClock::Slow { .. } => None,
        }
    }
}

/// The next valid sequence number after `old`: `old + 1`, skipping 0 and 0xFFFFFFFF (KVM's rule).
pub fn next_sequence(old: u32) -> u32 {
    let next = old.wrapping_add(1);
    if next == 0 || next == TSC_SEQUENCE_INVALID {
        1
    } else {
        next
    }
}

/// State of the reference TSC page (KVM's `hv_tsc_page_status`, reduced to what a userspace engine needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TscPageStatus {
    /// REFERENCE_TSC bit 0 clear: the page is never written.
    Unset,
    /// The page holds these parameters with a valid sequence.
    Set(TscPageParams),
    /// The page could not be made valid (not RAM, or a clock the page cannot describe): sequence 0 if writable.
    Broken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_table() {
        // (tsc_hz, expected scale) computed independently: 2^64 * 10^7 / hz.
        let cases: &[(u64, Option<u64>)] = &[
            (0, None),
            (1, None),
            (10_000_000, None),
            (
                10_000_001,
                Some(((10_000_000u128 << 64) / 10_000_001) as u64),
            ),
            (20_000_000, Some(1u64 << 63)),
            (40_000_000, Some(1u64 << 62)),
            (
                1_000_000_000,
                Some(((10_000_000u128 << 64) / 1_000_000_000) as u64),
            ),
            (
                u64::MAX,
                Some(((10_000_000u128 << 64) / u128::from(u64::MAX)) as u64),
            ),
        ];
        for &(hz, want) in cases {
            assert_eq!(tsc_scale(hz), want, "hz={hz}");
        }
    }

    #[test]
    fn rate_is_1e7_per_second() {
        for hz in [
            10_000_001u64,
            1_000_000_000,
            2_995_200_000,
            3_000_000_000,
            5_000_000_000,
        ] {
            let c = RefClock::new(hz, 0, 0);
            let one_sec = c.ref_time(hz);
            // floor arithmetic may lose at most 1 tick (plus scale truncation, < 1 tick per 2^64/hz TSC ticks).
            assert!(
                (9_999_998..=10_000_000).contains(&one_sec),
                "hz={hz} -> {one_sec}"
            );
        }
    }

    #[test]
    fn base_is_honoured() {
        for (hz, base_tsc, base_ref) in [
            (2_000_000_000u64, 123_456_789u64, 0u64),
            (3_000_000_000, u64::MAX / 3, 77),
            (15_000_000, 5, 1 << 40),
        ] {
            let c = RefClock::new(hz, base_tsc, base_ref);
            let got = c.ref_time(base_tsc);
            assert!(
                got == base_ref || got + 1 == base_ref,
                "hz={hz}: {got} vs {base_ref}"
            );
        }
    }

    #[test]
    fn sequence_skips_invalid_values() {
        let cases = [
            (0u32, 1u32),
            (1, 2),
            (0xFFFF_FFFD, 0xFFFF_FFFE),
            (0xFFFF_FFFE, 1),
            (0xFFFF_FFFF, 1),
            (41, 42),
        ];
        for (old, new) in cases {
            assert_eq!(next_sequence(old), new);
            assert_ne!(next_sequence(old), 0);
            assert_ne!(next_sequence(old), TSC_SEQUENCE_INVALID);
        }
    }

    #[test]
    fn slow_clock_divides_exactly_and_never_overflows() {
        let c = RefClock::new(1_000_000, 100, 5);
        assert_eq!(c.ref_time(100), 5);
        assert_eq!(c.ref_time(1_000_100), 5 + 10_000_000);
        assert_eq!(c.ref_time(50), 5); // below the base: saturates
        let _ = c.ref_time(u64::MAX);
        let z = RefClock::new(0, 0, 9);
        assert_eq!(z.ref_time(u64::MAX), 9);
        assert!(z.page_params().is_none());
    }

    proptest::proptest! {
        /// Monotonic in the TSC for any frequency and base, including huge TSC values (no overflow, no panic).
        #[test]
        fn monotonic(hz in 0u64..=u64::MAX, base_tsc: u64, base_ref in 0u64..(1u64 << 62), a: u64, b: u64) {
            let c = RefClock::new(hz, base_tsc, base_ref);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            // Monotonic as long as the offset addition does not wrap: restrict to TSC values at or above the base.
            if lo >= base_tsc && hi - base_tsc <= (1u64 << 63) {
                proptest::prop_assert!(c.ref_time(lo) <= c.ref_time(hi));
            }
        }
    }
}

//! Crash reporting helpers (CRASH_P0..P4 / CRASH_CTL).

/// Formats one value as C's `%#lx`: `0` for zero, else `0x` followed by lower-case hex digits.
pub fn format_hash_lx(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// QEMU's crash-parameter line without the surrounding newlines:
/// `HV crash parameters: (%#lx %#lx %#lx %#lx %#lx)`. QEMU prints it as `"\nHV crash parameters: (...)\n"`
/// after `Guest crashed`.
pub fn format_crash_params(params: &[u64; 5]) -> String {
    let parts: Vec<String> = params.iter().map(|&p| format_hash_lx(p)).collect();
    format!("HV crash parameters: ({})", parts.join(" "))
}

/// The message QEMU logs first on a guest panic.
pub const GUEST_CRASHED: &str = "Guest crashed";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_lx_table() {
        let cases = [
            (0u64, "0"),
            (1, "0x1"),
            (0xa, "0xa"),
            (0xDEADBEEF, "0xdeadbeef"),
            (u64::MAX, "0xffffffffffffffff"),
            (1 << 63, "0x8000000000000000"),
        ];
        for (v, want) in cases {
            assert_eq!(format_hash_lx(v), want);
        }
    }

    #[test]
    fn crash_line() {
        assert_eq!(
            format_crash_params(&[0, 0, 0, 0, 0]),
            "HV crash parameters: (0 0 0 0 0)"
        );
        assert_eq!(
            format_crash_params(&[0x1e, 0xffff_f800_1234_5678, 0, 1, u64::MAX]),
            "HV crash parameters: (0x1e 0xfffff80012345678 0 0x1 0xffffffffffffffff)"
        );
    }
}

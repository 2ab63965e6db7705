//! Guest physical memory layout: RAM size parsing (`-m`), the RAM regions with QEMU's hole below 4 GiB, and the
//! fixed low-memory addresses the VMM uses for its own boot structures.

use serde::Serialize;
use thiserror::Error;

/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// 4 GiB: where RAM above the PCI/LAPIC hole continues.
pub const FOUR_GIB: u64 = 4 * GIB;
/// QEMU's default RAM size (`-m` absent).
pub const DEFAULT_RAM_SIZE: u64 = 128 * MIB;
/// When the RAM size reaches this value, the part below 4 GiB is cut at [`LOW_RAM_SPLIT`] (QEMU's pc machine
/// with gigabyte alignment: `ram >= 0xE0000000` puts 3 GiB low and the rest above 4 GiB).
pub const LOW_RAM_SPLIT_THRESHOLD: u64 = 0xE000_0000;
/// The end of low RAM for large guests.
pub const LOW_RAM_SPLIT: u64 = 0xC000_0000;
/// Smallest RAM size accepted (the boot structures live in the first MiB and kernels load at 1 MiB or above).
pub const MIN_RAM_SIZE: u64 = 2 * MIB;
/// Largest RAM size accepted (1 TiB; far more than any test guest needs, and it keeps arithmetic small).
pub const MAX_RAM_SIZE: u64 = 1 << 40;

/// The page tables of the long-mode entry state: PML4 at 0x1000, PDPT at 0x2000, four page directories at
/// 0x3000..0x7000 mapping the low 4 GiB with 2 MiB pages.
pub const BOOT_PML4: u64 = 0x1000;
/// The page-directory-pointer table of the long-mode entry state.
pub const BOOT_PDPT: u64 = 0x2000;
/// The first of the four page directories of the long-mode entry state.
pub const BOOT_PD: u64 = 0x3000;
/// The boot GDT (both entry states): null, 64-bit code (0x08), data (0x10), 32-bit code (0x18).
pub const BOOT_GDT: u64 = 0x7000;
/// End (exclusive) of the area the VMM writes its boot structures into. The loaders keep their data (MBI,
/// memory map, command line) at or above this address and out of page 0.
pub const BOOT_AREA_END: u64 = 0x8000;

/// A `-m` value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemSizeError {
    #[error("invalid RAM size '{0}'")]
    Invalid(String),
    #[error("RAM size '{0}' is too small (minimum 2 MiB)")]
    TooSmall(String),
    #[error("RAM size '{0}' is too large (maximum 1 TiB)")]
    TooLarge(String),
}

/// Parses a `-m` value with QEMU's syntax: a number with an optional suffix `B`, `K`, `M`, `G`, `T` (either
/// case; no suffix means MiB), or `size=VALUE` (QEMU's long form; other `-m` properties are rejected).
pub fn parse_mem_size(spec: &str) -> Result<u64, MemSizeError> {
    let invalid = || MemSizeError::Invalid(spec.to_string());
    let mut value = spec.trim();
    if let Some(rest) = value.strip_prefix("size=") {
        value = rest;
    }
    if value.is_empty() || value.contains(',') || value.contains('=') {
        return Err(invalid());
    }
    let (number, shift) = match value.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(invalid()),
            };
            (&value[..value.len() - 1], shift)
        }
        _ => (value, 20),
    };
    let bytes = if let Some((int, frac)) = number.split_once('.') {
        // QEMU accepts fractions ("1.5G"); compute exactly with integer arithmetic.
        if int.is_empty() && frac.is_empty() {
            return Err(invalid());
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| invalid())?
        };
        if frac.len() > 9 || !frac.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid());
        }
        let frac_num: u64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| invalid())?
        };
        let frac_den = 10u64.pow(frac.len() as u32);
        let unit = 1u128 << shift;
        let total = u128::from(int) * unit + u128::from(frac_num) * unit / u128::from(frac_den);
        u64::try_from(total).map_err(|_| MemSizeError::TooLarge(spec.to_string()))?
    } else {
        if !number.chars().all(|c| c.is_ascii_digit()) || number.is_empty() {
            return Err(invalid());
        }
        let n: u64 = number
            .parse()
            .map_err(|_| MemSizeError::TooLarge(spec.to_string()))?;
        n.checked_shl(shift)
            .filter(|v| v >> shift == n)
            .ok_or_else(|| MemSizeError::TooLarge(spec.to_string()))?
    };
    if bytes > MAX_RAM_SIZE {
        return Err(MemSizeError::TooLarge(spec.to_string()));
    }
    if bytes < MIN_RAM_SIZE {
        return Err(MemSizeError::TooSmall(spec.to_string()));
    }
    // QEMU rounds the size up to a page (it actually requires 8 KiB alignment for some machines); we round to
    // 4 KiB so that every region is page-aligned.
    Ok((bytes + 0xFFF) & !0xFFF)
}

/// One contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RamRegion {
    /// Guest physical start address.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRegion {
    /// The first address after the region.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// The guest's RAM: one region from 0 (at most [`LOW_RAM_SPLIT`] long when the RAM size reaches
/// [`LOW_RAM_SPLIT_THRESHOLD`]), and the rest from 4 GiB. RAM never covers the LAPIC page at 0xFEE00000.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryLayout {
    /// Total RAM size in bytes.
    pub ram_size: u64,
    /// The RAM regions in address order (one or two).
    pub regions: Vec<RamRegion>,
}

impl MemoryLayout {
    /// The layout for `ram_size` bytes of RAM (page-aligned, as [`parse_mem_size`] returns it).
    pub fn new(ram_size: u64) -> MemoryLayout {
        let low = if ram_size >= LOW_RAM_SPLIT_THRESHOLD {
            LOW_RAM_SPLIT
        } else {
            ram_size
        };
        let mut regions = vec![RamRegion {
            start: 0,
            size: low,
        }];
        if ram_size > low {
            regions.push(RamRegion {
                start: FOUR_GIB,
                size: ram_size - low,
            });
        }
        MemoryLayout { ram_size, regions }
    }

    /// RAM below 4 GiB, in bytes.
    pub fn low_ram_size(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.start < FOUR_GIB)
            .map(|r| r.size)
            .sum()
    }

    /// RAM at or above 4 GiB, in bytes.
    pub fn high_ram_size(&self) -> u64 {
        self.ram_size - self.low_ram_size()
    }

    /// Whether `[addr, addr + len)` lies entirely inside one RAM region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| {
            self.regions
                .iter()
                .any(|r| addr >= r.start && end <= r.end())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_sizes() {
        let cases: &[(&str, Result<u64, ()>)] = &[
            ("128", Ok(128 * MIB)),
            ("128M", Ok(128 * MIB)),
            ("128m", Ok(128 * MIB)),
            ("2G", Ok(2 * GIB)),
            ("2g", Ok(2 * GIB)),
            ("1.5G", Ok(3 * GIB / 2)),
            ("4096K", Ok(4 * MIB)),
            ("size=256M", Ok(256 * MIB)),
            ("1T", Ok(1 << 40)),
            ("8388608B", Ok(8 * MIB)),
            ("2T", Err(())),
            ("1", Err(())),
            ("", Err(())),
            ("abc", Err(())),
            ("12X", Err(())),
            ("-5", Err(())),
            ("1.2.3G", Err(())),
            ("128M,slots=2", Err(())),
            ("99999999999999999999", Err(())),
            ("18446744073709551615G", Err(())),
        ];
        for (spec, expected) in cases {
            let got = parse_mem_size(spec).map_err(|_| ());
            assert_eq!(got, *expected, "{spec}");
        }
    }

    #[test]
    fn layout_keeps_the_hole_free() {
        let cases: &[(u64, &[(u64, u64)])] = &[
            (128 * MIB, &[(0, 128 * MIB)]),
            (3 * GIB, &[(0, 3 * GIB)]),
            (0xDFFF_F000, &[(0, 0xDFFF_F000)]),
            (0xE000_0000, &[(0, 0xC000_0000), (FOUR_GIB, 0x2000_0000)]),
            (8 * GIB, &[(0, 3 * GIB), (FOUR_GIB, 5 * GIB)]),
        ];
        for (size, regions) in cases {
            let layout = MemoryLayout::new(*size);
            let got: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.start, r.size)).collect();
            assert_eq!(got, regions.to_vec(), "size {size:#x}");
            assert_eq!(layout.low_ram_size() + layout.high_ram_size(), *size);
            assert!(
                !layout.contains(0xFEE0_0000, 4),
                "LAPIC page covered for {size:#x}"
            );
        }
    }

    #[test]
    fn contains_checks_bounds() {
        let layout = MemoryLayout::new(8 * GIB);
        let cases: &[(u64, u64, bool)] = &[
            (0, 4096, true),
            (3 * GIB - 4096, 4096, true),
            (3 * GIB - 4096, 8192, false),
            (FOUR_GIB, 5 * GIB, true),
            (FOUR_GIB, 5 * GIB + 1, false),
            (u64::MAX, 2, false),
        ];
        for (addr, len, expected) in cases {
            assert_eq!(
                layout.contains(*addr, *len),
                *expected,
                "{addr:#x}+{len:#x}"
            );
        }
    }
}

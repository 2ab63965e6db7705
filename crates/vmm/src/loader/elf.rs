//! Minimal ELF32/ELF64 parsing: just the header fields and `PT_LOAD` program headers the loaders need.
//! Every read is bounds-checked; malformed input yields an error string, never a panic.

/// `EM_386`.
pub const EM_386: u16 = 3;
/// `EM_X86_64`.
pub const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
/// Bound on the number of program headers accepted (far above anything real).
const MAX_PHNUM: usize = 4096;

/// One loadable segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    /// File offset of the segment's data.
    pub offset: u64,
    /// Physical load address.
    pub paddr: u64,
    /// Virtual address.
    pub vaddr: u64,
    /// `p_flags` (bit 0: executable).
    pub flags: u32,
    /// Bytes taken from the file.
    pub filesz: u64,
    /// Bytes in memory (the rest after `filesz` is zero-filled).
    pub memsz: u64,
}

/// The parts of an ELF image the loaders use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage {
    /// ELF64 (true) or ELF32.
    pub is_64: bool,
    /// `e_machine`.
    pub machine: u16,
    /// `e_entry`.
    pub entry: u64,
    /// `PT_LOAD` segments with a non-zero `p_memsz`, in file order.
    pub segments: Vec<LoadSegment>,
}

impl ElfImage {
    /// The entry point as a physical address, as QEMU's ELF loader computes it: when `e_entry` lies in the
    /// file-backed part of an executable segment whose virtual and physical addresses differ, it is
    /// translated to the physical address (higher-half kernels); otherwise it is `e_entry` unchanged.
    pub fn physical_entry(&self) -> u64 {
        let mut entry = self.entry;
        for s in &self.segments {
            if s.vaddr != s.paddr
                && s.flags & PF_X != 0
                && self.entry >= s.vaddr
                && self.entry - s.vaddr < s.filesz
            {
                entry = self.entry - s.vaddr + s.paddr;
            }
        }
        entry
    }

    /// Lowest load address and end (exclusive) of the highest segment, or `None` without segments.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let low = self.segments.iter().map(|s| s.paddr).min()?;
        let high = self
            .segments
            .iter()
            .map(|s| s.paddr.saturating_add(s.memsz))
            .max()?;
        Some((low, high))
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Whether the file starts with the ELF magic.
pub fn is_elf(b: &[u8]) -> bool {
    b.starts_with(b"\x7fELF")
}

/// Whether the file is an ELF64 little-endian x86-64 image (header only; not validated further).
pub fn is_elf64_x86_64(b: &[u8]) -> bool {
    is_elf(b) && b.get(4) == Some(&ELFCLASS64) && u16_at(b, 18) == Some(EM_X86_64)
}

/// `e_machine` read at its fixed offset 18, whatever the class (QEMU reads it this way for its x86-64 check).
pub fn machine_at_fixed_offset(b: &[u8]) -> Option<u16> {
    u16_at(b, 18)
}

/// Parses the ELF header and `PT_LOAD` program headers. Errors are `(truncated, message)`: `truncated` tells
/// that the file ends early rather than being malformed.
pub fn parse(b: &[u8]) -> Result<ElfImage, (bool, String)> {
    let bad = |m: String| Err((false, m));
    let short = |m: String| Err((true, m));
    if !is_elf(b) {
        return bad("no ELF magic".into());
    }
    let class = match b.get(4) {
        Some(&c) => c,
        None => return short("ELF identification is cut off".into()),
    };
    let is_64 = match class {
        ELFCLASS32 => false,
        ELFCLASS64 => true,
        other => return bad(format!("unknown ELF class {other}")),
    };
    match b.get(5) {
        Some(&ELFDATA2LSB) => {}
        Some(other) => return bad(format!("not little-endian (EI_DATA {other})")),
        None => return short("ELF identification is cut off".into()),
    }
    let ehsize = if is_64 { 64 } else { 52 };
    if b.len() < ehsize {
        return short(format!(
            "the file has {} bytes, fewer than the {ehsize}-byte ELF header",
            b.len()
        ));
    }
    // The header is complete from here on, so the fixed-offset reads below succeed.
    let e_type = u16_at(b, 16).unwrap_or(0);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return bad(format!(
            "e_type {e_type} is not an executable (ET_EXEC or ET_DYN)"
        ));
    }
    let machine = u16_at(b, 18).unwrap_or(0);
    let (entry, phoff, phentsize, phnum) = if is_64 {
        (
            u64_at(b, 24).unwrap_or(0),
            u64_at(b, 32).unwrap_or(0),
            u16_at(b, 54).unwrap_or(0),
            u16_at(b, 56).unwrap_or(0),
        )
    } else {
        (
            u64::from(u32_at(b, 24).unwrap_or(0)),
            u64::from(u32_at(b, 28).unwrap_or(0)),
            u16_at(b, 42).unwrap_or(0),
            u16_at(b, 44).unwrap_or(0),
        )
    };
    let want_phentsize = if is_64 { 56 } else { 32 };
    if phnum == 0 {
        return bad("no program headers".into());
    }
    if usize::from(phentsize) != want_phentsize {
        return bad(format!(
            "e_phentsize is {phentsize}, expected {want_phentsize}"
        ));
    }
    let phnum = usize::from(phnum);
    if phnum > MAX_PHNUM {
        return bad(format!("too many program headers ({phnum})"));
    }
    let table_len = (phnum * want_phentsize) as u64;
    let table_end = match phoff.checked_add(table_len) {
        Some(e) => e,
        None => return bad(format!("program header offset {phoff:#x} overflows")),
    };
    if table_end > b.len() as u64 {
        return short(format!(
            "the program headers end at {table_end:#x}, beyond the end of the file ({:#x})",
            b.len()
        ));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        // phoff + i * phentsize fits in the file, hence in usize.
        let ph = (phoff as usize) + i * want_phentsize;
        let p_type = u32_at(b, ph).unwrap_or(0);
        if p_type != PT_LOAD {
            continue;
        }
        let seg = if is_64 {
            LoadSegment {
                offset: u64_at(b, ph + 8).unwrap_or(0),
                paddr: u64_at(b, ph + 24).unwrap_or(0),
                vaddr: u64_at(b, ph + 16).unwrap_or(0),
                flags: u32_at(b, ph + 4).unwrap_or(0),
                filesz: u64_at(b, ph + 32).unwrap_or(0),
                memsz: u64_at(b, ph + 40).unwrap_or(0),
            }
        } else {
            LoadSegment {
                offset: u64::from(u32_at(b, ph + 4).unwrap_or(0)),
                paddr: u64::from(u32_at(b, ph + 12).unwrap_or(0)),
                vaddr: u64::from(u32_at(b, ph + 8).unwrap_or(0)),
                flags: u32_at(b, ph + 24).unwrap_or(0),
                filesz: u64::from(u32_at(b, ph + 16).unwrap_or(0)),
                memsz: u64::from(u32_at(b, ph + 20).unwrap_or(0)),
            }
        };
        if seg.filesz > seg.memsz {
            return bad(format!(
                "segment {i}: p_filesz {:#x} is larger than p_memsz {:#x}",
                seg.filesz, seg.memsz
            ));
        }
        if seg.paddr.checked_add(seg.memsz).is_none() {
            return bad(format!(
                "segment {i}: address {:#x} + size {:#x} overflows",
                seg.paddr, seg.memsz
            ));
        }
        match seg.offset.checked_add(seg.filesz) {
            Some(end) if end <= b.len() as u64 => {}
            _ => {
                return short(format!(
                    "segment {i} needs file bytes {:#x}..{:#x}, but the file has {:#x} bytes",
                    seg.offset,
                    seg.offset.saturating_add(seg.filesz),
                    b.len()
                ))
            }
        }
        if seg.memsz == 0 {
            continue;
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return bad("no loadable (PT_LOAD) segment".into());
    }
    Ok(ElfImage {
        is_64,
        machine,
        entry,
        segments,
    })
}

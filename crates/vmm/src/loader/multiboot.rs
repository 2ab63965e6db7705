//! Multiboot v1 loading with QEMU's `-kernel` semantics (`hw/i386/multiboot.c` plus its option ROM), and the
//! Multiboot information block shared with the 64-bit ELF loader.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::elf::{self, EM_386, EM_X86_64};
use super::long_mode::write_gdt;
use super::{
    describe_layout, page_align, write_mem, zero_mem, BootState, KernelKind, LoadError,
    LoadedKernel, Module, RamLayout, BOOT_GDT, BOOT_LOADER_NAME, FOUR_GIB, MBI_ADDR,
    MBI_BOOT_DEVICE, MBI_FLAGS, MMAP_ADDR, MULTIBOOT_BOOTLOADER_MAGIC, PAGE_SIZE,
};

/// The Multiboot v1 header magic.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Header flag bit 2: video mode information requested (QEMU does not support it and says so).
pub const MULTIBOOT_FLAG_VIDEO: u32 = 1 << 2;
/// Header flag bit 16: the header's address fields are valid ("a.out kludge").
pub const MULTIBOOT_FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// QEMU's message for the video flag (printed on stderr; the boot continues).
pub const VBE_WARNING: &str = "qemu: multiboot knows VBE. we don't.";
/// Bytes of the file searched for the header.
const SEARCH_LEN: usize = 8192;
/// Size of the MBI as QEMU writes it.
const MBI_SIZE: usize = 88;
/// Size of one module entry.
const MOD_ENTRY_SIZE: u64 = 16;
/// The area QEMU reserves for the memory map and the MBI.
const MB_AREA: (u64, u64) = (MMAP_ADDR, MMAP_ADDR + PAGE_SIZE);

/// A Multiboot v1 header found in a kernel file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootHeader {
    /// File offset of the magic.
    pub offset: usize,
    /// The header's flags.
    pub flags: u32,
    /// The address fields `[header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr]`, if the file is
    /// long enough to hold them.
    pub addresses: Option<[u32; 5]>,
}

/// One memory map entry (`size` = 20 in the guest, not stored here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Base address.
    pub base: u64,
    /// Length in bytes.
    pub length: u64,
    /// 1 = usable RAM, 2 = reserved.
    pub kind: u32,
}

impl MemoryMapEntry {
    /// Usable RAM.
    pub const RAM: u32 = 1;
    /// Reserved.
    pub const RESERVED: u32 = 2;

    /// The 24 bytes of the entry as the guest sees it: `u32 size (20); u64 base; u64 length; u32 type`.
    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&20u32.to_le_bytes());
        b[4..12].copy_from_slice(&self.base.to_le_bytes());
        b[12..20].copy_from_slice(&self.length.to_le_bytes());
        b[20..24].copy_from_slice(&self.kind.to_le_bytes());
        b
    }
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Finds the first valid Multiboot v1 header: the magic at a 4-byte-aligned offset below 8192 − 48 with
/// `magic + flags + checksum == 0` (mod 2^32), as QEMU scans.
pub fn find_multiboot_header(kernel: &[u8]) -> Option<MultibootHeader> {
    (0..SEARCH_LEN - 48).step_by(4).find_map(|offset| {
        if le32(kernel, offset)? != MULTIBOOT_HEADER_MAGIC {
            return None;
        }
        let flags = le32(kernel, offset + 4)?;
        let checksum = le32(kernel, offset + 8)?;
        if MULTIBOOT_HEADER_MAGIC
            .wrapping_add(flags)
            .wrapping_add(checksum)
            != 0
        {
            return None;
        }
        let mut fields = [0u32; 5];
        let mut complete = true;
        for (i, f) in fields.iter_mut().enumerate() {
            match le32(kernel, offset + 12 + 4 * i) {
                Some(v) => *f = v,
                None => complete = false,
            }
        }
        Some(MultibootHeader {
            offset,
            flags,
            addresses: complete.then_some(fields),
        })
    })
}

/// The memory map QEMU's Multiboot boot reports (SeaBIOS's e820 table), for the real RAM layout:
/// usable `[0, 0x9FC00)`, reserved EBDA `[0x9FC00, 0xA0000)`, reserved BIOS `[0xF0000, 0x100000)`, usable
/// `[1 MiB, below_4g)`, reserved `[0xFEFFC000, 0xFF000000)` (QEMU's KVM TSS/identity-map pages), reserved BIOS
/// ROM `[0xFFFC0000, 4 GiB)`, and usable `[4 GiB, 4 GiB + above_4g)` when there is RAM above 4 GiB.
/// Unlike SeaBIOS, no RAM is withheld at the top of low memory (there are no ACPI tables).
pub fn build_memory_map(layout: &RamLayout) -> Vec<MemoryMapEntry> {
    let ram = |base, length| MemoryMapEntry {
        base,
        length,
        kind: MemoryMapEntry::RAM,
    };
    let reserved = |base, length| MemoryMapEntry {
        base,
        length,
        kind: MemoryMapEntry::RESERVED,
    };
    let mut map = vec![
        ram(0, 0x9_FC00),
        reserved(0x9_FC00, 0x400),
        reserved(0xF_0000, 0x1_0000),
    ];
    if layout.below_4g > 0x10_0000 {
        map.push(ram(0x10_0000, layout.below_4g - 0x10_0000));
    }
    map.push(reserved(0xFEFF_C000, 0x4000));
    map.push(reserved(0xFFFC_0000, 0x4_0000));
    if layout.above_4g > 0 {
        map.push(ram(FOUR_GIB, layout.above_4g));
    }
    map
}

/// Checks that `[start, end)` (a piece of the kernel image) is inside RAM, below 4 GiB when `below_4g_only`,
/// and clear of the loader's own areas.
pub(super) fn check_image_range(
    layout: &RamLayout,
    path: &str,
    what: &str,
    start: u64,
    end: u64,
    below_4g_only: bool,
    reserved: &[(&'static str, u64, u64)],
) -> Result<(), LoadError> {
    let in_ram = if below_4g_only {
        end <= layout.below_4g && start < end
    } else {
        layout.contains(start, end.saturating_sub(start))
    };
    if !in_ram {
        let mut ram = describe_layout(layout);
        if below_4g_only && layout.above_4g > 0 {
            ram.push_str("; Multiboot images must be in RAM below 4 GiB");
        }
        return Err(LoadError::OutsideRam {
            path: path.to_string(),
            what: what.to_string(),
            start,
            end,
            ram,
        });
    }
    for &(area, area_start, area_end) in reserved {
        if start < area_end && area_start < end {
            return Err(LoadError::OverlapsLoaderData {
                path: path.to_string(),
                what: what.to_string(),
                start,
                end,
                area,
                area_start,
                area_end,
            });
        }
    }
    Ok(())
}

/// The loader's own memory for one kind of kernel.
pub(super) struct LoaderAreas {
    /// Named ranges the image and the data after it must not overlap.
    pub areas: &'static [(&'static str, u64, u64)],
    /// A range reported as reserved (type 2) in the memory map, carved out of usable RAM.
    pub withheld: Option<(u64, u64)>,
}

/// Loader areas a Multiboot image must not overlap. The memory map is exactly QEMU's.
const MULTIBOOT_RESERVED: &[(&str, u64, u64)] = &[
    ("boot GDT", BOOT_GDT, BOOT_GDT + PAGE_SIZE),
    ("memory map and Multiboot information", MB_AREA.0, MB_AREA.1),
];

/// The Multiboot loader's areas.
const MULTIBOOT_AREAS: LoaderAreas = LoaderAreas {
    areas: MULTIBOOT_RESERVED,
    withheld: None,
};

/// Marks `[start, end)` as reserved in `map`, splitting the usable entries it overlaps. Keeps the map sorted.
pub(super) fn withhold(map: &[MemoryMapEntry], start: u64, end: u64) -> Vec<MemoryMapEntry> {
    let mut out = Vec::with_capacity(map.len() + 2);
    for e in map {
        let e_end = e.base + e.length;
        if e.kind != MemoryMapEntry::RAM || end <= e.base || e_end <= start {
            out.push(*e);
            continue;
        }
        let (cut_start, cut_end) = (start.max(e.base), end.min(e_end));
        for (base, limit, kind) in [
            (e.base, cut_start, MemoryMapEntry::RAM),
            (cut_start, cut_end, MemoryMapEntry::RESERVED),
            (cut_end, e_end, MemoryMapEntry::RAM),
        ] {
            if limit > base {
                out.push(MemoryMapEntry {
                    base,
                    length: limit - base,
                    kind,
                });
            }
        }
    }
    out
}

/// Where the loader data after the image goes (QEMU's layout, offsets from the image start).
#[derive(Debug, Clone, PartialEq, Eq)]
struct InfoLayout {
    mods_addr: u64,
    cmdlines_addr: u64,
    bootloader_addr: u64,
    module_addrs: Vec<u64>,
    end: u64,
}

fn info_layout(
    image_start: u64,
    image_end: u64,
    kernel_path: &str,
    append: &str,
    modules: &[Module],
) -> InfoLayout {
    let n = modules.len() as u64;
    let mut size = page_align(image_end - image_start);
    let offset_mbinfo = size;
    // QEMU reserves room for: kernel path + NUL, append + NUL, and the whole -initrd argument + NUL.
    let mut cmdline_len = kernel_path.len() as u64 + 1 + append.len() as u64 + 1;
    if n > 0 {
        let initrd_len: u64 = modules.iter().map(|m| m.text.len() as u64).sum::<u64>() + (n - 1);
        cmdline_len += initrd_len + 1;
    }
    size = size
        .saturating_add(cmdline_len)
        .saturating_add(MOD_ENTRY_SIZE * n)
        .saturating_add(BOOT_LOADER_NAME.len() as u64 + 1);
    size = page_align(size);
    let offset_cmdlines = offset_mbinfo + MOD_ENTRY_SIZE * n;
    let offset_bootloader = offset_cmdlines + cmdline_len;
    let mut module_addrs = Vec::with_capacity(modules.len());
    for m in modules {
        module_addrs.push(image_start.saturating_add(size));
        size = page_align(size.saturating_add(m.data.len() as u64));
    }
    InfoLayout {
        mods_addr: image_start.saturating_add(offset_mbinfo),
        cmdlines_addr: image_start.saturating_add(offset_cmdlines),
        bootloader_addr: image_start.saturating_add(offset_bootloader),
        module_addrs,
        end: image_start.saturating_add(size),
    }
}

/// Writes the memory map, the MBI, the module list, the command lines, the boot loader name and the modules,
/// laid out as QEMU does after the page-aligned end of the image. Returns the end of the loader data and the
/// memory map written.
pub(super) fn write_boot_info<M>(
    mem: &M,
    layout: &RamLayout,
    (image_start, image_end): (u64, u64),
    kernel_path: &str,
    append: &str,
    modules: &[Module],
    areas: &LoaderAreas,
) -> Result<(u64, Vec<MemoryMapEntry>), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let info = info_layout(image_start, image_end, kernel_path, append, modules);
    if info.end > layout.below_4g {
        return Err(LoadError::NoRoom {
            need: info.end,
            have: layout.below_4g,
        });
    }
    for &(area, area_start, area_end) in areas.areas {
        if info.mods_addr < area_end && area_start < info.end {
            return Err(LoadError::OverlapsLoaderData {
                path: kernel_path.to_string(),
                what: "the Multiboot module list, command lines and modules".into(),
                start: info.mods_addr,
                end: info.end,
                area,
                area_start,
                area_end,
            });
        }
    }
    let mods_len = info.end - info.mods_addr;
    zero_mem(mem, info.mods_addr, mods_len)?;

    // Command lines: each module's text, then the kernel command line; then the boot loader name.
    let mut string_at = info.cmdlines_addr;
    let mut put_string = |s: &str| -> Result<u64, LoadError> {
        let at = string_at;
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        write_mem(mem, at, &bytes)?;
        string_at += bytes.len() as u64;
        Ok(at)
    };
    let mut entries = Vec::with_capacity(modules.len() * MOD_ENTRY_SIZE as usize);
    for (m, &start) in modules.iter().zip(&info.module_addrs) {
        let text_addr = put_string(&m.text)?;
        write_mem(mem, start, &m.data)?;
        let end = start + m.data.len() as u64;
        // All addresses are below `layout.below_4g` <= 4 GiB, checked above.
        entries.extend_from_slice(&(start as u32).to_le_bytes());
        entries.extend_from_slice(&(end as u32).to_le_bytes());
        entries.extend_from_slice(&(text_addr as u32).to_le_bytes());
        entries.extend_from_slice(&0u32.to_le_bytes());
    }
    let cmdline_addr = put_string(&format!("{kernel_path} {append}"))?;
    write_mem(mem, info.mods_addr, &entries)?;
    let mut name = BOOT_LOADER_NAME.as_bytes().to_vec();
    name.push(0);
    write_mem(mem, info.bootloader_addr, &name)?;

    // Memory map and MBI in QEMU's fixed page.
    zero_mem(mem, MB_AREA.0, MB_AREA.1 - MB_AREA.0)?;
    let mut map = build_memory_map(layout);
    if let Some((start, end)) = areas.withheld {
        map = withhold(&map, start, end);
    }
    let map_bytes: Vec<u8> = map.iter().flat_map(|e| e.to_bytes()).collect();
    write_mem(mem, MMAP_ADDR, &map_bytes)?;

    let mem_upper_end = map
        .iter()
        .find(|e| e.kind == MemoryMapEntry::RAM && e.base == 0x10_0000)
        .map_or(0x10_0000, |e| e.base + e.length);
    let mut mbi = [0u8; MBI_SIZE];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(0, MBI_FLAGS);
    put(4, 0x9_FC00 / 1024);
    put(8, ((mem_upper_end - 0x10_0000) / 1024) as u32);
    put(12, MBI_BOOT_DEVICE);
    put(16, cmdline_addr as u32);
    put(20, modules.len() as u32);
    put(24, info.mods_addr as u32);
    put(44, map_bytes.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, info.bootloader_addr as u32);
    write_mem(mem, MBI_ADDR, &mbi)?;
    Ok((info.end, map))
}

/// Loads a Multiboot kernel whose header was found.
pub(super) fn load<M>(
    mem: &M,
    layout: &RamLayout,
    kernel: &[u8],
    path: &str,
    append: &str,
    modules: &[Module],
    header: &MultibootHeader,
) -> Result<LoadedKernel, LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let mut warnings = Vec::new();
    if header.flags & MULTIBOOT_FLAG_VIDEO != 0 {
        warnings.push(VBE_WARNING.to_string());
    }
    let (kind, entry, image_start, image_end) = if header.flags & MULTIBOOT_FLAG_AOUT_KLUDGE == 0 {
        load_elf32(mem, layout, kernel, path)?
    } else {
        load_aout(mem, layout, kernel, path, header)?
    };
    let (loader_end, memory_map) = write_boot_info(
        mem,
        layout,
        (image_start, image_end),
        path,
        append,
        modules,
        &MULTIBOOT_AREAS,
    )?;
    write_gdt(mem)?;
    Ok(LoadedKernel {
        kind,
        boot: BootState::Protected32 {
            eip: entry,
            eax: MULTIBOOT_BOOTLOADER_MAGIC,
            ebx: MBI_ADDR as u32,
        },
        image_start,
        image_end,
        loader_end,
        memory_map,
        warnings,
    })
}

/// Loads the ELF32 program headers (flags bit 16 clear). Returns (kind, entry, image start, image end).
fn load_elf32<M>(
    mem: &M,
    layout: &RamLayout,
    kernel: &[u8],
    path: &str,
) -> Result<(KernelKind, u32, u64, u64), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    if elf::machine_at_fixed_offset(kernel) == Some(EM_X86_64) {
        return Err(LoadError::X86_64Multiboot);
    }
    let bad = |reason: String| LoadError::BadElf {
        path: path.to_string(),
        reason,
    };
    if !elf::is_elf(kernel) {
        return Err(bad("the Multiboot header does not set the address fields (flags bit 16), so the file must be a 32-bit ELF, but it has no ELF magic".into()));
    }
    let image = elf::parse(kernel).map_err(|(truncated, reason)| {
        if truncated {
            LoadError::Truncated {
                path: path.to_string(),
                reason,
            }
        } else {
            bad(reason)
        }
    })?;
    if image.is_64 {
        return Err(bad(
            "a Multiboot kernel must be a 32-bit ELF (ELFCLASS32)".into()
        ));
    }
    if image.machine != EM_386 {
        return Err(bad(format!(
            "e_machine is {}, expected EM_386 (3)",
            image.machine
        )));
    }
    for (i, s) in image.segments.iter().enumerate() {
        check_image_range(
            layout,
            path,
            &format!("segment {i}"),
            s.paddr,
            s.paddr + s.memsz,
            true,
            MULTIBOOT_RESERVED,
        )?;
    }
    load_segments(mem, kernel, path, &image.segments)?;
    let Some((low, high)) = image.bounds() else {
        return Err(bad("no loadable segment".into()));
    };
    // ELF32: the entry comes from a 32-bit field and segment addresses are 32-bit, so it fits.
    Ok((
        KernelKind::MultibootElf,
        image.physical_entry() as u32,
        low,
        high,
    ))
}

/// Copies `p_filesz` bytes of each segment and zero-fills the rest up to `p_memsz`. The segments were
/// validated against the file and RAM by the caller.
pub(super) fn load_segments<M>(
    mem: &M,
    kernel: &[u8],
    path: &str,
    segments: &[elf::LoadSegment],
) -> Result<(), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    for s in segments {
        let from = usize::try_from(s.offset).unwrap_or(usize::MAX);
        let len = usize::try_from(s.filesz).unwrap_or(usize::MAX);
        let data = from
            .checked_add(len)
            .and_then(|end| kernel.get(from..end))
            .ok_or_else(|| LoadError::Truncated {
                path: path.to_string(),
                reason: format!("segment data at file offset {:#x}", s.offset),
            })?;
        write_mem(mem, s.paddr, data)?;
        zero_mem(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
    }
    Ok(())
}

/// Loads by the header's address fields (flags bit 16). Returns (kind, entry, image start, image end).
fn load_aout<M>(
    mem: &M,
    layout: &RamLayout,
    kernel: &[u8],
    path: &str,
    header: &MultibootHeader,
) -> Result<(KernelKind, u32, u64, u64), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let bad = |reason: String| LoadError::BadMultiboot {
        path: path.to_string(),
        reason,
    };
    let Some([header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr]) = header.addresses
    else {
        return Err(LoadError::Truncated {
            path: path.to_string(),
            reason: "the file ends inside the Multiboot header's address fields".into(),
        });
    };
    if header_addr < load_addr {
        return Err(bad(format!(
            "header_addr {header_addr:#x} is below load_addr {load_addr:#x}"
        )));
    }
    let delta = u64::from(header_addr - load_addr);
    let offset = header.offset as u64;
    if delta > offset {
        return Err(bad(format!(
            "header_addr {header_addr:#x} - load_addr {load_addr:#x} = {delta:#x} is larger than the header's file offset {offset:#x}"
        )));
    }
    let text_offset = offset - delta;
    let file_len = kernel.len() as u64;
    let load_size = if load_end_addr != 0 {
        if load_end_addr < load_addr {
            return Err(bad(format!(
                "load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            )));
        }
        u64::from(load_end_addr - load_addr)
    } else {
        file_len - text_offset
    };
    if text_offset + load_size > file_len {
        return Err(LoadError::Truncated {
            path: path.to_string(),
            reason: format!(
                "the header asks for {load_size:#x} bytes from file offset {text_offset:#x}, but the file has {file_len:#x} bytes"
            ),
        });
    }
    let load_start = u64::from(load_addr);
    let kernel_size = if bss_end_addr != 0 {
        if u64::from(bss_end_addr) < load_start + load_size {
            return Err(bad(format!(
                "bss_end_addr {bss_end_addr:#x} is below the end of the loaded data {:#x}",
                load_start + load_size
            )));
        }
        u64::from(bss_end_addr) - load_start
    } else {
        load_size
    };
    if kernel_size == 0 {
        return Err(bad("the image is empty".into()));
    }
    let end = load_start + kernel_size;
    check_image_range(
        layout,
        path,
        "the image",
        load_start,
        end,
        true,
        MULTIBOOT_RESERVED,
    )?;
    let seg = elf::LoadSegment {
        offset: text_offset,
        paddr: load_start,
        vaddr: load_start,
        flags: 0,
        filesz: load_size,
        memsz: kernel_size,
    };
    load_segments(mem, kernel, path, &[seg])?;
    Ok((KernelKind::MultibootAout, entry_addr, load_start, end))
}

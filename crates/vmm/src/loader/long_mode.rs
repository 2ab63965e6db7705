//! 64-bit ELF kernels entered directly in long mode: identity page tables, the boot GDT, and the register
//! values of both entry states.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::elf::{self, EM_X86_64};
use super::multiboot::{check_image_range, load_segments, write_boot_info, LoaderAreas};
use super::{
    write_mem, BootRegs, BootState, KernelKind, LoadError, LoadedKernel, Module, RamLayout,
    Segment, BOOT_GDT, BOOT_PD, BOOT_PDPT, BOOT_PML4, MBI_ADDR, MMAP_ADDR,
    MULTIBOOT_BOOTLOADER_MAGIC, PAGE_SIZE, SEL_CODE32, SEL_CODE64, SEL_DATA,
};

/// The boot GDT: null, 64-bit code (0x08), flat data (0x10), flat 32-bit code (0x18).
pub const BOOT_GDT_ENTRIES: [u64; 4] = [
    0,
    0x00AF_9B00_0000_FFFF, // 64-bit code: G, L, P, DPL 0, S, type 0xB (execute/read, accessed)
    0x00CF_9300_0000_FFFF, // data: G, D/B, P, DPL 0, S, type 0x3 (read/write, accessed)
    0x00CF_9B00_0000_FFFF, // 32-bit code: G, D/B, P, DPL 0, S, type 0xB
];

/// Page-table entry bits used by the identity map: present, writable, user (so CPL-3 test code can use the
/// same tables as long as CR4.SMEP/SMAP are off), and page size (2 MiB) in the page directories.
pub const PTE_PRESENT: u64 = 1;
/// Writable.
pub const PTE_WRITE: u64 = 1 << 1;
/// User-accessible.
pub const PTE_USER: u64 = 1 << 2;
/// 2 MiB page (in a page-directory entry).
pub const PTE_PS: u64 = 1 << 7;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The long-mode loader's areas: the page tables and the GDT are also reported as reserved in the memory map,
/// so a kernel that allocates from the usable entries does not overwrite the tables it runs on.
const LONG_MODE_AREAS: LoaderAreas = LoaderAreas {
    areas: LONG_MODE_RESERVED,
    withheld: Some((BOOT_PML4, BOOT_GDT + PAGE_SIZE)),
};

/// Loader areas a 64-bit image must not overlap.
const LONG_MODE_RESERVED: &[(&str, u64, u64)] = &[
    ("identity page tables", BOOT_PML4, BOOT_GDT),
    ("boot GDT", BOOT_GDT, BOOT_GDT + PAGE_SIZE),
    (
        "memory map and Multiboot information",
        MMAP_ADDR,
        MMAP_ADDR + PAGE_SIZE,
    ),
];

/// Writes the boot GDT ([`BOOT_GDT_ENTRIES`]) at [`BOOT_GDT`].
pub fn write_gdt<M>(mem: &M) -> Result<(), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let bytes: Vec<u8> = BOOT_GDT_ENTRIES
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    write_mem(mem, BOOT_GDT, &bytes)
}

/// Writes page tables that identity-map the low 4 GiB with 2 MiB pages: PML4 at [`BOOT_PML4`] (entry 0 only),
/// PDPT at [`BOOT_PDPT`] (entries 0..4), page directories at [`BOOT_PD`]..+0x4000. Returns the CR3 value.
pub fn write_identity_page_tables<M>(mem: &M) -> Result<u64, LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    let mut pml4 = vec![0u8; PAGE_SIZE as usize];
    pml4[0..8].copy_from_slice(&(BOOT_PDPT | flags).to_le_bytes());
    write_mem(mem, BOOT_PML4, &pml4)?;

    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    for i in 0..4u64 {
        let at = (i * 8) as usize;
        pdpt[at..at + 8].copy_from_slice(&((BOOT_PD + i * PAGE_SIZE) | flags).to_le_bytes());
    }
    write_mem(mem, BOOT_PDPT, &pdpt)?;

    let mut pds = vec![0u8; 4 * PAGE_SIZE as usize];
    for (i, chunk) in pds.chunks_exact_mut(8).enumerate() {
        let addr = (i as u64) << 21;
        chunk.copy_from_slice(&(addr | flags | PTE_PS).to_le_bytes());
    }
    write_mem(mem, BOOT_PD, &pds)?;
    Ok(BOOT_PML4)
}

/// Loads an ELF64 x86-64 kernel for a direct long-mode entry.
pub(super) fn load<M>(
    mem: &M,
    layout: &RamLayout,
    kernel: &[u8],
    path: &str,
    append: &str,
    modules: &[Module],
) -> Result<LoadedKernel, LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    let image = elf::parse(kernel).map_err(|(truncated, reason)| {
        if truncated {
            LoadError::Truncated {
                path: path.to_string(),
                reason,
            }
        } else {
            LoadError::BadElf {
                path: path.to_string(),
                reason,
            }
        }
    })?;
    if !image.is_64 || image.machine != EM_X86_64 {
        return Err(LoadError::BadElf {
            path: path.to_string(),
            reason: "expected an ELF64 x86-64 image".into(),
        });
    }
    for (i, s) in image.segments.iter().enumerate() {
        check_image_range(
            layout,
            path,
            &format!("segment {i}"),
            s.paddr,
            s.paddr + s.memsz,
            false,
            LONG_MODE_RESERVED,
        )?;
    }
    let Some((low, high)) = image.bounds() else {
        return Err(LoadError::BadElf {
            path: path.to_string(),
            reason: "no loadable segment".into(),
        });
    };
    load_segments(mem, kernel, path, &image.segments)?;
    let (loader_end, memory_map) = write_boot_info(
        mem,
        layout,
        (low, high),
        path,
        append,
        modules,
        &LONG_MODE_AREAS,
    )?;
    let cr3 = write_identity_page_tables(mem)?;
    write_gdt(mem)?;
    Ok(LoadedKernel {
        kind: KernelKind::Elf64,
        boot: BootState::Long64 {
            rip: image.physical_entry(),
            rax: u64::from(MULTIBOOT_BOOTLOADER_MAGIC),
            rbx: MBI_ADDR,
            cr3,
            gdt_base: BOOT_GDT,
            gdt_limit: (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16,
        },
        image_start: low,
        image_end: high,
        loader_end,
        memory_map,
        warnings: Vec::new(),
    })
}

/// A flat code or data segment (base 0, 4 GiB limit, DPL 0).
fn flat(selector: u16, type_: u8, db: u8, l: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
    }
}

/// The register values of an entry state.
pub(super) fn boot_regs(state: &BootState) -> BootRegs {
    let data = flat(SEL_DATA, 0x3, 1, 0);
    let tr = Segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        type_: 0xB, // busy TSS (32-bit in protected mode, 64-bit in long mode)
        present: 1,
        ..Segment::default()
    };
    let ldt = Segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Segment::default()
    };
    let gdt_limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    match *state {
        BootState::Protected32 { eip, eax, ebx } => BootRegs {
            rip: u64::from(eip),
            rax: u64::from(eax),
            rbx: u64::from(ebx),
            rsp: 0,
            rflags: 0x2,
            cr0: CR0_PE | CR0_ET,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: flat(SEL_CODE32, 0xB, 1, 0),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt,
            gdt_base: BOOT_GDT,
            gdt_limit,
            idt_base: 0,
            idt_limit: 0,
        },
        BootState::Long64 {
            rip,
            rax,
            rbx,
            cr3,
            gdt_base,
            gdt_limit,
        } => BootRegs {
            rip,
            rax,
            rbx,
            rsp: 0,
            rflags: 0x2,
            cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            cs: flat(SEL_CODE64, 0xB, 0, 1),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt,
            gdt_base,
            gdt_limit,
            idt_base: 0,
            idt_limit: 0,
        },
    }
}

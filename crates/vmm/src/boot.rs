//! Entry states: the Multiboot 32-bit protected-mode state, the 64-bit long-mode state (with the VMM's identity
//! page tables), and the real-mode state an AP starts in after a SIPI.
//!
//! Long-mode contract (agreed with the loader and the guest runtime): CPL 0, paging on with an identity map of
//! the low 4 GiB using 2 MiB pages (PML4 at [`BOOT_PML4`], PDPT at [`BOOT_PDPT`], page directories at
//! [`BOOT_PD`]..+0x4000), a flat GDT at [`BOOT_GDT`] with a 64-bit code segment (selector 0x08) and a data
//! segment (0x10), interrupts off, RAX = 0x2BADB002, RBX = the Multiboot information block, RIP = `e_entry`.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_GDT, BOOT_PD, BOOT_PDPT, BOOT_PML4};

/// The Multiboot v1 bootloader magic passed in EAX.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// GDT selector of the 64-bit code segment.
pub const SEL_CODE64: u16 = 0x08;
/// GDT selector of the flat data segment.
pub const SEL_DATA: u16 = 0x10;
/// GDT selector of the flat 32-bit code segment.
pub const SEL_CODE32: u16 = 0x18;

/// The boot GDT: null, 64-bit code, flat data, flat 32-bit code.
pub const BOOT_GDT_ENTRIES: [u64; 4] = [
    0,
    0x00AF_9B00_0000_FFFF, // 64-bit code: P, DPL0, S, type 0xB, L, G
    0x00CF_9300_0000_FFFF, // data: P, DPL0, S, type 0x3, D/B, G
    0x00CF_9B00_0000_FFFF, // 32-bit code: P, DPL0, S, type 0xB, D/B, G
];

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The mode a kernel is entered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Multiboot: 32-bit protected mode, paging off, flat segments.
    Protected32,
    /// 64-bit long mode with the VMM's identity map of the low 4 GiB.
    Long64,
}

/// Where and how the bootstrap processor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// The entry mode.
    pub mode: EntryMode,
    /// The entry point (EIP/RIP).
    pub entry: u64,
    /// The value of EBX/RBX: the physical address of the Multiboot information block.
    pub mbi: u64,
}

/// Writes the boot GDT and, for long mode, the identity page tables into guest memory.
pub fn write_boot_structures(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), String> {
    let err = |e: vm_memory::GuestMemoryError| format!("cannot write the boot structures: {e}");
    for (i, d) in BOOT_GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(err)?;
    }
    if mode == EntryMode::Long64 {
        mem.write_obj(BOOT_PDPT | 0x3, GuestAddress(BOOT_PML4))
            .map_err(err)?;
        for i in 0..4u64 {
            let pd = BOOT_PD + i * 0x1000;
            mem.write_obj(pd | 0x3, GuestAddress(BOOT_PDPT + 8 * i))
                .map_err(err)?;
            let mut table = [0u8; 4096];
            for (j, chunk) in table.chunks_exact_mut(8).enumerate() {
                let phys = (i << 30) | ((j as u64) << 21);
                chunk.copy_from_slice(&(phys | 0x83).to_le_bytes()); // P, RW, PS
            }
            mem.write_slice(&table, GuestAddress(pd)).map_err(err)?;
        }
    }
    Ok(())
}

fn flat_segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long && code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets `sregs` and `regs` to the entry state of `entry` (the rest of `sregs` keeps its reset values).
pub fn set_entry_state(entry: &BootEntry, sregs: &mut kvm_sregs, regs: &mut kvm_regs) {
    let long = entry.mode == EntryMode::Long64;
    let code_sel = if long { SEL_CODE64 } else { SEL_CODE32 };
    sregs.cs = flat_segment(code_sel, true, long);
    let data = flat_segment(SEL_DATA, false, long);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    if long {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        sregs.cr3 = BOOT_PML4;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    *regs = kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        rax: u64::from(MULTIBOOT_BOOTLOADER_MAGIC),
        rbx: entry.mbi,
        ..Default::default()
    };
}

/// Sets the real-mode state an AP starts in after a SIPI with `vector`: CS = vector << 8, IP = 0.
pub fn set_sipi_state(vector: u8, sregs: &mut kvm_sregs, regs: &mut kvm_regs) {
    sregs.cs.selector = u16::from(vector) << 8;
    sregs.cs.base = u64::from(vector) << 12;
    sregs.cs.limit = 0xFFFF;
    regs.rip = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_page_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_structures(&mem, EntryMode::Long64).unwrap();
        let cases: &[u64] = &[
            0,
            0x20_0000,
            0x40_0000,
            0xFEE0_0000,
            0xFFFF_FFFF,
            0x1_2345_6789 & 0xFFFF_FFFF,
        ];
        for &va in cases {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(BOOT_PML4 + 8 * ((va >> 39) & 0x1FF)))
                .unwrap();
            assert_eq!(pml4e & 1, 1);
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xFFF) + 8 * ((va >> 30) & 0x1FF)))
                .unwrap();
            assert_eq!(pdpte & 1, 1);
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xFFF) + 8 * ((va >> 21) & 0x1FF)))
                .unwrap();
            assert_eq!(pde & 0x81, 0x81, "large and present for {va:#x}");
            let pa = (pde & !0x1F_FFFF & 0x000F_FFFF_FFFF_F000) | (va & 0x1F_FFFF);
            assert_eq!(pa, va);
        }
    }

    #[test]
    fn entry_state_matches_contract() {
        let cases = [
            (EntryMode::Protected32, SEL_CODE32, 0x11u64, 0u64),
            (
                EntryMode::Long64,
                SEL_CODE64,
                0x8000_0031,
                EFER_LME | EFER_LMA,
            ),
        ];
        for (mode, cs, cr0, efer) in cases {
            let mut sregs = kvm_sregs::default();
            let mut regs = kvm_regs::default();
            let entry = BootEntry {
                mode,
                entry: 0x40_1000,
                mbi: 0x9500,
            };
            set_entry_state(&entry, &mut sregs, &mut regs);
            assert_eq!(sregs.cs.selector, cs);
            assert_eq!(sregs.cr0, cr0);
            assert_eq!(sregs.efer, efer);
            assert_eq!(regs.rip, 0x40_1000);
            assert_eq!(regs.rbx, 0x9500);
            assert_eq!(regs.rax, 0x2BAD_B002);
            assert_eq!(regs.rflags & 0x200, 0, "IF must be clear");
        }
    }
}

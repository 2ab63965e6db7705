//! Diagnostics: register dumps in QEMU's spirit, and reading guest instruction bytes through the guest's page
//! tables.

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;

/// One line with the general-purpose registers and the main system registers.
pub fn format_regs(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x} RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x} \
         R8={:016x} R9={:016x} R10={:016x} R11={:016x} R12={:016x} R13={:016x} R14={:016x} R15={:016x} \
         RIP={:016x} RFL={:08x} CS={:04x}(base {:x}) SS={:04x} DS={:04x} CR0={:08x} CR2={:016x} CR3={:016x} \
         CR4={:08x} EFER={:x} GDT={:x}/{:x} IDT={:x}/{:x}",
        regs.rax,
        regs.rbx,
        regs.rcx,
        regs.rdx,
        regs.rsi,
        regs.rdi,
        regs.rbp,
        regs.rsp,
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rip,
        regs.rflags,
        sregs.cs.selector,
        sregs.cs.base,
        sregs.ss.selector,
        sregs.ds.selector,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.gdt.base,
        sregs.gdt.limit,
        sregs.idt.base,
        sregs.idt.limit,
    )
}

/// Translates a linear address to a guest physical address with the paging mode in `sregs` (none, 32-bit,
/// PAE, 4-level or 5-level). `None` when a table entry is not present or unreadable.
pub fn translate(mem: &GuestMemoryMmap, sregs: &kvm_sregs, linear: u64) -> Option<u64> {
    if sregs.cr0 & CR0_PG == 0 {
        return Some(linear & 0xFFFF_FFFF);
    }
    let read64 = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    let addr_mask = 0x000F_FFFF_FFFF_F000u64;
    if sregs.efer & EFER_LMA != 0 || sregs.cr4 & CR4_PAE != 0 {
        let (mut table, levels) = if sregs.efer & EFER_LMA != 0 {
            (
                sregs.cr3 & addr_mask,
                if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 },
            )
        } else {
            // PAE: the PDPT is 32-byte aligned and indexed by bits 31:30.
            let pdpte = read64((sregs.cr3 & 0xFFFF_FFE0) + 8 * ((linear >> 30) & 3))?;
            if pdpte & 1 == 0 {
                return None;
            }
            (pdpte & addr_mask, 2)
        };
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let entry = read64(table + 8 * ((linear >> shift) & 0x1FF))?;
            if entry & 1 == 0 {
                return None;
            }
            if level == 1 {
                return Some((entry & addr_mask) | (linear & 0xFFF));
            }
            if entry & 0x80 != 0 && level <= 3 {
                let page_mask = (1u64 << shift) - 1;
                return Some((entry & addr_mask & !page_mask) | (linear & page_mask));
            }
            table = entry & addr_mask;
        }
        None
    } else {
        let read32 = |addr: u64| mem.read_obj::<u32>(GuestAddress(addr)).ok();
        let linear = linear & 0xFFFF_FFFF;
        let pde = read32((sregs.cr3 & 0xFFFF_F000) + 4 * (linear >> 22))?;
        if pde & 1 == 0 {
            return None;
        }
        if pde & 0x80 != 0 && sregs.cr4 & CR4_PSE != 0 {
            return Some(u64::from(pde & 0xFFC0_0000) | (linear & 0x3F_FFFF));
        }
        let pte = read32(u64::from(pde & 0xFFFF_F000) + 4 * ((linear >> 12) & 0x3FF))?;
        if pte & 1 == 0 {
            return None;
        }
        Some(u64::from(pte & 0xFFFF_F000) | (linear & 0xFFF))
    }
}

/// Reads up to `len` instruction bytes at CS.base + RIP, page by page through the guest page tables. Stops at
/// the first byte that cannot be translated or read.
pub fn instruction_bytes(
    mem: &GuestMemoryMmap,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    len: usize,
) -> Vec<u8> {
    let long = sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0;
    let mut linear = if long {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip) & 0xFFFF_FFFF
    };
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let Some(phys) = translate(mem, sregs, linear) else {
            break;
        };
        let in_page = (0x1000 - (linear & 0xFFF)) as usize;
        let n = in_page.min(len - out.len());
        let mut buf = vec![0u8; n];
        if mem.read_slice(&mut buf, GuestAddress(phys)).is_err() {
            break;
        }
        out.extend_from_slice(&buf);
        linear = linear.wrapping_add(n as u64);
    }
    out
}

/// Formats bytes as space-separated hex ("0f 01 c1"), or "(unreadable)".
pub fn hex_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(unreadable)".to_string();
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The part of an emulation-failure report that names the bytes KVM's emulator fetched, when KVM supplied them
/// (`ndata` covers the flags and `flags` has `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`). Those are the
/// bytes the emulator failed on; guest memory may hold other bytes by the time the VMM reads it (code rewritten by
/// another vCPU), so both are worth printing. Empty when KVM gave none.
pub fn emulation_failure_bytes(ndata: u32, flags: u64, size: u8, bytes: &[u8; 15]) -> String {
    let flag = u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
    if ndata < 3 || flags & flag == 0 || size == 0 {
        return String::new();
    }
    let n = usize::from(size).min(bytes.len());
    format!(", fetched bytes {}", hex_bytes(&bytes[..n]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap()
    }

    #[test]
    fn reads_through_paging_modes() {
        let m = mem();
        // Code bytes at physical 0x30_0ff0.. crossing a page into 0x30_1000.
        let code: Vec<u8> = (0..32u8).collect();
        m.write_slice(&code, GuestAddress(0x30_0FF0)).unwrap();

        // 4-level: PML4 0x1000, PDPT 0x2000, PD 0x3000 with a 2 MiB page mapping VA 0x40_0000 -> PA 0x20_0000,
        // and a 4 KiB PT at 0x4000 for VA 0x60_0000.. -> PA 0x30_0000 + i*0x1000.
        m.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        m.write_obj(0x20_0083u64, GuestAddress(0x3000 + 8 * 2))
            .unwrap();
        m.write_obj(0x4003u64, GuestAddress(0x3000 + 8 * 3))
            .unwrap();
        m.write_obj(0x30_0003u64, GuestAddress(0x4000)).unwrap();
        m.write_obj(0x30_1003u64, GuestAddress(0x4008)).unwrap();

        let mut long = kvm_sregs {
            cr0: CR0_PG | 1,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            cr3: 0x1000,
            ..Default::default()
        };
        long.cs.l = 1;

        let mut flat = kvm_sregs {
            cr0: 1,
            ..Default::default()
        };
        flat.cs.base = 0x30_0000;

        let cases: &[(&kvm_sregs, u64, Option<u64>)] = &[
            (&long, 0x40_1234, Some(0x20_1234)),
            (&long, 0x60_0FF0, Some(0x30_0FF0)),
            (&long, 0x60_1004, Some(0x30_1004)),
            (&long, 0x80_0000, None),
            (&flat, 0x1234, Some(0x1234)),
        ];
        for (sregs, va, pa) in cases {
            assert_eq!(translate(&m, sregs, *va), *pa, "{va:#x}");
        }

        let regs = kvm_regs {
            rip: 0x60_0FF0,
            ..Default::default()
        };
        assert_eq!(instruction_bytes(&m, &regs, &long, 32), code);
        let regs = kvm_regs {
            rip: 0xFF0,
            ..Default::default()
        };
        assert_eq!(instruction_bytes(&m, &regs, &flat, 4), vec![0, 1, 2, 3]);
        assert_eq!(hex_bytes(&[0xf0, 0x48, 0x0f]), "f0 48 0f");
        assert_eq!(hex_bytes(&[]), "(unreadable)");
    }

    #[test]
    fn emulation_failure_bytes_only_when_kvm_supplied_them() {
        let mut b = [0u8; 15];
        b[..3].copy_from_slice(&[0x0F, 0xE4, 0xC3]);
        let cases: &[(u32, u64, u8, &str)] = &[
            (3, 1, 3, ", fetched bytes 0f e4 c3"),
            (3, 1, 2, ", fetched bytes 0f e4"),
            (
                4,
                3,
                15,
                ", fetched bytes 0f e4 c3 00 00 00 00 00 00 00 00 00 00 00 00",
            ),
            (
                3,
                1,
                200,
                ", fetched bytes 0f e4 c3 00 00 00 00 00 00 00 00 00 00 00 00",
            ),
            (2, 1, 3, ""),
            (3, 0, 3, ""),
            (3, 1, 0, ""),
        ];
        for &(ndata, flags, size, want) in cases {
            assert_eq!(
                emulation_failure_bytes(ndata, flags, size, &b),
                want,
                "{ndata} {flags} {size}"
            );
        }
    }
}

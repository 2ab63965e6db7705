//! Folding the hypercall page's `ret` into the hypercall exit.
//!
//! The page is `out 0xE4, al; ret`. On this host KVM emulates guest supervisor code, about 1 µs per
//! instruction, so the `ret` that follows the `out` costs a noticeable share of a hypercall round trip. After
//! the engine completed a hypercall, the VMM can perform that `ret` itself while it writes the result registers
//! back: RIP = the 8-byte return address at `[RSP]`, RSP += 8. It does so only when the outcome is certain to be
//! the one the processor would produce; in every other case the guest executes its `ret` as before:
//!
//! - 64-bit mode (EFER.LMA and CS.L) at CPL 0 (SS.DPL and CS.DPL both 0);
//! - RFLAGS.TF clear (a single-step trap after the `ret` would otherwise be lost) and CR4.CET clear (a `ret`
//!   with supervisor shadow stacks also pops and compares the shadow stack, which the VMM cannot see without an
//!   ioctl);
//! - the byte at RIP is `C3` in guest memory now, fetched through the guest's page tables as the processor
//!   would: present at every level, no reserved bit set, accessed bits set, not execute-disabled, not a user
//!   page under CR4.SMEP. RIP is the address after the `out`: KVM completes an emulated `out` before it exits
//!   to userspace. (A KVM that completes the `out` only on the next KVM_RUN reports RIP at the `out`, whose
//!   opcode is E6, so the fold simply never happens there);
//! - the 8 bytes at RSP..RSP+7 are canonical and readable as a supervisor data read through the page tables
//!   (same checks; a user page only without SMAP — or with RFLAGS.AC set — and without protection keys, a
//!   supervisor page only without CR4.PKS), in guest RAM (never MMIO), possibly across two pages;
//! - the popped return address is canonical (a real `ret` raises #GP otherwise; the guest gets to do that).
//!
//! A `ret` at CPL 0 in 64-bit mode has no other architectural checks (no segment limits, no alignment check
//! at CPL 0, no operand-size prefix since the byte at RIP is the opcode itself). Not observable any more: an
//! instruction breakpoint (DR0-DR3) on the `ret` and a data breakpoint on the return-address slot (the debug
//! registers are not in the sync-regs area; reading them would cost as much as the exit), and the `ret` in a
//! performance counter of retired instructions. RFLAGS.RF is cleared, as after any completed instruction.
//! `ENLIGHTEN_NO_RET_FOLD=1` in the VMM's environment turns the fold off (a diagnostic for benchmarks).

use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
const CR4_CET: u64 = 1 << 23;
const CR4_PKS: u64 = 1 << 24;
const CR4_LA57: u64 = 1 << 12;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_AC: u64 = 1 << 18;

const PTE_P: u64 = 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_PS: u64 = 1 << 7;
const PTE_XD: u64 = 1 << 63;
/// Bits 51:12 of a paging-structure entry or of CR3: the physical address of the next table or page.
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// The opcode of a near `ret`.
const RET: u8 = hyperv::hcpage::RET;

/// The environment variable that turns the fold off.
pub const NO_RET_FOLD_ENV: &str = "ENLIGHTEN_NO_RET_FOLD";

/// What the machine allows the guest's paging to use (from its CPUID table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldConfig {
    /// The fold is on (it is unless `ENLIGHTEN_NO_RET_FOLD` is set to something other than `0` or empty).
    pub enabled: bool,
    /// 1 GiB pages are advertised (CPUID 0x80000001.EDX bit 26); without them PS in a PDPTE is a reserved bit.
    pub gib_pages: bool,
}

impl FoldConfig {
    /// From the guest's CPUID table and the VMM's environment.
    pub fn new(cpuid: &[hyperv::cpuid::CpuidEntry]) -> FoldConfig {
        let gib_pages = cpuid
            .iter()
            .any(|e| e.function == 0x8000_0001 && e.index == 0 && e.edx & (1 << 26) != 0);
        let disabled = std::env::var_os(NO_RET_FOLD_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        FoldConfig {
            enabled: !disabled,
            gib_pages,
        }
    }
}

/// Why the VMM left the `ret` to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoFold {
    /// `ENLIGHTEN_NO_RET_FOLD` is set.
    Disabled,
    /// Not 64-bit mode, or paging off.
    NotLongMode,
    /// CPL > 0.
    NotCpl0,
    /// RFLAGS.TF is set.
    TrapFlag,
    /// CR4.CET: a `ret` may also use the shadow stack.
    ShadowStack,
    /// An address is not canonical: RIP, RSP, RSP+7, or the return address.
    NonCanonical,
    /// A page walk failed: an entry not present, with a reserved bit, not accessed, or outside RAM.
    Walk,
    /// The fetch of the byte at RIP would fault (execute-disabled page, or a user page under SMEP).
    NotExecutable,
    /// The stack read would fault or depends on state the VMM does not have (SMAP, protection keys).
    StackAccess,
    /// The byte at RIP is not `ret`.
    NotRet,
    /// The bytes could not be read from guest RAM (MMIO or beyond RAM).
    NotRam,
}

/// A linear-to-physical translation with the access rights accumulated over the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The physical address.
    pub phys: u64,
    /// U/S set at every level: a user page.
    pub user: bool,
    /// XD set at some level (and EFER.NXE on): instruction fetches fault.
    pub no_exec: bool,
}

/// Whether `addr` is canonical for a linear-address width of `bits` (48 or 57).
fn canonical(addr: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Walks 4-level or 5-level paging (IA-32e mode) for `linear`. Refuses (returns `None`) whenever the
/// processor would fault or the result is not certain: an entry not present, a reserved bit set (XD without
/// EFER.NXE, PS in a PML5E/PML4E, PS in a PDPTE without 1 GiB pages, the reserved low bits of a large-page
/// address), an accessed bit clear (a real access would set it), or a table outside guest RAM. Physical
/// address bits above MAXPHYADDR are not checked one by one: an address with such bits set lies beyond guest
/// RAM, so its read fails here as well.
pub fn walk_long(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    gib_pages: bool,
    linear: u64,
) -> Option<Walk> {
    if sregs.cr0 & CR0_PG == 0 || sregs.efer & EFER_LMA == 0 {
        return None;
    }
    let levels: u32 = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let nxe = sregs.efer & EFER_NXE != 0;
    let mut table = sregs.cr3 & ADDR_MASK;
    let mut user = true;
    let mut no_exec = false;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        // One atomic 8-byte load per entry, as the processor reads it: another vCPU may be rewriting the entry.
        let entry: u64 = mem
            .load(
                GuestAddress(table + 8 * ((linear >> shift) & 0x1FF)),
                Ordering::Relaxed,
            )
            .ok()?;
        if entry & PTE_P == 0 || entry & PTE_A == 0 {
            return None;
        }
        if entry & PTE_XD != 0 {
            if !nxe {
                return None;
            }
            no_exec = true;
        }
        user &= entry & PTE_US != 0;
        let large = level > 1 && entry & PTE_PS != 0;
        if large {
            match level {
                2 => {}
                3 if gib_pages => {}
                _ => return None,
            }
            let page_mask = (1u64 << shift) - 1;
            // Bit 12 is PAT; bits shift-1..13 must be zero.
            if entry & ADDR_MASK & page_mask & !(1 << 12) != 0 {
                return None;
            }
        }
        if level == 1 || large {
            let page_mask = (1u64 << shift) - 1;
            return Some(Walk {
                phys: (entry & ADDR_MASK & !page_mask) | (linear & page_mask),
                user,
                no_exec,
            });
        }
        table = entry & ADDR_MASK;
    }
    None
}

/// Performs the `ret` at RIP on `regs` if that is safe (see the module documentation): RIP = the return
/// address, RSP += 8, RFLAGS.RF cleared. Leaves `regs` unchanged and says why otherwise. Call only after the
/// engine completed a hypercall (never when it injects #UD).
pub fn fold_ret(
    mem: &GuestMemoryMmap,
    cfg: FoldConfig,
    regs: &mut kvm_regs,
    sregs: &kvm_sregs,
) -> Result<(), NoFold> {
    if !cfg.enabled {
        return Err(NoFold::Disabled);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cs.l == 0 || sregs.cr0 & CR0_PG == 0 {
        return Err(NoFold::NotLongMode);
    }
    if sregs.ss.dpl != 0 || sregs.cs.dpl != 0 {
        return Err(NoFold::NotCpl0);
    }
    if regs.rflags & RFLAGS_TF != 0 {
        return Err(NoFold::TrapFlag);
    }
    if sregs.cr4 & CR4_CET != 0 {
        return Err(NoFold::ShadowStack);
    }
    let bits = if sregs.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
    let rsp = regs.rsp;
    let rsp_end = rsp.wrapping_add(7);
    if !canonical(regs.rip, bits) || !canonical(rsp, bits) || !canonical(rsp_end, bits) {
        return Err(NoFold::NonCanonical);
    }
    // The instruction fetch.
    let code = walk_long(mem, sregs, cfg.gib_pages, regs.rip).ok_or(NoFold::Walk)?;
    if code.no_exec || (code.user && sregs.cr4 & CR4_SMEP != 0) {
        return Err(NoFold::NotExecutable);
    }
    let opcode: u8 = mem
        .read_obj(GuestAddress(code.phys))
        .map_err(|_| NoFold::NotRam)?;
    if opcode != RET {
        return Err(NoFold::NotRet);
    }
    // The stack read, one or two pages.
    let mut bytes = [0u8; 8];
    let first = (0x1000 - (rsp & 0xFFF)).min(8) as usize;
    for (part, linear) in [(0..first, rsp), (first..8, rsp.wrapping_add(first as u64))] {
        if part.is_empty() {
            continue;
        }
        let w = walk_long(mem, sregs, cfg.gib_pages, linear).ok_or(NoFold::Walk)?;
        let allowed = if w.user {
            (sregs.cr4 & CR4_SMAP == 0 || regs.rflags & RFLAGS_AC != 0) && sregs.cr4 & CR4_PKE == 0
        } else {
            sregs.cr4 & CR4_PKS == 0
        };
        if !allowed {
            return Err(NoFold::StackAccess);
        }
        if part.len() == 8 && w.phys.is_multiple_of(8) {
            // An aligned return address is read in one access, as the processor does.
            let v: u64 = mem
                .load(GuestAddress(w.phys), Ordering::Relaxed)
                .map_err(|_| NoFold::NotRam)?;
            bytes = v.to_le_bytes();
        } else {
            mem.read_slice(&mut bytes[part], GuestAddress(w.phys))
                .map_err(|_| NoFold::NotRam)?;
        }
    }
    let target = u64::from_le_bytes(bytes);
    if !canonical(target, bits) {
        return Err(NoFold::NonCanonical);
    }
    regs.rip = target;
    regs.rsp = rsp.wrapping_add(8);
    regs.rflags &= !RFLAGS_RF;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;
    /// Flags of an accessed, writable, present supervisor table entry.
    const SUP: u64 = PTE_P | 2 | PTE_A;
    const USR: u64 = SUP | PTE_US;

    /// Guest memory with 4-level tables: VA 0..2 MiB through a 4 KiB page table (VA page i → PA 0x10_0000 +
    /// i * 0x1000 for i < 16, except page 3 → PA 0x20_0000 and page 4 → PA 0x10_8000, so that the stack that
    /// crosses from page 3 into page 4 lands in two distant frames), VA 2..4 MiB a 2 MiB page at PA 0x40_0000.
    fn setup(user: bool) -> GuestMemoryMmap {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let f = if user { USR } else { SUP };
        m.write_obj(PDPT | f, GuestAddress(PML4)).unwrap();
        m.write_obj(PD | f, GuestAddress(PDPT)).unwrap();
        m.write_obj(PT | f, GuestAddress(PD)).unwrap();
        m.write_obj(0x40_0000 | f | PTE_PS, GuestAddress(PD + 8))
            .unwrap();
        for i in 0..16u64 {
            let pa = match i {
                3 => 0x20_0000,
                4 => 0x10_8000,
                _ => 0x10_0000 + i * 0x1000,
            };
            m.write_obj(pa | f, GuestAddress(PT + 8 * i)).unwrap();
        }
        m
    }

    fn long_sregs() -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: CR0_PG | 1,
            cr4: 1 << 5,
            efer: EFER_LMA | (1 << 8) | EFER_NXE,
            cr3: PML4,
            ..Default::default()
        };
        s.cs.l = 1;
        s
    }

    const CODE_VA: u64 = 0x1002; // page 1, after a two-byte `out` at 0x1000
    const CODE_PA: u64 = 0x10_1002;
    const STACK_VA: u64 = 0x2FF0; // page 2
    const STACK_PA: u64 = 0x10_2FF0;
    const TARGET: u64 = 0x0000_7FFF_1234_5678;

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: CODE_VA,
            rsp: STACK_VA,
            rflags: 2 | RFLAGS_RF,
            rax: 0x55,
            rbx: 0x66,
            ..Default::default()
        }
    }

    fn on() -> FoldConfig {
        FoldConfig {
            enabled: true,
            gib_pages: true,
        }
    }

    #[test]
    fn canonical_widths() {
        let cases = [
            (0u64, 48u32, true),
            (0x0000_7FFF_FFFF_FFFF, 48, true),
            (0x0000_8000_0000_0000, 48, false),
            (0xFFFF_8000_0000_0000, 48, true),
            (0xFFFF_7FFF_FFFF_FFFF, 48, false),
            (0x0000_8000_0000_0000, 57, true),
            (0x00FF_FFFF_FFFF_FFFF, 57, true),
            (0x0100_0000_0000_0000, 57, false),
            (0xFF00_0000_0000_0000, 57, true),
        ];
        for (a, bits, want) in cases {
            assert_eq!(canonical(a, bits), want, "{a:#x}/{bits}");
        }
    }

    #[test]
    fn page_walk() {
        type Mutate = fn(&GuestMemoryMmap, &mut kvm_sregs);
        /// (physical address, user page, execute-disabled)
        type Want = Option<(u64, bool, bool)>;
        let none: Mutate = |_, _| {};
        // (description, change to the memory and sregs, gib_pages, linear, expected walk)
        let cases: &[(&str, Mutate, bool, u64, Want)] = &[
            (
                "4 KiB page",
                none,
                true,
                0x1234,
                Some((0x10_1234, false, false)),
            ),
            (
                "remapped page",
                none,
                true,
                0x3FF8,
                Some((0x20_0FF8, false, false)),
            ),
            (
                "2 MiB page",
                none,
                true,
                0x23_4567,
                Some((0x43_4567, false, false)),
            ),
            ("PDE not present", none, true, 0x40_0000, None),
            ("PTE not present", none, true, 0x10_0000, None),
            (
                "user page",
                |m, _| {
                    for a in [PML4, PDPT, PD, PT + 8] {
                        let e: u64 = m.read_obj(GuestAddress(a)).unwrap();
                        m.write_obj(e | PTE_US, GuestAddress(a)).unwrap();
                    }
                },
                true,
                0x1010,
                Some((0x10_1010, true, false)),
            ),
            (
                "U/S clear at one level: supervisor",
                |m, _| m.write_obj(0x10_1000 | USR, GuestAddress(PT + 8)).unwrap(),
                true,
                0x1010,
                Some((0x10_1010, false, false)),
            ),
            (
                "XD with NXE",
                |m, _| {
                    m.write_obj(0x10_1000 | SUP | PTE_XD, GuestAddress(PT + 8))
                        .unwrap()
                },
                true,
                0x1010,
                Some((0x10_1010, false, true)),
            ),
            (
                "XD without NXE is reserved",
                |m, s| {
                    m.write_obj(0x10_1000 | SUP | PTE_XD, GuestAddress(PT + 8))
                        .unwrap();
                    s.efer &= !EFER_NXE;
                },
                true,
                0x1010,
                None,
            ),
            (
                "PTE not accessed",
                |m, _| {
                    m.write_obj(0x10_1000 | PTE_P, GuestAddress(PT + 8))
                        .unwrap()
                },
                true,
                0x1010,
                None,
            ),
            (
                "PML4E not accessed",
                |m, _| m.write_obj(PDPT | PTE_P, GuestAddress(PML4)).unwrap(),
                true,
                0x1010,
                None,
            ),
            (
                "PS in a PML4E is reserved",
                |m, _| {
                    m.write_obj(PDPT | SUP | PTE_PS, GuestAddress(PML4))
                        .unwrap()
                },
                true,
                0x1010,
                None,
            ),
            (
                "1 GiB page",
                |m, _| {
                    m.write_obj(0x4000_0000 | SUP | PTE_PS, GuestAddress(PDPT + 8))
                        .unwrap()
                },
                true,
                0x4000_1234,
                Some((0x4000_1234, false, false)),
            ),
            (
                "1 GiB page without the CPUID bit",
                |m, _| {
                    m.write_obj(0x4000_0000 | SUP | PTE_PS, GuestAddress(PDPT + 8))
                        .unwrap()
                },
                false,
                0x4000_1234,
                None,
            ),
            (
                "2 MiB page with a reserved address bit",
                |m, _| {
                    m.write_obj(0x40_2000 | SUP | PTE_PS, GuestAddress(PD + 8))
                        .unwrap()
                },
                true,
                0x20_0000,
                None,
            ),
            (
                "2 MiB page with PAT",
                |m, _| {
                    m.write_obj(0x40_1000 | SUP | PTE_PS, GuestAddress(PD + 8))
                        .unwrap()
                },
                true,
                0x20_0010,
                Some((0x40_0010, false, false)),
            ),
            (
                "table beyond RAM",
                |m, _| m.write_obj(0x1_0000_0000 | SUP, GuestAddress(PD)).unwrap(),
                true,
                0x1010,
                None,
            ),
            ("paging off", |_, s| s.cr0 &= !CR0_PG, true, 0x1010, None),
            (
                "5-level paging",
                |m, s| {
                    // PML5 at 0x5000 whose entry 0 points at the PML4.
                    m.write_obj(PML4 | SUP, GuestAddress(0x5000)).unwrap();
                    s.cr3 = 0x5000;
                    s.cr4 |= CR4_LA57;
                },
                true,
                0x1010,
                Some((0x10_1010, false, false)),
            ),
        ];
        for &(what, mutate, gib, linear, want) in cases {
            let m = setup(false);
            let mut s = long_sregs();
            mutate(&m, &mut s);
            let got = walk_long(&m, &s, gib, linear).map(|w| (w.phys, w.user, w.no_exec));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn fold_decision() {
        type Mutate = fn(&GuestMemoryMmap, &mut kvm_regs, &mut kvm_sregs, &mut FoldConfig);
        let none: Mutate = |_, _, _, _| {};
        // (description, user pages, change, expected result; a fold must pop the word at STACK_PA)
        let cases: &[(&str, bool, Mutate, Result<(), NoFold>)] = &[
            ("plain", false, none, Ok(())),
            ("user pages without SMEP/SMAP", true, none, Ok(())),
            (
                "disabled",
                false,
                |_, _, _, c| c.enabled = false,
                Err(NoFold::Disabled),
            ),
            (
                "compatibility mode",
                false,
                |_, _, s, _| s.cs.l = 0,
                Err(NoFold::NotLongMode),
            ),
            (
                "protected mode",
                false,
                |_, _, s, _| {
                    s.efer = 0;
                    s.cs.l = 0
                },
                Err(NoFold::NotLongMode),
            ),
            (
                "CPL 3",
                false,
                |_, _, s, _| s.ss.dpl = 3,
                Err(NoFold::NotCpl0),
            ),
            (
                "CS.DPL 3",
                false,
                |_, _, s, _| s.cs.dpl = 3,
                Err(NoFold::NotCpl0),
            ),
            (
                "TF",
                false,
                |_, r, _, _| r.rflags |= RFLAGS_TF,
                Err(NoFold::TrapFlag),
            ),
            (
                "CET",
                false,
                |_, _, s, _| s.cr4 |= CR4_CET,
                Err(NoFold::ShadowStack),
            ),
            (
                "byte at RIP is not ret",
                false,
                |m, _, _, _| m.write_obj(0x90u8, GuestAddress(CODE_PA)).unwrap(),
                Err(NoFold::NotRet),
            ),
            (
                "RIP on an unmapped page",
                false,
                |_, r, _, _| r.rip = 0x10_0002,
                Err(NoFold::Walk),
            ),
            (
                "code page execute-disabled",
                false,
                |m, _, _, _| {
                    m.write_obj(0x10_1000 | SUP | PTE_XD, GuestAddress(PT + 8))
                        .unwrap()
                },
                Err(NoFold::NotExecutable),
            ),
            (
                "user code page under SMEP",
                true,
                |_, _, s, _| s.cr4 |= CR4_SMEP,
                Err(NoFold::NotExecutable),
            ),
            (
                "supervisor pages under SMEP and SMAP",
                false,
                |_, _, s, _| s.cr4 |= CR4_SMEP | CR4_SMAP,
                Ok(()),
            ),
            (
                "user stack under SMAP",
                true,
                |_, _, s, _| s.cr4 |= CR4_SMAP,
                Err(NoFold::StackAccess),
            ),
            (
                "user stack under SMAP with AC",
                true,
                |_, r, s, _| {
                    s.cr4 |= CR4_SMAP;
                    r.rflags |= RFLAGS_AC
                },
                Ok(()),
            ),
            (
                "user stack with protection keys",
                true,
                |_, _, s, _| s.cr4 |= CR4_PKE,
                Err(NoFold::StackAccess),
            ),
            (
                "supervisor stack with supervisor protection keys",
                false,
                |_, _, s, _| s.cr4 |= CR4_PKS,
                Err(NoFold::StackAccess),
            ),
            (
                "stack page not present",
                false,
                |_, r, _, _| r.rsp = 0x10_0000,
                Err(NoFold::Walk),
            ),
            (
                "stack page not accessed",
                false,
                |m, _, _, _| {
                    m.write_obj(0x10_2000 | PTE_P, GuestAddress(PT + 16))
                        .unwrap()
                },
                Err(NoFold::Walk),
            ),
            (
                "stack in MMIO (beyond RAM)",
                false,
                |m, _, _, _| {
                    m.write_obj(0xFEE0_0000 | SUP, GuestAddress(PT + 16))
                        .unwrap()
                },
                Err(NoFold::NotRam),
            ),
            (
                "second stack page not present",
                false,
                |_, r, _, _| r.rsp = 0xFFFC,
                Err(NoFold::Walk),
            ),
            (
                "non-canonical return address",
                false,
                |m, _, _, _| {
                    m.write_obj(0x0000_8000_0000_0000u64, GuestAddress(STACK_PA))
                        .unwrap()
                },
                Err(NoFold::NonCanonical),
            ),
            (
                "kernel-half return address",
                false,
                |m, _, _, _| {
                    m.write_obj(0xFFFF_8000_0000_1000u64, GuestAddress(STACK_PA))
                        .unwrap()
                },
                Ok(()),
            ),
            (
                "non-canonical RSP",
                false,
                |_, r, _, _| r.rsp = 0x0000_8000_0000_0000,
                Err(NoFold::NonCanonical),
            ),
            (
                "RSP+7 non-canonical",
                false,
                |_, r, _, _| r.rsp = 0x0000_7FFF_FFFF_FFFC,
                Err(NoFold::NonCanonical),
            ),
        ];
        for &(what, user, mutate, want) in cases {
            let m = setup(user);
            m.write_obj(RET, GuestAddress(CODE_PA)).unwrap();
            m.write_obj(TARGET, GuestAddress(STACK_PA)).unwrap();
            let mut r = regs();
            let mut s = long_sregs();
            let mut c = on();
            mutate(&m, &mut r, &mut s, &mut c);
            let before = r;
            let target: u64 = m.read_obj(GuestAddress(STACK_PA)).unwrap();
            let got = fold_ret(&m, c, &mut r, &s);
            assert_eq!(got, want, "{what}");
            if got.is_ok() {
                let want_regs = kvm_regs {
                    rip: target,
                    rsp: before.rsp + 8,
                    rflags: before.rflags & !RFLAGS_RF,
                    ..before
                };
                assert_eq!(r, want_regs, "{what}");
            } else {
                assert_eq!(r, before, "{what}: registers unchanged");
            }
        }
    }

    #[test]
    fn misaligned_return_address_in_one_page() {
        let m = setup(false);
        m.write_obj(RET, GuestAddress(CODE_PA)).unwrap();
        for off in 0..8u64 {
            let rsp = 0x2100 + off; // page 2 → PA 0x10_2000
            m.write_obj(TARGET + off, GuestAddress(0x10_2100 + off))
                .unwrap();
            let mut r = kvm_regs { rsp, ..regs() };
            assert_eq!(
                fold_ret(&m, on(), &mut r, &long_sregs()),
                Ok(()),
                "offset {off}"
            );
            assert_eq!((r.rip, r.rsp), (TARGET + off, rsp + 8), "offset {off}");
        }
    }

    #[test]
    fn return_address_across_two_pages() {
        // Page 3 maps to PA 0x20_0000, page 4 to PA 0x10_8000: the 8 bytes at RSP come from both frames.
        let m = setup(false);
        m.write_obj(RET, GuestAddress(CODE_PA)).unwrap();
        let bytes = TARGET.to_le_bytes();
        for split in 1..8u64 {
            let rsp = 0x4000 - split;
            m.write_slice(&bytes[..split as usize], GuestAddress(0x20_1000 - split))
                .unwrap();
            m.write_slice(&bytes[split as usize..], GuestAddress(0x10_8000))
                .unwrap();
            // What sits right after page 3's frame and before page 4's frame must not be used.
            m.write_obj(0xEEu8, GuestAddress(0x20_1000)).unwrap();
            m.write_obj(0xEEu8, GuestAddress(0x10_7FFF)).unwrap();
            let mut r = kvm_regs { rsp, ..regs() };
            assert_eq!(
                fold_ret(&m, on(), &mut r, &long_sregs()),
                Ok(()),
                "split {split}"
            );
            assert_eq!((r.rip, r.rsp), (TARGET, rsp + 8), "split {split}");
        }
    }
}

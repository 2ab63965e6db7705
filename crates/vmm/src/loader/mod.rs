//! Kernel loaders: Multiboot v1 (QEMU `-kernel` semantics) and 64-bit ELF kernels entered directly in long mode.
//!
//! Everything here is KVM-free: the loaders write guest memory through vm-memory's [`Bytes`] interface and
//! return a plain description of the entry state ([`BootState`], [`BootRegs`]) that the VMM copies into the
//! vCPU registers.
//!
//! Guest physical memory used by the loaders (all outside page 0, which test kernels use for their AP
//! trampoline):
//!
//! | Range | Content | Written for |
//! |---|---|---|
//! | 0x1000..0x7000 | identity page tables (PML4, PDPT, 4 page directories, 2 MiB pages, low 4 GiB) | 64-bit ELF |
//! | 0x7000..0x7020 | flat GDT: null, 64-bit code 0x08, data 0x10, 32-bit code 0x18 | both |
//! | 0x9000..0x9500 | Multiboot memory map (QEMU's `ADDR_E820_MAP`) | both |
//! | 0x9500..0x9558 | Multiboot information block (QEMU's `ADDR_MBI`) | both |
//! | page-aligned end of the image .. | module list, command lines, `"qemu"`, then the modules, each page-aligned | both |
//!
//! A kernel whose image (including its BSS) overlaps one of these areas is refused with a clear error.
//!
//! The Multiboot memory map is QEMU's (see [`build_memory_map`]); for a 64-bit ELF it additionally reports
//! 0x1000..0x8000 (page tables and GDT) as reserved.

mod elf;
mod long_mode;
mod multiboot;

use std::fmt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

pub use long_mode::{write_gdt, write_identity_page_tables, BOOT_GDT_ENTRIES};
pub use multiboot::{build_memory_map, find_multiboot_header, MemoryMapEntry, MultibootHeader};

/// 4 GiB: where RAM continues above the hole.
pub const FOUR_GIB: u64 = 1 << 32;
/// Page size used for aligning the loader data.
pub const PAGE_SIZE: u64 = 0x1000;

/// The Multiboot v1 bootloader magic passed in EAX/RAX.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// Physical address of the Multiboot memory map (QEMU: `ADDR_E820_MAP`).
pub const MMAP_ADDR: u64 = 0x9000;
/// Physical address of the Multiboot information block (QEMU: `ADDR_MBI`).
pub const MBI_ADDR: u64 = 0x9500;
/// The Multiboot information block's flags as QEMU sets them: memory, boot device, cmdline, modules, memory
/// map and boot loader name (bits 0, 1, 2, 3, 6, 9).
pub const MBI_FLAGS: u32 = 0x24F;
/// `boot_device` as QEMU reports it.
pub const MBI_BOOT_DEVICE: u32 = 0x8000_FFFF;
/// `boot_loader_name` as QEMU reports it.
pub const BOOT_LOADER_NAME: &str = "qemu";

/// The long-mode identity page tables: PML4.
pub const BOOT_PML4: u64 = 0x1000;
/// The long-mode identity page tables: page-directory-pointer table.
pub const BOOT_PDPT: u64 = 0x2000;
/// The long-mode identity page tables: the first of four page directories (0x3000..0x7000).
pub const BOOT_PD: u64 = 0x3000;
/// The flat boot GDT (both entry states).
pub const BOOT_GDT: u64 = 0x7000;
/// GDT selector of the 64-bit code segment.
pub const SEL_CODE64: u16 = 0x08;
/// GDT selector of the flat data segment.
pub const SEL_DATA: u16 = 0x10;
/// GDT selector of the flat 32-bit code segment.
pub const SEL_CODE32: u16 = 0x18;

/// Guest RAM as the VMM maps it: `[0, below_4g)` and, if `above_4g > 0`, `[4 GiB, 4 GiB + above_4g)`.
/// The gap between `below_4g` and 4 GiB is the hole for the LAPIC and MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    /// Bytes of RAM starting at GPA 0 (end of low RAM, exclusive).
    pub below_4g: u64,
    /// Bytes of RAM starting at 4 GiB.
    pub above_4g: u64,
}

impl RamLayout {
    /// RAM of `total` bytes with the low part cut at `hole_start` (the rest continues at 4 GiB).
    pub fn with_hole(total: u64, hole_start: u64) -> RamLayout {
        let below_4g = total.min(hole_start);
        RamLayout {
            below_4g,
            above_4g: total - below_4g,
        }
    }

    /// QEMU's pc machine split: with `total >= 0xE000_0000` the low part is 3 GiB (0xC000_0000), otherwise all
    /// RAM is low.
    pub fn pc(total: u64) -> RamLayout {
        if total >= 0xE000_0000 {
            RamLayout::with_hole(total, 0xC000_0000)
        } else {
            RamLayout::with_hole(total, total)
        }
    }

    /// Total RAM in bytes.
    pub fn total(&self) -> u64 {
        self.below_4g.saturating_add(self.above_4g)
    }

    /// The RAM regions as `(guest physical address, size)`, in address order, without empty regions.
    pub fn regions(&self) -> Vec<(u64, u64)> {
        let mut regions = Vec::with_capacity(2);
        if self.below_4g > 0 {
            regions.push((0, self.below_4g));
        }
        if self.above_4g > 0 {
            regions.push((FOUR_GIB, self.above_4g));
        }
        regions
    }

    /// Whether `[start, start + len)` lies entirely inside one RAM region (an empty range never does).
    pub fn contains(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        len > 0
            && self
                .regions()
                .iter()
                .any(|&(base, size)| start >= base && end <= base + size)
    }

    /// Checks that the layout is one the loaders can describe: at least 1 MiB of low RAM, low RAM not reaching
    /// the LAPIC/IOAPIC area (0xFEC0_0000), and no overflow.
    pub fn validate(&self) -> Result<(), LoadError> {
        if self.below_4g < 0x10_0000 {
            return Err(LoadError::Layout(format!(
                "low RAM of {:#x} bytes is smaller than 1 MiB",
                self.below_4g
            )));
        }
        if self.below_4g > 0xFEC0_0000 {
            return Err(LoadError::Layout(format!(
                "low RAM end {:#x} overlaps the IOAPIC/LAPIC area at 0xfec00000",
                self.below_4g
            )));
        }
        if FOUR_GIB.checked_add(self.above_4g).is_none() {
            return Err(LoadError::Layout("RAM above 4 GiB overflows".into()));
        }
        Ok(())
    }
}

/// One Multiboot module (one comma-separated `-initrd` entry).
#[derive(Clone, PartialEq, Eq)]
pub struct Module {
    /// The entry's full text (file name plus parameters): the module's string in the MBI.
    pub text: String,
    /// The file contents.
    pub data: Vec<u8>,
}

impl fmt::Debug for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Module")
            .field("text", &self.text)
            .field("len", &self.data.len())
            .finish()
    }
}

impl Module {
    /// Splits an `-initrd` argument into entries as QEMU does: entries are separated by `,`, and `,,` stands
    /// for a literal comma. Each returned string is an entry's full text; its file name is the part before the
    /// first space ([`Module::file_name`]).
    pub fn split_initrd_arg(arg: &str) -> Vec<String> {
        let mut entries = Vec::new();
        let mut current = String::new();
        let mut chars = arg.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                } else {
                    entries.push(std::mem::take(&mut current));
                }
            } else {
                current.push(c);
            }
        }
        entries.push(current);
        entries
    }

    /// The file name of an entry: the text before the first space.
    pub fn file_name(text: &str) -> &str {
        text.split_once(' ').map_or(text, |(name, _)| name)
    }

    /// Reads every module named by an `-initrd` argument.
    pub fn load_initrd_arg(arg: &str) -> Result<Vec<Module>, LoadError> {
        Module::split_initrd_arg(arg)
            .into_iter()
            .map(|text| {
                let name = Module::file_name(&text);
                match std::fs::read(name) {
                    Ok(data) => Ok(Module { text, data }),
                    Err(e) => Err(LoadError::ModuleRead {
                        path: name.to_string(),
                        reason: e.to_string(),
                    }),
                }
            })
            .collect()
    }
}

/// What kind of kernel was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// Multiboot v1, loaded by its ELF32 program headers.
    MultibootElf,
    /// Multiboot v1, loaded by the header's address fields (flags bit 16, "a.out kludge").
    MultibootAout,
    /// 64-bit ELF entered in long mode.
    Elf64,
}

/// The BSP's entry state, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootState {
    /// Multiboot: 32-bit protected mode, paging off, flat segments (CS = [`SEL_CODE32`], data = [`SEL_DATA`]),
    /// GDTR = the boot GDT, IF = 0.
    Protected32 {
        /// Entry point.
        eip: u32,
        /// [`MULTIBOOT_BOOTLOADER_MAGIC`].
        eax: u32,
        /// Physical address of the MBI ([`MBI_ADDR`]).
        ebx: u32,
    },
    /// 64-bit ELF: long mode, CPL 0, paging on with the identity map of the low 4 GiB at `cr3`, CS =
    /// [`SEL_CODE64`], data = [`SEL_DATA`], IF = 0.
    Long64 {
        /// Entry point (`e_entry`).
        rip: u64,
        /// [`MULTIBOOT_BOOTLOADER_MAGIC`].
        rax: u64,
        /// Physical address of the MBI ([`MBI_ADDR`]).
        rbx: u64,
        /// PML4 address ([`BOOT_PML4`]).
        cr3: u64,
        /// GDT base ([`BOOT_GDT`]).
        gdt_base: u64,
        /// GDT limit.
        gdt_limit: u16,
    },
}

/// A segment register's full (hidden) state, laid out like `kvm_segment` so the VMM copies it field by field.
/// `limit` is the byte-granular limit (0xFFFF_FFFF for flat segments), as KVM expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type (4 bits).
    pub type_: u8,
    /// Present.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: u8,
    /// Code/data (1) or system (0) descriptor.
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity (1 = 4 KiB).
    pub g: u8,
    /// Available bit.
    pub avl: u8,
    /// Unusable (null selector loaded).
    pub unusable: u8,
}

/// Every register value the VMM must program for the BSP, as plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootRegs {
    /// RIP.
    pub rip: u64,
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RSP (0: the kernel sets its own stack).
    pub rsp: u64,
    /// RFLAGS (0x2: reserved bit only, IF = 0).
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// CS.
    pub cs: Segment,
    /// DS.
    pub ds: Segment,
    /// ES.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// SS.
    pub ss: Segment,
    /// TR (a busy TSS descriptor, base 0, limit 0x67; required by VM entry).
    pub tr: Segment,
    /// LDTR (unusable).
    pub ldt: Segment,
    /// GDTR base.
    pub gdt_base: u64,
    /// GDTR limit.
    pub gdt_limit: u16,
    /// IDTR base.
    pub idt_base: u64,
    /// IDTR limit.
    pub idt_limit: u16,
}

/// The result of loading a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedKernel {
    /// How the kernel was loaded.
    pub kind: KernelKind,
    /// The BSP entry state.
    pub boot: BootState,
    /// Lowest guest physical address of the image.
    pub image_start: u64,
    /// End (exclusive) of the image including its BSS.
    pub image_end: u64,
    /// End (exclusive) of everything the loader wrote after the image (module list, strings, modules).
    pub loader_end: u64,
    /// The Multiboot memory map as written at [`MMAP_ADDR`].
    pub memory_map: Vec<MemoryMapEntry>,
    /// Warnings QEMU would print on stderr but that do not stop the boot (e.g. the VBE flag). The VMM decides
    /// whether to print them (prefixed with `warning:`).
    pub warnings: Vec<String>,
}

/// Why a kernel could not be loaded. The messages carry no `error:` prefix; the CLI adds it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LoadError {
    /// Neither a Multiboot kernel nor a 64-bit ELF.
    #[error("kernel '{path}' is neither a Multiboot kernel nor a 64-bit ELF{hint}")]
    Unsupported {
        /// Kernel path.
        path: String,
        /// Extra detail about what the file looks like (starts with "; " when present).
        hint: String,
    },
    /// QEMU's refusal of an ELF64 x86-64 image with a Multiboot header.
    #[error("Cannot load x86-64 image, give a 32bit one.")]
    X86_64Multiboot,
    /// The ELF image is malformed.
    #[error("kernel '{path}': invalid ELF image: {reason}")]
    BadElf {
        /// Kernel path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The Multiboot header's address fields (flags bit 16) are inconsistent.
    #[error("kernel '{path}': invalid Multiboot header: {reason}")]
    BadMultiboot {
        /// Kernel path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file ends before data the headers describe.
    #[error("kernel '{path}' is truncated: {reason}")]
    Truncated {
        /// Kernel path.
        path: String,
        /// What is missing.
        reason: String,
    },
    /// A segment (or the a.out image) does not fit in guest RAM (outside RAM, in the hole, or above 4 GiB for
    /// Multiboot).
    #[error("kernel '{path}': {what} at {start:#x}..{end:#x} is not inside guest RAM ({ram})")]
    OutsideRam {
        /// Kernel path.
        path: String,
        /// What does not fit.
        what: String,
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
        /// Description of the RAM layout.
        ram: String,
    },
    /// A segment overlaps memory the loader needs for its own data.
    #[error("kernel '{path}': {what} at {start:#x}..{end:#x} overlaps the loader's {area} at {area_start:#x}..{area_end:#x}")]
    OverlapsLoaderData {
        /// Kernel path.
        path: String,
        /// What overlaps.
        what: String,
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
        /// Name of the loader area.
        area: &'static str,
        /// Area start.
        area_start: u64,
        /// Area end (exclusive).
        area_end: u64,
    },
    /// The module list, strings and modules do not fit in RAM below 4 GiB after the image.
    #[error("not enough guest RAM below 4 GiB for the Multiboot data and modules after the kernel image: need up to {need:#x}, low RAM ends at {have:#x}")]
    NoRoom {
        /// End address needed.
        need: u64,
        /// End of low RAM.
        have: u64,
    },
    /// A module file could not be read.
    #[error("could not read module '{path}': {reason}")]
    ModuleRead {
        /// Module file name.
        path: String,
        /// OS error.
        reason: String,
    },
    /// The RAM layout cannot be described.
    #[error("invalid RAM layout: {0}")]
    Layout(String),
    /// Writing guest memory failed.
    #[error("writing guest memory at {addr:#x} failed: {reason}")]
    Memory {
        /// Address.
        addr: u64,
        /// vm-memory's error.
        reason: String,
    },
}

/// Loads `kernel` (the file contents of `kernel_path`) into guest memory and builds the Multiboot information
/// (command line `"<kernel_path> <append>"`, `modules`, memory map from `layout`).
///
/// Dispatch, as QEMU's `-kernel`:
/// - a valid Multiboot v1 header in the first 8192 bytes → Multiboot: flags bit 16 set → a.out address
///   fields; otherwise the file must be an ELF32 (an x86-64 ELF is refused with QEMU's message); entry state
///   [`BootState::Protected32`];
/// - otherwise an ELF64 x86-64 → loaded at `p_paddr`, identity page tables and GDT written, entry state
///   [`BootState::Long64`];
/// - anything else → [`LoadError::Unsupported`].
///
/// ELF segments are loaded at `p_paddr` (`p_filesz` bytes copied, the rest up to `p_memsz` zeroed). The entry
/// point is `e_entry`, translated to a physical address as QEMU's ELF loader does when it falls inside an
/// executable segment whose `p_vaddr` differs from `p_paddr` (higher-half kernels).
///
/// Never panics on bad input.
pub fn load_kernel<M>(
    mem: &M,
    layout: &RamLayout,
    kernel: &[u8],
    kernel_path: &str,
    append: &str,
    modules: &[Module],
) -> Result<LoadedKernel, LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    layout.validate()?;
    if let Some(header) = find_multiboot_header(kernel) {
        return multiboot::load(mem, layout, kernel, kernel_path, append, modules, &header);
    }
    if elf::is_elf64_x86_64(kernel) {
        return long_mode::load(mem, layout, kernel, kernel_path, append, modules);
    }
    Err(LoadError::Unsupported {
        path: kernel_path.to_string(),
        hint: describe_unsupported(kernel),
    })
}

/// A short description of what an unsupported kernel file looks like.
fn describe_unsupported(kernel: &[u8]) -> String {
    if kernel.is_empty() {
        return "; the file is empty".into();
    }
    if kernel.get(0x202..0x206) == Some(b"HdrS") {
        return "; it looks like a Linux bzImage, which is not supported".into();
    }
    if kernel.starts_with(b"MZ") {
        return "; it looks like a PE/COFF (MZ) image, which is not supported".into();
    }
    if kernel.starts_with(b"\x7fELF") {
        let class = match kernel.get(4) {
            Some(1) => "32-bit",
            Some(2) => "64-bit",
            _ => "unknown-class",
        };
        let machine = kernel
            .get(18..20)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        return format!(
            "; it is a {class} ELF for machine {machine} without a Multiboot header (only x86-64 ELF64 images can be loaded without one)"
        );
    }
    String::new()
}

impl BootState {
    /// The full register state for this entry state, ready to copy into `kvm_regs`/`kvm_sregs`.
    pub fn regs(&self) -> BootRegs {
        long_mode::boot_regs(self)
    }

    /// The entry point.
    pub fn entry(&self) -> u64 {
        match *self {
            BootState::Protected32 { eip, .. } => u64::from(eip),
            BootState::Long64 { rip, .. } => rip,
        }
    }

    /// The MBI address passed in EBX/RBX.
    pub fn mbi(&self) -> u64 {
        match *self {
            BootState::Protected32 { ebx, .. } => u64::from(ebx),
            BootState::Long64 { rbx, .. } => rbx,
        }
    }
}

/// Writes `data` at `addr`, mapping vm-memory's error.
fn write_mem<M>(mem: &M, addr: u64, data: &[u8]) -> Result<(), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| LoadError::Memory {
            addr,
            reason: e.to_string(),
        })
}

/// Zero-fills `[addr, addr + len)`, skipping chunks that already read as zero (fresh guest RAM), so a large
/// BSS does not fault in every page.
fn zero_mem<M>(mem: &M, addr: u64, len: u64) -> Result<(), LoadError>
where
    M: Bytes<GuestAddress, E = GuestMemoryError>,
{
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut buf = vec![0u8; CHUNK as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK);
        let at = addr + done;
        // `n <= CHUNK`, so the cast cannot truncate.
        let slice = &mut buf[..n as usize];
        mem.read_slice(slice, GuestAddress(at))
            .map_err(|e| LoadError::Memory {
                addr: at,
                reason: e.to_string(),
            })?;
        if slice.iter().any(|&b| b != 0) {
            write_mem(mem, at, &zeros[..n as usize])?;
        }
        done += n;
    }
    Ok(())
}

/// Rounds `v` up to a page boundary (saturating).
fn page_align(v: u64) -> u64 {
    v.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// A human-readable description of the RAM layout for error messages.
fn describe_layout(layout: &RamLayout) -> String {
    let mut s = format!("RAM at 0x0..{:#x}", layout.below_4g);
    if layout.above_4g > 0 {
        s.push_str(&format!(
            " and {:#x}..{:#x}",
            FOUR_GIB,
            FOUR_GIB.saturating_add(layout.above_4g)
        ));
    }
    s
}

#[cfg(test)]
mod tests;

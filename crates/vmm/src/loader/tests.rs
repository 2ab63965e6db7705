//! Loader tests. Kernel images are built programmatically; guest memory is a sparse anonymous mapping.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::multiboot::{MULTIBOOT_FLAG_AOUT_KLUDGE, MULTIBOOT_FLAG_VIDEO, VBE_WARNING};
use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One segment of a test image.
struct Seg {
    paddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

fn seg(paddr: u64, data: &[u8], memsz: u64) -> Seg {
    Seg {
        paddr,
        data: data.to_vec(),
        memsz,
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A Multiboot header with `flags` and a valid checksum (address fields zero).
fn mb_header(flags: u32) -> Vec<u8> {
    let mut h = vec![0u8; 32];
    put32(&mut h, 0, 0x1BAD_B002);
    put32(&mut h, 4, flags);
    put32(
        &mut h,
        8,
        0u32.wrapping_sub(0x1BAD_B002).wrapping_sub(flags),
    );
    h
}

/// Builds an ELF image: header, program headers, an optional Multiboot header at file offset 0x200, then the
/// segment data from file offset 0x1000, each segment page-aligned in the file.
fn build_elf(
    is_64: bool,
    machine: u16,
    entry: u64,
    segs: &[Seg],
    mb_flags: Option<u32>,
) -> Vec<u8> {
    let (ehsize, phentsize) = if is_64 { (64, 56) } else { (52, 32) };
    let mut offsets = Vec::new();
    let mut off = 0x1000usize;
    for s in segs {
        offsets.push(off);
        off += (s.data.len() + 0xFFF) & !0xFFF;
    }
    let mut b = vec![0u8; off.max(0x1000)];
    b[0..4].copy_from_slice(b"\x7fELF");
    b[4] = if is_64 { 2 } else { 1 };
    b[5] = 1;
    b[6] = 1;
    put16(&mut b, 16, 2);
    put16(&mut b, 18, machine);
    put32(&mut b, 20, 1);
    if is_64 {
        put64(&mut b, 24, entry);
        put64(&mut b, 32, ehsize as u64);
        put16(&mut b, 52, ehsize as u16);
        put16(&mut b, 54, phentsize as u16);
        put16(&mut b, 56, segs.len() as u16);
    } else {
        put32(&mut b, 24, entry as u32);
        put32(&mut b, 28, ehsize as u32);
        put16(&mut b, 40, ehsize as u16);
        put16(&mut b, 42, phentsize as u16);
        put16(&mut b, 44, segs.len() as u16);
    }
    for (i, (s, &fo)) in segs.iter().zip(&offsets).enumerate() {
        let ph = ehsize + i * phentsize;
        put32(&mut b, ph, 1); // PT_LOAD
        if is_64 {
            put32(&mut b, ph + 4, 7);
            put64(&mut b, ph + 8, fo as u64);
            put64(&mut b, ph + 16, s.paddr);
            put64(&mut b, ph + 24, s.paddr);
            put64(&mut b, ph + 32, s.data.len() as u64);
            put64(&mut b, ph + 40, s.memsz);
        } else {
            put32(&mut b, ph + 4, fo as u32);
            put32(&mut b, ph + 8, s.paddr as u32);
            put32(&mut b, ph + 12, s.paddr as u32);
            put32(&mut b, ph + 16, s.data.len() as u32);
            put32(&mut b, ph + 20, s.memsz as u32);
            put32(&mut b, ph + 24, 7);
        }
        b[fo..fo + s.data.len()].copy_from_slice(&s.data);
    }
    if let Some(flags) = mb_flags {
        let h = mb_header(flags);
        b[0x200..0x200 + h.len()].copy_from_slice(&h);
    }
    b
}

fn elf32_mb(entry: u32, segs: &[Seg]) -> Vec<u8> {
    build_elf(false, 3, u64::from(entry), segs, Some(0))
}

fn elf64(entry: u64, segs: &[Seg]) -> Vec<u8> {
    build_elf(true, 62, entry, segs, None)
}

fn mem_for(layout: &RamLayout) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions()
        .into_iter()
        .map(|(base, size)| (GuestAddress(base), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("test guest memory")
}

fn layout_mib(mib: u64) -> RamLayout {
    RamLayout::pc(mib * MIB)
}

fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).expect("read u32")
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.read_obj(GuestAddress(addr)).expect("read u64")
}

fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("read bytes");
    v
}

fn read_cstr(mem: &GuestMemoryMmap, addr: u64) -> String {
    let mut out = Vec::new();
    let mut a = addr;
    loop {
        let b: u8 = mem.read_obj(GuestAddress(a)).expect("read byte");
        if b == 0 {
            break;
        }
        out.push(b);
        a += 1;
    }
    String::from_utf8(out).expect("utf8")
}

fn simple_kernel() -> Vec<u8> {
    elf32_mb(0x40_0010, &[seg(0x40_0000, &[0x90; 0x20], 0x20)])
}

#[test]
fn header_scan_positions_and_checksum() {
    // (offset of the magic, flags, checksum correct?, expected offset found)
    let cases: &[(usize, u32, bool, Option<usize>)] = &[
        (0, 0, true, Some(0)),
        (4, 0, true, Some(4)),
        (0x200, 0x3, true, Some(0x200)),
        (8192 - 48 - 4, 0, true, Some(8140)),
        (8192 - 48, 0, true, None), // QEMU stops before 8192 - 48
        (8192, 0, true, None),
        (2, 0, true, None), // not 4-byte aligned
        (0x100, 0, false, None),
        (0x100, 0x10000, false, None),
    ];
    for &(offset, flags, good, expect) in cases {
        let mut file = vec![0u8; 9000];
        let mut h = mb_header(flags);
        if !good {
            h[8] ^= 1;
        }
        file[offset..offset + 12].copy_from_slice(&h[..12]);
        let found = find_multiboot_header(&file);
        assert_eq!(
            found.map(|h| h.offset),
            expect,
            "magic at {offset:#x}, good={good}"
        );
        if let Some(h) = found {
            assert_eq!(h.flags, flags);
        }
    }
}

#[test]
fn header_scan_takes_first_valid_and_handles_short_files() {
    let mut file = vec![0u8; 0x400];
    let mut bad = mb_header(0);
    bad[8] ^= 0x80;
    file[0x40..0x60].copy_from_slice(&bad);
    file[0x80..0xA0].copy_from_slice(&mb_header(MULTIBOOT_FLAG_AOUT_KLUDGE));
    file[0xC0..0xE0].copy_from_slice(&mb_header(0));
    let h = find_multiboot_header(&file).expect("header");
    assert_eq!(h.offset, 0x80);
    assert_eq!(h.flags, MULTIBOOT_FLAG_AOUT_KLUDGE);
    assert!(h.addresses.is_some());

    // A file that ends right after the checksum: found, without address fields.
    let short = mb_header(0)[..12].to_vec();
    let h = find_multiboot_header(&short).expect("header in a 12-byte file");
    assert_eq!(h.addresses, None);
    for len in 0..12 {
        assert_eq!(find_multiboot_header(&short[..len]), None, "len {len}");
    }
}

#[test]
fn elf32_segments_and_large_bss_are_loaded() {
    let layout = layout_mib(128);
    let mem = mem_for(&layout);
    // Dirty the BSS area first: the loader must zero it even when RAM is not fresh.
    mem.write_slice(&[0xAA; 4096], GuestAddress(0x40_2000))
        .unwrap();
    mem.write_slice(&[0xAA; 16], GuestAddress(0x40_0000 + 12 * MIB - 16))
        .unwrap();
    let text: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
    let kernel = elf32_mb(
        0x40_0100,
        &[
            seg(0x40_0000, &text, 12 * MIB), // 12 MiB with BSS
            seg(0x10_0000, b"low", 3),
        ],
    );
    let k = load_kernel(&mem, &layout, &kernel, "/k", "", &[]).expect("load");
    assert_eq!(k.kind, KernelKind::MultibootElf);
    assert_eq!(
        k.boot,
        BootState::Protected32 {
            eip: 0x40_0100,
            eax: 0x2BAD_B002,
            ebx: 0x9500
        }
    );
    assert_eq!(
        (k.image_start, k.image_end),
        (0x10_0000, 0x40_0000 + 12 * MIB)
    );
    assert_eq!(read_bytes(&mem, 0x40_0000, text.len()), text);
    assert_eq!(read_bytes(&mem, 0x10_0000, 3), b"low");
    assert!(read_bytes(&mem, 0x40_1800, 0x2000).iter().all(|&b| b == 0));
    assert!(read_bytes(&mem, 0x40_0000 + 12 * MIB - 16, 16)
        .iter()
        .all(|&b| b == 0));
    assert!(k.warnings.is_empty());
    // The loader data starts at the page-aligned end of the image (QEMU's layout).
    assert_eq!(read_u32(&mem, 0x9500 + 24), (0x40_0000 + 12 * MIB) as u32);
}

#[test]
fn cmdline_and_modules_layout_byte_for_byte() {
    let layout = layout_mib(128);
    let mem = mem_for(&layout);
    // Image 0x100000..0x101800 → page-aligned end 0x102000.
    let kernel = elf32_mb(0x10_0000, &[seg(0x10_0000, &[1; 0x1800], 0x1800)]);
    let big: Vec<u8> = (0..0x1001u32).map(|i| (i * 7) as u8).collect();
    let modules = [
        Module {
            text: "a.bin x=1".into(),
            data: b"hello".to_vec(),
        },
        Module {
            text: "b".into(),
            data: big.clone(),
        },
    ];
    let k = load_kernel(&mem, &layout, &kernel, "/k", "foo", &modules).expect("load");
    // Module list at 0x102000 (2 × 16 bytes), strings from 0x102020; the string area is sized as QEMU does
    // (path+1 + append+1 + whole -initrd text+1 = 3 + 4 + 12 = 19), so "qemu" is at 0x102033. The buffer
    // 0x2000 + 19 + 32 + 5 rounds to 0x3000: module 0 at 0x103000, module 1 at 0x104000, end 0x106000.
    let mbi = 0x9500;
    assert_eq!(read_u32(&mem, mbi + 20), 2, "mods_count");
    assert_eq!(read_u32(&mem, mbi + 24), 0x10_2000, "mods_addr");
    let expected_entries: [[u32; 4]; 2] = [
        [0x10_3000, 0x10_3005, 0x10_2020, 0],
        [0x10_4000, 0x10_5001, 0x10_202A, 0],
    ];
    for (i, e) in expected_entries.iter().enumerate() {
        for (j, &v) in e.iter().enumerate() {
            assert_eq!(
                read_u32(&mem, 0x10_2000 + 16 * i as u64 + 4 * j as u64),
                v,
                "module {i} word {j}"
            );
        }
    }
    assert_eq!(
        read_bytes(&mem, 0x10_2020, 19 + 5),
        b"a.bin x=1\0b\0/k foo\0qemu\0".to_vec()
    );
    assert_eq!(read_cstr(&mem, 0x10_2020), "a.bin x=1");
    assert_eq!(read_cstr(&mem, 0x10_202A), "b");
    assert_eq!(read_u32(&mem, mbi + 16), 0x10_202C, "cmdline");
    assert_eq!(read_cstr(&mem, 0x10_202C), "/k foo");
    assert_eq!(read_u32(&mem, mbi + 64), 0x10_2033, "boot_loader_name");
    assert_eq!(read_cstr(&mem, 0x10_2033), "qemu");
    assert_eq!(read_bytes(&mem, 0x10_3000, 5), b"hello");
    assert_eq!(read_bytes(&mem, 0x10_4000, big.len()), big);
    assert_eq!(k.loader_end, 0x10_6000);
}

#[test]
fn cmdline_format_matches_qemu() {
    // (kernel path, append, expected string): QEMU formats "%s %s".
    let cases = [
        ("/boot/k.elf", "", "/boot/k.elf "),
        ("k", "a b  c", "k a b  c"),
        ("x/y", "--flag=1", "x/y --flag=1"),
    ];
    for (path, append, want) in cases {
        let layout = layout_mib(16);
        let mem = mem_for(&layout);
        load_kernel(&mem, &layout, &simple_kernel(), path, append, &[]).expect("load");
        let cmdline = u64::from(read_u32(&mem, 0x9500 + 16));
        assert_eq!(read_cstr(&mem, cmdline), want);
        assert_eq!(read_u32(&mem, 0x9500 + 20), 0, "mods_count");
    }
}

#[test]
fn mbi_fields() {
    // (RAM in MiB, expected mem_upper in KiB)
    for (mib, upper) in [
        (2u64, 1024u32),
        (128, 127 * 1024),
        (1024, 1023 * 1024),
        (4096, 3071 * 1024),
    ] {
        let layout = layout_mib(mib);
        let mem = mem_for(&layout);
        let k = load_kernel(
            &mem,
            &layout,
            &elf32_mb(0x10_0000, &[seg(0x10_0000, &[0xF4], 1)]),
            "k",
            "",
            &[],
        )
        .expect("load");
        let mbi = 0x9500;
        assert_eq!(read_u32(&mem, mbi), 0x24F, "flags");
        assert_eq!(read_u32(&mem, mbi + 4), 639, "mem_lower");
        assert_eq!(read_u32(&mem, mbi + 8), upper, "mem_upper for {mib} MiB");
        assert_eq!(read_u32(&mem, mbi + 12), 0x8000_FFFF, "boot_device");
        assert_eq!(
            read_u32(&mem, mbi + 44),
            24 * k.memory_map.len() as u32,
            "mmap_length"
        );
        assert_eq!(read_u32(&mem, mbi + 48), 0x9000, "mmap_addr");
        for off in (28..44)
            .step_by(4)
            .chain((52..64).step_by(4))
            .chain((68..88).step_by(4))
        {
            assert_eq!(read_u32(&mem, mbi + off), 0, "unused MBI word at {off}");
        }
        // The memory map in guest memory is the one reported.
        for (i, e) in k.memory_map.iter().enumerate() {
            let at = 0x9000 + 24 * i as u64;
            assert_eq!(read_u32(&mem, at), 20);
            assert_eq!(read_u64(&mem, at + 4), e.base);
            assert_eq!(read_u64(&mem, at + 12), e.length);
            assert_eq!(read_u32(&mem, at + 20), e.kind);
        }
    }
}

#[test]
fn memory_map_for_several_ram_sizes() {
    const R: u32 = MemoryMapEntry::RAM;
    const X: u32 = MemoryMapEntry::RESERVED;
    let fixed_low = [
        (0u64, 0x9FC00u64, R),
        (0x9FC00, 0x400, X),
        (0xF0000, 0x10000, X),
    ];
    let fixed_high = [(0xFEFF_C000u64, 0x4000u64, X), (0xFFFC_0000, 0x40000, X)];
    // (total RAM, expected low RAM end, expected RAM above 4 GiB)
    let cases = [
        (MIB, 0x10_0000, 0),
        (128 * MIB, 128 * MIB, 0),
        (3 * GIB, 3 * GIB, 0),
        (0xDFF0_0000, 0xDFF0_0000, 0),
        (0xE000_0000, 0xC000_0000, 0x2000_0000),
        (8 * GIB, 0xC000_0000, 5 * GIB),
    ];
    for (total, low_end, high) in cases {
        let layout = RamLayout::pc(total);
        assert_eq!(
            (layout.below_4g, layout.above_4g),
            (low_end, high),
            "split of {total:#x}"
        );
        assert_eq!(layout.total(), total);
        let mut want: Vec<(u64, u64, u32)> = fixed_low.to_vec();
        if low_end > MIB {
            want.push((MIB, low_end - MIB, R));
        }
        want.extend_from_slice(&fixed_high);
        if high > 0 {
            want.push((FOUR_GIB, high, R));
        }
        let got: Vec<(u64, u64, u32)> = build_memory_map(&layout)
            .iter()
            .map(|e| (e.base, e.length, e.kind))
            .collect();
        assert_eq!(got, want, "map for {total:#x}");
        // Usable entries never overlap the hole or each other.
        let map = build_memory_map(&layout);
        for w in map.windows(2) {
            assert!(
                w[0].base + w[0].length <= w[1].base,
                "sorted, disjoint: {w:?}"
            );
        }
        for e in map.iter().filter(|e| e.kind == R) {
            assert!(layout.contains(e.base, e.length), "usable {e:?} is RAM");
        }
    }
}

#[test]
fn multiboot_above_4g_ram_is_in_the_map() {
    let layout = RamLayout::with_hole(5 * GIB, 3 * GIB);
    let mem = mem_for(&layout);
    let k = load_kernel(&mem, &layout, &simple_kernel(), "k", "", &[]).expect("load");
    let last = k.memory_map.last().copied().expect("entries");
    assert_eq!((last.base, last.length, last.kind), (FOUR_GIB, 2 * GIB, 1));
    assert_eq!(read_u32(&mem, 0x9500 + 8), ((3 * GIB - MIB) / 1024) as u32);
}

#[test]
fn aout_kludge_is_loaded_by_address_fields() {
    let layout = layout_mib(32);
    let mem = mem_for(&layout);
    mem.write_slice(&[0x55; 0x3000], GuestAddress(0x20_1000))
        .unwrap();
    // A flat binary: header at file offset 0x40, loaded at 0x200000, BSS up to 0x204000.
    let mut file: Vec<u8> = (0..0x900u32).map(|i| (i % 13) as u8 + 1).collect();
    let flags = MULTIBOOT_FLAG_AOUT_KLUDGE;
    let mut h = mb_header(flags);
    put32(&mut h, 12, 0x20_0040); // header_addr
    put32(&mut h, 16, 0x20_0000); // load_addr
    put32(&mut h, 20, 0); // load_end_addr: whole file
    put32(&mut h, 24, 0x20_4000); // bss_end_addr
    put32(&mut h, 28, 0x20_0080); // entry_addr
    file[0x40..0x60].copy_from_slice(&h);
    let k = load_kernel(&mem, &layout, &file, "flat", "", &[]).expect("load");
    assert_eq!(k.kind, KernelKind::MultibootAout);
    assert_eq!(k.boot.entry(), 0x20_0080);
    assert_eq!((k.image_start, k.image_end), (0x20_0000, 0x20_4000));
    assert_eq!(read_bytes(&mem, 0x20_0000, file.len()), file);
    assert!(read_bytes(&mem, 0x20_0900, 0x3700).iter().all(|&b| b == 0));
    assert_eq!(
        read_u32(&mem, 0x9500 + 24),
        0x20_4000,
        "loader data after BSS"
    );

    // load_end_addr limits the copy; the header may sit after a file prefix that is not loaded.
    let mut file2 = vec![0xEEu8; 0x100];
    file2.extend((0..0x200u32).map(|i| i as u8));
    let mut h2 = mb_header(flags);
    put32(&mut h2, 12, 0x30_0010);
    put32(&mut h2, 16, 0x30_0000);
    put32(&mut h2, 20, 0x30_0100);
    put32(&mut h2, 24, 0);
    put32(&mut h2, 28, 0x30_0000);
    file2[0x110..0x130].copy_from_slice(&h2);
    let k2 = load_kernel(&mem, &layout, &file2, "flat2", "", &[]).expect("load");
    assert_eq!((k2.image_start, k2.image_end), (0x30_0000, 0x30_0100));
    assert_eq!(
        read_bytes(&mem, 0x30_0000, 0x100),
        file2[0x100..0x200].to_vec()
    );
}

/// Reads the 2 MiB page that maps `va` by walking the tables at `cr3`; returns (physical address, flags of
/// each level).
fn walk(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, [u64; 3])> {
    let addr_mask = 0x000F_FFFF_FFFF_F000u64;
    let pml4e = read_u64(mem, cr3 + 8 * ((va >> 39) & 0x1FF));
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = read_u64(mem, (pml4e & addr_mask) + 8 * ((va >> 30) & 0x1FF));
    if pdpte & 1 == 0 {
        return None;
    }
    let pde = read_u64(mem, (pdpte & addr_mask) + 8 * ((va >> 21) & 0x1FF));
    if pde & 1 == 0 || pde & (1 << 7) == 0 {
        return None;
    }
    Some((
        (pde & 0x000F_FFFF_FFE0_0000) | (va & 0x1F_FFFF),
        [pml4e & 0xFFF, pdpte & 0xFFF, pde & 0xFFF],
    ))
}

#[test]
fn elf64_long_mode_entry_and_identity_map() {
    let layout = layout_mib(64);
    let mem = mem_for(&layout);
    let code: Vec<u8> = (0..0x300u32).map(|i| i as u8 ^ 0x5A).collect();
    let kernel = elf64(0x20_0040, &[seg(0x20_0000, &code, 0x10_0000)]);
    let k = load_kernel(&mem, &layout, &kernel, "/g/x.elf", "-v", &[]).expect("load");
    assert_eq!(k.kind, KernelKind::Elf64);
    let BootState::Long64 {
        rip,
        rax,
        rbx,
        cr3,
        gdt_base,
        gdt_limit,
    } = k.boot
    else {
        panic!("expected a long-mode entry, got {:?}", k.boot);
    };
    assert_eq!(
        (rip, rax, rbx, cr3, gdt_base, gdt_limit),
        (0x20_0040, 0x2BAD_B002, 0x9500, 0x1000, 0x7000, 31)
    );
    assert_eq!(read_bytes(&mem, 0x20_0000, code.len()), code);
    assert!(read_bytes(&mem, 0x20_0300, 0x1000).iter().all(|&b| b == 0));
    // The same MBI as for Multiboot.
    assert_eq!(read_u32(&mem, 0x9500), 0x24F);
    assert_eq!(
        read_cstr(&mem, u64::from(read_u32(&mem, 0x9500 + 16))),
        "/g/x.elf -v"
    );
    assert_eq!(
        read_u32(&mem, 0x9500 + 24),
        0x30_0000,
        "loader data after the image"
    );

    // Identity map of the low 4 GiB, nothing above.
    for va in [
        0u64,
        0x1234,
        0x20_0040,
        0x3FFF_FFFF,
        0x4000_0000,
        0xC000_0000,
        0xFEE0_0000,
        0xFFFF_FFFF,
    ] {
        let (pa, flags) = walk(&mem, cr3, va).unwrap_or_else(|| panic!("{va:#x} unmapped"));
        assert_eq!(pa, va, "identity for {va:#x}");
        assert_eq!(flags[0] & 0x7, 0x7, "PML4E P/RW/US");
        assert_eq!(flags[1] & 0x87, 0x7, "PDPTE P/RW/US, no 1 GiB page");
        assert_eq!(flags[2] & 0x87, 0x87, "PDE P/RW/US/PS");
    }
    for va in [FOUR_GIB, 0x8000_0000_0000] {
        assert!(walk(&mem, cr3, va).is_none(), "{va:#x} must be unmapped");
    }
    // GDT contents.
    for (i, want) in BOOT_GDT_ENTRIES.iter().enumerate() {
        assert_eq!(read_u64(&mem, 0x7000 + 8 * i as u64), *want);
    }

    let regs = k.boot.regs();
    assert_eq!(regs.rip, 0x20_0040);
    assert_eq!((regs.rax, regs.rbx), (0x2BAD_B002, 0x9500));
    assert_eq!(regs.rflags, 0x2, "interrupts off");
    assert_ne!(regs.cr0 & (1 << 31), 0, "paging on");
    assert_ne!(regs.cr0 & 1, 0, "protection on");
    assert_ne!(regs.cr4 & (1 << 5), 0, "PAE");
    assert_eq!(regs.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(regs.cr3, 0x1000);
    assert_eq!(
        (
            regs.cs.selector,
            regs.cs.l,
            regs.cs.db,
            regs.cs.dpl,
            regs.cs.type_
        ),
        (0x08, 1, 0, 0, 0xB)
    );
    for s in [regs.ds, regs.es, regs.fs, regs.gs, regs.ss] {
        assert_eq!(
            (s.selector, s.type_, s.present, s.s, s.dpl),
            (0x10, 0x3, 1, 1, 0)
        );
    }
    assert_eq!((regs.tr.type_, regs.tr.present, regs.tr.s), (0xB, 1, 0));
    assert_eq!((regs.gdt_base, regs.gdt_limit), (0x7000, 31));
}

#[test]
fn protected_mode_registers() {
    let layout = layout_mib(16);
    let mem = mem_for(&layout);
    let k = load_kernel(&mem, &layout, &simple_kernel(), "k", "", &[]).expect("load");
    let regs = k.boot.regs();
    assert_eq!(
        (regs.rip, regs.rax, regs.rbx),
        (0x40_0010, 0x2BAD_B002, 0x9500)
    );
    assert_eq!(regs.rflags, 0x2);
    assert_eq!(regs.cr0 & 0x8000_0001, 1, "PE on, PG off");
    assert_eq!((regs.cr4, regs.efer), (0, 0));
    let cs = regs.cs;
    assert_eq!(
        (cs.selector, cs.base, cs.limit, cs.db, cs.l, cs.g, cs.type_),
        (0x18, 0, 0xFFFF_FFFF, 1, 0, 1, 0xB)
    );
    for s in [regs.ds, regs.es, regs.fs, regs.gs, regs.ss] {
        assert_eq!(
            (s.selector, s.base, s.limit, s.db, s.type_),
            (0x10, 0, 0xFFFF_FFFF, 1, 0x3)
        );
    }
    // The GDT that the selectors refer to is in memory.
    assert_eq!(read_u64(&mem, 0x7000 + 0x18), BOOT_GDT_ENTRIES[3]);
    assert_eq!(read_u64(&mem, 0x7000 + 0x10), BOOT_GDT_ENTRIES[2]);
}

#[test]
fn vbe_flag_is_a_warning_like_qemu() {
    let layout = layout_mib(16);
    let mem = mem_for(&layout);
    let kernel = build_elf(
        false,
        3,
        0x40_0000,
        &[seg(0x40_0000, &[1], 1)],
        Some(MULTIBOOT_FLAG_VIDEO),
    );
    let k = load_kernel(&mem, &layout, &kernel, "k", "", &[]).expect("load continues");
    assert_eq!(k.warnings, vec![VBE_WARNING.to_string()]);
    assert_eq!(VBE_WARNING, "qemu: multiboot knows VBE. we don't.");
}

/// Applies `f` to a fresh copy of `base` and returns the result.
fn patched(base: &[u8], f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = base.to_vec();
    f(&mut v);
    v
}

#[test]
fn refusals() {
    let layout = layout_mib(128);
    let good32 = simple_kernel();
    let mut bzimage = vec![0u8; 0x1000];
    bzimage[0x202..0x206].copy_from_slice(b"HdrS");
    let aout = |hdr: u32, load: u32, load_end: u32, bss_end: u32, file_len: usize| {
        let mut f = vec![0u8; file_len.max(0x60)];
        let mut h = mb_header(MULTIBOOT_FLAG_AOUT_KLUDGE);
        put32(&mut h, 12, hdr);
        put32(&mut h, 16, load);
        put32(&mut h, 20, load_end);
        put32(&mut h, 24, bss_end);
        put32(&mut h, 28, load);
        f[0x20..0x40].copy_from_slice(&h);
        f.truncate(file_len);
        f
    };
    // (name, image, expected message fragment)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "empty",
            vec![],
            "kernel 'K' is neither a Multiboot kernel nor a 64-bit ELF; the file is empty",
        ),
        (
            "text",
            b"hello world".to_vec(),
            "kernel 'K' is neither a Multiboot kernel nor a 64-bit ELF",
        ),
        ("bzImage", bzimage, "Linux bzImage"),
        ("PE", b"MZ\x90\x00".to_vec(), "PE/COFF"),
        (
            "ELF32 without Multiboot header",
            build_elf(false, 3, 0x40_0000, &[seg(0x40_0000, &[1], 1)], None),
            "is a 32-bit ELF for machine 3 without a Multiboot header",
        ),
        (
            "ELF64 with Multiboot header",
            build_elf(true, 62, 0x40_0000, &[seg(0x40_0000, &[1], 1)], Some(0)),
            "Cannot load x86-64 image, give a 32bit one.",
        ),
        (
            "ELF32-class x86-64 with Multiboot header",
            build_elf(false, 62, 0x40_0000, &[seg(0x40_0000, &[1], 1)], Some(0)),
            "Cannot load x86-64 image, give a 32bit one.",
        ),
        (
            "ELF32 for ARM",
            build_elf(false, 40, 0x40_0000, &[seg(0x40_0000, &[1], 1)], Some(0)),
            "e_machine is 40, expected EM_386",
        ),
        (
            "Multiboot header in a non-ELF without address fields",
            patched(&[0u8; 0x100], |v| {
                v[0x10..0x30].copy_from_slice(&mb_header(0))
            }),
            "must be a 32-bit ELF, but it has no ELF magic",
        ),
        (
            "segment outside RAM",
            elf32_mb(0x900_0000, &[seg(0x900_0000, &[1], 1)]),
            "segment 0 at 0x9000000..0x9000001 is not inside guest RAM (RAM at 0x0..0x8000000)",
        ),
        (
            "BSS beyond RAM",
            elf32_mb(0x7F0_0000, &[seg(0x7F0_0000, &[1], 0x20_0000)]),
            "is not inside guest RAM",
        ),
        (
            "segment over the MBI page",
            elf32_mb(0x8000, &[seg(0x8000, &[1; 16], 0x2000)]),
            "overlaps the loader's memory map and Multiboot information at 0x9000..0xa000",
        ),
        (
            "segment over the boot GDT",
            elf32_mb(0x7000, &[seg(0x7000, &[1; 16], 16)]),
            "overlaps the loader's boot GDT",
        ),
        (
            "segment data beyond end of file",
            patched(&good32, |v| v.truncate(0x1010)),
            "kernel 'K' is truncated: segment 0 needs file bytes 0x1000..0x1020",
        ),
        (
            "program headers cut off",
            patched(&good32, |v| put32(v, 28, 0x1FF0)),
            "is truncated: the program headers end at 0x2010, beyond the end of the file (0x2000)",
        ),
        (
            "header cut off",
            patched(&good32, |v| {
                v.truncate(40);
                v.resize(0x300, 0);
                v[0x200..0x220].copy_from_slice(&mb_header(0));
            }),
            "invalid ELF image",
        ),
        (
            "filesz larger than memsz",
            patched(&good32, |v| put32(v, 52 + 20, 1)),
            "p_filesz 0x20 is larger than p_memsz 0x1",
        ),
        (
            "wrong phentsize",
            patched(&good32, |v| put16(v, 42, 40)),
            "e_phentsize is 40, expected 32",
        ),
        (
            "no loadable segment",
            patched(&good32, |v| put32(v, 52, 4)),
            "no loadable (PT_LOAD) segment",
        ),
        (
            "big-endian ELF",
            patched(&good32, |v| v[5] = 2),
            "not little-endian",
        ),
        (
            "a.out header_addr below load_addr",
            aout(0x10_0000, 0x10_1000, 0, 0, 0x1000),
            "header_addr 0x100000 is below load_addr 0x101000",
        ),
        (
            "a.out header before the file",
            aout(0x10_1000, 0x10_0000, 0, 0, 0x1000),
            "is larger than the header's file offset 0x20",
        ),
        (
            "a.out load_end below load_addr",
            aout(0x10_0020, 0x10_0000, 0xF_0000, 0, 0x1000),
            "load_end_addr 0xf0000 is below load_addr 0x100000",
        ),
        (
            "a.out load_end beyond the file",
            aout(0x10_0020, 0x10_0000, 0x10_2000, 0, 0x1000),
            "is truncated: the header asks for 0x2000 bytes from file offset 0x0",
        ),
        (
            "a.out bss_end below the data",
            aout(0x10_0020, 0x10_0000, 0, 0x10_0010, 0x1000),
            "bss_end_addr 0x100010 is below the end of the loaded data 0x101000",
        ),
        (
            "a.out image outside RAM",
            aout(0x1000_0020, 0x1000_0000, 0, 0, 0x1000),
            "the image at 0x10000000..0x10001000 is not inside guest RAM",
        ),
        (
            "a.out header cut off",
            patched(&mb_header(MULTIBOOT_FLAG_AOUT_KLUDGE)[..20], |_| {}),
            "the file ends inside the Multiboot header's address fields",
        ),
        (
            "ELF64 over the page tables",
            elf64(0x2000, &[seg(0x2000, &[1; 16], 16)]),
            "overlaps the loader's identity page tables at 0x1000..0x7000",
        ),
        (
            "ELF64 outside RAM",
            elf64(0x1_0000_0000, &[seg(0x1_0000_0000, &[1; 16], 16)]),
            "is not inside guest RAM",
        ),
        (
            "ELF64 truncated",
            patched(
                &elf64(0x20_0000, &[seg(0x20_0000, &[1; 0x100], 0x100)]),
                |v| v.truncate(0x1080),
            ),
            "is truncated",
        ),
    ];
    for (name, image, want) in cases {
        let mem = mem_for(&layout);
        let err = load_kernel(&mem, &layout, &image, "K", "", &[]).expect_err(name);
        let msg = err.to_string();
        assert!(
            msg.contains(want),
            "{name}: message {msg:?} does not contain {want:?}"
        );
    }
}

#[test]
fn refusals_involving_the_layout() {
    // A segment in the hole between low RAM and 4 GiB.
    let layout = RamLayout::with_hole(5 * GIB, 3 * GIB);
    let mem = mem_for(&layout);
    let err = load_kernel(
        &mem,
        &layout,
        &elf32_mb(0xF000_0000, &[seg(0xF000_0000, &[1], 1)]),
        "K",
        "",
        &[],
    )
    .expect_err("segment in the hole");
    assert!(matches!(err, LoadError::OutsideRam { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("Multiboot images must be in RAM below 4 GiB"),
        "{err}"
    );
    // An ELF64 segment may use RAM above 4 GiB, but not the hole.
    let err = load_kernel(
        &mem,
        &layout,
        &elf64(0xF000_0000, &[seg(0xF000_0000, &[1], 1)]),
        "K",
        "",
        &[],
    )
    .expect_err("ELF64 segment in the hole");
    assert!(matches!(err, LoadError::OutsideRam { .. }), "{err}");
    // ... and then its MBI data after the image cannot be addressed with 32 bits.
    let err = load_kernel(
        &mem,
        &layout,
        &elf64(FOUR_GIB, &[seg(FOUR_GIB, &[1], 1)]),
        "K",
        "",
        &[],
    )
    .expect_err("ELF64 above 4 GiB");
    assert!(matches!(err, LoadError::NoRoom { .. }), "{err}");

    // Modules that do not fit in low RAM.
    let small = RamLayout::pc(2 * MIB);
    let mem = mem_for(&small);
    let module = Module {
        text: "big".into(),
        data: vec![1; MIB as usize],
    };
    let err = load_kernel(
        &mem,
        &small,
        &elf32_mb(0x10_0000, &[seg(0x10_0000, &[1], 0x8_0000)]),
        "K",
        "",
        &[module],
    )
    .expect_err("no room");
    assert_eq!(
        err.to_string(),
        "not enough guest RAM below 4 GiB for the Multiboot data and modules after the kernel image: need up to 0x281000, low RAM ends at 0x200000"
    );

    // Loader data after an image that ends just below the MBI page would overlap it.
    let layout = layout_mib(16);
    let mem = mem_for(&layout);
    let err = load_kernel(
        &mem,
        &layout,
        &elf32_mb(0x8000, &[seg(0x8000, &[1], 0x10)]),
        "K",
        "",
        &[],
    )
    .expect_err("loader data over the MBI");
    assert!(
        err.to_string()
            .contains("the Multiboot module list, command lines and modules"),
        "{err}"
    );

    // Layouts the loader cannot describe.
    for bad in [
        RamLayout {
            below_4g: 0x8_0000,
            above_4g: 0,
        },
        RamLayout {
            below_4g: 0xFF00_0000,
            above_4g: 0,
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(LoadError::Layout(_))),
            "{bad:?}"
        );
        let mem = mem_for(&RamLayout::pc(2 * MIB));
        assert!(matches!(
            load_kernel(&mem, &bad, &simple_kernel(), "K", "", &[]),
            Err(LoadError::Layout(_))
        ));
    }
}

#[test]
fn every_truncation_of_a_valid_kernel_is_an_error_not_a_panic() {
    let layout = layout_mib(16);
    let mem = mem_for(&layout);
    for kernel in [
        elf32_mb(0x40_0000, &[seg(0x40_0000, &[7; 0x40], 0x100)]),
        elf64(0x40_0000, &[seg(0x40_0000, &[7; 0x40], 0x100)]),
    ] {
        assert!(load_kernel(&mem, &layout, &kernel, "K", "", &[]).is_ok());
        // The segment data is the last thing in the file, so every strict prefix lacks something.
        let data_end = 0x1040;
        for len in 0..data_end {
            let r = load_kernel(&mem, &layout, &kernel[..len], "K", "", &[]);
            assert!(r.is_err(), "prefix of {len} bytes loaded");
        }
    }
}

#[test]
fn corrupted_headers_never_panic() {
    // Deterministic byte corruption of the ELF and program headers: every result is Ok or a clear error.
    let layout = layout_mib(16);
    let mem = mem_for(&layout);
    let base32 = elf32_mb(0x40_0000, &[seg(0x40_0000, &[7; 0x40], 0x100)]);
    let base64 = elf64(0x40_0000, &[seg(0x40_0000, &[7; 0x40], 0x100)]);
    let mut state = 0x1234_5678_9ABC_DEF0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for round in 0..3000 {
        let mut k = if round % 2 == 0 {
            base32.clone()
        } else {
            base64.clone()
        };
        for _ in 0..1 + next() % 4 {
            let at = (next() % 0x78) as usize;
            k[at] = next() as u8;
        }
        match load_kernel(&mem, &layout, &k, "K", "", &[]) {
            Ok(l) => assert!(layout.contains(l.image_start, l.image_end - l.image_start)),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                errors += 1;
            }
        }
    }
    assert!(errors > 0, "corruption must be detected at least sometimes");
}

#[test]
fn initrd_argument_splitting() {
    let cases: &[(&str, &[&str])] = &[
        ("a", &["a"]),
        ("a,b", &["a", "b"]),
        ("env.txt KEY=1 X=2,b", &["env.txt KEY=1 X=2", "b"]),
        ("a,,b", &["a,b"]),
        ("a,,,b", &["a,", "b"]),
        ("", &[""]),
    ];
    for (arg, want) in cases {
        assert_eq!(Module::split_initrd_arg(arg), want.to_vec(), "{arg:?}");
    }
    for (text, name) in [("a.bin x=1", "a.bin"), ("b", "b"), (" lead", "")] {
        assert_eq!(Module::file_name(text), name);
    }
}

#[test]
fn modules_are_read_from_files() {
    let dir = std::env::temp_dir().join(format!("enlighten-loader-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("env");
    std::fs::write(&f, b"KEY=VALUE\n").unwrap();
    let arg = format!("{} a=b", f.display());
    let mods = Module::load_initrd_arg(&arg).expect("read");
    assert_eq!(mods.len(), 1);
    assert_eq!(mods[0].text, arg);
    assert_eq!(mods[0].data, b"KEY=VALUE\n");
    let missing = format!("{},{}", f.display(), dir.join("missing").display());
    let err = Module::load_initrd_arg(&missing).expect_err("missing file");
    assert!(
        err.to_string().starts_with("could not read module '"),
        "{err}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ram_layout_helpers() {
    let l = RamLayout::with_hole(6 * GIB, 2 * GIB);
    assert_eq!(l.regions(), vec![(0, 2 * GIB), (FOUR_GIB, 4 * GIB)]);
    // (start, len, inside?)
    let cases = [
        (0, 1, true),
        (2 * GIB - 1, 1, true),
        (2 * GIB - 1, 2, false),
        (3 * GIB, 1, false),
        (FOUR_GIB, 4 * GIB, true),
        (FOUR_GIB, 4 * GIB + 1, false),
        (0, 0, false),
        (u64::MAX, 2, false),
    ];
    for (start, len, inside) in cases {
        assert_eq!(l.contains(start, len), inside, "{start:#x}+{len:#x}");
    }
    assert_eq!(RamLayout::with_hole(MIB, 3 * GIB).regions(), vec![(0, MIB)]);
}

#[test]
fn higher_half_entry_is_translated_like_qemu() {
    let layout = layout_mib(32);
    // (ELF64?, e_entry, p_vaddr, p_flags, expected entry)
    let cases: &[(bool, u64, u64, u32, u64)] = &[
        (false, 0xC040_0010, 0xC040_0000, 7, 0x40_0010),
        (false, 0x40_0010, 0x40_0000, 7, 0x40_0010),
        (false, 0xC040_0010, 0xC040_0000, 6, 0xC040_0010), // not executable: unchanged
        (false, 0xC050_0000, 0xC040_0000, 7, 0xC050_0000), // outside the file-backed part: unchanged
        (
            true,
            0xFFFF_FFFF_8040_0010,
            0xFFFF_FFFF_8040_0000,
            5,
            0x40_0010,
        ),
    ];
    for &(is_64, entry, vaddr, flags, want) in cases {
        let mut k = build_elf(
            is_64,
            if is_64 { 62 } else { 3 },
            entry,
            &[seg(0x40_0000, &[0x90; 0x100], 0x100)],
            (!is_64).then_some(0),
        );
        if is_64 {
            put32(&mut k, 64 + 4, flags);
            put64(&mut k, 64 + 16, vaddr);
        } else {
            put32(&mut k, 52 + 8, vaddr as u32);
            put32(&mut k, 52 + 24, flags);
        }
        let mem = mem_for(&layout);
        let loaded = load_kernel(&mem, &layout, &k, "K", "", &[]).expect("load");
        assert_eq!(
            loaded.boot.entry(),
            want,
            "entry {entry:#x} vaddr {vaddr:#x} flags {flags}"
        );
        assert_eq!(
            read_bytes(&mem, 0x40_0000, 4),
            [0x90; 4],
            "loaded at p_paddr"
        );
    }
}

#[test]
fn long_mode_memory_map_withholds_the_page_tables() {
    let layout = layout_mib(64);
    let mem = mem_for(&layout);
    let k = load_kernel(
        &mem,
        &layout,
        &elf64(0x20_0000, &[seg(0x20_0000, &[1], 1)]),
        "K",
        "",
        &[],
    )
    .expect("load");
    let got: Vec<(u64, u64, u32)> = k
        .memory_map
        .iter()
        .map(|e| (e.base, e.length, e.kind))
        .collect();
    let mut want = vec![
        (0, 0x1000, 1),
        (0x1000, 0x7000, 2),
        (0x8000, 0x9_FC00 - 0x8000, 1),
    ];
    want.extend(
        build_memory_map(&layout)
            .iter()
            .skip(1)
            .map(|e| (e.base, e.length, e.kind)),
    );
    assert_eq!(got, want);
    assert_eq!(read_u32(&mem, 0x9500 + 44), 24 * want.len() as u32);
    assert_eq!(read_u32(&mem, 0x9500 + 4), 639, "mem_lower unchanged");
    // Multiboot keeps QEMU's map.
    let k = load_kernel(&mem, &layout, &simple_kernel(), "K", "", &[]).expect("load");
    assert_eq!(k.memory_map, build_memory_map(&layout));
}

#[test]
fn withhold_splits_usable_entries() {
    let e = |base, length, kind| MemoryMapEntry { base, length, kind };
    let map = vec![e(0, 0x1000, 1), e(0x1000, 0x1000, 2), e(0x2000, 0x3000, 1)];
    // (start, end, expected)
    let cases: Vec<(u64, u64, Vec<MemoryMapEntry>)> = vec![
        (0x6000, 0x7000, map.clone()),
        (0x1000, 0x2000, map.clone()),
        (
            0x2000,
            0x5000,
            vec![e(0, 0x1000, 1), e(0x1000, 0x1000, 2), e(0x2000, 0x3000, 2)],
        ),
        (
            0x3000,
            0x4000,
            vec![
                e(0, 0x1000, 1),
                e(0x1000, 0x1000, 2),
                e(0x2000, 0x1000, 1),
                e(0x3000, 0x1000, 2),
                e(0x4000, 0x1000, 1),
            ],
        ),
        (
            0x800,
            0x2800,
            vec![
                e(0, 0x800, 1),
                e(0x800, 0x800, 2),
                e(0x1000, 0x1000, 2),
                e(0x2000, 0x800, 2),
                e(0x2800, 0x2800, 1),
            ],
        ),
    ];
    for (start, end, want) in cases {
        assert_eq!(
            super::multiboot::withhold(&map, start, end),
            want,
            "{start:#x}..{end:#x}"
        );
    }
}

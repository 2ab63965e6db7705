use super::*;

fn ram(size: u64) -> (GuestMemoryMmap, MemoryLayout) {
    let layout = MemoryLayout::new(size);
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    (GuestMemoryMmap::from_ranges(&ranges).unwrap(), layout)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enlighten-snapunit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Pages written with a distinct value: (gpa, byte).
const TOUCHED: &[(u64, u8)] = &[
    (0, 1),
    (0x1000, 2),
    (0x5000, 3),
    (0x20_0000, 4),
    (0x3F_F000, 5),
];

fn section(path: &Path, layout: &MemoryLayout, pages: u64) -> MemoryFileSection {
    MemoryFileSection {
        version: MEMORY_FILE_VERSION,
        path: path.to_str().unwrap().to_string(),
        relative: None,
        crc32: None,
        id: None,
        size: layout.ram_size,
        regions: file_regions(layout),
        pages,
    }
}

#[test]
fn memory_file_is_sparse_and_maps_copy_on_write() {
    let (mem, layout) = ram(4 << 20);
    for &(gpa, v) in TOUCHED {
        mem.write_slice(&[v; PAGE_SIZE], GuestAddress(gpa)).unwrap();
    }
    let path = scratch("cow.mem");
    let mut calls = Vec::new();
    let w = write_memory_file(&mem, &layout, &path, None, &mut |d, t| calls.push((d, t))).unwrap();
    let pages = w.pages;
    assert_eq!(pages, TOUCHED.len() as u64);
    assert_eq!(pages + w.zero_pages, (4 << 20) / PAGE_SIZE as u64);
    // The CRC32 covers the whole file, holes included.
    let data = std::fs::read(&path).unwrap();
    assert_eq!(w.crc32, crc32fast::hash(&data));
    assert_eq!(calls.last(), Some(&(4 << 20, 4 << 20)));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 4 << 20);
    // Holes: far fewer 512-byte blocks allocated than the file's size.
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "not sparse: {} blocks",
        meta.blocks()
    );

    // A fresh RAM with other content; mapping the file replaces it.
    let (dst, dlayout) = ram(4 << 20);
    dst.write_slice(&[0xEE; PAGE_SIZE], GuestAddress(0x9000))
        .unwrap();
    let m = section(&path, &dlayout, pages);
    let verify = MemoryFileOptions {
        verify: true,
        ..MemoryFileOptions::default()
    };
    let m = MemoryFileSection {
        crc32: Some(w.crc32),
        ..m
    };
    assert_eq!(map_into(&dst, &dlayout, &m, &verify).unwrap(), pages);
    let mut page = [0u8; PAGE_SIZE];
    for &(gpa, v) in TOUCHED {
        dst.read_slice(&mut page, GuestAddress(gpa)).unwrap();
        assert!(page.iter().all(|&b| b == v), "page {gpa:#x}");
    }
    dst.read_slice(&mut page, GuestAddress(0x9000)).unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "old RAM content survived the mapping"
    );

    // Writes stay private: the file is unchanged.
    dst.write_slice(&[0x77; PAGE_SIZE], GuestAddress(0))
        .unwrap();
    let data = std::fs::read(&path).unwrap();
    assert!(data[..PAGE_SIZE].iter().all(|&b| b == 1));

    // A reset clears RAM, including the file-backed pages.
    clear_ram(&dst, &dlayout).unwrap();
    for &(gpa, _) in TOUCHED {
        dst.read_slice(&mut page, GuestAddress(gpa)).unwrap();
        assert!(page.iter().all(|&b| b == 0), "page {gpa:#x} after clear");
    }
}

#[test]
fn bad_memory_files_are_refused() {
    let (mem, layout) = ram(2 << 20);
    let path = scratch("bad.mem");
    write_memory_file(&mem, &layout, &path, None, &mut |_, _| {}).unwrap();
    let short = scratch("short.mem");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    let dir = scratch("a-dir");
    std::fs::create_dir_all(&dir).unwrap();
    let good = section(&path, &layout, 0);
    let cases: Vec<(&str, MemoryFileSection, &str)> = vec![
        (
            "truncated",
            section(&short, &layout, 0),
            "is 4096 bytes, the snapshot needs 2097152 bytes",
        ),
        (
            "missing",
            section(&scratch("missing.mem"), &layout, 0),
            "cannot open the snapshot's memory file",
        ),
        (
            "directory",
            section(&dir, &layout, 0),
            "is not a regular file",
        ),
        (
            "version",
            MemoryFileSection {
                version: 9,
                ..good.clone()
            },
            "has version 9",
        ),
        (
            "size",
            MemoryFileSection {
                size: 4 << 20,
                ..good.clone()
            },
            "is not this VM's",
        ),
        (
            "regions",
            MemoryFileSection {
                regions: vec![MemoryFileRegion {
                    gpa: 0,
                    size: 2 << 20,
                    offset: 4096,
                }],
                ..good.clone()
            },
            "is not this VM's",
        ),
    ];
    for (name, m, frag) in cases {
        let e = map_into(&mem, &layout, &m, &MemoryFileOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(frag), "{name}: {e}");
    }
    assert!(map_into(&mem, &layout, &good, &MemoryFileOptions::default()).is_ok());
}

#[test]
fn regions_follow_each_other_in_the_file() {
    let layout = MemoryLayout::new(4 << 30);
    let r = file_regions(&layout);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].offset, 0);
    assert_eq!(r[1].offset, r[0].size);
    assert_eq!(r[0].size + r[1].size, 4 << 30);
    assert_eq!(r[1].gpa, 1 << 32);
}

#[test]
fn relative_paths() {
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("/a/b", "/a/b/vm.mem", Some("vm.mem")),
        ("/a/b", "/a/b/m/vm.mem", Some("m/vm.mem")),
        ("/a/b", "/a/c/vm.mem", Some("../c/vm.mem")),
        ("/a/b/c", "/x/vm.mem", Some("../../../x/vm.mem")),
        ("/", "/vm.mem", Some("vm.mem")),
        ("/a/b", "/a/b", None),
        ("/a/../b", "/b/vm.mem", None),
    ];
    for &(from, to, want) in cases {
        assert_eq!(
            relative_path(Path::new(from), Path::new(to)),
            want.map(PathBuf::from),
            "{from} -> {to}"
        );
    }
}

/// Snapshot-style files in `dir`: a memory file with some pages, and its section as a save would record it
/// (relative to `dir`, with its CRC32 and a fresh snapshot id).
fn saved_pair(dir: &Path, layout: &MemoryLayout, mem: &GuestMemoryMmap) -> MemoryFileSection {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("vm.mem");
    let id = SnapshotId::random().unwrap();
    let w = write_memory_file(mem, layout, &path, Some(id), &mut |_, _| {}).unwrap();
    MemoryFileSection {
        relative: relative_path(dir, &path).map(|p| p.to_str().unwrap().to_string()),
        crc32: Some(w.crc32),
        id: Some(id.to_hex()),
        ..section(&path, layout, w.pages)
    }
}

#[test]
fn snapshot_ids_round_trip_and_bad_ones_are_refused() {
    let a = SnapshotId::random().unwrap();
    let b = SnapshotId::random().unwrap();
    assert_ne!(a, b, "two random ids are equal");
    assert_eq!(SnapshotId::from_hex(&a.to_hex()), Ok(a));
    assert_eq!(
        SnapshotId::from_hex(&a.to_hex().to_uppercase()),
        Ok(a),
        "upper case"
    );
    for bad in [
        "",
        "00",
        &"0".repeat(31),
        &"0".repeat(33),
        &"g".repeat(32),
        &"+1".repeat(16),
        &"é".repeat(16),
    ] {
        let e = SnapshotId::from_hex(bad).unwrap_err();
        assert!(e.contains("not 32 hex digits"), "{bad:?}: {e}");
    }
    let t = MemoryTrailer {
        size: 1 << 30,
        id: a,
    };
    let bytes = t.encode();
    assert_eq!(&bytes[..8], b"ENLMEMID");
    assert_eq!(MemoryTrailer::decode(&bytes), Some(t));
    let mut other = bytes;
    other[0] ^= 1;
    assert_eq!(MemoryTrailer::decode(&other), None);
}

/// A memory file from another save (the state file of save 1 next to the memory file of save 2) is refused
/// without reading RAM; the right pair maps; an old pair (no id, no trailer) still maps; an id in the state
/// file with a memory file without trailer is refused.
#[test]
fn a_memory_file_from_another_save_is_refused() {
    let (mem, layout) = ram(2 << 20);
    mem.write_slice(&[7; PAGE_SIZE], GuestAddress(0x2000))
        .unwrap();
    let dir1 = scratch("pair-1");
    let first = saved_pair(&dir1, &layout, &mem);
    let dir2 = scratch("pair-2");
    let second = saved_pair(&dir2, &layout, &mem);
    assert_ne!(first.id, second.id);
    let meta = std::fs::metadata(dir1.join("vm.mem")).unwrap();
    assert_eq!(meta.len(), (2 << 20) + MEMORY_TRAILER_LEN);
    // The CRC32 covers the RAM image only.
    let data = std::fs::read(dir1.join("vm.mem")).unwrap();
    assert_eq!(first.crc32, Some(crc32fast::hash(&data[..2 << 20])));
    let lazy = |dir: &Path| MemoryFileOptions {
        state_dir: Some(dir.to_path_buf()),
        ..MemoryFileOptions::default()
    };
    let (dst, dlayout) = ram(2 << 20);
    assert!(map_into(&dst, &dlayout, &first, &lazy(&dir1)).is_ok());
    let mut page = [0u8; PAGE_SIZE];
    dst.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
    assert!(page.iter().all(|&b| b == 7));

    let no_trailer = scratch("pair-old.mem");
    write_memory_file(&mem, &layout, &no_trailer, None, &mut |_, _| {}).unwrap();
    let given = |p: &Path| MemoryFileOptions {
        memory: Some(p.to_path_buf()),
        ..MemoryFileOptions::default()
    };
    let garbage = scratch("pair-garbage.mem");
    std::fs::write(&garbage, vec![0u8; (2 << 20) + 32]).unwrap();
    let wrong_size = scratch("pair-wrong-size.mem");
    let mut bytes = std::fs::read(dir1.join("vm.mem")).unwrap();
    bytes[(2 << 20) + 8] ^= 1;
    std::fs::write(&wrong_size, &bytes).unwrap();
    let bad_id = MemoryFileSection {
        id: Some("xyz".to_string()),
        ..first.clone()
    };
    let old = MemoryFileSection {
        id: None,
        ..first.clone()
    };
    let cases: Vec<(&str, &MemoryFileSection, MemoryFileOptions, Result<(), String>)> = vec![
        ("the right pair", &first, lazy(&dir1), Ok(())),
        (
            "the memory file of another save, next to the state file",
            &first,
            given(&dir2.join("vm.mem")),
            Err(format!(
                "its snapshot id is {}; the state file's is {}): the pair comes from two different saves",
                second.id.as_deref().unwrap(),
                first.id.as_deref().unwrap()
            )),
        ),
        (
            "the other way round",
            &second,
            given(&dir1.join("vm.mem")),
            Err("does not belong to this state file".to_string()),
        ),
        (
            "no trailer",
            &first,
            given(&no_trailer),
            Err("has no snapshot id (written by an older enlighten".to_string()),
        ),
        (
            "a file of the right length without the magic",
            &first,
            given(&garbage),
            Err("it has no snapshot id trailer".to_string()),
        ),
        (
            "a trailer for another RAM size",
            &first,
            given(&wrong_size),
            Err("its trailer is for".to_string()),
        ),
        (
            "a state file with a malformed id",
            &bad_id,
            lazy(&dir1),
            Err("is not 32 hex digits".to_string()),
        ),
        ("an old pair: no id, no trailer", &old, given(&no_trailer), Ok(())),
        (
            "an old state file with a new memory file: the trailer makes it too long",
            &old,
            lazy(&dir1),
            Err(format!("is {} bytes, the snapshot needs {} bytes", (2 << 20) + 32, 2 << 20)),
        ),
    ];
    for (name, m, opts, want) in cases {
        let (dst, dlayout) = ram(2 << 20);
        let got = map_into(&dst, &dlayout, m, &opts)
            .map(|_| ())
            .map_err(|e| e.to_string());
        match (got, want) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(frag)) => assert!(e.contains(&frag), "{name}: {e}"),
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
    // The pure checks: expected length with and without the trailer.
    assert_eq!(
        check_section(&layout, &first).unwrap(),
        (
            SnapshotId::from_hex(first.id.as_deref().unwrap()).ok(),
            (2 << 20) + 32
        )
    );
    assert_eq!(check_section(&layout, &old).unwrap(), (None, 2 << 20));
}

#[test]
fn the_memory_file_is_found_next_to_the_state_file_or_where_told() {
    let (mem, layout) = ram(2 << 20);
    for &(gpa, v) in TOUCHED.iter().filter(|(g, _)| *g < 2 << 20) {
        mem.write_slice(&[v; PAGE_SIZE], GuestAddress(gpa)).unwrap();
    }
    let old = scratch("found-old");
    let m = saved_pair(&old, &layout, &mem);
    assert_eq!(m.relative.as_deref(), Some("vm.mem"));
    // The pair moves to another directory together; the recorded absolute path is gone.
    let new = scratch("found-new");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::rename(old.join("vm.mem"), new.join("vm.mem")).unwrap();
    let other = scratch("found-other.mem");
    std::fs::copy(new.join("vm.mem"), &other).unwrap();
    let opts = |dir: Option<&Path>, memory: Option<&Path>| MemoryFileOptions {
        state_dir: dir.map(Path::to_path_buf),
        memory: memory.map(Path::to_path_buf),
        verify: true,
    };
    let cases: Vec<(&str, MemoryFileOptions, Result<PathBuf, &str>)> = vec![
        ("next to the state file", opts(Some(&new), None), Ok(new.join("vm.mem"))),
        ("given", opts(Some(&old), Some(&other)), Ok(other.clone())),
        (
            "no state directory: only the recorded path",
            opts(None, None),
            Err("(where it was written): No such file"),
        ),
        (
            "both tried, next to the state file first",
            opts(Some(&scratch("found-elsewhere")), None),
            Err("found-elsewhere/vm.mem (next to the state file): No such file or directory (os error 2); "),
        ),
        (
            "a given path is the only one tried",
            opts(Some(&new), Some(&old.join("nope.mem"))),
            Err("nope.mem (as given): No such file"),
        ),
    ];
    for (name, o, want) in cases {
        let r = check_memory_file(&layout, &m, &o);
        match (r, want) {
            (Ok((_, p)), Ok(w)) => assert_eq!(p, w, "{name}"),
            (Err(e), Err(frag)) => {
                let e = e.to_string();
                assert!(
                    e.contains(frag) && e.contains("enlighten restore STATE MEMORY"),
                    "{name}: {e}"
                );
            }
            (r, w) => panic!("{name}: got {:?}, want {w:?}", r.map(|(_, p)| p)),
        }
    }
    // Mapping from the moved file gives the saved pages.
    let (dst, dlayout) = ram(2 << 20);
    map_into(&dst, &dlayout, &m, &opts(Some(&new), None)).unwrap();
    let mut page = [0u8; PAGE_SIZE];
    dst.read_slice(&mut page, GuestAddress(0x1000)).unwrap();
    assert!(page.iter().all(|&b| b == 2));
}

#[test]
fn verification_finds_damage() {
    let (mem, layout) = ram(2 << 20);
    mem.write_slice(&[9; PAGE_SIZE], GuestAddress(0x3000))
        .unwrap();
    let dir = scratch("verify");
    let m = saved_pair(&dir, &layout, &mem);
    let path = dir.join("vm.mem");
    let verify = MemoryFileOptions {
        state_dir: Some(dir.clone()),
        verify: true,
        ..MemoryFileOptions::default()
    };
    let lazy = MemoryFileOptions {
        verify: false,
        ..verify.clone()
    };
    assert!(check_memory_file(&layout, &m, &verify).is_ok());
    // One flipped byte, in a written page and in a hole: refused with the option, not read without it.
    for offset in [0x3000 + 17, 0x10_0000] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut b = [0u8; 1];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, offset)
            .unwrap();
        f.write_all_at(&[b[0] ^ 0x20], offset).unwrap();
        let e = check_memory_file(&layout, &m, &verify)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("is damaged: its CRC32 is")
                && e.contains(&format!("{:#010x}", m.crc32.unwrap())),
            "{offset:#x}: {e}"
        );
        assert!(check_memory_file(&layout, &m, &lazy).is_ok());
        f.write_all_at(&b, offset).unwrap();
        assert!(check_memory_file(&layout, &m, &verify).is_ok());
    }
    // A state file without a checksum (an older enlighten) cannot be verified.
    let old = MemoryFileSection { crc32: None, ..m };
    let e = check_memory_file(&layout, &old, &verify)
        .unwrap_err()
        .to_string();
    assert!(e.contains("records no checksum"), "{e}");
    assert!(check_memory_file(&layout, &old, &lazy).is_ok());
}

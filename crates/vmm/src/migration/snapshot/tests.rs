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
    let (pages, zero) =
        write_memory_file(&mem, &layout, &path, &mut |d, t| calls.push((d, t))).unwrap();
    assert_eq!(pages, TOUCHED.len() as u64);
    assert_eq!(pages + zero, (4 << 20) / PAGE_SIZE as u64);
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
    assert_eq!(map_into(&dst, &dlayout, &m).unwrap(), pages);
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
    write_memory_file(&mem, &layout, &path, &mut |_, _| {}).unwrap();
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
        let e = map_into(&mem, &layout, &m).unwrap_err().to_string();
        assert!(e.contains(frag), "{name}: {e}");
    }
    assert!(map_into(&mem, &layout, &good).is_ok());
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

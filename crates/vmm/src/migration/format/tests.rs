use super::*;
use proptest::prelude::*;

fn config() -> ConfigSection {
    ConfigSection {
        ram_size: 128 << 20,
        vcpus: 2,
        hyperv: true,
        cpuid_digest: 0x1234_5678,
        hv_features: [0x2FF, 0, 0x8, 0x20],
        tsc_khz: 2_000_000,
        user_tsc_khz: None,
    }
}

/// A small but complete stream: config, two vCPU sections, a device, the engine, 3 pages (one zero), end.
fn sample_stream() -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    w.json(SectionKind::Config, &config()).unwrap();
    w.section(SectionKind::Vcpu, b"{\"index\":0}").unwrap();
    w.section(SectionKind::Vcpu, b"{\"index\":1}").unwrap();
    w.section(SectionKind::Device, b"{\"name\":\"serial\"}")
        .unwrap();
    w.section(SectionKind::Engine, b"{}").unwrap();
    let mut batch = PageBatch::default();
    let mut page = [0u8; PAGE_SIZE];
    page[0] = 1;
    batch.add(&mut w, 0x1000, &page).unwrap();
    batch.add(&mut w, 0x2000, &[0u8; PAGE_SIZE]).unwrap();
    page[4095] = 7;
    batch.add(&mut w, 0x3000, &page).unwrap();
    batch.flush(&mut w).unwrap();
    assert_eq!((batch.sent_pages, batch.zero_pages), (2, 1));
    w.finish().unwrap()
}

fn read_all(bytes: &[u8]) -> Result<Vec<Section>, StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(s) = r.next_section()? {
        out.push(s);
    }
    Ok(out)
}

#[test]
fn crc32_known_vectors() {
    let cases: &[(&[u8], u32)] = &[
        (b"", 0),
        (b"123456789", 0xCBF4_3926),
        (b"The quick brown fox jumps over the lazy dog", 0x414F_A339),
        (b"a", 0xE8B7_BE43),
    ];
    for (data, crc) in cases {
        assert_eq!(crc32(data), *crc, "{:?}", String::from_utf8_lossy(data));
    }
    // Incremental equals one-shot.
    assert_eq!(crc32_update(crc32(b"12345"), b"6789"), 0xCBF4_3926);
}

#[test]
fn round_trip() {
    let bytes = sample_stream();
    let mut r = StreamReader::new(&bytes[..]).unwrap();
    assert_eq!(r.header.format_version, FORMAT_VERSION);
    assert_eq!(r.header.enlighten_version, ENLIGHTEN_VERSION);
    let c: ConfigSection = r.expect_section().unwrap().json().unwrap();
    assert_eq!(c, config());
    let kinds: Vec<SectionKind> = std::iter::from_fn(|| r.next_section().unwrap())
        .map(|s| s.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            SectionKind::Vcpu,
            SectionKind::Vcpu,
            SectionKind::Device,
            SectionKind::Engine,
            SectionKind::Memory,
            SectionKind::End
        ]
    );
    assert_eq!(r.read_bytes(), bytes.len() as u64);
    assert!(r.next_section().unwrap().is_none(), "nothing after End");
    let secs = read_all(&bytes).unwrap();
    let mem = secs.iter().find(|s| s.kind == SectionKind::Memory).unwrap();
    let pages = mem.pages().unwrap();
    assert_eq!(pages.len(), 2, "the zero page is elided");
    assert_eq!(pages[0].0, 0x1000);
    assert_eq!(pages[0].1[0], 1);
    assert_eq!(pages[1].0, 0x3000);
    assert_eq!(pages[1].1[4095], 7);
}

#[test]
fn page_batches_split_at_the_limit() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    let mut batch = PageBatch::default();
    let page = [0xAAu8; PAGE_SIZE];
    let n = MAX_PAGES_PER_SECTION as u64 * 2 + 3;
    for i in 0..n {
        batch.add(&mut w, i * PAGE_SIZE as u64, &page).unwrap();
    }
    batch.flush(&mut w).unwrap();
    let bytes = w.finish().unwrap();
    let secs = read_all(&bytes).unwrap();
    let sizes: Vec<usize> = secs
        .iter()
        .filter(|s| s.kind == SectionKind::Memory)
        .map(|s| s.pages().unwrap().len())
        .collect();
    assert_eq!(
        sizes,
        [MAX_PAGES_PER_SECTION, MAX_PAGES_PER_SECTION, 3],
        "full sections then the rest"
    );
}

/// The message of a refused stream, checked for the kind of error and a fragment.
fn refused(bytes: &[u8]) -> String {
    match read_all(bytes) {
        Ok(s) => panic!("accepted a bad stream ({} sections)", s.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn refusals_name_the_problem() {
    let good = sample_stream();
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let mut new_version = good.clone();
    new_version[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let mut old_version = good.clone();
    old_version[8..12].copy_from_slice(&0u32.to_le_bytes());
    let mut one_pass_version = good.clone();
    one_pass_version[8..12].copy_from_slice(&1u32.to_le_bytes());
    let hdr = 14 + ENLIGHTEN_VERSION.len();
    let mut bad_kind = good.clone();
    bad_kind[hdr..hdr + 4].copy_from_slice(&0x77u32.to_le_bytes());
    let mut huge_len = good.clone();
    huge_len[hdr + 4..hdr + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut flipped = good.clone();
    flipped[hdr + 16] ^= 0x01;
    let mut long_version = good.clone();
    long_version[12..14].copy_from_slice(&1000u16.to_le_bytes());
    let cases: &[(&str, Vec<u8>, &str)] = &[
        ("empty", Vec::new(), "truncated migration stream"),
        (
            "half header",
            good[..6].to_vec(),
            "truncated migration stream",
        ),
        ("bad magic", bad_magic, "not an enlighten migration stream"),
        (
            "newer version",
            new_version,
            "format version 3 is not supported (this build reads version 2)",
        ),
        (
            "version 1 (before live migration)",
            one_pass_version,
            "format version 1 is not supported (this build reads version 2)",
        ),
        (
            "older version",
            old_version,
            "format version 0 is not supported",
        ),
        ("unknown kind", bad_kind, "unknown section type 0x77"),
        ("huge length", huge_len, "claims 18446744073709551615 bytes"),
        (
            "flipped bit",
            flipped,
            "checksum mismatch in the config section",
        ),
        (
            "long version string",
            long_version,
            "version string is 1000 bytes",
        ),
        (
            "no End section",
            good[..good.len() - 16].to_vec(),
            "truncated migration stream: the stream ended inside a section header",
        ),
        (
            "cut in a payload",
            good[..good.len() - 100].to_vec(),
            "truncated migration stream: the memory section",
        ),
    ];
    for (what, bytes, fragment) in cases {
        let msg = refused(bytes);
        assert!(msg.contains(fragment), "{what}: {msg}");
    }
}

#[test]
fn memory_payload_shape_is_checked() {
    let odd = Section {
        kind: SectionKind::Memory,
        payload: vec![0; PAGE_RECORD + 1],
    };
    assert!(odd
        .pages()
        .unwrap_err()
        .to_string()
        .contains("whole number"));
    let mut misaligned = vec![0u8; PAGE_RECORD];
    misaligned[..8].copy_from_slice(&0x1234u64.to_le_bytes());
    let s = Section {
        kind: SectionKind::Memory,
        payload: misaligned,
    };
    assert!(s
        .pages()
        .unwrap_err()
        .to_string()
        .contains("not page-aligned"));
    let bad_json = Section {
        kind: SectionKind::Config,
        payload: b"{".to_vec(),
    };
    assert!(bad_json
        .json::<ConfigSection>()
        .unwrap_err()
        .to_string()
        .contains("config section does not decode"));
}

#[test]
fn writer_refuses_oversized_sections() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    let big = vec![0u8; SectionKind::Memory.max_len() as usize + 1];
    assert!(w.section(SectionKind::Memory, &big).is_err());
    assert!(w.section(SectionKind::End, b"x").is_err());
}

#[test]
fn config_mismatches_are_named() {
    let base = config();
    let cases: &[(&str, ConfigSection, &[&str])] = &[
        ("same", base.clone(), &[]),
        (
            "ram",
            ConfigSection {
                ram_size: 256 << 20,
                ..base.clone()
            },
            &["RAM size: the stream has 134217728 bytes (128 MiB), this VM has 268435456 bytes (256 MiB)"],
        ),
        (
            "vcpus",
            ConfigSection {
                vcpus: 4,
                ..base.clone()
            },
            &["vCPU count: the stream has 2, this VM has 4"],
        ),
        (
            "hyperv off",
            ConfigSection {
                hyperv: false,
                hv_features: [0; 4],
                cpuid_digest: 1,
                ..base.clone()
            },
            &[
                "Hyper-V enlightenments: the stream has them on, this VM has them off",
                "Hyper-V features",
                "CPUID: the stream's table digest is 12345678",
            ],
        ),
        (
            "tsc differs only",
            ConfigSection {
                tsc_khz: 1,
                user_tsc_khz: Some(1),
                ..base.clone()
            },
            &[],
        ),
    ];
    for (what, dest, fragments) in cases {
        let r = base.check_against(dest);
        if fragments.is_empty() {
            assert!(r.is_ok(), "{what}: {r:?}");
            continue;
        }
        let msg = r.unwrap_err().to_string();
        assert!(
            msg.starts_with("migration stream does not match this VM: "),
            "{msg}"
        );
        for f in *fragments {
            assert!(msg.contains(f), "{what}: {msg} lacks {f}");
        }
    }
}

#[test]
fn cpuid_digest_is_order_independent_and_sensitive() {
    use hyperv::cpuid::CpuidEntry;
    let a = CpuidEntry::leaf(1, 2, 3, 4, 5);
    let b = CpuidEntry::leaf(0x4000_0003, 0x2FF, 0, 0, 8);
    assert_eq!(cpuid_digest(&[a, b]), cpuid_digest(&[b, a]));
    let c = CpuidEntry::leaf(0x4000_0003, 0x2FE, 0, 0, 8);
    assert_ne!(cpuid_digest(&[a, b]), cpuid_digest(&[a, c]));
    assert_eq!(hv_features(&[a, b]), [0x2FF, 0, 8, 0]);
    // The host CPU's APIC ID does not count.
    let mut a2 = a;
    a2.ebx ^= 0x0500_0000;
    assert_eq!(cpuid_digest(&[a, b]), cpuid_digest(&[a2, b]));
    a2.ebx ^= 1;
    assert_ne!(cpuid_digest(&[a, b]), cpuid_digest(&[a2, b]));
    let x2 = CpuidEntry::leaf(0xB, 1, 2, 0, 7);
    let x2b = CpuidEntry::leaf(0xB, 1, 2, 0, 3);
    assert_eq!(cpuid_digest(&[x2]), cpuid_digest(&[x2b]));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random corruption (bit flips, truncation, garbage splices) never panics, never allocates beyond the
    /// limits, and is either refused or (for flips that hit nothing checked, e.g. the version text) read as a
    /// well-formed stream.
    #[test]
    fn random_corruption_is_refused_or_harmless(
        flips in proptest::collection::vec((any::<usize>(), 0u8..8), 0..4),
        cut in proptest::option::of(any::<usize>()),
        splice in proptest::option::of((any::<usize>(), proptest::collection::vec(any::<u8>(), 1..32))),
    ) {
        let good = sample_stream();
        let mut bytes = good.clone();
        for (pos, bit) in &flips {
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
        }
        if let Some((pos, junk)) = &splice {
            let i = pos % bytes.len();
            bytes.splice(i..i, junk.iter().copied());
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        match read_all(&bytes) {
            Err(e) => prop_assert!(!e.to_string().is_empty()),
            Ok(secs) => {
                // Accepted: every payload passed its CRC, so it must be the original content (a CRC-32 catches
                // every burst up to 32 bits); only the version text may differ.
                let orig = read_all(&good).unwrap();
                prop_assert_eq!(secs, orig);
            }
        }
    }
}

#[test]
fn later_passes_send_zero_pages_as_addresses() {
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    let mut first = PageBatch::default();
    let mut later = PageBatch::new(true);
    let data = [7u8; PAGE_SIZE];
    let zero = [0u8; PAGE_SIZE];
    for (gpa, page) in [(0x1000u64, &zero), (0x2000, &data), (0x3000, &zero)] {
        first.add(&mut w, gpa, page).unwrap();
        later.add(&mut w, gpa, page).unwrap();
    }
    first.flush(&mut w).unwrap();
    later.flush(&mut w).unwrap();
    let bytes = w.finish().unwrap();
    let secs = read_all(&bytes).unwrap();
    let kinds: Vec<SectionKind> = secs.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            SectionKind::Memory,
            SectionKind::Memory,
            SectionKind::ZeroPages,
            SectionKind::End
        ]
    );
    assert_eq!((first.sent_pages, first.zero_pages), (1, 2));
    assert_eq!((later.sent_pages, later.zero_pages), (1, 2));
    assert_eq!(secs[2].zero_pages().unwrap(), vec![0x1000, 0x3000]);
    // A full ZeroPages section goes out by itself.
    let mut w = StreamWriter::new(Vec::new()).unwrap();
    let mut b = PageBatch::new(true);
    for i in 0..MAX_ZERO_PAGES_PER_SECTION as u64 + 1 {
        b.add(&mut w, i * PAGE_SIZE as u64, &zero).unwrap();
    }
    b.flush(&mut w).unwrap();
    let secs = read_all(&w.finish().unwrap()).unwrap();
    let lens: Vec<usize> = secs
        .iter()
        .filter(|s| s.kind == SectionKind::ZeroPages)
        .map(|s| s.zero_pages().map(|v| v.len()).unwrap_or(0))
        .collect();
    assert_eq!(lens, [MAX_ZERO_PAGES_PER_SECTION, 1]);
}

#[test]
fn zero_pages_payload_shape_is_checked() {
    let cases: &[(&[u8], &str)] = &[
        (&[0u8; 7], "not a whole number of 8-byte page addresses"),
        (
            &0x1001u64.to_le_bytes(),
            "page address 0x1001 is not page-aligned",
        ),
    ];
    for (payload, fragment) in cases {
        let s = Section {
            kind: SectionKind::ZeroPages,
            payload: payload.to_vec(),
        };
        let e = s.zero_pages().unwrap_err().to_string();
        assert!(e.contains(fragment), "{e}");
    }
    let not_zero = Section {
        kind: SectionKind::Memory,
        payload: Vec::new(),
    };
    assert!(not_zero.zero_pages().is_err());
}

#[test]
fn crc32_matches_the_bitwise_definition() {
    // The bitwise definition, one bit at a time, against the library's on every length up to 100.
    fn slow(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
    for len in 0..data.len() {
        assert_eq!(crc32(&data[..len]), slow(&data[..len]), "length {len}");
    }
}

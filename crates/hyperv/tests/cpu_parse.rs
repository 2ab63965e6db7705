//! `-cpu` parsing: spellings, overrides, values and QEMU's error texts.

use hyperv::config::{
    Backend, CpuConfig, Feature, FeatureSet, OnOffAuto, WARN_VENDOR_ID_TRUNCATED,
};

fn parse(spec: &str) -> CpuConfig {
    match CpuConfig::parse(spec) {
        Ok(c) => c,
        Err(e) => panic!("{spec}: unexpected error {e}"),
    }
}

fn parse_err(spec: &str) -> String {
    match CpuConfig::parse(spec) {
        Ok(c) => panic!("{spec}: expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Every hv feature flag of the reference, with the QEMU bit number it maps to (reference §3).
const FLAGS: &[(&str, u8)] = &[
    ("hv-relaxed", 0),
    ("hv-vapic", 1),
    ("hv-time", 2),
    ("hv-crash", 3),
    ("hv-reset", 4),
    ("hv-vpindex", 5),
    ("hv-runtime", 6),
    ("hv-synic", 7),
    ("hv-stimer", 8),
    ("hv-frequencies", 9),
    ("hv-reenlightenment", 10),
    ("hv-tlbflush", 11),
    ("hv-evmcs", 12),
    ("hv-ipi", 13),
    ("hv-stimer-direct", 14),
    ("hv-avic", 15),
    ("hv-apicv", 15),
    ("hv-syndbg", 16),
    ("hv-emsr-bitmap", 17),
    ("hv-xmm-input", 18),
    ("hv-tlbflush-ext", 19),
    ("hv-tlbflush-direct", 20),
];

#[test]
fn every_flag_parses_in_both_spellings_and_maps_to_its_bit() {
    for (name, bit) in FLAGS {
        let underscored = name.replace('-', "_");
        for spec in [
            format!("host,{name}"),
            format!("host,{underscored}"),
            format!("host,{name}=on"),
        ] {
            let c = parse(&spec);
            assert_eq!(c.hv, FeatureSet(1 << bit), "{spec}");
            assert!(c.hyperv_enabled(), "{spec}");
        }
    }
}

#[test]
fn later_setting_overrides_earlier_one() {
    for (name, bit) in FLAGS {
        let underscored = name.replace('-', "_");
        let cases = [
            (format!("host,{name},{name}=off"), false),
            (format!("host,{name}=off,{name}"), true),
            (format!("host,{name},{underscored}=off"), false),
            (format!("host,{underscored}=no,{name}=yes"), true),
            (format!("host,{name}=on,{name}=n"), false),
        ];
        for (spec, on) in cases {
            let c = parse(&spec);
            assert_eq!(
                c.hv.contains(Feature::from_bit(*bit).unwrap()),
                on,
                "{spec}"
            );
        }
    }
}

#[test]
fn boolean_values_follow_qapi_bool_parse() {
    let table = [
        ("on", Ok(true)),
        ("yes", Ok(true)),
        ("true", Ok(true)),
        ("y", Ok(true)),
        ("off", Ok(false)),
        ("no", Ok(false)),
        ("false", Ok(false)),
        ("n", Ok(false)),
        ("ON", Err(())),
        ("1", Err(())),
        ("", Err(())),
        ("maybe", Err(())),
        ("on ", Err(())),
    ];
    for (name, _) in FLAGS {
        for (value, want) in &table {
            let spec = format!("host,{name}={value}");
            match want {
                Ok(on) => assert_eq!(!parse(&spec).hv.is_empty(), *on, "{spec}"),
                Err(()) => assert_eq!(
                    parse_err(&spec),
                    format!("Parameter '{name}' expects 'on' or 'off'"),
                    "{spec}"
                ),
            }
        }
    }
    // The same rule for the other boolean options, and the message names the dashed property.
    for opt in [
        "hv-passthrough",
        "hv-enforce-cpuid",
        "kvm",
        "enforce",
        "check",
        "x2apic",
        "migratable",
    ] {
        assert_eq!(
            parse_err(&format!("host,{opt}=2")),
            format!("Parameter '{opt}' expects 'on' or 'off'")
        );
    }
    assert_eq!(
        parse_err("host,hv_relaxed=bad"),
        "Parameter 'hv-relaxed' expects 'on' or 'off'"
    );
}

#[test]
fn apicv_is_an_alias_of_avic() {
    assert_eq!(parse("host,hv-apicv").hv, FeatureSet::of(&[Feature::Avic]));
    assert_eq!(parse("host,hv-avic,hv-apicv=off").hv, FeatureSet::EMPTY);
    assert_eq!(parse("host,hv_apicv").hv, FeatureSet::of(&[Feature::Avic]));
}

#[test]
fn models() {
    for m in [
        "host",
        "max",
        "base",
        "qemu64",
        "kvm64",
        "qemu32",
        "kvm32",
        "Nehalem",
        "Haswell-noTSX",
    ] {
        assert_eq!(parse(m).model, m);
        assert_eq!(parse(&format!("{m},hv-relaxed")).model, m);
    }
    assert_eq!(parse_err("xyz"), "unable to find CPU model 'xyz'");
    assert_eq!(
        parse_err("xyz,hv-relaxed"),
        "unable to find CPU model 'xyz'"
    );
    assert_eq!(parse_err("HOST"), "unable to find CPU model 'HOST'");
    assert_eq!(parse_err(",hv-relaxed"), "unable to find CPU model ''");
    assert_eq!(parse_err(""), "-cpu option cannot be empty");
}

#[test]
fn empty_items_are_skipped() {
    let c = parse("host,,hv-relaxed,,");
    assert_eq!(c.hv, FeatureSet::of(&[Feature::Relaxed]));
    assert_eq!(parse("host,").hv, FeatureSet::EMPTY);
}

#[test]
fn spinlocks_values() {
    let ok = [
        ("0x1fff", 0x1fff),
        ("0X1FFF", 0x1fff),
        ("8191", 8191),
        ("010", 8),
        ("0", 0),
        ("4294967295", 0xFFFF_FFFF),
        ("0xffffffff", 0xFFFF_FFFF),
        (" 12", 12),
        ("+5", 5),
    ];
    for (v, want) in ok {
        for key in ["hv-spinlocks", "hv_spinlocks"] {
            assert_eq!(
                parse(&format!("host,{key}={v}")).spinlocks,
                want,
                "{key}={v}"
            );
        }
    }
    let bad = [
        ("0x100000000", "Parameter 'hv-spinlocks' expects uint32"),
        ("-1", "Parameter 'hv-spinlocks' expects uint32"),
        ("abc", "Parameter 'hv-spinlocks' expects uint64"),
        ("", "Parameter 'hv-spinlocks' expects uint64"),
        ("0x", "Parameter 'hv-spinlocks' expects uint64"),
        ("12abc", "Parameter 'hv-spinlocks' expects uint64"),
        ("09", "Parameter 'hv-spinlocks' expects uint64"),
        (
            "99999999999999999999999",
            "Parameter 'hv-spinlocks' expects uint64",
        ),
    ];
    for (v, msg) in bad {
        assert_eq!(parse_err(&format!("host,hv-spinlocks={v}")), msg, "{v}");
    }
    // A bare valued option means "=on", which is not a number.
    assert_eq!(
        parse_err("host,hv-spinlocks"),
        "Parameter 'hv-spinlocks' expects uint64"
    );
    // "+name" is "name=on" (QEMU registers it as a global property with the value "on").
    assert_eq!(
        parse_err("host,+hv-spinlocks"),
        "Parameter 'hv-spinlocks' expects uint64"
    );
    assert_eq!(parse("host,+hv-vendor-id").vendor_id, b"on");
    assert_eq!(parse("host,-hv-vendor-id").vendor_id, b"off");
}

#[test]
fn hyperv_identification_rule() {
    let table = [
        ("host", false),
        ("host,hv-spinlocks=0x1fff", true),
        ("host,hv-spinlocks=0xffffffff", false),
        ("host,hv-spinlocks=4294967295", false),
        ("host,hv-vendor-id=KVMKVMKVM", false),
        ("host,hv-version-id-build=1234,hv-version-id-major=6", false),
        ("host,hv-enforce-cpuid", false),
        ("host,hv-no-nonarch-coresharing=on", false),
        ("host,x-hv-max-vps=64", false),
        ("host,kvm=off", false),
        ("host,hv-passthrough", true),
        ("host,hv-relaxed", true),
        ("host,hv-relaxed,hv-relaxed=off", false),
        ("host,hv-syndbg", true),
    ];
    for (spec, want) in table {
        assert_eq!(parse(spec).hyperv_enabled(), want, "{spec}");
    }
}

#[test]
fn vendor_id() {
    let c = parse("host,hv-vendor-id=KVMKVMKVM");
    assert_eq!(c.vendor_id, b"KVMKVMKVM");
    assert!(c.warnings.is_empty());
    let c = parse("host,hv_vendor_id=123456789012");
    assert_eq!(c.vendor_id, b"123456789012");
    assert!(c.warnings.is_empty());
    let c = parse("host,hv-vendor-id=1234567890123456");
    assert_eq!(c.vendor_id, b"123456789012");
    assert_eq!(c.warnings, vec![WARN_VENDOR_ID_TRUNCATED.to_string()]);
    assert_eq!(
        WARN_VENDOR_ID_TRUNCATED,
        "hv-vendor-id truncated to 12 characters"
    );
    // Only the final value is truncated (QEMU truncates at realize time).
    let c = parse("host,hv-vendor-id=1234567890123456,hv-vendor-id=short");
    assert_eq!(c.vendor_id, b"short");
    assert!(c.warnings.is_empty());
    // The default, and a value containing '='.
    assert_eq!(parse("host").vendor_id, b"Microsoft Hv");
    assert_eq!(parse("host,hv-vendor-id=a=b").vendor_id, b"a=b");
    // Truncation is by bytes, like QEMU (a multi-byte character may be cut).
    let c = parse("host,hv-vendor-id=ééééééé");
    assert_eq!(c.vendor_id.len(), 12);
    assert_eq!(c.warnings.len(), 1);
}

#[test]
fn no_nonarch_coresharing() {
    let table = [
        ("on", OnOffAuto::On),
        ("off", OnOffAuto::Off),
        ("auto", OnOffAuto::Auto),
    ];
    for (v, want) in table {
        assert_eq!(
            parse(&format!("host,hv-no-nonarch-coresharing={v}")).no_nonarch_coresharing,
            want
        );
        assert_eq!(
            parse(&format!("host,hv_no_nonarch_coresharing={v}")).no_nonarch_coresharing,
            want
        );
    }
    assert_eq!(parse("host").no_nonarch_coresharing, OnOffAuto::Off);
    assert_eq!(
        parse_err("host,hv-no-nonarch-coresharing=maybe"),
        "Parameter 'hv-no-nonarch-coresharing' does not accept value 'maybe'"
    );
    // A bare name means "=on", which this enum accepts.
    assert_eq!(
        parse("host,hv-no-nonarch-coresharing").no_nonarch_coresharing,
        OnOffAuto::On
    );
}

#[test]
fn version_id_widths() {
    let c = parse(
        "host,hv-version-id-build=7100,hv-version-id-major=6,hv-version-id-minor=1,hv-version-id-spack=3,\
         hv-version-id-sbranch=255,hv-version-id-snumber=0x1234567",
    );
    assert_eq!(c.version.build, 7100);
    assert_eq!(c.version.major, 6);
    assert_eq!(c.version.minor, 1);
    assert_eq!(c.version.spack, 3);
    assert_eq!(c.version.sbranch, 255);
    assert_eq!(c.version.snumber, 0x1234567);
    let bad = [
        (
            "hv-version-id-build=0x100000000",
            "Parameter 'hv-version-id-build' expects uint32",
        ),
        (
            "hv-version-id-major=65536",
            "Parameter 'hv-version-id-major' expects uint16",
        ),
        (
            "hv-version-id-minor=0x10000",
            "Parameter 'hv-version-id-minor' expects uint16",
        ),
        (
            "hv-version-id-spack=x",
            "Parameter 'hv-version-id-spack' expects uint64",
        ),
        (
            "hv-version-id-sbranch=256",
            "Parameter 'hv-version-id-sbranch' expects uint8",
        ),
        (
            "hv_version_id_snumber=0x100000000",
            "Parameter 'hv-version-id-snumber' expects uint32",
        ),
        (
            "x-hv-max-vps=2147483648",
            "Parameter 'x-hv-max-vps' expects int32",
        ),
        (
            "x-hv-max-vps=-2147483649",
            "Parameter 'x-hv-max-vps' expects int32",
        ),
        ("x-hv-max-vps=ten", "Parameter 'x-hv-max-vps' expects int64"),
    ];
    for (item, msg) in bad {
        assert_eq!(parse_err(&format!("host,{item}")), msg, "{item}");
    }
    assert_eq!(parse("host,x-hv-max-vps=64").max_vps, 64);
    assert_eq!(parse("host,x-hv-max-vps=-1").max_vps, -1);
    assert_eq!(parse("host").max_vps, -1);
}

#[test]
fn tsc_frequency() {
    let ok = [
        ("tsc-frequency=2500000000", 2_500_000_000u64),
        ("tsc_frequency=1000", 1000),
        ("tsc-frequency=2.5G", 2_500_000_000),
        ("tsc-frequency=2500M", 2_500_000_000),
        ("tsc-frequency=3000000k", 3_000_000_000),
        ("tsc-freq=2.5G", 2_500_000_000),
        ("tsc-freq=1.234567891G", 1_234_567_891),
        ("tsc-freq=100", 100),
    ];
    for (item, want) in ok {
        assert_eq!(
            parse(&format!("host,{item}")).tsc_frequency,
            Some(want),
            "{item}"
        );
    }
    assert_eq!(parse("host").tsc_frequency, None);
    assert_eq!(parse_err("host,tsc-freq=fast"), "bad numerical value fast");
    assert_eq!(parse_err("host,tsc-freq=1.5Q"), "bad numerical value 1.5Q");
    assert_eq!(parse_err("host,tsc-freq=1.5"), "bad numerical value 1.5");
    assert_eq!(parse_err("host,tsc-freq="), "bad numerical value ");
    assert_eq!(
        parse_err("host,tsc-frequency=fast"),
        "Parameter 'tsc-frequency' expects int64"
    );
    assert_eq!(
        parse_err("host,tsc-frequency=-5"),
        "Property 'tsc-frequency' doesn't take value '-5'"
    );
}

#[test]
fn x86_toggles() {
    let c = parse("host,+x2apic,-pcid,invtsc=on,+tsc-deadline,sse4_1=off,avx2");
    let got: Vec<(&str, bool)> = c.x86.iter().map(|t| (t.name, t.on)).collect();
    // name=value items in order first, then every "+", then every "-" (QEMU applies plus/minus at realize).
    assert_eq!(
        got,
        vec![
            ("invtsc", true),
            ("sse4.1", false),
            ("avx2", true),
            ("x2apic", true),
            ("tsc-deadline", true),
            ("pcid", false)
        ]
    );
    assert_eq!(c.x86_toggle("x2apic"), Some(true));
    assert_eq!(c.x86_toggle("sse4.1"), Some(false));
    assert_eq!(c.x86_toggle("avx"), None);
    // Aliases.
    for (alias, canonical) in [
        ("sse4-1", "sse4.1"),
        ("sse4_2", "sse4.2"),
        ("sse3", "pni"),
        ("xd", "nx"),
        ("i64", "lm"),
    ] {
        assert_eq!(parse(&format!("host,{alias}=on")).x86[0].name, canonical);
        assert_eq!(parse(&format!("host,+{alias}")).x86[0].name, canonical);
    }
    // Bit locations of the common names.
    let bits = [
        ("x2apic", 1, 0, "ECX", 21),
        ("tsc-deadline", 1, 0, "ECX", 24),
        ("hypervisor", 1, 0, "ECX", 31),
        ("pdcm", 1, 0, "ECX", 15),
        ("pcid", 1, 0, "ECX", 17),
        ("avx", 1, 0, "ECX", 28),
        ("sse4.1", 1, 0, "ECX", 19),
        ("avx2", 7, 0, "EBX", 5),
        ("invtsc", 0x8000_0007, 0, "EDX", 8),
        ("xsaveopt", 0xD, 1, "EAX", 0),
        ("lm", 0x8000_0001, 0, "EDX", 29),
        ("kvm-pv-eoi", 0x4000_0001, 0, "EAX", 6),
    ];
    for (name, leaf, sub, reg, bit) in bits {
        let c = parse(&format!("host,+{name}"));
        let b = c.x86[0].bit;
        assert_eq!(
            (b.leaf, b.subleaf, b.reg.to_string().as_str(), b.bit),
            (leaf, sub, reg, bit),
            "{name}"
        );
    }
    // Unknown properties, in every syntax, with the model in the type name.
    assert_eq!(
        parse_err("host,+foo"),
        "Property 'host-x86_64-cpu.foo' not found"
    );
    assert_eq!(
        parse_err("host,-foo"),
        "Property 'host-x86_64-cpu.foo' not found"
    );
    assert_eq!(
        parse_err("qemu64,foo=on"),
        "Property 'qemu64-x86_64-cpu.foo' not found"
    );
    assert_eq!(
        parse_err("host,hv-foo"),
        "Property 'host-x86_64-cpu.hv-foo' not found"
    );
    assert_eq!(
        parse_err("host,hv_foo_bar"),
        "Property 'host-x86_64-cpu.hv-foo-bar' not found"
    );
    assert_eq!(
        parse_err("host,=on"),
        "Property 'host-x86_64-cpu.' not found"
    );
    assert_eq!(
        parse_err("host,x2apic=maybe"),
        "Parameter 'x2apic' expects 'on' or 'off'"
    );
}

#[test]
fn plus_minus_are_applied_after_key_value_items() {
    // "-" wins over "+" whatever the order.
    assert_eq!(
        parse("host,-x2apic,+x2apic").x86_toggle("x2apic"),
        Some(false)
    );
    // "+x2apic" is applied after "x2apic=off", with QEMU's ambiguity warnings.
    let c = parse("host,+x2apic,x2apic=off");
    assert_eq!(c.x86_toggle("x2apic"), Some(true));
    assert_eq!(
        c.warnings,
        vec![
            "Ambiguous CPU model string. Don't mix both \"+x2apic\" and \"x2apic=off\"".to_string(),
            "Compatibility of ambiguous CPU model strings won't be kept on future QEMU versions"
                .to_string(),
        ]
    );
    // The same for hv flags given in the legacy syntax.
    assert_eq!(parse("host,-hv-relaxed,hv-relaxed").hv, FeatureSet::EMPTY);
    assert_eq!(
        parse("host,+hv_relaxed").hv,
        FeatureSet::of(&[Feature::Relaxed])
    );
}

#[test]
fn cpu_options() {
    let c = parse("host");
    assert!(c.kvm && c.check && !c.enforce && c.migratable && !c.passthrough && !c.enforce_cpuid);
    let c = parse("host,kvm=off,enforce,check=off,hv-enforce-cpuid,hv-passthrough,migratable=no");
    assert!(!c.kvm && !c.check && c.enforce && !c.migratable && c.passthrough && c.enforce_cpuid);
    assert_eq!(
        parse("host,vendor=GenuineIntel").vendor.as_deref(),
        Some("GenuineIntel")
    );
    assert_eq!(
        parse("host,vendor=AuthenticAMD").vendor.as_deref(),
        Some("AuthenticAMD")
    );
    assert_eq!(
        parse_err("host,vendor=Intel"),
        "Property 'vendor' doesn't take value 'Intel'"
    );
    assert!(parse("host,x-hv-synic-kvm-only").synic_kvm_only);
}

#[test]
fn migration_blockers_from_the_option() {
    let pass =
        "'hv-passthrough' CPU flag prevents migration, use explicit set of hv-* flags instead";
    let auto = "'hv-no-nonarch-coresharing=auto' CPU flag prevents migration use explicit 'hv-no-nonarch-coresharing=on' instead (but make sure SMT is disabled and/or that vCPUs are properly pinned)";
    let invtsc = "State blocked by non-migratable CPU device (invtsc flag)";
    let table: &[(&str, &[&str])] = &[
        ("host,hv-relaxed", &[]),
        ("host,hv-passthrough", &[pass]),
        ("host,hv-relaxed,hv-no-nonarch-coresharing=auto", &[auto]),
        // QEMU adds the auto blocker in hyperv_init_vcpu, which only runs with Hyper-V enabled.
        ("host,hv-no-nonarch-coresharing=auto", &[]),
        ("host,+invtsc", &[invtsc]),
        ("host,+invtsc,tsc-frequency=2500000000", &[]),
        ("host,migratable=off", &[invtsc]),
        (
            "host,hv-passthrough,hv-no-nonarch-coresharing=auto,invtsc=on",
            &[pass, auto, invtsc],
        ),
    ];
    for (spec, want) in table {
        assert_eq!(parse(spec).migration_blockers(), want.to_vec(), "{spec}");
    }
}

#[test]
fn backend_capabilities() {
    let userspace = Backend::Userspace.supported();
    for f in Feature::ALL {
        let unsupported = matches!(
            f,
            Feature::Evmcs | Feature::EmsrBitmap | Feature::TlbFlushDirect | Feature::Syndbg
        );
        assert_eq!(userspace.contains(f), !unsupported, "{f}");
    }
    let k = FeatureSet::of(&[Feature::Relaxed]);
    assert_eq!(Backend::Kernel(k).supported(), k);
}

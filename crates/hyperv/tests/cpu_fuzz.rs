//! Property tests: random `-cpu` strings never make the parser, the checks or the CPUID builder panic, and a
//! successful build keeps its structural promises.

mod common;
use common::e;
use hyperv::config::{Backend, CpuConfig, FeatureSet, HostInfo};
use hyperv::cpuid::{build_report, for_vcpu, hypervisor_leaves, CpuidEntry, HostCpuid};
use proptest::prelude::*;

const NAMES: &[&str] = &[
    "hv-relaxed",
    "hv-vapic",
    "hv-time",
    "hv-crash",
    "hv-reset",
    "hv-vpindex",
    "hv-runtime",
    "hv-synic",
    "hv-stimer",
    "hv-frequencies",
    "hv-reenlightenment",
    "hv-tlbflush",
    "hv-evmcs",
    "hv-ipi",
    "hv-stimer-direct",
    "hv-avic",
    "hv-apicv",
    "hv-syndbg",
    "hv-emsr-bitmap",
    "hv-xmm-input",
    "hv-tlbflush-ext",
    "hv-tlbflush-direct",
    "hv-enforce-cpuid",
    "hv-passthrough",
    "hv-spinlocks",
    "hv-vendor-id",
    "hv-no-nonarch-coresharing",
    "hv-version-id-build",
    "hv-version-id-major",
    "hv-version-id-minor",
    "hv-version-id-spack",
    "hv-version-id-sbranch",
    "hv-version-id-snumber",
    "x-hv-max-vps",
    "x-hv-synic-kvm-only",
    "kvm",
    "enforce",
    "check",
    "migratable",
    "vendor",
    "tsc-frequency",
    "tsc-freq",
    "x2apic",
    "tsc-deadline",
    "invtsc",
    "hypervisor",
    "sse4.1",
    "sse4_1",
    "avx",
    "avx512f",
    "kvm-pv-eoi",
    "kvmclock",
    "kvm-steal-time",
    "nonexistent",
];

const VALUES: &[&str] = &[
    "on",
    "off",
    "auto",
    "yes",
    "n",
    "",
    "0",
    "-1",
    "0x1fff",
    "0xffffffff",
    "0x100000000",
    "18446744073709551616",
    "-9223372036854775808",
    "010",
    "09",
    "2.5G",
    "1.5Q",
    ".",
    "G",
    "0x",
    "GenuineIntel",
    "AuthenticAMD",
    "1234567890123456",
    "ééééééééé",
    "💥",
    "a=b",
    " on",
];

const MODELS: &[&str] = &[
    "host",
    "max",
    "base",
    "kvm64",
    "qemu64",
    "Haswell-noTSX",
    "xyz",
    "",
    "HOST",
    "ĥost",
];

fn token() -> impl Strategy<Value = String> {
    let name = prop::sample::select(NAMES).prop_flat_map(|n| {
        // Randomly turn dashes into underscores.
        prop::collection::vec(any::<bool>(), n.len()).prop_map(move |flips| {
            n.chars()
                .zip(flips)
                .map(|(c, f)| if c == '-' && f { '_' } else { c })
                .collect::<String>()
        })
    });
    let value = prop_oneof![
        prop::sample::select(VALUES).prop_map(str::to_string),
        "\\PC{0,12}",
        "[0-9a-fxA-FX.kKMG+-]{0,20}"
    ];
    prop_oneof![
        name.clone(),
        (name.clone(), value).prop_map(|(n, v)| format!("{n}={v}")),
        name.clone().prop_map(|n| format!("+{n}")),
        name.prop_map(|n| format!("-{n}")),
        "\\PC{0,16}",
        Just(String::new()),
        Just("=".to_string()),
        Just(",".to_string()),
    ]
}

fn spec() -> impl Strategy<Value = String> {
    let model = prop_oneof![
        prop::sample::select(MODELS).prop_map(str::to_string),
        "\\PC{0,8}"
    ];
    (model, prop::collection::vec(token(), 0..12)).prop_map(|(m, toks)| {
        if toks.is_empty() {
            m
        } else {
            format!("{m},{}", toks.join(","))
        }
    })
}

fn host_entries() -> Vec<CpuidEntry> {
    vec![
        e(0, 0, 0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
        e(1, 0, 0x0009_06EA, 0x0001_0800, 0x7FFA_3203, 0x178B_FBFF),
        e(7, 0, 0, 0x0029_C6BB, 0, 0xAC00_0400),
        e(0xB, 0, 1, 2, 0x100, 0),
        e(0xB, 1, 4, 8, 0x201, 0),
        e(0xD, 0, 0x7, 0x340, 0x340, 0),
        e(0xD, 2, 0x100, 0x240, 0, 0),
        e(0x4000_0000, 0, 0x4000_0001, 0x4B4D_564B, 0x564B_4D56, 0x4D),
        e(0x4000_0001, 0, 0x0101_FEFB, 0, 0, 0),
        e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
        e(0x8000_0001, 0, 0, 0, 0x121, 0x2C10_0800),
        e(0x8000_0007, 0, 0, 0, 0, 0x100),
        e(0x8000_0008, 0, 0x3027, 0, 0, 0),
    ]
}

fn check_build(cfg: &CpuConfig, backend: Backend, smt_active: bool) {
    let _ = cfg.validate(&backend);
    let _ = cfg.migration_blockers();
    let host = HostCpuid {
        entries: host_entries(),
        info: HostInfo {
            smt_active,
            tsc_khz: Some(2_500_000),
        },
        backend,
    };
    if let Ok(r) = build_report(cfg, &host) {
        let keys: Vec<(u32, u32)> = r.entries.iter().map(|x| (x.function, x.index)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted);
        // Hyper-V leaves exist exactly when identification is on.
        let hv_vendor = r
            .entries
            .iter()
            .any(|x| x.function == 0x4000_0001 && x.eax == 0x3123_7648);
        assert_eq!(hv_vendor, cfg.hyperv_enabled());
        assert_eq!(r.hyperv, cfg.hyperv_enabled());
        // With kvm=off there is never a KVM block: nothing at 0x40000100, and nothing at all in the hypervisor
        // range without Hyper-V.
        if !cfg.kvm {
            assert!(r
                .entries
                .iter()
                .all(|x| x.function != 0x4000_0100 && x.function != 0x4000_0101));
            if !cfg.hyperv_enabled() {
                assert_eq!(hypervisor_leaves(&r.entries).count(), 0);
            }
        }
        assert!(
            hypervisor_leaves(&r.entries).all(|x| (0x4000_0000..0x5000_0000).contains(&x.function))
        );
        let v = for_vcpu(&r.entries, 3, 5);
        assert!(!v.is_empty());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn structured_specs_never_panic(s in spec(), smt in any::<bool>(), kernel in any::<u32>()) {
        if let Ok(cfg) = CpuConfig::parse(&s) {
            check_build(&cfg, Backend::Userspace, smt);
            check_build(&cfg, Backend::Kernel(FeatureSet(kernel & FeatureSet::ALL.0)), smt);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,64}") {
        if let Ok(cfg) = CpuConfig::parse(&s) {
            check_build(&cfg, Backend::Userspace, false);
        }
    }

    #[test]
    fn arbitrary_bytes_as_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = CpuConfig::parse(&s);
        let _ = CpuConfig::parse(&format!("host,{s}"));
    }

    #[test]
    fn for_vcpu_never_panics(apic in any::<u32>(), n in any::<u32>()) {
        let v = for_vcpu(&host_entries(), apic, n);
        prop_assert!(v.iter().any(|x| x.function == 1));
    }
}

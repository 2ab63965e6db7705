//! The `cpu_spec` target: `-cpu` strings (arbitrary text, or combinations of real option names and value
//! spellings) through [`CpuConfig::parse`], [`CpuConfig::validate`] and the CPUID builder, against a synthetic
//! host CPUID table that the input perturbs.
//!
//! Invariants: no panic; parsing is deterministic; errors have text; on a successful build the entries are
//! sorted by (function, index) without duplicates, the Hyper-V leaves (0x40000000..=0x40000005 with the "Hv#1"
//! interface signature) exist iff [`CpuConfig::hyperv_enabled`], the effective features are a subset of what the
//! backend supports, [`hyperv::HvCpuid::from_entries`] sees the same identification, `for_vcpu` keeps the leaf
//! set, and an engine created from the result gates the VP_INDEX MSR as the CPUID says.

use arbitrary::{Result, Unstructured};
use hyperv::config::{Backend, CpuConfig, Feature, FeatureSet, HostInfo, MODELS, X86_FEATURES};
use hyperv::cpuid::{build_report, for_vcpu, CpuidEntry, HostCpuid, FLAG_SIGNIFICANT_INDEX};
use hyperv::{Engine, EngineConfig, HvCpuid, VpId};
use tlfs::cpuid as leaf;

/// Option names that are not hv feature flags or x86 features.
const OTHER_BOOL_OPTIONS: &[&str] = &[
    "hv-passthrough",
    "hv-enforce-cpuid",
    "x-hv-synic-kvm-only",
    "kvm",
    "enforce",
    "check",
    "migratable",
    "hv-apicv",
];

const NUMBER_OPTIONS: &[&str] = &[
    "hv-spinlocks",
    "hv-version-id-build",
    "hv-version-id-major",
    "hv-version-id-minor",
    "hv-version-id-spack",
    "hv-version-id-sbranch",
    "hv-version-id-snumber",
    "x-hv-max-vps",
    "tsc-frequency",
    "tsc-freq",
];

const BOOL_SPELLINGS: &[&str] = &[
    "on", "off", "yes", "no", "true", "false", "y", "n", "auto", "", "ON", "1", "0", "of",
];

fn pick<T: Copy>(u: &mut Unstructured<'_>, items: &[T]) -> Result<T> {
    Ok(*u.choose(items)?)
}

fn number(u: &mut Unstructured<'_>) -> Result<String> {
    let v: u64 = u.arbitrary()?;
    Ok(match u.int_in_range(0u8..=11)? {
        0 => v.to_string(),
        1 => format!("0x{v:x}"),
        2 => format!("0{v:o}"),
        3 => format!("-{}", v % 100_000),
        4 => "99999999999999999999999".to_string(),
        5 => String::new(),
        6 => "0x".to_string(),
        7 => format!(
            "{}{}",
            v % 10_000,
            pick(u, &["k", "K", "M", "G", "T", "x", " "])?
        ),
        8 => (v % 0x1_0000).to_string(),
        9 => pick(
            u,
            &[
                "4294967295",
                "4294967296",
                "2147483647",
                "-1",
                "0xFFFFFFFF",
                "65535",
                "65536",
                "256",
            ],
        )?
        .to_string(),
        10 => format!("{}", v % 0x1000),
        _ => format!(" {}", v % 100),
    })
}

fn text(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let n = u.int_in_range(0..=max)?;
    let mut s = String::with_capacity(n);
    for _ in 0..n {
        let c = match u.int_in_range(0u8..=9)? {
            0 => pick(u, &['=', ',', '+', '-', '_', ' ', '\0', 'é'])?,
            _ => char::from(u.int_in_range(b'a'..=b'z')?),
        };
        s.push(c);
    }
    Ok(s)
}

fn with_underscores(u: &mut Unstructured<'_>, name: &str) -> Result<String> {
    Ok(if u.ratio(1, 5)? {
        name.replace('-', "_")
    } else {
        name.to_string()
    })
}

fn item(u: &mut Unstructured<'_>) -> Result<String> {
    Ok(match u.int_in_range(0u8..=13)? {
        0..=4 => {
            let f = pick(u, &Feature::ALL)?;
            let name = with_underscores(u, f.name())?;
            match u.int_in_range(0u8..=4)? {
                0 | 1 => name,
                2 => format!("{name}={}", pick(u, BOOL_SPELLINGS)?),
                3 => format!("+{name}"),
                _ => format!("-{name}"),
            }
        }
        5 => {
            let base = pick(u, OTHER_BOOL_OPTIONS)?;
            let name = with_underscores(u, base)?;
            match u.int_in_range(0u8..=3)? {
                0 => name,
                1 => format!("+{name}"),
                _ => format!("{name}={}", pick(u, BOOL_SPELLINGS)?),
            }
        }
        6 | 7 => {
            let base = pick(u, NUMBER_OPTIONS)?;
            format!("{}={}", with_underscores(u, base)?, number(u)?)
        }
        8 => {
            let (name, _) = pick(u, X86_FEATURES)?;
            match u.int_in_range(0u8..=3)? {
                0 => format!("+{name}"),
                1 => format!("-{name}"),
                2 => format!("{name}={}", pick(u, BOOL_SPELLINGS)?),
                _ => name.to_string(),
            }
        }
        9 => format!("hv-vendor-id={}", text(u, 16)?),
        10 => format!(
            "hv-no-nonarch-coresharing={}",
            pick(u, &["on", "off", "auto", "maybe", ""])?
        ),
        11 => format!(
            "vendor={}",
            pick(
                u,
                &[
                    "GenuineIntel",
                    "AuthenticAMD",
                    "short",
                    "waytoolongvendor",
                    ""
                ]
            )?
        ),
        12 => String::new(),
        _ => text(u, 12)?,
    })
}

/// A `-cpu` string from real model and option names.
pub fn structured_spec(u: &mut Unstructured<'_>) -> Result<String> {
    let mut s = match u.int_in_range(0u8..=9)? {
        0 => text(u, 8)?,
        1 => String::new(),
        _ => pick(u, MODELS)?.0.to_string(),
    };
    let n = u.int_in_range(0usize..=14)?;
    for _ in 0..n {
        s.push(',');
        s.push_str(&item(u)?);
    }
    Ok(s)
}

/// A plausible host CPUID table (as `KVM_GET_SUPPORTED_CPUID` reports it), perturbed by the input: registers
/// XOR-ed with input words, extra leaves, leaves dropped, and the order rotated.
pub fn synthetic_host(u: &mut Unstructured<'_>) -> Result<HostCpuid> {
    let sig = |s: &[u8; 12]| {
        let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        (w(0), w(4), w(8))
    };
    let (vb, vd, vc) = sig(b"GenuineIntel");
    let (kb, kc, kd) = sig(leaf::KVM_SIGNATURE);
    let sub = |function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32| CpuidEntry {
        function,
        index,
        flags: FLAG_SIGNIFICANT_INDEX,
        eax,
        ebx,
        ecx,
        edx,
    };
    let mut entries = vec![
        CpuidEntry::leaf(0, 0x1F, vb, vc, vd),
        CpuidEntry::leaf(1, 0x000806EA, 0x0010_0800, 0xF7FA_3223, 0x0F8B_FBFF),
        CpuidEntry::leaf(6, 0x4, 0, 0, 0),
        sub(7, 0, 0, 0x029C_6FBF, 0x4000_0000, 0xBC00_0400),
        sub(0xB, 0, 1, 1, 0x100, 0),
        sub(0xB, 1, 4, 4, 0x201, 0),
        sub(0xD, 0, 0x7, 0x340, 0x340, 0),
        sub(0xD, 1, 0xF, 0x340, 0, 0),
        sub(0xD, 2, 0x100, 0x240, 0, 0),
        CpuidEntry::leaf(0x8000_0000, 0x8000_0008, 0, 0, 0),
        CpuidEntry::leaf(0x8000_0001, 0, 0, 0x121, 0x2C10_0800),
        CpuidEntry::leaf(0x8000_0007, 0, 0, 0, 0x100),
        CpuidEntry::leaf(0x8000_0008, 0x3027, 0, 0, 0),
        CpuidEntry::leaf(
            leaf::HYPERVISOR_RANGE_START,
            leaf::KVM_CPUID_FEATURES,
            kb,
            kc,
            kd,
        ),
        CpuidEntry::leaf(leaf::KVM_CPUID_FEATURES, 0x0100_7AFB, 0, 0, 0),
    ];
    let perturb: u8 = u.arbitrary()?;
    if perturb & 1 != 0 {
        for e in entries.iter_mut() {
            if u.ratio(1, 3)? {
                e.eax ^= u.arbitrary::<u32>()?;
                e.ebx ^= u.arbitrary::<u32>()?;
                e.ecx ^= u.arbitrary::<u32>()?;
                e.edx ^= u.arbitrary::<u32>()?;
            }
        }
    }
    if perturb & 2 != 0 {
        let n = u.int_in_range(0usize..=4)?;
        for _ in 0..n {
            let function = pick(
                u,
                &[
                    0x2u32,
                    0x14,
                    0x1F,
                    0x20,
                    0x4000_0002,
                    0x4000_0100,
                    0x8000_0009,
                    0xFFFF_FFFF,
                ],
            )?;
            let e = CpuidEntry {
                function,
                index: u.int_in_range(0u32..=2)?,
                flags: u.int_in_range(0u32..=1)?,
                eax: u.arbitrary()?,
                ebx: u.arbitrary()?,
                ecx: u.arbitrary()?,
                edx: u.arbitrary()?,
            };
            if !entries
                .iter()
                .any(|x| x.function == e.function && x.index == e.index)
            {
                entries.push(e);
            }
        }
    }
    if perturb & 4 != 0 && !entries.is_empty() {
        let i = u.int_in_range(0..=entries.len() - 1)?;
        entries.remove(i);
    }
    if perturb & 8 != 0 && !entries.is_empty() {
        let k = u.int_in_range(0..=entries.len() - 1)?;
        entries.rotate_left(k);
    }
    let backend = if perturb & 16 != 0 {
        Backend::Kernel(FeatureSet(u.arbitrary::<u32>()? & FeatureSet::ALL.0))
    } else {
        Backend::Userspace
    };
    Ok(HostCpuid {
        entries,
        info: HostInfo {
            smt_active: u.arbitrary()?,
            tsc_khz: if u.arbitrary()? {
                Some(u.arbitrary()?)
            } else {
                None
            },
        },
        backend,
    })
}

/// Parses `spec` and, on success, validates and builds it against `host`, checking the invariants.
pub fn check_spec(spec: &str, host: &HostCpuid, apic_id: u32) {
    let parsed = CpuConfig::parse(spec);
    assert_eq!(
        parsed,
        CpuConfig::parse(spec),
        "parsing {spec:?} is not deterministic"
    );
    let cfg = match parsed {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty error for {spec:?}");
            return;
        }
    };
    assert!(
        cfg.vendor_id.len() <= 12,
        "hv-vendor-id longer than 12 bytes"
    );
    let hyperv = cfg.hyperv_enabled();
    let validated = cfg.validate(&host.backend);
    let _ = cfg.migration_blockers();
    let build = match build_report(&cfg, host) {
        Ok(b) => b,
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty build error for {spec:?}");
            return;
        }
    };
    if hyperv {
        assert!(
            validated.is_ok(),
            "build of {spec:?} succeeded but validate failed: {validated:?}"
        );
    }
    let e = &build.entries;
    for w in e.windows(2) {
        assert!(
            (w[0].function, w[0].index) < (w[1].function, w[1].index),
            "entries of {spec:?} not sorted/unique: {:#x?} then {:#x?}",
            w[0],
            w[1]
        );
    }
    assert_eq!(build.hyperv, hyperv, "report's hyperv flag for {spec:?}");
    let find = |f: u32| e.iter().find(|x| x.function == f && x.index == 0);
    let hv_sig = find(leaf::LEAF_INTERFACE).is_some_and(|x| x.eax == leaf::HV_INTERFACE_SIGNATURE);
    assert_eq!(
        hv_sig, hyperv,
        "Hv#1 signature present = {hv_sig} for {spec:?}"
    );
    for f in leaf::LEAF_VENDOR_AND_MAX_FUNCTIONS..=leaf::LEAF_IMPLEMENT_LIMITS {
        if hyperv {
            assert!(
                find(f).is_some(),
                "Hyper-V leaf {f:#x} missing for {spec:?}"
            );
        }
    }
    if hyperv {
        let max = find(leaf::LEAF_VENDOR_AND_MAX_FUNCTIONS).map_or(0, |x| x.eax);
        assert!(
            max >= leaf::LEAF_IMPLEMENT_LIMITS,
            "0x40000000.EAX = {max:#x} for {spec:?}"
        );
    } else {
        assert!(
            build.features.is_empty(),
            "features without Hyper-V for {spec:?}"
        );
    }
    assert_eq!(
        build.features.intersection(host.backend.supported()),
        build.features,
        "features beyond the backend for {spec:?}"
    );
    let view = HvCpuid::from_entries(e);
    assert_eq!(
        view.enabled(),
        hyperv,
        "engine view of identification for {spec:?}"
    );

    // for_vcpu rewrites the topology leaves (0xB, 0x1F) with its own subleaves and keeps every other leaf.
    let per_vcpu = for_vcpu(e, apic_id, apic_id.saturating_add(1));
    for w in per_vcpu.windows(2) {
        assert!(
            (w[0].function, w[0].index) < (w[1].function, w[1].index),
            "for_vcpu output not sorted/unique"
        );
    }
    let non_topo = |v: &[CpuidEntry]| -> Vec<(u32, u32)> {
        v.iter()
            .filter(|x| x.function != 0xB && x.function != 0x1F)
            .map(|x| (x.function, x.index))
            .collect()
    };
    assert_eq!(
        non_topo(&per_vcpu),
        non_topo(e),
        "for_vcpu changed the non-topology leaves"
    );
    for f in [0xBu32, 0x1F] {
        let had = e.iter().any(|x| x.function == f);
        let has = per_vcpu.iter().any(|x| x.function == f);
        assert_eq!(had, has, "for_vcpu added or dropped leaf {f:#x}");
    }

    // The engine created from these leaves gates VP_INDEX exactly as the CPUID says.
    let config = EngineConfig::new(view, cfg.enforce_cpuid, 1);
    let platform = hyperv::testing::FakePlatform::new(0x2000, 1, 1_000_000_000);
    let Ok(engine) = Engine::new(config, platform) else {
        panic!("engine refused a one-vCPU configuration");
    };
    let vp_index_ok = engine.read_msr(VpId(0), tlfs::msr::VP_INDEX).is_ok();
    let expected = hyperv && (!cfg.enforce_cpuid || build.features.contains(Feature::VpIndex));
    assert_eq!(vp_index_ok, expected, "VP_INDEX gating for {spec:?}");
}

/// The whole target.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let Ok(host) = synthetic_host(&mut u) else {
        return;
    };
    let apic_id: u32 = u.arbitrary().unwrap_or(0);
    let spec = if mode & 1 == 0 {
        // Raw text: the rest of the input, lossily decoded.
        String::from_utf8_lossy(u.take_rest()).into_owned()
    } else {
        match structured_spec(&mut u) {
            Ok(s) => s,
            Err(_) => return,
        }
    };
    check_spec(&spec, &host, apic_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-written specs through the same checks: valid, invalid and odd spellings.
    #[test]
    fn spec_table_holds_invariants() {
        let host = synthetic_host(&mut Unstructured::new(&[0; 64])).expect("host");
        let table = [
            "host",
            "host,hv-relaxed,hv-vapic,hv-time,hv-vpindex,hv-synic,hv-stimer,hv-stimer-direct",
            "host,hv-passthrough",
            "host,hv-passthrough,hv-enforce-cpuid",
            "host,hv-synic",
            "host,hv_spinlocks=0x1fff,hv-vendor-id=abcdefghijklmnop",
            "host,hv-evmcs",
            "host,+hv-relaxed,hv-relaxed=off",
            "qemu64,-hypervisor,+x2apic,kvm=off",
            "max,tsc-frequency=2G,migratable=off,+invtsc",
            "",
            ",",
            "nosuchmodel",
            "host,hv-relaxed=maybe",
        ];
        for spec in table {
            check_spec(spec, &host, 3);
        }
    }

    /// Random inputs (raw and structured) never break an invariant, and some of them build with Hyper-V on.
    #[test]
    fn random_inputs_hold_invariants() {
        let mut hyperv_builds = 0;
        for data in crate::test_inputs(0xC0FFEE, 2000, 256) {
            run(&data);
            let mut u = Unstructured::new(&data[1..]);
            if let (Ok(host), Ok(spec)) = (synthetic_host(&mut u), structured_spec(&mut u)) {
                if let Ok(cfg) = CpuConfig::parse(&spec) {
                    if build_report(&cfg, &host).is_ok_and(|b| b.hyperv) {
                        hyperv_builds += 1;
                    }
                }
            }
        }
        assert!(
            hyperv_builds > 0,
            "no structured spec built with Hyper-V on"
        );
    }
}

//! The base leaves (0x0..0x1F, 0x80000000..0x80000008): models, toggles, the hypervisor bit, vendor, XSAVE
//! components, warnings, migration blockers, and the per-vCPU patching. Uses a synthetic host table.

mod common;
use common::{e, ei};
use hyperv::config::{blockers, CpuConfig};
use hyperv::cpuid::{build, build_report, for_vcpu, CpuidBuild, CpuidEntry, HostCpuid};

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

// CPUID.01H:ECX of the synthetic host: pni pclmulqdq ssse3 fma cx16 pdcm pcid sse4.1 sse4.2 x2apic movbe popcnt
// aes xsave avx f16c rdrand. KVM reports neither tsc-deadline (24) nor hypervisor (31).
const HOST_1_ECX: u32 = bits(&[
    0, 1, 9, 12, 13, 15, 17, 19, 20, 21, 22, 23, 25, 26, 28, 29, 30,
]);
const HOST_1_EDX: u32 = 0x178B_FBFF;
// CPUID.07H.0:EBX: fsgsbase bmi1 avx2 smep bmi2 erms invpcid adx smap clflushopt.
const HOST_7_EBX: u32 = bits(&[0, 3, 5, 7, 8, 9, 10, 19, 20, 23]);
// CPUID.07H.0:EDX: md-clear spec-ctrl stibp arch-capabilities ssbd.
const HOST_7_EDX: u32 = bits(&[10, 26, 27, 29, 31]);
// CPUID.80000001H: ECX lahf-lm abm 3dnowprefetch; EDX syscall nx pdpe1gb rdtscp lm.
const HOST_E1_ECX: u32 = bits(&[0, 5, 8]);
const HOST_E1_EDX: u32 = bits(&[11, 20, 26, 27, 29]);

fn host_entries() -> Vec<CpuidEntry> {
    vec![
        // Max basic leaf 0x20 (above what enlighten exposes), "GenuineIntel".
        e(0, 0, 0x20, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
        e(1, 0, 0x0009_06EA, 0x0001_0800, HOST_1_ECX, HOST_1_EDX),
        ei(4, 0, 0x1C00_4121, 0x01C0_003F, 0x3F, 0),
        ei(4, 1, 0x1C00_4122, 0x01C0_003F, 0x3F, 0),
        ei(4, 2, 0x1C00_4143, 0x00C0_003F, 0x3FF, 0),
        ei(4, 3, 0x1C03_C163, 0x02C0_003F, 0x2FFF, 0x6),
        ei(4, 4, 0, 0, 0, 0),
        e(6, 0, 0x4, 0, 0, 0),
        ei(7, 0, 1, HOST_7_EBX, 0, HOST_7_EDX),
        ei(7, 1, 0x10, 0, 0, 0),
        ei(0xB, 0, 1, 2, 0x100, 0),
        ei(0xB, 1, 4, 16, 0x201, 0),
        ei(0xB, 2, 0, 0, 2, 0),
        // XSAVE: x87, SSE, AVX, PKRU (the host has no pku flag, so PKRU must go) and the AMX tile state
        // (17, 18; kept for host/max, dropped by the fixed models).
        ei(0xD, 0, 0x6_0207, 0x340, 0xA88, 0),
        ei(0xD, 1, 0xF, 0, 0, 0),
        ei(0xD, 2, 0x100, 0x240, 0, 0),
        ei(0xD, 9, 0x8, 0xA80, 0, 0),
        ei(0x14, 0, 1, 0, 0, 0),
        e(0x20, 0, 0, 0, 0, 0),
        e(
            0x4000_0000,
            0,
            0x4000_0001,
            0x4B4D_564B,
            0x564B_4D56,
            0x0000_004D,
        ),
        e(0x4000_0001, 0, 0x0101_FEFB, 0, 0, 0),
        e(0x8000_0000, 0, 0x8000_000A, 0, 0, 0),
        e(0x8000_0001, 0, 0, 0, HOST_E1_ECX, HOST_E1_EDX),
        e(0x8000_0007, 0, 0, 0, 0, 1 << 8),
        e(0x8000_0008, 0, 0x3027, 0, 0, 0),
        e(0x8000_000A, 0, 1, 0x40, 0, 0x1234),
    ]
}

fn report(spec: &str) -> CpuidBuild {
    let cfg = CpuConfig::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    build_report(&cfg, &HostCpuid::new(host_entries())).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn get(entries: &[CpuidEntry], function: u32, index: u32) -> Option<CpuidEntry> {
    entries
        .iter()
        .find(|x| x.function == function && x.index == index)
        .copied()
}

fn regs(entries: &[CpuidEntry], function: u32, index: u32) -> [u32; 4] {
    let l = get(entries, function, index)
        .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"));
    [l.eax, l.ebx, l.ecx, l.edx]
}

const HYPERVISOR: u32 = 1 << 31;
const TSC_DEADLINE: u32 = 1 << 24;
const X2APIC: u32 = 1 << 21;

#[test]
fn host_model_passes_the_host_through_plus_vmm_bits() {
    let r = report("host");
    let l = &r.entries;
    assert_eq!(regs(l, 0, 0), [0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69]);
    assert_eq!(
        regs(l, 1, 0),
        [
            0x0009_06EA,
            0x0001_0800,
            HOST_1_ECX | TSC_DEADLINE | HYPERVISOR,
            HOST_1_EDX
        ]
    );
    assert_eq!(regs(l, 7, 0), [1, HOST_7_EBX, 0, HOST_7_EDX]);
    assert_eq!(regs(l, 7, 1), [0x10, 0, 0, 0]);
    assert_eq!(regs(l, 0x8000_0001, 0), [0, 0, HOST_E1_ECX, HOST_E1_EDX]);
    // invtsc is not migratable: hidden unless asked for.
    assert_eq!(regs(l, 0x8000_0007, 0)[3], 0);
    assert!(r.migration_blockers.is_empty());
    // Leaves above 0x1F and above 0x80000008 are not exposed; the max leaves are clamped.
    assert!(get(l, 0x20, 0).is_none());
    assert!(get(l, 0x8000_000A, 0).is_none());
    assert_eq!(regs(l, 0x8000_0000, 0)[0], 0x8000_0008);
    // Leaves the model does not touch are the host's, flags included.
    assert_eq!(
        get(l, 4, 3),
        Some(ei(4, 3, 0x1C03_C163, 0x02C0_003F, 0x2FFF, 0x6))
    );
    assert_eq!(get(l, 0x14, 0), Some(ei(0x14, 0, 1, 0, 0, 0)));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    // "max" is the same as "host".
    assert_eq!(report("max").entries, r.entries);
}

#[test]
fn xsave_components_follow_the_flags() {
    // Host model: PKRU (bit 9) goes because the host has no pku flag; max size = AVX offset + size.
    let l = report("host").entries;
    assert_eq!(regs(&l, 0xD, 0), [0x6_0007, 0x340, 0x340, 0]);
    assert!(get(&l, 0xD, 2).is_some());
    assert!(get(&l, 0xD, 9).is_none());
    // Without avx, the AVX state goes too (legacy area + header = 576 bytes).
    let l = report("host,-avx").entries;
    assert_eq!(regs(&l, 0xD, 0), [0x6_0003, 0x340, 576, 0]);
    assert!(get(&l, 0xD, 2).is_none());
    assert_eq!(regs(&l, 1, 0)[2] & (1 << 28), 0);
}

#[test]
fn fixed_models_use_their_feature_table() {
    // kvm64 (by hand): 1.EDX = PPRO features + vme = bits 0-9, 11-17, 19, 23-26 = 0x078BFBFF;
    // 1.ECX = pni cx16 x2apic + hypervisor; 80000001.EDX = syscall nx lm; nothing in leaf 7.
    let l = report("kvm64").entries;
    assert_eq!(
        regs(&l, 1, 0),
        [
            0x0009_06EA,
            0x0001_0800,
            bits(&[0, 13, 21, 31]),
            0x078B_FBFF
        ]
    );
    assert_eq!(regs(&l, 7, 0), [0, 0, 0, 0]);
    assert!(get(&l, 7, 1).is_none());
    assert!(get(&l, 0x14, 0).is_none());
    assert_eq!(regs(&l, 0x8000_0001, 0), [0, 0, 0, bits(&[11, 20, 29])]);
    assert_eq!(regs(&l, 0xD, 0)[0], 0x3);
    assert_eq!(regs(&l, 6, 0)[0], 0);
    // The host's identity stays (vendor, family/model/stepping).
    assert_eq!(
        regs(&l, 0, 0),
        [0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69]
    );
    // qemu64: no vme.
    let l = report("qemu64").entries;
    assert_eq!(regs(&l, 1, 0)[3], 0x078B_FBFD);
    // base: only the hypervisor bit.
    let l = report("base").entries;
    assert_eq!(regs(&l, 1, 0)[2..], [HYPERVISOR, 0]);
    // Haswell-noTSX: the Haswell additions of leaf 7 that the host has.
    let l = report("Haswell-noTSX").entries;
    assert_eq!(regs(&l, 7, 0)[1], bits(&[0, 3, 5, 7, 8, 9, 10]));
    assert_eq!(
        regs(&l, 1, 0)[2],
        HOST_1_ECX & !bits(&[15]) | TSC_DEADLINE | HYPERVISOR
    );
}

#[test]
fn toggles() {
    let table: &[(&str, u32, u32)] = &[
        ("host,-hypervisor", HOST_1_ECX | TSC_DEADLINE, HOST_7_EBX),
        (
            "host,-x2apic",
            HOST_1_ECX & !X2APIC | TSC_DEADLINE | HYPERVISOR,
            HOST_7_EBX,
        ),
        (
            "host,x2apic=off,-tsc-deadline",
            HOST_1_ECX & !X2APIC | HYPERVISOR,
            HOST_7_EBX,
        ),
        (
            "host,sse4_1=off,sse4.2=off",
            HOST_1_ECX & !bits(&[19, 20]) | TSC_DEADLINE | HYPERVISOR,
            HOST_7_EBX,
        ),
        (
            "kvm64,+tsc-deadline",
            bits(&[0, 13, 21, 31]) | TSC_DEADLINE,
            0,
        ),
        ("kvm64,-x2apic", bits(&[0, 13, 31]), 0),
        (
            "kvm64,+avx2,+pcid,pdcm=on",
            bits(&[0, 13, 15, 17, 21, 31]),
            1 << 5,
        ),
        ("kvm64,+avx2,-avx2", bits(&[0, 13, 21, 31]), 0),
    ];
    for (spec, ecx, ebx7) in table {
        let l = report(spec).entries;
        assert_eq!(regs(&l, 1, 0)[2], *ecx, "{spec}");
        assert_eq!(regs(&l, 7, 0)[1], *ebx7, "{spec}");
    }
}

#[test]
fn invtsc_and_tsc_frequency() {
    let table: &[(&str, bool, bool)] = &[
        ("host", false, false),
        ("host,+invtsc", true, true),
        ("host,invtsc=on,tsc-frequency=2500000000", true, false),
        ("host,migratable=off", true, true),
        ("host,migratable=off,tsc-freq=2.5G", true, false),
        ("kvm64", false, false),
        ("kvm64,+invtsc", true, true),
    ];
    for (spec, shown, blocked) in table {
        let r = report(spec);
        assert_eq!(
            regs(&r.entries, 0x8000_0007, 0)[3] == 1 << 8,
            *shown,
            "{spec}"
        );
        assert_eq!(
            r.migration_blockers.contains(&blockers::INVTSC),
            *blocked,
            "{spec}"
        );
    }
}

#[test]
fn vendor_option() {
    let l = report("host,vendor=AuthenticAMD").entries;
    // "Auth" "enti" "cAMD" in EBX, EDX, ECX.
    assert_eq!(
        regs(&l, 0, 0),
        [0x1F, 0x6874_7541, 0x444D_4163, 0x6974_6E65]
    );
    assert_eq!(
        regs(&l, 0x8000_0000, 0),
        [0x8000_0008, 0x6874_7541, 0x444D_4163, 0x6974_6E65]
    );
}

#[test]
fn unavailable_features_warn_or_fail() {
    let r = report("host,+avx512f,+invpcid");
    assert_eq!(
        r.warnings,
        vec!["host doesn't support requested feature: CPUID.07H:EBX.avx512f [bit 16]".to_string()]
    );
    assert_eq!(regs(&r.entries, 7, 0)[1], HOST_7_EBX);
    // Skylake (via Broadwell) wants rdseed and mpx, which this host lacks; bit order within the word.
    let r = report("Skylake-Client-noTSX-IBRS");
    assert_eq!(
        r.warnings,
        vec![
            "host doesn't support requested feature: CPUID.07H:EBX.mpx [bit 14]".to_string(),
            "host doesn't support requested feature: CPUID.07H:EBX.rdseed [bit 18]".to_string(),
        ]
    );
    let r = report("host,+avx512f,check=off");
    assert!(r.warnings.is_empty());
    let r = report("host,+svm,+invtsc");
    assert_eq!(
        r.warnings,
        vec!["host doesn't support requested feature: CPUID.80000001H:ECX.svm [bit 2]".to_string()]
    );
    for spec in [
        "host,+avx512f,enforce",
        "Skylake-Client-noTSX-IBRS,enforce",
        "host,enforce,check=off,+la57",
    ] {
        let cfg = CpuConfig::parse(spec).unwrap();
        assert_eq!(
            build(&cfg, &HostCpuid::new(host_entries()))
                .unwrap_err()
                .to_string(),
            "Host doesn't support requested features",
            "{spec}"
        );
    }
    // enforce with everything available is fine.
    let cfg = CpuConfig::parse("host,enforce,+x2apic,+tsc-deadline").unwrap();
    assert!(build(&cfg, &HostCpuid::new(host_entries())).is_ok());
}

#[test]
fn sorted_unique_output() {
    for spec in [
        "host",
        "kvm64,hv-relaxed",
        "host,hv-passthrough,kvm=off",
        "base,+tsc-deadline",
    ] {
        let l = report(spec).entries;
        let keys: Vec<(u32, u32)> = l.iter().map(|x| (x.function, x.index)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(keys, sorted, "{spec}");
    }
}

#[test]
fn per_vcpu_patching() {
    let l = report("host").entries;
    let v = for_vcpu(&l, 2, 4);
    // 1.EBX: APIC ID 2, 4 logical processors, CLFLUSH line size kept; HTT on.
    assert_eq!(regs(&v, 1, 0)[1], 0x0204_0800);
    assert_eq!(regs(&v, 1, 0)[3] & (1 << 28), 1 << 28);
    // 0xB: SMT level (1 thread), core level (4 cores, 2 bits), terminator; x2APIC ID everywhere.
    assert_eq!(get(&v, 0xB, 0), Some(ei(0xB, 0, 0, 1, 0x100, 2)));
    assert_eq!(get(&v, 0xB, 1), Some(ei(0xB, 1, 2, 4, 0x201, 2)));
    assert_eq!(get(&v, 0xB, 2), Some(ei(0xB, 2, 0, 0, 2, 2)));
    assert!(get(&v, 0xB, 3).is_none());
    // 0x1F is not invented when the host has none.
    assert!(get(&v, 0x1F, 0).is_none());
    // Leaf 4: cores per package - 1 in EAX[31:26], no thread sharing; the terminator untouched.
    assert_eq!(regs(&v, 4, 0)[0], (3 << 26) | 0x121);
    assert_eq!(regs(&v, 4, 3)[0], (3 << 26) | 0x163);
    assert_eq!(regs(&v, 4, 4), [0, 0, 0, 0]);
    // 0x80000008 ECX: NC = 3, ApicIdCoreIdSize = 2.
    assert_eq!(regs(&v, 0x8000_0008, 0)[2], 0x2003);
    // Everything else is unchanged.
    assert_eq!(get(&v, 7, 0), get(&l, 7, 0));
    assert_eq!(v.len(), l.len());
    // One vCPU: no HTT, one core, shift 0.
    let v = for_vcpu(&l, 0, 1);
    assert_eq!(regs(&v, 1, 0)[1], 0x0001_0800);
    assert_eq!(regs(&v, 1, 0)[3] & (1 << 28), 0);
    assert_eq!(get(&v, 0xB, 1), Some(ei(0xB, 1, 0, 1, 0x201, 0)));
    // Large counts and IDs do not overflow fields or panic.
    let v = for_vcpu(&l, 300, 1024);
    assert_eq!(regs(&v, 1, 0)[1] >> 24, 300 & 0xFF);
    assert_eq!((regs(&v, 1, 0)[1] >> 16) & 0xFF, 255);
    assert_eq!(get(&v, 0xB, 1), Some(ei(0xB, 1, 10, 1024, 0x201, 300)));
    let _ = for_vcpu(&l, u32::MAX, u32::MAX);
    let _ = for_vcpu(&l, 0, 0);
}

//! The Hyper-V and KVM leaves: per-flag bits, dependency messages, identification, passthrough, nested and
//! syndbg leaves, the KVM block, and the golden leaf set of issue 2. Expected values are written by hand from
//! `shared/reference/hyperv-cpuid-and-flags.md` §4–§7, not computed with the code under test.

mod common;
use common::e;
use hyperv::config::{Backend, CpuConfig, Feature, FeatureSet, HostInfo};
use hyperv::cpuid::{build, build_report, hypervisor_leaves, CpuidBuild, CpuidEntry, HostCpuid};

/// Host KVM paravirtual features: CLOCKSOURCE, NOP_IO_DELAY, CLOCKSOURCE2, ASYNC_PF, STEAL_TIME, PV_EOI, PV_UNHALT,
/// PV_TLB_FLUSH, ASYNC_PF_VMEXIT, PV_SEND_IPI, POLL_CONTROL, PV_SCHED_YIELD, ASYNC_PF_INT, MSI_EXT_DEST_ID,
/// HC_MAP_GPA_RANGE, CLOCKSOURCE_STABLE_BIT.
const HOST_KVM_FEATURES: u32 = 0x0101_FEFB;
/// What survives the userspace-APIC mask: bits 0, 1, 3, 5 and 24.
const GUEST_KVM_FEATURES: u32 = 0x0100_002B;

/// A small synthetic KVM_GET_SUPPORTED_CPUID answer.
fn host_entries() -> Vec<CpuidEntry> {
    vec![
        e(0, 0, 0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
        e(1, 0, 0x0009_06EA, 0x0000_0800, 0x7FFA_3203, 0x0F8B_FBFF),
        e(
            0x4000_0000,
            0,
            0x4000_0001,
            0x4B4D_564B,
            0x564B_4D56,
            0x0000_004D,
        ),
        e(0x4000_0001, 0, HOST_KVM_FEATURES, 0, 0, 0),
        e(0x8000_0000, 0, 0x8000_0008, 0, 0, 0),
    ]
}

fn host(backend: Backend) -> HostCpuid {
    HostCpuid {
        entries: host_entries(),
        info: HostInfo {
            smt_active: true,
            tsc_khz: None,
        },
        backend,
    }
}

fn all_kernel() -> Backend {
    Backend::Kernel(FeatureSet::ALL)
}

fn report(spec: &str, backend: Backend) -> CpuidBuild {
    let cfg = CpuConfig::parse(spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
    build_report(&cfg, &host(backend)).unwrap_or_else(|e| panic!("{spec}: {e}"))
}

fn hv_range(spec: &str, backend: Backend) -> Vec<CpuidEntry> {
    hypervisor_leaves(&report(spec, backend).entries)
        .copied()
        .collect()
}

fn leaf(entries: &[CpuidEntry], function: u32) -> Option<CpuidEntry> {
    entries.iter().find(|x| x.function == function).copied()
}

fn regs(entries: &[CpuidEntry], function: u32) -> [u32; 4] {
    let l = leaf(entries, function).unwrap_or_else(|| panic!("leaf {function:#x} missing"));
    [l.eax, l.ebx, l.ecx, l.edx]
}

fn build_err(spec: &str, backend: Backend) -> String {
    let cfg = CpuConfig::parse(spec).unwrap_or_else(|e| panic!("{spec}: parse error {e}"));
    let validated = cfg.validate(&backend).map_err(|e| e.to_string());
    match build(&cfg, &host(backend)) {
        Ok(_) => panic!("{spec}: expected an error"),
        Err(e) => {
            assert_eq!(
                validated,
                Err(e.to_string()),
                "{spec}: validate and build disagree"
            );
            e.to_string()
        }
    }
}

#[test]
fn golden_issue_2_flag_set() {
    let spec = "host,hv-relaxed,hv-vpindex,hv-time,hv-synic,hv-stimer,hv-crash,hv-reset,hv-frequencies,hv-runtime,\
                hv-vapic,hv-tlbflush,hv-ipi,hv-spinlocks=0x1fff,hv-stimer-direct";
    let got: Vec<CpuidEntry> = hv_range(spec, Backend::Userspace)
        .into_iter()
        .filter(|l| l.function != 0x4000_0101)
        .collect();
    // Derived by hand from the reference:
    // 3.EAX = runtime(0) time(1,9) synic(2) stimer(3) vapic(4) always(5) vpindex(6) reset(7) frequencies(11)
    // 3.EBX = synic: PostMessages(4) SignalEvents(5)
    // 3.EDX = always(3) frequencies(8) crash(10) stimer-direct(19)
    // 4.EAX = tlbflush(2,11) vapic without avic(3) relaxed(5) ipi(10,11)
    let want = vec![
        e(
            0x4000_0000,
            0,
            0x4000_0005,
            0x7263_694D,
            0x666F_736F,
            0x7648_2074,
        ),
        e(0x4000_0001, 0, 0x3123_7648, 0, 0, 0),
        e(0x4000_0002, 0, 0x0000_3839, 0x000A_0000, 0, 0),
        e(0x4000_0003, 0, 0x0000_0AFF, 0x0000_0030, 0, 0x0008_0508),
        e(0x4000_0004, 0, 0x0000_0C2C, 0x0000_1FFF, 0, 0),
        e(0x4000_0005, 0, 0xFFFF_FFFF, 0x0000_0040, 0, 0),
        e(
            0x4000_0100,
            0,
            0x4000_0101,
            0x4B4D_564B,
            0x564B_4D56,
            0x0000_004D,
        ),
    ];
    assert_eq!(got, want);
}

#[test]
fn golden_error_stimer_without_time() {
    assert_eq!(
        build_err("host,hv-stimer", Backend::Userspace),
        "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)"
    );
}

/// Per flag: the flags it needs, and the bits it adds (3.EAX, 3.EBX, 3.EDX, 4.EAX, 0x4000000A.EAX), by hand
/// from reference §4.1 / §5.
struct Row {
    flag: &'static str,
    deps: &'static [&'static str],
    bits: [u32; 5],
}

const ROWS: &[Row] = &[
    Row {
        flag: "hv-relaxed",
        deps: &[],
        bits: [0, 0, 0, 1 << 5, 0],
    },
    Row {
        flag: "hv-vapic",
        deps: &[],
        bits: [1 << 4, 0, 0, 1 << 3, 0],
    },
    Row {
        flag: "hv-time",
        deps: &[],
        bits: [(1 << 1) | (1 << 9), 0, 0, 0, 0],
    },
    Row {
        flag: "hv-crash",
        deps: &[],
        bits: [0, 0, 1 << 10, 0, 0],
    },
    Row {
        flag: "hv-reset",
        deps: &[],
        bits: [1 << 7, 0, 0, 0, 0],
    },
    Row {
        flag: "hv-vpindex",
        deps: &[],
        bits: [1 << 6, 0, 0, 0, 0],
    },
    Row {
        flag: "hv-runtime",
        deps: &[],
        bits: [1 << 0, 0, 0, 0, 0],
    },
    Row {
        flag: "hv-synic",
        deps: &["hv-vpindex"],
        bits: [1 << 2, (1 << 4) | (1 << 5), 0, 0, 0],
    },
    Row {
        flag: "hv-stimer",
        deps: &["hv-time", "hv-synic", "hv-vpindex"],
        bits: [1 << 3, 0, 0, 0, 0],
    },
    Row {
        flag: "hv-frequencies",
        deps: &[],
        bits: [1 << 11, 0, 1 << 8, 0, 0],
    },
    Row {
        flag: "hv-reenlightenment",
        deps: &[],
        bits: [1 << 13, 0, 0, 0, 0],
    },
    Row {
        flag: "hv-tlbflush",
        deps: &["hv-vpindex"],
        bits: [0, 0, 0, (1 << 2) | (1 << 11), 0],
    },
    Row {
        flag: "hv-evmcs",
        deps: &["hv-vapic"],
        bits: [0, 0, 0, 1 << 14, 0x0101],
    },
    Row {
        flag: "hv-ipi",
        deps: &["hv-vpindex"],
        bits: [0, 0, 0, (1 << 10) | (1 << 11), 0],
    },
    Row {
        flag: "hv-stimer-direct",
        deps: &["hv-stimer", "hv-time", "hv-synic", "hv-vpindex"],
        bits: [0, 0, 1 << 19, 0, 0],
    },
    Row {
        flag: "hv-avic",
        deps: &[],
        bits: [0, 0, 0, 1 << 9, 0],
    },
    Row {
        flag: "hv-apicv",
        deps: &[],
        bits: [0, 0, 0, 1 << 9, 0],
    },
    Row {
        flag: "hv-syndbg",
        deps: &["hv-relaxed", "hv-synic", "hv-vpindex"],
        bits: [0, 0, 1 << 11, 0, 0],
    },
    Row {
        flag: "hv-emsr-bitmap",
        deps: &[],
        bits: [0, 0, 0, 0, 1 << 19],
    },
    Row {
        flag: "hv-xmm-input",
        deps: &[],
        bits: [0, 0, 1 << 4, 0, 0],
    },
    Row {
        flag: "hv-tlbflush-ext",
        deps: &["hv-tlbflush", "hv-vpindex"],
        bits: [0, 0, 1 << 14, 0, 0],
    },
    Row {
        flag: "hv-tlbflush-direct",
        deps: &["hv-vapic"],
        bits: [0, 0, 0, 0, 1 << 17],
    },
];

fn row(flag: &str) -> &'static Row {
    ROWS.iter()
        .find(|r| r.flag == flag)
        .unwrap_or_else(|| panic!("no row for {flag}"))
}

/// The Hyper-V registers for a list of flags, from the hand table: [3.EAX, 3.EBX, 3.EDX, 4.EAX, A.EAX] with the
/// always-set bits (3.EAX[5], 3.EDX[3]) and the avic rule (no 4.EAX[3] when hv-avic is on).
fn expected(flags: &[&str]) -> [u32; 5] {
    let mut v = [1 << 5, 0, 1 << 3, 0, 0];
    for f in flags {
        for (i, b) in row(f).bits.iter().enumerate() {
            v[i] |= b;
        }
    }
    if flags.iter().any(|f| *f == "hv-avic" || *f == "hv-apicv") {
        v[3] &= !(1 << 3);
    }
    v
}

fn observed(entries: &[CpuidEntry]) -> [u32; 5] {
    let f = regs(entries, 0x4000_0003);
    let r = regs(entries, 0x4000_0004);
    assert_eq!(f[2], 0, "3.ECX is never written");
    assert_eq!([r[2], r[3]], [0, 0], "4.ECX/EDX are zero");
    let nested = leaf(entries, 0x4000_000A).map_or(0, |l| l.eax);
    [f[0], f[1], f[3], r[0], nested]
}

#[test]
fn every_flag_sets_its_bits_leaf_by_leaf() {
    for r in ROWS {
        for spelling in [r.flag.to_string(), r.flag.replace('-', "_")] {
            let mut flags: Vec<&str> = r.deps.to_vec();
            flags.push(r.flag);
            let spec = format!("host,{},{}", r.deps.join(","), spelling).replace(",,", ",");
            let got = hv_range(&spec, all_kernel());
            assert_eq!(observed(&got), expected(&flags), "{spec}");
            // The flag's own contribution: the difference with its dependencies alone.
            let without = if r.deps.is_empty() {
                [1 << 5, 0, 1 << 3, 0, 0]
            } else {
                observed(&hv_range(
                    &format!("host,{}", r.deps.join(",")),
                    all_kernel(),
                ))
            };
            let own: Vec<u32> = observed(&got)
                .iter()
                .zip(without.iter())
                .map(|(a, b)| a & !b)
                .collect();
            let mut want_own: Vec<u32> = r
                .bits
                .iter()
                .zip(without.iter())
                .map(|(a, b)| a & !b)
                .collect();
            if r.flag == "hv-avic" || r.flag == "hv-apicv" {
                want_own[3] &= !(1 << 3);
            }
            assert_eq!(own, want_own, "{spec}: bits of {} alone", r.flag);
            // Identification leaves are there, with the defaults.
            assert_eq!(regs(&got, 0x4000_0001), [0x3123_7648, 0, 0, 0], "{spec}");
            assert_eq!(
                regs(&got, 0x4000_0002),
                [0x3839, 0x000A_0000, 0, 0],
                "{spec}"
            );
            assert_eq!(regs(&got, 0x4000_0004)[1], 0xFFFF_FFFF, "{spec}");
            assert_eq!(regs(&got, 0x4000_0005), [0xFFFF_FFFF, 64, 0, 0], "{spec}");
        }
    }
}

#[test]
fn every_flag_combined() {
    let all: Vec<&str> = ROWS
        .iter()
        .map(|r| r.flag)
        .filter(|f| *f != "hv-apicv")
        .collect();
    let got = hv_range(&format!("host,{}", all.join(",")), all_kernel());
    assert_eq!(observed(&got), expected(&all));
    assert_eq!(regs(&got, 0x4000_0000)[0], 0x4000_0082);
}

#[test]
fn vapic_recommendation_depends_on_avic() {
    let table = [
        ("host,hv-vapic", 1 << 3),
        ("host,hv-vapic,hv-avic", 1 << 9),
        ("host,hv-vapic,hv-apicv", 1 << 9),
        ("host,hv-avic", 1 << 9),
        ("host,hv-vapic,hv-avic,hv-avic=off", 1 << 3),
    ];
    for (spec, want) in table {
        assert_eq!(
            regs(&hv_range(spec, Backend::Userspace), 0x4000_0004)[0],
            want,
            "{spec}"
        );
    }
}

#[test]
fn dependency_messages() {
    let ud = Backend::Userspace;
    let table: &[(&str, Backend, &str)] = &[
        ("host,hv-stimer", ud.clone(), "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)"),
        (
            "host,hv-time,hv-stimer",
            ud.clone(),
            "Hyper-V synthetic timers (hv-stimer) requires Hyper-V synthetic interrupt controller (hv-synic)",
        ),
        (
            "host,hv-time,hv-synic,hv-stimer",
            ud.clone(),
            "Hyper-V synthetic interrupt controller (hv-synic) requires Hyper-V VP_INDEX MSR (hv-vpindex)",
        ),
        (
            "host,hv_synic",
            ud.clone(),
            "Hyper-V synthetic interrupt controller (hv-synic) requires Hyper-V VP_INDEX MSR (hv-vpindex)",
        ),
        (
            "host,hv-tlbflush",
            ud.clone(),
            "Hyper-V paravirtualized TLB flush (hv-tlbflush) requires Hyper-V VP_INDEX MSR (hv-vpindex)",
        ),
        ("host,hv-ipi", ud.clone(), "Hyper-V paravirtualized IPI (hv-ipi) requires Hyper-V VP_INDEX MSR (hv-vpindex)"),
        (
            "host,hv-stimer-direct",
            ud.clone(),
            "Hyper-V direct mode synthetic timers (hv-stimer-direct) requires Hyper-V synthetic timers (hv-stimer)",
        ),
        (
            "host,hv-tlbflush-ext",
            ud.clone(),
            "Hyper-V Extended gva ranges for TLB flush hypercalls (hv-tlbflush-ext) requires Hyper-V paravirtualized TLB flush (hv-tlbflush)",
        ),
        // hv-tlbflush (bit 11) is walked before hv-tlbflush-ext (bit 19).
        (
            "host,hv-tlbflush-ext,hv-tlbflush",
            ud.clone(),
            "Hyper-V paravirtualized TLB flush (hv-tlbflush) requires Hyper-V VP_INDEX MSR (hv-vpindex)",
        ),
        // hv-stimer (bit 8) is walked before hv-ipi (bit 13), whatever the order on the command line.
        (
            "host,hv-ipi,hv-stimer",
            ud.clone(),
            "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)",
        ),
        ("host,hv-evmcs", all_kernel(), "Hyper-V enlightened VMCS (hv-evmcs) requires Hyper-V virtual APIC (hv-vapic)"),
        (
            "host,hv-tlbflush-direct",
            all_kernel(),
            "Hyper-V direct TLB flush (hv-tlbflush-direct) requires Hyper-V virtual APIC (hv-vapic)",
        ),
        (
            "host,hv-syndbg",
            all_kernel(),
            "Hyper-V Enable synthetic kernel debugger channel (hv-syndbg) requires Hyper-V relaxed timing (hv-relaxed)",
        ),
        (
            "host,hv-relaxed,hv-syndbg",
            all_kernel(),
            "Hyper-V Enable synthetic kernel debugger channel (hv-syndbg) requires Hyper-V synthetic interrupt controller (hv-synic)",
        ),
        (
            "host,hv-relaxed,hv-synic,hv-syndbg",
            all_kernel(),
            "Hyper-V synthetic interrupt controller (hv-synic) requires Hyper-V VP_INDEX MSR (hv-vpindex)",
        ),
        // Not supported by the userspace backend.
        ("host,hv-evmcs", ud.clone(), "Hyper-V enlightened VMCS (hv-evmcs) is not supported by kernel"),
        ("host,hv-emsr-bitmap", ud.clone(), "Hyper-V enlightened MSR-Bitmap (hv-emsr-bitmap) is not supported by kernel"),
        ("host,hv-tlbflush-direct", ud.clone(), "Hyper-V direct TLB flush (hv-tlbflush-direct) is not supported by kernel"),
        (
            "host,hv-syndbg",
            ud.clone(),
            "Hyper-V Enable synthetic kernel debugger channel (hv-syndbg) is not supported by kernel",
        ),
        // The support check of a feature comes before its dependency check, and the walk is in bit order.
        ("host,hv-vapic,hv-evmcs,hv-ipi", ud.clone(), "Hyper-V enlightened VMCS (hv-evmcs) is not supported by kernel"),
        ("host,hv-evmcs,hv-stimer", ud.clone(), "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)"),
        (
            "host,hv-vapic",
            Backend::Kernel(FeatureSet::of(&[Feature::Relaxed])),
            "Hyper-V virtual APIC (hv-vapic) is not supported by kernel",
        ),
        (
            "host,hv-apicv",
            Backend::Kernel(FeatureSet::EMPTY),
            "Hyper-V AVIC/APICv support (hv-avic/hv-apicv) is not supported by kernel",
        ),
        (
            "host,hv-xmm-input",
            Backend::Kernel(FeatureSet::EMPTY),
            "Hyper-V XMM fast hypercall input (hv-xmm-input) is not supported by kernel",
        ),
    ];
    for (spec, backend, msg) in table {
        assert_eq!(build_err(spec, backend.clone()), *msg, "{spec}");
    }
}

#[test]
fn synic_kvm_only_has_no_message_bits_and_no_vpindex_rule() {
    let got = hv_range("host,hv-synic,x-hv-synic-kvm-only", Backend::Userspace);
    let f = regs(&got, 0x4000_0003);
    assert_eq!((f[0], f[1]), ((1 << 5) | (1 << 2), 0));
}

#[test]
fn identification_rule_decides_the_leaves() {
    // hv-spinlocks alone switches identification on.
    let got = hv_range("host,hv-spinlocks=0x1fff", Backend::Userspace);
    assert_eq!(
        regs(&got, 0x4000_0000),
        [0x4000_0005, 0x7263_694D, 0x666F_736F, 0x7648_2074]
    );
    assert_eq!(regs(&got, 0x4000_0003), [1 << 5, 0, 0, 1 << 3]);
    assert_eq!(regs(&got, 0x4000_0004), [0, 0x1FFF, 0, 0]);
    // The vendor id, version id, enforce-cpuid, max-vps or no-nonarch-coresharing alone do not: the KVM block
    // stays at 0x40000000.
    for spec in [
        "host,hv-vendor-id=Hyper-V-ish",
        "host,hv-version-id-build=1,hv-version-id-major=2",
        "host,hv-enforce-cpuid",
        "host,x-hv-max-vps=8",
        "host,hv-no-nonarch-coresharing=on",
        "host,hv-spinlocks=0xffffffff",
        "host",
    ] {
        let r = report(spec, Backend::Userspace);
        assert!(!r.hyperv, "{spec}");
        let got: Vec<CpuidEntry> = hypervisor_leaves(&r.entries).copied().collect();
        assert_eq!(
            got,
            vec![
                e(
                    0x4000_0000,
                    0,
                    0x4000_0001,
                    0x4B4D_564B,
                    0x564B_4D56,
                    0x0000_004D
                ),
                e(0x4000_0001, 0, GUEST_KVM_FEATURES, 0, 0, 0),
            ],
            "{spec}"
        );
    }
}

#[test]
fn values_reach_their_registers() {
    let got = hv_range(
        "host,hv-relaxed,hv-vendor-id=KVMKVMKVM,hv-version-id-build=7100,hv-version-id-major=6,\
         hv-version-id-minor=1,hv-version-id-spack=2,hv-version-id-sbranch=3,hv-version-id-snumber=0x1234567,\
         x-hv-max-vps=64,hv-spinlocks=4095",
        Backend::Userspace,
    );
    // "KVMKVMKVM" zero-padded: "KVMK" "VMKV" "M\0\0\0".
    assert_eq!(
        regs(&got, 0x4000_0000),
        [0x4000_0005, 0x4B4D_564B, 0x564B_4D56, 0x0000_004D]
    );
    assert_eq!(regs(&got, 0x4000_0002), [7100, 0x0006_0001, 2, 0x0323_4567]);
    assert_eq!(regs(&got, 0x4000_0004), [1 << 5, 4095, 0, 0]);
    assert_eq!(regs(&got, 0x4000_0005), [64, 64, 0, 0]);
    // Truncated vendor id.
    let got = hv_range(
        "host,hv-relaxed,hv-vendor-id=0123456789abcdef",
        Backend::Userspace,
    );
    assert_eq!(
        regs(&got, 0x4000_0000)[1..],
        [0x3332_3130, 0x3736_3534, 0x6261_3938]
    );
}

#[test]
fn no_nonarch_coresharing_bit() {
    let bit = 1u32 << 18;
    let table = [
        ("host,hv-relaxed,hv-no-nonarch-coresharing=on", true, bit),
        ("host,hv-relaxed,hv-no-nonarch-coresharing=on", false, bit),
        ("host,hv-relaxed,hv-no-nonarch-coresharing=off", false, 0),
        ("host,hv-relaxed,hv-no-nonarch-coresharing=auto", true, 0),
        ("host,hv-relaxed,hv-no-nonarch-coresharing=auto", false, bit),
        ("host,hv-relaxed", false, 0),
    ];
    for (spec, smt_active, want) in table {
        let cfg = CpuConfig::parse(spec).unwrap();
        let mut h = host(Backend::Userspace);
        h.info.smt_active = smt_active;
        let r = build_report(&cfg, &h).unwrap();
        assert_eq!(
            regs(&r.entries, 0x4000_0004)[0] & bit,
            want,
            "{spec} smt={smt_active}"
        );
        let auto = spec.contains("=auto");
        assert_eq!(
            r.migration_blockers
                .contains(&hyperv::config::blockers::NO_NONARCH_CORESHARING_AUTO),
            auto,
            "{spec}"
        );
    }
}

#[test]
fn passthrough_userspace() {
    let r = report(
        "host,hv-passthrough,hv-relaxed=off,hv-vendor-id=Custom,hv-spinlocks=0x1fff",
        Backend::Userspace,
    );
    // Everything the userspace backend implements, OR-ed in; hv-relaxed=off is not honoured, and the identity
    // values come from the backend (QEMU copies the host's).
    let expect_features = FeatureSet::ALL
        .without(Feature::Evmcs)
        .without(Feature::EmsrBitmap)
        .without(Feature::TlbFlushDirect)
        .without(Feature::Syndbg);
    assert_eq!(r.features, expect_features);
    let got: Vec<CpuidEntry> = hypervisor_leaves(&r.entries).copied().collect();
    // 3.EAX: runtime time synic stimer vapic always vpindex reset (0xFF) + refTSC(9) freq(11) reenlightenment(13)
    // 3.EDX: always(3) xmm(4) freq(8) crash(10) ext-gva(14) stimer-direct(19)
    // 4.EAX: tlbflush(2,11) relaxed(5) avic(9, suppressing vapic's 3) ipi(10,11)
    assert_eq!(
        regs(&got, 0x4000_0000),
        [0x4000_0005, 0x7263_694D, 0x666F_736F, 0x7648_2074]
    );
    assert_eq!(regs(&got, 0x4000_0003), [0x0000_2AFF, 0x30, 0, 0x0008_4518]);
    assert_eq!(regs(&got, 0x4000_0004), [0x0000_0E24, 0xFFFF_FFFF, 0, 0]);
    assert!(leaf(&got, 0x4000_000A).is_none());
    assert!(leaf(&got, 0x4000_0080).is_none());
    assert_eq!(
        r.migration_blockers,
        vec![
            "'hv-passthrough' CPU flag prevents migration, use explicit set of hv-* flags instead"
        ]
    );
    // Dependency checks are skipped (the backend supplies them anyway); the synic rule still runs but is met.
    let cfg = CpuConfig::parse("host,hv-passthrough,hv-stimer").unwrap();
    assert!(cfg.validate(&Backend::Userspace).is_ok());
}

#[test]
fn passthrough_rules() {
    // Never hv-syndbg, even when the backend has it; the nested features are there with a capable backend.
    let r = report("host,hv-passthrough", all_kernel());
    assert!(!r.features.contains(Feature::Syndbg));
    assert_eq!(r.features, FeatureSet::ALL.without(Feature::Syndbg));
    assert_eq!(regs(&r.entries, 0x4000_0000)[0], 0x4000_000A);
    // A backend without vpindex but with synic: the synic rule still applies after passthrough.
    let b = Backend::Kernel(FeatureSet::of(&[Feature::Synic, Feature::Relaxed]));
    assert_eq!(
        build_err("host,hv-passthrough", b),
        "Hyper-V synthetic interrupt controller (hv-synic) requires Hyper-V VP_INDEX MSR (hv-vpindex)"
    );
    // Deliberate deviation from QEMU: an explicit flag the backend lacks is refused instead of set unchecked.
    assert_eq!(
        build_err("host,hv-passthrough,hv-evmcs", Backend::Userspace),
        "Hyper-V enlightened VMCS (hv-evmcs) is not supported by kernel"
    );
    // hv-no-nonarch-coresharing is never set by passthrough.
    let r = report("host,hv-passthrough", Backend::Userspace);
    assert_eq!(regs(&r.entries, 0x4000_0004)[0] & (1 << 18), 0);
}

#[test]
fn nested_leaves_only_for_nested_flags() {
    let table: &[(&str, u32)] = &[
        ("host,hv-vapic,hv-evmcs", 0x0101),
        ("host,hv-emsr-bitmap", 1 << 19),
        ("host,hv-vapic,hv-tlbflush-direct", 1 << 17),
        (
            "host,hv-vapic,hv-evmcs,hv-emsr-bitmap,hv-tlbflush-direct",
            0x000A_0101,
        ),
    ];
    for (spec, nested) in table {
        let got = hv_range(spec, all_kernel());
        assert_eq!(regs(&got, 0x4000_0000)[0], 0x4000_000A, "{spec}");
        for l in 0x4000_0006..=0x4000_0009 {
            assert_eq!(regs(&got, l), [0, 0, 0, 0], "{spec} leaf {l:#x}");
        }
        assert_eq!(regs(&got, 0x4000_000A), [*nested, 0, 0, 0], "{spec}");
    }
    // Every non-nested flag, alone and all together: no 0x40000006..0x4000000A.
    let non_nested: Vec<&str> = ROWS
        .iter()
        .map(|r| r.flag)
        .filter(|f| !matches!(*f, "hv-evmcs" | "hv-emsr-bitmap" | "hv-tlbflush-direct"))
        .collect();
    let got = hv_range(&format!("host,{}", non_nested.join(",")), all_kernel());
    assert!(
        got.iter()
            .all(|l| !(0x4000_0006..=0x4000_000A).contains(&l.function)),
        "{got:x?}"
    );
    let got = hv_range("host,hv-passthrough", Backend::Userspace);
    assert!(got
        .iter()
        .all(|l| !(0x4000_0006..=0x4000_000A).contains(&l.function)));
}

#[test]
fn syndbg_leaves() {
    let got = hv_range(
        "host,hv-relaxed,hv-vpindex,hv-synic,hv-syndbg",
        all_kernel(),
    );
    assert_eq!(regs(&got, 0x4000_0000)[0], 0x4000_0082);
    // EAX: the correct maximum syndbg leaf (QEMU writes 0 there by mistake); "Microsoft VS".
    assert_eq!(
        regs(&got, 0x4000_0080),
        [0x4000_0082, 0x7263_694D, 0x666F_736F, 0x5356_2074]
    );
    assert_eq!(regs(&got, 0x4000_0081), [0x3123_5356, 0, 0, 0]);
    assert_eq!(regs(&got, 0x4000_0082), [1 << 1, 0, 0, 0]);
    assert!(leaf(&got, 0x4000_000A).is_none());
    // Without hv-syndbg there is nothing at 0x40000080.
    let got = hv_range("host,hv-relaxed,hv-vpindex,hv-synic", all_kernel());
    assert!(got
        .iter()
        .all(|l| !(0x4000_0080..=0x4000_0082).contains(&l.function)));
}

#[test]
fn kvm_block_placement() {
    let sig = |base: u32| e(base, 0, base + 1, 0x4B4D_564B, 0x564B_4D56, 0x0000_004D);
    // Hyper-V on, kvm=on: KVM moves to 0x40000100.
    let got = hv_range("host,hv-relaxed", Backend::Userspace);
    assert_eq!(leaf(&got, 0x4000_0100), Some(sig(0x4000_0100)));
    assert_eq!(
        leaf(&got, 0x4000_0101),
        Some(e(0x4000_0101, 0, GUEST_KVM_FEATURES, 0, 0, 0))
    );
    assert_eq!(regs(&got, 0x4000_0000)[1], 0x7263_694D);
    // Hyper-V on, kvm=off: no KVM block at all.
    let got = hv_range("host,hv-relaxed,kvm=off", Backend::Userspace);
    assert!(got.iter().all(|l| l.function < 0x4000_0100), "{got:x?}");
    assert_eq!(got.len(), 6);
    // Hyper-V off, kvm=off: nothing in the hypervisor range.
    assert!(hv_range("host,kvm=off", Backend::Userspace).is_empty());
    assert!(hv_range("host,kvm=off,hv-vendor-id=NotAnything", Backend::Userspace).is_empty());
    // Hyper-V off, kvm=on: KVM at 0x40000000.
    let got = hv_range("host", Backend::Userspace);
    assert_eq!(
        got,
        vec![
            sig(0x4000_0000),
            e(0x4000_0001, 0, GUEST_KVM_FEATURES, 0, 0, 0)
        ]
    );
}

#[test]
fn kvm_features_are_masked_for_the_userspace_apic() {
    let r = report("host", Backend::Userspace);
    let word = regs(&r.entries, 0x4000_0001)[0];
    // Hidden: PV_EOI 6, PV_UNHALT 7, PV_SEND_IPI 11, ASYNC_PF_INT 14, ASYNC_PF 4, ASYNC_PF_VMEXIT 10,
    // PV_TLB_FLUSH 9, POLL_CONTROL 12, PV_SCHED_YIELD 13, MSI_EXT_DEST_ID 15, HC_MAP_GPA_RANGE 16.
    for bit in [2, 4, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17] {
        assert_eq!(word & (1 << bit), 0, "bit {bit}");
    }
    // Kept: kvmclock (0, 3), NOP_IO_DELAY (1), STEAL_TIME (5), CLOCKSOURCE_STABLE_BIT (24).
    assert_eq!(word, (1 << 0) | (1 << 1) | (1 << 3) | (1 << 5) | (1 << 24));
    // Toggles: "-kvm-steal-time" and "-kvmclock" (both clock bits) clear; "+kvm-pv-eoi" cannot add a masked bit.
    let r = report(
        "host,-kvm-steal-time,kvmclock=off,+kvm-pv-eoi",
        Backend::Userspace,
    );
    assert_eq!(regs(&r.entries, 0x4000_0001)[0], (1 << 1) | (1 << 24));
    assert!(r.warnings.contains(
        &"host doesn't support requested feature: CPUID.40000001H:EAX.kvm-pv-eoi [bit 6]"
            .to_string()
    ));
    let cfg = CpuConfig::parse("host,+kvm-pv-unhalt,enforce").unwrap();
    assert_eq!(
        build(&cfg, &host(Backend::Userspace))
            .unwrap_err()
            .to_string(),
        "Host doesn't support requested features"
    );
}

#[test]
fn output_is_sorted_and_unique() {
    let r = report("host,hv-relaxed,hv-vpindex,hv-synic", Backend::Userspace);
    let keys: Vec<(u32, u32)> = r.entries.iter().map(|x| (x.function, x.index)).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted);
    // hypervisor_leaves keeps exactly the >= 0x40000000 ones, in order.
    let hv: Vec<u32> = hypervisor_leaves(&r.entries).map(|x| x.function).collect();
    assert_eq!(
        hv,
        vec![
            0x4000_0000,
            0x4000_0001,
            0x4000_0002,
            0x4000_0003,
            0x4000_0004,
            0x4000_0005,
            0x4000_0100,
            0x4000_0101
        ]
    );
}

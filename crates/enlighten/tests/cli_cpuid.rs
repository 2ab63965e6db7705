//! `enlighten cpuid` and `enlighten host` as a user runs them.

use std::process::Command;

use serde_json::Value;

fn enlighten(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(args)
        .output()
        .expect("run enlighten")
}

/// The leaves QEMU builds for this flag set, derived by hand from the reference tables
/// (shared/reference/hyperv-cpuid-and-flags.md §5 and §6), not from the builder:
/// - 0x40000003 EAX: runtime 0, time 1|9, synic 2, stimer 3, vapic 4, always 5, vpindex 6, reset 7,
///   frequencies 11 = 0xAFF; EBX: PostMessages 4 | SignalEvents 5 = 0x30; EDX: always 3, frequencies 8,
///   crash 10, stimer-direct 19 = 0x80508.
/// - 0x40000004 EAX: tlbflush 2|11, vapic 3 (no avic), relaxed 5, ipi 10|11 = 0xC2C; EBX: spinlocks 0x1FFF.
const GOLDEN: &[[u32; 6]] = &[
    [
        0x4000_0000,
        0,
        0x4000_0005,
        0x7263_694D,
        0x666F_736F,
        0x7648_2074,
    ],
    [0x4000_0001, 0, 0x3123_7648, 0, 0, 0],
    [0x4000_0002, 0, 0x0000_3839, 0x000A_0000, 0, 0],
    [0x4000_0003, 0, 0x0000_0AFF, 0x0000_0030, 0, 0x0008_0508],
    [0x4000_0004, 0, 0x0000_0C2C, 0x0000_1FFF, 0, 0],
    [0x4000_0005, 0, 0xFFFF_FFFF, 0x0000_0040, 0, 0],
    [
        0x4000_0100,
        0,
        0x4000_0101,
        0x4B4D_564B,
        0x564B_4D56,
        0x0000_004D,
    ],
];

#[test]
fn cpuid_json_matches_qemu_leaves_bit_for_bit() {
    let out = enlighten(&[
        "cpuid",
        "-cpu",
        "host,hv-relaxed,hv-vpindex,hv-time,hv-synic,hv-stimer,hv-crash,hv-reset,hv-frequencies,\
         hv-runtime,hv-vapic,hv-tlbflush,hv-ipi,hv-spinlocks=0x1fff,hv-stimer-direct",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leaves: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON array");
    let got: Vec<[u32; 6]> = leaves
        .iter()
        .map(|l| {
            let f = |k: &str| {
                l[k].as_u64()
                    .unwrap_or_else(|| panic!("{k} missing in {l}")) as u32
            };
            [
                f("function"),
                f("index"),
                f("eax"),
                f("ebx"),
                f("ecx"),
                f("edx"),
            ]
        })
        // 0x40000101 holds the host's KVM feature word: host-dependent, left out.
        .filter(|l| l[0] != 0x4000_0101)
        .collect();
    assert_eq!(got, GOLDEN);
    let functions: Vec<u64> = leaves
        .iter()
        .map(|l| l["function"].as_u64().unwrap_or(0))
        .collect();
    let mut sorted = functions.clone();
    sorted.sort();
    assert_eq!(functions, sorted, "sorted by function");
}

#[test]
fn cpuid_dependency_error_exits_1_with_qemu_text() {
    let out = enlighten(&["cpuid", "-cpu", "host,hv-stimer", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "Hyper-V synthetic timers (hv-stimer) requires Hyper-V clocksources (hv-time)"
        ),
        "stderr: {stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn cpuid_bad_specs_are_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("nosuchmodel", "nosuchmodel"),
        ("host,hv-relaxed=maybe", "hv-relaxed"),
        (
            "host,hv-evmcs",
            "Hyper-V enlightened VMCS (hv-evmcs) is not supported by kernel",
        ),
        ("host,hv-spinlocks=lots", "hv-spinlocks"),
    ];
    for (spec, needle) in cases {
        let out = enlighten(&["cpuid", "-cpu", spec]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.starts_with("error: ") && stderr.contains(needle),
            "{spec}: {stderr}"
        );
    }
}

#[test]
fn cpuid_missing_spec_is_a_usage_error() {
    let out = enlighten(&["cpuid"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cpu"));
}

#[test]
fn host_reports_no_kernel_hyperv_and_userspace_mode() {
    let out = enlighten(&["host", "--json"]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    // This project's hosts have no Hyper-V emulation in the kernel (environment.md); the report must say so.
    assert_eq!(report["kernel_hyperv_emulation"], Value::Bool(false));
    assert_eq!(report["userspace_mode_available"], Value::Bool(true));
    assert_eq!(report["kvm_api_version"], 12);
    let features: Vec<&str> = report["userspace_enlightenments"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for f in [
        "hv-relaxed",
        "hv-time",
        "hv-synic",
        "hv-stimer",
        "hv-vpindex",
    ] {
        assert!(features.contains(&f), "{f} in {features:?}");
    }
    for f in ["hv-evmcs", "hv-syndbg"] {
        assert!(!features.contains(&f), "{f} not in {features:?}");
    }
    let text = enlighten(&["host"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Userspace Hyper-V mode available"), "{text}");
}

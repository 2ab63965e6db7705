//! Hyper-V synthetic MSRs under real KVM, from inside the guest (`guests/tests/hv_msrs.c`): each MSR group's
//! values, writes, read-only and invalid-write #GPs, and gating (no Hyper-V identification, hv-enforce-cpuid with
//! and without each group's CPUID bit).

mod guest_common;
use guest_common::*;

/// Every flag of this MSR groups.
const ALL: &str = "host,hv-relaxed,hv-vpindex,hv-runtime,hv-time,hv-crash,hv-reset,hv-frequencies,hv-reenlightenment";

/// The PASS lines a run with `ALL` must show (prefixes).
const FUNCTIONAL: &[&str] = &[
    "GUEST_OS_ID reads 0 at boot",
    "HYPERCALL write while GUEST_OS_ID is 0 is ignored",
    "GUEST_OS_ID stores its value",
    "HYPERCALL without the enable bit is stored verbatim",
    "the hypercall page is 'out 0xE4, al; ret'",
    "a call through the page exits and returns status 2",
    "enabling the hypercall page outside RAM raises #GP",
    "GUEST_OS_ID = 0 clears HYPERCALL's enable bit",
    "VP_INDEX on CPU 0 is 0",
    "VP_INDEX on CPU 1 is 1",
    "VP_INDEX is read-only on CPU 1",
    "VP_RUNTIME increases",
    "VP_RUNTIME is read-only",
    "TIME_REF_COUNT advances",
    "TIME_REF_COUNT runs at 10 MHz against the TSC",
    "TIME_REF_COUNT is read-only",
    "REFERENCE_TSC stores any value without the enable bit",
    "the enabled page has a valid sequence",
    "scale is 2^64 * 10^7 / TSC Hz",
    "page <= TIME_REF_COUNT <= page",
    "re-enabling rewrites the page",
    "TSC_FREQUENCY",
    "APIC_FREQUENCY is 1000000000",
    "TSC_FREQUENCY and APIC_FREQUENCY are read-only",
    "CRASH_P0..P4 store their values",
    "CRASH_CTL reads the notify capability",
    "a CRASH_CTL write without the notify bit",
    "RESET reads 0",
    "RESET writes other than 1 are ignored",
    "REENLIGHTENMENT_CONTROL stores its value",
    "TSC_EMULATION_CONTROL stores its value",
    "TSC_EMULATION_STATUS accepts 0",
    "TSC_EMULATION_STATUS #GPs on a non-zero write",
    "GUEST_IDLE (not implemented) raises #GP",
];

fn run(cpu: &str, enforce: bool) -> Outcome {
    let append = format!("enforce={}", u8::from(enforce));
    run_guest("hv_msrs", 2, Some(&append), &["-cpu", cpu])
}

#[test]
fn every_group_works_with_its_flags() {
    for enforce in [false, true] {
        let cpu = if enforce {
            format!("{ALL},hv-enforce-cpuid")
        } else {
            ALL.to_string()
        };
        let o = run(&cpu, enforce);
        assert_passed_with(&o, FUNCTIONAL);
    }
}

#[test]
fn enforce_cpuid_gates_each_group_on_its_flag() {
    // (flag removed from ALL, a PASS line proving that group #GPs, a line proving another group still works)
    let cases: &[(&str, &str, &str)] = &[
        (
            "hv-vpindex",
            "VP_INDEX: rdmsr/wrmsr 40000002 raise #GP",
            "VP_RUNTIME increases",
        ),
        (
            "hv-runtime",
            "VP_RUNTIME: rdmsr/wrmsr 40000010 raise #GP",
            "VP_INDEX on CPU 1 is 1",
        ),
        (
            "hv-time",
            "TIME_REF_COUNT: rdmsr/wrmsr 40000020 raise #GP",
            "CRASH_P0..P4 store their values",
        ),
        (
            "hv-crash",
            "CRASH: rdmsr/wrmsr 40000105 raise #GP",
            "RESET reads 0",
        ),
        (
            "hv-reset",
            "RESET: rdmsr/wrmsr 40000003 raise #GP",
            "CRASH_CTL reads the notify capability",
        ),
        (
            "hv-frequencies",
            "TSC/APIC_FREQUENCY: rdmsr/wrmsr 40000022 raise #GP",
            "page <= TIME_REF_COUNT <= page",
        ),
        (
            "hv-reenlightenment",
            "re-enlightenment: rdmsr/wrmsr 40000108 raise #GP",
            "TSC_FREQUENCY and APIC_FREQUENCY are read-only",
        ),
    ];
    for (flag, gated, other) in cases {
        let cpu: Vec<&str> = ALL.split(',').filter(|f| f != flag).collect();
        let cpu = format!("{},hv-enforce-cpuid", cpu.join(","));
        let o = run(&cpu, true);
        assert_passed_with(&o, &[gated, other]);
        // Without enforcement the same CPUID leaves the group working (KVM without ENFORCE_CPUID).
        let loose: Vec<&str> = ALL.split(',').filter(|f| f != flag).collect();
        let o = run(&loose.join(","), false);
        assert_passed_with(&o, FUNCTIONAL);
    }
}

#[test]
fn everything_gps_without_hyperv_identification() {
    let o = run("host", false);
    assert_passed_with(
        &o,
        &[
            "GUEST_OS_ID/HYPERCALL: rdmsr/wrmsr 40000000 raise #GP",
            "VP_INDEX: rdmsr/wrmsr 40000002 raise #GP",
            "TIME_REF_COUNT: rdmsr/wrmsr 40000020 raise #GP",
            "CRASH: rdmsr/wrmsr 40000105 raise #GP",
            "re-enlightenment: rdmsr/wrmsr 40000106 raise #GP",
        ],
    );
}

#[test]
fn vp_index_equals_apic_id_on_four_vcpus() {
    let o = run_guest("hv_msrs", 4, Some("enforce=0"), &["-cpu", ALL]);
    let mut lines = Vec::new();
    for cpu in 0..4 {
        lines.push(format!(
            "VP_INDEX on CPU {cpu} is {cpu:x} (its APIC ID is {cpu})"
        ));
        lines.push(format!("VP_INDEX is read-only on CPU {cpu}"));
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_passed_with(&o, &refs);
}

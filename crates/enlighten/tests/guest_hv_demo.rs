//! The demo guest's Hyper-V section: with `-cpu host,hv-passthrough` every enlightenment of engine I is found
//! and reported working, including reference-TSC-page reads at CPL 3 without exits.

mod guest_common;
use guest_common::*;

#[test]
fn demo_reports_each_enlightenment_working() {
    let o = run_guest("demo", 2, None, &["-cpu", "host,hv-passthrough"]);
    assert_eq!(o.status, Some(1), "{}", o.describe());
    let section = o
        .stdout
        .split("\nHyper-V\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Hyper-V section\n{}", o.describe()));
    for want in [
        "hypercall page ",
        "VP index        0 1 (= APIC IDs): working",
        "VP runtime ",
        "frequencies     TSC ",
        "TIME_REF_COUNT ",
        "reference TSC   scale=",
        "1000000 CPL-3 reads in ",
        ", without an exit: working",
        "crash MSRs ",
        "re-enlightenment MSRs: working",
    ] {
        assert!(section.contains(want), "missing {want:?}\n{}", o.describe());
    }
    assert!(!section.contains("NOT WORKING"), "{}", o.describe());
    assert!(o.stderr_noise().is_empty(), "{}", o.describe());
}

#[test]
fn demo_without_hyperv_says_so() {
    let o = run_guest("demo", 1, None, &[]);
    assert!(
        o.stdout.contains("Hyper-V\n  not identified"),
        "{}",
        o.describe()
    );
}

//! The userspace local APIC under real KVM, in xAPIC and x2APIC mode: the timer in one-shot, periodic and
//! TSC-deadline modes (periods measured against the TSC for every divide setting), fixed IPIs between vCPUs
//! plus shorthands, logical destinations, lowest-priority delivery and NMI, and the EOI/priority rules.

mod guest_common;
use guest_common::*;

/// The CPU model for APIC tests: x2APIC and the TSC-deadline timer must be visible.
const CPU: &[&str] = &["-cpu", "qemu64,+x2apic,+tsc-deadline"];

#[test]
fn apic_timer_all_modes_and_divides() {
    for mode in ["xapic", "x2apic"] {
        let o = run_guest("apic_timer", 1, Some(&format!("mode={mode}")), CPU);
        let m = if mode == "x2apic" { "x2APIC" } else { "xAPIC" };
        let mut want: Vec<String> = Vec::new();
        for div in [1, 2, 4, 8, 16, 32, 64, 128] {
            want.push(format!("{m}: counter at divide {div}: "));
            want.push(format!("{m}: one-shot divide {div} "));
            want.push(format!("{m}: periodic divide {div} "));
        }
        for s in [
            "TSC frequency",
            "no one-shot interrupt arrived early",
            "a one-shot fires exactly once",
            "a masked one-shot runs down without an interrupt",
            "TSC-deadline interrupt never before the deadline",
            "TSC-deadline lateness",
            "IA32_TSC_DEADLINE reads 0 after expiry",
            "writing 0 disarms the TSC deadline",
            "a deadline in the past fires immediately",
        ] {
            want.push(format!("{m}: {s}"));
        }
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_passed_with(&o, &want);
        assert!(
            !o.stdout.contains("SKIP:"),
            "a timer mode was skipped\n{}",
            o.describe()
        );
    }
}

#[test]
fn ipi_between_vcpus() {
    for (smp, mode) in [(2, "xapic"), (2, "x2apic"), (4, "xapic"), (4, "x2apic")] {
        let o = run_guest("ipi", smp, Some(&format!("mode={mode}")), CPU);
        let m = if mode == "x2apic" { "x2APIC" } else { "xAPIC" };
        let fixed = format!("{m}: fixed IPIs between all {smp} vCPUs, each received exactly once");
        let allbut = format!("{m}: all-excluding-self shorthand");
        let allinc = format!("{m}: all-including-self shorthand");
        let selfipi = format!("{m}: self shorthand");
        let logical = format!("{m}: logical destination");
        let lowest = format!("{m}: lowest-priority IPI");
        let nmi = format!("{m}: NMI IPI delivered once");
        assert_passed_with(
            &o,
            &[&fixed, &allbut, &allinc, &selfipi, &logical, &lowest, &nmi],
        );
    }
}

#[test]
fn apic_eoi_and_priority() {
    for mode in ["xapic", "x2apic"] {
        let o = run_guest("apic_priority", 1, Some(&format!("mode={mode}")), CPU);
        let m = if mode == "x2apic" { "x2APIC" } else { "xAPIC" };
        let want: Vec<String> = [
            "vector 0x90 preempts the handler of 0x50",
            "both 0x50 and 0x90 in ISR while nested",
            "PPR is 0x90 in the nested handler",
            "EOI clears only the highest ISR bit",
            "vector 0x60 waits for the EOI of 0xA0",
            "0x60 pending in IRR while 0xA0 is in service",
            "pending vectors delivered in priority order",
            "with TPR 0x60 only vector 0x75 is delivered",
            "lowering TPR releases 0x65 then 0x55",
        ]
        .iter()
        .map(|s| format!("{m}: {s}"))
        .collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert_passed_with(&o, &want);
    }
}

//! hv-vapic under real KVM: the APIC-access MSRs and exit-less EOI (KVM's PV-EOI semantics through the VP
//! assist page), with the exits per interrupt counted through enlighten's hyperv-testdev exit latch.

mod guest_common;
use guest_common::*;

const CPU: &str = "host,hv-vpindex,hv-synic,hv-time,hv-vapic";

/// Exits per interrupt from the guest's INFO line `exits for N interrupts: plain EOI P (...), exit-less EOI Q`.
fn exit_counts(stdout: &str) -> Option<(u64, u64, u64)> {
    let line = stdout.lines().find(|l| l.starts_with("INFO: exits for "))?;
    let num = |after: &str| -> Option<u64> {
        let rest = &line[line.find(after)? + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((
        num("exits for ")?,
        num("plain EOI ")?,
        num("exit-less EOI ")?,
    ))
}

#[test]
fn exit_less_eoi_halves_the_exits() {
    if under_qemu() {
        return; // the exit latch is an enlighten extension
    }
    for mode in ["x2apic", "xapic"] {
        let o = run_guest(
            "vapic_eoi",
            1,
            Some(&format!("mode={mode}")),
            &["-cpu", CPU, "-device", "hyperv-testdev"],
        );
        assert_passed_with(
            &o,
            &[
                "HV TPR MSR is the APIC TPR",
                "HV TPR MSR: bits 63:32 #GP",
                "exit latch: one latch + two reads = 3 exits",
                "HV EOI MSR: 75 interrupts, each EOI'd through 0x40000070",
                "enabling the VP assist page zeroes its first u32",
                "exit-less EOI: 300 interrupts, bit offered for 300",
                "the deferred EOIs were performed (ISR empty, PPR 0)",
                "exit-less EOI takes at most 60% of the exits of plain EOI",
                "with another vector requested, the first handler is not offered the bit; the last one is",
                "a lower-class vector waits for the deferred EOI (not auto-EOI)",
                "assist page disabled: no exit-less EOI offered",
            ],
        );
        let (n, plain, pv) = exit_counts(&o.stdout).expect("exit counts line");
        eprintln!("{mode}: {n} interrupts: plain EOI {plain} exits, exit-less EOI {pv} exits");
        assert_eq!(plain, 2 * n, "plain: one exit to raise + one EOI exit each");
        assert_eq!(pv, n, "exit-less: only the exit that raises each interrupt");
    }
}

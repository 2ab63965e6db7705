//! SynIC under real KVM with `-device hyperv-testdev` on 2 vCPUs: MSRs and reserved bits, all 16 SINTs with
//! auto-EOI and normal-EOI vectors mixed, PostMessage (testdev echo) to self and to the other VP with the
//! msg_pending/EOM and EOI redelivery rules, SignalEvent, and hostile input.

mod guest_common;
use guest_common::*;

const CPU: &str = "host,hv-vpindex,hv-synic,hv-time";

#[test]
fn synic_messages_events_and_sints() {
    for mode in ["x2apic", "xapic"] {
        let o = run_guest(
            "synic_basic",
            2,
            Some(&format!("mode={mode}")),
            &["-cpu", CPU, "-device", "hyperv-testdev"],
        );
        assert_passed_with(
            &o,
            &[
                "SVERSION reads 1",
                "SVERSION is read-only (#GP)",
                "every SINT starts masked (0x10000)",
                "unmasked SINT vector 15: #GP",
                "masked SINT vector 15 is accepted",
                "all 16 SINTs delivered 3 times each, auto-EOI (even) never in ISR, none lost or stuck",
                "a masked SINT raises nothing",
                "firing a destroyed route does nothing",
                "PostMessage to self: status 0, interrupt, echo in slot 2",
                "post to a full slot: SUCCESS, msg_pending set, no interrupt, old message kept",
                "a post while the echo waits: INSUFFICIENT_BUFFERS (13)",
                "redelivered after EOM: 240-byte payload, msg_pending cleared",
                "staging buffer free again after the redelivery",
                "busy slot redelivered after the EOI of its vector (3 interrupts)",
                "PostMessage to the other VP: its slot 2 and its interrupt only",
                "payload size 241: INVALID_HYPERCALL_INPUT (3)",
                "unknown connection: INVALID_CONNECTION_ID (12)",
                "destroyed connection: INVALID_CONNECTION_ID (12)",
                "SignalEvent: SUCCESS, flag 5 of slot 3 set, interrupt",
                "a second SignalEvent with the flag still set: no interrupt",
                "after the guest cleared the flag: interrupt again",
                "SignalEvent flag number 1: INVALID_PORT_ID",
                "post with SIMP outside RAM: SUCCESS, message dropped",
                "messages flow again after SIMP came back",
                "SignalEvent with SIEFP outside RAM: SUCCESS, dropped",
                "3000 EOM writes survived, messages still delivered",
                "bogus hyperv-testdev commands ignored, port reads 0",
            ],
        );
    }
}

/// Without `-device hyperv-testdev` the port ignores every command: no route, no echo connection.
#[test]
fn synic_without_testdev_port_is_inert() {
    if under_qemu() {
        return;
    }
    let o = run_guest("synic_basic", 2, None, &["-cpu", CPU]);
    assert!(!o.timed_out, "{}", o.describe());
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("FAIL: all 16 SINTs delivered")),
        "SINT routes worked without the device\n{}",
        o.describe()
    );
    assert!(
        o.stdout
            .contains("bogus hyperv-testdev commands ignored, port reads 0"),
        "{}",
        o.describe()
    );
    assert!(o.stderr_noise().is_empty(), "{}", o.describe());
}

/// The QEMU test-kernel command line: `-cpu host,hv_passthrough -smp 2 -device hyperv-testdev`. Every
/// enlightenment the host build offers is on, so the SynIC, stimer and exit-less EOI guests all run unchanged.
#[test]
fn synic_stimer_vapic_with_hv_passthrough() {
    let args = ["-cpu", "host,hv_passthrough", "-device", "hyperv-testdev"];
    let o = run_guest("synic_basic", 2, None, &args);
    assert_passed_with(
        &o,
        &[
            "all 16 SINTs delivered 3 times each",
            "PostMessage to the other VP: its slot 2 and its interrupt only",
            "SignalEvent: SUCCESS, flag 5 of slot 3 set, interrupt",
        ],
    );
    let o = run_guest("stimer_basic", 2, Some("seconds=3"), &args);
    assert_passed_with(
        &o,
        &[
            "direct periodic 2 ms: 10 interrupts",
            "periodic 1 ms: every expiration = start + k * period",
        ],
    );
    if !under_qemu() {
        let o = run_guest("vapic_eoi", 2, None, &args);
        assert_passed_with(
            &o,
            &["exit-less EOI takes at most 60% of the exits of plain EOI"],
        );
    }
}

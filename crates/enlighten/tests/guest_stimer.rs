//! Synthetic timers under real KVM: one-shot, periodic and auto-enable in message and direct mode, busy-slot
//! redelivery after EOM, and a 1 ms periodic timer over 1 s of reference time with its skipped periods counted.

mod guest_common;
use guest_common::*;

const CPU: &str = "host,hv-vpindex,hv-synic,hv-time,hv-stimer,hv-stimer-direct";

#[test]
fn stimers_message_and_direct_mode() {
    let o = run_guest("stimer_basic", 1, None, &["-cpu", CPU]);
    assert_passed_with(
        &o,
        &[
            "message one-shot: one HVMSG_TIMER_EXPIRED, 24-byte payload, expiration = COUNT",
            "a one-shot clears enable after expiry",
            "a one-shot deadline in the past expires immediately",
            "auto-enable: writing COUNT enables the timer, message from timer 1",
            "COUNT = 0 clears enable",
            "busy slot: msg_pending set, timer message redelivered after EOM",
            "the redelivered one-shot is done",
            "direct one-shot: vector a0 once, not before the deadline, no message",
            "direct one-shot clears enable",
            "direct periodic 2 ms: 10 interrupts, none before start + k * period",
            "direct auto-enable: COUNT write starts it",
            "periodic with a busy slot: ticks dropped without msg_pending, resume on the grid",
            "periodic 1 ms: first expiration = start + period",
            "periodic 1 ms: every expiration = start + k * period",
            "periodic 1 ms: k strictly increasing",
            "periodic 1 ms: delivery time >= expiration time",
            "periodic 1 ms: the last message is for period",
        ],
    );
    let info = o
        .stdout
        .lines()
        .find(|l| l.starts_with("INFO: periodic 1 ms over"))
        .unwrap_or_else(|| panic!("no skipped-period report\n{}", o.describe()));
    assert!(info.contains("periods skipped"), "{info}");
    eprintln!("{info}");
}

/// Without hv-stimer-direct the guest sees no direct mode and skips those checks; message mode still works.
#[test]
fn stimers_without_direct_mode() {
    let o = run_guest(
        "stimer_basic",
        1,
        Some("seconds=2"),
        &["-cpu", "host,hv-vpindex,hv-synic,hv-time,hv-stimer"],
    );
    assert_passed_with(
        &o,
        &[
            "message one-shot: one HVMSG_TIMER_EXPIRED",
            "periodic 1 ms: every expiration = start + k * period",
        ],
    );
    assert!(
        o.stdout.contains("SKIP: direct mode not advertised"),
        "{}",
        o.describe()
    );
}

//! Hyper-V crash (`-action panic=`) and RESET under real KVM (`guests/tests/hv_crash.c`, `hv_reset.c`).

mod guest_common;
use guest_common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CRASH_LINES: [&str; 2] = [
    "warning: Guest crashed",
    "warning: HV crash parameters: (0x1e 0xfffff80012345678 0 0x1 0xffffffffffffffff)",
];

fn crash_args(action: Option<&str>, append: Option<&str>) -> Vec<String> {
    let mut extra = vec!["-cpu", "host,hv-relaxed,hv-crash"];
    if let Some(a) = action {
        extra.extend(["-action", a]);
    }
    qemu_style_args(kernel("hv_crash"), 1, append, &extra)
}

fn assert_crash_reported(o: &Outcome) {
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines, CRASH_LINES, "{}", o.describe());
}

#[test]
fn crash_shutdown_and_exit_failure_end_the_vm() {
    // (-action, exit status): QEMU exits 0 for a guest-panic shutdown and 1 for exit-failure.
    let cases: &[(Option<&str>, i32)] = &[
        (None, 0),
        (Some("panic=shutdown"), 0),
        (Some("panic=exit-failure"), 1),
        (Some("reboot=reset,panic=shutdown"), 0),
    ];
    for &(action, status) in cases {
        let o = run_raw(&crash_args(action, None));
        assert!(!o.timed_out, "{}", o.describe());
        assert_eq!(o.status, Some(status), "{}", o.describe());
        assert_crash_reported(&o);
        assert!(o.stdout.contains("crash: notifying"), "{}", o.describe());
        assert!(o.failures().is_empty(), "{}", o.describe());
    }
}

#[test]
fn crash_none_lets_the_guest_continue() {
    let o = run_raw(&crash_args(Some("panic=none"), Some("continue=1")));
    assert_eq!(o.status, Some(1), "{}", o.describe());
    assert_crash_reported(&o);
    assert!(o.failures().is_empty(), "{}", o.describe());
    for want in [
        "PASS: the guest continues after the crash notification",
        "PASS: CRASH_P0..P4 keep their values",
    ] {
        assert!(o.stdout.contains(want), "{want}\n{}", o.describe());
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3 (index 0 here); utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[test]
fn crash_pause_keeps_the_process_alive_with_every_vcpu_stopped() {
    if under_qemu() {
        return; // needs the process id of enlighten itself
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(crash_args(Some("panic=pause"), None))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start enlighten");
    let pid = child.id();
    // The guest spins in a tight loop after the crash: a running vCPU would burn a whole core.
    let start = Instant::now();
    let mut paused_at = None;
    while start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the VMM exited after panic=pause"
        );
        if start.elapsed() > Duration::from_millis(1500) {
            paused_at = cpu_ticks(pid);
            break;
        }
    }
    let before = paused_at.expect("read /proc/PID/stat");
    std::thread::sleep(Duration::from_millis(1500));
    let after = cpu_ticks(pid).expect("read /proc/PID/stat");
    let alive = child.try_wait().expect("wait").is_none();
    let _ = child.kill();
    let out = child.wait_with_output().expect("collect output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(alive, "the VMM exited after panic=pause\n{stderr}");
    // 1.5 s of a spinning vCPU would be ~150 ticks; a stopped VM uses next to nothing.
    assert!(
        after - before < 30,
        "the VM kept running after panic=pause: {} CPU ticks in 1.5 s\n{stderr}",
        after - before
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines, CRASH_LINES);
}

const RESET_CPU: &str = "host,hv-relaxed,hv-vpindex,hv-time,hv-crash,hv-reset,hv-reenlightenment";

#[test]
fn reset_reboots_with_hyperv_state_cleared() {
    // Without --no-reboot: the guest runs again from its entry point.
    let args: Vec<String> = qemu_style_args(kernel("hv_reset"), 2, None, &["-cpu", RESET_CPU])
        .into_iter()
        .filter(|a| a != "--no-reboot")
        .collect();
    let o = run_raw(&args);
    assert_passed_with(
        &o,
        &[
            "first boot: GUEST_OS_ID and HYPERCALL read 0",
            "first boot: hypercalls work",
            "first boot: Hyper-V state set",
            "reference time continued across the reset",
            "GUEST_OS_ID reads 0 after the reset (0)",
            "HYPERCALL reads 0 after the reset (0)",
            "REFERENCE_TSC reads 0 after the reset (0)",
            "CRASH_P0 reads 0 after the reset (0)",
            "REENLIGHTENMENT_CONTROL reads 0 after the reset (0)",
            "every vCPU came back after the reset (2)",
            "hypercalls can be enabled again",
        ],
    );
    let first = o.stdout.find("first boot: writing RESET");
    let second = o.stdout.find("second boot:");
    assert!(
        matches!((first, second), (Some(f), Some(s)) if f < s),
        "{}",
        o.describe()
    );
}

#[test]
fn reset_with_no_reboot_exits() {
    let o = run_guest("hv_reset", 1, None, &["-cpu", RESET_CPU]);
    assert_eq!(o.status, Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("first boot: writing RESET") && !o.stdout.contains("second boot"),
        "{}",
        o.describe()
    );
    assert!(o.failures().is_empty(), "{}", o.describe());
    assert!(o.stderr_noise().is_empty(), "{}", o.describe());
}

#[test]
fn crash_without_hv_crash_logs_no_parameters() {
    // Without hv-crash the CRASH MSRs still work (KVM without hv-enforce-cpuid), but the panic carries no
    // Hyper-V information: QEMU then logs only "Guest crashed".
    let args = qemu_style_args(
        kernel("hv_crash"),
        1,
        None,
        &["-cpu", "host,hv-relaxed", "-action", "panic=shutdown"],
    );
    let o = run_raw(&args);
    assert_eq!(o.status, Some(0), "{}", o.describe());
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines, ["warning: Guest crashed"], "{}", o.describe());
}

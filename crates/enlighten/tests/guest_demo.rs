//! The demo guest: built into the binary (no -kernel) and also runnable as a plain kernel.

mod guest_common;
use guest_common::*;

fn check_demo_output(o: &Outcome, vcpus: u32) {
    assert!(!o.timed_out, "{}", o.describe());
    for s in [
        "enlighten demo guest",
        "CPU\n",
        "Hypervisor\n",
        "vCPUs\n",
        "Timer\n",
        "demo done",
    ] {
        assert!(o.stdout.contains(s), "missing {s:?}\n{}", o.describe());
    }
    let line = format!("vCPUs         {vcpus} (fw_cfg NB_CPUS {vcpus})");
    assert!(
        o.stdout.contains(&line),
        "missing {line:?}\n{}",
        o.describe()
    );
    assert!(
        o.stdout.contains("50 ticks of a 1 ms periodic timer"),
        "{}",
        o.describe()
    );
}

#[test]
fn demo_kernel_with_qemu_command_line() {
    let o = run_guest("demo", 2, None, &[]);
    check_demo_output(&o, 2);
    assert_eq!(o.status, Some(1), "{}", o.describe());
    assert!(o.stderr_noise().is_empty(), "{}", o.describe());
}

#[test]
fn builtin_demo_without_kernel() {
    if under_qemu() {
        eprintln!("skipped under QEMU (needs the built-in demo)");
        return;
    }
    let o = run_raw(&["-smp".to_owned(), "2".to_owned()]);
    check_demo_output(&o, 2);
    assert!(o.stderr_noise().is_empty(), "{}", o.describe());
}

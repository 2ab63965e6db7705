//! QMP integration tests: `tests/python/test_enlighten_qmp.py` drives this crate's `enlighten` binary,
//! booting the `qmp_idle` guest, with QEMU's own Python client (`qemu.qmp`) and `qmp-shell`.
//!
//! The interpreter is `python3`, or `$ENLIGHTEN_PYTHON`. It must have the `qemu.qmp` package
//! (`scripts/setup` installs `qemu.qmp==0.0.6`); without it every test here FAILS with a message
//! saying so (they are never skipped).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The scenarios share the 2 host cores with the other tests; running them one at a time keeps
/// their "the guest is stopped / runs" timing checks meaningful.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Upper bound for one scenario (each takes a few seconds; the script has its own timeouts).
const LIMIT: Duration = Duration::from_secs(90);

fn python() -> String {
    std::env::var("ENLIGHTEN_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn require_qemu_qmp(py: &str) {
    let out = Command::new(py)
        .args(["-c", "import qemu.qmp"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run the Python interpreter '{py}': {e}"));
    assert!(
        out.status.success(),
        "the Python package qemu.qmp is not available to '{py}': run scripts/setup (it installs \
         qemu.qmp==0.0.6 with pip) or set ENLIGHTEN_PYTHON to an interpreter that has it\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scenario(name: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let py = python();
    require_qemu_qmp(&py);
    let kernel = enlighten_guests::kernel_path("qmp_idle").expect("the qmp_idle guest is built");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/test_enlighten_qmp.py"
    );
    let mut child = Command::new(&py)
        .arg(script)
        .arg(name)
        .arg("--bin")
        .arg(env!("CARGO_BIN_EXE_enlighten"))
        .arg("--kernel")
        .arg(kernel)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {py} {script}: {e}"));
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break Some(status);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let report = format!(
        "scenario {name}: {status:?} after {:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}",
        start.elapsed()
    );
    let status = status.unwrap_or_else(|| panic!("timed out (killed)\n{report}"));
    assert!(status.success(), "{report}");
    assert!(
        out.contains(&format!("scenario {name}: all checks passed")),
        "{report}"
    );
}

/// -S/prelaunch, the queries (cpus with real vCPU thread ids), stop/cont/system_reset with their
/// events and effect on the guest, inject-nmi on both vCPUs, reset while paused, system_powerdown,
/// qmp-shell, quit (SHUTDOWN, exit 0, socket removed). `-chardev` + `-mon` spelling.
#[test]
fn qmp_control() {
    scenario("control");
}

/// Garbage, a 10 MB string, unknown commands, commands before negotiation and disconnects
/// mid-request on side connections; the guest keeps running and a `qemu.qmp` client is unaffected.
#[test]
fn qmp_bad_input() {
    scenario("abuse");
}

/// A guest writing the Hyper-V crash MSRs (-cpu host,hv-crash), default action: GUEST_PANICKED with
/// the five values in order, STOP, SHUTDOWN(guest-panic); exit 0.
#[test]
fn qmp_guest_panic_shutdown() {
    scenario("panic-shutdown");
}

/// `-action panic=pause`: GUEST_PANICKED(pause), STOP, status guest-panicked, the guest stays
/// stopped and the process alive until `cont`.
#[test]
fn qmp_guest_panic_pause() {
    scenario("panic-pause");
}

/// `-action panic=none`: GUEST_PANICKED(run) and the guest carries on.
#[test]
fn qmp_guest_panic_none() {
    scenario("panic-none");
}

/// `-action panic=exit-failure`: as shutdown, exit status 1.
#[test]
fn qmp_guest_panic_exit_failure() {
    scenario("panic-exit-failure");
}

/// A guest triple fault: RESET(guest-reset) and the guest boots again.
#[test]
fn qmp_guest_reset() {
    scenario("guest-reset");
}

/// `--no-reboot`: a guest triple fault becomes SHUTDOWN(guest-reset) and the process exits 0.
#[test]
fn qmp_no_reboot_guest_reset() {
    scenario("no-reboot-guest");
}

/// `--no-reboot`: `system_reset` becomes SHUTDOWN(host-qmp-system-reset) and the process exits 0.
#[test]
fn qmp_no_reboot_system_reset() {
    scenario("no-reboot-host");
}

/// The guest powers off: SHUTDOWN(guest-shutdown), exit 0.
#[test]
fn qmp_guest_poweroff() {
    scenario("poweroff");
}

/// `-qmp tcp:127.0.0.1:PORT,server=on,wait=off`.
#[test]
fn qmp_tcp() {
    scenario("tcp");
}

/// `-qmp unix:PATH,server=on` (QEMU's default wait=on): the VM starts once the first client connects.
#[test]
fn qmp_wait_for_client() {
    scenario("wait");
}

/// SIGTERM: SHUTDOWN(host-signal), exit 0, socket removed.
#[test]
fn qmp_sigterm() {
    scenario("sigterm");
}

/// SIGINT: SHUTDOWN(host-signal), exit 0, socket removed.
#[test]
fn qmp_sigint() {
    scenario("sigint");
}

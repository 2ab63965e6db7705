//! Shared helpers for the guest integration tests (`tests/guest_*.rs`): boot a guest program from
//! `enlighten-guests` with a QEMU-style command line, with a timeout, and check its result.
//!
//! Set `GUEST_TEST_VMM=qemu-system-x86_64` to run the same tests under QEMU (to validate the guests);
//! by default they run the `enlighten` binary built with this crate.

#![allow(dead_code)] // each test file uses a different subset

pub mod qmp;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Per-guest wall-clock limit; the child is killed after it and the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// What a guest run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The command line, for messages.
    pub command: String,
    /// Exit status code (`None` if killed by a signal or on timeout).
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl Outcome {
    /// A one-screen description for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {:?}{}\nelapsed: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            if self.timed_out {
                " (TIMED OUT, killed)"
            } else {
                ""
            },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }

    /// `PASS:` lines of the guest.
    pub fn passes(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("PASS: "))
            .collect()
    }

    /// `FAIL:` lines of the guest.
    pub fn failures(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with("FAIL: "))
            .collect()
    }

    /// stderr lines other than the CPU-model warnings QEMU itself prints for these command lines
    /// (`warning: host doesn't support requested feature: ...`, `... exceeds the recommended cpus ...`),
    /// which enlighten reproduces. Anything else on stderr counts as noise.
    pub fn stderr_noise(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !is_qemu_compatible_warning(l))
            .collect()
    }
}

/// The warnings QEMU prints for the command lines of these tests on this host.
fn is_qemu_compatible_warning(line: &str) -> bool {
    let line = line.strip_prefix("qemu-system-x86_64: ").unwrap_or(line);
    line.starts_with("warning: host doesn't support requested feature: ")
        || (line.starts_with("warning: Number of ")
            && line.contains("exceeds the recommended cpus"))
}

/// True if the tests run under QEMU (`GUEST_TEST_VMM`) rather than enlighten.
pub fn under_qemu() -> bool {
    vmm_program().contains("qemu")
}

fn vmm_program() -> String {
    std::env::var("GUEST_TEST_VMM").unwrap_or_else(|_| env!("CARGO_BIN_EXE_enlighten").to_owned())
}

/// The Multiboot image of guest program `name`.
pub fn kernel(name: &str) -> &'static str {
    enlighten_guests::kernel_path(name).unwrap_or_else(|| panic!("no guest program named {name:?}"))
}

/// The ELF64 image of guest program `name`.
pub fn kernel_elf64(name: &str) -> &'static str {
    enlighten_guests::elf64_path(name).unwrap_or_else(|| panic!("no guest program named {name:?}"))
}

/// One guest at a time per test binary: the guests measure time, and this machine has 2 cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the VMM with exactly `args` (no QEMU-style prefix).
pub fn run_raw(args: &[String]) -> Outcome {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let program = vmm_program();
    let command = format!("{program} {}", args.join(" "));
    let start = Instant::now();
    let mut child = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let (tx, rx) = mpsc::channel();
    let pipes: Vec<Box<dyn Read + Send>> = vec![
        Box::new(child.stdout.take().expect("stdout is piped")),
        Box::new(child.stderr.take().expect("stderr is piped")),
    ];
    let readers: Vec<_> = pipes
        .into_iter()
        .map(|mut pipe| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        })
        .collect();
    let waiter = thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    let _ = tx.send(());
                    return (status.code(), false);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let status = child.wait().ok().and_then(|s| s.code());
                    let _ = tx.send(());
                    return (status, true);
                }
            }
        }
    });
    let _ = rx.recv();
    let (status, timed_out) = waiter.join().expect("waiter thread");
    let elapsed = start.elapsed();
    let mut out = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = out.next().unwrap_or_default();
    let stderr = out.next().unwrap_or_default();
    Outcome {
        command,
        status,
        stdout,
        stderr,
        timed_out,
        elapsed,
    }
}

/// The QEMU-style command line that harnesses built around QEMU use.
pub fn qemu_style_args(
    kernel: &str,
    smp: u32,
    append: Option<&str>,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--no-reboot",
        "-nodefaults",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-machine",
        "accel=kvm",
        "-kernel",
        kernel,
        "-smp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(smp.to_string());
    if let Some(a) = append {
        args.push("-append".into());
        args.push(a.into());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Boots guest program `name` (Multiboot image) with `-smp smp`, `-append append` and `extra` options.
pub fn run_guest(name: &str, smp: u32, append: Option<&str>, extra: &[&str]) -> Outcome {
    run_raw(&qemu_style_args(kernel(name), smp, append, extra))
}

/// Asserts a passing guest run: exit status 1 (debug-exit code 0), at least one `PASS:` line, no `FAIL:`
/// line, a `SUMMARY:` with 0 failures, and nothing on stderr but QEMU's CPU-model warnings.
pub fn assert_passed(o: &Outcome) {
    assert!(!o.timed_out, "guest timed out\n{}", o.describe());
    assert_eq!(
        o.status,
        Some(1),
        "guest did not exit with status 1 (debug-exit code 0)\n{}",
        o.describe()
    );
    assert!(
        o.failures().is_empty(),
        "guest reported failures\n{}",
        o.describe()
    );
    assert!(
        !o.passes().is_empty(),
        "guest reported no PASS line\n{}",
        o.describe()
    );
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("SUMMARY:") && l.contains(" 0 failures")),
        "no clean SUMMARY line\n{}",
        o.describe()
    );
    assert!(
        o.stderr_noise().is_empty(),
        "unexpected stderr output\n{}",
        o.describe()
    );
}

/// Asserts that `o` passed and contains every line in `lines` among its `PASS:` lines (prefix match after
/// `PASS: `).
pub fn assert_passed_with(o: &Outcome, lines: &[&str]) {
    assert_passed(o);
    for want in lines {
        assert!(
            o.passes()
                .iter()
                .any(|l| l["PASS: ".len()..].starts_with(want)),
            "missing PASS line starting with {want:?}\n{}",
            o.describe()
        );
    }
}

//! Coarse sanity checks of what the benchmark suite (`bench/run`) relies on; no timing assertions.
//!
//! - `ENLIGHTEN_STATS=1` makes enlighten print `stats: run_ms=<ms> exits=<n0>,<n1>,...` on stderr at the end, one
//!   count per vCPU, and nothing without it.
//! - Reading reference time from the TSC page at CPL 3 causes no exit: two runs of the same guest that differ
//!   only in the number of page reads (10^3 vs 10^6) take exactly as many exits.

mod guest_common;
use guest_common::qemu_style_args;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CPU: &str = "host,hv-relaxed,hv-vapic,hv-time,hv-vpindex,hv-runtime,hv-frequencies";
const TIMEOUT: Duration = Duration::from_secs(120);

struct Run {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// The per-vCPU exit counts of the `stats:` line, if there is one.
    fn exits(&self) -> Option<Vec<u64>> {
        let line = self.stderr.lines().find(|l| l.starts_with("stats: "))?;
        let list = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("exits="))?;
        list.split(',').map(|n| n.parse().ok()).collect()
    }
}

fn run(program: &str, smp: u32, append: &str, stats: bool) -> Run {
    let kernel = enlighten_guests::kernel_path(program)
        .unwrap_or_else(|| panic!("no guest program named {program:?}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_enlighten"));
    cmd.args(qemu_style_args(kernel, smp, Some(append), &["-cpu", CPU]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("ENLIGHTEN_STATS");
    if stats {
        cmd.env("ENLIGHTEN_STATS", "1");
    }
    let child = cmd.spawn().expect("cannot start enlighten");
    let pid = child.id();
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(out) => break out.expect("waiting for enlighten"),
            Err(_) if start.elapsed() > TIMEOUT => {
                // Kill exactly the child we started.
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                panic!("{program} {append}: timed out");
            }
            Err(_) => {}
        }
    };
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn stats_line_has_one_count_per_vcpu_and_only_on_request() {
    for (smp, stats) in [(1, true), (2, true), (1, false)] {
        let r = run("hello", smp, "", stats);
        assert_eq!(r.status, Some(1), "{}", r.describe());
        match r.exits() {
            Some(exits) => {
                assert!(
                    stats,
                    "stats printed without ENLIGHTEN_STATS\n{}",
                    r.describe()
                );
                assert_eq!(exits.len(), smp as usize, "{}", r.describe());
                // The BSP at least printed its output through the serial port.
                assert!(exits[0] > 0, "{}", r.describe());
            }
            None => assert!(!stats, "no stats line\n{}", r.describe()),
        }
    }
}

#[test]
fn tsc_page_reads_at_cpl3_cause_no_exit() {
    let exits: Vec<u64> = [1_000u64, 1_000_000]
        .iter()
        .map(|n| {
            let r = run(
                "bench_exits",
                1,
                &format!("test=loop kind=tscpage n={n}"),
                true,
            );
            assert_eq!(r.status, Some(1), "{}", r.describe());
            assert!(
                r.stdout.contains("PASS: TSC page reads monotonic"),
                "{}",
                r.describe()
            );
            r.exits()
                .unwrap_or_else(|| panic!("no stats\n{}", r.describe()))[0]
        })
        .collect();
    assert_eq!(
        exits[0], exits[1],
        "999,000 more TSC-page reads changed the exit count"
    );
}

#[test]
fn each_cpl3_mmio_read_is_one_exit() {
    // The host-side floor of bench/run: exits grow by exactly one per bare MMIO read.
    let exits: Vec<u64> = [100u64, 1100]
        .iter()
        .map(|n| {
            let r = run(
                "bench_exits",
                1,
                &format!("test=loop kind=mmio3 n={n}"),
                true,
            );
            assert_eq!(r.status, Some(1), "{}", r.describe());
            r.exits()
                .unwrap_or_else(|| panic!("no stats\n{}", r.describe()))[0]
        })
        .collect();
    assert_eq!(exits[1] - exits[0], 1000);
}

//! Snapshot/restore and migration under real KVM (`docs/migration.md`): a 2-vCPU guest that checks
//! reference time continuously (`guests/tests/hv_reftime.c`: TSC page at CPL 3 and TIME_REF_COUNT, no backwards
//! step, page ≤ MSR ≤ page, 10 MHz against the TSC) is migrated mid-run with QMP `migrate` to a second
//! enlighten process, which finishes it. Also: the refusals (corrupt, truncated, version, config mismatch),
//! QEMU's blocker and `tsc-frequency=` rules.

mod guest_common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use guest_common::qmp::Qmp;
use guest_common::{assert_passed_with, kernel, qemu_style_args, run_raw, Outcome};
use serde_json::{json, Value};

const CPU: &str = "host,hv-relaxed,hv-vpindex,hv-time,hv-frequencies";
/// At least 4 s of reference time whatever the host's speed (the guest's round count alone took 0.5 s on an
/// idle host and 5 s on a loaded one): the migration happens in the middle.
const ROUNDS: &str = "rounds=300 min_ms=4000";

/// Sources run outside `run_raw`'s lock; keep them one at a time as well (2 host cores, timing checks).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enlighten-migr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

fn guest_args(cpu: &str, extra: &[&str]) -> Vec<String> {
    let mut e = vec!["-cpu", cpu];
    e.extend_from_slice(extra);
    qemu_style_args(kernel("hv_reftime"), 2, Some(ROUNDS), &e)
}

/// A running source with a QMP socket.
struct Source {
    child: Child,
    qmp: Qmp,
}

impl Source {
    fn start(cpu: &str, tag: &str) -> Source {
        let sock = scratch(&format!("{tag}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let spec = format!("unix:{},server=on,wait=off", sock.display());
        let args = guest_args(cpu, &["-qmp", &spec]);
        let child = Command::new(env!("CARGO_BIN_EXE_enlighten"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the source");
        let qmp = Qmp::connect(&sock);
        Source { child, qmp }
    }

    /// Kills a migrated source and checks that its guest had not finished yet, i.e. that the migration
    /// happened while the guest ran.
    fn kill_unfinished(self) {
        let (_, out, _) = self.finish(true);
        assert!(
            !out.contains("SUMMARY:"),
            "the source's guest finished before the migration:\n{out}"
        );
    }

    /// Kills the source and returns its output.
    fn finish(mut self, kill: bool) -> (Option<i32>, String, String) {
        if kill {
            let _ = self.child.kill();
        }
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s.code();
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, out, err)
    }
}

impl Drop for Source {
    /// A failed assertion must not leave a source behind (one in postmigrate never ends by itself).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn expected_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for cpu in 0..2 {
        // A PASS line: at least the requested rounds, and then at least min_ms of reference time.
        lines.push(format!("CPU {cpu} ran "));
        lines.push(format!("CPU {cpu}: reference time never stepped back (0"));
        lines.push(format!(
            "CPU {cpu}: page <= TIME_REF_COUNT <= page in every round (0 errors"
        ));
    }
    lines.push("reference time ran at 10 MHz against the TSC".to_string());
    lines
}

fn assert_guest_finished(o: &Outcome) {
    let lines = expected_lines();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_passed_with(o, &refs);
}

/// Runs a source for a moment, saves it to a file with QMP `migrate`, kills it; returns the file.
fn snapshot(tag: &str) -> PathBuf {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = scratch(&format!("{tag}.snap"));
    let mut src = Source::start(CPU, tag);
    std::thread::sleep(Duration::from_millis(1200));
    let q = src.qmp.migrate(&format!("file:{}", file.display()));
    assert_eq!(q["status"], "completed", "{q}");
    assert!(
        q["ram"]["duplicate"].as_u64().unwrap_or(0) > 0,
        "zero pages elided: {q}"
    );
    src.kill_unfinished();
    file
}

fn restore(file: &std::path::Path, extra: &[&str]) -> Outcome {
    let spec = format!("file:{}", file.display());
    let mut e = vec!["-incoming", spec.as_str()];
    e.extend_from_slice(extra);
    let mut args = guest_args(CPU, &[]);
    args.extend(e.iter().map(|s| s.to_string()));
    run_raw(&args)
}

#[test]
fn file_snapshot_restored_in_a_second_process_finishes_and_passes() {
    let file = snapshot("file");
    let o = restore(&file, &[]);
    assert_guest_finished(&o);
}

#[test]
fn live_migration_over_a_unix_socket() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = scratch("live.migr");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    let mut dst_args = guest_args(CPU, &[]);
    dst_args.push("-incoming".into());
    dst_args.push(spec.clone());
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    let mut src = Source::start(CPU, "live");
    // Wait for the destination's listener.
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(800));
    let q = src.qmp.migrate(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    src.kill_unfinished();
    let o = dst.join().expect("destination thread");
    assert_guest_finished(&o);
}

#[test]
fn damaged_and_mismatched_streams_are_refused_with_clear_errors() {
    let file = snapshot("refuse");
    let good = std::fs::read(&file).expect("read snapshot");
    let write = |name: &str, bytes: &[u8]| {
        let p = scratch(name);
        std::fs::write(&p, bytes).expect("write");
        p
    };
    let mut corrupt = good.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let mut version = good.clone();
    version[8..12].copy_from_slice(&99u32.to_le_bytes());
    let cases: Vec<(&str, PathBuf, Vec<&str>, &str)> = vec![
        (
            "corrupt",
            write("corrupt.snap", &corrupt),
            vec![],
            "corrupted migration stream: checksum mismatch",
        ),
        (
            "truncated",
            write("trunc.snap", &good[..good.len() / 3]),
            vec![],
            "truncated migration stream",
        ),
        (
            "version",
            write("version.snap", &version),
            vec![],
            "migration stream format version 99 is not supported",
        ),
        (
            "ram",
            file.clone(),
            vec!["-m", "256"],
            "RAM size: the stream has 134217728 bytes (128 MiB), this VM has 268435456 bytes (256 MiB)",
        ),
        (
            "vcpus",
            file.clone(),
            vec!["-smp", "3"],
            "vCPU count: the stream has 2, this VM has 3",
        ),
        (
            "enlightenments",
            file.clone(),
            vec!["-cpu", "host,hv-relaxed,hv-vpindex,hv-time"],
            "Hyper-V features",
        ),
        (
            "not a stream",
            write("garbage.snap", b"hello world, not a stream"),
            vec![],
            "not an enlighten migration stream",
        ),
    ];
    for (what, path, extra, fragment) in cases {
        let o = restore(&path, &extra);
        assert_eq!(o.status, Some(1), "{what}: exit status\n{}", o.describe());
        assert!(
            o.stderr.contains(fragment) && o.stderr.contains("load of migration failed"),
            "{what}: expected {fragment:?}\n{}",
            o.describe()
        );
        assert!(
            !o.stderr.contains("panicked"),
            "{what}: panic\n{}",
            o.describe()
        );
        assert!(
            o.passes().is_empty(),
            "{what}: the guest ran\n{}",
            o.describe()
        );
    }
}

#[test]
fn blockers_refuse_migrate_with_qemus_text_and_the_source_continues() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cases: &[(&str, &str, bool)] = &[
        (
            "host,hv-passthrough",
            "'hv-passthrough' CPU flag prevents migration, use explicit set of hv-* flags instead",
            true,
        ),
        (
            "host,hv-relaxed,hv-vpindex,hv-time,hv-frequencies,hv-no-nonarch-coresharing=auto",
            "'hv-no-nonarch-coresharing=auto' CPU flag prevents migration use explicit \
             'hv-no-nonarch-coresharing=on' instead (but make sure SMT is disabled and/or that vCPUs are \
             properly pinned)",
            false,
        ),
        (
            "host,hv-relaxed,hv-vpindex,hv-time,hv-frequencies,invtsc",
            "State blocked by non-migratable CPU device (invtsc flag)",
            false,
        ),
    ];
    for (i, (cpu, text, wait_for_guest)) in cases.iter().enumerate() {
        let mut src = Source::start(cpu, &format!("blocked{i}"));
        let r = src.qmp.cmd(
            "migrate",
            json!({"uri": format!("file:{}", scratch("blocked.snap").display())}),
        );
        assert_eq!(r["error"]["desc"], *text, "{cpu}: {r}");
        assert_eq!(r["error"]["class"], "GenericError");
        let (status, out, err) = src.finish(!wait_for_guest);
        if *wait_for_guest {
            assert_eq!(
                status,
                Some(1),
                "the source finishes its guest\n{out}\n{err}"
            );
            assert!(
                out.lines()
                    .any(|l| l.starts_with("SUMMARY:") && l.contains(" 0 failures")),
                "{out}\n{err}"
            );
        }
    }
}

#[test]
fn tsc_frequency_other_than_the_hosts_is_refused_at_creation() {
    let o = run_raw(&qemu_style_args(
        kernel("hv_reftime"),
        1,
        None,
        &["-cpu", "host,tsc-frequency=1000000"],
    ));
    assert_eq!(o.status, Some(1), "{}", o.describe());
    assert!(
        o.stderr
            .contains("TSC frequency mismatch between VM (1000 kHz) and host (")
            && o.stderr.contains("kHz), and TSC scaling unavailable"),
        "{}",
        o.describe()
    );
}

#[test]
fn reenlightenment_without_tsc_frequency_fails_at_the_destination_and_the_source_resumes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = "host,hv-relaxed,hv-vpindex,hv-time,hv-frequencies,hv-reenlightenment";
    let sock = scratch("reenl.migr");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    let dst_args = qemu_style_args(
        kernel("migr_reenl"),
        1,
        None,
        &["-cpu", cpu, "-incoming", &spec],
    );
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    let qsock = scratch("reenl.qmp");
    let _ = std::fs::remove_file(&qsock);
    let qspec = format!("unix:{},server=on,wait=off", qsock.display());
    let child = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(qemu_style_args(
            kernel("migr_reenl"),
            1,
            None,
            &["-cpu", cpu, "-qmp", &qspec],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source");
    let mut src = Source {
        child,
        qmp: Qmp::connect(&qsock),
    };
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let q = src.qmp.migrate(&spec);
    assert_eq!(q["status"], "failed", "{q}");
    let text = "Guest enabled re-enlightenment notifications, 'tsc-frequency=' has to be specified";
    assert!(q["error-desc"].as_str().unwrap_or("").contains(text), "{q}");
    let o = dst.join().expect("destination thread");
    assert_eq!(o.status, Some(1), "{}", o.describe());
    assert!(o.stderr.contains(text), "{}", o.describe());
    // The source resumed and finishes its guest.
    let (status, out, err) = src.finish(false);
    assert_eq!(status, Some(1), "{out}\n{err}");
    assert!(
        out.contains("PASS: reference time never stepped back")
            && out
                .lines()
                .any(|l| l.starts_with("SUMMARY:") && l.contains(" 0 failures")),
        "{out}\n{err}"
    );
}

#[test]
fn live_migration_over_tcp() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A free port: bind, read it, release it for the destination.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let spec = format!("tcp:127.0.0.1:{port}");
    let mut dst_args = guest_args(CPU, &[]);
    dst_args.push("-incoming".into());
    dst_args.push(spec.clone());
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    let mut src = Source::start(CPU, "tcp");
    std::thread::sleep(Duration::from_millis(800));
    let q = src.qmp.migrate_when_listening(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    src.kill_unfinished();
    let o = dst.join().expect("destination thread");
    assert_guest_finished(&o);
}

#[test]
fn a_destination_that_dies_mid_stream_leaves_the_source_running() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // A destination that accepts, reads part of the stream and dies (its socket closes), and one that is an
    // `exec:` command reading only the header.
    let sock = scratch("dies.migr");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("listen");
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        let _ = s.read_exact(&mut buf);
        // Dropped here: the "destination" is gone mid-stream.
    });
    let mut src = Source::start(CPU, "dies");
    std::thread::sleep(Duration::from_millis(800));
    let q = src.qmp.migrate(&format!("unix:{}", sock.display()));
    fake.join().expect("fake destination");
    assert_eq!(q["status"], "failed", "{q}");
    let q = src.qmp.migrate("exec:head -c 100 >/dev/null");
    assert_eq!(q["status"], "failed", "{q}");
    let st = src.qmp.cmd("query-status", json!({}));
    assert_eq!(st["return"]["running"], true, "{st}");
    // The guest carries on and passes, with reference time never stepping back.
    let (status, out, err) = src.finish(false);
    let o = Outcome {
        command: "source".into(),
        status,
        stdout: out,
        stderr: String::new(),
        timed_out: false,
        elapsed: Duration::ZERO,
    };
    assert!(
        err.contains("error: migration failed"),
        "the failures are reported on stderr: {err}"
    );
    assert_guest_finished(&o);
}

#[test]
fn incoming_defer_then_migrate_incoming() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = scratch("defer.migr");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    let dqmp = scratch("defer-dst.qmp");
    let _ = std::fs::remove_file(&dqmp);
    let mut dst_args = guest_args(CPU, &[]);
    for a in [
        "-incoming".to_string(),
        "defer".to_string(),
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", dqmp.display()),
    ] {
        dst_args.push(a);
    }
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    let mut dq = Qmp::connect(&dqmp);
    let st = dq.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "inmigrate", "{st}");
    let r = dq.cmd("migrate", json!({"uri": "exec:cat >/dev/null"}));
    assert_eq!(
        r["error"]["desc"], "Guest is waiting for an incoming migration",
        "{r}"
    );
    let r = dq.cmd("migrate-incoming", json!({ "uri": spec }));
    assert!(r.get("return").is_some(), "{r}");
    let r = dq.cmd("migrate-incoming", json!({ "uri": spec }));
    assert_eq!(
        r["error"]["desc"], "'-incoming' was not specified on the command line",
        "a second migrate-incoming: {r}"
    );
    let mut src = Source::start(CPU, "defer-src");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let q = src.qmp.migrate(&format!("unix:{}", sock.display()));
    assert_eq!(q["status"], "completed", "{q}");
    // The destination runs once loaded (no -S: QEMU's autostart), with a RESUME event.
    let st = status_after_load(&mut dq);
    assert_eq!(st["return"]["status"], "running", "{st}");
    assert!(
        dq.events.iter().any(|(n, _)| n == "RESUME"),
        "{:?}",
        dq.events
    );
    // QEMU's destination reports only the status.
    let q = dq.cmd("query-migrate", json!({}));
    assert_eq!(q["return"], json!({"status": "completed"}), "{q}");
    src.kill_unfinished();
    let o = dst.join().expect("destination thread");
    assert_guest_finished(&o);
}

/// `guests/tests/migr_stimer.c` (2 vCPUs, 4 s of reference time) with its SynIC message exchange through
/// hyperv-testdev.
fn stimer_args(extra: &[&str]) -> Vec<String> {
    let mut e = vec![
        "-cpu",
        "host,hv-vpindex,hv-synic,hv-time,hv-stimer,hv-stimer-direct",
        "-device",
        "hyperv-testdev",
    ];
    e.extend_from_slice(extra);
    qemu_style_args(kernel("migr_stimer"), 2, Some("tenths=40"), &e)
}

/// migr_stimer's line for the message exchange, a PASS only if every post succeeded and every echo arrived
/// once, in order (none lost).
const STIMER_MESSAGES_LINE: &str = "SynIC messages: ";

#[test]
fn a_periodic_stimer_keeps_its_phase_across_migration() {
    // guests/tests/migr_stimer.c: a 1 ms periodic timer in message mode over 4 s of reference time, migrated in
    // the middle (over a Unix socket, 2 vCPUs). Every expiration must still be start + k * period with k
    // strictly increasing, delivery >= expiration, and reference time never steps back. A SynIC message
    // exchange through hyperv-testdev runs meanwhile: no message is lost.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = scratch("stimer.migr");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    let args = stimer_args;
    let qsock = scratch("stimer.qmp");
    let _ = std::fs::remove_file(&qsock);
    let qspec = format!("unix:{},server=on,wait=off", qsock.display());
    let child = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(args(&["-qmp", &qspec]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source");
    let mut src = Source {
        child,
        qmp: Qmp::connect(&qsock),
    };
    std::thread::sleep(Duration::from_millis(1000));
    let dst_args = args(&["-incoming", &spec]);
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let q = src.qmp.migrate(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    src.kill_unfinished();
    let o = dst.join().expect("destination thread");
    assert_passed_with(
        &o,
        &[
            "periodic 1 ms: every expiration = start + k * period",
            "periodic 1 ms: k strictly increasing",
            "periodic 1 ms: delivery time >= expiration time",
            "periodic 1 ms: the last message is for period",
            "reference time never stepped back (0",
            STIMER_MESSAGES_LINE,
        ],
    );
}

#[test]
fn cli_snapshot_and_restore() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = scratch("cli.snap");
    let src = Source::start(CPU, "cli");
    std::thread::sleep(Duration::from_millis(1200));
    let qmp = format!("unix:{}", scratch("cli.qmp").display());
    let out = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(["snapshot", "-qmp", &qmp])
        .arg(&file)
        .output()
        .expect("run enlighten snapshot");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("100% 128/128 MiB") && err.contains("snapshot written to"),
        "{err}"
    );
    src.kill_unfinished();
    let mut args = vec!["restore".to_string(), file.display().to_string()];
    args.extend(guest_args(CPU, &[]));
    let o = run_raw(&args);
    assert_guest_finished(&o);
    let bad = run_raw(&["snapshot".to_string()]);
    assert_eq!(bad.status, Some(1));
    assert!(
        bad.stderr.contains("usage: enlighten snapshot"),
        "{}",
        bad.describe()
    );
}

/// Two network namespaces joined by a veth pair, as two hosts (10.77.P.1 and 10.77.P.2); removed on drop.
struct TwoHosts {
    a: String,
    b: String,
}

impl TwoHosts {
    fn new() -> Result<TwoHosts, String> {
        let tag = std::process::id() % 250;
        let h = TwoHosts {
            a: format!("enl-migr-a-{}", std::process::id()),
            b: format!("enl-migr-b-{}", std::process::id()),
        };
        let va = format!("emva{tag}");
        let vb = format!("emvb{tag}");
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        ip(&["netns", "add", &h.a])?;
        ip(&["netns", "add", &h.b])?;
        ip(&[
            "link", "add", &va, "netns", &h.a, "type", "veth", "peer", "name", &vb, "netns", &h.b,
        ])?;
        let addr_a = format!("10.77.{tag}.1/24");
        let addr_b = format!("10.77.{tag}.2/24");
        ip(&["-n", &h.a, "addr", "add", &addr_a, "dev", &va])?;
        ip(&["-n", &h.b, "addr", "add", &addr_b, "dev", &vb])?;
        for (ns, dev) in [(&h.a, &va), (&h.b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    fn addr_b(&self) -> String {
        format!("10.77.{}.2", std::process::id() % 250)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn live_migration_over_tcp_between_two_network_namespaces() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let hosts = TwoHosts::new().unwrap_or_else(|e| {
        panic!("cannot set up two network namespaces (needs root and iproute2): {e}")
    });
    let spec = format!("tcp:{}:4444", hosts.addr_b());
    // Destination on "host B" (it is killed after 60 s if nobody connects).
    let mut dst_args = vec![
        "netns".to_string(),
        "exec".to_string(),
        hosts.b.clone(),
        // Never outlive the test, even when the migration fails and nobody connects.
        "timeout".to_string(),
        "60".to_string(),
        env!("CARGO_BIN_EXE_enlighten").to_string(),
    ];
    dst_args.extend(stimer_args(&["-incoming", &spec]));
    let dst = std::thread::spawn(move || {
        let out = Command::new("ip")
            .args(&dst_args)
            .output()
            .expect("run the destination");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    // Source on "host A" (its QMP socket is a file, shared by both namespaces).
    let sock = scratch("netns.qmp");
    let _ = std::fs::remove_file(&sock);
    let qspec = format!("unix:{},server=on,wait=off", sock.display());
    let mut src_args = vec![
        "netns".to_string(),
        "exec".to_string(),
        hosts.a.clone(),
        env!("CARGO_BIN_EXE_enlighten").to_string(),
    ];
    src_args.extend(stimer_args(&["-qmp", &qspec]));
    let child = Command::new("ip")
        .args(&src_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the source");
    let mut src = Source {
        child,
        qmp: Qmp::connect(&sock),
    };
    std::thread::sleep(Duration::from_millis(800));
    let q = src.qmp.migrate_when_listening(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    src.kill_unfinished();
    let (status, stdout, stderr) = dst.join().expect("destination thread");
    let o = Outcome {
        command: "ip netns exec B enlighten -incoming tcp:...".into(),
        status,
        stdout,
        stderr,
        timed_out: false,
        elapsed: Duration::ZERO,
    };
    // migr_stimer: the stimer keeps its phase, time never steps back, no SynIC message is lost.
    assert_passed_with(
        &o,
        &[
            "periodic 1 ms: every expiration = start + k * period",
            "reference time never stepped back (0",
            STIMER_MESSAGES_LINE,
        ],
    );
    drop(hosts);
}

/// A source running `guests/tests/migr_dirty.c` (1 vCPU) with QMP, its serial output collected by a thread so
/// that the test can wait for the guest's "dirtying" line.
struct DirtySource {
    child: Child,
    qmp: Qmp,
    stdout: std::sync::mpsc::Receiver<String>,
    lines: Vec<String>,
}

const DIRTY_CPU: &str = "host,hv-relaxed,hv-vpindex,hv-time";

/// The command line of a source or destination running guest program `guest` (1 vCPU, [`DIRTY_CPU`]).
fn guest_dirty_args(guest: &str, append: &str, extra: &[&str]) -> Vec<String> {
    let mut e = vec!["-cpu", DIRTY_CPU];
    e.extend_from_slice(extra);
    qemu_style_args(kernel(guest), 1, Some(append), &e)
}

impl DirtySource {
    fn start(tag: &str, append: &str) -> DirtySource {
        Self::start_guest("migr_dirty", tag, append, &[])
    }

    /// [`DirtySource::start`] with another guest program and more options.
    fn start_guest(guest: &str, tag: &str, append: &str, extra: &[&str]) -> DirtySource {
        let sock = scratch(&format!("{tag}.qmp"));
        let _ = std::fs::remove_file(&sock);
        let spec = format!("unix:{},server=on,wait=off", sock.display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_enlighten"))
            .args(guest_dirty_args(
                guest,
                append,
                &[&["-qmp", spec.as_str()], extra].concat(),
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the source");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let qmp = Qmp::connect(&sock);
        DirtySource {
            child,
            qmp,
            stdout: rx,
            lines: Vec::new(),
        }
    }

    /// Waits for a serial line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.stdout.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    let hit = l.starts_with(prefix);
                    self.lines.push(l);
                    if hit {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        panic!("no '{prefix}' line from the guest: {:?}", self.lines);
    }

    /// Waits for the source to end and returns its outcome (serial output as stdout).
    fn finish(&mut self) -> Outcome {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s.code();
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        self.lines.extend(self.stdout.iter());
        Outcome {
            command: "source".into(),
            status,
            stdout: self.lines.join("\n"),
            stderr: err,
            timed_out: false,
            elapsed: start.elapsed(),
        }
    }
}

impl Drop for DirtySource {
    /// A failed assertion must not leave a source behind (one in postmigrate never ends by itself). When a
    /// test fails, the source's exit status, serial output and stderr are printed: they say why it ended.
    fn drop(&mut self) {
        let running = matches!(self.child.try_wait(), Ok(None));
        if running {
            let _ = self.child.kill();
        }
        let status = self.child.wait();
        if std::thread::panicking() {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            self.lines.extend(self.stdout.try_iter());
            eprintln!(
                "--- source ({}: {status:?}) serial ---\n{}\n--- source stderr ---\n{err}",
                if running {
                    "killed by the test"
                } else {
                    "had ended"
                },
                self.lines.join("\n")
            );
        }
    }
}

/// The MIGRATION_PASS numbers among `events`, in order.
fn passes(events: &[(String, Value)]) -> Vec<u64> {
    events
        .iter()
        .filter(|(n, _)| n == "MIGRATION_PASS")
        .filter_map(|(_, d)| d["pass"].as_u64())
        .collect()
}

fn event_names(events: &[(String, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(n, d)| match d["status"].as_str() {
            Some(s) => format!("{n} {s}"),
            None => n.clone(),
        })
        .collect()
}

/// A `migr_dirty` destination listening on a Unix socket, with a QMP socket; returns the migration URI, its
/// QMP client and the thread that waits for its outcome. `extra`: more options (e.g. `-S`).
fn dirty_destination(
    tag: &str,
    append: &str,
    extra: &[&str],
) -> (String, Qmp, std::thread::JoinHandle<Outcome>) {
    guest_destination("migr_dirty", tag, append, extra)
}

/// [`dirty_destination`] with another guest program.
fn guest_destination(
    guest: &str,
    tag: &str,
    append: &str,
    extra: &[&str],
) -> (String, Qmp, std::thread::JoinHandle<Outcome>) {
    let sock = scratch(&format!("{tag}.migr"));
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{}", sock.display());
    let dqmp = scratch(&format!("{tag}-dst.qmp"));
    let _ = std::fs::remove_file(&dqmp);
    let dspec = format!("unix:{},server=on,wait=off", dqmp.display());
    let mut e = vec!["-incoming", &spec, "-qmp", &dspec];
    e.extend_from_slice(extra);
    let dst_args = guest_dirty_args(guest, append, &e);
    let dst = std::thread::spawn(move || run_raw(&dst_args));
    (spec, Qmp::connect(&dqmp), dst)
}

/// Polls a destination's `query-status` until it has left `inmigrate` (or 10 s passed); returns the reply.
fn status_after_load(dq: &mut Qmp) -> Value {
    let start = Instant::now();
    loop {
        let st = dq.cmd("query-status", json!({}));
        if st["return"]["status"] != "inmigrate" || start.elapsed() > Duration::from_secs(10) {
            return st;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

const DIRTY_PASS_LINES: &[&str] = &[
    "every page kept its last write (",
    "reference time never stepped back (0",
];

#[test]
fn live_precopy_iterates_while_the_guest_dirties_memory_then_postmigrate_and_cont() {
    // migr_dirty rewrites 64 pages over and over. With a downtime limit of 0 ms pre-copy never converges, so
    // it runs MAX_SYNCS dirty syncs, resending the guest's pages each pass, then stops and copies. The
    // destination must see every page's last write; the source is left in postmigrate and `cont` resumes it.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let append = "pages=64 ms=4000";
    // The destination has -S: once loaded it stays paused (QEMU's autostart rule) until `cont`.
    let (spec, mut dq, dst) = dirty_destination("dirty", append, &["-S"]);
    let sock = PathBuf::from(spec.trim_start_matches("unix:"));
    let mut src = DirtySource::start("dirty", append);
    src.qmp.enable_events();
    src.wait_line("dirtying 64 pages");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // 4 MiB/s: a pass of the guest's 256 KiB takes about 60 ms, long enough for the guest to dirty its pages
    // again even on a loaded host (a pass that finds nothing dirty would meet even a 0 ms limit).
    let r = src.qmp.cmd(
        "migrate-set-parameters",
        json!({"downtime-limit": 0, "max-bandwidth": 4 << 20}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let p = src.qmp.cmd("query-migrate-parameters", json!({}));
    assert_eq!(p["return"]["downtime-limit"], 0, "{p}");
    assert_eq!(p["return"]["max-bandwidth"], 4 << 20, "{p}");
    let q = src.qmp.migrate(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    // Normally 30 syncs while the guest runs (MAX_SYNCS) and one more with the vCPUs stopped; fewer only if
    // a pass found nothing dirty (a guest stalled by the host for a whole pass), which meets a 0 ms limit.
    let syncs = q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    assert!((4..=31).contains(&syncs), "{q}");
    let st = src.qmp.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "postmigrate", "{st}");
    assert_eq!(st["return"]["running"], false, "{st}");
    let events = src.qmp.events.clone();
    assert_eq!(
        passes(&events),
        (1..=syncs).collect::<Vec<u64>>(),
        "{events:?}"
    );
    let names = event_names(&events);
    let stop = names.iter().position(|n| n == "STOP");
    let done = names.iter().position(|n| n == "MIGRATION completed");
    assert!(
        stop.is_some() && stop < done,
        "STOP before MIGRATION completed: {names:?}"
    );
    // The guest's pages went more than once (pass 1, then resent as the guest dirtied them).
    let normal = q["ram"]["normal"].as_u64().unwrap_or(0);
    assert!(normal > 2 * 64, "pages resent: {q}");
    eprintln!(
        "live pre-copy: {syncs} dirty syncs, {normal} pages sent, downtime {} ms",
        q["downtime"]
    );
    assert!(q["downtime"].as_u64().is_some(), "{q}");
    assert!(q["ram"]["precopy-bytes"].as_u64().unwrap_or(0) > 0, "{q}");
    // postmigrate -> running.
    let r = src.qmp.cmd("cont", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let st = src.qmp.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "running", "{st}");
    // The destination: inmigrate until loaded, then paused (-S) until `cont`.
    let st = status_after_load(&mut dq);
    assert_eq!(st["return"]["status"], "paused", "{st}");
    let r = dq.cmd("cont", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let st = dq.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "running", "{st}");
    let o = dst.join().expect("destination thread");
    assert_passed_with(&o, DIRTY_PASS_LINES);
    // The source's guest carries on after `cont` and passes too.
    let s = src.finish();
    assert_passed_with(&s, DIRTY_PASS_LINES);
}

#[test]
fn a_paused_source_gives_a_paused_destination() {
    // QEMU's global state: a destination without -S runs after the load only if the source's guest was
    // running when the migration stopped it. Here the source is paused with `stop` before `migrate`.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let append = "pages=16 ms=1500";
    let (spec, mut dq, dst) = dirty_destination("paused", append, &[]);
    let mut src = DirtySource::start("paused", append);
    src.wait_line("dirtying 16 pages");
    let r = src.qmp.cmd("stop", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let q = src.qmp.migrate_when_listening(&spec);
    assert_eq!(q["status"], "completed", "{q}");
    let st = src.qmp.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "postmigrate", "{st}");
    let st = status_after_load(&mut dq);
    assert_eq!(st["return"]["status"], "paused", "{st}");
    assert!(
        !dq.events.iter().any(|(n, _)| n == "RESUME"),
        "no RESUME on the destination: {:?}",
        dq.events
    );
    let r = dq.cmd("cont", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let o = dst.join().expect("destination thread");
    assert_passed_with(&o, DIRTY_PASS_LINES);
    let r = src.qmp.cmd("quit", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let _ = src.finish();
}

#[test]
fn max_bandwidth_is_honoured_and_migrate_cancel_resumes_the_source() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = DirtySource::start("bw", "pages=512 ms=4000");
    src.qmp.enable_events();
    src.wait_line("dirtying 512 pages");
    let file = scratch("bw.snap");
    // 1 MiB/s: pass 1 alone (more than 2 MiB) takes over 2 s; cancel it after 300 ms.
    let r = src
        .qmp
        .cmd("migrate-set-parameters", json!({"max-bandwidth": 1 << 20}));
    assert!(r.get("return").is_some(), "{r}");
    let r = src.qmp.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert!(r.get("return").is_some(), "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let q = src.qmp.cmd("query-migrate", json!({}));
    assert_eq!(q["return"]["status"], "active", "{q}");
    assert!(q["return"]["expected-downtime"].is_u64(), "{q}");
    let r = src.qmp.cmd("migrate_cancel", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let start = Instant::now();
    let q = loop {
        let q = src.qmp.cmd("query-migrate", json!({}));
        if q["return"]["status"] == "cancelled" || start.elapsed() > Duration::from_secs(10) {
            break q;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(q["return"]["status"], "cancelled", "{q}");
    let st = src.qmp.cmd("query-status", json!({}));
    assert_eq!(st["return"]["status"], "running", "{st}");
    let names = event_names(&src.qmp.events);
    assert!(
        names.contains(&"MIGRATION cancelling".to_string())
            && names.contains(&"MIGRATION cancelled".to_string())
            && !names.contains(&"STOP".to_string()),
        "{names:?}"
    );
    // 4 MiB/s: the pre-copy bytes cannot go faster than that. The guest keeps 2 MiB dirty, half a second at
    // that rate, so the downtime limit must allow that much for pre-copy to converge (QEMU's estimate).
    let bw: u64 = 4 << 20;
    let r = src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": bw, "downtime-limit": 2000}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let q = src.qmp.migrate(&format!("file:{}", file.display()));
    assert_eq!(q["status"], "completed", "{q}");
    let precopy = q["ram"]["precopy-bytes"].as_u64().unwrap_or(0);
    let total_ms = q["total-time"].as_u64().unwrap_or(0);
    assert!(precopy > 2 << 20, "{q}");
    let min_ms = precopy * 1000 / bw * 8 / 10;
    assert!(
        total_ms >= min_ms,
        "{precopy} bytes at {bw} bytes/s in {total_ms} ms (at least {min_ms} ms): {q}"
    );
    let r = src.qmp.cmd("cont", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let s = src.finish();
    assert_passed_with(&s, DIRTY_PASS_LINES);
}

/// `migr_dirty` settings for auto-converge: 512 pages (2 MiB) rewritten by a CPU-bound loop for 15 s of reference time.
const BUSY_APPEND: &str = "pages=512 spin=100 ms=15000";
/// 16 MiB of RAM: a short pass 1, so that the test spends its time in the passes auto-converge acts on.
const BUSY_EXTRA: &[&str] = &["-m", "16"];
const BUSY_PASS_LINES: &[&str] = &[
    "every page kept its last write (",
    "reference time never stepped back (0",
];

#[test]
fn auto_converge_throttles_a_guest_that_dirties_memory_faster_than_the_link() {
    // migr_dirty with spin= dirties its 2 MiB at a rate R proportional to the CPU time it gets; the link is limited to half
    // of R. Without throttling, pre-copy never converges (every pass finds the whole working set dirty again:
    // MAX_SYNCS passes, then a stop). With auto-converge, the vCPU is throttled at 50 % after two periods that
    // dirtied more than half of what they sent, then at 75 %, 99 %...: the dirty rate falls below the link's and
    // pre-copy converges within the downtime limit, well before MAX_SYNCS.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (spec, _dq, dst) = guest_destination("migr_dirty", "busy", BUSY_APPEND, BUSY_EXTRA);
    let sock = PathBuf::from(spec.trim_start_matches("unix:"));
    let mut src = DirtySource::start_guest("migr_dirty", "busy", BUSY_APPEND, BUSY_EXTRA);
    // Capabilities: QEMU's defaults (all off), QEMU's names; unsupported ones refused, nothing half-applied.
    let caps = src.qmp.cmd("query-migrate-capabilities", json!({}));
    let list = caps["return"].as_array().cloned().unwrap_or_default();
    assert!(list.len() >= 20, "{caps}");
    assert!(list.iter().all(|c| c["state"] == false), "{caps}");
    let r = src.qmp.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true},
                                {"capability": "xbzrle", "state": true}]}),
    );
    assert_eq!(
        r["error"]["desc"], "Migration capability 'xbzrle' is not supported by enlighten",
        "{r}"
    );
    let caps = src.qmp.cmd("query-migrate-capabilities", json!({}));
    assert!(
        caps["return"]
            .as_array()
            .is_some_and(|l| l.iter().all(|c| c["state"] == false)),
        "{caps}"
    );
    let r = src.qmp.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    assert!(r.get("return").is_some(), "{r}");
    // Parameters: QEMU's range errors, then a faster ramp than QEMU's default 20 % + 10 % (the test's time).
    let r = src.qmp.cmd(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 100}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
        "{r}"
    );
    let line = {
        src.wait_line("dirtying 512 pages at ");
        src.lines.last().cloned().unwrap_or_default()
    };
    let rate: u64 = line
        .rsplit_once(" at ")
        .and_then(|(_, r)| r.trim_end_matches(" pages/s").parse().ok())
        .unwrap_or_else(|| panic!("no rate in {line:?}"));
    assert!(rate > 0, "{line}");
    let bandwidth = (rate * 4096 / 2).max(64 * 1024);
    // A 50 ms downtime limit: about 44 dirty pages at the end of a pass (at half the guest's rate a pass of its
    // 2 MiB takes about 0.6 s of link time), so the guest must be slowed down to a quarter of its speed or less.
    let r = src.qmp.cmd(
        "migrate-set-parameters",
        json!({"max-bandwidth": bandwidth, "downtime-limit": 50,
               "cpu-throttle-initial": 50, "cpu-throttle-increment": 25}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let p = src.qmp.cmd("query-migrate-parameters", json!({}));
    assert_eq!(p["return"]["cpu-throttle-initial"], 50, "{p}");
    assert_eq!(p["return"]["cpu-throttle-increment"], 25, "{p}");
    assert_eq!(p["return"]["max-cpu-throttle"], 99, "{p}");
    assert_eq!(p["return"]["throttle-trigger-threshold"], 50, "{p}");
    let start = Instant::now();
    while !sock.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = src.qmp.cmd("migrate", json!({ "uri": spec }));
    assert!(r.get("return").is_some(), "{r}");
    // Poll: the throttle shows in query-migrate while it is on; capabilities cannot change meanwhile.
    let start = Instant::now();
    let mut max_throttle = 0;
    let mut refused = false;
    let q = loop {
        let q = src.qmp.cmd("query-migrate", json!({}));
        let status = q["return"]["status"].as_str().unwrap_or("").to_string();
        if let Some(t) = q["return"]["cpu-throttle-percentage"].as_u64() {
            max_throttle = max_throttle.max(t);
        }
        if !refused && status == "active" {
            let r = src.qmp.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "auto-converge", "state": false}]}),
            );
            assert_eq!(
                r["error"]["desc"], "There's a migration process in progress",
                "{r}"
            );
            refused = true;
        }
        if status == "completed" || status == "failed" {
            break q["return"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "migration hangs: {q}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    assert_eq!(q["status"], "completed", "{q}");
    let syncs = q["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    let downtime = q["downtime"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "auto-converge: rate {rate} pages/s, link {bandwidth} B/s, throttle up to {max_throttle} %, \
         {syncs} dirty syncs, {} ms, downtime {downtime} ms",
        took.as_millis()
    );
    assert!(max_throttle >= 50, "the vCPU was never throttled: {q}");
    // Converged: before MAX_SYNCS (30 while running + the stop's), with a short stop.
    assert!(syncs < 31, "pre-copy did not converge: {q}");
    assert!(downtime < 2000, "{q}");
    // Throttling ended with the migration: not reported once completed.
    assert!(q.get("cpu-throttle-percentage").is_none(), "{q}");
    // Without the `events` capability the source sent no MIGRATION event.
    assert!(
        !src.qmp
            .events
            .iter()
            .any(|(n, _)| n.starts_with("MIGRATION")),
        "{:?}",
        src.qmp.events
    );
    // The destination runs the guest to its end, every page intact.
    let o = dst.join().expect("destination thread");
    assert_passed_with(&o, BUSY_PASS_LINES);
    let r = src.qmp.cmd("quit", json!({}));
    assert!(r.get("return").is_some(), "{r}");
    let _ = src.finish();
}

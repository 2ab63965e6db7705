//! Firecracker-style snapshots under real KVM (`docs/migration.md`): `enlighten snapshot` writes a state file
//! plus a sparse raw memory file from a running guest (`guests/tests/migr_touch.c`, which has written a
//! distinct value into every page), `enlighten restore` maps the memory file copy-on-write in a second process
//! and the guest finishes with every page intact while the memory file stays unchanged. Damaged snapshots are
//! refused with clear errors. The pair of files can move to another directory together, the memory file can
//! be named on the command line, and `--verify-memory` checks its CRC32. QMP `x-snapshot-save` follows
//! QEMU's `savevm` run states and events (`save-vm`, STOP, RESUME).

mod guest_common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use guest_common::qmp::Qmp;
use guest_common::{assert_passed_with, kernel, qemu_style_args, run_raw, Outcome};
use serde_json::{json, Value};

const TICKS: u64 = 1000;

/// One test at a time: each runs a source outside `run_raw`'s lock (2 host cores, timing checks).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
const RAM: u64 = 128 << 20;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enlighten-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(name)
}

fn guest_args(extra: &[&str]) -> Vec<String> {
    let append = format!("ticks={TICKS} spin=1000");
    qemu_style_args(kernel("migr_touch"), 1, Some(&append), extra)
}

/// Starts a guest (`args` plus `-qmp`), waits until it prints a line starting with `ready` (or, with `None`,
/// for a second), snapshots it with `enlighten snapshot CLI_ARGS -qmp SOCKET STATE` and kills it. Returns the
/// CLI's stderr.
fn take_snapshot(
    args: &dyn Fn(&[&str]) -> Vec<String>,
    ready: Option<&'static str>,
    cli_args: &[&str],
    state: &Path,
) -> String {
    let sock = state.with_extension("qmp");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{},server=on,wait=off", sock.display());
    let mut src = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(args(&["-qmp", &spec]))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the source");
    let (tx, rx) = mpsc::channel();
    let out = src.stdout.take().expect("piped stdout");
    if ready.is_none() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1000));
            let _ = tx.send(());
        });
    }
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if ready.is_some_and(|r| line.starts_with(r)) {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let touched = rx.recv_timeout(Duration::from_secs(60));
    let cli = touched.is_ok().then(|| {
        Command::new(env!("CARGO_BIN_EXE_enlighten"))
            .arg("snapshot")
            .args(cli_args)
            .args(["-qmp", &format!("unix:{}", sock.display())])
            .arg(state)
            .output()
            .expect("run enlighten snapshot")
    });
    let _ = src.kill();
    let _ = src.wait();
    let src_out = reader.join().unwrap_or_default();
    let cli = cli.unwrap_or_else(|| panic!("the guest never became ready:\n{src_out}"));
    let err = String::from_utf8_lossy(&cli.stderr).into_owned();
    assert!(cli.status.success(), "enlighten snapshot failed: {err}");
    assert!(
        !src_out.contains("PASS:") && !src_out.contains("FAIL:"),
        "the source reached its report before the snapshot:\n{src_out}"
    );
    err
}

fn restore_with(args: &dyn Fn(&[&str]) -> Vec<String>, state: &Path, extra: &[&str]) -> Outcome {
    let mut a = vec!["restore".to_string(), state.display().to_string()];
    a.extend(args(extra));
    run_raw(&a)
}

fn restore(state: &Path, extra: &[&str]) -> Outcome {
    restore_with(&guest_args, state, extra)
}

fn assert_refused(o: &Outcome, fragment: &str) {
    assert_eq!(o.status, Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains(fragment) && o.stderr.contains("error: load of migration failed"),
        "expected {fragment:?}: {}",
        o.describe()
    );
}

#[test]
fn snapshot_restores_copy_on_write_and_damaged_snapshots_are_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let state = scratch("vm.state");
    let mem = scratch("vm.state.mem");
    let err = take_snapshot(&guest_args, Some("touched "), &[], &state);
    assert!(
        err.contains("100% 128/128 MiB") && err.contains("snapshot written to"),
        "{err}"
    );

    // A small state file and a sparse memory file: the RAM image and the 32-byte snapshot id trailer.
    let st = std::fs::metadata(&state).expect("state file");
    assert!(st.len() < 1 << 20, "state file of {} bytes", st.len());
    let m = std::fs::metadata(&mem).expect("memory file");
    assert_eq!(m.len(), RAM + 32);
    assert!(
        m.blocks() * 512 < RAM,
        "the memory file has no holes ({} blocks)",
        m.blocks()
    );
    let before = std::fs::read(&mem).expect("read memory file");

    // Restored in a second process: the guest continues, rewrites pages and finds every page intact.
    let o = restore(&state, &[]);
    let pass = format!("every page kept its value (0 wrong, {TICKS} rewritten by {TICKS} ticks)");
    assert_passed_with(&o, &[&pass]);
    let after = std::fs::read(&mem).expect("read memory file");
    assert!(
        before == after,
        "the guest's writes reached the memory file"
    );

    // Refusals, each before the guest runs.
    assert_refused(
        &restore(&state, &["-m", "256M"]),
        "RAM size: the stream has 134217728 bytes (128 MiB), this VM has 268435456 bytes (256 MiB)",
    );
    let mut damaged = std::fs::read(&state).expect("read state");
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let bad_state = scratch("damaged.state");
    std::fs::write(&bad_state, &damaged).expect("write damaged state");
    assert_refused(&restore(&bad_state, &[]), "checksum mismatch");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .and_then(|f| f.set_len(RAM / 2))
        .expect("truncate the memory file");
    assert_refused(
        &restore(&state, &[]),
        "is 67108864 bytes, the snapshot needs 134217760 bytes (128 MiB of RAM + a 32-byte trailer)",
    );
    std::fs::remove_file(&mem).expect("remove the memory file");
    assert_refused(
        &restore(&state, &[]),
        "cannot open the snapshot's memory file",
    );
}

/// `guests/tests/migr_stimer.c` on 2 vCPUs: a 1 ms periodic stimer in message mode and a SynIC message exchange
/// through hyperv-testdev, for 5 s of reference time (saved after about 1 s: a loaded host must not let it
/// reach its report first), and at least 0.5 s more after the restore.
fn stimer_args(extra: &[&str]) -> Vec<String> {
    let mut e = vec![
        "-cpu",
        "host,hv-vpindex,hv-synic,hv-time,hv-stimer,hv-stimer-direct",
        "-device",
        "hyperv-testdev",
    ];
    e.extend_from_slice(extra);
    qemu_style_args(kernel("migr_stimer"), 2, Some("tenths=50"), &e)
}

#[test]
fn stimer_and_synic_messages_survive_a_file_round_trip() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Saved mid-run to a file, both ways (the Firecracker-style snapshot and the checksummed stream of
    // `migrate` to `file:`), then restored in a new process: the device state (hyperv-testdev's connection)
    // and the engine state travel, so no SynIC message is lost and the stimer keeps its phase.
    for (name, cli) in [("snapshot", &[][..]), ("stream", &["--stream"][..])] {
        let state = scratch(&format!("stimer-{name}.state"));
        let err = take_snapshot(&stimer_args, None, cli, &state);
        assert!(err.contains("snapshot written to"), "{name}: {err}");
        let o = restore_with(&stimer_args, &state, &[]);
        assert_passed_with(
            &o,
            &[
                "periodic 1 ms: every expiration = start + k * period",
                "periodic 1 ms: the last message is for period",
                "reference time never stepped back (0",
                // A PASS only if every post succeeded and every echo arrived once, in order.
                "SynIC messages: ",
            ],
        );
    }
}

#[test]
fn snapshot_and_restore_help() {
    for (args, want) in [
        (
            &["snapshot", "--help"][..],
            "usage: enlighten snapshot -qmp",
        ),
        (&["snapshot", "-h"][..], "--stream FILE"),
        (
            &["restore", "--help"][..],
            "usage: enlighten restore FILE [MEMORY] [--verify-memory] [OPTIONS]",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_enlighten"))
            .args(args)
            .output()
            .expect("run enlighten");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(want),
            "{args:?}: {text}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args([
            "snapshot",
            "-qmp",
            "unix:/nonexistent/qmp",
            "--stream",
            "a",
            "b",
        ])
        .output()
        .expect("run enlighten");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: enlighten snapshot"));
}

/// QMP `x-snapshot-save` and QEMU's `savevm` run states: a running VM is `save-vm` while it is written, with
/// STOP; after a failure, or with `resume: true`, it runs again with RESUME; otherwise it stays stopped in
/// `postmigrate` until `cont`. A VM paused by `stop` stays `paused`, with no STOP and no RESUME.
#[test]
fn snapshot_save_run_states_and_events_follow_qemu() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let sock = scratch("states.qmp");
    let _ = std::fs::remove_file(&sock);
    let spec = format!("unix:{},server=on,wait=off", sock.display());
    // ticks=0: the guest runs until it is killed. Without --no-reboot: `system_reset` reboots it.
    let mut args = qemu_style_args(
        kernel("migr_touch"),
        1,
        Some("ticks=0 spin=20000"),
        &["-qmp", &spec],
    );
    args.retain(|a| a != "--no-reboot");
    let mut vm = Command::new(env!("CARGO_BIN_EXE_enlighten"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the VM");
    let out = vm.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("touched ") {
                let _ = tx.send(());
            }
        }
    });
    let touched = rx.recv_timeout(Duration::from_secs(60));
    let mut q = Qmp::connect(&sock);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(touched.is_ok(), "the guest never touched its pages");
        let file = |n: &str| scratch(n).display().to_string();
        let save = |state: &str, memory: String, resume: Option<bool>| {
            let mut a = json!({ "state": file(state), "memory": memory });
            if let Some(r) = resume {
                a["resume"] = json!(r);
            }
            a
        };
        std::fs::create_dir_all(scratch("st-c-dir").join("x")).expect("a directory in the way");
        // As a QEMU client would (`x-snapshot-save` sends its MIGRATION events with or without it).
        q.ok(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "events", "state": true }] }),
        );
        assert_eq!(q.status(), "running");
        q.take_events();
        // (name, arguments, `stop` first, the run states seen, the final `query-migrate` status, the events)
        type Case<'a> = (&'a str, Value, bool, &'a [&'a str], &'a str, &'a [&'a str]);
        let cases: Vec<Case<'_>> = vec![
            (
                "stays stopped",
                save("st-a.state", file("st-a.mem"), None),
                false,
                &["save-vm", "postmigrate"],
                "completed",
                &[
                    "MIGRATION setup",
                    "MIGRATION active",
                    "STOP",
                    "MIGRATION completed",
                ],
            ),
            (
                "cont from postmigrate",
                Value::Null,
                false,
                &["running"],
                "",
                &["RESUME"],
            ),
            (
                "resume",
                save("st-b.state", file("st-b.mem"), Some(true)),
                false,
                &["save-vm", "running"],
                "completed",
                &[
                    "MIGRATION setup",
                    "MIGRATION active",
                    "STOP",
                    "MIGRATION completed",
                    "RESUME",
                ],
            ),
            (
                // The state path is a directory: the final rename fails after the whole memory file.
                "failed",
                save("st-c-dir", file("st-c.mem"), Some(false)),
                false,
                &["save-vm", "running"],
                "failed",
                &[
                    "MIGRATION setup",
                    "MIGRATION active",
                    "STOP",
                    "MIGRATION failed",
                    "RESUME",
                ],
            ),
            (
                "paused by stop",
                save("st-d.state", file("st-d.mem"), Some(true)),
                true,
                &["paused"],
                "completed",
                &["MIGRATION setup", "MIGRATION active", "MIGRATION completed"],
            ),
        ];
        for (name, args, stop, states, status, events) in cases {
            if stop {
                q.ok("stop", json!({}));
                assert_eq!(q.take_events(), ["STOP"], "{name}: stop");
            }
            let (seen, end) = if args.is_null() {
                q.ok("cont", json!({}));
                (vec![q.status()], json!({}))
            } else {
                q.snapshot_save(args, states[states.len() - 1])
            };
            let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
            // The first poll may come before the save thread stops the vCPUs.
            let from = usize::from(seen.first() == Some(&"running") && states[0] != "running");
            assert_eq!(&seen[from..], states, "{name}: run states");
            assert_eq!(
                end["status"].as_str().unwrap_or(""),
                status,
                "{name}: {end}"
            );
            if status == "failed" {
                let e = end["error-desc"].as_str().unwrap_or("");
                assert!(
                    e.contains("cannot rename") && e.contains("st-c-dir"),
                    "{name}: {e}"
                );
            }
            assert_eq!(q.take_events(), events, "{name}: events");
        }
        // The paused VM keeps its hold through the save: `cont` runs it (RESUME).
        q.ok("cont", json!({}));
        assert_eq!(q.status(), "running");
        assert_eq!(q.take_events(), ["RESUME"]);

        // A reset of a paused VM leaves the vCPUs' resets queued until `cont`: its vCPU state is the one from
        // before the reset, so a save is refused (no STOP, no RESUME: the VM was not running), and `cont`
        // runs the rebooted guest.
        q.ok("stop", json!({}));
        q.ok("system_reset", json!({}));
        let start = Instant::now();
        while q.status() != "prelaunch" {
            assert!(start.elapsed() < Duration::from_secs(20), "no reset");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (seen, end) = q.snapshot_save(save("st-e.state", file("st-e.mem"), None), "prelaunch");
        assert_eq!(seen, ["prelaunch"]);
        assert_eq!(end["status"], "failed", "{end}");
        assert!(!scratch("st-e.mem").exists(), "a memory file was written");
        let e = end["error-desc"].as_str().unwrap_or("");
        assert!(e.contains("a reset is still pending on its vCPUs"), "{e}");
        assert_eq!(
            q.take_events(),
            [
                "STOP",
                "MIGRATION setup",
                "MIGRATION active",
                "MIGRATION failed"
            ]
        );
        q.ok("cont", json!({}));
        assert_eq!(q.status(), "running");
        assert_eq!(q.take_events(), ["RESUME"]);

        // `enlighten snapshot --resume` (another QMP client): the VM runs on afterwards.
        let cli = Command::new(env!("CARGO_BIN_EXE_enlighten"))
            .args(["snapshot", "--resume", "-qmp"])
            .arg(format!("unix:{}", sock.display()))
            .arg(file("st-f.state"))
            .output()
            .expect("run enlighten snapshot");
        let err = String::from_utf8_lossy(&cli.stderr);
        assert!(
            cli.status.success() && err.contains("snapshot written to"),
            "{err}"
        );
        let start = Instant::now();
        while q.status() != "running" {
            assert!(start.elapsed() < Duration::from_secs(20), "not resumed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            q.take_events(),
            [
                "MIGRATION setup",
                "MIGRATION active",
                "STOP",
                "MIGRATION completed",
                "RESUME"
            ]
        );
        assert!(scratch("st-f.state.mem").exists());
    }));
    let _ = vm.kill();
    let _ = vm.wait();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

/// The state file and the memory file move to another directory together and restore there (with
/// `--verify-memory`: the CRC32 matches); the memory file can also be named on the command line. A missing or
/// damaged memory file is refused with a clear error before the guest runs.
#[test]
fn moved_snapshots_restore_and_verify_memory_catches_damage() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let old = scratch("moved-from");
    std::fs::create_dir_all(&old).expect("dir");
    let state = old.join("vm.state");
    take_snapshot(&guest_args, Some("touched "), &[], &state);
    let new = scratch("moved-to");
    std::fs::create_dir_all(&new).expect("dir");
    for f in ["vm.state", "vm.state.mem"] {
        std::fs::rename(old.join(f), new.join(f)).expect("move the snapshot");
    }
    std::fs::remove_dir_all(&old).expect("remove the old directory");
    let moved = new.join("vm.state");
    let pass = format!("every page kept its value (0 wrong, {TICKS} rewritten by {TICKS} ticks)");
    let o = restore_with(
        &|extra| {
            let mut a = vec!["--verify-memory".to_string()];
            a.extend(guest_args(extra));
            a
        },
        &moved,
        &[],
    );
    assert_passed_with(&o, &[&pass]);

    // Named on the command line: another name in another directory.
    let elsewhere = scratch("renamed.bin");
    std::fs::rename(new.join("vm.state.mem"), &elsewhere).expect("rename the memory file");
    let named = elsewhere.display().to_string();
    let o = restore_with(
        &|extra| {
            let mut a = vec![named.clone()];
            a.extend(guest_args(extra));
            a
        },
        &moved,
        &[],
    );
    assert_passed_with(&o, &[&pass]);

    let restore_args = |first: &[&str]| {
        let mut a = vec!["restore".to_string(), moved.display().to_string()];
        a.extend(first.iter().map(|s| s.to_string()));
        a.extend(guest_args(&[]));
        run_raw(&a)
    };
    // Not next to the state file any more, nor where it was written: both places are named.
    let o = restore_args(&[]);
    assert_refused(&o, "(next to the state file): No such file");
    assert!(
        o.stderr
            .contains("moved-from/vm.state.mem (where it was written)")
            && o.stderr.contains("enlighten restore STATE MEMORY"),
        "{}",
        o.describe()
    );
    let short = scratch("short.bin");
    std::fs::write(&short, [1u8; 4096]).expect("write");
    assert_refused(
        &restore_args(&[&short.display().to_string()]),
        "is 4096 bytes, the snapshot needs 134217760 bytes",
    );
    // One flipped byte deep in the file: caught with --verify-memory.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&elsewhere)
        .expect("open the memory file");
    use std::os::unix::fs::FileExt;
    let at = RAM - 4096 + 8;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 1], at).expect("damage");
    let o = restore_args(&[&named, "--verify-memory"]);
    assert_refused(&o, "is damaged: its CRC32 is");
    assert!(
        !o.stdout.contains("t 1\n"),
        "the guest ran: {}",
        o.describe()
    );
    let _ = std::fs::remove_file(&short);
}

/// A save that fails after it has renamed its memory file into place leaves the previous save's state file
/// next to the new memory file. The snapshot id in the state file and in the memory file's trailer tells
/// them apart without reading RAM: such a pair is refused before the guest runs, the matching pair restores.
#[test]
fn a_memory_file_from_another_save_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let first_dir = scratch("pair-first");
    let second_dir = scratch("pair-second");
    for d in [&first_dir, &second_dir] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let first = first_dir.join("vm.state");
    let second = second_dir.join("vm.state");
    take_snapshot(&guest_args, Some("touched "), &[], &first);
    take_snapshot(&guest_args, Some("touched "), &[], &second);
    // The second save's memory file replaces the first's; the first's state file stays.
    let mixed_mem = first_dir.join("vm.state.mem");
    std::fs::rename(second_dir.join("vm.state.mem"), &mixed_mem).expect("mix the pair");
    let o = restore(&first, &[]);
    assert_refused(
        &o,
        "does not belong to this state file (its snapshot id is ",
    );
    assert!(
        o.stderr.contains("the pair comes from two different saves") && !o.stdout.contains("t 1\n"),
        "{}",
        o.describe()
    );
    // The memory file named on the command line is checked the same way.
    let named = mixed_mem.display().to_string();
    let with_memory = |extra: &[&str]| {
        let mut a = vec![named.clone()];
        a.extend(guest_args(extra));
        a
    };
    assert_refused(
        &restore_with(&with_memory, &first, &[]),
        "does not belong to this state file",
    );
    // The state file of the save that wrote it restores with it.
    let pass = format!("every page kept its value (0 wrong, {TICKS} rewritten by {TICKS} ticks)");
    assert_passed_with(&restore_with(&with_memory, &second, &[]), &[&pass]);
    let _ = std::fs::remove_dir_all(&first_dir);
    let _ = std::fs::remove_dir_all(&second_dir);
}

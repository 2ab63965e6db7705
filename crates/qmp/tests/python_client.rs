//! The crate's example server (`examples/qmp_demo.rs`) driven by QEMU's own Python client
//! (`qemu.qmp`, its legacy synchronous API and `qmp-shell`): `tests/python/test_qemu_qmp.py`.
//!
//! The interpreter is `python3`, or `$ENLIGHTEN_PYTHON`; it must have `qemu.qmp` (`scripts/setup`
//! installs it). Without it the test fails with a message saying so: it is never skipped.
//! `cargo test` builds the examples next to the test binaries; with a filter such as
//! `--test python_client` alone, build the example first (`cargo build -p qmp --example qmp_demo`).

use std::path::PathBuf;
use std::process::Command;

fn example_binary() -> PathBuf {
    // target/<profile>/deps/python_client-<hash> -> target/<profile>/examples/qmp_demo
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in <target>/<profile>/deps");
    profile_dir.join("examples").join("qmp_demo")
}

#[test]
fn qemu_qmp_client_against_the_example_server() {
    let py = std::env::var("ENLIGHTEN_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let bin = example_binary();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p qmp --example qmp_demo` (plain `cargo test` builds it)",
        bin.display()
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/test_qemu_qmp.py");
    let out = Command::new(&py)
        .arg(script)
        .arg("--bin")
        .arg(&bin)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py} {script}: {e}"));
    let report = format!(
        "{py} {script}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("qemu.qmp test: all checks passed"),
        "{report}"
    );
}

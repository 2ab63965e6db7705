//! Firecracker-style snapshots over QMP: `x-snapshot-save {"state": PATH, "memory": PATH, "resume": BOOL}`
//! writes a checksummed state file plus a sparse raw memory file (`vmm::migration::snapshot`). Progress,
//! status and events are those of `migrate` (`query-migrate`, MIGRATION).
//!
//! The run state follows QEMU's `savevm`: a running VM goes to `save-vm` with a STOP event while its state is
//! written; a paused VM stays `paused`. When the save fails, or with `resume: true`, a VM that was running
//! runs again with a RESUME event; otherwise, as after `migrate`, it stays stopped (`postmigrate`) until
//! `cont`. A snapshot is restored with `-incoming file:STATE` (`enlighten restore STATE`), which maps the
//! memory file copy-on-write.

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::json;
use vmm::migration::snapshot::{save_snapshot, MemoryFileOptions};

use super::{lock, status_event, Info, MigrationControl, EVENTS};

/// The QMP command.
pub const SNAPSHOT_SAVE: &str = "x-snapshot-save";

impl MigrationControl {
    /// QMP `x-snapshot-save`: refuses with the first migration blocker's text (as QEMU's snapshots do),
    /// otherwise starts the snapshot on a thread; `query-migrate` follows it. With `resume`, a VM that was
    /// running runs again once the files are written (QEMU's `savevm`).
    pub fn start_snapshot(
        self: &Arc<Self>,
        state: &str,
        memory: &str,
        resume: bool,
    ) -> Result<(), String> {
        if let Some(b) = self.blockers.first() {
            return Err((*b).to_string());
        }
        if state.is_empty() || memory.is_empty() {
            return Err("x-snapshot-save needs a state path and a memory path".to_string());
        }
        if state == memory {
            return Err("the state file and the memory file must differ".to_string());
        }
        {
            let mut i = lock(&self.info);
            if matches!(i.status, "setup" | "active") {
                return Err("There's a migration process in progress".to_string());
            }
            *i = Info {
                status: "active",
                start: Some(Instant::now()),
                remaining: self.config.ram_size,
                ..Info::default()
            };
        }
        status_event("setup");
        let me = self.clone();
        let (state, memory) = (state.to_string(), memory.to_string());
        std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || me.run_snapshot(&state, &memory, resume))
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        Ok(())
    }

    fn run_snapshot(&self, state: &str, memory: &str, resume: bool) {
        let t0 = Instant::now();
        status_event("active");
        if let Some(e) = EVENTS.get() {
            e.emit("MIGRATION_PASS", Some(json!({ "pass": 1 })));
        }
        let paused = self.vm.pause_all();
        crate::qmp_glue::snapshot_stopped();
        // The state file is written under a temporary name and renamed: a path that is the memory file of a
        // VM restored from it (maybe this one) must never be truncated while it is mapped.
        let tmp = format!("{state}.tmp-{}", std::process::id());
        let r = (|| -> Result<vmm::migration::vm::Stats, String> {
            let f =
                std::fs::File::create(&tmp).map_err(|e| format!("cannot create '{tmp}': {e}"))?;
            let mut progress = |done: u64, total: u64| {
                let mut i = lock(&self.info);
                i.transferred = done;
                i.remaining = total.saturating_sub(done);
            };
            let (w, stats) = save_snapshot(
                &paused,
                self.hv.as_deref(),
                &self.config,
                BufWriter::new(f),
                Path::new(state),
                Path::new(memory),
                &mut progress,
            )
            .map_err(|e| e.to_string())?;
            w.into_inner()
                .map_err(|e| format!("writing '{tmp}': {}", e.error()))?;
            std::fs::rename(&tmp, state)
                .map_err(|e| format!("cannot rename '{tmp}' to '{state}': {e}"))?;
            Ok(stats)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        let completed = r.is_ok();
        {
            let mut i = lock(&self.info);
            i.total_ms = t0.elapsed().as_millis() as u64;
            i.downtime_ms = i.total_ms;
            i.start = None;
            match r {
                Ok(stats) => {
                    i.status = "completed";
                    i.transferred = stats.bytes;
                    i.remaining = 0;
                    i.pages = stats.pages;
                    i.zero_pages = stats.zero_pages;
                }
                Err(e) => {
                    eprintln!("error: snapshot failed: {e}");
                    i.status = "failed";
                    i.error = Some(e);
                }
            }
        }
        // QEMU's order: `postmigrate` before MIGRATION `completed`; MIGRATION `failed` before the RESUME.
        let status = if completed { "completed" } else { "failed" };
        let restarts = !completed || resume;
        if restarts {
            status_event(status);
        }
        // Kept in `held` (postmigrate, until `cont`), or dropped: running again (RESUME sent), or held by
        // `stop` or `-S`.
        let mut paused = Some(paused);
        crate::qmp_glue::snapshot_finished(completed, resume, || {
            *lock(&self.held) = paused.take();
        });
        drop(paused);
        if !restarts {
            status_event(status);
        }
    }
}

/// `enlighten restore`'s memory-file options (set once, before `run` starts the incoming load).
static RESTORE_MEMORY: OnceLock<(Option<PathBuf>, bool)> = OnceLock::new();

/// `enlighten restore`'s arguments: `FILE [MEMORY] [--verify-memory] [run options]`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RestoreArgs {
    pub file: String,
    pub memory: Option<String>,
    pub verify: bool,
    /// The run options, in order.
    pub run: Vec<String>,
}

pub(super) const RESTORE_USAGE: &str =
    "usage: enlighten restore FILE [MEMORY] [--verify-memory] [OPTIONS]";

pub(super) const RESTORE_HELP: &str = "\
usage: enlighten restore FILE [MEMORY] [--verify-memory] [OPTIONS]

Runs a VM from FILE, a snapshot's state file (its memory file is mapped copy-on-write) or a migration
stream: the same as OPTIONS -incoming file:FILE. OPTIONS must describe the saved VM (RAM size, vCPUs, -cpu,
devices).

  MEMORY           the snapshot's memory file; by default it is looked for next to FILE (where the snapshot
                   put it relative to FILE, so the pair can move together), then where it was written
  --verify-memory  read the whole memory file and check its CRC32 before the guest runs (the default maps
                   it lazily: restore time does not depend on the RAM size)";

/// Parses `enlighten restore`'s arguments. FILE comes first; MEMORY is the next argument when it does not
/// start with `-` (run options all do); `--verify-memory` may be anywhere.
pub(super) fn parse_restore_args(args: &[String]) -> Result<RestoreArgs, String> {
    let verify = args.iter().any(|a| a == "--verify-memory");
    let mut rest = args.iter().filter(|a| *a != "--verify-memory").peekable();
    let file = match rest.next() {
        Some(f) if !f.starts_with('-') => f.clone(),
        _ => return Err(RESTORE_USAGE.to_string()),
    };
    let memory = rest.next_if(|a| !a.starts_with('-')).cloned();
    Ok(RestoreArgs {
        file,
        memory,
        verify,
        run: rest.cloned().collect(),
    })
}

/// Remembers `enlighten restore`'s MEMORY and `--verify-memory` for the incoming load.
pub(super) fn set_restore_memory(memory: Option<&str>, verify: bool) {
    let _ = RESTORE_MEMORY.set((memory.map(PathBuf::from), verify));
}

/// How the incoming load finds and checks a snapshot's memory file: next to `state` (the `file:` URI's
/// path) first, or where `enlighten restore` was told.
pub(super) fn memory_file_options(state: Option<&str>) -> MemoryFileOptions {
    let (memory, verify) = RESTORE_MEMORY.get().cloned().unwrap_or_default();
    let state_dir = state
        .and_then(|s| std::path::absolute(s).ok())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    MemoryFileOptions {
        state_dir,
        memory,
        verify,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_args() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = |file: &str, memory: Option<&str>, verify: bool, run: &[&str]| {
            Ok(RestoreArgs {
                file: file.to_string(),
                memory: memory.map(str::to_string),
                verify,
                run: v(run),
            })
        };
        let cases: Vec<(&[&str], Result<RestoreArgs, String>)> = vec![
            (&["s"], ok("s", None, false, &[])),
            (&["s", "-m", "128M"], ok("s", None, false, &["-m", "128M"])),
            (
                &["s", "m", "-m", "1G"],
                ok("s", Some("m"), false, &["-m", "1G"]),
            ),
            (
                &["--verify-memory", "s", "m", "-smp", "2"],
                ok("s", Some("m"), true, &["-smp", "2"]),
            ),
            (
                &["s", "-smp", "2", "--verify-memory"],
                ok("s", None, true, &["-smp", "2"]),
            ),
            (&[], Err(RESTORE_USAGE.to_string())),
            (&["--verify-memory"], Err(RESTORE_USAGE.to_string())),
            (&["-m", "128M"], Err(RESTORE_USAGE.to_string())),
        ];
        for (args, want) in cases {
            assert_eq!(parse_restore_args(&v(args)), want, "{args:?}");
        }
    }
}

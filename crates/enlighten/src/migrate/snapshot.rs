//! Firecracker-style snapshots over QMP: `x-snapshot-save {"state": PATH, "memory": PATH}` writes a
//! checksummed state file plus a sparse raw memory file (`vmm::migration::snapshot`). Progress, status and
//! events are those of `migrate` (`query-migrate`, MIGRATION), and as after `migrate` the VM stays paused
//! (QEMU's `postmigrate`). A snapshot is restored with `-incoming file:STATE` (`enlighten restore STATE`),
//! which maps the memory file copy-on-write.

use std::io::BufWriter;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use vmm::migration::snapshot::save_snapshot;

use super::{lock, status_event, Info, MigrationControl, EVENTS};

/// The QMP command.
pub const SNAPSHOT_SAVE: &str = "x-snapshot-save";

impl MigrationControl {
    /// QMP `x-snapshot-save`: refuses with the first migration blocker's text (as QEMU's snapshots do),
    /// otherwise starts the snapshot on a thread; `query-migrate` follows it.
    pub fn start_snapshot(self: &Arc<Self>, state: &str, memory: &str) -> Result<(), String> {
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
            .spawn(move || me.run_snapshot(&state, &memory))
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        Ok(())
    }

    fn run_snapshot(&self, state: &str, memory: &str) {
        let t0 = Instant::now();
        status_event("active");
        if let Some(e) = EVENTS.get() {
            e.emit("MIGRATION_PASS", Some(json!({ "pass": 1 })));
        }
        let paused = self.vm.pause_all();
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
                std::path::Path::new(memory),
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
                *lock(&self.held) = Some(paused);
                status_event("completed");
            }
            Err(e) => {
                eprintln!("error: snapshot failed: {e}");
                i.status = "failed";
                i.error = Some(e);
                drop(paused);
                status_event("failed");
            }
        }
    }
}

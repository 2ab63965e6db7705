//! A QMP test client over a Unix socket (JSON lines) for the migration and snapshot tests: commands, the
//! events read on the way, and the polling loops of `migrate` and `x-snapshot-save`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP client that keeps the events it reads.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far (name, data).
    pub events: Vec<(String, Value)>,
}

impl Qmp {
    /// Connects (retrying for 20 s while the VMM starts), reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let start = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("cannot connect to QMP at {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().expect("clone")),
            writer: s,
            events: Vec::new(),
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    /// The next JSON line.
    pub fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Sends a command; returns its `return` or `error` reply, keeping the events read before it.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.writer, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
            if let Some(name) = v["event"].as_str() {
                self.events.push((name.to_string(), v["data"].clone()));
            }
        }
    }

    /// Sends a command that must succeed; returns its `return`.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        r.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{name} {args}: {r}"))
    }

    /// `query-status`'s run state.
    pub fn status(&mut self) -> String {
        let r = self.ok("query-status", json!({}));
        r["status"].as_str().unwrap_or("").to_string()
    }

    /// The run-state events (STOP, RESUME) and MIGRATION statuses read so far, in order, then forgets them.
    pub fn take_events(&mut self) -> Vec<String> {
        std::mem::take(&mut self.events)
            .into_iter()
            .filter_map(|(name, data)| match name.as_str() {
                "STOP" | "RESUME" => Some(name),
                "MIGRATION" => Some(format!(
                    "MIGRATION {}",
                    data["status"].as_str().unwrap_or("")
                )),
                _ => None,
            })
            .collect()
    }

    /// `x-snapshot-save`, then `query-status` as fast as QMP answers until the save has ended and the run
    /// state is `end`. Returns the run states seen (each once, in order) and the final `query-migrate`.
    pub fn snapshot_save(&mut self, args: Value, end: &str) -> (Vec<String>, Value) {
        self.ok("x-snapshot-save", args);
        let start = Instant::now();
        let mut seen: Vec<String> = Vec::new();
        loop {
            let st = self.status();
            if seen.last() != Some(&st) {
                seen.push(st.clone());
            }
            let q = self.ok("query-migrate", json!({}));
            if matches!(q["status"].as_str(), Some("completed" | "failed")) && st == end {
                // One more command: every event sent before the state change has been read.
                self.ok("query-status", json!({}));
                return (seen, q);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the save hangs: {q}, states {seen:?}"
            );
        }
    }

    /// Turns on the `events` migration capability (QEMU sends MIGRATION and MIGRATION_PASS only then).
    pub fn enable_events(&mut self) {
        let r = self.cmd(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        );
        assert!(r.get("return").is_some(), "{r}");
    }

    /// [`Qmp::migrate`] to a TCP destination that may not listen yet: a refused connection fails the migration
    /// and the source resumes, so try again (a probe connection would take the destination's only accept).
    pub fn migrate_when_listening(&mut self, uri: &str) -> Value {
        let mut q = Value::Null;
        for _ in 0..50 {
            q = self.migrate(uri);
            let refused = q["status"] == "failed"
                && q["error-desc"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Failed to connect");
            if !refused {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        q
    }

    /// `migrate` then polls `query-migrate` until it ends; returns the final query reply.
    pub fn migrate(&mut self, uri: &str) -> Value {
        let r = self.cmd("migrate", json!({ "uri": uri }));
        assert!(r.get("return").is_some(), "migrate {uri}: {r}");
        let start = Instant::now();
        loop {
            let q = self.cmd("query-migrate", json!({}));
            let status = q["return"]["status"].as_str().unwrap_or("").to_string();
            if status == "completed" || status == "failed" {
                return q["return"].clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "migration hangs: {q}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

//! Migration commands with QEMU's semantics over the `vmm::migration` stream (`docs/migration.md`):
//! QMP `migrate` / `query-migrate` / `migrate_cancel` / `migrate-set-parameters` / `query-migrate-parameters`,
//! `migrate-set-capabilities` / `query-migrate-capabilities` (`events`, `auto-converge`), and `-incoming URI` on
//! the destination. Transports: `file:PATH`, `unix:PATH`, `tcp:HOST:PORT`, `exec:CMD`.
//!
//! The source stops every vCPU through the rendezvous, writes the stream, and on a socket waits for the
//! destination's verdict (one status byte, then a message on failure). On success it stays paused
//! (QEMU's `postmigrate`); on any failure it resumes.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use qmp::QmpError;
use serde_json::{json, Map, Value};
use vmm::hv::HvGlue;
use vmm::migration::format::ConfigSection;
use vmm::migration::vm::{self as mvm, MigrationError};
use vmm::{Paused, VmHandle};

mod snapshot;

/// The QMP commands this module implements.
pub const COMMANDS: &[&str] = &[
    "migrate",
    "query-migrate",
    "migrate_cancel",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-incoming",
    snapshot::SNAPSHOT_SAVE,
];

/// The argument specs of [`COMMANDS`] (QEMU's names; `detach`, `blk`, `inc` and `resume` are accepted and
/// ignored as in QEMU's deprecated forms).
pub fn command_specs() -> Vec<qmp::CommandSpec> {
    use qmp::{ArgType, CommandSpec};
    vec![
        CommandSpec::new("migrate")
            .arg("uri", ArgType::Str)
            .optional_arg("detach", ArgType::Bool)
            .optional_arg("blk", ArgType::Bool)
            .optional_arg("inc", ArgType::Bool)
            .optional_arg("resume", ArgType::Bool),
        CommandSpec::new("query-migrate"),
        CommandSpec::new("migrate_cancel"),
        CommandSpec::new("migrate-set-parameters")
            .optional_arg("downtime-limit", ArgType::Uint)
            .optional_arg("max-bandwidth", ArgType::Uint)
            .optional_arg("throttle-trigger-threshold", ArgType::Uint)
            .optional_arg("cpu-throttle-initial", ArgType::Uint)
            .optional_arg("cpu-throttle-increment", ArgType::Uint)
            .optional_arg("cpu-throttle-tailslow", ArgType::Bool)
            .optional_arg("max-cpu-throttle", ArgType::Uint),
        CommandSpec::new("query-migrate-parameters"),
        CommandSpec::new("migrate-set-capabilities").arg("capabilities", ArgType::Array),
        CommandSpec::new("query-migrate-capabilities"),
        CommandSpec::new("migrate-incoming").arg("uri", ArgType::Str),
        CommandSpec::new(snapshot::SNAPSHOT_SAVE)
            .arg("state", ArgType::Str)
            .arg("memory", ArgType::Str)
            .optional_arg("resume", ArgType::Bool),
    ]
}

/// Destination verdict bytes on socket transports.
const ACK_OK: u8 = 1;
const ACK_FAIL: u8 = 0;

/// A migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    File(String),
    Unix(String),
    Tcp(String),
    Exec(String),
    /// `-incoming defer` (then `migrate-incoming`).
    Defer,
}

/// Parses a migration URI (QEMU's spelling); `defer` only for `-incoming`.
pub fn parse_uri(s: &str, incoming: bool) -> Result<Uri, String> {
    let nonempty = |v: &str, what: &str| {
        if v.is_empty() {
            Err(format!("invalid migration URI '{s}': {what} is empty"))
        } else {
            Ok(v.to_string())
        }
    };
    if let Some(p) = s.strip_prefix("file:") {
        return Ok(Uri::File(nonempty(p, "the path")?));
    }
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(Uri::Unix(nonempty(p, "the path")?));
    }
    if let Some(a) = s.strip_prefix("tcp:") {
        let a = nonempty(a, "the address")?;
        if a.rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(format!(
                "invalid migration URI '{s}': expected tcp:HOST:PORT"
            ));
        }
        return Ok(Uri::Tcp(a));
    }
    if let Some(c) = s.strip_prefix("exec:") {
        return Ok(Uri::Exec(nonempty(c, "the command")?));
    }
    if incoming && s == "defer" {
        return Ok(Uri::Defer);
    }
    Err(format!("unknown migration protocol: {s}"))
}

#[derive(Debug, Clone, Default)]
struct Info {
    status: &'static str,
    start: Option<Instant>,
    total_ms: u64,
    downtime_ms: u64,
    transferred: u64,
    remaining: u64,
    pages: u64,
    zero_pages: u64,
    error: Option<String>,
    /// The final statistics of a live migration (`None`: a one-pass save, e.g. `x-snapshot-save`).
    live: Option<mvm::LiveStats>,
    /// From `migrate` to the first pass (QEMU's `setup-time`).
    setup_ms: u64,
    /// The destination's side: `query-migrate` reports only the status, as QEMU's does.
    incoming: bool,
}

/// Migration state of one VM.
pub struct MigrationControl {
    vm: VmHandle,
    hv: Option<Arc<HvGlue>>,
    config: ConfigSection,
    blockers: Vec<&'static str>,
    info: Mutex<Info>,
    /// vCPUs held after a completed outgoing migration (QEMU's `postmigrate`).
    held: Mutex<Option<Paused>>,
    /// `-incoming defer`: the held vCPUs, until `migrate-incoming`.
    deferred: Mutex<Option<Paused>>,
    /// `downtime-limit` (ms) and `max-bandwidth` (bytes/s).
    params: Mutex<(u64, u64)>,
    /// Auto-converge's parameters (`cpu-throttle-*`, `max-cpu-throttle`, `throttle-trigger-threshold`).
    throttle: Mutex<mvm::ThrottleParams>,
    /// The migration capabilities set with `migrate-set-capabilities`.
    caps: Mutex<Capabilities>,
    /// The running live migration's controls and statistics.
    active: Mutex<Option<Arc<mvm::LiveControl>>>,
    /// Cuts the running migration's connection (`migrate_cancel` while a write blocks).
    cutter: Mutex<Option<Box<dyn Fn() + Send>>>,
}

/// QEMU's limit of `downtime-limit` (2000 s), with its message.
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

static CONTROL: OnceLock<Arc<MigrationControl>> = OnceLock::new();

static EVENTS: OnceLock<qmp::EventSink> = OnceLock::new();

/// Where MIGRATION and MIGRATION_PASS events go (the QMP glue's sink).
pub fn set_event_sink(sink: qmp::EventSink) {
    let _ = EVENTS.set(sink);
}

/// Whether the `events` capability is on: QEMU sends MIGRATION and MIGRATION_PASS only then (except the
/// destination's `setup`, see [`incoming_setup_event`]).
pub(crate) fn events_enabled() -> bool {
    CONTROL.get().is_some_and(|c| lock(&c.caps).events)
}

/// QEMU's MIGRATION event of `migrate` and `-incoming`: only with the `events` capability.
fn migration_event(status: &str) {
    if events_enabled() {
        status_event(status);
    }
}

/// A MIGRATION event whatever the capabilities: `x-snapshot-save` (an enlighten extension, no QEMU
/// counterpart) always reports its progress this way.
fn status_event(status: &str) {
    if let Some(e) = EVENTS.get() {
        e.emit("MIGRATION", Some(json!({ "status": status })));
    }
}

/// The destination's MIGRATION `setup`, which QEMU sends whatever the capabilities when an incoming migration
/// starts (`-incoming`, `migrate-incoming`).
fn incoming_setup_event() {
    if let Some(e) = EVENTS.get() {
        e.emit("MIGRATION", Some(json!({ "status": "setup" })));
    }
}

/// The migration capabilities enlighten implements (QMP `migrate-set-capabilities`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// `events`: MIGRATION and MIGRATION_PASS events.
    pub events: bool,
    /// `auto-converge`: throttle the vCPUs when pre-copy does not converge.
    pub auto_converge: bool,
}

/// QEMU 7.2's migration capabilities, in its order (`query-migrate-capabilities` lists them all).
pub const QEMU_CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

impl Capabilities {
    /// The state of capability `name` (false for the ones enlighten does not implement).
    pub fn get(&self, name: &str) -> bool {
        match name {
            "events" => self.events,
            "auto-converge" => self.auto_converge,
            _ => false,
        }
    }

    /// `migrate-set-capabilities`' list applied to a copy of `self`, all or nothing: QEMU's argument errors for
    /// a malformed list or an unknown name; a QEMU capability that enlighten does not implement may be turned
    /// off (it is) but not on.
    pub fn with(&self, list: &Value) -> Result<Capabilities, String> {
        let items = list
            .as_array()
            .ok_or("Invalid parameter type for 'capabilities', expected: array")?;
        let mut out = *self;
        for (i, item) in items.iter().enumerate() {
            let at = |m: &str| format!("capabilities[{i}]{m}");
            let obj = item.as_object().ok_or_else(|| {
                format!("Invalid parameter type for '{}', expected: object", at(""))
            })?;
            let name = match obj.get("capability") {
                None => return Err(format!("Parameter '{}' is missing", at(".capability"))),
                Some(v) => v.as_str().ok_or_else(|| {
                    format!(
                        "Invalid parameter type for '{}', expected: string",
                        at(".capability")
                    )
                })?,
            };
            let state = match obj.get("state") {
                None => return Err(format!("Parameter '{}' is missing", at(".state"))),
                Some(v) => v.as_bool().ok_or_else(|| {
                    format!(
                        "Invalid parameter type for '{}', expected: boolean",
                        at(".state")
                    )
                })?,
            };
            if let Some(extra) = obj
                .keys()
                .find(|k| !matches!(k.as_str(), "capability" | "state"))
            {
                return Err(format!(
                    "Parameter '{}' is unexpected",
                    at(&format!(".{extra}"))
                ));
            }
            match name {
                "events" => out.events = state,
                "auto-converge" => out.auto_converge = state,
                n if QEMU_CAPABILITIES.contains(&n) => {
                    if state {
                        return Err(format!(
                            "Migration capability '{n}' is not supported by enlighten"
                        ));
                    }
                }
                n => {
                    return Err(format!(
                        "Parameter '{}' does not accept value '{n}'",
                        at(".capability")
                    ))
                }
            }
        }
        Ok(out)
    }

    /// `query-migrate-capabilities`' reply.
    pub fn to_qmp(self) -> Value {
        Value::Array(
            QEMU_CAPABILITIES
                .iter()
                .map(|n| json!({"capability": n, "state": self.get(n)}))
                .collect(),
        )
    }
}

/// The new auto-converge parameters after `migrate-set-parameters` `args` (missing ones keep `cur`), checked
/// as QEMU checks them (its order and texts; `max-cpu-throttle` against the resulting `cpu-throttle-initial`).
pub fn throttle_params_with(
    cur: &mvm::ThrottleParams,
    args: &Map<String, Value>,
) -> Result<mvm::ThrottleParams, String> {
    let get =
        |name: &str, qemu: &str, lo: u64, hi: u64, range: &str| -> Result<Option<u8>, String> {
            match args.get(name) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if (lo..=hi).contains(&n) => Ok(u8::try_from(n).ok()),
                    _ => Err(format!(
                        "Parameter '{qemu}' expects an integer in the range of {range}"
                    )),
                },
            }
        };
    let mut p = *cur;
    if let Some(v) = get(
        "throttle-trigger-threshold",
        "throttle_trigger_threshold",
        1,
        100,
        "1 to 100",
    )? {
        p.trigger_threshold = v;
    }
    if let Some(v) = get(
        "cpu-throttle-initial",
        "cpu_throttle_initial",
        1,
        99,
        "1 to 99",
    )? {
        p.initial = v;
    }
    if let Some(v) = get(
        "cpu-throttle-increment",
        "cpu_throttle_increment",
        1,
        99,
        "1 to 99",
    )? {
        p.increment = v;
    }
    if let Some(v) = args.get("cpu-throttle-tailslow") {
        p.tailslow = v
            .as_bool()
            .ok_or("Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean")?;
    }
    let max = match args.get("max-cpu-throttle") {
        None => Some(p.max),
        Some(v) => v.as_u64().and_then(|n| u8::try_from(n).ok()),
    };
    match max {
        Some(m) if m >= p.initial && m <= 99 => p.max = m,
        _ => {
            return Err(
                "Parameter 'max_cpu_throttle' expects an integer in the range of \
                        cpu_throttle_initial to 99"
                    .to_string(),
            )
        }
    }
    Ok(p)
}

/// A live migration's events: MIGRATION_PASS per dirty sync (the first also moves `setup` to `active`, as
/// QEMU does after its setup sync), and the stop of the vCPUs (the QMP run state, and the downtime's start).
struct PassEvents<'a> {
    control: &'a MigrationControl,
    stopped_at: Mutex<Option<Instant>>,
}

impl mvm::LiveEvents for PassEvents<'_> {
    fn pass(&self, n: u64) {
        if let Some(e) = EVENTS.get().filter(|_| events_enabled()) {
            e.emit("MIGRATION_PASS", Some(json!({ "pass": n })));
        }
        if n == 1 {
            let mut i = lock(&self.control.info);
            i.setup_ms = i.start.map_or(0, |s| s.elapsed().as_millis() as u64);
            if i.status == "setup" {
                i.status = "active";
                drop(i);
                migration_event("active");
            }
        }
    }

    fn stopping(&self) -> bool {
        *lock(&self.stopped_at) = Some(Instant::now());
        crate::qmp_glue::migration_stopping()
    }
}

/// Whether a completed outgoing migration (or snapshot) holds the source's vCPUs (QEMU's `postmigrate`).
pub fn source_held() -> bool {
    CONTROL.get().is_some_and(|c| lock(&c.held).is_some())
}

/// What an incoming migration loaded: the statistics and the source's run state (live streams).
pub type Loaded = (mvm::Stats, Option<mvm::GlobalSection>);

/// Releases the vCPUs a completed outgoing migration held (QMP `cont` from `postmigrate`).
pub fn release_source() -> Option<Paused> {
    CONTROL.get().and_then(|c| lock(&c.held).take())
}

/// Installs the process's migration control (once, from `run`).
pub fn install(control: Arc<MigrationControl>) {
    let _ = CONTROL.set(control);
}

/// Handles one of [`COMMANDS`] (called by the QMP glue).
pub fn qmp_command(command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let Some(c) = CONTROL.get() else {
        return Err(QmpError::generic("migration is not available for this VM"));
    };
    match command {
        "migrate" => {
            let uri = args
                .get("uri")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
            c.start_outgoing(uri).map_err(QmpError::generic)?;
            Ok(json!({}))
        }
        "query-migrate" => Ok(c.query()),
        "migrate-incoming" => {
            let uri = args
                .get("uri")
                .and_then(Value::as_str)
                .ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
            let uri = parse_uri(uri, false).map_err(QmpError::generic)?;
            let held = lock(&c.deferred).take().ok_or_else(|| {
                QmpError::generic("'-incoming' was not specified on the command line")
            })?;
            incoming_setup_event();
            spawn_incoming(c.clone(), uri, held).map_err(QmpError::generic)?;
            Ok(json!({}))
        }
        snapshot::SNAPSHOT_SAVE => {
            let arg = |name: &str| {
                args.get(name)
                    .and_then(Value::as_str)
                    .ok_or_else(|| QmpError::generic(format!("Parameter '{name}' is missing")))
            };
            let resume = args.get("resume").and_then(Value::as_bool).unwrap_or(false);
            c.start_snapshot(arg("state")?, arg("memory")?, resume)
                .map_err(QmpError::generic)?;
            Ok(json!({}))
        }
        "migrate_cancel" => {
            c.cancel();
            Ok(json!({}))
        }
        "migrate-set-parameters" => {
            let downtime = args.get("downtime-limit").and_then(Value::as_u64);
            let bandwidth = args.get("max-bandwidth").and_then(Value::as_u64);
            // QEMU checks the throttle parameters before the downtime limit, and applies nothing on an error.
            let mut throttle = lock(&c.throttle);
            let new_throttle = throttle_params_with(&throttle, args).map_err(QmpError::generic)?;
            if downtime.is_some_and(|v| v > MAX_DOWNTIME_LIMIT_MS) {
                return Err(QmpError::generic(
                    "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
                ));
            }
            *throttle = new_throttle;
            drop(throttle);
            if let Some(live) = lock(&c.active).as_ref() {
                live.set_throttle_params(&new_throttle);
            }
            let mut p = lock(&c.params);
            if let Some(v) = downtime {
                p.0 = v;
            }
            if let Some(v) = bandwidth {
                p.1 = v;
            }
            // A running migration follows the new values at once, as in QEMU.
            if let Some(live) = lock(&c.active).as_ref() {
                live.downtime_limit_ms.store(p.0, Ordering::SeqCst);
                live.max_bandwidth.store(p.1, Ordering::SeqCst);
            }
            Ok(json!({}))
        }
        "query-migrate-parameters" => {
            let p = lock(&c.params);
            let t = lock(&c.throttle);
            Ok(json!({
                "downtime-limit": p.0,
                "max-bandwidth": p.1,
                "throttle-trigger-threshold": t.trigger_threshold,
                "cpu-throttle-initial": t.initial,
                "cpu-throttle-increment": t.increment,
                "cpu-throttle-tailslow": t.tailslow,
                "max-cpu-throttle": t.max,
            }))
        }
        "migrate-set-capabilities" => {
            let list = args.get("capabilities").unwrap_or(&Value::Null);
            let mut caps = lock(&c.caps);
            let new = caps.with(list).map_err(QmpError::generic)?;
            // QEMU: not while an outgoing migration (or a save) runs.
            let i = lock(&c.info);
            if !i.incoming && matches!(i.status, "setup" | "active" | "cancelling") {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            *caps = new;
            Ok(json!({}))
        }
        "query-migrate-capabilities" => Ok(lock(&c.caps).to_qmp()),
        other => Err(QmpError::command_not_found(other)),
    }
}

impl MigrationControl {
    /// The control for a VM: its config section and QEMU's migration blockers.
    pub fn new(
        vm: VmHandle,
        hv: Option<Arc<HvGlue>>,
        config: ConfigSection,
        blockers: Vec<&'static str>,
    ) -> Arc<MigrationControl> {
        Arc::new(MigrationControl {
            vm,
            hv,
            config,
            blockers,
            info: Mutex::new(Info {
                status: "none",
                ..Info::default()
            }),
            held: Mutex::new(None),
            deferred: Mutex::new(None),
            // QEMU's defaults: 300 ms downtime limit, 128 MiB/s.
            params: Mutex::new((mvm::DEFAULT_DOWNTIME_LIMIT_MS, mvm::DEFAULT_MAX_BANDWIDTH)),
            throttle: Mutex::new(mvm::ThrottleParams::QEMU),
            caps: Mutex::new(Capabilities::default()),
            active: Mutex::new(None),
            cutter: Mutex::new(None),
        })
    }

    /// QMP `migrate_cancel`: a running outgoing migration stops (MIGRATION `cancelling`, then `cancelled`
    /// and the source resumes); nothing happens otherwise, as in QEMU.
    fn cancel(&self) {
        let Some(live) = lock(&self.active).clone() else {
            return;
        };
        {
            let mut i = lock(&self.info);
            if !matches!(i.status, "setup" | "active") {
                return;
            }
            i.status = "cancelling";
        }
        migration_event("cancelling");
        live.cancel.store(true, Ordering::SeqCst);
        if let Some(cut) = lock(&self.cutter).as_ref() {
            cut();
        }
    }

    fn query(&self) -> Value {
        let i = lock(&self.info);
        if i.status == "none" {
            return json!({});
        }
        if i.incoming {
            return json!({ "status": i.status });
        }
        // A running live migration's own counters, else the last migration's.
        let running = lock(&self.active).as_ref().map(|c| c.stats());
        let live = running.or(i.live);
        let total_ms = i
            .start
            .map_or(i.total_ms, |s| s.elapsed().as_millis() as u64);
        let mut ram = json!({
            "transferred": i.transferred,
            "remaining": i.remaining,
            "total": self.config.ram_size,
            "duplicate": i.zero_pages,
            "skipped": 0,
            "normal": i.pages,
            "normal-bytes": i.pages * 4096,
            "dirty-sync-count": 1,
            "page-size": 4096,
            "mbps": 0.0,
            "pages-per-second": 0,
            "dirty-pages-rate": 0,
            "precopy-bytes": i.transferred,
            "downtime-bytes": 0,
            "postcopy-bytes": 0,
            "multifd-bytes": 0,
            "postcopy-requests": 0,
        });
        let mut v = json!({ "status": i.status, "total-time": total_ms });
        if let Some(l) = live {
            let completed = i.status == "completed";
            ram["transferred"] = json!(l.bytes);
            ram["remaining"] = json!(if completed { 0 } else { l.remaining });
            ram["duplicate"] = json!(l.zero_pages);
            ram["normal"] = json!(l.pages);
            ram["normal-bytes"] = json!(l.pages * 4096);
            ram["dirty-sync-count"] = json!(l.dirty_syncs);
            ram["pages-per-second"] = json!(l.pages_per_second.round() as u64);
            ram["dirty-pages-rate"] = json!(l.dirty_pages_rate);
            ram["precopy-bytes"] = json!(l.precopy_bytes);
            ram["downtime-bytes"] = json!(l.downtime_bytes);
            // Megabits per second: the last pass while active; the whole transfer once completed (QEMU:
            // transferred bytes over total time minus setup time).
            let mbps = if completed {
                let ms = total_ms.saturating_sub(i.setup_ms).max(1);
                l.bytes as f64 * 8.0 / ms as f64 / 1000.0
            } else {
                l.bandwidth * 8.0 / 1e6
            };
            ram["mbps"] = json!(mbps);
            v["setup-time"] = json!(i.setup_ms);
            if matches!(i.status, "active" | "cancelling") {
                v["expected-downtime"] = json!(l.expected_downtime_ms);
            }
            // QEMU reports the throttle only while it is on.
            if l.cpu_throttle_percentage > 0 {
                v["cpu-throttle-percentage"] = json!(l.cpu_throttle_percentage);
            }
        }
        v["ram"] = ram;
        if i.status == "completed" {
            v["downtime"] = json!(i.downtime_ms);
        }
        if let Some(e) = &i.error {
            v["error-desc"] = json!(e);
        }
        v
    }

    /// QMP `migrate`: refuses with the first blocker's text, otherwise starts the migration thread.
    pub fn start_outgoing(self: &Arc<Self>, uri: &str) -> Result<(), String> {
        if let Some(b) = self.blockers.first() {
            return Err((*b).to_string());
        }
        let uri = parse_uri(uri, false)?;
        let ctl = Arc::new(mvm::LiveControl::default());
        {
            let mut i = lock(&self.info);
            if (i.incoming && i.status == "active") || lock(&self.deferred).is_some() {
                return Err("Guest is waiting for an incoming migration".to_string());
            }
            if matches!(i.status, "setup" | "active" | "cancelling") {
                return Err("There's a migration process in progress".to_string());
            }
            *i = Info {
                status: "setup",
                start: Some(Instant::now()),
                remaining: self.config.ram_size,
                ..Info::default()
            };
            let p = lock(&self.params);
            ctl.downtime_limit_ms.store(p.0, Ordering::SeqCst);
            ctl.max_bandwidth.store(p.1, Ordering::SeqCst);
            ctl.set_throttle_params(&lock(&self.throttle));
            ctl.auto_converge
                .store(lock(&self.caps).auto_converge, Ordering::SeqCst);
            *lock(&self.active) = Some(ctl.clone());
        }
        migration_event("setup");
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || me.run_outgoing(uri, ctl))
            .map_err(|e| format!("cannot start the migration thread: {e}"))?;
        Ok(())
    }

    fn run_outgoing(&self, uri: Uri, ctl: Arc<mvm::LiveControl>) {
        let events = PassEvents {
            control: self,
            stopped_at: Mutex::new(None),
        };
        let r = self.send(&uri, &ctl, &events);
        let end = Instant::now();
        let cancelled = ctl.cancel.load(Ordering::SeqCst);
        let stats = ctl.stats();
        *lock(&self.cutter) = None;
        let mut i = lock(&self.info);
        *lock(&self.active) = None;
        i.total_ms = i.start.map_or(0, |s| (end - s).as_millis() as u64);
        i.start = None;
        i.live = Some(stats);
        i.transferred = stats.bytes;
        i.pages = stats.pages;
        i.zero_pages = stats.zero_pages;
        i.remaining = stats.remaining;
        match r {
            Ok(paused) => {
                // Downtime: from the vCPUs' stop to the destination's confirmation.
                let stopped = *lock(&events.stopped_at);
                i.downtime_ms = stopped.map_or(0, |s| (end - s).as_millis() as u64);
                i.status = "completed";
                i.remaining = 0;
                tracing::info!(
                    syncs = stats.dirty_syncs,
                    downtime_ms = i.downtime_ms,
                    total_ms = i.total_ms,
                    bytes = stats.bytes,
                    "migration completed"
                );
                // The source stays stopped (QEMU's postmigrate) until `cont` or the end.
                *lock(&self.held) = Some(paused);
                drop(i);
                crate::qmp_glue::migration_finished(true);
                migration_event("completed");
            }
            Err(e) => {
                // The vCPUs already run again (save_live and send drop them on every error path).
                let status = if cancelled {
                    "cancelled"
                } else {
                    eprintln!("error: migration failed: {e}");
                    i.error = Some(e);
                    "failed"
                };
                i.status = status;
                drop(i);
                crate::qmp_glue::migration_finished(false);
                migration_event(status);
            }
        }
    }

    /// Sends the live migration over `uri`; on success returns the stopped vCPUs (after the destination's
    /// confirmation on a socket).
    fn send(
        &self,
        uri: &Uri,
        ctl: &mvm::LiveControl,
        events: &PassEvents<'_>,
    ) -> Result<Paused, String> {
        let hv = self.hv.as_deref();
        let save = |w: Box<dyn Write>| -> Result<Paused, String> {
            let (out, paused, stats) =
                mvm::save_live(&self.vm, hv, &self.config, BufWriter::new(w), ctl, events)
                    .map_err(|e| e.to_string())?;
            // The End section is out: the destination may run already, so the migration can no longer be
            // cancelled (a cut now could leave both sides running); the verdict decides.
            *lock(&self.cutter) = None;
            lock(&self.info).live = Some(stats);
            *lock(&self.active) = None;
            // Closes a pipe or file now (a socket stays open through its read half).
            drop(out);
            Ok(paused)
        };
        // Socket transports: the stream goes out on one end, the destination's verdict comes back on a clone.
        let over_socket = |s: Box<dyn Write>, r: Box<dyn Read>| -> Result<Paused, String> {
            let paused = match save(s) {
                Ok(p) => p,
                // A destination that refused the stream early said why before it closed.
                Err(e) => {
                    if ctl.cancel.load(Ordering::SeqCst) {
                        return Err(e);
                    }
                    return Err(match wait_verdict(r) {
                        Err(v) if v.starts_with("the destination refused") => v,
                        _ => e,
                    });
                }
            };
            // Dropping `paused` on a refusal resumes the source.
            wait_verdict(r)?;
            Ok(paused)
        };
        match uri {
            Uri::File(p) => {
                let f =
                    std::fs::File::create(p).map_err(|e| format!("cannot create '{p}': {e}"))?;
                save(Box::new(f))
            }
            Uri::Exec(cmd) => {
                let mut child = spawn_shell(cmd, |c| c.stdin(std::process::Stdio::piped()))?;
                let stdin = child
                    .stdin
                    .take()
                    .ok_or_else(|| format!("no stdin for '{cmd}'"))?;
                let r = save(Box::new(stdin));
                let status = child.wait().map_err(|e| format!("'{cmd}': {e}"));
                let paused = r?;
                match status? {
                    st if st.success() => Ok(paused),
                    st => Err(format!("'{cmd}' failed: {st}")),
                }
            }
            Uri::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p)
                    .map_err(|e| format!("Failed to connect to '{p}': {e}"))?;
                let r = s.try_clone().map_err(|e| e.to_string())?;
                let cut = s.try_clone().map_err(|e| e.to_string())?;
                *lock(&self.cutter) = Some(Box::new(move || {
                    let _ = cut.shutdown(std::net::Shutdown::Both);
                }));
                let _ = s.set_write_timeout(Some(SOCKET_TIMEOUT));
                let _ = r.set_read_timeout(Some(SOCKET_TIMEOUT));
                over_socket(Box::new(s), Box::new(r))
            }
            Uri::Tcp(a) => {
                let s = std::net::TcpStream::connect(a)
                    .map_err(|e| format!("Failed to connect to '{a}': {e}"))?;
                let r = s.try_clone().map_err(|e| e.to_string())?;
                let cut = s.try_clone().map_err(|e| e.to_string())?;
                *lock(&self.cutter) = Some(Box::new(move || {
                    let _ = cut.shutdown(std::net::Shutdown::Both);
                }));
                let _ = s.set_write_timeout(Some(SOCKET_TIMEOUT));
                let _ = r.set_read_timeout(Some(SOCKET_TIMEOUT));
                over_socket(Box::new(s), Box::new(r))
            }
            Uri::Defer => Err("'defer' is not an outgoing migration URI".to_string()),
        }
    }

    /// `-incoming`: loads the stream into this (held, not yet running) VM, then releases `held`. On a socket,
    /// tells the source the verdict.
    pub fn run_incoming(&self, uri: &Uri, held: &Paused) -> Result<Loaded, String> {
        let hv = self.hv.as_deref();
        // A snapshot's memory file is looked for next to a `file:` state file first.
        let opts = snapshot::memory_file_options(match uri {
            Uri::File(p) => Some(p.as_str()),
            _ => None,
        });
        let load = |r: Box<dyn Read>| -> Result<Loaded, MigrationError> {
            let mut progress = |_: u64, _: u64| {};
            let input = BufReader::new(r);
            mvm::restore(held, hv, &self.config, input, &mut progress, &opts)
        };
        let verdict = |mut w: Box<dyn Write>, r: &Result<Loaded, MigrationError>| {
            let msg = match r {
                Ok(_) => vec![ACK_OK],
                Err(e) => {
                    let mut m = vec![ACK_FAIL];
                    m.extend_from_slice(e.to_string().as_bytes());
                    m
                }
            };
            let _ = w.write_all(&msg);
            let _ = w.flush();
        };
        match uri {
            Uri::File(p) => {
                let f = std::fs::File::open(p).map_err(|e| format!("cannot open '{p}': {e}"))?;
                load(Box::new(f)).map_err(|e| e.to_string())
            }
            Uri::Exec(cmd) => {
                let mut child = spawn_shell(cmd, |c| c.stdout(std::process::Stdio::piped()))?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| format!("no stdout for '{cmd}'"))?;
                let r = load(Box::new(out)).map_err(|e| e.to_string());
                let _ = child.wait();
                r
            }
            Uri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let l = std::os::unix::net::UnixListener::bind(p)
                    .map_err(|e| format!("cannot listen on '{p}': {e}"))?;
                let (s, _) = l.accept().map_err(|e| format!("accept on '{p}': {e}"))?;
                let w = s.try_clone().map_err(|e| e.to_string())?;
                let r = load(Box::new(s));
                verdict(Box::new(w), &r);
                r.map_err(|e| e.to_string())
            }
            Uri::Tcp(a) => {
                let l = std::net::TcpListener::bind(a)
                    .map_err(|e| format!("cannot listen on '{a}': {e}"))?;
                let (s, _) = l.accept().map_err(|e| format!("accept on '{a}': {e}"))?;
                let w = s.try_clone().map_err(|e| e.to_string())?;
                let r = load(Box::new(s));
                verdict(Box::new(w), &r);
                r.map_err(|e| e.to_string())
            }
            Uri::Defer => Err("'defer' is not a migration source".to_string()),
        }
    }
}

/// Called by `run` after the machine, the engine and QMP exist and before the vCPUs run: checks
/// `tsc-frequency=` against KVM_GET_TSC_KHZ (QEMU's rule without TSC scaling), installs the migration control
/// with QEMU's blockers, and with `-incoming` holds the vCPUs and loads the stream on a thread; a failed load
/// ends the process with status 1, as QEMU's does.
pub fn prepare(
    o: &crate::run::RunOptions,
    machine: &vmm::Machine,
    cpuid: &[hyperv::cpuid::CpuidEntry],
    hv: Option<&Arc<HvGlue>>,
) -> Result<(), String> {
    let cfg = hyperv::config::CpuConfig::parse(&o.cpu).map_err(|e| e.to_string())?;
    let user_khz = cfg.tsc_frequency.map(|hz| hz / 1000);
    check_tsc_frequency(user_khz, machine.tsc_khz())?;
    let config = mvm::config_section(
        o.ram_size,
        o.smp,
        cpuid,
        machine.tsc_khz(),
        user_khz.and_then(|k| u32::try_from(k).ok()),
    );
    let control = MigrationControl::new(
        machine.handle(),
        hv.cloned(),
        config,
        cfg.migration_blockers(),
    );
    install(control.clone());
    let Some(spec) = &o.incoming else {
        return Ok(());
    };
    let uri = parse_uri(spec, true).map_err(|e| format!("-incoming {spec}: {e}"))?;
    incoming_setup_event();
    let held = machine.handle().hold_all();
    if uri == Uri::Defer {
        // QMP `migrate-incoming` starts the load later.
        *lock(&control.deferred) = Some(held);
        return Ok(());
    }
    spawn_incoming(control, uri, held)
}

/// Loads the stream on a thread; releases the vCPUs on success, ends the process with status 1 on failure.
fn spawn_incoming(control: Arc<MigrationControl>, uri: Uri, held: Paused) -> Result<(), String> {
    let handle = control.vm.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            *lock(&control.info) = Info {
                status: "active",
                incoming: true,
                ..Info::default()
            };
            migration_event("active");
            match control.run_incoming(&uri, &held) {
                Ok((stats, global)) => {
                    tracing::info!(?stats, "incoming migration loaded");
                    lock(&control.info).status = "completed";
                    migration_event("completed");
                    // QEMU's autostart rule: running, or paused with -S (or after `stop`) or when the source
                    // was paused.
                    crate::qmp_glue::incoming_loaded(global.is_none_or(|g| g.running));
                    drop(held);
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    eprintln!("error: load of migration failed");
                    lock(&control.info).status = "failed";
                    migration_event("failed");
                    handle.request_exit(1);
                    std::mem::forget(held);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the incoming migration thread: {e}"))
}

/// `enlighten snapshot -qmp unix:PATH|tcp:HOST:PORT [--stream] STATE [MEMORY]`: saves a running VM through its
/// QMP socket, with a progress bar on stderr. By default a Firecracker-style snapshot (QMP `x-snapshot-save`):
/// the state file STATE plus the raw memory file MEMORY (default `STATE.mem`), which `enlighten restore STATE`
/// maps copy-on-write. `--stream` writes the checksummed migration stream instead (QMP `migrate` to
/// `file:STATE`). The VM stays paused afterwards.
pub fn snapshot_main(args: &[String]) -> std::process::ExitCode {
    if args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "-help" | "--help"))
    {
        println!("{SNAPSHOT_HELP}");
        return std::process::ExitCode::SUCCESS;
    }
    match snapshot(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The parsed `enlighten snapshot` arguments.
#[derive(Debug, PartialEq, Eq)]
struct SnapshotArgs {
    qmp: String,
    stream: bool,
    /// `--resume`: the VM runs again afterwards if it ran before (x-snapshot-save's `resume`).
    resume: bool,
    state: String,
    memory: Option<String>,
}

const SNAPSHOT_HELP: &str = "\
usage: enlighten snapshot -qmp unix:PATH|tcp:HOST:PORT [--stream | --resume] STATE [MEMORY]

Saves the running VM behind the QMP socket, with a progress bar on stderr; the VM stays paused afterwards
(postmigrate: QMP cont resumes it) unless --resume is given.

  STATE [MEMORY]  a Firecracker-style snapshot (QMP x-snapshot-save): the checksummed state file STATE and
                  the sparse raw memory file MEMORY (default STATE.mem); restore maps MEMORY copy-on-write,
                  so do not modify it; it may move together with STATE (restore looks next to STATE first)
  --resume        the VM runs again once the snapshot is written, if it ran before (as QEMU's savevm)
  --stream FILE   one checksummed migration stream instead (QMP migrate file:FILE)

Restore either with: enlighten restore STATE|FILE [the VM's options]";

const SNAPSHOT_USAGE: &str =
    "usage: enlighten snapshot -qmp unix:PATH|tcp:HOST:PORT [--stream | --resume] STATE [MEMORY]";

fn parse_snapshot_args(args: &[String]) -> Result<SnapshotArgs, String> {
    let mut qmp = None;
    let mut stream = false;
    let mut resume = false;
    let mut files = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-qmp" | "--qmp" => qmp = Some(it.next().ok_or(SNAPSHOT_USAGE)?.clone()),
            "-stream" | "--stream" => stream = true,
            "-resume" | "--resume" => resume = true,
            f if !f.starts_with('-') => files.push(f.to_string()),
            _ => return Err(SNAPSHOT_USAGE.to_string()),
        }
    }
    let qmp = qmp.ok_or(SNAPSHOT_USAGE)?;
    if stream && resume {
        return Err(SNAPSHOT_USAGE.to_string());
    }
    let (state, memory) = match (files.as_slice(), stream) {
        ([s], _) => (s.clone(), None),
        ([s, m], false) => (s.clone(), Some(m.clone())),
        _ => return Err(SNAPSHOT_USAGE.to_string()),
    };
    Ok(SnapshotArgs {
        qmp,
        stream,
        resume,
        state,
        memory,
    })
}

fn snapshot(args: &[String]) -> Result<(), String> {
    let a = parse_snapshot_args(args)?;
    let qmp = a.qmp.as_str();
    let file = std::path::absolute(&a.state).map_err(|e| format!("{}: {e}", a.state))?;
    let memory = match &a.memory {
        Some(m) => std::path::absolute(m).map_err(|e| format!("{m}: {e}"))?,
        None => {
            let mut m = file.clone().into_os_string();
            m.push(".mem");
            m.into()
        }
    };
    let stream: Box<dyn ReadWrite> = if let Some(p) = qmp.strip_prefix("unix:") {
        let p = p.split(',').next().unwrap_or(p);
        Box::new(
            std::os::unix::net::UnixStream::connect(p)
                .map_err(|e| format!("cannot connect to QMP at {p}: {e}"))?,
        )
    } else if let Some(a) = qmp.strip_prefix("tcp:") {
        let a = a.split(',').next().unwrap_or(a);
        Box::new(
            std::net::TcpStream::connect(a)
                .map_err(|e| format!("cannot connect to QMP at {a}: {e}"))?,
        )
    } else {
        return Err(SNAPSHOT_USAGE.to_string());
    };
    let mut c = QmpClient::new(stream)?;
    c.call("qmp_capabilities", json!({}))?;
    let written = if a.stream {
        c.call(
            "migrate",
            json!({ "uri": format!("file:{}", file.display()) }),
        )?;
        file.display().to_string()
    } else {
        c.call(
            snapshot::SNAPSHOT_SAVE,
            json!({
                "state": file.display().to_string(),
                "memory": memory.display().to_string(),
                "resume": a.resume,
            }),
        )?;
        format!("{} and {}", file.display(), memory.display())
    };
    let start = Instant::now();
    loop {
        let q = c.call("query-migrate", json!({}))?;
        let status = q["status"].as_str().unwrap_or("");
        let total = q["ram"]["total"].as_u64().unwrap_or(0);
        let done = if status == "completed" {
            total
        } else {
            total.saturating_sub(q["ram"]["remaining"].as_u64().unwrap_or(total))
        };
        eprint!("\r{}", progress_bar(done, total));
        match status {
            "completed" => {
                eprintln!(
                    "\nsnapshot written to {written} ({} bytes, {} ms)",
                    q["ram"]["transferred"],
                    start.elapsed().as_millis()
                );
                return Ok(());
            }
            "failed" => {
                eprintln!();
                return Err(format!(
                    "snapshot failed: {}",
                    q["error-desc"].as_str().unwrap_or("unknown error")
                ));
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// `enlighten restore FILE [run options]`: `run` with `-incoming file:FILE`. FILE is a snapshot's state file
/// (its memory file is mapped copy-on-write) or a migration stream written by `migrate` to `file:`.
pub fn restore_main(args: &[String]) -> std::process::ExitCode {
    if matches!(
        args.first().map(String::as_str),
        Some("-h" | "-help" | "--help")
    ) {
        println!("{}", snapshot::RESTORE_HELP);
        return std::process::ExitCode::SUCCESS;
    }
    let a = match snapshot::parse_restore_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    snapshot::set_restore_memory(a.memory.as_deref(), a.verify);
    let mut run_args = a.run;
    run_args.push("-incoming".to_string());
    run_args.push(format!("file:{}", a.file));
    crate::run::main(run_args)
}

/// Runs `cmd` with `/bin/sh -c` (QMP's `exec:` transport); `pipe` sets up the end the stream goes through.
fn spawn_shell(
    cmd: &str,
    pipe: impl FnOnce(&mut std::process::Command) -> &mut std::process::Command,
) -> Result<std::process::Child, String> {
    let mut c = std::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    pipe(&mut c)
        .spawn()
        .map_err(|e| format!("cannot run '{cmd}': {e}"))
}

/// `[#####.....]  40% 51/128 MiB`.
pub fn progress_bar(done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let pct = (done.saturating_mul(100))
        .checked_div(total)
        .unwrap_or(100)
        .min(100);
    let filled = (pct * WIDTH / 100) as usize;
    format!(
        "[{}{}] {pct:3}% {}/{} MiB",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        done >> 20,
        total >> 20
    )
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

/// A minimal QMP client (JSON lines) for `enlighten snapshot`.
struct QmpClient {
    reader: BufReader<Box<dyn ReadWrite>>,
}

impl QmpClient {
    fn new(stream: Box<dyn ReadWrite>) -> Result<QmpClient, String> {
        let mut c = QmpClient {
            reader: BufReader::new(stream),
        };
        let greeting = c.line()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP server (greeting {greeting})"));
        }
        Ok(c)
    }

    fn line(&mut self) -> Result<Value, String> {
        use std::io::BufRead;
        let mut l = String::new();
        let n = self
            .reader
            .read_line(&mut l)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("the QMP connection closed".to_string());
        }
        serde_json::from_str(&l).map_err(|e| format!("bad QMP reply {l:?}: {e}"))
    }

    /// Sends a command and returns its `return` value, or the error's description.
    fn call(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        let w = self.reader.get_mut();
        writeln!(w, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("QMP error").to_string());
            }
        }
    }
}

/// Read/write timeout of the migration sockets on the source.
const SOCKET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the destination's verdict.
fn wait_verdict(mut r: impl Read) -> Result<(), String> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)
        .map_err(|e| format!("the destination did not confirm the migration: {e}"))?;
    if b[0] == ACK_OK {
        return Ok(());
    }
    let mut msg = Vec::new();
    let _ = r.take(4096).read_to_end(&mut msg);
    Err(format!(
        "the destination refused the migration: {}",
        String::from_utf8_lossy(&msg)
    ))
}

/// QEMU's check when `tsc-frequency=` is given and TSC scaling (`KVM_CAP_TSC_CONTROL`) is unavailable: the
/// requested frequency must equal KVM_GET_TSC_KHZ. `KVM_SET_TSC_KHZ` is never called.
pub fn check_tsc_frequency(user_khz: Option<u64>, host_khz: u32) -> Result<(), String> {
    match user_khz {
        Some(k) if k != u64::from(host_khz) => Err(format!(
            "TSC frequency mismatch between VM ({k} kHz) and host ({host_khz} kHz), and TSC scaling unavailable"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let cases: &[(&str, bool, Result<Uri, &str>)] = &[
            ("file:/tmp/x", false, Ok(Uri::File("/tmp/x".into()))),
            ("unix:/tmp/s", false, Ok(Uri::Unix("/tmp/s".into()))),
            (
                "tcp:127.0.0.1:4444",
                true,
                Ok(Uri::Tcp("127.0.0.1:4444".into())),
            ),
            ("tcp:[::1]:4444", false, Ok(Uri::Tcp("[::1]:4444".into()))),
            (
                "exec:cat > /tmp/x",
                false,
                Ok(Uri::Exec("cat > /tmp/x".into())),
            ),
            ("defer", true, Ok(Uri::Defer)),
            ("defer", false, Err("unknown migration protocol: defer")),
            ("tcp:host", false, Err("expected tcp:HOST:PORT")),
            ("tcp:host:99999", false, Err("expected tcp:HOST:PORT")),
            ("file:", false, Err("the path is empty")),
            ("rdma:x", false, Err("unknown migration protocol: rdma:x")),
        ];
        for (s, incoming, expected) in cases {
            let got = parse_uri(s, *incoming);
            match expected {
                Ok(u) => assert_eq!(got.as_ref(), Ok(u), "{s}"),
                Err(frag) => {
                    let e = got.expect_err(s);
                    assert!(e.contains(frag), "{s}: {e}");
                }
            }
        }
    }

    #[test]
    fn capabilities() {
        let on = Capabilities {
            events: true,
            auto_converge: true,
        };
        let cases: &[(Value, Result<Capabilities, &str>)] = &[
            (json!([]), Ok(Capabilities::default())),
            (
                json!([{"capability": "events", "state": true},
                       {"capability": "auto-converge", "state": true}]),
                Ok(on),
            ),
            // A QEMU capability enlighten lacks may be turned off (it is), never on.
            (
                json!([{"capability": "xbzrle", "state": false}]),
                Ok(Capabilities::default()),
            ),
            (
                json!([{"capability": "events", "state": true},
                       {"capability": "multifd", "state": true}]),
                Err("Migration capability 'multifd' is not supported by enlighten"),
            ),
            (
                json!([{"capability": "postcopy-ram", "state": true}]),
                Err("Migration capability 'postcopy-ram' is not supported by enlighten"),
            ),
            (
                json!([{"capability": "turbo", "state": true}]),
                Err("Parameter 'capabilities[0].capability' does not accept value 'turbo'"),
            ),
            (
                json!([{"capability": "events"}]),
                Err("Parameter 'capabilities[0].state' is missing"),
            ),
            (
                json!([{"state": true}]),
                Err("Parameter 'capabilities[0].capability' is missing"),
            ),
            (
                json!([{"capability": "events", "state": 1}]),
                Err("Invalid parameter type for 'capabilities[0].state', expected: boolean"),
            ),
            (
                json!([{"capability": 7, "state": true}]),
                Err("Invalid parameter type for 'capabilities[0].capability', expected: string"),
            ),
            (
                json!([{"capability": "events", "state": true}, "x"]),
                Err("Invalid parameter type for 'capabilities[1]', expected: object"),
            ),
            (
                json!([{"capability": "events", "state": true, "x": 1}]),
                Err("Parameter 'capabilities[0].x' is unexpected"),
            ),
            (
                json!({"capability": "events"}),
                Err("Invalid parameter type for 'capabilities', expected: array"),
            ),
        ];
        for (list, expected) in cases {
            let got = Capabilities::default().with(list);
            assert_eq!(got, expected.map_err(str::to_string), "{list}");
        }
        // All or nothing: an error leaves the caller's copy as it was; turning off works.
        assert_eq!(
            on.with(&json!([{"capability": "events", "state": false}])),
            Ok(Capabilities {
                events: false,
                auto_converge: true
            })
        );
        // The query lists every QEMU capability once, with enlighten's two in their state.
        let q = on.to_qmp();
        let list = q.as_array().expect("array");
        assert_eq!(list.len(), QEMU_CAPABILITIES.len());
        for item in list {
            let name = item["capability"].as_str().expect("name");
            let expected = matches!(name, "events" | "auto-converge");
            assert_eq!(item["state"], expected, "{item}");
        }
    }

    #[test]
    fn throttle_parameters() {
        let q = mvm::ThrottleParams::QEMU;
        let args = |v: Value| v.as_object().cloned().unwrap_or_default();
        let cases: &[(Value, Result<mvm::ThrottleParams, &str>)] = &[
            (json!({}), Ok(q)),
            (
                json!({"cpu-throttle-initial": 50, "cpu-throttle-increment": 25,
                       "max-cpu-throttle": 90, "throttle-trigger-threshold": 100,
                       "cpu-throttle-tailslow": true}),
                Ok(mvm::ThrottleParams {
                    initial: 50,
                    increment: 25,
                    max: 90,
                    trigger_threshold: 100,
                    tailslow: true,
                }),
            ),
            (
                json!({"cpu-throttle-initial": 1, "cpu-throttle-increment": 99, "throttle-trigger-threshold": 1}),
                Ok(mvm::ThrottleParams {
                    initial: 1,
                    increment: 99,
                    trigger_threshold: 1,
                    ..q
                }),
            ),
            (
                json!({"cpu-throttle-initial": 0}),
                Err("Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
            ),
            (
                json!({"cpu-throttle-initial": 100}),
                Err("Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
            ),
            (
                json!({"cpu-throttle-increment": 0}),
                Err("Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
            ),
            (
                json!({"cpu-throttle-increment": 1000}),
                Err("Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
            ),
            (
                json!({"throttle-trigger-threshold": 0}),
                Err("Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
            ),
            (
                json!({"throttle-trigger-threshold": 101}),
                Err("Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
            ),
            (
                json!({"max-cpu-throttle": 100}),
                Err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            ),
            // Below the initial throttle, given together or already in force.
            (
                json!({"max-cpu-throttle": 10}),
                Err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            ),
            (
                json!({"cpu-throttle-initial": 60, "max-cpu-throttle": 50}),
                Err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            ),
            (
                json!({"max-cpu-throttle": 20}),
                Ok(mvm::ThrottleParams { max: 20, ..q }),
            ),
            (
                json!({"max-cpu-throttle": u64::MAX}),
                Err("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            ),
        ];
        for (a, expected) in cases {
            assert_eq!(
                throttle_params_with(&q, &args(a.clone())),
                expected.map_err(str::to_string),
                "{a}"
            );
        }
        // The initial throttle may not exceed the maximum in force.
        let low_max = mvm::ThrottleParams { max: 30, ..q };
        assert!(
            throttle_params_with(&low_max, &args(json!({"cpu-throttle-initial": 40}))).is_err()
        );
    }

    #[test]
    fn tsc_frequency_rule() {
        assert!(check_tsc_frequency(None, 2_000_000).is_ok());
        assert!(check_tsc_frequency(Some(2_000_000), 2_000_000).is_ok());
        assert_eq!(
            check_tsc_frequency(Some(1_000_000), 2_000_000).unwrap_err(),
            "TSC frequency mismatch between VM (1000000 kHz) and host (2000000 kHz), and TSC scaling \
             unavailable"
        );
    }

    #[test]
    fn progress_bars() {
        let cases: &[(u64, u64, &str)] = &[
            (
                0,
                128 << 20,
                "[..............................]   0% 0/128 MiB",
            ),
            (
                64 << 20,
                128 << 20,
                "[###############...............]  50% 64/128 MiB",
            ),
            (
                128 << 20,
                128 << 20,
                "[##############################] 100% 128/128 MiB",
            ),
            (0, 0, "[##############################] 100% 0/0 MiB"),
            (
                u64::MAX,
                1,
                "[##############################] 100% 17592186044415/0 MiB",
            ),
        ];
        for (done, total, bar) in cases {
            assert_eq!(progress_bar(*done, *total), *bar, "{done}/{total}");
        }
    }

    #[test]
    fn snapshot_args() {
        let ok = |qmp: &str, stream, state: &str, memory: Option<&str>| {
            Ok(SnapshotArgs {
                qmp: qmp.to_string(),
                stream,
                resume: false,
                state: state.to_string(),
                memory: memory.map(str::to_string),
            })
        };
        let cases: &[(&[&str], Result<SnapshotArgs, String>)] = &[
            (&["-qmp", "unix:/q", "s"], ok("unix:/q", false, "s", None)),
            (
                &["--qmp", "tcp:h:1", "s", "m"],
                ok("tcp:h:1", false, "s", Some("m")),
            ),
            (
                &["-qmp", "unix:/q", "--stream", "s"],
                ok("unix:/q", true, "s", None),
            ),
            (&["s", "-qmp", "unix:/q"], ok("unix:/q", false, "s", None)),
            (
                &["-qmp", "unix:/q", "--resume", "s", "m"],
                ok("unix:/q", false, "s", Some("m")).map(|a| SnapshotArgs { resume: true, ..a }),
            ),
            (
                &["-qmp", "unix:/q", "--stream", "--resume", "s"],
                Err(SNAPSHOT_USAGE.into()),
            ),
            (
                &["-qmp", "unix:/q", "--stream", "s", "m"],
                Err(SNAPSHOT_USAGE.into()),
            ),
            (&["-qmp", "unix:/q"], Err(SNAPSHOT_USAGE.into())),
            (&["s"], Err(SNAPSHOT_USAGE.into())),
            (&["-qmp"], Err(SNAPSHOT_USAGE.into())),
            (&["-qmp", "unix:/q", "-x", "s"], Err(SNAPSHOT_USAGE.into())),
            (
                &["-qmp", "unix:/q", "a", "b", "c"],
                Err(SNAPSHOT_USAGE.into()),
            ),
            (&[], Err(SNAPSHOT_USAGE.into())),
        ];
        for (args, expected) in cases {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            assert_eq!(&parse_snapshot_args(&args), expected, "{args:?}");
        }
    }

    #[test]
    fn verdicts() {
        assert!(wait_verdict(&[ACK_OK][..]).is_ok());
        let mut fail = vec![ACK_FAIL];
        fail.extend_from_slice(b"Guest enabled re-enlightenment notifications");
        assert!(wait_verdict(&fail[..])
            .unwrap_err()
            .contains("refused the migration: Guest enabled re-enlightenment"));
        assert!(wait_verdict(&[][..])
            .unwrap_err()
            .contains("did not confirm"));
    }
}

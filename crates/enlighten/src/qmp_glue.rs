//! The QMP side of a running VM: QEMU's run states, the commands of `docs/qmp.md` and the events
//! (STOP, RESUME, RESET, SHUTDOWN, POWERDOWN, GUEST_PANICKED) with QEMU 7.2's ordering.
//!
//! Locking: `ops` serialises the commands that wait for the vCPUs (`stop`, `cont`); `state` is only
//! held for short updates and never while waiting for a vCPU, because the life-cycle hook and the
//! panic notifier take it on the event-loop and vCPU threads.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use qmp::{
    CommandSpec, CpuInfoFast, Event, EventSink, GuestPanicAction, GuestPanicInformation, KvmInfo,
    NameInfo, QmpError, QmpHandler, RunState, ShutdownCause,
};
use serde_json::{json, Map, Value};
use vmm::lifecycle::{LifecycleHook, PanicAction};
use vmm::{Paused, VmHandle};

/// Builds the `query-hyperv` reply (called with the vCPUs paused).
pub type HypervQuery = Box<dyn Fn() -> Value + Send + Sync>;

/// The commands enlighten implements beyond the `qmp` crate's built-ins, in `query-commands` order.
pub const COMMANDS: &[&str] = &[
    "query-status",
    "query-name",
    "query-cpus-fast",
    "query-kvm",
    "query-hyperv",
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "quit",
    "inject-nmi",
    // crate::migrate::COMMANDS
    "migrate",
    "query-migrate",
    "migrate_cancel",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
];

struct State {
    run: RunState,
    /// vCPUs held by `stop` or `-S` (or by the life-cycle panic path).
    held: Option<Paused>,
    /// A SHUTDOWN was already reported (a panic with action shutdown): the power-off that follows
    /// must not report a second one.
    shutdown_reported: bool,
    /// The VM was running when an outgoing migration stopped it (it resumes if the migration fails).
    migration_was_running: bool,
}

/// The QMP handler and life-cycle hook of one VM.
pub struct VmControl {
    vm: VmHandle,
    events: EventSink,
    name: Option<String>,
    ops: Mutex<()>,
    state: Mutex<State>,
    hyperv: OnceLock<HypervQuery>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmControl {
    /// A controller for `vm`. With `prelaunch` (`-S`), the vCPUs are held before they run any guest
    /// code (call it before [`vmm::Machine::run`]) until `cont`. With `incoming` (`-incoming`), the VM is
    /// `inmigrate` until the stream is loaded ([`incoming_loaded`]).
    pub fn new(
        vm: VmHandle,
        events: EventSink,
        name: Option<String>,
        prelaunch: bool,
        incoming: bool,
    ) -> Arc<VmControl> {
        let held = prelaunch.then(|| vm.hold_all());
        let run = match (incoming, prelaunch) {
            (true, _) => RunState::Inmigrate,
            (false, true) => RunState::Prelaunch,
            (false, false) => RunState::Running,
        };
        Arc::new(VmControl {
            vm,
            events,
            name,
            ops: Mutex::new(()),
            state: Mutex::new(State {
                run,
                held,
                shutdown_reported: false,
                migration_was_running: false,
            }),
            hyperv: OnceLock::new(),
        })
    }

    /// Sets the `query-hyperv` provider (only when the Hyper-V engine is installed).
    pub fn set_hyperv_query(&self, query: HypervQuery) {
        let _ = self.hyperv.set(query);
    }

    /// The current run state (`query-status`).
    pub fn run_state(&self) -> RunState {
        let run = lock(&self.state).run;
        // A save that holds the source without the migration hooks (`x-snapshot-save`) is postmigrate too.
        if run == RunState::Running && crate::migrate::source_held() {
            RunState::Postmigrate
        } else {
            run
        }
    }

    fn send(&self, event: Event) {
        self.events.send(&event);
    }

    /// A guest panic was reported: emits GUEST_PANICKED, then STOP (and SHUTDOWN with reason
    /// `guest-panic` for the shutdown actions), as QEMU's `qemu_system_guest_panicked` does, and
    /// applies `action` (holds the vCPUs; ends the machine for shutdown/exit-failure). Safe on a
    /// vCPU thread.
    pub fn guest_panic(&self, params: Option<[u64; 5]>, action: PanicAction) {
        let info = params.map(GuestPanicInformation::hyperv);
        let qapi_action = match action {
            PanicAction::Pause => GuestPanicAction::Pause,
            PanicAction::Shutdown | PanicAction::ExitFailure => GuestPanicAction::Poweroff,
            PanicAction::None => GuestPanicAction::Run,
        };
        let mut st = lock(&self.state);
        self.send(Event::guest_panicked(qapi_action, info));
        if action == PanicAction::None {
            return;
        }
        if st.run.is_running() {
            st.run = RunState::GuestPanicked;
            self.send(Event::stop());
        }
        if st.held.is_none() {
            st.held = Some(self.vm.hold_all());
        }
        if matches!(action, PanicAction::Shutdown | PanicAction::ExitFailure) {
            self.send(Event::shutdown(ShutdownCause::GuestPanic));
            st.shutdown_reported = true;
            st.run = RunState::Shutdown;
            drop(st);
            if action == PanicAction::ExitFailure {
                self.vm.request_exit(1);
            } else {
                self.vm.stop();
            }
        }
    }

    fn stop(&self) -> Result<Value, QmpError> {
        let _ops = lock(&self.ops);
        {
            let mut st = lock(&self.state);
            if st.run == RunState::Inmigrate {
                // QEMU: the VM will not start once the incoming migration is loaded (autostart off).
                if st.held.is_none() {
                    st.held = Some(self.vm.hold_all());
                }
                return Ok(qmp::empty_return());
            }
        }
        if !lock(&self.state).run.is_running() {
            // QEMU's vm_stop() does nothing (and sends no STOP) when the VM is not running.
            return Ok(qmp::empty_return());
        }
        let paused = self.vm.pause_all();
        let mut st = lock(&self.state);
        if st.run.is_running() {
            st.run = RunState::Paused;
            st.held = Some(paused);
            self.send(Event::stop());
        }
        Ok(qmp::empty_return())
    }

    fn cont(&self) -> Result<Value, QmpError> {
        let _ops = lock(&self.ops);
        let mut st = lock(&self.state);
        if st.run.needs_reset() {
            return Err(QmpError::reset_required());
        }
        if st.run.is_running() && crate::migrate::source_held() {
            st.run = RunState::Postmigrate;
        }
        if st.run.is_running() {
            // QEMU's vm_prepare_start() reports a STOP/RESUME pair for a VM that already runs.
            self.send(Event::stop());
            self.send(Event::resume());
            return Ok(qmp::empty_return());
        }
        if st.run == RunState::Inmigrate {
            // QEMU: the VM starts once the incoming migration is loaded (autostart on).
            let held = st.held.take();
            drop(st);
            drop(held);
            return Ok(qmp::empty_return());
        }
        if st.run == RunState::Postmigrate {
            // QEMU allows postmigrate -> running: the source's guest carries on.
            self.send(Event::resume());
            st.run = RunState::Running;
            let held = st.held.take();
            drop(st);
            drop(held);
            drop(crate::migrate::release_source());
            return Ok(qmp::empty_return());
        }
        if !st.run.can_transition_to(RunState::Running) {
            return Err(QmpError::generic(format!(
                "cannot continue a VM in state '{}'",
                st.run
            )));
        }
        self.send(Event::resume());
        st.run = RunState::Running;
        let held = st.held.take();
        drop(st);
        drop(held);
        Ok(qmp::empty_return())
    }

    /// An outgoing migration is about to stop the vCPUs for its last pass: a running VM goes to
    /// `finish-migrate` with a STOP event, a paused one silently (QEMU's `vm_stop_force_state`).
    fn migration_stopping(&self) -> bool {
        let mut st = lock(&self.state);
        let was_running = st.run.is_running();
        st.migration_was_running = was_running;
        if st.run.is_running() {
            st.run = RunState::FinishMigrate;
            self.send(Event::stop());
        } else if st.run == RunState::Paused {
            st.run = RunState::FinishMigrate;
        }
        was_running
    }

    /// An outgoing migration ended: `postmigrate` when it completed, otherwise the VM runs again (with a
    /// RESUME event) if it ran before, as QEMU's `migration_iteration_finish` does.
    fn migration_finished(&self, completed: bool) {
        let mut st = lock(&self.state);
        if completed {
            if matches!(
                st.run,
                RunState::FinishMigrate | RunState::Running | RunState::Paused
            ) {
                st.run = RunState::Postmigrate;
            }
        } else if st.run == RunState::FinishMigrate {
            if st.migration_was_running {
                st.run = RunState::Running;
                self.send(Event::resume());
            } else {
                st.run = RunState::Paused;
            }
        }
    }

    /// `x-snapshot-save` has stopped the vCPUs for its write: a running VM goes to `save-vm` with a STOP event;
    /// any other state is left alone (QEMU's `vm_stop(RUN_STATE_SAVE_VM)` in `savevm`/`snapshot-save`).
    fn snapshot_stopped(&self) {
        let mut st = lock(&self.state);
        if st.run.is_running() {
            st.run = RunState::SaveVm;
            self.send(Event::stop());
        }
    }

    /// `x-snapshot-save` ended. A VM it stopped (`save-vm`) runs again with a RESUME event, as QEMU's `savevm`
    /// restarts it, after a failure or with `resume`; after a completed save without `resume` it stays stopped
    /// in `postmigrate`, as after `migrate`. A VM that was not running is left as it is. The save's hold on
    /// the vCPUs must be kept in `postmigrate` (now, or from an earlier save or migration; in the other
    /// stopped states `stop`, `-S` or the panic path hold the vCPUs themselves): then `keep` stores it, under
    /// the state lock, so that `cont` always finds it (the lock order of `cont`: state, then the migration's
    /// hold). Returns whether it was kept.
    fn snapshot_finished(&self, completed: bool, resume: bool, keep: impl FnOnce()) -> bool {
        let mut st = lock(&self.state);
        let kept = if st.run != RunState::SaveVm {
            st.run == RunState::Postmigrate
        } else if completed && !resume {
            st.run = RunState::Postmigrate;
            true
        } else {
            st.run = RunState::Running;
            self.send(Event::resume());
            false
        };
        if kept {
            keep();
        }
        kept
    }

    /// The incoming stream was loaded: the VM runs (RESUME), or stays `paused` with `-S` or after `stop`
    /// (QEMU's autostart rule), or when the source was not running (QEMU's global state).
    fn incoming_loaded(&self, source_running: bool) {
        let mut st = lock(&self.state);
        if st.run != RunState::Inmigrate {
            return;
        }
        if !source_running && st.held.is_none() {
            st.held = Some(self.vm.hold_all());
        }
        if st.held.is_some() {
            st.run = RunState::Paused;
        } else {
            st.run = RunState::Running;
            self.send(Event::resume());
        }
    }

    /// SIGTERM/SIGINT/SIGHUP: SHUTDOWN with reason `host-signal`, then the machine ends (exit 0), as
    /// in QEMU.
    pub fn host_signal(&self) {
        let mut st = lock(&self.state);
        if !st.shutdown_reported {
            self.send(Event::shutdown(ShutdownCause::HostSignal));
            st.shutdown_reported = true;
        }
        st.run = RunState::Shutdown;
        drop(st);
        self.vm.stop();
    }

    fn cpus(&self) -> Vec<CpuInfoFast> {
        let tids = vcpu_thread_ids();
        (0..self.vm.vcpu_count())
            .map(|i| {
                let tid = tids.get(&i).copied().unwrap_or(0);
                // QEMU's default topology for -smp N puts each CPU in its own socket.
                CpuInfoFast::x86_64(i as u64, i as u64, tid, i as u64, 0, 0)
            })
            .collect()
    }

    fn query_hyperv(&self) -> Value {
        match self.hyperv.get() {
            Some(query) => {
                let _ops = lock(&self.ops);
                let _paused = self.vm.pause_all();
                query()
            }
            None => empty_hyperv_report(),
        }
    }
}

/// `query-hyperv` without the Hyper-V engine (no `hv-*` flag).
pub fn empty_hyperv_report() -> Value {
    json!({
        "enabled": false,
        "enlightenments": [],
        "cpuid": [],
        "crash": {"crash-ctl": 0, "params": [0, 0, 0, 0, 0]},
        "vps": [],
    })
}

/// Builds `query-hyperv`'s reply from what the engine exposes: `enlightenments` (the `hv-*` names in
/// force), the hypervisor CPUID leaves (0x40000000..0x400000FF) and the engine state.
pub fn hyperv_report(
    enlightenments: &[&str],
    cpuid: &[hyperv::cpuid::CpuidEntry],
    state: &hyperv::state::EngineState,
) -> Value {
    let leaves: Vec<Value> = cpuid
        .iter()
        .filter(|e| (0x4000_0000..=0x4000_00FF).contains(&e.function))
        .map(|e| {
            json!({
                "function": e.function, "index": e.index,
                "eax": e.eax, "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx,
            })
        })
        .collect();
    let vps: Vec<Value> = state
        .vps
        .iter()
        .map(|vp| {
            let s = &vp.synic;
            json!({
                "vp-index": vp.vp_index,
                "synic": {
                    "enabled": s.scontrol & 1 != 0,
                    "scontrol": s.scontrol,
                    "simp": s.simp,
                    "siefp": s.siefp,
                    "sints": s.sints.to_vec(),
                },
                "stimers": vp.stimers.iter().map(|t| json!({
                    "config": t.config,
                    "enabled": t.config & 1 != 0,
                    "count": t.count,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "enabled": true,
        "enlightenments": enlightenments,
        "cpuid": leaves,
        "crash": {
            "crash-ctl": state.partition.crash_ctl,
            "params": state.partition.crash_params.to_vec(),
        },
        "vps": vps,
    })
}

/// The Linux thread id of each vCPU thread, found by its name (`vcpuN`) in `/proc/self/task`.
fn vcpu_thread_ids() -> std::collections::HashMap<usize, i64> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(i) = comm
            .trim_end()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse::<usize>().ok())
        {
            out.insert(i, tid);
        }
    }
    out
}

impl QmpHandler for VmControl {
    fn commands(&self) -> Vec<CommandSpec> {
        COMMANDS
            .iter()
            .filter(|c| !crate::migrate::COMMANDS.contains(c))
            .map(|c| CommandSpec::new(*c))
            .chain(crate::migrate::command_specs())
            .collect()
    }

    fn execute(&self, command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
        let to_value = |v: Result<Value, serde_json::Error>| {
            v.map_err(|e| QmpError::generic(format!("cannot encode the reply: {e}")))
        };
        match command {
            "query-status" => to_value(serde_json::to_value(self.run_state().status_info())),
            "query-name" => to_value(serde_json::to_value(NameInfo {
                name: self.name.clone(),
            })),
            "query-cpus-fast" => to_value(serde_json::to_value(self.cpus())),
            "query-kvm" => to_value(serde_json::to_value(KvmInfo {
                enabled: true,
                present: true,
            })),
            "query-hyperv" => Ok(self.query_hyperv()),
            "stop" => self.stop(),
            "cont" => self.cont(),
            "inject-nmi" => {
                // QEMU's x86 inject-nmi delivers an NMI to every CPU.
                for i in 0..self.vm.vcpu_count() {
                    self.vm.raise_nmi(i);
                }
                Ok(qmp::empty_return())
            }
            // Acted on in after_reply, so that their events follow the reply, as in QEMU.
            "system_reset" | "system_powerdown" | "quit" => Ok(qmp::empty_return()),
            c if crate::migrate::COMMANDS.contains(&c) => crate::migrate::qmp_command(c, _args),
            other => Err(QmpError::command_not_found(other)),
        }
    }

    fn after_reply(&self, command: &str) {
        match command {
            "system_reset" => self.vm.request_reset(),
            // No ACPI in this machine: as a QEMU machine without an ACPI power button, the event is
            // reported and the guest is not told.
            "system_powerdown" => self.send(Event::powerdown()),
            "quit" => {
                let mut st = lock(&self.state);
                if !st.shutdown_reported {
                    self.send(Event::shutdown(ShutdownCause::HostQmpQuit));
                    st.shutdown_reported = true;
                }
                st.run = RunState::Shutdown;
                drop(st);
                self.vm.stop();
            }
            _ => {}
        }
    }
}

impl LifecycleHook for VmControl {
    fn reset(&self, guest: bool, reboot: bool) {
        let cause = if guest {
            ShutdownCause::GuestReset
        } else {
            ShutdownCause::HostQmpSystemReset
        };
        let mut st = lock(&self.state);
        if reboot {
            self.send(Event::reset(cause));
            // QEMU: a VM that was not running comes back in prelaunch (still stopped).
            st.run = st.run.after_reset();
        } else if !st.shutdown_reported {
            // --no-reboot: QEMU turns the reset request into a shutdown with the same cause.
            self.send(Event::shutdown(cause));
            st.shutdown_reported = true;
            st.run = RunState::Shutdown;
        }
    }

    fn power_off(&self) {
        let mut st = lock(&self.state);
        if !st.shutdown_reported {
            self.send(Event::shutdown(ShutdownCause::GuestShutdown));
            st.shutdown_reported = true;
        }
        st.run = RunState::Shutdown;
    }

    fn guest_panicked(&self, params: Option<[u64; 5]>, action: PanicAction) {
        self.guest_panic(params, action);
    }
}

/// The VM's controller, for the migration hooks below (set by [`start`]).
static CONTROL: OnceLock<Arc<VmControl>> = OnceLock::new();

/// Migration hook: the vCPUs are about to be stopped for the last pass. Returns whether the guest was
/// running (always without QMP, where nothing can pause it).
pub fn migration_stopping() -> bool {
    CONTROL.get().is_none_or(|c| c.migration_stopping())
}

/// Migration hook: an outgoing migration ended (completed, or failed/cancelled).
pub fn migration_finished(completed: bool) {
    if let Some(c) = CONTROL.get() {
        c.migration_finished(completed);
    }
}

/// Snapshot hook: `x-snapshot-save` has stopped the vCPUs (`save-vm` and STOP if the VM ran).
pub fn snapshot_stopped() {
    if let Some(c) = CONTROL.get() {
        c.snapshot_stopped();
    }
}

/// Snapshot hook: `x-snapshot-save` ended; `keep` stores its hold on the vCPUs when it must be kept
/// (`postmigrate`), and the result says whether it was. Without QMP nothing could have paused the VM, so a
/// completed save without `resume` keeps it.
pub fn snapshot_finished(completed: bool, resume: bool, keep: impl FnOnce()) -> bool {
    match CONTROL.get() {
        Some(c) => c.snapshot_finished(completed, resume, keep),
        None if completed && !resume => {
            keep();
            true
        }
        None => false,
    }
}

/// Migration hook: the incoming stream was loaded; `source_running`: the source's guest ran when it stopped.
/// Without QMP the destination always runs (nothing could resume a paused one).
pub fn incoming_loaded(source_running: bool) {
    if let Some(c) = CONTROL.get() {
        c.incoming_loaded(source_running);
    }
}

/// The QMP servers of a running VM.
pub struct QmpRuntime {
    servers: Vec<qmp::QmpServer>,
}

impl QmpRuntime {
    /// Flushes queued replies and events, closes the clients and removes the socket files. Call it
    /// after [`vmm::Machine::run`] returned (never from a client thread).
    pub fn shutdown(self) {
        for server in self.servers {
            server.shutdown();
        }
    }
}

/// Sets up QMP for `machine` (before [`vmm::Machine::run`]): the controller (holding the vCPUs with
/// `-S`), the life-cycle hook (resets, power-off, guest panics with `-action panic=`), `query-hyperv`, and one server per
/// `-qmp`/`-mon` socket (a `wait=on` socket blocks here until its first client connects, as in
/// QEMU). `None` without any QMP socket and without `-S`.
pub fn start(
    o: &crate::run::RunOptions,
    machine: &vmm::Machine,
    cpuid: &[hyperv::cpuid::CpuidEntry],
    hv: Option<&Arc<vmm::hv::HvGlue>>,
) -> Result<Option<QmpRuntime>, String> {
    let endpoints = o.qmp_endpoints()?;
    if endpoints.is_empty() && !o.prelaunch {
        return Ok(None);
    }
    let events = EventSink::new();
    crate::migrate::set_event_sink(events.clone());
    let control = VmControl::new(
        machine.handle(),
        events.clone(),
        o.name.clone(),
        o.prelaunch,
        o.incoming.is_some(),
    );
    let _ = CONTROL.set(control.clone());
    machine
        .handle()
        .set_lifecycle_hook(control.clone())
        .map_err(|e| e.to_string())?;
    if let Some(hv) = hv {
        let backend = hyperv::config::Backend::Userspace;
        let names: Vec<&'static str> = hyperv::config::CpuConfig::parse(&o.cpu)
            .and_then(|c| c.effective_features(&backend))
            .map(|set| set.iter().map(|f| f.name()).collect())
            .unwrap_or_default();
        let leaves = cpuid.to_vec();
        let h = hv.clone();
        control.set_hyperv_query(Box::new(move || {
            hyperv_report(&names, &leaves, &h.engine().save())
        }));
    }
    let c = control.clone();
    vmm::lifecycle::on_termination_signal(Box::new(move |_| c.host_signal()))?;
    let mut servers = Vec::new();
    for ep in &endpoints {
        let handler: Arc<dyn QmpHandler> = control.clone();
        let server = qmp::QmpServer::start(ep, handler, events.clone(), Default::default())
            .map_err(|e| format!("QMP socket {ep}: {e}"))?;
        servers.push(server);
    }
    Ok(Some(QmpRuntime { servers }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_report_shape() {
        let v = empty_hyperv_report();
        assert_eq!(v["enabled"], false);
        for key in ["enlightenments", "cpuid", "vps"] {
            assert_eq!(v[key], json!([]), "{key}");
        }
    }

    #[test]
    fn report_from_engine_state() {
        let cpuid = [
            hyperv::cpuid::CpuidEntry {
                function: 0x4000_0000,
                index: 0,
                flags: 0,
                eax: 0x4000_000B,
                ebx: 0x7263_694D,
                ecx: 0x666F_736F,
                edx: 0x7648_2074,
            },
            hyperv::cpuid::CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 1,
                ebx: 2,
                ecx: 3,
                edx: 4,
            },
        ];
        let v = hyperv_report(&["hv-crash"], &cpuid, &sample_state());
        assert_eq!(v["enabled"], true);
        assert_eq!(v["enlightenments"], json!(["hv-crash"]));
        assert_eq!(v["cpuid"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["cpuid"][0]["eax"], 0x4000_000B);
        assert_eq!(v["crash"]["params"], json!([1, 2, 3, 4, 5]));
        assert_eq!(v["vps"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["vps"][0]["synic"]["enabled"], true);
        assert_eq!(v["vps"][0]["stimers"].as_array().map(Vec::len), Some(4));
    }

    fn sample_state() -> hyperv::state::EngineState {
        let mut s = hyperv::Engine::new(
            hyperv::EngineConfig::new(Default::default(), false, 1),
            hyperv::testing::FakePlatform::new(1 << 20, 1, 1_000_000_000),
        )
        .map(|e| e.save())
        .expect("a one-VP engine starts");
        s.partition.crash_params = [1, 2, 3, 4, 5];
        if let Some(vp) = s.vps.first_mut() {
            vp.synic.scontrol = 1;
        }
        s
    }
}

//! A stand-in VM that speaks QMP through this crate, for testing real clients (qemu.qmp,
//! qmp-shell) against the server without KVM.
//!
//! ```text
//! cargo run -p qmp --example qmp_demo -- -qmp unix:/tmp/demo.qmp,server=on,wait=off [-S] [-name N] [-smp N]
//! cargo run -p qmp --example qmp_demo -- -chardev socket,id=m,path=/tmp/demo.qmp,server=on,wait=off -mon chardev=m,mode=control
//! ```
//!
//! It implements the commands the VMM will (query-status, query-name, query-cpus-fast,
//! query-kvm, stop, cont, system_reset, system_powerdown, quit, inject-nmi) on a fake run state,
//! plus `x-demo-guest-panic` (arguments `arg1`..`arg5`, optional `action`) that plays the
//! Hyper-V crash sequence: GUEST_PANICKED, STOP, then for `poweroff` SHUTDOWN(guest-panic).

use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use qmp::{
    empty_return, endpoint_for_monitor, ArgType, CommandSpec, CpuInfoFast, Event, EventSink,
    GuestPanicAction, GuestPanicInformation, KvmInfo, NameInfo, QmpEndpoint, QmpError, QmpHandler,
    QmpServer, RunState, ServerConfig, ShutdownCause,
};
use serde_json::{Map, Value};

struct DemoVm {
    state: Mutex<RunState>,
    name: Option<String>,
    cpus: u64,
    events: EventSink,
    quit: Mutex<Sender<()>>,
}

impl DemoVm {
    fn set_state(&self, state: &mut RunState, to: RunState) {
        if state.can_transition_to(to) {
            *state = to;
        } else {
            eprintln!("qmp_demo: invalid runstate transition: '{state}' -> '{to}'");
        }
    }
}

fn to_json<T: serde::Serialize>(v: T) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(e.to_string()))
}

impl QmpHandler for DemoVm {
    fn commands(&self) -> Vec<CommandSpec> {
        let mut panic = CommandSpec::new("x-demo-guest-panic");
        for i in 1..=5 {
            panic = panic.arg(format!("arg{i}"), ArgType::Uint);
        }
        vec![
            CommandSpec::new("query-status"),
            CommandSpec::new("query-name"),
            CommandSpec::new("query-cpus-fast"),
            CommandSpec::new("query-kvm"),
            CommandSpec::new("stop"),
            CommandSpec::new("cont"),
            CommandSpec::new("system_reset"),
            CommandSpec::new("system_powerdown"),
            CommandSpec::new("quit"),
            CommandSpec::new("inject-nmi"),
            panic.optional_arg("action", ArgType::Str),
        ]
    }

    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match command {
            "query-status" => to_json(state.status_info()),
            "query-name" => to_json(NameInfo {
                name: self.name.clone(),
            }),
            "query-kvm" => to_json(KvmInfo {
                enabled: true,
                present: true,
            }),
            "query-cpus-fast" => to_json(
                (0..self.cpus)
                    .map(|i| CpuInfoFast::x86_64(i, i, 1000 + i as i64, i, 0, 0))
                    .collect::<Vec<_>>(),
            ),
            "stop" => {
                if state.is_running() {
                    self.set_state(&mut state, RunState::Paused);
                    self.events.send(&Event::stop());
                }
                Ok(empty_return())
            }
            "cont" => {
                if state.needs_reset() {
                    return Err(QmpError::reset_required());
                }
                if !state.is_running() {
                    self.set_state(&mut state, RunState::Running);
                    self.events.send(&Event::resume());
                }
                Ok(empty_return())
            }
            "system_reset" | "system_powerdown" | "quit" | "inject-nmi" => Ok(empty_return()),
            "x-demo-guest-panic" => {
                let arg = |n: &str| args.get(n).and_then(Value::as_u64).unwrap_or(0);
                let action = match args.get("action").and_then(Value::as_str) {
                    None | Some("poweroff") => GuestPanicAction::Poweroff,
                    Some("pause") => GuestPanicAction::Pause,
                    Some("run") => GuestPanicAction::Run,
                    Some(other) => {
                        return Err(QmpError::generic(format!(
                            "Parameter 'action' does not accept value '{other}'"
                        )))
                    }
                };
                let info = GuestPanicInformation::hyperv([
                    arg("arg1"),
                    arg("arg2"),
                    arg("arg3"),
                    arg("arg4"),
                    arg("arg5"),
                ]);
                self.events.send(&Event::guest_panicked(action, Some(info)));
                if action != GuestPanicAction::Run && state.is_running() {
                    self.set_state(&mut state, RunState::GuestPanicked);
                    self.events.send(&Event::stop());
                }
                if action == GuestPanicAction::Poweroff {
                    self.events
                        .send(&Event::shutdown(ShutdownCause::GuestPanic));
                }
                Ok(empty_return())
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }

    fn after_reply(&self, command: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match command {
            "system_reset" => {
                self.events
                    .send(&Event::reset(ShutdownCause::HostQmpSystemReset));
                let to = state.after_reset();
                self.set_state(&mut state, to);
            }
            "system_powerdown" => self.events.send(&Event::powerdown()),
            "quit" => {
                self.events
                    .send(&Event::shutdown(ShutdownCause::HostQmpQuit));
                let _ = self.quit.lock().map(|tx| tx.send(()));
            }
            _ => {}
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut qmp = Vec::new();
    let mut chardevs = Vec::new();
    let mut mons = Vec::new();
    let mut prelaunch = false;
    let mut name = None;
    let mut cpus = 1;
    let mut it = args.iter();
    while let Some(opt) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{opt}: requires an argument"))
        };
        match opt.trim_start_matches('-') {
            "qmp" => qmp.push(value()?),
            "chardev" => chardevs.push(value()?),
            "mon" => mons.push(value()?),
            "name" => name = Some(value()?),
            "smp" => {
                let v = value()?;
                cpus = v.parse().map_err(|_| format!("-smp {v}: not a number"))?;
            }
            "S" => prelaunch = true,
            _ => return Err(format!("unknown option '{opt}'")),
        }
    }
    let mut endpoints = Vec::new();
    for spec in &qmp {
        endpoints.push(QmpEndpoint::parse_qmp(spec).map_err(|e| format!("-qmp {spec}: {e}"))?);
    }
    for spec in &mons {
        endpoints
            .push(endpoint_for_monitor(spec, &chardevs).map_err(|e| format!("-mon {spec}: {e}"))?);
    }
    if endpoints.is_empty() {
        return Err("no -qmp or -mon given".to_string());
    }
    let events = EventSink::new();
    let (quit_tx, quit_rx) = channel();
    let vm = Arc::new(DemoVm {
        state: Mutex::new(if prelaunch {
            RunState::Prelaunch
        } else {
            RunState::Running
        }),
        name,
        cpus,
        events: events.clone(),
        quit: Mutex::new(quit_tx),
    });
    let mut servers = Vec::new();
    for ep in &endpoints {
        let server = QmpServer::start(ep, vm.clone(), events.clone(), ServerConfig::default())
            .map_err(|e| e.to_string())?;
        if let Some(addr) = server.local_addr() {
            eprintln!("qmp_demo: listening on tcp:{addr}");
        }
        servers.push(server);
    }
    eprintln!("qmp_demo: ready");
    // Wait for `quit`; the SHUTDOWN event was already queued by after_reply.
    let _ = quit_rx.recv();
    for s in servers {
        s.shutdown();
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmp_demo: {e}");
            ExitCode::FAILURE
        }
    }
}

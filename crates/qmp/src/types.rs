//! QEMU-shaped reply and event payloads, with QEMU's QAPI spellings.

use serde::{Deserialize, Serialize};

use crate::{package_string, QEMU_MAJOR, QEMU_MICRO, QEMU_MINOR};

/// QEMU's `RunState` (QAPI spellings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
}

/// Legal run-state changes, following QEMU 7.2's transition table for the states an
/// enlightened VM without migration can reach (migration/COLO/snapshot rows are left out).
const TRANSITIONS: &[(RunState, RunState)] = {
    use RunState::*;
    &[
        (Debug, Running),
        (Debug, Prelaunch),
        (Debug, Suspended),
        (InternalError, Paused),
        (InternalError, Prelaunch),
        (IoError, Running),
        (IoError, Prelaunch),
        (Paused, Running),
        (Paused, Prelaunch),
        (Prelaunch, Running),
        (Running, Debug),
        (Running, InternalError),
        (Running, IoError),
        (Running, Paused),
        (Running, Shutdown),
        (Running, Watchdog),
        (Running, GuestPanicked),
        (Running, Suspended),
        (Shutdown, Paused),
        (Shutdown, Prelaunch),
        (Suspended, Running),
        (Suspended, Prelaunch),
        (Watchdog, Running),
        (Watchdog, Prelaunch),
        (GuestPanicked, Running),
        (GuestPanicked, Prelaunch),
    ]
};

impl RunState {
    /// The QAPI spelling, e.g. `guest-panicked`.
    pub fn as_str(self) -> &'static str {
        use RunState::*;
        match self {
            Debug => "debug",
            Inmigrate => "inmigrate",
            InternalError => "internal-error",
            IoError => "io-error",
            Paused => "paused",
            Postmigrate => "postmigrate",
            Prelaunch => "prelaunch",
            FinishMigrate => "finish-migrate",
            RestoreVm => "restore-vm",
            Running => "running",
            SaveVm => "save-vm",
            Shutdown => "shutdown",
            Suspended => "suspended",
            Watchdog => "watchdog",
            GuestPanicked => "guest-panicked",
            Colo => "colo",
        }
    }

    /// Whether QEMU allows going from `self` to `to`. Staying in the same state is always allowed
    /// (QEMU treats it as a no-op).
    pub fn can_transition_to(self, to: RunState) -> bool {
        self == to || TRANSITIONS.contains(&(self, to))
    }

    /// `query-status`'s `running` member.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }

    /// QEMU's `runstate_needs_reset()`: `cont` is refused with
    /// [`QmpError::reset_required`](crate::QmpError::reset_required) in these states.
    pub fn needs_reset(self) -> bool {
        matches!(self, RunState::InternalError | RunState::Shutdown)
    }

    /// The state after a `system_reset` (QEMU: a VM that was not running comes back in
    /// `prelaunch`, a running one keeps running).
    pub fn after_reset(self) -> RunState {
        if self == RunState::Running {
            RunState::Running
        } else {
            RunState::Prelaunch
        }
    }

    /// The `query-status` reply for this state.
    pub fn status_info(self) -> StatusInfo {
        StatusInfo {
            running: self.is_running(),
            singlestep: false,
            status: self,
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `query-status` reply: `{"running": bool, "singlestep": false, "status": RunState}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub singlestep: bool,
    pub status: RunState,
}

/// QEMU's `ShutdownCause` (used by SHUTDOWN and RESET events).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    None,
    HostError,
    HostQmpQuit,
    HostQmpSystemReset,
    HostSignal,
    HostUi,
    GuestShutdown,
    GuestReset,
    GuestPanic,
    SubsystemReset,
    SnapshotLoad,
}

impl ShutdownCause {
    /// The events' `guest` member: true when the guest asked for it.
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// `GUEST_PANICKED`'s `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestPanicAction {
    Pause,
    Poweroff,
    Run,
}

/// `GUEST_PANICKED`'s `info`: a union discriminated by `type`. Only the Hyper-V variant is
/// produced by enlighten (`arg1..arg5` = HV_X64_MSR_CRASH_P0..P4, as plain uint64 numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum GuestPanicInformation {
    #[serde(rename = "hyper-v")]
    HyperV {
        arg1: u64,
        arg2: u64,
        arg3: u64,
        arg4: u64,
        arg5: u64,
    },
}

impl GuestPanicInformation {
    /// Hyper-V crash information from the five crash parameter MSRs P0..P4, in that order.
    pub fn hyperv(params: [u64; 5]) -> Self {
        GuestPanicInformation::HyperV {
            arg1: params[0],
            arg2: params[1],
            arg3: params[2],
            arg4: params[3],
            arg5: params[4],
        }
    }
}

/// `version.qemu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
}

/// `query-version` reply and the greeting's `version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: QemuVersion,
    pub package: String,
}

impl VersionInfo {
    /// The version enlighten announces ([`crate::QEMU_MAJOR`].. and [`package_string`]).
    pub fn current() -> Self {
        VersionInfo {
            qemu: QemuVersion {
                major: QEMU_MAJOR,
                minor: QEMU_MINOR,
                micro: QEMU_MICRO,
            },
            package: package_string(),
        }
    }
}

/// `query-name` reply: `{"name": "..."}`, or `{}` when the VM has no `-name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInfo {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

/// `query-kvm` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// `props` of a `query-cpus-fast` entry (`CpuInstanceProperties`). x86 reports socket, core and
/// thread ids (and die-id on machines that have dies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInstanceProperties {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub socket_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub die_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub core_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub thread_id: Option<u64>,
}

/// One `query-cpus-fast` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    pub cpu_index: u64,
    pub qom_path: String,
    /// Host thread id (`gettid()`) of the vCPU thread.
    pub thread_id: i64,
    pub props: CpuInstanceProperties,
    pub target: String,
}

impl CpuInfoFast {
    /// An x86_64 entry the way QEMU's pc machines report it: `qom-path`
    /// `/machine/unattached/device[N]`, `target` `x86_64`, props socket/core/thread.
    ///
    /// `qom_device_index` is N: on a default QEMU pc/q35 machine it equals the cpu index.
    pub fn x86_64(
        cpu_index: u64,
        qom_device_index: u64,
        thread_id: i64,
        socket_id: u64,
        core_id: u64,
        thread_in_core: u64,
    ) -> Self {
        CpuInfoFast {
            cpu_index,
            qom_path: format!("/machine/unattached/device[{qom_device_index}]"),
            thread_id,
            props: CpuInstanceProperties {
                socket_id: Some(socket_id),
                core_id: Some(core_id),
                thread_id: Some(thread_in_core),
                ..Default::default()
            },
            target: "x86_64".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_state_spellings_round_trip() {
        use RunState::*;
        let all = [
            (Debug, "debug"),
            (Inmigrate, "inmigrate"),
            (InternalError, "internal-error"),
            (IoError, "io-error"),
            (Paused, "paused"),
            (Postmigrate, "postmigrate"),
            (Prelaunch, "prelaunch"),
            (FinishMigrate, "finish-migrate"),
            (RestoreVm, "restore-vm"),
            (Running, "running"),
            (SaveVm, "save-vm"),
            (Shutdown, "shutdown"),
            (Suspended, "suspended"),
            (Watchdog, "watchdog"),
            (GuestPanicked, "guest-panicked"),
            (Colo, "colo"),
        ];
        for (state, text) in all {
            assert_eq!(serde_json::to_value(state).unwrap(), json!(text));
            assert_eq!(state.as_str(), text);
            assert_eq!(state.to_string(), text);
            let back: RunState = serde_json::from_value(json!(text)).unwrap();
            assert_eq!(back, state);
        }
    }

    #[test]
    fn transitions() {
        use RunState::*;
        let cases = [
            (Prelaunch, Running, true),
            (Running, Paused, true),
            (Paused, Running, true),
            (Running, GuestPanicked, true),
            (GuestPanicked, Running, true),
            (Running, Shutdown, true),
            (Shutdown, Running, false),
            (Shutdown, Prelaunch, true),
            (Prelaunch, Paused, false),
            (Paused, Shutdown, false),
            (GuestPanicked, Shutdown, false),
            (Paused, Paused, true),
        ];
        for (from, to, ok) in cases {
            assert_eq!(from.can_transition_to(to), ok, "{from} -> {to}");
        }
        assert!(Shutdown.needs_reset() && InternalError.needs_reset());
        assert!(!Paused.needs_reset() && !GuestPanicked.needs_reset());
        assert_eq!(Paused.after_reset(), Prelaunch);
        assert_eq!(GuestPanicked.after_reset(), Prelaunch);
        assert_eq!(Running.after_reset(), Running);
    }

    #[test]
    fn status_info_shape() {
        let cases = [
            (RunState::Running, true, "running"),
            (RunState::Paused, false, "paused"),
            (RunState::Prelaunch, false, "prelaunch"),
            (RunState::GuestPanicked, false, "guest-panicked"),
        ];
        for (state, running, text) in cases {
            assert_eq!(
                serde_json::to_value(state.status_info()).unwrap(),
                json!({"running": running, "singlestep": false, "status": text})
            );
        }
    }

    #[test]
    fn shutdown_causes() {
        use ShutdownCause::*;
        let cases = [
            (None, "none", false),
            (HostError, "host-error", false),
            (HostQmpQuit, "host-qmp-quit", false),
            (HostQmpSystemReset, "host-qmp-system-reset", false),
            (HostSignal, "host-signal", false),
            (HostUi, "host-ui", false),
            (GuestShutdown, "guest-shutdown", true),
            (GuestReset, "guest-reset", true),
            (GuestPanic, "guest-panic", true),
            (SubsystemReset, "subsystem-reset", false),
            (SnapshotLoad, "snapshot-load", false),
        ];
        for (cause, text, guest) in cases {
            assert_eq!(serde_json::to_value(cause).unwrap(), json!(text));
            assert_eq!(cause.is_guest(), guest, "{text}");
        }
    }

    #[test]
    fn payload_shapes() {
        let cpu = CpuInfoFast::x86_64(1, 1, 4242, 0, 1, 0);
        assert_eq!(
            serde_json::to_value(&cpu).unwrap(),
            json!({"cpu-index": 1, "qom-path": "/machine/unattached/device[1]",
                   "thread-id": 4242, "target": "x86_64",
                   "props": {"socket-id": 0, "core-id": 1, "thread-id": 0}})
        );
        assert_eq!(
            serde_json::to_value(NameInfo::default()).unwrap(),
            json!({})
        );
        assert_eq!(
            serde_json::to_value(NameInfo {
                name: Some("vm1".into())
            })
            .unwrap(),
            json!({"name": "vm1"})
        );
        assert_eq!(
            serde_json::to_value(KvmInfo {
                enabled: true,
                present: true
            })
            .unwrap(),
            json!({"enabled": true, "present": true})
        );
        assert_eq!(
            serde_json::to_value(GuestPanicInformation::hyperv([1, 2, 3, 4, u64::MAX])).unwrap(),
            json!({"type": "hyper-v", "arg1": 1, "arg2": 2, "arg3": 3, "arg4": 4,
                   "arg5": u64::MAX})
        );
        let v = VersionInfo::current();
        assert_eq!(
            serde_json::to_value(&v).unwrap(),
            json!({"qemu": {"major": 7, "minor": 2, "micro": 0},
                   "package": format!("enlighten {}", env!("CARGO_PKG_VERSION"))})
        );
    }
}

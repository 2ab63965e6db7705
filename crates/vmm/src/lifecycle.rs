//! Machine life-cycle notifications for a controller (enlighten's QMP glue).
//!
//! The event loop of [`crate::Machine::run`] tells an installed [`LifecycleHook`] about resets (once done, as
//! QEMU reports RESET after resetting) and power-off, and the Hyper-V crash path reports a guest panic through
//! [`crate::VmHandle::guest_panicked`]. The hook turns these into QMP events (RESET, SHUTDOWN,
//! GUEST_PANICKED, STOP) and keeps the run state QEMU reports in `query-status`.

/// What `-action panic=...` asks for when the guest reports a panic (QEMU's `PanicAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PanicAction {
    /// Stop the vCPUs and end the VM (QEMU's default; GUEST_PANICKED action `poweroff`, then STOP and
    /// SHUTDOWN with reason `guest-panic`). The process exits 0.
    #[default]
    Shutdown,
    /// Stop the vCPUs and keep the process alive (GUEST_PANICKED action `pause`, then STOP; run state
    /// `guest-panicked` until `cont`, `system_reset` or `quit`).
    Pause,
    /// Let the guest carry on (GUEST_PANICKED action `run`), e.g. so that Windows writes its dump.
    None,
    /// Like `Shutdown`, but the process exits with status 1.
    ExitFailure,
}

impl PanicAction {
    /// Parses the value of `-action panic=VALUE` (`shutdown`, `pause`, `none`, `exit-failure`).
    pub fn parse(value: &str) -> Result<PanicAction, String> {
        match value {
            "shutdown" => Ok(PanicAction::Shutdown),
            "pause" => Ok(PanicAction::Pause),
            "none" => Ok(PanicAction::None),
            "exit-failure" => Ok(PanicAction::ExitFailure),
            other => Err(format!(
                "Parameter 'panic' does not accept value '{other}' (expected shutdown, pause, none or \
                 exit-failure)"
            )),
        }
    }
}

/// Observer of the machine's life cycle. Every method is called with no machine lock held; none may block
/// on the vCPUs (no [`crate::VmHandle::pause`]), because `guest_panicked` runs on a vCPU thread and the others
/// on the event-loop thread while vCPUs may be waiting for it.
pub trait LifecycleHook: Send + Sync {
    /// The VM was reset (called after the reset, before the vCPUs run guest code again if they were
    /// held), or, with `reboot` false, is about to end. `guest`: the guest asked for it (reset port, RESET MSR, triple fault;
    /// reason `guest-reset`), otherwise [`crate::VmHandle::request_reset`] did (`host-qmp-system-reset`).
    /// `reboot` is false when `--no-reboot` turns the reset into the end of the VM (QEMU then reports a
    /// SHUTDOWN with the same reason instead of a RESET).
    fn reset(&self, guest: bool, reboot: bool);
    /// The guest powered the machine off; the VM ends.
    fn power_off(&self);
    /// The guest reported a panic (`params` = Hyper-V CRASH_P0..P4 when available). The hook applies `action`
    /// itself (pausing with [`crate::VmHandle::hold_all`], ending with [`crate::VmHandle::stop`] or
    /// [`crate::VmHandle::request_exit`]).
    fn guest_panicked(&self, params: Option<[u64; 5]>, action: PanicAction);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_panic_actions() {
        let cases: &[(&str, Option<PanicAction>)] = &[
            ("shutdown", Some(PanicAction::Shutdown)),
            ("pause", Some(PanicAction::Pause)),
            ("none", Some(PanicAction::None)),
            ("exit-failure", Some(PanicAction::ExitFailure)),
            ("poweroff", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(PanicAction::parse(text).ok(), *expected, "{text}");
        }
        assert_eq!(PanicAction::default(), PanicAction::Shutdown);
    }
}

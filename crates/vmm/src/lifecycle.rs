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

/// Write end of the pipe the termination-signal handler writes the signal number to (-1: none).
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        let byte = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `byte` lives for the call; a full pipe or a closed fd only
        // makes the write fail, which is ignored (the first signal is the one that matters).
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// QEMU's termination signals: SIGTERM, SIGINT and SIGHUP end the VM with SHUTDOWN `host-signal`.
pub const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Calls `f(signal)` on a helper thread the first time the process receives one of
/// [`TERMINATION_SIGNALS`] (instead of being killed by it). Call it once, before the vCPU threads start.
pub fn on_termination_signal(f: Box<dyn FnOnce(i32) + Send>) -> Result<(), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!(
            "cannot create the signal pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    let [read_fd, write_fd] = fds;
    if SIGNAL_PIPE
        .compare_exchange(
            -1,
            write_fd,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        )
        .is_err()
    {
        // SAFETY: both fds were just created by pipe2 and are owned here.
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
        return Err("a termination-signal handler is already installed".into());
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            loop {
                // SAFETY: `read_fd` is the pipe's read end, owned by this thread; `byte` is a valid 1-byte buffer.
                let n = unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) };
                if n == 1 {
                    f(i32::from(byte));
                    return;
                }
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    for sig in TERMINATION_SIGNALS {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only does async-signal-safe work;
        // `sa_mask` is initialised with sigemptyset before use.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(format!(
                "cannot install the handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
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

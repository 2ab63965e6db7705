//! Kicking a vCPU thread out of `KVM_RUN`: set `kvm_run.immediate_exit` and send it a signal.
//!
//! The vCPU thread publishes a pointer to its `immediate_exit` byte while its `VcpuFd` is alive. A kicker
//! stores 1 there and sends [`kick_signal`] to the thread: if the thread is inside `KVM_RUN` the signal makes
//! it return with EINTR; if it is about to enter, `immediate_exit` makes `KVM_RUN` return at once; if it is in
//! userspace, it sees the work the kicker queued (under the vCPU's lock) before its next entry.
//!
//! # The wake-up protocol
//!
//! * **vCPU thread.** With its state lock held it checks every source of work (stop, pause, requests, engine
//!   work, the APIC) and, in the same critical section, either waits on its condition variable (the wait
//!   releases the lock atomically) or decides to enter: it clears `immediate_exit` there and sets `in_guest`.
//!   It drops the lock, calls `KVM_RUN`, clears `immediate_exit` when it returns and takes the lock again
//!   before it decides anything.
//! * **Waker** (`VcpuShared::wake_up`, `VmHandle::kick`). It changes the vCPU's state under that lock (or
//!   makes its work visible and then takes the lock), then notifies the condition variable and kicks.
//!
//! No wake-up is lost: if the vCPU's deciding critical section comes after the waker's, it sees the work; if
//! it came before, the vCPU is asleep (the notify wakes it), or past its decision: the waker's
//! `immediate_exit` = 1 comes after the decision's clear, so an entry not yet made returns at once, and the
//! signal ends a `KVM_RUN` in progress. A kick that lands after `KVM_RUN` returned only leaves
//! `immediate_exit` set for an entry that the next decision clears. `crates/vmm/tests/machine.rs`
//! (`wake_ups_are_never_lost_...`) stresses it with concurrent deliveries and pauses against a vCPU that
//! alternates between HLT and an exit-free spin.
//!
//! # Why every wake-up signals, even a vCPU that is asleep
//!
//! A signal is only needed while the target may be in `KVM_RUN`; a halted vCPU is woken by the condition
//! variable alone. Skipping it was implemented (an `in_run` flag set in the deciding critical section and
//! cleared after `KVM_RUN`, read by the kicker after the waker's critical section; commit cb56da8) and measured
//! with `hv_ipi bench=200` at 16 vCPUs, alternating runs: kick signals fell from 15.4 to 0.02 per broadcast
//! and context switches by about a quarter, but the hypercall broadcast got no faster. The median ratio of its
//! wall time per pair was 1.25 (slower in 25 of 28 pairs, host load 5-7) and 1.03 in a quieter batch (slower
//! in 6 of 10, load 2-3); the process's CPU time rose by 8 % and 1 %; APIC broadcasts were unchanged (0.99×).
//! On this 2-core host the broadcast's time is set by when the woken vCPU threads get a CPU, not by the
//! signal's cost. So the simpler code stays; docs/performance.md has the figures.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, Once};

use libc::{c_int, c_void, siginfo_t};

/// The signal used for kicks (SIGRTMIN + 1; SIGRTMIN itself is left to others).
pub fn kick_signal() -> c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick_signal(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}

static INSTALL: Once = Once::new();

/// Installs the (empty) kick signal handler once per process. Without a handler the signal would kill it.
pub fn install_kick_handler() -> Result<(), String> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal)
            .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"));
    });
    result
}

/// Where to kick one vCPU thread.
#[derive(Debug)]
struct Target {
    thread: libc::pthread_t,
    immediate_exit: *const AtomicU8,
}

/// The kick endpoint of one vCPU.
#[derive(Debug, Default)]
pub struct Kicker {
    target: Mutex<Option<Target>>,
}

// SAFETY: `Target::immediate_exit` points into the vCPU's mmapped `kvm_run`, which stays mapped for as long as
// the target is published (the vCPU thread unpublishes it before dropping its `VcpuFd`), and it is only
// accessed atomically; `pthread_t` is a plain thread id.
unsafe impl Send for Kicker {}
// SAFETY: see above; all access goes through the mutex and atomics.
unsafe impl Sync for Kicker {}

impl Kicker {
    /// Publishes the calling thread as the target, with its `kvm_run.immediate_exit` byte.
    ///
    /// # Safety
    /// `immediate_exit` must stay valid until [`Kicker::unpublish`] is called.
    pub unsafe fn publish(&self, immediate_exit: *mut u8) {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let mut t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        *t = Some(Target {
            thread,
            immediate_exit: immediate_exit as *const AtomicU8,
        });
    }

    /// Withdraws the target (before the `VcpuFd` is dropped).
    pub fn unpublish(&self) {
        let mut t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        *t = None;
    }

    /// Sets the target's `immediate_exit` to `value` (used by the vCPU thread itself too).
    pub fn set_immediate_exit(&self, value: u8) {
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = t.as_ref() {
            // SAFETY: the pointer is valid while published (see `publish`) and `AtomicU8` has the layout of u8.
            unsafe { (*t.immediate_exit).store(value, Ordering::SeqCst) };
        }
    }

    /// Kicks the target out of `KVM_RUN` (no-op when nothing is published).
    pub fn kick(&self) {
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = t.as_ref() {
            // SAFETY: pthread_self has no preconditions.
            if t.thread == unsafe { libc::pthread_self() } {
                // The vCPU thread kicking itself (an exit handler delivering an interrupt to its own vCPU) is
                // in userspace and re-checks its state before the next entry: an immediate exit would only
                // cost a wasted KVM_RUN round trip.
                return;
            }
            // SAFETY: as in `set_immediate_exit`.
            unsafe { (*t.immediate_exit).store(1, Ordering::SeqCst) };
            // SAFETY: the thread id was published by a live thread that unpublishes before exiting (the lock
            // is held, so it cannot exit in between); the signal has a handler installed.
            unsafe { libc::pthread_kill(t.thread, kick_signal()) };
        }
    }
}

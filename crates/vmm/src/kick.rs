//! Kicking a vCPU thread out of `KVM_RUN`: set `kvm_run.immediate_exit` and send it a signal, but only when
//! the thread may be in `KVM_RUN`.
//!
//! The vCPU thread publishes a pointer to its `immediate_exit` byte while its `VcpuFd` is alive. A kicker
//! stores 1 there and sends [`kick_signal`] to the thread: if the thread is inside `KVM_RUN` the signal makes
//! it return with EINTR; if it is about to enter, `immediate_exit` makes `KVM_RUN` return at once.
//!
//! # When a signal is needed (the wake-up protocol)
//!
//! A vCPU thread is in one of three places: asleep on its condition variable (halted, waiting for a SIPI,
//! parked, throttled), in userspace handling an exit or deciding what to do next, or in (or about to enter)
//! `KVM_RUN`. Only the last needs the signal: a sleeping thread is woken by the condition variable and a
//! thread in userspace looks at its state before it enters again. Sending the signal anyway costs a
//! `tgkill` and a signal-handler run on the target for nothing, which is most of the cost of waking a halted
//! vCPU (an IPI broadcast to halted vCPUs paid one per target). So the [`Kicker`] has an `in_run` flag:
//!
//! * **vCPU thread.** With its state lock held, it checks every source of work (requests, pause, stop, APIC,
//!   engine work...) and, in the *same* critical section, when it decides to enter, clears `immediate_exit`
//!   and sets `in_run` ([`Kicker::entering`]). It then drops the lock and calls `KVM_RUN`. When `KVM_RUN`
//!   returns it clears `immediate_exit` and `in_run` ([`Kicker::left`]) and takes the lock again before it
//!   decides anything. Every entry goes through such a critical section (the only other `KVM_RUN`s are the
//!   completion runs of the rendezvous and reset paths, made with `immediate_exit` = 1 by the thread itself,
//!   which return at once).
//! * **Waker.** It publishes its work so that the vCPU's entry check sees it (under the vCPU's state lock,
//!   or in an atomic that the check reads), then, holding that lock or after having taken and released it
//!   since publishing, notifies the condition variable and calls [`Kicker::kick`], which reads `in_run` and
//!   sends the signal only when it is set.
//!
//! Why no wake-up is lost. Let W be the waker's critical section (taken after its work was published) and
//! E the last entry critical section of the vCPU before W in the lock's order.
//! * If the vCPU's next entry check comes after W, it sees the work: nothing to kick.
//! * Otherwise the vCPU is between E and its next entry check: in `KVM_RUN` or on the way in or out of it.
//!   `in_run` = true was stored in E, which happens-before W, which happens-before the waker's read (SeqCst
//!   everywhere). The read returns that true, and the waker kicks: `immediate_exit` = 1 (stored after E's
//!   clear, so not overwritten by it) stops an entry not yet made, and the signal interrupts a `KVM_RUN` in
//!   progress. Or the read returns the later false stored by [`Kicker::left`]: `KVM_RUN` has then already
//!   returned and the next entry check is the one after W (any entry section between would be a later E),
//!   which sees the work.
//! * A thread about to sleep checks its state and waits on the condition variable in one critical section
//!   (the wait releases the lock atomically), so the unconditional notify covers it as before.
//!
//! The cost of being wrong in the safe direction is small: a kick that reads a stale true (the vCPU has left
//! and re-entered in between) sets `immediate_exit` for an entry that had nothing to do with it, one empty
//! `KVM_RUN` round trip, exactly what every kick used to risk. A kick from the vCPU's own thread always reads
//! false (it is in userspace, handling an exit) and costs one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
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
    /// The vCPU thread is in `KVM_RUN` or about to enter it (see the module documentation).
    in_run: AtomicBool,
    /// Kick signals sent so far (statistics and tests).
    signals: AtomicU64,
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
        self.in_run.store(false, Ordering::SeqCst);
    }

    /// Sets the target's `immediate_exit` to `value` (used by the vCPU thread itself too).
    pub fn set_immediate_exit(&self, value: u8) {
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = t.as_ref() {
            // SAFETY: the pointer is valid while published (see `publish`) and `AtomicU8` has the layout of u8.
            unsafe { (*t.immediate_exit).store(value, Ordering::SeqCst) };
        }
    }

    /// Called by the vCPU thread, with its state lock held, in the critical section in which it decided to enter
    /// `KVM_RUN` (after its last check for work): clears a leftover `immediate_exit` and sets `in_run`.
    pub fn entering(&self) {
        // Every kick so far asked for a look at state that was just looked at (wakers change it under the state
        // lock before they kick): a leftover `immediate_exit` would only cost an empty KVM_RUN round trip.
        self.set_immediate_exit(0);
        self.in_run.store(true, Ordering::SeqCst);
    }

    /// Called by the vCPU thread right after `KVM_RUN` returned, before it looks for work again.
    pub fn left(&self) {
        self.set_immediate_exit(0);
        self.in_run.store(false, Ordering::SeqCst);
    }

    /// Whether the target may be in `KVM_RUN` (between [`Kicker::entering`] and [`Kicker::left`]).
    pub fn in_run(&self) -> bool {
        self.in_run.load(Ordering::SeqCst)
    }

    /// Kick signals sent so far.
    pub fn signals_sent(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// Kicks the target out of `KVM_RUN` if it may be there; a no-op otherwise (and when nothing is
    /// published). Returns whether a signal was sent. The caller must have published its work as the module
    /// documentation says (under the target's state lock, or visible to its entry check and followed by
    /// taking that lock).
    pub fn kick(&self) -> bool {
        if !self.in_run.load(Ordering::SeqCst) {
            // Asleep or in userspace: it checks its state before its next entry (the vCPU's own thread,
            // handling an exit, always gets here).
            return false;
        }
        let t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        let Some(t) = t.as_ref() else {
            return false;
        };
        // SAFETY: as in `set_immediate_exit`.
        unsafe { (*t.immediate_exit).store(1, Ordering::SeqCst) };
        // SAFETY: the thread id was published by a live thread that unpublishes before exiting (the lock is
        // held, so it cannot exit in between); the signal has a handler installed.
        unsafe { libc::pthread_kill(t.thread, kick_signal()) };
        self.signals.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    /// A thread that publishes itself (with its own `immediate_exit` byte) on `kicker` and stays alive until
    /// `done` is dropped; returns the byte.
    fn target(
        kicker: &Arc<Kicker>,
    ) -> (Arc<AtomicU8>, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let byte = Arc::new(AtomicU8::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let (k, b) = (kicker.clone(), byte.clone());
        let h = std::thread::spawn(move || {
            // SAFETY: `b` outlives the publication (unpublished before this closure returns).
            unsafe { k.publish(b.as_ptr()) };
            ready_tx.send(()).unwrap();
            let _ = done_rx.recv();
            k.unpublish();
        });
        ready_rx.recv().unwrap();
        (byte, done_tx, h)
    }

    #[test]
    fn a_signal_only_while_the_target_may_be_in_kvm_run() {
        install_kick_handler().unwrap();
        // (steps applied in order: 'e' = entering, 'l' = left, 'k' = kick; expected kick result, then the
        // expected immediate_exit byte and signal count after all steps)
        let cases: &[(&str, &[bool], u8, u64)] = &[
            ("k", &[false], 0, 0),
            ("ek", &[true], 1, 1),
            ("ekl", &[true], 0, 1),
            ("elk", &[false], 0, 0),
            ("ekk", &[true, true], 1, 2),
            ("eklk", &[true, false], 0, 1),
            ("ekle", &[true], 0, 1),
            ("eklek", &[true, true], 1, 2),
        ];
        for &(steps, want_kicks, want_byte, want_signals) in cases {
            let kicker = Arc::new(Kicker::default());
            let (byte, done, h) = target(&kicker);
            let mut kicks = Vec::new();
            for c in steps.chars() {
                match c {
                    'e' => kicker.entering(),
                    'l' => kicker.left(),
                    'k' => kicks.push(kicker.kick()),
                    _ => unreachable!(),
                }
            }
            assert_eq!(kicks, want_kicks, "{steps}: kick results");
            assert_eq!(
                byte.load(Ordering::SeqCst),
                want_byte,
                "{steps}: immediate_exit"
            );
            assert_eq!(kicker.signals_sent(), want_signals, "{steps}: signals");
            drop(done);
            h.join().unwrap();
            // Unpublished: nothing to kick, whatever the flag said.
            kicker.entering();
            assert!(!kicker.kick(), "{steps}: kick after unpublish");
        }
    }
}

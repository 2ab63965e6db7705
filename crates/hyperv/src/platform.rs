//! The platform trait: everything the engine needs from the VMM that embeds it.
//!
//! The engine is pure logic. Whenever it has to touch the outside world (guest memory, interrupts, time, timers,
//! other vCPUs, the VM's life cycle) it calls a method of [`Platform`]. A VMM implements the trait once; the
//! engine's unit tests implement it with [`crate::testing::FakePlatform`].
//!
//! # Threading contract
//!
//! * The engine is `Sync` and is normally shared (`Arc<Engine<P>>`) by all vCPU threads. Each engine entry point
//!   that names a VP (`read_msr(vp, ..)`, `hypercall(vp, ..)`, `timer_expired(vp, ..)`, `run_vp_work(vp, ..)`) must
//!   be called **on that VP's own thread**, or while that VP is stopped.
//! * The engine may call platform methods while holding its internal locks. A platform method must therefore
//!   **never call back into the engine synchronously** (the single exception is [`Platform::apic_access`]). If the VMM needs to react with an engine call (e.g. an
//!   interrupt acknowledgement), it queues it and makes it later from the right thread.
//! * Methods never panic on bad guest input: bad GPAs come back as [`MemError`].

use crate::msr::Gp;
use serde::{Deserialize, Serialize};

/// A vCPU handle: the VMM's vCPU index (0..vp_count). Not the Hyper-V VP index (which the guest sees and which
/// equals the APIC ID); see [`crate::Engine::vp_index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VpId(pub u32);

impl VpId {
    /// The index as `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A per-VP timer the engine can arm. Synthetic timer *n* uses `TimerId(n)` (n = 0..4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimerId(pub u8);

/// A guest-memory access error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// Part of the range is not guest RAM (MMIO, a hole, or beyond the end of memory).
    #[error("guest physical range {gpa:#x}+{len:#x} is not RAM")]
    NotRam { gpa: u64, len: u64 },
    /// An atomic access was not naturally aligned.
    #[error("guest physical address {gpa:#x} is not aligned for an atomic access")]
    Misaligned { gpa: u64 },
}

/// Deferred work the engine wants executed on a particular VP's thread. The VMM does not interpret it: it arranges
/// for [`crate::Engine::run_vp_work`] to be called with it on the target VP's thread (typically before the VP next
/// enters the guest), kicking the VP out of the guest or out of HLT if necessary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VpWork(pub(crate) VpWorkKind);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum VpWorkKind {
    /// Retry message delivery for the SINTs in the mask (SynIC, engine II).
    SynicRetry(u16),
}

/// Something the VMM must act on; the VMM maps these to its own actions and to QMP events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// The guest wrote CRASH_CTL with the notify bit (bit 63). `params` are CRASH_P0..P4 (QEMU's arg1..arg5).
    /// The VMM logs `Guest crashed` and [`crate::crash::format_crash_params`], then applies `-action panic=`.
    GuestPanicked { vp: VpId, params: [u64; 5] },
    /// The guest wrote 1 to the RESET MSR: the VMM performs a full system reset (and calls
    /// [`crate::Engine::reset`]), or exits with `--no-reboot`.
    ResetRequested { vp: VpId },
    /// The guest wrote SCONTROL, SIMP or SIEFP (the equivalent of `KVM_EXIT_HYPERV` type SYNIC). Informational.
    SynicChanged { vp: VpId, msr: u32, value: u64 },
}

/// Direction of an x2APIC-style register access forwarded by the APIC-access MSRs (hv-vapic, engine II).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicAccess {
    /// Read the register.
    Read,
    /// Write the value.
    Write(u64),
}

/// The services the engine needs from the VMM. See the module documentation for the threading contract.
pub trait Platform: Send + Sync {
    // ----- guest memory ------------------------------------------------------------------------------------------

    /// Reads `buf.len()` bytes of guest-physical memory at `gpa`. The whole range must be RAM, else
    /// [`MemError::NotRam`] and `buf` is unspecified. The range may cross pages.
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;

    /// Writes `data` to guest-physical memory at `gpa`. The whole range must be RAM; on error nothing is written.
    /// Bytes must become visible to other vCPUs in increasing address order, as with a plain `memcpy` on x86
    /// (the TSC page protocol relies on the order of separate writes, not within one write).
    /// The engine calls [`Platform::mark_dirty`] itself after every successful write.
    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError>;

    /// Atomically ORs `bits` into the naturally aligned u64 at `gpa` and returns the previous value (like a
    /// `lock or`). Used for event flags, which other vCPUs clear concurrently.
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError>;

    /// Atomically compares the naturally aligned u64 at `gpa` with `current` and, if equal, replaces it with
    /// `new`. Returns the previous value either way (success iff it equals `current`). Used for message headers.
    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError>;

    /// Records that the engine wrote `[gpa, gpa + len)`, so dirty-page tracking (migration) sees pages written by
    /// the VMM rather than by the guest: the hypercall page, the TSC page, SynIC message and event pages, the VP
    /// assist page.
    fn mark_dirty(&self, gpa: u64, len: u64);

    /// Whether `[gpa, gpa + len)` is entirely guest RAM.
    fn is_ram(&self, gpa: u64, len: u64) -> bool;

    // ----- interrupts ----------------------------------------------------------------------------------------------

    /// Raises a fixed-mode interrupt with `vector` on VP `vp`'s local APIC. With `auto_eoi` the APIC must accept it
    /// without setting the ISR bit (Hyper-V auto-EOI SINTs): the guest never EOIs it. May be called from any
    /// thread; the VMM kicks the target if it is running or halted.
    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool);

    /// Raises the fixed-mode interrupt `vector` (not auto-EOI) on every VP in `vps` (distinct, ascending), as
    /// HvCallSendSyntheticClusterIpi(Ex) does: one call for the whole set, so the VMM can deliver it in one pass
    /// and kick each receiver once. Default: [`Platform::deliver_interrupt`] per VP.
    fn deliver_interrupt_set(&self, vps: &[VpId], vector: u8) {
        for &vp in vps {
            self.deliver_interrupt(vp, vector, false);
        }
    }

    /// Forwards an x2APIC-style register access (`msr` is the x2APIC MSR number: 0x80B EOI, 0x830 ICR, 0x808 TPR)
    /// to VP `vp`'s local APIC, for the hv-vapic MSRs. `Err(Gp)` means #GP. Default: #GP (no APIC-access support).
    /// This is the one platform method called **without** any engine lock held: the APIC model may call
    /// [`crate::Engine::apic_eoi`] from inside it.
    fn apic_access(&self, vp: VpId, msr: u32, access: ApicAccess) -> Result<u64, Gp> {
        let _ = (vp, msr, access);
        Err(Gp)
    }

    /// VP `vp`'s VP assist page was enabled at `gpa` (or disabled with `None`): the APIC model may use its first
    /// u32 for exit-less EOI (KVM's PV-EOI semantics; engine II). Called on `vp`'s thread during the MSR write,
    /// before the engine zeroes the new page's first u32, so that an exit-less EOI pending against the old page
    /// can be settled from its contents first. Default: ignored.
    fn pv_eoi_page_changed(&self, vp: VpId, gpa: Option<u64>) {
        let _ = (vp, gpa);
    }

    /// The guest acknowledged the SINTs in `sints` (bit n = SINT n) of VP `vp`, by EOM or by the EOI of their
    /// vector: a device with a staged message for one of them may retry now (QEMU's SINT-route ack notifier).
    /// Must not re-enter the engine synchronously. Default: ignored.
    fn sint_acked(&self, vp: VpId, sints: u16) {
        let _ = (vp, sints);
    }

    // ----- time ----------------------------------------------------------------------------------------------------

    /// The guest TSC of VP `vp` now: host TSC with the vCPU's TSC offset (and scaling) applied, computed without an
    /// ioctl. Must be monotonic per VP and consistent between VPs (KVM synchronises guest TSCs).
    fn guest_tsc(&self, vp: VpId) -> u64;

    /// The guest TSC frequency in Hz (`KVM_GET_TSC_KHZ` × 1000). Constant for the VM's lifetime.
    fn tsc_frequency_hz(&self) -> u64;

    /// CPU time (user + system) consumed so far by VP `vp`'s thread, in nanoseconds.
    fn vp_runtime_ns(&self, vp: VpId) -> u64;

    // ----- timers --------------------------------------------------------------------------------------------------

    /// Arms (or re-arms) timer `timer` of VP `vp` to fire when reference time (100 ns units, as returned by
    /// [`crate::Engine::reference_time`]) reaches `deadline`. A deadline in the past fires at once. On expiry the VMM
    /// calls [`crate::Engine::timer_expired`] on VP `vp`'s thread (kicking it out of HLT if needed).
    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64);

    /// Cancels timer `timer` of VP `vp`. An expiry that races with the cancel may still be reported; the engine
    /// ignores stale expiries.
    fn cancel_timer(&self, vp: VpId, timer: TimerId);

    // ----- vCPU control --------------------------------------------------------------------------------------------

    /// Queues `work` for VP `vp`: the VMM calls [`crate::Engine::run_vp_work`]`(vp, work)` on that VP's thread
    /// before it next enters the guest, kicking it if it is in the guest or halted. Duplicates may be merged.
    fn run_on_vp(&self, vp: VpId, work: VpWork);

    /// Forces VP `vp` out of the guest (or out of HLT) so that it re-evaluates pending work and interrupts.
    fn kick_vp(&self, vp: VpId);

    /// The calling VP `vp` is spinning on a lock (HvCallNotifyLongSpinWait): the VMM may yield the host CPU.
    fn yield_vp(&self, vp: VpId);

    /// Flushes the guest TLB of every VP in `targets` (distinct; non-empty) and returns only when no target can
    /// still use a stale translation: a target that is in the guest must be stopped and flushed (or be certain
    /// to flush before it executes another guest instruction) before this returns; halted or stopped targets
    /// only need to flush before they next run, without being woken. `targets` may contain `caller` (a flush of
    /// "all processors" does): the caller then flushes itself before it re-enters the guest; a caller that is
    /// not in `targets` keeps its TLB. Called on `caller`'s thread (HvCallFlushVirtualAddress*), with no engine
    /// lock held; `vmm::tlbflush::flush_vcpus` implements it for the enlighten VMM.
    fn flush_remote_tlb(&self, caller: VpId, targets: &[VpId]);

    // ----- VM life cycle -------------------------------------------------------------------------------------------

    /// Reports an [`Event`].
    fn event(&self, event: Event);
}

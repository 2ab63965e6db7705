//! Remote guest-TLB flushes for the Hyper-V flush hypercalls (HvCallFlushVirtualAddress{Space,List}[Ex]).
//!
//! # The promise
//!
//! When the flush hypercall returns to the caller, no target VP may still use a translation that was cached
//! before the call. KVM gives userspace no "flush this vCPU's TLB" ioctl, and on this host neither a forced
//! exit nor a `KVM_SET_SREGS` with unchanged values flushes (measured). What does flush is a `KVM_SET_SREGS`
//! that changes a paging control register: [`flush_own_tlb`] toggles CR4.PGE in one `KVM_SET_SREGS` and
//! restores it in a second, on the vCPU's own thread, while the vCPU is outside `KVM_RUN`.
//!
//! Why that flushes, here and on EPT/VPID hardware: `KVM_SET_SREGS` compares the new CR0/CR3/CR4/EFER with the
//! current ones and, when one differs, resets the vCPU's MMU context (`kvm_mmu_reset_context`: the current
//! roots are unloaded). The next entry has to load a root again (`kvm_mmu_load`), and KVM flushes the TLB for
//! the root it loads (`flush_tlb_current`) because it cannot know what the hardware still caches for it. With
//! shadow paging (this host's paging-based KVM) that is a fresh shadow root built from the guest page tables as
//! they are now; with EPT it is an INVEPT single-context for the vCPU's EPTP, which drops the combined
//! (GVA→HPA) mappings tagged with it, whatever the VPID. Changing CR4.PGE is also, architecturally, an
//! operation that invalidates every TLB entry including global ones, so KVM versions that route the change
//! through their CR4 path request a guest-TLB flush for it as well. The restoring `KVM_SET_SREGS` changes the
//! register again (second reset), and the guest never runs with the temporary value. The cost is three vCPU
//! ioctls (`GET_SREGS` + 2 × `SET_SREGS`, ≈ 3 exits' worth here) per flushed vCPU, paid only by vCPUs that
//! run again.
//!
//! # The protocol
//!
//! [`flush_vcpus`] runs on the caller's thread (inside its hypercall exit). For each target it queues a
//! [`VcpuRequest::FlushTlb`] under the target's state lock; a vCPU thread runs its requests before every
//! `KVM_RUN`, under the same lock it uses to decide to enter, and sets `in_guest` in that same critical section.
//! So a target is in one of two states when the caller looks at it:
//! * **not in the guest** (halted, waiting for SIPI, parked by a pause, handling an exit, or the caller
//!   itself): it will execute the flush before its next guest instruction. It is not woken, so idle vCPUs stay
//!   asleep; a halted vCPU pays for the flush only when something else wakes it.
//! * **in the guest**: the caller kicks it (`immediate_exit` + signal, which forces `KVM_RUN` to return) and
//!   waits until its thread has left `KVM_RUN`; from then on it cannot re-enter without running the queued
//!   flush first.
//!
//! The caller returns when every target is in the first state, i.e. when no target can execute a guest
//! instruction with a stale translation: that is exactly the TLFS promise (a guest cannot tell a VP that
//! flushed before the hypercall returned from one that flushes before it next executes anything). Waiting for
//! the flush itself to complete would add nothing observable but would deadlock two vCPUs that flush each
//! other at the same time: each would wait inside its own exit handler for the other to reach its next entry.
//! Here the only thing waited for is a kicked `KVM_RUN` returning, which needs nothing from the waiter. For
//! the same reason this does not use [`crate::VmHandle::pause`] (one rendezvous at a time, not for vCPU
//! threads): two callers pausing each other would deadlock on it.
//!
//! The caller's own TLB is flushed only when it is in the target set (then before it re-enters). Queued flush
//! requests are merged, so a burst of flushes to a vCPU that stays halted costs one flush when it wakes. The
//! work per call is proportional to the target set: no scan of other vCPUs.

use crate::machine::{VcpuRequest, VcpuShared, VmHandle};
use kvm_ioctls::VcpuFd;

/// CR4.PGE (page global enable).
pub const CR4_PGE: u64 = 1 << 7;

/// What [`flush_vcpus`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Targets that were in the guest: kicked out of `KVM_RUN` and waited for.
    pub kicked: usize,
    /// Targets outside the guest (halted, parked, waiting for SIPI, the caller): flush queued, not woken.
    pub deferred: usize,
    /// Targets that already had a flush queued (merged).
    pub merged: usize,
    /// Targets that do not exist or whose thread has ended.
    pub skipped: usize,
}

/// What to do with one target, decided under its state lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    /// In the guest: kick it and wait until it has left `KVM_RUN`.
    KickAndWait,
    /// Outside the guest: the queued request runs before its next entry.
    Deferred,
    /// A flush was already queued and the vCPU is outside the guest.
    Merged,
}

/// Queues a flush in `requests` (merging with one already queued) and says what the caller must do. Pure
/// bookkeeping, unit-tested: `in_guest` is the target's flag, `is_caller` whether it is the calling vCPU (which
/// is handling its own exit and never in the guest).
pub fn queue_flush(
    requests: &mut Vec<VcpuRequest>,
    in_guest: bool,
    is_caller: bool,
) -> TargetAction {
    let already = requests.contains(&VcpuRequest::FlushTlb);
    if !already {
        requests.push(VcpuRequest::FlushTlb);
    }
    if in_guest && !is_caller {
        TargetAction::KickAndWait
    } else if already {
        TargetAction::Merged
    } else {
        TargetAction::Deferred
    }
}

/// Flushes the guest TLBs of the vCPUs in `targets` (vCPU indexes) on behalf of vCPU `caller`, and returns once
/// no target can run guest code with a stale translation (see the module documentation). Call it on `caller`'s
/// thread (from its hypercall exit) or from any non-vCPU thread; unknown indexes are ignored.
pub fn flush_vcpus(handle: &VmHandle, caller: usize, targets: &[usize]) -> FlushStats {
    let shared = handle.shared();
    let mut stats = FlushStats::default();
    let mut waiting: Vec<usize> = Vec::new();
    for &t in targets {
        let Some(v) = shared.vcpus.get(t) else {
            stats.skipped += 1;
            continue;
        };
        let mut st = v.lock();
        if st.exited {
            stats.skipped += 1;
            continue;
        }
        let in_guest = st.in_guest;
        match queue_flush(&mut st.requests, in_guest, t == caller) {
            TargetAction::KickAndWait => {
                st.exit_waiters = true;
                drop(st);
                v.kicker.kick();
                waiting.push(t);
                stats.kicked += 1;
            }
            TargetAction::Deferred => stats.deferred += 1,
            TargetAction::Merged => stats.merged += 1,
        }
    }
    for &t in &waiting {
        let v = &shared.vcpus[t];
        let mut st = v.lock();
        // Done when it has left `KVM_RUN` or, if it already re-entered, when it has taken the queued flush (it
        // takes its requests only outside the guest, after leaving): a short exit is not missed.
        while st.in_guest
            && st.requests.contains(&VcpuRequest::FlushTlb)
            && !st.exited
            && !shared.stopping()
        {
            st.exit_waiters = true;
            st = v.parked_cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
    stats
}

/// Called by the vCPU thread right after `KVM_RUN` returns: the vCPU is no longer in the guest; wakes a
/// [`flush_vcpus`] caller waiting for that.
pub(crate) fn left_guest(me: &VcpuShared) {
    let mut st = me.lock();
    st.in_guest = false;
    if std::mem::take(&mut st.exit_waiters) {
        drop(st);
        me.parked_cv.notify_all();
    }
}

/// Flushes the calling vCPU's guest TLB: CR4.PGE toggled in one `KVM_SET_SREGS` and restored in a second (see
/// the module documentation). Call on the vCPU's own thread, outside `KVM_RUN`, with no exit pending.
pub fn flush_own_tlb(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let sregs = fd.get_sregs()?;
    let mut toggled = sregs;
    toggled.cr4 ^= CR4_PGE;
    fd.set_sregs(&toggled)?;
    fd.set_sregs(&sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_flush_bookkeeping() {
        // (already queued, in guest, is caller) → (action, number of FlushTlb requests after)
        let cases = [
            ((false, false, false), TargetAction::Deferred),
            ((false, true, false), TargetAction::KickAndWait),
            ((false, true, true), TargetAction::Deferred),
            ((false, false, true), TargetAction::Deferred),
            ((true, false, false), TargetAction::Merged),
            ((true, true, false), TargetAction::KickAndWait),
            ((true, false, true), TargetAction::Merged),
        ];
        for ((queued, in_guest, caller), want) in cases {
            let mut reqs = vec![VcpuRequest::Reset { entry: None }];
            if queued {
                reqs.push(VcpuRequest::FlushTlb);
            }
            let got = queue_flush(&mut reqs, in_guest, caller);
            assert_eq!(
                got, want,
                "queued {queued} in_guest {in_guest} caller {caller}"
            );
            let flushes = reqs.iter().filter(|r| **r == VcpuRequest::FlushTlb).count();
            assert_eq!(flushes, 1, "exactly one queued flush");
            assert_eq!(
                reqs[0],
                VcpuRequest::Reset { entry: None },
                "other requests kept"
            );
        }
    }
}

//! hv-vapic exit-less EOI with KVM's PV-EOI semantics, through bit 0 ("no EOI required") of the first u32 of
//! the VP assist page.
//!
//! - **Before each entry** ([`PvEoi::sync_to_guest`]): if the page is enabled, nothing is requested in the IRR
//!   and exactly one vector is in service, and that vector was accepted edge-triggered, the bit is set and the
//!   vector remembered. (KVM: `apic_sync_pv_eoi_to_guest`.)
//! - A guest that honours the bit clears it in its handler instead of writing EOI.
//! - **After each exit, before a new delivery is decided** ([`PvEoi::sync_from_guest`]): if the bit was set for
//!   this entry and the guest cleared it, the VMM performs the EOI now (and the machine reports it to the EOI
//!   hook like any other EOI); if the guest left it set, the VMM clears it again, so the guest writes a real EOI
//!   should another interrupt arrive first. (KVM: `apic_sync_pv_eoi_from_guest`.)
//!
//! This is never auto-EOI: the vector stays in the ISR, and priority masking stays exact, until the guest's
//! handler has cleared the bit and the vCPU has exited. The machine runs `sync_from_guest` before parking a
//! vCPU, so a snapshot never holds a half-done exit-less EOI in guest memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress};

use crate::apic::{Eoi, LocalApic};
use crate::machine::VmHandle;

/// The "no EOI required" bit.
pub const NO_EOI_REQUIRED: u32 = 1;

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// Guest physical address of the assist page's first u32 (the page is enabled).
    gpa: Option<u64>,
    /// The vector whose EOI the bit currently stands for.
    pending: Option<u8>,
    /// An exit-less EOI the guest completed just before it moved or disabled the page (in the same run, with
    /// no exit in between), to be performed at the next [`PvEoi::sync_from_guest`].
    owed: Option<u8>,
}

/// Per-vCPU exit-less EOI state.
#[derive(Debug, Default)]
pub struct PvEoi {
    slots: Vec<Mutex<Slot>>,
    /// Exit-less EOIs completed, over all vCPUs.
    completed: AtomicU64,
}

impl PvEoi {
    /// State for `n` vCPUs, every page disabled.
    pub fn new(n: usize) -> PvEoi {
        PvEoi {
            slots: (0..n).map(|_| Mutex::new(Slot::default())).collect(),
            completed: AtomicU64::new(0),
        }
    }

    fn slot(&self, vcpu: usize) -> Option<MutexGuard<'_, Slot>> {
        self.slots
            .get(vcpu)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The VP assist page of `vcpu` is being enabled at `gpa` or disabled (called during the guest's MSR write,
    /// before the engine zeroes the new page's first u32). An exit-less EOI pending against the old page is
    /// settled from the old page's bit first, as KVM does at the exit before it handles the write: cleared by the
    /// guest → the EOI is owed and performed by the next [`PvEoi::sync_from_guest`] (not here: the EOI hook must
    /// not run inside the engine's MSR write); still set → no EOI, and the bit is cleared in the old page.
    pub fn set_page(
        &self,
        vcpu: usize,
        mem: &VmHandle,
        gpa: Option<u64>,
        dirty: &dyn Fn(u64, u64),
    ) {
        let Some(mut s) = self.slot(vcpu) else {
            return;
        };
        let mut owed = s.owed;
        if let (Some(vector), Some(old)) = (s.pending, s.gpa) {
            let mem = mem.memory();
            if let Ok(word) = mem.read_obj::<u32>(GuestAddress(old)) {
                if word & NO_EOI_REQUIRED == 0 {
                    owed = Some(vector);
                } else if mem
                    .write_obj(word & !NO_EOI_REQUIRED, GuestAddress(old))
                    .is_ok()
                {
                    dirty(old, 4);
                }
            }
        }
        *s = Slot {
            gpa,
            pending: None,
            owed,
        };
    }

    /// Number of EOIs completed exit-lessly so far (all vCPUs).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// After an exit, on `vcpu`'s thread with its state locked: completes the EOI the guest signalled by clearing
    /// the bit, or clears a bit the guest did not use. Returns the EOI performed.
    /// `dirty` is told about every write the VMM makes to guest memory (dirty-page tracking for migration).
    pub fn sync_from_guest(
        &self,
        vcpu: usize,
        mem: &VmHandle,
        apic: &mut LocalApic,
        dirty: &dyn Fn(u64, u64),
    ) -> Option<Eoi> {
        let mut s = self.slot(vcpu)?;
        if let Some(vector) = s.owed.take() {
            // Completed by the guest before it changed the page: only that vector, alone in service.
            if !apic.is_in_service(vector) || apic.isr_count() != 1 {
                return None;
            }
            let eoi = apic.eoi();
            if eoi.is_some() {
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            return eoi;
        }
        let vector = s.pending.take()?;
        let gpa = s.gpa?;
        let mem = mem.memory();
        let Ok(word) = mem.read_obj::<u32>(GuestAddress(gpa)) else {
            return None;
        };
        if word & NO_EOI_REQUIRED != 0 {
            // The handler has not run (or has not finished): the guest must EOI normally from now on.
            if mem
                .write_obj(word & !NO_EOI_REQUIRED, GuestAddress(gpa))
                .is_ok()
            {
                dirty(gpa, 4);
            }
            return None;
        }
        // Only the vector the bit was set for; after an INIT or a restore the ISR may describe something else.
        if !apic.is_in_service(vector) || apic.isr_count() != 1 {
            return None;
        }
        let eoi = apic.eoi();
        if eoi.is_some() {
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
        eoi
    }

    /// Right before `KVM_RUN`, with `vcpu`'s state locked and the injection decided: offers an exit-less EOI
    /// when it is safe (exactly one edge-triggered vector in service, nothing requested).
    pub fn sync_to_guest(
        &self,
        vcpu: usize,
        mem: &VmHandle,
        apic: &LocalApic,
        dirty: &dyn Fn(u64, u64),
    ) {
        let Some(mut s) = self.slot(vcpu) else {
            return;
        };
        let Some(gpa) = s.gpa else {
            return;
        };
        if s.pending.is_some() || apic.highest_irr().is_some() || apic.isr_count() != 1 {
            return;
        }
        let Some(vector) = (0..=255u8).rev().find(|&v| apic.is_in_service(v)) else {
            return;
        };
        if apic.is_level_triggered(vector) {
            return;
        }
        let mem = mem.memory();
        let Ok(word) = mem.read_obj::<u32>(GuestAddress(gpa)) else {
            return;
        };
        if mem
            .write_obj(word | NO_EOI_REQUIRED, GuestAddress(gpa))
            .is_ok()
        {
            dirty(gpa, 4);
            s.pending = Some(vector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apic::ApicConfig;
    use crate::machine::{Machine, VmConfig};
    use std::sync::Arc;

    use crate::test_support::{NoDevices, NoKernel};

    /// A 1 MiB, 1-vCPU machine (its guest memory is what the PV-EOI code reads and writes), or `None`
    /// without a usable /dev/kvm.
    fn one_vcpu_machine() -> Option<(Machine, Vec<kvm_ioctls::VcpuFd>)> {
        let cfg = VmConfig {
            ram_size: 1 << 20,
            vcpus: 1,
            ..VmConfig::default()
        };
        let m = Machine::new(cfg, Arc::new(NoKernel), Arc::new(NoDevices)).ok();
        if m.is_none() {
            eprintln!("skipped: no usable /dev/kvm");
        }
        m
    }

    fn enabled_apic() -> LocalApic {
        let mut a = LocalApic::new(0, ApicConfig::default());
        // SPIV: software-enable.
        let _ = a.mmio_write(0xF0, &0x1FFu32.to_le_bytes(), 0);
        a
    }

    const ASSIST: u64 = 0x8000;

    /// What the guest does between the entry and the next exit.
    #[derive(Clone, Copy, Debug)]
    enum Guest {
        /// Its handler cleared the bit (skipped the EOI).
        ClearsBit,
        /// The handler has not run yet / ignores the bit.
        LeavesBit,
    }

    /// (case, vectors in service before, level-triggered, another vector requested, guest, bit offered,
    /// EOI performed by the VMM)
    #[allow(clippy::type_complexity)]
    const CASES: &[(&str, &[u8], bool, Option<u8>, Guest, bool, Option<u8>)] = &[
        (
            "one edge vector, guest honours",
            &[0x50],
            false,
            None,
            Guest::ClearsBit,
            true,
            Some(0x50),
        ),
        (
            "one edge vector, guest ignores",
            &[0x50],
            false,
            None,
            Guest::LeavesBit,
            true,
            None,
        ),
        (
            "level-triggered",
            &[0x50],
            true,
            None,
            Guest::ClearsBit,
            false,
            None,
        ),
        (
            "another vector requested",
            &[0x50],
            false,
            Some(0x40),
            Guest::ClearsBit,
            false,
            None,
        ),
        (
            "two vectors in service",
            &[0x50, 0x90],
            false,
            None,
            Guest::ClearsBit,
            false,
            None,
        ),
        (
            "nothing in service",
            &[],
            false,
            None,
            Guest::ClearsBit,
            false,
            None,
        ),
    ];

    #[test]
    fn offers_and_completes_like_kvm() {
        let Some((m, _fds)) = one_vcpu_machine() else {
            return;
        };
        let h = m.handle();
        let dirty = std::cell::RefCell::new(Vec::new());
        let mark = |gpa: u64, len: u64| dirty.borrow_mut().push((gpa, len));
        for &(name, in_service, level, requested, guest, offered, eoi) in CASES {
            let pv = PvEoi::new(1);
            pv.set_page(0, &h, Some(ASSIST), &mark);
            h.memory().write_obj(0u32, GuestAddress(ASSIST)).unwrap();
            let mut apic = enabled_apic();
            for &v in in_service {
                assert!(apic.accept_fixed(v, level), "{name}");
                assert!(!apic.ack_interrupt(v), "{name}");
            }
            if let Some(v) = requested {
                apic.accept_fixed(v, false);
            }
            dirty.borrow_mut().clear();
            pv.sync_to_guest(0, &h, &apic, &mark);
            let word: u32 = h.memory().read_obj(GuestAddress(ASSIST)).unwrap();
            assert_eq!(word & NO_EOI_REQUIRED != 0, offered, "{name}: bit offered");
            assert_eq!(!dirty.borrow().is_empty(), offered, "{name}: dirty page");
            if let Guest::ClearsBit = guest {
                h.memory()
                    .write_obj(word & !NO_EOI_REQUIRED, GuestAddress(ASSIST))
                    .unwrap();
            }
            let before = apic.isr_count();
            let done = pv.sync_from_guest(0, &h, &mut apic, &mark);
            assert_eq!(done.map(|e| e.vector), eoi, "{name}: EOI");
            assert_eq!(
                apic.isr_count(),
                before - u32::from(eoi.is_some()),
                "{name}: ISR"
            );
            let word: u32 = h.memory().read_obj(GuestAddress(ASSIST)).unwrap();
            assert_eq!(
                word & NO_EOI_REQUIRED,
                0,
                "{name}: the bit never outlives the exit"
            );
            assert_eq!(pv.completed(), u64::from(eoi.is_some()), "{name}: count");
            // A second exit without a new offer does nothing.
            assert!(
                pv.sync_from_guest(0, &h, &mut apic, &mark).is_none(),
                "{name}"
            );
        }
    }

    #[test]
    fn disabled_page_or_page_outside_ram_never_offers() {
        let Some((m, _fds)) = one_vcpu_machine() else {
            return;
        };
        let h = m.handle();
        for page in [None, Some(1u64 << 40), Some(u64::MAX - 1)] {
            let pv = PvEoi::new(1);
            pv.set_page(0, &h, page, &|_, _| {});
            let mut apic = enabled_apic();
            apic.accept_fixed(0x50, false);
            apic.ack_interrupt(0x50);
            pv.sync_to_guest(0, &h, &apic, &|_, _| {});
            assert!(pv.sync_from_guest(0, &h, &mut apic, &|_, _| {}).is_none());
            assert!(apic.is_in_service(0x50), "{page:?}");
        }
        // Unknown vCPUs are ignored.
        let pv = PvEoi::new(1);
        pv.set_page(5, &h, Some(ASSIST), &|_, _| {});
        let mut apic = enabled_apic();
        pv.sync_to_guest(5, &h, &apic, &|_, _| {});
        assert!(pv.sync_from_guest(5, &h, &mut apic, &|_, _| {}).is_none());
    }

    /// The guest's handler changes the VP assist page right after the entry that offered an exit-less EOI, with
    /// no exit in between: KVM syncs PV-EOI at that exit before handling the MSR write, so a cleared bit is an
    /// EOI and a set bit is not (and is cleared in the old page).
    #[test]
    fn page_changed_while_an_exit_less_eoi_is_pending() {
        let Some((m, _fds)) = one_vcpu_machine() else {
            return;
        };
        let h = m.handle();
        const OTHER: u64 = 0x9000;
        // (case, the guest cleared the bit, new page, EOI performed)
        let cases: &[(&str, bool, Option<u64>, bool)] = &[
            ("cleared, page disabled", true, None, true),
            ("cleared, page moved", true, Some(OTHER), true),
            (
                "cleared, page re-enabled in place",
                true,
                Some(ASSIST),
                true,
            ),
            ("not cleared, page disabled", false, None, false),
            ("not cleared, page moved", false, Some(OTHER), false),
            (
                "not cleared, page re-enabled in place",
                false,
                Some(ASSIST),
                false,
            ),
            ("cleared, page moved outside RAM", true, Some(1 << 40), true),
        ];
        for &(name, cleared, new_page, eoi) in cases {
            let pv = PvEoi::new(1);
            h.memory().write_obj(0u32, GuestAddress(ASSIST)).unwrap();
            pv.set_page(0, &h, Some(ASSIST), &|_, _| {});
            let mut apic = enabled_apic();
            apic.accept_fixed(0x50, false);
            apic.ack_interrupt(0x50);
            pv.sync_to_guest(0, &h, &apic, &|_, _| {});
            let word: u32 = h.memory().read_obj(GuestAddress(ASSIST)).unwrap();
            assert_eq!(word & NO_EOI_REQUIRED, 1, "{name}: offered");
            if cleared {
                h.memory().write_obj(0u32, GuestAddress(ASSIST)).unwrap();
            }
            // The engine tells the platform before it zeroes the new page's first u32.
            let dirty = std::cell::RefCell::new(Vec::new());
            pv.set_page(0, &h, new_page, &|gpa, len| {
                dirty.borrow_mut().push((gpa, len))
            });
            if let Some(p) = new_page.filter(|&p| p < (1 << 20)) {
                h.memory().write_obj(0u32, GuestAddress(p)).unwrap();
            }
            let done = pv.sync_from_guest(0, &h, &mut apic, &|_, _| {});
            assert_eq!(done.map(|e| e.vector), eoi.then_some(0x50), "{name}: EOI");
            assert_eq!(apic.is_in_service(0x50), !eoi, "{name}: ISR");
            let old: u32 = h.memory().read_obj(GuestAddress(ASSIST)).unwrap();
            assert_eq!(
                old & NO_EOI_REQUIRED,
                0,
                "{name}: the old page's bit is cleared"
            );
            assert_eq!(
                !dirty.borrow().is_empty(),
                !cleared,
                "{name}: the VMM wrote (and marked dirty) the old page only to clear an unused bit"
            );
            assert!(
                pv.sync_from_guest(0, &h, &mut apic, &|_, _| {}).is_none(),
                "{name}: nothing more"
            );
        }
    }
}

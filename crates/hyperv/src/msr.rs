//! Synthetic MSR access: gating and the partition/VP MSR handlers.
//!
//! Gating follows KVM:
//! - Hyper-V identification off (0x40000001.EAX != "Hv#1"): every synthetic MSR #GPs.
//! - Without `hv-enforce-cpuid`: every implemented MSR is reachable; the SynIC MSRs, and writes to the stimer
//!   MSRs, #GP unless the SynIC is active (hv-synic).
//! - With `hv-enforce-cpuid`: additionally each MSR needs its CPUID bit ([`msr_cpuid_allowed`], KVM's
//!   `hv_check_msr_access`).
//!
//! SynIC, stimer and APIC-access MSRs are routed to [`crate::synic`], [`crate::stimer`] and [`crate::vapic`].

use crate::engine::Engine;
use crate::guest::{eax3, edx3, HvCpuid, SYNDBG_ALLOW_KERNEL_DEBUGGING};
use crate::hcpage::HYPERCALL_PAGE_CODE;
use crate::platform::{Event, Platform, VpId};
use crate::{stimer, synic, vapic};
use tlfs::msr::{self, *};
use tlfs::pages::PAGE_OFFSET_MASK;

/// The guest access must fail with #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("#GP")]
pub struct Gp;

/// Whether the enforce table (KVM's `hv_check_msr_access`) lets the guest access `index`; only consulted with
/// `hv-enforce-cpuid`. Unknown MSRs pass here and #GP later.
pub fn msr_cpuid_allowed(c: &HvCpuid, index: u32) -> bool {
    let a = |bit: u32| c.features_eax & bit != 0;
    match index {
        GUEST_OS_ID | HYPERCALL => a(eax3::HYPERCALL),
        VP_RUNTIME => a(eax3::VP_RUNTIME),
        TIME_REF_COUNT => a(eax3::TIME_REF_COUNT),
        VP_INDEX => a(eax3::VP_INDEX),
        RESET => a(eax3::RESET),
        REFERENCE_TSC => a(eax3::REFERENCE_TSC),
        SCONTROL..=EOM | SINT0..=SINT15 => a(eax3::SYNIC),
        STIMER0_CONFIG..=STIMER3_COUNT => a(eax3::SYNTIMERS),
        TSC_FREQUENCY | APIC_FREQUENCY => a(eax3::FREQUENCY_MSRS),
        EOI..=VP_ASSIST_PAGE => a(eax3::APIC_ACCESS),
        REENLIGHTENMENT_CONTROL | TSC_EMULATION_CONTROL | TSC_EMULATION_STATUS => {
            a(eax3::REENLIGHTENMENT)
        }
        TSC_INVARIANT_CONTROL => a(eax3::TSC_INVARIANT),
        CRASH_P0..=CRASH_CTL => c.features_edx & edx3::CRASH_MSRS != 0,
        SYNDBG_CONTROL..=SYNDBG_PENDING_BUFFER | SYNDBG_OPTIONS => {
            c.features_edx & edx3::DEBUG_MSRS != 0
                && c.syndbg_eax & SYNDBG_ALLOW_KERNEL_DEBUGGING != 0
        }
        _ => true,
    }
}

impl<P: Platform> Engine<P> {
    fn msr_gate(&self, index: u32) -> Result<(), Gp> {
        let c = &self.config.cpuid;
        if !c.enabled() {
            return Err(Gp);
        }
        if self.config.enforce_cpuid && !msr_cpuid_allowed(c, index) {
            return Err(Gp);
        }
        Ok(())
    }

    /// Guest RDMSR of a synthetic MSR on VP `vp`. `Err(Gp)` means: inject #GP.
    pub fn read_msr(&self, vp: VpId, index: u32) -> Result<u64, Gp> {
        self.msr_gate(index)?;
        if vapic::is_apic_register_msr(index) {
            // Forwarded to the APIC model without holding any engine lock, so that it may call back (EOI → ack).
            return vapic::apic_register(&self.platform, vp, index, None, self.vp_count());
        }
        let v = self.vp(vp).ok_or(Gp)?;
        if synic::is_synic_msr(index) {
            if !self.config.synic {
                return Err(Gp);
            }
            return synic::read(&v, index);
        }
        if stimer::is_stimer_msr(index) {
            return stimer::read(&v, index);
        }
        if vapic::is_vapic_msr(index) {
            return vapic::read(&v, index);
        }
        match index {
            VP_INDEX => return Ok(u64::from(v.vp_index)),
            VP_RUNTIME => {
                let ns = self.platform.vp_runtime_ns(vp);
                return Ok(((ns / 100) as i64).wrapping_add(v.runtime_offset) as u64);
            }
            _ => {}
        }
        drop(v);
        if index == TIME_REF_COUNT {
            return Ok(self.reference_time(vp));
        }
        let p = self.part();
        Ok(match index {
            GUEST_OS_ID => p.guest_os_id,
            HYPERCALL => p.hypercall,
            RESET => 0,
            REFERENCE_TSC => p.reference_tsc,
            TSC_FREQUENCY => self.platform.tsc_frequency_hz(),
            APIC_FREQUENCY => self.config.apic_frequency_hz,
            CRASH_P0..=CRASH_P4 => p.crash_params[(index - CRASH_P0) as usize],
            CRASH_CTL => p.crash_ctl & CRASH_CTL_NOTIFY,
            REENLIGHTENMENT_CONTROL => p.reenlightenment_control,
            TSC_EMULATION_CONTROL => p.tsc_emulation_control,
            TSC_EMULATION_STATUS => p.tsc_emulation_status,
            TSC_INVARIANT_CONTROL => p.tsc_invariant_control,
            _ => return Err(Gp),
        })
    }

    /// Guest WRMSR of a synthetic MSR on VP `vp`. `Err(Gp)` means: inject #GP (nothing changed).
    pub fn write_msr(&self, vp: VpId, index: u32, value: u64) -> Result<(), Gp> {
        self.msr_gate(index)?;
        if vapic::is_apic_register_msr(index) {
            return vapic::apic_register(&self.platform, vp, index, Some(value), self.vp_count())
                .map(|_| ());
        }
        let mut v = self.vp(vp).ok_or(Gp)?;
        if synic::is_synic_msr(index) {
            if !self.config.synic {
                return Err(Gp);
            }
            let now = || self.reference_time(vp);
            return synic::write(&self.platform, vp, &mut v, index, value, &now);
        }
        if stimer::is_stimer_msr(index) {
            if !self.config.synic {
                return Err(Gp);
            }
            let direct = msr::StimerConfig::from_bits(value).direct_mode();
            if self.config.enforce_cpuid
                && stimer::decode(index).1
                && direct
                && self.config.cpuid.features_edx & edx3::STIMER_DIRECT == 0
            {
                return Err(Gp);
            }
            let now = || self.reference_time(vp);
            return stimer::write(&self.platform, vp, &mut v, index, value, &now);
        }
        if vapic::is_vapic_msr(index) {
            return vapic::write(&self.platform, vp, &mut v, index, value);
        }
        drop(v);
        let mut p = self.part();
        match index {
            GUEST_OS_ID => {
                p.guest_os_id = value;
                if value == 0 {
                    p.hypercall &= !1;
                }
            }
            HYPERCALL => {
                if p.guest_os_id == 0 {
                    // KVM: ignored while the guest has not identified itself.
                    return Ok(());
                }
                if HypercallMsr::from_bits(p.hypercall).locked() {
                    // TLFS: a locked HYPERCALL MSR can no longer be changed (KVM ignores the bit).
                    return Ok(());
                }
                if HypercallMsr::from_bits(value).enable() {
                    let gpa = value & !PAGE_OFFSET_MASK;
                    self.platform
                        .write_gpa(gpa, &HYPERCALL_PAGE_CODE)
                        .map_err(|_| Gp)?;
                    self.platform
                        .mark_dirty(gpa, HYPERCALL_PAGE_CODE.len() as u64);
                }
                p.hypercall = value;
            }
            RESET => {
                if value == 1 {
                    drop(p);
                    self.platform.event(Event::ResetRequested { vp });
                }
            }
            REFERENCE_TSC => {
                p.reference_tsc = value;
                self.refresh_tsc_page(&mut p, false);
            }
            CRASH_P0..=CRASH_P4 => p.crash_params[(index - CRASH_P0) as usize] = value,
            CRASH_CTL => {
                if value & CRASH_CTL_NOTIFY != 0 {
                    let params = p.crash_params;
                    drop(p);
                    self.platform.event(Event::GuestPanicked { vp, params });
                }
            }
            REENLIGHTENMENT_CONTROL => p.reenlightenment_control = value,
            TSC_EMULATION_CONTROL => p.tsc_emulation_control = value,
            TSC_EMULATION_STATUS => {
                if value != 0 {
                    return Err(Gp);
                }
                p.tsc_emulation_status = value;
            }
            TSC_INVARIANT_CONTROL => {
                if value & !TSC_INVARIANT_CONTROL_EXPOSE != 0
                    || (p.tsc_invariant_control & TSC_INVARIANT_CONTROL_EXPOSE != 0 && value == 0)
                {
                    return Err(Gp);
                }
                p.tsc_invariant_control = value;
            }
            // Read-only, unimplemented (GUEST_IDLE, SYNDBG_*, nested SynIC, ...) or unknown.
            _ => return Err(Gp),
        }
        Ok(())
    }
}

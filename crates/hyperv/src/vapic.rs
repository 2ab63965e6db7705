//! hv-vapic: the APIC-access MSRs (EOI, ICR, TPR) and the VP assist page.
//!
//! EOI/ICR/TPR are forwarded to the VMM's local APIC through [`crate::Platform::apic_access`] as x2APIC-style
//! register accesses (KVM forwards them to its LAPIC; without an APIC model the platform answers #GP). The VP assist
//! page follows KVM: enabling it requires RAM at the page and zeroes its first u32. Exit-less EOI (PV-EOI through the
//! page) is engine II (issue 5), which is told about the page through
//! [`crate::Platform::pv_eoi_page_changed`].

use crate::platform::{ApicAccess, Platform, VpId};
use crate::state::VpState;
use crate::Gp;
use tlfs::msr;
use tlfs::pages::{PAGE_OFFSET_MASK, VP_ASSIST_APIC_ASSIST_OFFSET};

/// x2APIC MSR numbers the APIC-access MSRs map to.
pub const X2APIC_EOI: u32 = 0x80B;
/// x2APIC ICR.
pub const X2APIC_ICR: u32 = 0x830;
/// x2APIC TPR.
pub const X2APIC_TPR: u32 = 0x808;

/// Whether `index` is handled here.
pub fn is_vapic_msr(index: u32) -> bool {
    (msr::EOI..=msr::VP_ASSIST_PAGE).contains(&index)
}

fn x2apic_reg(index: u32) -> Option<u32> {
    match index {
        msr::EOI => Some(X2APIC_EOI),
        msr::ICR => Some(X2APIC_ICR),
        msr::TPR => Some(X2APIC_TPR),
        _ => None,
    }
}

/// Whether `index` is EOI, ICR or TPR (forwarded to the APIC model).
pub fn is_apic_register_msr(index: u32) -> bool {
    x2apic_reg(index).is_some()
}

/// Forwards an EOI/ICR/TPR access of VP `id` to the APIC model (`value` = `Some` for a write). No engine lock is
/// held, so the APIC model may call back into the engine (e.g. [`crate::Engine::apic_eoi`]).
pub(crate) fn apic_register<P: Platform>(
    platform: &P,
    id: VpId,
    index: u32,
    value: Option<u64>,
    vp_count: usize,
) -> Result<u64, Gp> {
    let reg = x2apic_reg(index).ok_or(Gp)?;
    if id.index() >= vp_count {
        return Err(Gp);
    }
    let access = match value {
        Some(v) => ApicAccess::Write(v),
        None => ApicAccess::Read,
    };
    platform.apic_access(id, reg, access)
}

/// VP_ASSIST_PAGE read.
pub(crate) fn read(vp: &VpState, index: u32) -> Result<u64, Gp> {
    if index == msr::VP_ASSIST_PAGE {
        Ok(vp.vp_assist_page)
    } else {
        Err(Gp)
    }
}

/// VP_ASSIST_PAGE write: enabling requires RAM at the page and zeroes its first u32 (KVM).
pub(crate) fn write<P: Platform>(
    platform: &P,
    id: VpId,
    vp: &mut VpState,
    index: u32,
    value: u64,
) -> Result<(), Gp> {
    if index != msr::VP_ASSIST_PAGE {
        return Err(Gp);
    }
    let page = msr::VpAssistPageMsr::from_bits(value);
    if page.enable() {
        let gpa = value & !PAGE_OFFSET_MASK;
        let addr = gpa + VP_ASSIST_APIC_ASSIST_OFFSET;
        if !platform.is_ram(addr, 4) {
            return Err(Gp);
        }
        // The platform hears of the change before the first u32 is zeroed: an exit-less EOI still pending
        // against the old page is settled from the old contents (KVM syncs PV-EOI at the exit, before it handles
        // this write), which matters when the handler re-enables the page at the same address.
        platform.pv_eoi_page_changed(id, Some(gpa));
        if platform.write_gpa(addr, &0u32.to_le_bytes()).is_err() {
            let old = msr::VpAssistPageMsr::from_bits(vp.vp_assist_page);
            platform.pv_eoi_page_changed(
                id,
                old.enable()
                    .then_some(vp.vp_assist_page & !PAGE_OFFSET_MASK),
            );
            return Err(Gp);
        }
        platform.mark_dirty(addr, 4);
        vp.vp_assist_page = value;
    } else {
        vp.vp_assist_page = value;
        platform.pv_eoi_page_changed(id, None);
    }
    Ok(())
}

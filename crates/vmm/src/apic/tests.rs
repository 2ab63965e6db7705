//! Unit tests for the local APIC model.

use super::*;

#[test]
fn power_up_state() {
    let apic = LocalApic::new(3, ApicConfig::default());
    assert_eq!(apic.read_apic_base(), DEFAULT_APIC_BASE | APIC_BASE_ENABLE);
    assert_eq!(apic.id(), 3);
    assert!(!apic.is_sw_enabled());
}

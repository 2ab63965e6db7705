//! Unit tests for the local APIC model.

use super::*;

const GHZ: u64 = 1_000_000_000;

fn cfg() -> ApicConfig {
    ApicConfig::default()
}

fn rd(apic: &LocalApic, offset: u64, now: u64) -> u32 {
    let mut b = [0u8; 4];
    apic.mmio_read(offset, &mut b, now);
    u32::from_le_bytes(b)
}

fn wr(apic: &mut LocalApic, offset: u64, value: u32, now: u64) -> ApicEffects {
    apic.mmio_write(offset, &value.to_le_bytes(), now)
}

/// An APIC in xAPIC mode, software-enabled with spurious vector 0xFF.
fn enabled(id: u32) -> LocalApic {
    let mut apic = LocalApic::new(id, cfg());
    let _ = wr(&mut apic, reg::SVR, 0x1FF, 0);
    apic
}

/// An APIC in x2APIC mode, software-enabled.
fn enabled_x2(id: u32) -> LocalApic {
    let mut apic = enabled(id);
    assert!(
        apic.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD)
            .is_ok(),
        "xAPIC -> x2APIC is legal"
    );
    apic
}

fn with_freq(id: u32, bus_freq_hz: u64) -> LocalApic {
    let mut apic = LocalApic::new(
        id,
        ApicConfig {
            bus_freq_hz,
            ..cfg()
        },
    );
    let _ = wr(&mut apic, reg::SVR, 0x1FF, 0);
    apic
}

// ------------------------------------------------------------------ power-up and register file

#[test]
fn power_up_registers() {
    let bsp = LocalApic::new(0, ApicConfig { bsp: true, ..cfg() });
    let ap = LocalApic::new(5, cfg());
    assert_eq!(bsp.read_apic_base(), 0xFEE0_0900);
    assert_eq!(ap.read_apic_base(), 0xFEE0_0800);
    assert_eq!(bsp.mmio_base(), Some(0xFEE0_0000));
    let table: &[(u64, u32)] = &[
        (reg::ID, 5 << 24),
        (reg::VERSION, 0x0005_0014),
        (reg::TPR, 0),
        (reg::APR, 0),
        (reg::PPR, 0),
        (reg::EOI, 0),
        (reg::RRD, 0),
        (reg::LDR, 0),
        (reg::DFR, 0xFFFF_FFFF),
        (reg::SVR, 0xFF),
        (reg::ESR, 0),
        (reg::ICR_LOW, 0),
        (reg::ICR_HIGH, 0),
        (reg::LVT_TIMER, LVT_MASKED),
        (reg::LVT_THERMAL, LVT_MASKED),
        (reg::LVT_PERFMON, LVT_MASKED),
        (reg::LVT_LINT0, LVT_MASKED),
        (reg::LVT_LINT1, LVT_MASKED),
        (reg::LVT_ERROR, LVT_MASKED),
        (reg::TIMER_INITIAL, 0),
        (reg::TIMER_CURRENT, 0),
        (reg::TIMER_DIVIDE, 0),
        (reg::LVT_CMCI, 0),
        (0x3F0, 0),
        (0xFF0, 0),
    ];
    for &(offset, want) in table {
        assert_eq!(rd(&ap, offset, 0), want, "offset {offset:#x}");
    }
    for i in 0..8 {
        for base in [reg::ISR, reg::TMR, reg::IRR] {
            assert_eq!(rd(&ap, base + i * 16, 0), 0);
        }
    }
    assert!(!ap.is_sw_enabled());
    assert!(ap.is_enabled());
    assert!(!ap.is_x2apic());
    assert_eq!(ap.next_timer_deadline_ns(), None);
}

#[test]
fn mmio_register_writes_keep_only_writable_bits() {
    // (offset, written, read back)
    let table: &[(u64, u32, u32)] = &[
        (reg::ID, 0xFFFF_FFFF, 0xFF00_0000),
        (reg::VERSION, 0, 0x0005_0014),
        (reg::TPR, 0xFFFF_FF7A, 0x7A),
        (reg::PPR, 0xFF, 0),
        (reg::LDR, 0xFFFF_FFFF, 0xFF00_0000),
        (reg::DFR, 0x0000_0000, 0x0FFF_FFFF),
        (reg::DFR, 0xF000_0000, 0xFFFF_FFFF),
        (reg::SVR, 0xFFFF_FFFF, 0x3FF),
        (reg::ICR_HIGH, 0xFFFF_FFFF, 0xFF00_0000),
        (reg::LVT_TIMER, 0xFFFF_FFFF, 0x0007_00FF),
        (reg::LVT_THERMAL, 0xFFFF_FFFF, 0x0001_07FF),
        (reg::LVT_PERFMON, 0xFFFF_FFFF, 0x0001_07FF),
        (reg::LVT_LINT0, 0xFFFF_FFFF, 0x0001_A7FF),
        (reg::LVT_LINT1, 0xFFFF_FFFF, 0x0001_A7FF),
        (reg::LVT_ERROR, 0xFFFF_FFFF, 0x0001_00FF),
        (reg::LVT_ERROR, 0x33, 0x33),
        (reg::TIMER_DIVIDE, 0xFFFF_FFFF, 0xB),
        (reg::TIMER_CURRENT, 1234, 0),
        (reg::IRR, 0xFFFF_FFFF, 0),
        (reg::ISR + 0x70, 0xFFFF_FFFF, 0),
    ];
    for &(offset, value, want) in table {
        let mut apic = enabled(1);
        let _ = wr(&mut apic, offset, value, 0);
        assert_eq!(
            rd(&apic, offset, 0),
            want,
            "offset {offset:#x} value {value:#x}"
        );
    }
}

#[test]
fn mmio_partial_and_misaligned_accesses() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TPR, 0x5A, 0);
    let _ = wr(&mut apic, reg::LVT_LINT0, 0x0000_A7F3, 0);
    // (offset, len, expected bytes)
    let table: &[(u64, usize, &[u8])] = &[
        (reg::LVT_LINT0, 1, &[0xF3]),
        (reg::LVT_LINT0 + 1, 1, &[0xA7]),
        (reg::LVT_LINT0 + 1, 2, &[0xA7, 0x00]),
        (reg::LVT_LINT0 + 2, 2, &[0x00, 0x00]),
        (reg::LVT_LINT0 + 3, 2, &[0x00, 0x00]),
        (reg::LVT_LINT0 + 4, 4, &[0, 0, 0, 0]),
        (reg::TPR, 8, &[0; 8]),
        (reg::TPR, 4, &[0x5A, 0, 0, 0]),
        (0x1000, 4, &[0, 0, 0, 0]),
    ];
    for &(offset, len, want) in table {
        let mut buf = vec![0xEEu8; len];
        apic.mmio_read(offset, &mut buf, 0);
        assert_eq!(buf, want, "offset {offset:#x} len {len}");
    }
    // Writes other than aligned 4-byte ones are dropped.
    for (offset, data) in [
        (reg::TPR, &[0x11u8][..]),
        (reg::TPR, &[0x11, 0, 0, 0, 0, 0, 0, 0][..]),
        (reg::TPR + 1, &[0x11, 0, 0, 0][..]),
        (0x1000, &[0x11, 0, 0, 0][..]),
    ] {
        let fx = apic.mmio_write(offset, data, 0);
        assert_eq!(fx, ApicEffects::default());
        assert_eq!(rd(&apic, reg::TPR, 0), 0x5A);
    }
}

// ------------------------------------------------------------------ priorities

#[test]
fn ppr_computation() {
    // (tpr, in-service vectors, expected PPR)
    let table: &[(u32, &[u8], u32)] = &[
        (0x00, &[], 0x00),
        (0x35, &[], 0x35),
        (0x00, &[0x41], 0x40),
        (0x35, &[0x41], 0x40),
        (0x45, &[0x41], 0x45),
        (0x40, &[0x4F], 0x40),
        (0x4F, &[0x40], 0x4F),
        (0x50, &[0x41], 0x50),
        (0x10, &[0x41, 0xE3], 0xE0),
        (0xFF, &[0xE3], 0xFF),
    ];
    for &(tpr, isr, want) in table {
        let mut apic = enabled(0);
        for &v in isr {
            assert!(apic.accept_fixed(v, false));
            apic.ack_interrupt(v);
        }
        let _ = wr(&mut apic, reg::TPR, tpr, 0);
        assert_eq!(apic.ppr(), want, "tpr {tpr:#x} isr {isr:x?}");
        assert_eq!(rd(&apic, reg::PPR, 0), want);
    }
}

#[test]
fn pending_interrupt_respects_priority_classes() {
    // (tpr, in service, requested, expected pending)
    type Row = (u32, &'static [u8], &'static [u8], Option<u8>);
    let table: &[Row] = &[
        (0, &[], &[], None),
        (0, &[], &[0x30], Some(0x30)),
        (0, &[], &[0x30, 0x31, 0x20], Some(0x31)),
        (0x30, &[], &[0x31], None),
        (0x2F, &[], &[0x31], Some(0x31)),
        (0x3F, &[], &[0x40], Some(0x40)),
        (0, &[0x40], &[0x45], None),
        (0, &[0x40], &[0x3F], None),
        (0, &[0x45], &[0x50], Some(0x50)),
        (0, &[0x45], &[0x50, 0x41], Some(0x50)),
        (0x60, &[0x45], &[0x50], None),
        (0, &[], &[0xFF], Some(0xFF)),
        (0xF0, &[], &[0xFF], None),
    ];
    for &(tpr, isr, irr, want) in table {
        let mut apic = enabled(0);
        for &v in isr {
            apic.accept_fixed(v, false);
            apic.ack_interrupt(v);
        }
        for &v in irr {
            apic.accept_fixed(v, false);
        }
        let _ = wr(&mut apic, reg::TPR, tpr, 0);
        assert_eq!(
            apic.pending_interrupt(),
            want,
            "tpr {tpr:#x} isr {isr:x?} irr {irr:x?}"
        );
        assert_eq!(apic.has_wake_event(), want.is_some());
    }
}

#[test]
fn higher_vector_preempts_and_eoi_unwinds_in_order() {
    let mut apic = enabled(0);
    assert!(apic.accept_fixed(0x40, false));
    assert_eq!(apic.pending_interrupt(), Some(0x40));
    assert!(!apic.ack_interrupt(0x40));
    assert!(apic.is_in_service(0x40));
    assert!(!apic.is_requested(0x40));
    // Same class as the one in service: held.
    apic.accept_fixed(0x4A, false);
    assert_eq!(apic.pending_interrupt(), None);
    // Higher class: preempts.
    apic.accept_fixed(0x80, false);
    assert_eq!(apic.pending_interrupt(), Some(0x80));
    apic.ack_interrupt(0x80);
    assert_eq!(apic.ppr(), 0x80);
    assert_eq!(apic.pending_interrupt(), None);
    // EOI goes to the highest in-service vector first.
    let fx = wr(&mut apic, reg::EOI, 0, 0);
    assert_eq!(
        fx.eoi,
        Some(Eoi {
            vector: 0x80,
            level_triggered: false
        })
    );
    assert!(fx.reevaluate);
    assert_eq!(
        apic.pending_interrupt(),
        None,
        "0x4A still blocked by 0x40 in service"
    );
    assert_eq!(
        apic.eoi(),
        Some(Eoi {
            vector: 0x40,
            level_triggered: false
        })
    );
    assert_eq!(apic.pending_interrupt(), Some(0x4A));
    apic.ack_interrupt(0x4A);
    assert_eq!(apic.eoi().map(|e| e.vector), Some(0x4A));
    assert_eq!(apic.eoi(), None);
    let fx = wr(&mut apic, reg::EOI, 0, 0);
    assert_eq!(fx, ApicEffects::default());
}

#[test]
fn level_triggered_acceptance_sets_tmr_and_eoi_reports_it() {
    let mut apic = enabled(0);
    apic.accept_fixed(0x61, true);
    assert!(apic.is_level_triggered(0x61));
    assert_eq!(rd(&apic, reg::TMR + 0x30, 0), 1 << 1);
    assert_eq!(rd(&apic, reg::IRR + 0x30, 0), 1 << 1);
    apic.ack_interrupt(0x61);
    assert_eq!(rd(&apic, reg::ISR + 0x30, 0), 1 << 1);
    assert_eq!(rd(&apic, reg::IRR + 0x30, 0), 0);
    assert_eq!(
        apic.eoi(),
        Some(Eoi {
            vector: 0x61,
            level_triggered: true
        })
    );
    // A later edge acceptance clears the TMR bit.
    apic.accept_fixed(0x61, false);
    assert!(!apic.is_level_triggered(0x61));
}

#[test]
fn ack_of_a_vector_not_requested_does_nothing() {
    let mut apic = enabled(0);
    assert!(!apic.ack_interrupt(0x50));
    assert!(!apic.is_in_service(0x50));
    assert_eq!(apic.ppr(), 0);
}

#[test]
fn tpr_through_every_interface_masks_delivery() {
    let mut x = enabled(0);
    x.accept_fixed(0x55, false);
    let _ = wr(&mut x, reg::TPR, 0x50, 0);
    assert_eq!(x.pending_interrupt(), None);
    let _ = wr(&mut x, reg::TPR, 0x4F, 0);
    assert_eq!(x.pending_interrupt(), Some(0x55));

    let mut x2 = enabled_x2(0);
    x2.accept_fixed(0x55, false);
    assert!(x2.msr_write(0x808, 0x50, 0).is_ok_and(|fx| fx.reevaluate));
    assert_eq!(x2.msr_read(0x808, 0), Ok(0x50));
    assert_eq!(x2.pending_interrupt(), None);
    assert!(x2
        .hv_vapic_msr_write(HV_MSR_TPR, 0x40)
        .is_ok_and(|fx| fx.reevaluate));
    assert_eq!(x2.hv_vapic_msr_read(HV_MSR_TPR), Ok(0x40));
    assert_eq!(x2.tpr(), 0x40);
    assert_eq!(x2.pending_interrupt(), Some(0x55));
    assert_eq!(x2.hv_vapic_msr_write(HV_MSR_TPR, 1 << 32), Err(Gp));
}

#[test]
fn software_disable_drops_interrupts_and_masks_lvts() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x20, 0);
    let _ = wr(&mut apic, reg::LVT_ERROR, 0x21, 0);
    apic.accept_fixed(0x30, false);
    let _ = wr(&mut apic, reg::SVR, 0x0FF, 0);
    assert!(!apic.is_sw_enabled());
    assert_eq!(
        apic.pending_interrupt(),
        None,
        "nothing delivered while disabled"
    );
    assert!(!apic.accept_fixed(0x40, false));
    assert!(!apic.is_requested(0x40));
    assert!(apic.is_requested(0x30), "IRR is held");
    assert_eq!(rd(&apic, reg::LVT_TIMER, 0), 0x20 | LVT_MASKED);
    assert_eq!(rd(&apic, reg::LVT_ERROR, 0), 0x21 | LVT_MASKED);
    // Unmasking is impossible while software-disabled.
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x22, 0);
    assert_eq!(rd(&apic, reg::LVT_TIMER, 0), 0x22 | LVT_MASKED);
    // Re-enabling leaves the LVTs masked and delivers the held IRR.
    let _ = wr(&mut apic, reg::SVR, 0x1FF, 0);
    assert_eq!(rd(&apic, reg::LVT_TIMER, 0), 0x22 | LVT_MASKED);
    assert_eq!(apic.pending_interrupt(), Some(0x30));
    // NMI/INIT/SIPI are still accepted while software-disabled.
    let _ = wr(&mut apic, reg::SVR, 0x0FF, 0);
    let nmi = Ipi {
        delivery_mode: DeliveryMode::Nmi,
        vector: 0,
        level_triggered: false,
        dest: Destination::SelfOnly,
        source_id: 0,
    };
    assert!(apic.deliver(&nmi));
    assert!(apic.take_nmi());
}

// ------------------------------------------------------------------ ESR

#[test]
fn esr_latches_on_write_and_raises_error_interrupt() {
    for lvt_error in [LVT_MASKED | 0x33, 0x33] {
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::LVT_ERROR, lvt_error, 0);
        for v in [0u8, 1, 15] {
            assert_eq!(apic.accept_fixed(v, false), lvt_error & LVT_MASKED == 0);
            assert!(!apic.is_requested(v));
        }
        assert_eq!(rd(&apic, reg::ESR, 0), 0, "not visible before an ESR write");
        let _ = wr(&mut apic, reg::ESR, 0, 0);
        assert_eq!(rd(&apic, reg::ESR, 0), ESR_RECV_ILLEGAL_VECTOR);
        let _ = wr(&mut apic, reg::ESR, 0, 0);
        assert_eq!(rd(&apic, reg::ESR, 0), 0, "the second write clears it");
        assert_eq!(
            apic.pending_interrupt().is_some(),
            lvt_error & LVT_MASKED == 0
        );
        if lvt_error & LVT_MASKED == 0 {
            assert_eq!(apic.pending_interrupt(), Some(0x33));
        }
    }
}

#[test]
fn sending_an_illegal_vector_sets_esr_and_sends_nothing() {
    for (mode, illegal) in [(0u32, true), (1, true), (4, false), (5, false), (6, false)] {
        let mut apic = enabled(0);
        let fx = wr(&mut apic, reg::ICR_LOW, (mode << 8) | 0x0F | (1 << 14), 0);
        assert_eq!(fx.ipi.is_none(), illegal, "mode {mode}");
        let _ = wr(&mut apic, reg::ESR, 0, 0);
        let want = if illegal { ESR_SEND_ILLEGAL_VECTOR } else { 0 };
        assert_eq!(rd(&apic, reg::ESR, 0), want, "mode {mode}");
    }
}

// ------------------------------------------------------------------ ICR decoding

fn ipi(
    mode: DeliveryMode,
    vector: u8,
    level: bool,
    dest: Destination,
    source_id: u32,
) -> Option<Ipi> {
    Some(Ipi {
        delivery_mode: mode,
        vector,
        level_triggered: level,
        dest,
        source_id,
    })
}

#[test]
fn xapic_icr_decoding() {
    use DeliveryMode::*;
    use Destination::*;
    // (ICR high, ICR low, expected IPI); the sender has APIC ID 2.
    let table: &[(u32, u32, Option<Ipi>)] = &[
        (
            0x0300_0000,
            0x0000_4031,
            ipi(Fixed, 0x31, false, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_C031,
            ipi(Fixed, 0x31, true, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_0131,
            ipi(LowestPriority, 0x31, false, Physical(3), 2),
        ),
        (0x0300_0000, 0x0000_0231, ipi(Smi, 0, false, Physical(3), 2)),
        (0x0300_0000, 0x0000_0331, None),
        (0x0300_0000, 0x0000_0431, ipi(Nmi, 0, false, Physical(3), 2)),
        (
            0x0300_0000,
            0x0000_4500,
            ipi(Init, 0, false, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_C500,
            ipi(Init, 0, false, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_8500,
            ipi(InitDeassert, 0, false, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_0500,
            ipi(Init, 0, false, Physical(3), 2),
        ),
        (
            0x0300_0000,
            0x0000_0608,
            ipi(StartUp, 0x08, false, Physical(3), 2),
        ),
        (0x0300_0000, 0x0000_0731, None),
        (
            0x0300_0000,
            0x0000_0831,
            ipi(Fixed, 0x31, false, Logical(3), 2),
        ),
        (
            0xFF00_0000,
            0x0000_0031,
            ipi(Fixed, 0x31, false, AllIncludingSelf, 2),
        ),
        (
            0xFF00_0000,
            0x0000_0831,
            ipi(Fixed, 0x31, false, AllIncludingSelf, 2),
        ),
        (
            0x0000_0000,
            0x0004_0031,
            ipi(Fixed, 0x31, false, SelfOnly, 2),
        ),
        (
            0x0000_0000,
            0x0008_0031,
            ipi(Fixed, 0x31, false, AllIncludingSelf, 2),
        ),
        (
            0x0000_0000,
            0x000C_0031,
            ipi(Fixed, 0x31, false, AllExcludingSelf, 2),
        ),
        (
            0x0000_0000,
            0x000C_4500,
            ipi(Init, 0, false, AllExcludingSelf, 2),
        ),
        (
            0x0000_0000,
            0x000C_0600,
            ipi(StartUp, 0, false, AllExcludingSelf, 2),
        ),
        // Busy bit and reserved bits (including 31:20) are ignored in xAPIC mode.
        (
            0x0300_0000,
            0xFFF0_3031,
            ipi(Fixed, 0x31, false, Physical(3), 2),
        ),
    ];
    for &(high, low, want) in table {
        let mut apic = enabled(2);
        let _ = wr(&mut apic, reg::ICR_HIGH, high, 0);
        let fx = wr(&mut apic, reg::ICR_LOW, low, 0);
        assert_eq!(fx.ipi, want, "high {high:#x} low {low:#x}");
        assert_eq!(
            rd(&apic, reg::ICR_LOW, 0) & (1 << 12),
            0,
            "delivery status reads idle"
        );
        assert_eq!(rd(&apic, reg::ICR_LOW, 0), low & 0x000C_CFFF);
    }
}

#[test]
fn x2apic_icr_decoding_and_reserved_bits() {
    use DeliveryMode::*;
    use Destination::*;
    let table: &[(u64, Result<Option<Ipi>, Gp>)] = &[
        (
            0x0000_0003_0000_0031,
            Ok(ipi(Fixed, 0x31, false, Physical(3), 7)),
        ),
        (
            0x0001_0000_0000_0031,
            Ok(ipi(Fixed, 0x31, false, Physical(0x10000), 7)),
        ),
        (
            0xFFFF_FFFF_0000_0031,
            Ok(ipi(Fixed, 0x31, false, AllIncludingSelf, 7)),
        ),
        (
            0xFFFF_FFFF_0000_0831,
            Ok(ipi(Fixed, 0x31, false, AllIncludingSelf, 7)),
        ),
        (
            0x0002_0005_0000_0831,
            Ok(ipi(Fixed, 0x31, false, Logical(0x0002_0005), 7)),
        ),
        (
            0x0000_0003_0000_0131,
            Ok(ipi(LowestPriority, 0x31, false, Physical(3), 7)),
        ),
        (
            0x0000_0003_0000_0400,
            Ok(ipi(Nmi, 0, false, Physical(3), 7)),
        ),
        (
            0x0000_0000_000C_4500,
            Ok(ipi(Init, 0, false, AllExcludingSelf, 7)),
        ),
        (
            0x0000_0000_000C_0612,
            Ok(ipi(StartUp, 0x12, false, AllExcludingSelf, 7)),
        ),
        (
            0x0000_0000_0004_0031,
            Ok(ipi(Fixed, 0x31, false, SelfOnly, 7)),
        ),
        (
            0x0000_0003_0000_1031,
            Ok(ipi(Fixed, 0x31, false, Physical(3), 7)),
        ),
        (0x0000_0003_0000_2031, Err(Gp)),
        (0x0000_0003_0001_0031, Err(Gp)),
        (0x0000_0003_0002_0031, Err(Gp)),
        (0x0000_0003_0010_0031, Err(Gp)),
        (0x0000_0003_8000_0031, Err(Gp)),
        (0x0000_0003_0000_0331, Ok(None)),
    ];
    for &(icr, want) in table {
        let mut apic = enabled_x2(7);
        let got = apic.msr_write(0x830, icr, 0).map(|fx| fx.ipi);
        assert_eq!(got, want, "icr {icr:#x}");
        if want.is_ok() {
            assert_eq!(apic.msr_read(0x830, 0), Ok(icr & !(1 << 12)));
        }
        // The Hyper-V ICR MSR behaves identically.
        let mut hv = enabled_x2(7);
        assert_eq!(
            hv.hv_vapic_msr_write(HV_MSR_ICR, icr).map(|fx| fx.ipi),
            want,
            "hv icr {icr:#x}"
        );
    }
}

#[test]
fn hv_icr_in_xapic_mode_takes_the_destination_from_bits_63_56() {
    let mut apic = enabled(1);
    let fx = apic.hv_vapic_msr_write(HV_MSR_ICR, 0x0300_0000_0000_0041);
    assert_eq!(
        fx.map(|fx| fx.ipi),
        Ok(ipi(
            DeliveryMode::Fixed,
            0x41,
            false,
            Destination::Physical(3),
            1
        ))
    );
    assert_eq!(
        apic.hv_vapic_msr_read(HV_MSR_ICR),
        Ok(0x0300_0000_0000_0041)
    );
    assert_eq!(rd(&apic, reg::ICR_HIGH, 0), 0x0300_0000);
}

#[test]
fn hv_eoi_msr() {
    for mut apic in [enabled(0), enabled_x2(0)] {
        apic.accept_fixed(0x90, false);
        apic.ack_interrupt(0x90);
        assert_eq!(
            apic.hv_vapic_msr_read(HV_MSR_EOI),
            Err(Gp),
            "EOI is write-only"
        );
        assert_eq!(apic.hv_vapic_msr_write(HV_MSR_EOI, 1 << 32), Err(Gp));
        let fx = apic.hv_vapic_msr_write(HV_MSR_EOI, 0);
        assert_eq!(
            fx.map(|fx| fx.eoi),
            Ok(Some(Eoi {
                vector: 0x90,
                level_triggered: false
            }))
        );
        assert!(!apic.is_in_service(0x90));
        assert_eq!(apic.hv_vapic_msr_read(0x4000_0073), Err(Gp));
        assert_eq!(apic.hv_vapic_msr_write(0x4000_0073, 0), Err(Gp));
    }
}

#[test]
fn x2apic_self_ipi() {
    let mut apic = enabled_x2(4);
    let fx = apic.msr_write(0x83F, 0x77, 0);
    assert_eq!(
        fx,
        Ok(ApicEffects {
            reevaluate: true,
            ..ApicEffects::default()
        })
    );
    assert_eq!(apic.pending_interrupt(), Some(0x77));
    assert_eq!(apic.msr_read(0x83F, 0), Err(Gp));
    // Bits 31:8 are reserved (KVM #GPs them).
    for bad in [0x100u64, 0x8000_0040, 1 << 32] {
        assert_eq!(apic.msr_write(0x83F, bad, 0), Err(Gp), "{bad:#x}");
    }
    // Illegal vector: error bit, nothing requested.
    let _ = apic.msr_write(0x83F, 0x05, 0);
    assert!(!apic.is_requested(0x05));
    let _ = apic.msr_write(0x828, 0, 0);
    assert_eq!(
        apic.msr_read(0x828, 0),
        Ok(u64::from(ESR_RECV_ILLEGAL_VECTOR))
    );
}

// ------------------------------------------------------------------ destinations

#[test]
fn xapic_physical_and_shorthand_matching() {
    use Destination::*;
    let apic = enabled(3);
    // (destination, sender, matches)
    let table: &[(Destination, u32, bool)] = &[
        (Physical(3), 0, true),
        (Physical(4), 0, false),
        (Physical(0x103), 0, false),
        (SelfOnly, 3, true),
        (SelfOnly, 0, false),
        (AllIncludingSelf, 3, true),
        (AllIncludingSelf, 0, true),
        (AllExcludingSelf, 3, false),
        (AllExcludingSelf, 0, true),
    ];
    for &(dest, sender, want) in table {
        assert_eq!(
            apic.matches_destination(&dest, sender),
            want,
            "{dest:?} from {sender}"
        );
    }
}

#[test]
fn xapic_logical_flat_and_cluster_matching() {
    // (DFR, LDR, MDA, matches)
    let table: &[(u32, u32, u32, bool)] = &[
        (0xFFFF_FFFF, 0x0100_0000, 0x01, true),
        (0xFFFF_FFFF, 0x0100_0000, 0x02, false),
        (0xFFFF_FFFF, 0x0100_0000, 0x03, true),
        (0xFFFF_FFFF, 0x8000_0000, 0x80, true),
        (0xFFFF_FFFF, 0x0000_0000, 0x7F, false),
        (0xFFFF_FFFF, 0x0000_0000, 0xFF, true),
        // Cluster model: cluster in MDA[7:4], member bits in MDA[3:0].
        (0x0FFF_FFFF, 0x2100_0000, 0x21, true),
        (0x0FFF_FFFF, 0x2100_0000, 0x23, true),
        (0x0FFF_FFFF, 0x2100_0000, 0x22, false),
        (0x0FFF_FFFF, 0x2100_0000, 0x31, false),
        (0x0FFF_FFFF, 0x2100_0000, 0x11, false),
        (0x0FFF_FFFF, 0x2100_0000, 0xFF, true),
        // Reserved model: matches nothing but the broadcast.
        (0x5FFF_FFFF, 0x0100_0000, 0x01, false),
    ];
    for &(dfr, ldr, mda, want) in table {
        let mut apic = enabled(9);
        let _ = wr(&mut apic, reg::DFR, dfr, 0);
        let _ = wr(&mut apic, reg::LDR, ldr, 0);
        assert_eq!(
            apic.matches_destination(&Destination::Logical(mda), 0),
            want,
            "dfr {dfr:#x} ldr {ldr:#x} mda {mda:#x}"
        );
    }
}

#[test]
fn x2apic_ldr_derivation_and_cluster_matching() {
    // (x2APIC ID, LDR)
    let table: &[(u32, u32)] = &[
        (0, 0x0000_0001),
        (1, 0x0000_0002),
        (15, 0x0000_8000),
        (16, 0x0001_0001),
        (0x25, 0x0002_0020),
        (0xFFFF_FFFF, 0xFFFF_8000),
    ];
    for &(id, ldr) in table {
        assert_eq!(x2apic_ldr(id), ldr, "id {id:#x}");
        let apic = enabled_x2(id);
        assert_eq!(apic.msr_read(0x80D, 0), Ok(u64::from(ldr)));
        assert_eq!(apic.id(), id);
        assert_eq!(apic.msr_read(0x802, 0), Ok(u64::from(id)));
    }
    let apic = enabled_x2(0x25); // cluster 2, bit 5
    let cases: &[(u32, bool)] = &[
        (0x0002_0020, true),
        (0x0002_0030, true),
        (0x0002_0010, false),
        (0x0001_0020, false),
        (0x0003_FFFF, false),
        (0xFFFF_FFFF, true),
    ];
    for &(dest, want) in cases {
        assert_eq!(
            apic.matches_destination(&Destination::Logical(dest), 0),
            want,
            "{dest:#x}"
        );
    }
    assert!(apic.matches_destination(&Destination::Physical(0x25), 0));
    assert!(!apic.matches_destination(&Destination::Physical(0x05), 0));
}

#[test]
fn disabled_apic_matches_nothing_and_accepts_nothing() {
    let mut apic = enabled(1);
    let _ = apic.write_apic_base(DEFAULT_APIC_BASE);
    assert!(!apic.is_enabled());
    for dest in [
        Destination::AllIncludingSelf,
        Destination::Physical(1),
        Destination::SelfOnly,
    ] {
        assert!(!apic.matches_destination(&dest, 1));
    }
    let init = Ipi {
        delivery_mode: DeliveryMode::Init,
        vector: 0,
        level_triggered: false,
        dest: Destination::AllIncludingSelf,
        source_id: 0,
    };
    assert!(!apic.deliver(&init));
    assert!(!apic.take_init());
    assert!(!apic.accept_fixed(0x40, false));
    assert_eq!(apic.mmio_base(), None);
}

#[test]
fn xapic_id_register_is_writable_and_used_for_matching() {
    let mut apic = enabled(1);
    let _ = wr(&mut apic, reg::ID, 0x0700_0000, 0);
    assert_eq!(apic.id(), 7);
    assert!(apic.matches_destination(&Destination::Physical(7), 0));
    assert!(!apic.matches_destination(&Destination::Physical(1), 0));
    // In x2APIC mode the ID is the initial one again and read-only.
    let _ = apic.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD);
    assert_eq!(apic.id(), 1);
    assert_eq!(apic.msr_write(0x802, 9, 0), Err(Gp));
}

// ------------------------------------------------------------------ IPI reception

#[test]
fn deliver_each_delivery_mode() {
    use DeliveryMode::*;
    // (mode, vector, level, kick, IRR bit, NMI, INIT, SIPI)
    type Row = (DeliveryMode, u8, bool, bool, bool, bool, bool, Option<u8>);
    let table: &[Row] = &[
        (Fixed, 0x41, false, true, true, false, false, None),
        (Fixed, 0x41, true, true, true, false, false, None),
        (LowestPriority, 0x41, false, true, true, false, false, None),
        (Smi, 0, false, false, false, false, false, None),
        (Nmi, 0, false, true, false, true, false, None),
        (Init, 0, false, true, false, false, true, None),
        (InitDeassert, 0, false, false, false, false, false, None),
        (StartUp, 0x9A, false, true, false, false, false, Some(0x9A)),
    ];
    for &(mode, vector, level, kick, irr, nmi, init, sipi) in table {
        let mut apic = enabled(0);
        let ipi = Ipi {
            delivery_mode: mode,
            vector,
            level_triggered: level,
            dest: Destination::Physical(0),
            source_id: 1,
        };
        assert_eq!(apic.deliver(&ipi), kick, "{mode:?}");
        assert_eq!(apic.nmi_latched(), nmi, "{mode:?}");
        assert_eq!(apic.init_latched(), init, "{mode:?}");
        assert_eq!(apic.sipi_latched(), sipi, "{mode:?}");
        assert_eq!(apic.is_requested(vector), irr, "{mode:?}");
        if irr {
            assert_eq!(apic.is_level_triggered(vector), level);
        }
        assert_eq!(apic.take_nmi(), nmi, "{mode:?}");
        assert_eq!(apic.take_init(), init, "{mode:?}");
        assert_eq!(apic.take_sipi(), sipi, "{mode:?}");
        assert!(!apic.take_nmi() && !apic.take_init() && apic.take_sipi().is_none());
    }
}

#[test]
fn init_discards_an_earlier_sipi_but_keeps_a_later_one() {
    let mk = |mode, vector| Ipi {
        delivery_mode: mode,
        vector,
        level_triggered: false,
        dest: Destination::AllExcludingSelf,
        source_id: 0,
    };
    let mut apic = LocalApic::new(1, cfg());
    apic.deliver(&mk(DeliveryMode::StartUp, 0x10));
    apic.deliver(&mk(DeliveryMode::Init, 0));
    assert!(apic.has_wake_event());
    assert!(apic.take_init());
    apic.init_reset();
    assert_eq!(apic.take_sipi(), None);

    apic.deliver(&mk(DeliveryMode::Init, 0));
    apic.deliver(&mk(DeliveryMode::StartUp, 0x20));
    assert!(apic.take_init());
    apic.init_reset();
    assert_eq!(apic.take_sipi(), Some(0x20));
}

#[test]
fn bsp_brings_up_aps_with_init_sipi_broadcast() {
    // The platform's SMP bring-up: INIT then one SIPI, both "all excluding self", routed by matching.
    let mut apics: Vec<LocalApic> = (0..4).map(|id| LocalApic::new(id, cfg())).collect();
    let _ = wr(&mut apics[0], reg::SVR, 0x1FF, 0);
    let init = wr(&mut apics[0], reg::ICR_LOW, 0x000C_4500, 0).ipi;
    let sipi = wr(&mut apics[0], reg::ICR_LOW, 0x000C_4600, 0).ipi;
    for ipi in [init, sipi].into_iter().flatten() {
        for apic in apics.iter_mut() {
            if apic.matches_destination(&ipi.dest, ipi.source_id) {
                apic.deliver(&ipi);
            }
        }
    }
    assert!(!apics[0].take_init());
    assert_eq!(apics[0].take_sipi(), None);
    for apic in &mut apics[1..] {
        assert!(apic.take_init());
        apic.init_reset();
        assert_eq!(apic.take_sipi(), Some(0));
    }
}

#[test]
fn init_reset_keeps_id_base_and_mode() {
    let mut apic = enabled_x2(6);
    apic.set_auto_eoi(0x50, true);
    let _ = apic.msr_write(0x808, 0x20, 0);
    let _ = apic.msr_write(0x832, 0x0002_0030, 0);
    let _ = apic.msr_write(0x838, 1000, 0);
    apic.accept_fixed(0x60, false);
    apic.raise_nmi();
    let base = apic.read_apic_base();
    apic.init_reset();
    assert_eq!(apic.read_apic_base(), base);
    assert!(apic.is_x2apic());
    assert_eq!(apic.id(), 6);
    assert_eq!(apic.msr_read(0x808, 0), Ok(0));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0xFF));
    assert_eq!(apic.msr_read(0x832, 0), Ok(u64::from(LVT_MASKED)));
    assert_eq!(apic.msr_read(0x838, 0), Ok(0));
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert!(!apic.is_requested(0x60));
    assert!(apic.is_auto_eoi(0x50));
    assert!(apic.take_nmi());

    let mut x = enabled(2);
    let _ = wr(&mut x, reg::ID, 0x0900_0000, 0);
    let _ = wr(&mut x, reg::LDR, 0x0100_0000, 0);
    x.init_reset();
    assert_eq!(
        rd(&x, reg::ID, 0),
        0x0900_0000,
        "INIT keeps a rewritten xAPIC ID"
    );
    assert_eq!(rd(&x, reg::LDR, 0), 0);
    assert_eq!(rd(&x, reg::DFR, 0), 0xFFFF_FFFF);
}

// ------------------------------------------------------------------ auto-EOI

#[test]
fn auto_eoi_vectors_never_stay_in_service() {
    let mut apic = enabled(0);
    apic.set_auto_eoi(0x51, true);
    // A mix of auto-EOI and normal vectors in the same priority class.
    apic.accept_fixed(0x51, false);
    apic.accept_fixed(0x52, false);
    assert_eq!(apic.pending_interrupt(), Some(0x52));
    assert!(!apic.ack_interrupt(0x52));
    assert_eq!(
        apic.pending_interrupt(),
        None,
        "0x51 blocked by 0x52 in service"
    );
    assert_eq!(apic.eoi().map(|e| e.vector), Some(0x52));
    assert_eq!(apic.pending_interrupt(), Some(0x51));
    assert!(apic.ack_interrupt(0x51));
    assert!(!apic.is_in_service(0x51));
    assert!(!apic.is_requested(0x51));
    assert_eq!(apic.ppr(), 0);
    assert_eq!(apic.eoi(), None, "nothing to EOI");
    // Re-raised auto-EOI vectors are deliverable right away, even nested in a normal handler.
    apic.accept_fixed(0x40, false);
    apic.ack_interrupt(0x40);
    apic.accept_fixed(0x51, false);
    assert_eq!(apic.pending_interrupt(), Some(0x51));
    assert!(apic.ack_interrupt(0x51));
    assert_eq!(apic.eoi().map(|e| e.vector), Some(0x40));
    // Unmarking restores the normal behaviour.
    apic.set_auto_eoi(0x51, false);
    assert!(!apic.is_auto_eoi(0x51));
    apic.accept_fixed(0x51, false);
    assert!(!apic.ack_interrupt(0x51));
    assert!(apic.is_in_service(0x51));
}

#[test]
fn exit_less_eoi_helpers() {
    let mut apic = enabled(0);
    assert_eq!(apic.highest_irr(), None);
    apic.accept_fixed(0x30, false);
    apic.accept_fixed(0x20, true);
    let _ = wr(&mut apic, reg::TPR, 0xF0, 0);
    assert_eq!(apic.highest_irr(), Some(0x30), "regardless of priority");
    assert!(apic.is_level_triggered(0x20));
    assert!(!apic.is_level_triggered(0x30));
}

// ------------------------------------------------------------------ APIC base

#[derive(Clone, Copy, Debug)]
enum Start {
    Disabled,
    XApic,
    X2Apic,
}

fn start(state: Start, x2apic_allowed: bool) -> LocalApic {
    let mut apic = LocalApic::new(
        0,
        ApicConfig {
            x2apic_allowed,
            ..cfg()
        },
    );
    match state {
        Start::Disabled => {
            assert!(apic.write_apic_base(DEFAULT_APIC_BASE).is_ok(), "disable");
        }
        Start::XApic => {}
        Start::X2Apic => {
            assert!(
                apic.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE | APIC_BASE_EXTD)
                    .is_ok(),
                "x2apic"
            );
        }
    }
    apic
}

#[test]
fn apic_base_transitions() {
    const EN: u64 = APIC_BASE_ENABLE;
    const X2: u64 = APIC_BASE_EXTD;
    const B: u64 = DEFAULT_APIC_BASE;
    // (start, x2apic allowed, value written, accepted)
    let table: &[(Start, bool, u64, bool)] = &[
        (Start::XApic, true, B | EN, true),
        (Start::XApic, true, B | EN | X2, true),
        (Start::XApic, false, B | EN | X2, false),
        (Start::XApic, true, B, true),
        (Start::XApic, true, B | X2, false),
        (Start::XApic, true, 0xFED0_0000 | EN, true),
        (Start::XApic, true, B | EN | 0x1, false),
        (Start::XApic, true, B | EN | 0x80, false),
        (Start::XApic, true, B | EN | 0x200, false),
        (Start::XApic, true, B | EN | (1 << 45), true),
        (Start::XApic, true, B | EN | (1 << 46), false),
        (Start::XApic, true, B | EN | (1 << 63), false),
        (Start::XApic, true, B | EN | APIC_BASE_BSP, true),
        (Start::X2Apic, true, B | EN | X2, true),
        (Start::X2Apic, true, B | EN, false),
        (Start::X2Apic, true, B, true),
        (Start::X2Apic, true, B | X2, false),
        (Start::Disabled, true, B | EN | X2, false),
        (Start::Disabled, true, B | EN, true),
        (Start::Disabled, true, B, true),
        (Start::Disabled, true, B | X2, false),
    ];
    for &(from, allowed, value, ok) in table {
        let mut apic = start(from, allowed);
        let before = apic.read_apic_base();
        let res = apic.write_apic_base(value);
        assert_eq!(
            res.is_ok(),
            ok,
            "{from:?} allowed={allowed} value={value:#x}"
        );
        if ok {
            assert_eq!(
                apic.read_apic_base(),
                value & !APIC_BASE_BSP,
                "BSP bit is fixed"
            );
        } else {
            assert_eq!(apic.read_apic_base(), before, "a #GP changes nothing");
        }
    }
}

#[test]
fn apic_base_relocation_moves_the_mmio_page() {
    let mut apic = enabled(0);
    let _ = apic.write_apic_base(0xFED0_0000 | APIC_BASE_ENABLE);
    assert_eq!(apic.mmio_base(), Some(0xFED0_0000));
    let _ = apic.write_apic_base(0xFED0_0000 | APIC_BASE_ENABLE | APIC_BASE_EXTD);
    assert_eq!(apic.mmio_base(), None, "no MMIO in x2APIC mode");
    let fx = wr(&mut apic, reg::TPR, 0x30, 0);
    assert_eq!(fx, ApicEffects::default());
    assert_eq!(apic.tpr(), 0);
}

#[test]
fn disabling_the_apic_resets_it() {
    let mut apic = enabled_x2(3);
    let _ = apic.msr_write(0x832, 0x20, 0);
    let _ = apic.msr_write(0x838, 100, 0);
    apic.accept_fixed(0x40, false);
    let fx = apic
        .write_apic_base(DEFAULT_APIC_BASE)
        .expect("x2APIC -> disabled");
    assert!(fx.reevaluate && fx.timer_changed);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert_eq!(apic.pending_interrupt(), None);
    assert_eq!(apic.msr_read(0x808, 0), Err(Gp));
    assert!(
        apic.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE)
            .is_ok(),
        "disabled -> xAPIC"
    );
    assert!(!apic.is_sw_enabled());
    assert!(!apic.is_requested(0x40));
    assert_eq!(rd(&apic, reg::ID, 0), 3 << 24);
    assert_eq!(rd(&apic, reg::LVT_TIMER, 0), LVT_MASKED);
}

#[test]
fn bsp_bit_follows_configuration() {
    let mut bsp = LocalApic::new(0, ApicConfig { bsp: true, ..cfg() });
    let _ = bsp.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE);
    assert_eq!(bsp.read_apic_base(), 0xFEE0_0900);
    let mut ap = LocalApic::new(1, cfg());
    let _ = ap.write_apic_base(DEFAULT_APIC_BASE | APIC_BASE_ENABLE | APIC_BASE_BSP);
    assert_eq!(ap.read_apic_base(), 0xFEE0_0800);
}

// ------------------------------------------------------------------ x2APIC MSR rules

#[test]
fn x2apic_msr_read_rules() {
    let apic = enabled_x2(2);
    let readable = |m: u32| {
        matches!(
            m,
            0x802 | 0x803 | 0x808 | 0x80A | 0x80D | 0x80F | 0x810..=0x828 | 0x830 | 0x832..=0x839 | 0x83E
        )
    };
    for msr in X2APIC_MSR_FIRST..=X2APIC_MSR_LAST {
        assert_eq!(apic.msr_read(msr, 0).is_ok(), readable(msr), "msr {msr:#x}");
    }
    assert_eq!(apic.msr_read(0x803, 0), Ok(u64::from(APIC_VERSION)));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0x1FF));
    assert_eq!(apic.msr_read(0x7FF, 0), Err(Gp));
    assert_eq!(apic.msr_read(0x900, 0), Err(Gp));
}

#[test]
fn x2apic_msr_write_rules() {
    let writable: &[u32] = &[
        0x808, 0x80B, 0x80F, 0x828, 0x830, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837, 0x838, 0x83E,
        0x83F,
    ];
    for msr in X2APIC_MSR_FIRST..=X2APIC_MSR_LAST {
        let mut apic = enabled_x2(2);
        // A benign value: vector 0x40 (fixed, self shorthand for the ICR so nothing odd is sent).
        let value = if msr == 0x830 {
            0x0004_0040
        } else if msr == 0x80F {
            0x1FF
        } else {
            0
        };
        let value = if msr == 0x83F { 0x40 } else { value };
        assert_eq!(
            apic.msr_write(msr, value, 0).is_ok(),
            writable.contains(&msr),
            "msr {msr:#x}"
        );
    }
    // Bits 63:32 #GP everywhere but the ICR.
    for &msr in writable.iter().filter(|&&m| m != 0x830) {
        let mut apic = enabled_x2(2);
        assert_eq!(apic.msr_write(msr, 1 << 32, 0), Err(Gp), "msr {msr:#x}");
    }
    // ESR: only 0 may be written.
    let mut apic = enabled_x2(2);
    assert_eq!(apic.msr_write(0x828, 1, 0), Err(Gp));
    // Read-only registers keep their value after a failed write.
    assert_eq!(apic.msr_write(0x80D, 0xFFFF, 0), Err(Gp));
    assert_eq!(apic.msr_read(0x80D, 0), Ok(u64::from(x2apic_ldr(2))));
}

#[test]
fn x2apic_msrs_gp_outside_x2apic_mode() {
    let mut apic = enabled(0);
    assert_eq!(apic.msr_read(0x808, 0), Err(Gp));
    assert_eq!(apic.msr_write(0x808, 0x10, 0), Err(Gp));
    assert_eq!(apic.msr_write(0x830, 0x0004_0040, 0), Err(Gp));
    assert_eq!(apic.tpr(), 0);
}

#[test]
fn x2apic_eoi_msr() {
    let mut apic = enabled_x2(0);
    apic.accept_fixed(0x70, true);
    apic.ack_interrupt(0x70);
    let fx = apic.msr_write(0x80B, 0, 0).expect("EOI write");
    assert_eq!(
        fx.eoi,
        Some(Eoi {
            vector: 0x70,
            level_triggered: true
        })
    );
    assert!(fx.reevaluate);
    assert_eq!(apic.msr_read(0x80B, 0), Err(Gp));
}

// ------------------------------------------------------------------ timer

/// Divide configuration encodings and their divisors (SDM Figure 10-10).
const DIVIDES: [(u32, u64); 8] = [
    (0x0, 2),
    (0x1, 4),
    (0x2, 8),
    (0x3, 16),
    (0x8, 32),
    (0x9, 64),
    (0xA, 128),
    (0xB, 1),
];

#[test]
fn divide_configuration_encodings() {
    for (enc, div) in DIVIDES {
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::TIMER_DIVIDE, enc, 0);
        assert_eq!(apic.timer_divisor(), div, "encoding {enc:#x}");
        // Bit 2 and bits above 3 are not part of the encoding.
        let _ = wr(&mut apic, reg::TIMER_DIVIDE, enc | 0x4 | 0xF0, 0);
        assert_eq!(apic.timer_divisor(), div);
        assert_eq!(rd(&apic, reg::TIMER_DIVIDE, 0), enc);
    }
}

#[test]
fn one_shot_deadline_and_count_for_every_divide() {
    // At 1 GHz one tick is `div` ns; at 25 MHz it is 40 * div ns.
    for (freq, ns_per_tick) in [(GHZ, 1u64), (25_000_000, 40)] {
        for (enc, div) in DIVIDES {
            let start_ns = 5_000;
            let n: u32 = 1000;
            let mut apic = with_freq(0, freq);
            let _ = wr(&mut apic, reg::TIMER_DIVIDE, enc, 0);
            let _ = wr(&mut apic, reg::LVT_TIMER, 0x40, 0);
            let fx = wr(&mut apic, reg::TIMER_INITIAL, n, start_ns);
            assert!(fx.timer_changed);
            let period = u64::from(n) * div * ns_per_tick;
            let deadline = start_ns + period;
            assert_eq!(
                apic.next_timer_deadline_ns(),
                Some(deadline),
                "freq {freq} div {div}"
            );
            assert_eq!(rd(&apic, reg::TIMER_CURRENT, start_ns), n);
            assert_eq!(rd(&apic, reg::TIMER_CURRENT, start_ns + period / 4), 750);
            assert_eq!(rd(&apic, reg::TIMER_CURRENT, deadline - 1), 1);
            assert_eq!(rd(&apic, reg::TIMER_CURRENT, deadline), 0);
            // An early tick does nothing.
            assert_eq!(apic.timer_tick(deadline - 1, 0), ApicEffects::default());
            assert!(!apic.is_requested(0x40));
            let fx = apic.timer_tick(deadline, 0);
            assert!(fx.reevaluate && fx.timer_changed);
            assert_eq!(apic.pending_interrupt(), Some(0x40));
            assert_eq!(apic.next_timer_deadline_ns(), None, "one-shot disarms");
            assert_eq!(rd(&apic, reg::TIMER_CURRENT, deadline + period), 0);
            assert_eq!(rd(&apic, reg::TIMER_INITIAL, 0), n, "initial count is kept");
        }
    }
}

#[test]
fn periodic_deadlines_and_count_for_every_divide() {
    for (enc, div) in DIVIDES {
        let n: u32 = 300_000; // 300 µs and more: above the 200 µs minimum period at every divide
        let start_ns = 1_000;
        let period = u64::from(n) * div;
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::TIMER_DIVIDE, enc, 0);
        let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0050, 0);
        let _ = wr(&mut apic, reg::TIMER_INITIAL, n, start_ns);
        for k in 1..=20u64 {
            let deadline = start_ns + k * period;
            assert_eq!(
                apic.next_timer_deadline_ns(),
                Some(deadline),
                "div {div} k {k}"
            );
            assert_eq!(
                rd(&apic, reg::TIMER_CURRENT, deadline - period / 3),
                n / 3,
                "div {div} k {k}"
            );
            // Host timers fire a little late; the next deadline still comes from the previous one.
            let fx = apic.timer_tick(deadline + div / 2, 0);
            assert!(fx.reevaluate);
            assert_eq!(apic.pending_interrupt(), Some(0x50));
            apic.ack_interrupt(0x50);
            let _ = apic.eoi();
        }
    }
}

#[test]
fn periodic_timer_does_not_drift_with_fractional_periods() {
    // 3 MHz with divide 1 and count 1000: a period of 333,333.33 ns, so deadlines must follow
    // start + ceil(k * P).
    let freq = 3_000_000u64;
    let n = 1_000u64;
    let start_ns = 777u64;
    let mut apic = with_freq(0, freq);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0031, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, n as u32, start_ns);
    let mut fired = 0;
    for k in 1..=10_000u64 {
        let want = start_ns + (k * n * 1_000_000_000).div_ceil(freq);
        let deadline = apic.next_timer_deadline_ns().expect("armed");
        assert_eq!(deadline, want, "k {k}");
        let fx = apic.timer_tick(deadline + 17, 0);
        if fx.reevaluate {
            fired += 1;
        }
        assert!(!apic.ack_interrupt(0x31), "not auto-EOI");
        let _ = apic.eoi();
    }
    assert_eq!(fired, 10_000);
    // After 10_000 periods (3.333 s) the deadline is exactly on the grid: no accumulated rounding.
    assert_eq!(
        apic.next_timer_deadline_ns(),
        Some(start_ns + 3_333_666_667)
    );
}

#[test]
fn periodic_timer_skips_missed_periods_and_stays_on_the_grid() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0031, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 1_000_000, 0);
    // The host was 5.5 periods late: one interrupt, next deadline at the 6th grid point.
    let fx = apic.timer_tick(5_500_000, 0);
    assert!(fx.reevaluate);
    assert_eq!(apic.next_timer_deadline_ns(), Some(6_000_000));
    assert_eq!(rd(&apic, reg::TIMER_CURRENT, 5_500_000), 500_000);
    // Exactly on a grid point.
    let _ = apic.timer_tick(6_000_000, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(7_000_000));
}

#[test]
fn masked_timer_counts_but_requests_nothing() {
    for mode in [0u32, 0x0002_0000] {
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
        let _ = wr(&mut apic, reg::LVT_TIMER, mode | LVT_MASKED | 0x40, 0);
        let _ = wr(&mut apic, reg::TIMER_INITIAL, 1_000_000, 0);
        assert_eq!(rd(&apic, reg::TIMER_CURRENT, 400_000), 600_000);
        let fx = apic.timer_tick(1_000_000, 0);
        assert!(!fx.reevaluate);
        assert!(fx.timer_changed);
        assert!(!apic.is_requested(0x40));
        let periodic = mode != 0;
        assert_eq!(apic.next_timer_deadline_ns(), periodic.then_some(2_000_000));
        // Unmasking: the next expiry requests the vector.
        let _ = wr(&mut apic, reg::LVT_TIMER, mode | 0x40, 1_500_000);
        if periodic {
            assert!(apic.timer_tick(2_000_000, 0).reevaluate);
            assert!(apic.is_requested(0x40));
        }
    }
}

#[test]
fn initial_count_zero_stops_and_rewrite_restarts() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0040, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 1_000_000, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(1_000_000));
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 5_000_000, 500_000);
    assert_eq!(
        apic.next_timer_deadline_ns(),
        Some(5_500_000),
        "a rewrite restarts the count"
    );
    let fx = wr(&mut apic, reg::TIMER_INITIAL, 0, 600_000);
    assert!(fx.timer_changed);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert_eq!(rd(&apic, reg::TIMER_CURRENT, 700_000), 0);
    assert_eq!(apic.timer_tick(100_000_000, 0), ApicEffects::default());
}

#[test]
fn divide_change_keeps_the_remaining_count() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0); // divide by 1
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x40, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 1000, 0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0x1, 400); // divide by 4, 600 ticks left
    assert_eq!(rd(&apic, reg::TIMER_CURRENT, 400), 600);
    assert_eq!(apic.next_timer_deadline_ns(), Some(400 + 600 * 4));
    assert_eq!(rd(&apic, reg::TIMER_CURRENT, 800), 500);
}

#[test]
fn one_shot_to_periodic_switch_keeps_counting() {
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x40, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 1_000_000, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0040, 300_000);
    assert_eq!(apic.next_timer_deadline_ns(), Some(1_000_000));
    let _ = apic.timer_tick(1_000_000, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(2_000_000));
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x40, 1_300_000);
    let _ = apic.timer_tick(2_000_000, 0);
    assert_eq!(
        apic.next_timer_deadline_ns(),
        None,
        "back to one-shot: stops after the expiry"
    );
}

#[test]
fn periodic_period_is_at_least_200_us() {
    // KVM's min_timer_period_us: (initial count, divide encoding, divisor, expected period in ns). At 1 GHz a
    // count of 1 with divide 1 would be a 1 ns period.
    let cases: [(u32, u32, u64, u64); 5] = [
        (1, 0xB, 1, 200_000),
        (199_999, 0xB, 1, 200_000),
        (200_001, 0xB, 1, 200_001),
        (1_000, 0x3, 16, 200_000), // 16 µs raised to 200 µs = 12,500 ticks of 16 ns
        (20_000, 0xA, 128, 2_560_000), // above the minimum: unchanged
    ];
    for (n, enc, div, period) in cases {
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::TIMER_DIVIDE, enc, 0);
        let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0040, 0);
        let _ = wr(&mut apic, reg::TIMER_INITIAL, n, 0);
        assert_eq!(
            apic.next_timer_deadline_ns(),
            Some(period),
            "n {n} div {div}"
        );
        assert!(apic.timer_tick(period, 0).reevaluate);
        assert_eq!(
            apic.next_timer_deadline_ns(),
            Some(2 * period),
            "n {n} div {div}"
        );
        // The current count runs down from the raised period (it can exceed the initial count, as in KVM).
        let ticks = period / div;
        assert_eq!(
            rd(&apic, reg::TIMER_CURRENT, period + period / 2),
            (ticks - ticks / 2) as u32
        );
        assert_eq!(rd(&apic, reg::TIMER_INITIAL, period), n);
    }
    // One-shot mode is not limited.
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_DIVIDE, 0xB, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x40, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 10, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(10));
}

fn tsc_deadline_apic() -> LocalApic {
    // TSC at 2.5 GHz: 5 TSC ticks are 2 ns.
    let mut apic = LocalApic::new(
        0,
        ApicConfig {
            tsc_freq_hz: 2_500_000_000,
            ..cfg()
        },
    );
    let _ = wr(&mut apic, reg::SVR, 0x1FF, 0);
    let fx = wr(&mut apic, reg::LVT_TIMER, 0x0004_00E0, 0);
    assert!(fx.timer_changed);
    assert_eq!(apic.timer_mode(), TimerMode::TscDeadline);
    apic
}

#[test]
fn tsc_deadline_arm_fire_and_disarm() {
    let mut apic = tsc_deadline_apic();
    let (now_ns, now_tsc) = (1_000_000u64, 40_000_000u64);
    let fx = apic.write_tsc_deadline(now_tsc + 5_000, now_ns, now_tsc);
    assert!(fx.timer_changed && !fx.reevaluate);
    assert_eq!(apic.read_tsc_deadline(), now_tsc + 5_000);
    assert_eq!(apic.next_timer_deadline_ns(), Some(now_ns + 2_000));
    // Not yet reached in TSC terms: nothing fires, even if the host clock says so.
    let fx = apic.timer_tick(now_ns + 2_000, now_tsc + 4_999);
    assert!(!fx.reevaluate);
    assert!(fx.timer_changed, "the host deadline is re-derived");
    assert_eq!(apic.next_timer_deadline_ns(), Some(now_ns + 2_001));
    let fx = apic.timer_tick(now_ns + 2_001, now_tsc + 5_001);
    assert!(fx.reevaluate && fx.timer_changed);
    assert_eq!(apic.pending_interrupt(), Some(0xE0));
    assert_eq!(
        apic.read_tsc_deadline(),
        0,
        "the deadline clears when it fires"
    );
    assert_eq!(apic.next_timer_deadline_ns(), None);
    // Arm and disarm with 0.
    let _ = apic.write_tsc_deadline(now_tsc + 10_000, now_ns, now_tsc);
    let fx = apic.write_tsc_deadline(0, now_ns, now_tsc);
    assert!(fx.timer_changed);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert_eq!(apic.read_tsc_deadline(), 0);
    // The current count reads 0 in TSC-deadline mode and the initial count is ignored.
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 100, now_ns);
    assert_eq!(rd(&apic, reg::TIMER_INITIAL, now_ns), 0);
    assert_eq!(rd(&apic, reg::TIMER_CURRENT, now_ns), 0);
}

#[test]
fn tsc_deadline_in_the_past_fires_at_once() {
    for deadline in [1u64, 39_999_999, 40_000_000] {
        let mut apic = tsc_deadline_apic();
        let fx = apic.write_tsc_deadline(deadline, 1_000, 40_000_000);
        assert!(fx.reevaluate, "deadline {deadline}");
        assert_eq!(apic.pending_interrupt(), Some(0xE0));
        assert_eq!(apic.read_tsc_deadline(), 0);
        assert_eq!(apic.next_timer_deadline_ns(), None);
    }
    // Masked: fires without an interrupt.
    let mut apic = tsc_deadline_apic();
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0005_00E0, 0);
    assert!(!apic.write_tsc_deadline(1, 1_000, 40_000_000).reevaluate);
    assert!(!apic.is_requested(0xE0));
}

#[test]
fn tsc_deadline_far_future_does_not_overflow() {
    let mut apic = tsc_deadline_apic();
    let _ = apic.write_tsc_deadline(u64::MAX, u64::MAX - 10, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(u64::MAX));
    let mut apic = LocalApic::new(
        0,
        ApicConfig {
            tsc_freq_hz: 1,
            ..cfg()
        },
    );
    let _ = wr(&mut apic, reg::SVR, 0x1FF, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0004_00E0, 0);
    let _ = apic.write_tsc_deadline(u64::MAX, 5, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(u64::MAX));
}

#[test]
fn tsc_deadline_msr_is_ignored_in_other_modes() {
    for lvt in [0x40u32, 0x0002_0040, 0x0006_0040] {
        let mut apic = enabled(0);
        let _ = wr(&mut apic, reg::LVT_TIMER, lvt, 0);
        assert_eq!(apic.write_tsc_deadline(1, 0, 100), ApicEffects::default());
        assert_eq!(apic.read_tsc_deadline(), 0);
        assert!(!apic.is_requested(0x40));
    }
}

#[test]
fn timer_mode_switches_to_and_from_tsc_deadline_disarm() {
    // Countdown -> TSC deadline.
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0002_0040, 0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 1000, 0);
    let fx = wr(&mut apic, reg::LVT_TIMER, 0x0004_0040, 10);
    assert!(fx.timer_changed);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert_eq!(rd(&apic, reg::TIMER_INITIAL, 10), 0);
    // TSC deadline -> one-shot.
    let mut apic = tsc_deadline_apic();
    let _ = apic.write_tsc_deadline(1_000_000, 0, 0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x00E0, 0);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0004_00E0, 0);
    assert_eq!(apic.read_tsc_deadline(), 0, "the old deadline is gone");
    // Reserved mode 3 never fires.
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::LVT_TIMER, 0x0006_0040, 0);
    assert_eq!(apic.timer_mode(), TimerMode::Reserved);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 10, 0);
    assert_eq!(apic.next_timer_deadline_ns(), None);
    assert_eq!(apic.timer_tick(1_000, 0), ApicEffects::default());
}

#[test]
fn x2apic_timer_registers() {
    let mut apic = enabled_x2(0);
    let _ = apic.msr_write(0x83E, 0xB, 0);
    let _ = apic.msr_write(0x832, 0x45, 0);
    let fx = apic.msr_write(0x838, 2_000, 100).expect("initial count");
    assert!(fx.timer_changed);
    assert_eq!(apic.msr_read(0x839, 600), Ok(1_500));
    assert_eq!(
        apic.msr_write(0x839, 5, 600),
        Err(Gp),
        "current count is read-only"
    );
    assert_eq!(apic.next_timer_deadline_ns(), Some(2_100));
}

// ------------------------------------------------------------------ save / restore

fn busy_apic() -> LocalApic {
    let mut apic = enabled_x2(3);
    apic.set_auto_eoi(0x91, true);
    let _ = apic.msr_write(0x808, 0x10, 0);
    let _ = apic.msr_write(0x83E, 0x1, 0);
    let _ = apic.msr_write(0x832, 0x0002_0040, 0);
    let _ = apic.msr_write(0x837, 0x33, 0);
    let _ = apic.msr_write(0x838, 1_000, 10_000);
    let _ = apic.msr_write(0x830, 0x0000_0002_0000_4041, 0);
    apic.accept_fixed(0x60, true);
    apic.ack_interrupt(0x60);
    apic.accept_fixed(0x70, false);
    apic.accept_fixed(0x05, false);
    apic.raise_nmi();
    apic
}

#[test]
fn save_restore_round_trip() {
    let apic = busy_apic();
    let saved = apic.save(11_000);
    let json = serde_json::to_string(&saved).expect("serialize");
    let back: ApicState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, saved);
    // Restore in a "process" whose clock is far ahead: timing is relative.
    let offset = 5_000_000_000u64;
    let mut fresh = LocalApic::new(3, ApicConfig::default());
    fresh.restore(&back, 11_000 + offset, 0).expect("restore");
    assert_eq!(fresh.save(11_000 + offset), saved);
    assert_eq!(
        fresh.next_timer_deadline_ns(),
        apic.next_timer_deadline_ns().map(|d| d + offset)
    );
    for msr in [
        0x802, 0x808, 0x80A, 0x80D, 0x80F, 0x816, 0x81B, 0x823, 0x828, 0x830, 0x832, 0x837, 0x838,
    ] {
        assert_eq!(
            fresh.msr_read(msr, 11_500 + offset),
            apic.msr_read(msr, 11_500),
            "msr {msr:#x}"
        );
    }
    assert_eq!(fresh.pending_interrupt(), apic.pending_interrupt());
    assert!(fresh.is_auto_eoi(0x91));
    assert!(fresh.take_nmi());
}

#[test]
fn save_restore_tsc_deadline() {
    let mut apic = tsc_deadline_apic();
    let _ = apic.write_tsc_deadline(2_500_000, 0, 0);
    let saved = apic.save(0);
    let mut other = LocalApic::new(
        0,
        ApicConfig {
            tsc_freq_hz: 2_500_000_000,
            ..cfg()
        },
    );
    // On restore the guest TSC is 1_000_000 at host time 7_000: 1.5M TSC ticks to go at 2.5 GHz = 600 µs.
    other.restore(&saved, 7_000, 1_000_000).expect("restore");
    assert_eq!(other.read_tsc_deadline(), 2_500_000);
    assert_eq!(other.next_timer_deadline_ns(), Some(7_000 + 600_000));
}

#[test]
fn restore_rejects_foreign_or_invalid_state() {
    let saved = busy_apic().save(0);
    let mut wrong_id = LocalApic::new(4, cfg());
    assert_eq!(
        wrong_id.restore(&saved, 0, 0),
        Err(RestoreError::WrongApicId {
            expected: 4,
            found: 3
        })
    );
    let mut no_x2 = LocalApic::new(
        3,
        ApicConfig {
            x2apic_allowed: false,
            ..cfg()
        },
    );
    let before = no_x2.save(0);
    assert_eq!(
        no_x2.restore(&saved, 0, 0),
        Err(RestoreError::InvalidApicBase(saved.apic_base))
    );
    assert_eq!(no_x2.save(0), before, "a refused restore changes nothing");
    for base in [
        DEFAULT_APIC_BASE | APIC_BASE_EXTD,
        DEFAULT_APIC_BASE | APIC_BASE_ENABLE | 1,
    ] {
        let mut apic = LocalApic::new(3, cfg());
        let state = ApicState {
            apic_base: base,
            ..saved.clone()
        };
        assert_eq!(
            apic.restore(&state, 0, 0),
            Err(RestoreError::InvalidApicBase(base))
        );
    }
    // Out-of-range register values are masked, not trusted.
    let mut apic = LocalApic::new(3, cfg());
    let state = ApicState {
        tpr: 0xFFFF_FFFF,
        svr: 0xFFFF_FFFF,
        lvt: [u32::MAX; 6],
        ..saved
    };
    apic.restore(&state, 0, 0).expect("restore");
    assert_eq!(apic.msr_read(0x808, 0), Ok(0xFF));
    assert_eq!(apic.msr_read(0x80F, 0), Ok(0x3FF));
    assert_eq!(apic.msr_read(0x832, 0), Ok(0x0007_00FF));
}

// ------------------------------------------------------------------ robustness

/// A small deterministic generator (xorshift64*), so the test needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[test]
fn random_guest_accesses_never_panic_and_keep_invariants() {
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    for round in 0..200 {
        let bus = [1, 3, 1_000_000, GHZ, u64::MAX][round % 5];
        let tsc = [1, 2_500_000_000, u64::MAX][round % 3];
        let mut apic = LocalApic::new(
            round as u32,
            ApicConfig {
                bus_freq_hz: bus,
                tsc_freq_hz: tsc,
                ..cfg()
            },
        );
        let mut now = 0u64;
        for _ in 0..500 {
            let r = rng.next();
            now = now.saturating_add(rng.next() % 10_000);
            let value = rng.next();
            match r % 10 {
                0 | 1 => {
                    let _ = wr(&mut apic, (rng.next() % 0x1100) & !3, value as u32, now);
                }
                2 => {
                    let mut buf = [0u8; 4];
                    let len = (rng.next() % 5) as usize;
                    apic.mmio_read(rng.next() % 0x1100, &mut buf[..len], now);
                }
                3 => {
                    let msr = 0x800 + (rng.next() % 0x100) as u32;
                    let _ = apic.msr_write(msr, value % 3 * (value >> 40), now);
                    let _ = apic.msr_read(msr, now);
                }
                4 => {
                    let _ = apic.write_apic_base(value & 0xFFFF_F000_0000_0D00 | (r & 0xC00));
                }
                5 => {
                    let _ = apic.write_tsc_deadline(value, now, now.wrapping_mul(3));
                }
                6 => {
                    let _ = apic.timer_tick(
                        apic.next_timer_deadline_ns().unwrap_or(now),
                        now.wrapping_mul(3),
                    );
                }
                7 => {
                    apic.accept_fixed(value as u8, value & 0x100 != 0);
                }
                8 => {
                    if let Some(v) = apic.pending_interrupt() {
                        assert!(u32::from(v) & 0xF0 > apic.ppr() & 0xF0);
                        apic.ack_interrupt(v);
                        assert!(apic.is_in_service(v) != apic.is_auto_eoi(v));
                    }
                }
                _ => {
                    let _ =
                        apic.hv_vapic_msr_write(0x4000_0070 + (r % 3) as u32, value >> (r % 64));
                    let _ = apic.eoi();
                    apic.set_auto_eoi(value as u8, value & 1 != 0);
                }
            }
            // Invariants: the PPR is never below the TPR; after a tick the deadline is in the future.
            assert!(apic.ppr() >= u32::from(apic.tpr()));
            let _ = apic.timer_tick(now, now.wrapping_mul(3));
            if let Some(d) = apic.next_timer_deadline_ns() {
                assert!(d > now, "deadline {d} not after {now}");
            }
            let state = apic.save(now);
            let mut copy = LocalApic::new(round as u32, *apic.config());
            if copy.restore(&state, now, 0).is_ok() {
                assert_eq!(copy.save(now), state);
            }
        }
    }
}

// ------------------------------------------------------------------ CR8, ISR count, TSC resync

#[test]
fn cr8_maps_to_tpr_bits_7_4() {
    // (CR8 written, TPR after, CR8 read back, re-evaluate)
    let table: &[(u64, u8, u64, bool)] = &[
        (0, 0x00, 0, false),
        (1, 0x10, 1, true),
        (0xF, 0xF0, 0xF, true),
        (0x1F, 0xF0, 0xF, true),
    ];
    for &(cr8, tpr, back, reeval) in table {
        let mut apic = enabled(0);
        let fx = apic.set_cr8(cr8);
        assert_eq!(apic.tpr(), tpr, "cr8 {cr8:#x}");
        assert_eq!(apic.cr8(), back);
        assert_eq!(fx.reevaluate, reeval);
    }
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TPR, 0x5C, 0);
    assert_eq!(apic.cr8(), 5);
    apic.accept_fixed(0x66, false);
    let _ = apic.set_cr8(6);
    assert_eq!(apic.pending_interrupt(), None);
    let _ = apic.set_cr8(5);
    assert_eq!(apic.pending_interrupt(), Some(0x66));
}

#[test]
fn isr_count_tracks_nesting() {
    let mut apic = enabled(0);
    assert_eq!(apic.isr_count(), 0);
    for (i, v) in [0x30u8, 0x50, 0x90, 0xF1].into_iter().enumerate() {
        apic.accept_fixed(v, false);
        apic.ack_interrupt(v);
        assert_eq!(apic.isr_count(), i as u32 + 1);
    }
    let _ = apic.eoi();
    assert_eq!(apic.isr_count(), 3);
    assert!(!apic.is_in_service(0xF1));
}

#[test]
fn resync_tsc_follows_a_guest_tsc_write() {
    let mut apic = tsc_deadline_apic();
    let _ = apic.write_tsc_deadline(1_000_000, 0, 0);
    assert_eq!(apic.next_timer_deadline_ns(), Some(400_000));
    // The guest moved its TSC back by 500_000 ticks at host time 100_000: 250_000 ticks were left, now 750_000.
    let fx = apic.resync_tsc(100_000, 250_000);
    assert!(fx.timer_changed && !fx.reevaluate);
    assert_eq!(apic.next_timer_deadline_ns(), Some(100_000 + 300_000));
    // Moved forward past the deadline: fires at once.
    let fx = apic.resync_tsc(110_000, 2_000_000);
    assert!(fx.reevaluate);
    assert_eq!(apic.pending_interrupt(), Some(0xE0));
    assert_eq!(apic.next_timer_deadline_ns(), None);
    // Nothing armed, or not in TSC-deadline mode: no effect.
    assert_eq!(apic.resync_tsc(0, 0), ApicEffects::default());
    let mut apic = enabled(0);
    let _ = wr(&mut apic, reg::TIMER_INITIAL, 100, 0);
    assert_eq!(apic.resync_tsc(0, 0), ApicEffects::default());
}

#[test]
fn shorthands_use_the_hardware_identity_not_a_rewritten_id() {
    let mut a = enabled(0);
    let mut b = enabled(1);
    // The guest gives both APICs xAPIC ID 5.
    let _ = wr(&mut a, reg::ID, 0x0500_0000, 0);
    let _ = wr(&mut b, reg::ID, 0x0500_0000, 0);
    let ipi = wr(&mut a, reg::ICR_LOW, 0x000C_0040, 0)
        .ipi
        .expect("all excluding self");
    assert_eq!(ipi.source_id, 0);
    assert!(!a.matches_destination(&ipi.dest, ipi.source_id));
    assert!(b.matches_destination(&ipi.dest, ipi.source_id));
    let ipi = wr(&mut b, reg::ICR_LOW, 0x0004_0040, 0).ipi.expect("self");
    assert!(!a.matches_destination(&ipi.dest, ipi.source_id));
    assert!(b.matches_destination(&ipi.dest, ipi.source_id));
    // Physical destinations use the current ID: both match 5.
    assert!(a.matches_destination(&Destination::Physical(5), 1));
    assert!(b.matches_destination(&Destination::Physical(5), 0));
}

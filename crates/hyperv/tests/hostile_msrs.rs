//! Hostile MSR values through the engine's public API with the fake platform (issue 10; the same cases run
//! under real KVM in `guests/tests/hostile_msr.c`): overlay pages outside RAM or in an MMIO-like hole, SINT
//! vectors 0..15, read-only MSRs, reserved bits KVM does not check, stimer counts 0 and u64::MAX, low direct
//! stimer vectors and an EOM flood against a busy message slot. Every expectation is KVM's
//! (`arch/x86/kvm/hyperv.c`), and the engine must never touch memory outside RAM.

use hyperv::testing::FakePlatform;
use hyperv::{Engine, EngineConfig, Gp, HvCpuid, TimerId, VpId};
use tlfs::msr;

const RAM: u64 = 1 << 20;
/// A non-RAM hole standing in for MMIO (the local APIC page, the PCI hole).
const HOLE: (u64, u64) = (0x8_0000, 0x9_0000);
const VP: VpId = VpId(0);
const TSC_HZ: u64 = 1_000_000_000;

fn engine() -> Engine<FakePlatform> {
    let p = FakePlatform::new(RAM as usize, 1, TSC_HZ).with_hole(HOLE.0, HOLE.1);
    p.set_tsc(1_000_000);
    let e = Engine::new(EngineConfig::new(HvCpuid::ALL, false, 1), p).expect("engine");
    e.write_msr(VP, msr::GUEST_OS_ID, 0x8100 << 48)
        .expect("GUEST_OS_ID");
    e.write_msr(VP, msr::SCONTROL, 1).expect("SCONTROL");
    // One second of reference time later, so that small absolute deadlines lie in the past.
    e.platform().set_tsc(1_000_000 + TSC_HZ);
    e.platform().take_record();
    e
}

/// Every dirty range the engine reported lies in RAM outside the hole.
fn assert_only_ram_touched(e: &Engine<FakePlatform>) {
    for (gpa, len) in e.platform().record().dirty {
        let end = gpa + len;
        assert!(end <= RAM, "dirty range {gpa:#x}+{len:#x} beyond RAM");
        assert!(
            end <= HOLE.0 || gpa >= HOLE.1,
            "dirty range {gpa:#x}+{len:#x} in the hole"
        );
    }
}

/// Places that are not RAM.
const NOT_RAM: &[(&str, u64)] = &[
    ("the first page beyond RAM", RAM),
    ("far beyond RAM", 1 << 40),
    ("the last page of the address space", 0xFFFF_FFFF_FFFF_F000),
    ("the hole (MMIO)", HOLE.0),
    ("the last page of the hole", HOLE.1 - 0x1000),
];

#[test]
fn overlay_pages_outside_ram() {
    // (MSR, #GP when enabled outside RAM): KVM writes the hypercall page and clears the assist page's first
    // u32 (both #GP when that fails); SIMP/SIEFP (SYNIC2) and REFERENCE_TSC store the value and never write.
    let cases: &[(u32, bool)] = &[
        (msr::HYPERCALL, true),
        (msr::VP_ASSIST_PAGE, true),
        (msr::SIMP, false),
        (msr::SIEFP, false),
        (msr::REFERENCE_TSC, false),
    ];
    for &(index, gp) in cases {
        for &(place, gpa) in NOT_RAM {
            let e = engine();
            let before = e.read_msr(VP, index).expect("read");
            let value = gpa | 1;
            let r = e.write_msr(VP, index, value);
            let after = e.read_msr(VP, index).expect("read");
            if gp {
                assert_eq!(r, Err(Gp), "{index:#x} enabled at {place}");
                assert_eq!(after, before, "{index:#x} at {place}: value kept after #GP");
            } else {
                assert_eq!(r, Ok(()), "{index:#x} enabled at {place}");
                assert_eq!(after, value, "{index:#x} at {place}: stored");
            }
            // Disabled, any address is stored (nothing is written).
            assert_eq!(e.write_msr(VP, index, gpa), Ok(()), "{index:#x} = {gpa:#x}");
            assert_eq!(e.read_msr(VP, index), Ok(gpa));
            assert_only_ram_touched(&e);
        }
    }
}

#[test]
fn timer_message_to_a_simp_outside_ram_stays_pending_until_simp_moves() {
    for &(place, gpa) in NOT_RAM {
        let e = engine();
        e.write_msr(VP, msr::SINT0 + 2, 0x40).expect("SINT2");
        e.write_msr(VP, msr::SIMP, gpa | 1).expect("SIMP");
        // One-shot message-mode timer on SINT 2 with a deadline in the past: expires at once.
        e.write_msr(VP, msr::STIMER0_CONFIG, (2 << 16) | (1 << 3))
            .expect("config");
        e.write_msr(VP, msr::STIMER0_COUNT, 1).expect("count");
        for _ in 0..100 {
            e.write_msr(VP, msr::EOM, 0).expect("EOM");
        }
        let rec = e.platform().take_record();
        assert!(rec.interrupts.is_empty(), "{place}: {:?}", rec.interrupts);
        assert_eq!(
            e.read_msr(VP, msr::STIMER0_CONFIG).map(|c| c & 1),
            Ok(1),
            "{place}: the one-shot timer stays enabled with its message pending"
        );
        // Moving SIMP into RAM and acknowledging delivers it once.
        e.write_msr(VP, msr::SIMP, 0x2000 | 1).expect("SIMP");
        e.write_msr(VP, msr::EOM, 0).expect("EOM");
        let rec = e.platform().take_record();
        assert_eq!(rec.interrupts, vec![(VP, 0x40, false)], "{place}");
        let slot = e.platform().peek(0x2000 + 2 * 256, 4).expect("slot");
        assert_eq!(
            u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]),
            0x8000_0010
        );
        assert_eq!(e.read_msr(VP, msr::STIMER0_CONFIG).map(|c| c & 1), Ok(0));
        assert_only_ram_touched(&e);
    }
}

#[test]
fn sint_vectors_below_16_gp_only_when_unmasked() {
    let e = engine();
    for sint in 0..16u32 {
        for vector in 0..=255u64 {
            for flags in [
                0u64,
                1 << 16,
                1 << 17,
                (1 << 16) | (1 << 17),
                !0xFFu64 & !(1 << 16),
            ] {
                let value = vector | flags;
                let index = msr::SINT0 + sint;
                let before = e.read_msr(VP, index).expect("read");
                let r = e.write_msr(VP, index, value);
                let masked = value & (1 << 16) != 0;
                if vector < 16 && !masked {
                    assert_eq!(r, Err(Gp), "SINT{sint} = {value:#x}");
                    assert_eq!(e.read_msr(VP, index), Ok(before));
                } else {
                    assert_eq!(r, Ok(()), "SINT{sint} = {value:#x}");
                    assert_eq!(e.read_msr(VP, index), Ok(value), "every bit stored");
                }
            }
        }
        e.write_msr(VP, msr::SINT0 + sint, 1 << 16).expect("mask");
    }
}

#[test]
fn read_only_and_unimplemented_msrs_gp_on_write() {
    let e = engine();
    let read_only = [
        msr::VP_INDEX,
        msr::VP_RUNTIME,
        msr::TIME_REF_COUNT,
        msr::TSC_FREQUENCY,
        msr::APIC_FREQUENCY,
        msr::SVERSION,
    ];
    for index in read_only {
        for value in [0, 1, 1 << 63, u64::MAX] {
            assert_eq!(
                e.write_msr(VP, index, value),
                Err(Gp),
                "{index:#x} = {value:#x}"
            );
        }
        assert!(e.read_msr(VP, index).is_ok(), "{index:#x} stays readable");
    }
    let unimplemented = [
        0x4000_0004,
        0x4000_0011,
        0x4000_0074,
        0x4000_0085,
        0x4000_00A0,
        0x4000_00B8,
        msr::GUEST_IDLE,
        msr::SYNDBG_CONTROL,
        msr::SYNDBG_OPTIONS,
        0x4000_0109,
        0x4000_0119,
        0x4000_1000,
        0x4FFF_FFFF,
    ];
    for index in unimplemented {
        assert_eq!(e.read_msr(VP, index), Err(Gp), "read {index:#x}");
        assert_eq!(
            e.write_msr(VP, index, u64::MAX),
            Err(Gp),
            "write {index:#x}"
        );
    }
}

#[test]
fn reserved_bits_kvm_does_not_check_are_stored() {
    // (MSR, value written, value read back, #GP)
    let crash_ctl = engine().read_msr(VP, msr::CRASH_CTL).expect("CRASH_CTL");
    let cases: &[(u32, u64, u64, bool)] = &[
        (msr::GUEST_OS_ID, u64::MAX, u64::MAX, false),
        (
            msr::HYPERCALL,
            0x3000 | 0xFFC | 1,
            0x3000 | 0xFFC | 1,
            false,
        ),
        (
            msr::REFERENCE_TSC,
            0x3000 | 0xFFE | 1,
            0x3000 | 0xFFE | 1,
            false,
        ),
        (
            msr::VP_ASSIST_PAGE,
            0x3000 | 0xFFE | 1,
            0x3000 | 0xFFE | 1,
            false,
        ),
        (msr::SIMP, 0x3000 | 0xFFE | 1, 0x3000 | 0xFFE | 1, false),
        (msr::SIEFP, 0x3000 | 0xFFE | 1, 0x3000 | 0xFFE | 1, false),
        (msr::SCONTROL, u64::MAX, u64::MAX, false),
        (
            msr::STIMER0_CONFIG,
            0xFFFF_FFFF_FFF0_E000,
            0xFFFF_FFFF_FFF0_E000,
            false,
        ),
        (msr::STIMER0_COUNT, u64::MAX, u64::MAX, false),
        (msr::CRASH_P0, u64::MAX, u64::MAX, false),
        (msr::CRASH_CTL, u64::MAX >> 1, crash_ctl, false),
        (msr::REENLIGHTENMENT_CONTROL, u64::MAX, u64::MAX, false),
        (msr::TSC_EMULATION_CONTROL, u64::MAX, u64::MAX, false),
        (msr::RESET, u64::MAX, 0, false),
        (msr::TSC_EMULATION_STATUS, 1, 0, true),
        (msr::TSC_EMULATION_STATUS, u64::MAX, 0, true),
        (msr::TSC_INVARIANT_CONTROL, 2, 0, true),
        (msr::TSC_INVARIANT_CONTROL, u64::MAX, 0, true),
    ];
    for &(index, value, back, gp) in cases {
        let e = engine();
        let r = e.write_msr(VP, index, value);
        assert_eq!(r.is_err(), gp, "{index:#x} = {value:#x}: {r:?}");
        assert_eq!(e.read_msr(VP, index), Ok(back), "{index:#x} = {value:#x}");
        let events = e.platform().record().events;
        assert!(
            events.is_empty()
                || index == msr::SCONTROL
                || index == msr::SIMP
                || index == msr::SIEFP,
            "{index:#x} = {value:#x} raised {events:?}"
        );
        assert_only_ram_touched(&e);
    }
}

#[test]
fn stimer_counts_zero_and_max() {
    // (config, count, enabled afterwards, armed deadline)
    const ONE_SHOT: u64 = (2 << 16) | (1 << 3);
    const PERIODIC: u64 = ONE_SHOT | (1 << 1);
    const DIRECT: u64 = (1 << 12) | (0x42 << 4) | (1 << 3);
    let cases: &[(&str, u64, u64, bool, Option<u64>)] = &[
        ("one-shot, count 0", ONE_SHOT, 0, false, None),
        ("periodic, count 0", PERIODIC, 0, false, None),
        (
            "one-shot, count u64::MAX",
            ONE_SHOT,
            u64::MAX,
            true,
            Some(u64::MAX),
        ),
        (
            "periodic, count u64::MAX",
            PERIODIC,
            u64::MAX,
            true,
            Some(u64::MAX),
        ),
        (
            "direct, count u64::MAX",
            DIRECT,
            u64::MAX,
            true,
            Some(u64::MAX),
        ),
        (
            "direct periodic, count u64::MAX",
            DIRECT | 2,
            u64::MAX,
            true,
            Some(u64::MAX),
        ),
    ];
    for &(name, config, count, enabled, deadline) in cases {
        let e = engine();
        e.write_msr(VP, msr::SIMP, 0x2000 | 1).expect("SIMP");
        e.write_msr(VP, msr::SINT0 + 2, 0x40).expect("SINT2");
        e.write_msr(VP, msr::STIMER0_CONFIG, config)
            .expect("config");
        e.write_msr(VP, msr::STIMER0_COUNT, count).expect("count");
        let c = e.read_msr(VP, msr::STIMER0_CONFIG).expect("config");
        assert_eq!(c & 1 != 0, enabled, "{name}: CONFIG {c:#x}");
        let rec = e.platform().record();
        assert_eq!(
            rec.timers.get(&(VP, TimerId(0))).copied(),
            deadline,
            "{name}: the deadline saturates, never wraps into the past"
        );
        assert!(rec.interrupts.is_empty(), "{name}: {:?}", rec.interrupts);
    }
    // Enabled with count 0: stays enabled and never runs.
    let e = engine();
    e.write_msr(VP, msr::STIMER0_CONFIG, (2 << 16) | 1)
        .expect("config");
    assert_eq!(e.read_msr(VP, msr::STIMER0_CONFIG).map(|c| c & 1), Ok(1));
    assert!(e.platform().record().timers.is_empty());
}

#[test]
fn direct_stimer_with_a_vector_below_16_is_delivered_to_the_apic_unchecked() {
    // KVM does not check the vector (neither at the CONFIG write nor at expiry); the local APIC refuses vectors
    // below 16. The expiry counts as delivered, so a one-shot timer disables itself.
    for vector in [0u64, 1, 5, 15] {
        let e = engine();
        let config = (1 << 12) | (vector << 4) | (1 << 3);
        e.write_msr(VP, msr::STIMER0_CONFIG, config)
            .expect("config");
        e.write_msr(VP, msr::STIMER0_COUNT, 1)
            .expect("count (in the past)");
        let rec = e.platform().record();
        assert_eq!(rec.interrupts, vec![(VP, vector as u8, false)]);
        assert_eq!(e.read_msr(VP, msr::STIMER0_CONFIG), Ok(config & !1));
    }
}

#[test]
fn eom_flood_against_a_busy_slot() {
    let e = engine();
    let simp = 0x2000;
    e.write_msr(VP, msr::SIMP, simp | 1).expect("SIMP");
    e.write_msr(VP, msr::SINT0 + 3, 0x43).expect("SINT3");
    let slot = simp + 3 * 256;
    e.platform()
        .poke(slot, &0x12345u32.to_le_bytes())
        .expect("busy");
    e.write_msr(VP, msr::STIMER0_CONFIG, (3 << 16) | (1 << 3))
        .expect("config");
    e.write_msr(VP, msr::STIMER0_COUNT, 1)
        .expect("count (in the past)");
    let flags = e.platform().peek(slot + 5, 1).expect("flags");
    assert_eq!(flags[0] & 1, 1, "msg_pending set in the busy slot");
    for i in 0..10_000u64 {
        e.write_msr(VP, msr::EOM, i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .expect("EOM");
    }
    let rec = e.platform().take_record();
    assert!(rec.interrupts.is_empty(), "{:?}", rec.interrupts);
    assert_eq!(e.read_msr(VP, msr::STIMER0_CONFIG).map(|c| c & 1), Ok(1));
    e.platform().poke(slot, &[0; 8]).expect("free the slot");
    e.write_msr(VP, msr::EOM, 0).expect("EOM");
    for _ in 0..1000 {
        e.write_msr(VP, msr::EOM, 0).expect("EOM");
    }
    let rec = e.platform().take_record();
    assert_eq!(
        rec.interrupts,
        vec![(VP, 0x43, false)],
        "delivered exactly once"
    );
    assert_eq!(e.read_msr(VP, msr::STIMER0_CONFIG).map(|c| c & 1), Ok(0));
    assert_only_ram_touched(&e);
}

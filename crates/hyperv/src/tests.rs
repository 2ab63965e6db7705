//! Engine-level tests with the fake platform: every MSR handler, gating (with and without hv-enforce-cpuid),
//! hypercall decoding and dispatch, the reference TSC page, crash, reset and save/restore.

use crate::guest::{eax3, eax4, ebx3, edx3, SYNDBG_ALLOW_KERNEL_DEBUGGING};
use crate::hypercall::{result_value, KVM_ENOSYS_RESULT, KVM_EPERM_RESULT};
use crate::refclock::{tsc_scale, TscPageStatus};
use crate::testing::FakePlatform;
use crate::*;
use std::sync::{Arc, Mutex};
use tlfs::cpuid::HV_INTERFACE_SIGNATURE;
use tlfs::hypercall as hc;
use tlfs::msr::*;

const RAM: usize = 1 << 20;
const HOLE: (u64, u64) = (0x8_0000, 0x9_0000);
const TSC_HZ: u64 = 2_000_000_000;
const VP0: VpId = VpId(0);
const VP1: VpId = VpId(1);

fn cpuid_min() -> HvCpuid {
    HvCpuid {
        interface_eax: HV_INTERFACE_SIGNATURE,
        ..HvCpuid::default()
    }
}

fn make(cpuid: HvCpuid, enforce: bool, synic: bool) -> Engine<FakePlatform> {
    make_with(
        cpuid,
        enforce,
        synic,
        FakePlatform::new(RAM, 2, TSC_HZ)
            .with_hole(HOLE.0, HOLE.1)
            .with_apic(),
    )
}

fn make_with(cpuid: HvCpuid, enforce: bool, synic: bool, p: FakePlatform) -> Engine<FakePlatform> {
    let mut cfg = EngineConfig::new(cpuid, enforce, 2);
    cfg.synic = synic;
    cfg.vp_indexes = vec![0, 5];
    match Engine::new(cfg, p) {
        Ok(e) => e,
        Err(e) => panic!("engine creation failed: {e}"),
    }
}

fn all() -> Engine<FakePlatform> {
    make(HvCpuid::ALL, false, true)
}

fn rd(e: &Engine<FakePlatform>, msr: u32) -> Result<u64, Gp> {
    e.read_msr(VP0, msr)
}

fn wr(e: &Engine<FakePlatform>, msr: u32, v: u64) -> Result<(), Gp> {
    e.write_msr(VP0, msr, v)
}

// ----- engine creation ----------------------------------------------------------------------------------------

#[test]
fn creation_errors() {
    let p = || FakePlatform::new(RAM, 2, TSC_HZ);
    let mut cfg = EngineConfig::new(HvCpuid::ALL, false, 2);
    cfg.vp_indexes = vec![];
    assert_eq!(
        Engine::new(cfg.clone(), p()).err(),
        Some(EngineError::NoVps)
    );
    cfg.vp_indexes = vec![3, 3];
    assert_eq!(
        Engine::new(cfg, p()).err(),
        Some(EngineError::DuplicateVpIndex(3))
    );
}

#[test]
fn cpuid_extraction() {
    use crate::cpuid::CpuidEntry;
    let e = |function, eax, ebx, edx| CpuidEntry {
        function,
        eax,
        ebx,
        edx,
        ..CpuidEntry::default()
    };
    let entries = [
        e(0x4000_0001, HV_INTERFACE_SIGNATURE, 0, 0),
        e(0x4000_0003, 0x2E0, 0x30, 0x400),
        e(0x4000_0004, 0x824, 0xFFF, 0),
        e(0x4000_0082, 2, 0, 0),
    ];
    let c = HvCpuid::from_entries(&entries);
    assert!(c.enabled());
    assert_eq!(
        (c.features_eax, c.features_ebx, c.features_edx),
        (0x2E0, 0x30, 0x400)
    );
    assert_eq!(
        (c.recommendations_eax, c.spinlock_retries, c.syndbg_eax),
        (0x824, 0xFFF, 2)
    );
    // KVM leaves at 0x40000001 (no Hyper-V): disabled and nothing else read.
    let kvm = HvCpuid::from_entries(&[
        e(0x4000_0001, 0x0100_7AFB, 0, 0),
        e(0x4000_0003, 0xFFFF, 0, 0),
    ]);
    assert!(!kvm.enabled());
    assert_eq!(kvm.features_eax, 0);
    assert!(!HvCpuid::from_entries(&[]).enabled());
}

// ----- MSR handlers -------------------------------------------------------------------------------------------

/// Every implemented MSR, with hv features all on and no enforcement. `None` = #GP.
#[test]
fn msr_read_write_table() {
    let e = all();
    e.platform().set_runtime_ns(VP0, 123_456_789);
    // (msr, expected read before any write, value to write, write accepted, expected read after)
    type Case = (u32, Option<u64>, u64, bool, Option<u64>);
    let cases: &[Case] = &[
        (GUEST_OS_ID, Some(0), 0x8100 << 48, true, Some(0x8100 << 48)),
        (VP_INDEX, Some(0), 1, false, Some(0)),
        (VP_RUNTIME, Some(1_234_567), 1, false, Some(1_234_567)),
        (TSC_FREQUENCY, Some(TSC_HZ), 1, false, Some(TSC_HZ)),
        (
            APIC_FREQUENCY,
            Some(1_000_000_000),
            1,
            false,
            Some(1_000_000_000),
        ),
        (CRASH_P0, Some(0), 0x1e, true, Some(0x1e)),
        (CRASH_P0 + 1, Some(0), u64::MAX, true, Some(u64::MAX)),
        (CRASH_P0 + 2, Some(0), 2, true, Some(2)),
        (CRASH_P0 + 3, Some(0), 3, true, Some(3)),
        (CRASH_P4, Some(0), 4, true, Some(4)),
        (
            CRASH_CTL,
            Some(CRASH_CTL_NOTIFY),
            0,
            true,
            Some(CRASH_CTL_NOTIFY),
        ),
        (
            CRASH_CTL,
            Some(CRASH_CTL_NOTIFY),
            0x7FFF,
            true,
            Some(CRASH_CTL_NOTIFY),
        ),
        (RESET, Some(0), 0, true, Some(0)),
        (RESET, Some(0), 2, true, Some(0)),
        (
            REENLIGHTENMENT_CONTROL,
            Some(0),
            u64::MAX,
            true,
            Some(u64::MAX),
        ),
        (
            TSC_EMULATION_CONTROL,
            Some(0),
            0xDEAD_BEEF,
            true,
            Some(0xDEAD_BEEF),
        ),
        (TSC_EMULATION_STATUS, Some(0), 1, false, Some(0)),
        (TSC_EMULATION_STATUS, Some(0), 0, true, Some(0)),
        (TSC_INVARIANT_CONTROL, Some(0), 0xDEAD_BEEF, false, Some(0)),
        (TSC_INVARIANT_CONTROL, Some(0), 1, true, Some(1)),
        (TSC_INVARIANT_CONTROL, Some(1), 0, false, Some(1)),
        (TSC_INVARIANT_CONTROL, Some(1), 1, true, Some(1)),
        (REFERENCE_TSC, Some(0), 0xABC_D000, true, Some(0xABC_D000)),
        (
            REFERENCE_TSC,
            Some(0xABC_D000),
            0xFFF0_0000_0000_0FFE,
            true,
            Some(0xFFF0_0000_0000_0FFE),
        ),
        (
            SCONTROL,
            Some(0),
            0xFFFF_FFFF_FFFF_FFFF,
            true,
            Some(u64::MAX),
        ),
        (SVERSION, Some(1), 2, false, Some(1)),
        (SIEFP, Some(0), 0x1234_5001, true, Some(0x1234_5001)),
        (SIMP, Some(0), 0x7000_0001, true, Some(0x7000_0001)),
        (EOM, Some(0), 0xFFFF, true, Some(0)),
        (SINT0, Some(SINT_INITIAL), 15, false, Some(SINT_INITIAL)),
        (SINT0, Some(SINT_INITIAL), 0x1000F, true, Some(0x1000F)),
        (SINT0 + 3, Some(SINT_INITIAL), 0x10, true, Some(0x10)),
        (
            SINT15,
            Some(SINT_INITIAL),
            0xFFFF_0000_0002_00FF,
            true,
            Some(0xFFFF_0000_0002_00FF),
        ),
        (STIMER0_CONFIG, Some(0), 1, true, Some(1)),
        (STIMER3_COUNT, Some(0), 1, true, Some(1)),
        (GUEST_IDLE, None, 1, false, None),
        (SYNDBG_CONTROL, None, 0, false, None),
        (SYNDBG_STATUS, None, 0, false, None),
        (SYNDBG_OPTIONS, None, 0, false, None),
        (0x4000_0004, None, 0, false, None),
        (0x4000_0024, None, 0, false, None),
        (0x4000_00B8, None, 0, false, None),
        (0x4000_0109, None, 0, false, None),
        (0x4000_1080, None, 0, false, None),
        (0x4000_00E0, None, 0, false, None),
    ];
    for &(msr, before, value, ok, after) in cases {
        assert_eq!(rd(&e, msr).ok(), before, "read {msr:#x} before");
        assert_eq!(
            wr(&e, msr, value).is_ok(),
            ok,
            "write {msr:#x} = {value:#x}"
        );
        assert_eq!(rd(&e, msr).ok(), after, "read {msr:#x} after");
    }
    // VP 1 has its own VP index (5) and SynIC.
    assert_eq!(e.read_msr(VP1, VP_INDEX), Ok(5));
    assert_eq!(e.read_msr(VP1, SINT0), Ok(SINT_INITIAL));
    // No event came from CRASH_CTL without notify nor RESET != 1; the SynIC writes were reported.
    let rec = e.platform().record();
    assert!(
        rec.events
            .iter()
            .all(|ev| matches!(ev, Event::SynicChanged { .. })),
        "{:?}",
        rec.events
    );
    assert_eq!(rec.events.len(), 3);
}

#[test]
fn unknown_vp_is_gp() {
    let e = all();
    assert_eq!(e.read_msr(VpId(2), GUEST_OS_ID), Err(Gp));
    assert_eq!(e.write_msr(VpId(99), GUEST_OS_ID, 1), Err(Gp));
}

#[test]
fn identification_off_every_msr_gp() {
    let e = make(HvCpuid::default(), false, true);
    for msr in (0x4000_0000u32..=0x4000_0120).chain([0x4000_1000]) {
        assert_eq!(rd(&e, msr), Err(Gp), "read {msr:#x}");
        assert_eq!(wr(&e, msr, 0), Err(Gp), "write {msr:#x}");
    }
}

#[test]
fn time_ref_count_is_read_only_and_advances_at_1e7() {
    let e = all();
    e.platform().set_tsc(0);
    let t0 = rd(&e, TIME_REF_COUNT).unwrap_or(u64::MAX);
    assert_eq!(t0, 0);
    e.platform().set_tsc(TSC_HZ); // one second later
    let t1 = rd(&e, TIME_REF_COUNT).unwrap_or(0);
    assert!((9_999_999..=10_000_000).contains(&t1), "{t1}");
    assert_eq!(wr(&e, TIME_REF_COUNT, 5), Err(Gp));
}

#[test]
fn vp_runtime_units() {
    let e = all();
    for (ns, want) in [
        (0u64, 0u64),
        (99, 0),
        (100, 1),
        (1_000_000_000, 10_000_000),
        (u64::MAX, u64::MAX / 100),
    ] {
        e.platform().set_runtime_ns(VP1, ns);
        assert_eq!(e.read_msr(VP1, VP_RUNTIME), Ok(want), "ns={ns}");
    }
}

#[test]
fn reset_msr_events() {
    for (value, event) in [
        (0u64, false),
        (1, true),
        (2, false),
        (3, false),
        (u64::MAX, false),
        (1 << 32 | 1, false),
    ] {
        let e = all();
        assert_eq!(e.write_msr(VP1, RESET, value), Ok(()));
        let want: Vec<Event> = if event {
            vec![Event::ResetRequested { vp: VP1 }]
        } else {
            vec![]
        };
        assert_eq!(e.platform().record().events, want, "value {value:#x}");
    }
}

#[test]
fn crash_notify_event_carries_params() {
    let e = all();
    let params = [0x1e, 0xffff_f800_0000_1234, 0, 7, u64::MAX];
    for (i, p) in params.iter().enumerate() {
        assert_eq!(wr(&e, CRASH_P0 + i as u32, *p), Ok(()));
    }
    assert!(
        e.platform().record().events.is_empty(),
        "parameters alone must not report a crash"
    );
    assert_eq!(e.write_msr(VP1, CRASH_CTL, CRASH_CTL_NOTIFY), Ok(()));
    assert_eq!(
        e.platform().record().events,
        vec![Event::GuestPanicked { vp: VP1, params }]
    );
    assert_eq!(rd(&e, CRASH_CTL), Ok(CRASH_CTL_NOTIFY));
    assert_eq!(
        crash::format_crash_params(&params),
        "HV crash parameters: (0x1e 0xfffff80000001234 0 0x7 0xffffffffffffffff)"
    );
}

// ----- HYPERCALL MSR and the hypercall page -------------------------------------------------------------------

#[test]
fn hypercall_msr_semantics() {
    let e = all();
    let page = 0x3000u64;
    e.platform().poke(page, &[0xAA; 4096]).ok();
    // GUEST_OS_ID == 0: ignored, page untouched.
    assert_eq!(wr(&e, HYPERCALL, page | 1), Ok(()));
    assert_eq!(rd(&e, HYPERCALL), Ok(0));
    assert_eq!(e.platform().peek(page, 4), Some(vec![0xAA; 4]));
    assert_eq!(wr(&e, GUEST_OS_ID, 0x8100 << 48), Ok(()));
    // Enable bit clear: stored verbatim (reserved bits included), page untouched.
    assert_eq!(wr(&e, HYPERCALL, page | 0xFFC), Ok(()));
    assert_eq!(rd(&e, HYPERCALL), Ok(page | 0xFFC));
    assert_eq!(e.platform().peek(page, 4), Some(vec![0xAA; 4]));
    // Enable: the page gets `out 0xE4, al; ret`, the rest is unchanged, the bytes are marked dirty.
    assert_eq!(wr(&e, HYPERCALL, page | 0xFF9), Ok(()));
    assert_eq!(rd(&e, HYPERCALL), Ok(page | 0xFF9));
    let got = e.platform().peek(page, 4096).unwrap_or_default();
    assert_eq!(&got[..3], &hcpage::HYPERCALL_PAGE_CODE);
    assert!(got[3..].iter().all(|&b| b == 0xAA));
    assert!(e.platform().record().dirty.contains(&(page, 3)));
    // Enabling at a GPA that is not RAM: #GP and nothing changes.
    assert_eq!(wr(&e, HYPERCALL, HOLE.0 | 1), Err(Gp));
    assert_eq!(wr(&e, HYPERCALL, (RAM as u64) | 1), Err(Gp));
    assert_eq!(rd(&e, HYPERCALL), Ok(page | 0xFF9));
    // GUEST_OS_ID = 0 clears only the enable bit.
    assert_eq!(wr(&e, GUEST_OS_ID, 0), Ok(()));
    assert_eq!(rd(&e, HYPERCALL), Ok(page | 0xFF8));
    assert!(!e.hypercalls_enabled());
}

#[test]
fn hypercall_msr_locked_bit() {
    let e = all();
    assert_eq!(wr(&e, GUEST_OS_ID, 1), Ok(()));
    assert_eq!(wr(&e, HYPERCALL, 0x5000 | 3), Ok(()));
    assert_eq!(wr(&e, HYPERCALL, 0x6000 | 1), Ok(()));
    assert_eq!(wr(&e, HYPERCALL, 0), Ok(()));
    assert_eq!(rd(&e, HYPERCALL), Ok(0x5000 | 3));
    assert_eq!(e.platform().peek(0x6000, 3), Some(vec![0, 0, 0]));
}

// ----- gating -------------------------------------------------------------------------------------------------

/// The stages of KVM's `hyperv_features` selftest (MSR part) that engine I covers, with bits accumulating and a
/// fresh partition per stage; SynIC activated from stage 21.
#[test]
fn enforce_msr_stages_from_kvm_selftest() {
    enum Op {
        Rd(u32),
        Wr(u32, u64),
    }
    use Op::*;
    #[derive(Clone, Copy)]
    enum Add {
        None,
        Eax(u32),
        Edx(u32),
        Syndbg,
    }
    let stages: &[(u32, Add, Op, bool)] = &[
        (0, Add::None, Rd(GUEST_OS_ID), false),
        (1, Add::None, Rd(HYPERCALL), false),
        (
            2,
            Add::Eax(eax3::HYPERCALL),
            Wr(GUEST_OS_ID, 0x8100 << 48),
            true,
        ),
        (3, Add::None, Rd(GUEST_OS_ID), true),
        (4, Add::None, Rd(HYPERCALL), true),
        (5, Add::None, Rd(VP_RUNTIME), false),
        (6, Add::Eax(eax3::VP_RUNTIME), Rd(VP_RUNTIME), true),
        (7, Add::None, Wr(VP_RUNTIME, 1), false),
        (8, Add::None, Rd(TIME_REF_COUNT), false),
        (9, Add::Eax(eax3::TIME_REF_COUNT), Rd(TIME_REF_COUNT), true),
        (10, Add::None, Wr(TIME_REF_COUNT, 1), false),
        (11, Add::None, Rd(VP_INDEX), false),
        (12, Add::Eax(eax3::VP_INDEX), Rd(VP_INDEX), true),
        (13, Add::None, Wr(VP_INDEX, 1), false),
        (14, Add::None, Rd(RESET), false),
        (15, Add::Eax(eax3::RESET), Rd(RESET), true),
        (16, Add::None, Wr(RESET, 0), true),
        (17, Add::None, Rd(REFERENCE_TSC), false),
        (18, Add::Eax(eax3::REFERENCE_TSC), Rd(REFERENCE_TSC), true),
        (19, Add::None, Wr(REFERENCE_TSC, 0), true),
        (20, Add::None, Rd(EOM), false),
        (21, Add::None, Rd(EOM), false),
        (22, Add::Eax(eax3::SYNIC), Rd(EOM), true),
        (23, Add::None, Wr(EOM, 0), true),
        (24, Add::None, Rd(STIMER0_CONFIG), false),
        (25, Add::Eax(eax3::SYNTIMERS), Rd(STIMER0_CONFIG), true),
        (26, Add::None, Wr(STIMER0_CONFIG, 0), true),
        (27, Add::None, Wr(STIMER0_CONFIG, 0x1000), false),
        (
            28,
            Add::Edx(edx3::STIMER_DIRECT),
            Wr(STIMER0_CONFIG, 0x1000),
            true,
        ),
        (29, Add::None, Rd(EOI), false),
        (30, Add::Eax(eax3::APIC_ACCESS), Wr(EOI, 1), true),
        (31, Add::None, Rd(TSC_FREQUENCY), false),
        (32, Add::Eax(eax3::FREQUENCY_MSRS), Rd(TSC_FREQUENCY), true),
        (33, Add::None, Wr(TSC_FREQUENCY, 1), false),
        (34, Add::None, Rd(REENLIGHTENMENT_CONTROL), false),
        (
            35,
            Add::Eax(eax3::REENLIGHTENMENT),
            Rd(REENLIGHTENMENT_CONTROL),
            true,
        ),
        (36, Add::None, Wr(REENLIGHTENMENT_CONTROL, 1), true),
        (37, Add::None, Wr(TSC_EMULATION_STATUS, 1), false),
        (38, Add::None, Rd(CRASH_P0), false),
        (39, Add::Edx(edx3::CRASH_MSRS), Rd(CRASH_P0), true),
        (40, Add::None, Wr(CRASH_P0, 1), true),
        (41, Add::None, Rd(SYNDBG_STATUS), false),
        (44, Add::None, Rd(TSC_INVARIANT_CONTROL), false),
        (
            45,
            Add::Eax(eax3::TSC_INVARIANT),
            Rd(TSC_INVARIANT_CONTROL),
            true,
        ),
        (46, Add::None, Wr(TSC_INVARIANT_CONTROL, 0xdeadbeef), false),
        (47, Add::None, Wr(TSC_INVARIANT_CONTROL, 1), true),
    ];
    let mut cpuid = cpuid_min();
    for (stage, add, op, ok) in stages {
        match *add {
            Add::None => {}
            Add::Eax(b) => cpuid.features_eax |= b,
            Add::Edx(b) => cpuid.features_edx |= b,
            Add::Syndbg => cpuid.syndbg_eax |= SYNDBG_ALLOW_KERNEL_DEBUGGING,
        }
        let e = make(cpuid, true, *stage >= 21);
        let got = match op {
            Rd(m) => rd(&e, *m).is_ok(),
            Wr(m, v) => wr(&e, *m, *v).is_ok(),
        };
        assert_eq!(got, *ok, "stage {stage}");
    }
    // Stage 42: SynDbg bits. The SYNDBG MSRs are not implemented, so even with their CPUID bits they #GP.
    cpuid.features_edx |= edx3::DEBUG_MSRS;
    cpuid.syndbg_eax |= SYNDBG_ALLOW_KERNEL_DEBUGGING;
    assert_eq!(rd(&make(cpuid, true, true), SYNDBG_STATUS), Err(Gp));
    let _ = Add::Syndbg;
}

/// With enforcement, each MSR needs exactly its own bit (plus Hyper-V identification).
#[test]
fn enforce_msr_gate_per_feature() {
    let table: &[(u32, u32, u32)] = &[
        // (msr, eax bit, edx bit)
        (GUEST_OS_ID, eax3::HYPERCALL, 0),
        (HYPERCALL, eax3::HYPERCALL, 0),
        (VP_INDEX, eax3::VP_INDEX, 0),
        (RESET, eax3::RESET, 0),
        (VP_RUNTIME, eax3::VP_RUNTIME, 0),
        (TIME_REF_COUNT, eax3::TIME_REF_COUNT, 0),
        (REFERENCE_TSC, eax3::REFERENCE_TSC, 0),
        (TSC_FREQUENCY, eax3::FREQUENCY_MSRS, 0),
        (APIC_FREQUENCY, eax3::FREQUENCY_MSRS, 0),
        (VP_ASSIST_PAGE, eax3::APIC_ACCESS, 0),
        (SCONTROL, eax3::SYNIC, 0),
        (SVERSION, eax3::SYNIC, 0),
        (SIEFP, eax3::SYNIC, 0),
        (SIMP, eax3::SYNIC, 0),
        (EOM, eax3::SYNIC, 0),
        (SINT0 + 7, eax3::SYNIC, 0),
        (STIMER0_CONFIG + 5, eax3::SYNTIMERS, 0),
        (REENLIGHTENMENT_CONTROL, eax3::REENLIGHTENMENT, 0),
        (TSC_EMULATION_CONTROL, eax3::REENLIGHTENMENT, 0),
        (TSC_EMULATION_STATUS, eax3::REENLIGHTENMENT, 0),
        (TSC_INVARIANT_CONTROL, eax3::TSC_INVARIANT, 0),
        (CRASH_P0 + 2, 0, edx3::CRASH_MSRS),
        (CRASH_CTL, 0, edx3::CRASH_MSRS),
    ];
    for &(msr, eax, edx) in table {
        let without = make(cpuid_min(), true, true);
        assert_eq!(rd(&without, msr), Err(Gp), "{msr:#x} without its bit");
        let mut c = cpuid_min();
        c.features_eax = eax;
        c.features_edx = edx;
        assert!(
            rd(&make(c, true, true), msr).is_ok(),
            "{msr:#x} with its bit"
        );
        // Every other bit is not enough.
        let mut others = cpuid_min();
        others.features_eax = 0xFFFF & !eax;
        others.features_edx = !edx;
        assert_eq!(
            rd(&make(others, true, true), msr),
            Err(Gp),
            "{msr:#x} with all other bits"
        );
        // Without enforcement the bit does not matter.
        assert!(
            rd(&make(cpuid_min(), false, true), msr).is_ok(),
            "{msr:#x} without enforce"
        );
    }
}

#[test]
fn synic_activation_gates() {
    // SynIC not activated: SynIC MSRs #GP both ways; stimer reads work, writes #GP (KVM).
    for enforce in [false, true] {
        let e = make(HvCpuid::ALL, enforce, false);
        for msr in [SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINT0, SINT15] {
            assert_eq!(rd(&e, msr), Err(Gp), "{msr:#x}");
            assert_eq!(wr(&e, msr, 0x10000), Err(Gp), "{msr:#x}");
        }
        for msr in STIMER0_CONFIG..=STIMER3_COUNT {
            assert_eq!(rd(&e, msr), Ok(0), "{msr:#x}");
            assert_eq!(wr(&e, msr, 0), Err(Gp), "{msr:#x}");
        }
    }
}

#[test]
fn vp_assist_page() {
    let e = all();
    e.platform().poke(0x4000, &[0xFF; 8]).ok();
    assert_eq!(wr(&e, VP_ASSIST_PAGE, 0x4000 | 1), Ok(()));
    assert_eq!(rd(&e, VP_ASSIST_PAGE), Ok(0x4001));
    assert_eq!(
        e.platform().peek(0x4000, 8),
        Some(vec![0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
    );
    assert!(e.platform().record().dirty.contains(&(0x4000, 4)));
    assert_eq!(wr(&e, VP_ASSIST_PAGE, HOLE.0 | 1), Err(Gp));
    assert_eq!(rd(&e, VP_ASSIST_PAGE), Ok(0x4001));
    assert_eq!(wr(&e, VP_ASSIST_PAGE, HOLE.0), Ok(()));
    assert_eq!(rd(&e, VP_ASSIST_PAGE), Ok(HOLE.0));
    assert_eq!(
        e.platform().record().pv_eoi,
        vec![(VP0, Some(0x4000)), (VP0, None)]
    );
}

#[test]
fn apic_access_msrs_forward() {
    let e = all();
    assert_eq!(wr(&e, EOI, 0), Ok(()));
    assert_eq!(wr(&e, ICR, 0x0000_0005_0000_40FE), Ok(()));
    assert_eq!(rd(&e, TPR), Ok(0));
    assert_eq!(
        e.platform().record().apic,
        vec![
            (VP0, 0x80B, Some(0)),
            (VP0, 0x830, Some(0x0000_0005_0000_40FE)),
            (VP0, 0x808, None)
        ]
    );
    // Without an APIC model the platform's default answer is #GP.
    let no_apic = make_with(HvCpuid::ALL, false, true, FakePlatform::new(RAM, 2, TSC_HZ));
    assert_eq!(wr(&no_apic, EOI, 0), Err(Gp));
}

// ----- hypercalls ---------------------------------------------------------------------------------------------

fn enabled(cpuid: HvCpuid, enforce: bool, synic: bool) -> Engine<FakePlatform> {
    let e = make(cpuid, enforce, synic);
    // GUEST_OS_ID may be gated: set it through the state, as a restored guest would have it.
    let mut st = e.save();
    st.partition.guest_os_id = 0x8100 << 48;
    if let Err(err) = e.restore(&st) {
        panic!("{err}");
    }
    e
}

fn call64(e: &Engine<FakePlatform>, control: u64, rdx: u64, r8: u64) -> HypercallOutcome {
    e.hypercall(
        VP0,
        &HypercallRegs {
            rcx: control,
            rdx,
            r8,
            rax: 0x5555,
            ..HypercallRegs::default()
        },
    )
}

fn status64(e: &Engine<FakePlatform>, control: u64, rdx: u64, r8: u64) -> Option<u64> {
    match call64(e, control, rdx, r8) {
        HypercallOutcome::Complete(RegisterWrites { rax, rdx: None }) => Some(rax),
        _ => None,
    }
}

const FAST: u64 = 1 << 16;

#[test]
fn control_word_decoding() {
    let h = hypercall::HypercallInput::decode(0x0ABC_0123_0005_805C | FAST, 1, 2);
    assert_eq!(
        (h.code, h.fast, h.var_cnt, h.rep_cnt, h.rep_idx),
        (0x805C, true, 2, 0x123, 0xABC)
    );
    assert!(h.rep() && !h.reserved_bits());
    let h = hypercall::HypercallInput::decode(0x07FE_0000, 0, 0);
    assert_eq!(h.var_cnt, 0x3FF);
    assert!(!h.rep());
    let h = hypercall::HypercallInput::decode(0x0001_0000_0000_0000, 0, 0);
    assert!(h.rep() && h.rep_cnt == 0 && h.rep_idx == 1);
}

#[test]
fn every_reserved_control_bit_is_rejected() {
    let e = enabled(HvCpuid::ALL, false, true);
    let reserved: Vec<u32> = (27..=31).chain(44..=47).chain(60..=63).collect();
    for bit in 0..64u32 {
        let is_reserved = reserved.contains(&bit);
        assert_eq!(
            is_reserved,
            hc::CONTROL_RESERVED_MASK & (1 << bit) != 0,
            "mask bit {bit}"
        );
        for code in [u64::from(hc::NOTIFY_LONG_SPIN_WAIT), 0xBEEF] {
            let s = status64(&e, code | (1u64 << bit), 0, 0);
            if is_reserved {
                assert_eq!(s, Some(3), "code {code:#x} bit {bit}");
            } else {
                assert_ne!(
                    s,
                    Some(3).filter(|_| code == 0xBEEF),
                    "code {code:#x} bit {bit}"
                );
            }
        }
    }
}

#[test]
fn notify_long_spin_wait() {
    let e = enabled(HvCpuid::ALL, false, true);
    let code = u64::from(hc::NOTIFY_LONG_SPIN_WAIT);
    // No GPA is used: garbage in RDX/R8 (not RAM, misaligned) does not matter, fast or slow.
    let cases: &[(u64, u64, u64, u64)] = &[
        (code, 0, 0, 0),
        (code, u64::MAX, 0xDEAD_BEEF_0000_0003, 0),
        (code | FAST, HOLE.0 + 1, u64::MAX, 0),
        (code | (1 << 32), 0, 0, 3),
        (code | (1 << 48), 0, 0, 3),
        (code | (1 << 17), 0, 0, 3),
    ];
    for &(control, rdx, r8, want) in cases {
        assert_eq!(
            status64(&e, control, rdx, r8),
            Some(want),
            "control {control:#x}"
        );
    }
    assert_eq!(e.platform().record().yields, vec![VP0; 3]);
}

#[test]
fn hypercall_preconditions() {
    // Identification off, or GUEST_OS_ID 0: a KVM hypercall (-KVM_ENOSYS / -KVM_EPERM).
    let off = make(HvCpuid::default(), false, true);
    assert_eq!(status64(&off, 8, 0, 0), Some(KVM_ENOSYS_RESULT));
    let no_os_id = all();
    assert_eq!(status64(&no_os_id, 8, 0, 0), Some(KVM_ENOSYS_RESULT));
    let r = no_os_id.hypercall(
        VP0,
        &HypercallRegs {
            cpl: 3,
            rcx: 8,
            ..HypercallRegs::default()
        },
    );
    assert_eq!(
        r,
        HypercallOutcome::Complete(RegisterWrites {
            rax: KVM_EPERM_RESULT,
            rdx: None
        })
    );
    let r = no_os_id.hypercall(
        VP0,
        &HypercallRegs {
            mode: CpuMode::Protected32,
            rax: 8,
            ..HypercallRegs::default()
        },
    );
    assert_eq!(
        r,
        HypercallOutcome::Complete(RegisterWrites {
            rax: KVM_ENOSYS_RESULT & 0xFFFF_FFFF,
            rdx: None
        })
    );
    // Enabled: CPL != 0 and real mode → #UD, before anything else (even reserved bits).
    let e = enabled(HvCpuid::ALL, false, true);
    for regs in [
        HypercallRegs {
            cpl: 3,
            rcx: 8,
            ..HypercallRegs::default()
        },
        HypercallRegs {
            cpl: 1,
            rcx: 1 << 31,
            ..HypercallRegs::default()
        },
        HypercallRegs {
            mode: CpuMode::Real,
            rcx: 8,
            ..HypercallRegs::default()
        },
    ] {
        assert_eq!(
            e.hypercall(VP0, &regs),
            HypercallOutcome::InjectUd,
            "{regs:?}"
        );
    }
    assert!(e.platform().record().yields.is_empty());
}

#[test]
fn thirty_two_bit_convention() {
    let e = enabled(HvCpuid::ALL, false, true);
    // Control in EDX:EAX: rep count 1 in EDX → INVALID_HYPERCALL_INPUT for NotifyLongSpinWait.
    let regs = HypercallRegs {
        mode: CpuMode::Protected32,
        rax: 0xFFFF_FFFF_0000_0008, // upper half ignored
        rdx: 0x0000_0001,
        ..HypercallRegs::default()
    };
    assert_eq!(
        e.hypercall(VP0, &regs),
        HypercallOutcome::Complete(RegisterWrites {
            rax: 3,
            rdx: Some(0)
        })
    );
    let ok = HypercallRegs {
        mode: CpuMode::Protected32,
        rax: 8,
        ..HypercallRegs::default()
    };
    assert_eq!(
        e.hypercall(VP0, &ok),
        HypercallOutcome::Complete(RegisterWrites {
            rax: 0,
            rdx: Some(0)
        })
    );
    // Input GPA in EBX:ECX, output in EDI:ESI.
    let regs = HypercallRegs {
        mode: CpuMode::Protected32,
        rax: 1,
        rdx: 2,
        rbx: 3,
        rcx: 4,
        rdi: 5,
        rsi: 6,
        ..Default::default()
    };
    let h = hypercall::HypercallInput::from_regs(&regs);
    assert_eq!(
        h.map(|h| (h.control, h.ingpa, h.outgpa)),
        Some((2 << 32 | 1, 3 << 32 | 4, 5 << 32 | 6))
    );
    assert_eq!(result_value(0x13, 5), 0x0000_0005_0000_0013);
}

/// The hypercall stages of KVM's `hyperv_features` selftest (bits accumulate; 3.EAX[5] always on). The input
/// page at 0x1000 is zeroed RAM, as in the selftest.
#[test]
fn enforce_hypercall_stages_from_kvm_selftest() {
    #[derive(Clone, Copy)]
    enum Add {
        None,
        Ebx3(u32),
        Eax4(u32),
        Ebx4(u32),
        Edx3(u32),
        Syndbg,
    }
    // (stage, add, control, synic active, expected status or None for #UD)
    let stages: &[(u32, Add, u64, Option<u64>)] = &[
        (0, Add::None, 0xBEEF, Some(2)),
        (1, Add::None, 0x5C, Some(6)),
        (2, Add::Ebx3(ebx3::POST_MESSAGES), 0x5C, Some(3)),
        (3, Add::None, 0x5D, Some(6)),
        (4, Add::Ebx3(ebx3::SIGNAL_EVENTS), 0x5D, Some(3)),
        (5, Add::None, 0x6B, Some(2)),
        (6, Add::Syndbg, 0x6B, Some(6)),
        (7, Add::Ebx3(ebx3::DEBUGGING), 0x6B, Some(8)),
        (8, Add::None, 0x02, Some(6)),
        (9, Add::Eax4(eax4::REMOTE_TLB_FLUSH), 0x02, Some(0)),
        (10, Add::None, 0x13, Some(6)),
        (11, Add::Eax4(eax4::EX_PROCESSOR_MASKS), 0x13, Some(0)),
        (12, Add::None, 0x0B, Some(6)),
        // Vector 0 is refused.
        (13, Add::Eax4(eax4::CLUSTER_IPI), 0x0B, Some(3)),
        // An empty sparse set succeeds before the vector is checked.
        (14, Add::None, 0x15, Some(0)),
        (15, Add::None, 0x08, Some(6)),
        (16, Add::Ebx4(1), 0x08, Some(0)),
        (17, Add::None, 0x02 | FAST, None),
        (
            18,
            Add::Edx3(edx3::XMM_HYPERCALL_INPUT),
            0x02 | FAST,
            Some(0),
        ),
        (19, Add::None, 0x8001, Some(6)),
        (
            20,
            Add::Ebx3(ebx3::EXTENDED_HYPERCALLS),
            0x8001 | FAST,
            Some(5),
        ),
    ];
    let mut c = cpuid_min();
    c.features_eax = eax3::HYPERCALL;
    for &(stage, add, control, want) in stages {
        match add {
            Add::None => {}
            Add::Ebx3(b) => c.features_ebx |= b,
            Add::Eax4(b) => c.recommendations_eax |= b,
            Add::Ebx4(v) => c.spinlock_retries = v,
            Add::Edx3(b) => c.features_edx |= b,
            Add::Syndbg => c.syndbg_eax |= SYNDBG_ALLOW_KERNEL_DEBUGGING,
        }
        let e = enabled(c, true, false);
        assert_eq!(status64(&e, control, 0x1000, 0x2000), want, "stage {stage}");
    }
}

#[test]
fn enforce_gate_order() {
    let mut c = cpuid_min();
    c.features_eax = eax3::HYPERCALL;
    let e = enabled(c, true, true);
    // ACCESS_DENIED comes before reserved bits; reserved bits before the XMM #UD; unknown codes pass the gate.
    assert_eq!(status64(&e, 0x5C | (1 << 31), 0, 0), Some(6));
    assert_eq!(status64(&e, 0xBEEF | (1 << 31), 0, 0), Some(3));
    c.recommendations_eax = eax4::REMOTE_TLB_FLUSH;
    let e = enabled(c, true, true);
    assert_eq!(status64(&e, 0x02 | FAST | (1 << 63), 0, 0), Some(3));
    assert_eq!(call64(&e, 0x02 | FAST, 0, 0), HypercallOutcome::InjectUd);
    // Without enforcement, fast XMM codes never #UD, and still take XMM input (KVM reads XMM0..5 regardless).
    let e = enabled(cpuid_min(), false, true);
    assert_eq!(status64(&e, 0x02 | FAST, 0, 0), Some(0));
    assert!(e.hypercall_needs_xmm(&HypercallRegs {
        rcx: 0x02 | FAST,
        ..HypercallRegs::default()
    }));
}

#[test]
fn debug_and_extended_calls() {
    let e = enabled(HvCpuid::ALL, false, true);
    let cases: &[(u64, u64)] = &[
        (0x69, 2),
        (0x69 | FAST, 5),
        (0x6A, 2),
        (0x6A | FAST, 5),
        (0x6B, 2),
        (0x6B | FAST, 2),
        (0x8001, 2),
        (0x8001 | FAST, 5),
        (0x8041, 2),
        (0x8042, 2),
        (0x0000, 2),
        (0xFFFF, 2),
    ];
    for &(control, want) in cases {
        // Garbage GPAs: the calls must not look at them.
        assert_eq!(
            status64(&e, control, u64::MAX, HOLE.0 + 3),
            Some(want),
            "control {control:#x}"
        );
    }
}

struct Recorder {
    status: u16,
    seen: Mutex<Vec<(VpId, u32, Vec<u8>)>>,
}

impl MessageConnection for Recorder {
    fn post_message(&self, vp: VpId, message_type: u32, payload: &[u8]) -> u16 {
        if let Ok(mut s) = self.seen.lock() {
            s.push((vp, message_type, payload.to_vec()));
        }
        self.status
    }
}

impl EventConnection for Recorder {
    fn signal_event(&self, vp: VpId) -> u16 {
        if let Ok(mut s) = self.seen.lock() {
            s.push((vp, 0, vec![]));
        }
        self.status
    }
}

fn post_input(conn: u32, msg_type: u32, size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 256];
    b[0..4].copy_from_slice(&conn.to_le_bytes());
    b[8..12].copy_from_slice(&msg_type.to_le_bytes());
    b[12..16].copy_from_slice(&size.to_le_bytes());
    for (i, x) in b[16..].iter_mut().enumerate() {
        *x = i as u8;
    }
    b
}

#[test]
fn post_message_checks() {
    let e = enabled(HvCpuid::ALL, false, true);
    let rec = Arc::new(Recorder {
        status: 0,
        seen: Mutex::new(vec![]),
    });
    assert_eq!(e.register_message_connection(0x42, rec.clone()), Ok(()));
    assert_eq!(
        e.register_message_connection(0x42, rec.clone()),
        Err(ConnectionError::InUse(0x42))
    );
    assert_eq!(
        e.register_message_connection(1 << 24, rec.clone()),
        Err(ConnectionError::InvalidId(1 << 24))
    );
    let p = e.platform();
    p.poke(0x2000, &post_input(0x42, 7, 5)).ok();
    p.poke(0x2100, &post_input(0x43, 7, 5)).ok();
    p.poke(0x2200, &post_input(0x42, 7, 241)).ok();
    p.poke(0x2300, &post_input(0xFF00_0042, 9, 240)).ok();
    p.poke(HOLE.0 - 0x80, &post_input(0x42, 7, 5)[..0x80]).ok();
    let code = u64::from(hc::POST_MESSAGE);
    let cases: &[(u64, u64, u64)] = &[
        (code, 0x2000, 0),
        (code, 0x2100, 18),
        (code, 0x2200, 3),
        (code, 0x2300, 0), // connection id masked to 24 bits
        (code, 0x2004, 4),
        (code, HOLE.0, 11),
        (code, HOLE.0 - 0x80, 11), // crosses into the hole
        (code, RAM as u64 - 8, 11),
        (code | FAST, 0x2000, 2),
        (code | (1 << 17), 0x2000, 3),
        (code | (1 << 32), 0x2000, 3),
    ];
    for &(control, gpa, want) in cases {
        // R8 (output GPA) is garbage: PostMessage has no output.
        assert_eq!(
            status64(&e, control, gpa, 0xFFFF_FFFF_FFFF_FFF1),
            Some(want),
            "{control:#x} {gpa:#x}"
        );
    }
    let seen = rec.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], (VP0, 7, (0u8..5).collect::<Vec<u8>>()));
    assert_eq!((seen[1].1, seen[1].2.len()), (9, 240));
    // SynIC not active: INVALID_HYPERCALL_INPUT before anything else.
    let e = enabled(HvCpuid::ALL, false, false);
    assert_eq!(status64(&e, code, 0x2000, 0), Some(3));
    assert!(!e.unregister_message_connection(0x42));
}

#[test]
fn signal_event_checks() {
    let e = enabled(HvCpuid::ALL, false, true);
    let rec = Arc::new(Recorder {
        status: 0,
        seen: Mutex::new(vec![]),
    });
    assert_eq!(e.register_event_connection(0x17, rec.clone()), Ok(()));
    let p = e.platform();
    p.poke(0x2000, &0x17u64.to_le_bytes()).ok();
    p.poke(0x2008, &(0x17u64 | (1 << 32)).to_le_bytes()).ok();
    p.poke(0x2010, &(0x17u64 | (1 << 24)).to_le_bytes()).ok();
    p.poke(0x2018, &0x18u64.to_le_bytes()).ok();
    let code = u64::from(hc::SIGNAL_EVENT);
    let cases: &[(u64, u64, u64)] = &[
        (code | FAST, 0x17, 0),
        (code | FAST, 0x17 | (5 << 32), 17),
        (code | FAST, 0x17 | (1 << 48), 3),
        (code | FAST, 0x17 | (1 << 24), 3),
        (code | FAST, 0x18, 18),
        (code, 0x2000, 0),
        (code, 0x2008, 17),
        (code, 0x2010, 3),
        (code, 0x2018, 18),
        (code, 0x2004, 4),
        (code, 0x2FFC, 4),
        (code, HOLE.0, 4),
        (code, u64::MAX - 7, 4),
        (code | FAST | (1 << 32), 0x17, 3),
        (code | FAST | (3 << 17), 0x17, 3),
    ];
    for &(control, rdx, want) in cases {
        assert_eq!(
            status64(&e, control, rdx, HOLE.0 + 1),
            Some(want),
            "{control:#x} {rdx:#x}"
        );
    }
    assert_eq!(rec.seen.lock().map(|s| s.len()).unwrap_or(0), 2);
    assert!(e.unregister_event_connection(0x17));
    assert_eq!(status64(&e, code | FAST, 0x17, 0), Some(18));
    let off = enabled(HvCpuid::ALL, false, false);
    assert_eq!(status64(&off, code | FAST, 0x17, 0), Some(3));
}

// ----- reference TSC page -------------------------------------------------------------------------------------

fn page(e: &Engine<FakePlatform>, gpa: u64) -> (u32, u64, i64) {
    let b = e.platform().peek(gpa, 24).unwrap_or_default();
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    (u32_at(0), u64_at(8), u64_at(16) as i64)
}

fn page_time(seq_scale_offset: (u32, u64, i64), tsc: u64) -> u64 {
    let (_, scale, offset) = seq_scale_offset;
    (((u128::from(tsc) * u128::from(scale)) >> 64) as u64).wrapping_add(offset as u64)
}

#[test]
fn tsc_page_enable_disable_and_sequence() {
    let e = all();
    let gpa = 0x7000;
    // Selftest step 2: without bit 0 the page stays all zeros.
    assert_eq!(wr(&e, REFERENCE_TSC, gpa), Ok(()));
    assert_eq!(e.platform().peek(gpa, 4096), Some(vec![0; 4096]));
    // Step 3: with bit 0 the sequence is non-zero at once; scale is 2^64 * 1e7 / hz.
    assert_eq!(wr(&e, REFERENCE_TSC, gpa | 1), Ok(()));
    let pg = page(&e, gpa);
    assert_eq!(pg.0, 1);
    assert_eq!(Some(pg.1), tsc_scale(TSC_HZ));
    assert!(e.platform().record().dirty.contains(&(gpa, 24)));
    // Re-enabling rewrites and bumps the sequence, skipping 0xFFFFFFFF and 0.
    assert_eq!(wr(&e, REFERENCE_TSC, gpa | 1), Ok(()));
    assert_eq!(page(&e, gpa).0, 2);
    e.platform().poke(gpa, &0xFFFF_FFFEu32.to_le_bytes()).ok();
    assert_eq!(wr(&e, REFERENCE_TSC, gpa | 1), Ok(()));
    assert_eq!(page(&e, gpa).0, 1);
    // Moving the page writes the new one.
    assert_eq!(wr(&e, REFERENCE_TSC, 0x9000 | 1), Ok(()));
    assert_eq!(page(&e, 0x9000).0, 1);
    // Disabling leaves the page untouched.
    let before = e.platform().peek(0x9000, 24);
    assert_eq!(wr(&e, REFERENCE_TSC, 0x9000), Ok(()));
    assert_eq!(e.platform().peek(0x9000, 24), before);
    // A page outside RAM: the write is accepted (KVM), the page is BROKEN and the MSR still works.
    assert_eq!(wr(&e, REFERENCE_TSC, HOLE.0 | 1), Ok(()));
    assert_eq!(rd(&e, REFERENCE_TSC), Ok(HOLE.0 | 1));
    assert_eq!(e.save().partition.tsc_page, TscPageStatus::Broken);
    e.platform().set_tsc(TSC_HZ);
    assert!(rd(&e, TIME_REF_COUNT).unwrap_or(0) >= 9_999_999);
}

#[test]
fn tsc_page_invalid_when_tsc_too_slow() {
    for hz in [0u64, 1, 1_000_000, 10_000_000] {
        let e = make_with(HvCpuid::ALL, false, true, FakePlatform::new(RAM, 2, hz));
        e.platform().poke(0x7000, &[0xAB; 24]).ok();
        assert_eq!(wr(&e, REFERENCE_TSC, 0x7001), Ok(()));
        assert_eq!(
            page(&e, 0x7000).0,
            0,
            "hz={hz}: sequence must be 0 (invalid)"
        );
        e.platform().set_tsc(hz.max(1) * 3);
        let t = rd(&e, TIME_REF_COUNT).unwrap_or(u64::MAX);
        let want = if hz == 0 { 0 } else { 30_000_000 };
        assert_eq!(t, want, "hz={hz}");
    }
}

/// page ≤ MSR ≤ page on both VPs across many TSC values, including huge ones near the u64 limit.
#[test]
fn tsc_page_and_msr_interleave_monotonic() {
    for hz in [
        10_000_001u64,
        1_000_000_000,
        2_995_200_000,
        3_700_000_000,
        7_000_000_000,
    ] {
        let start = u64::MAX - 100 * hz; // late in the TSC's life: no overflow allowed
        for base in [0u64, 1 << 40, start] {
            let p = FakePlatform::new(RAM, 2, hz);
            p.set_tsc(base);
            let e = make_with(HvCpuid::ALL, false, true, p);
            assert_eq!(wr(&e, REFERENCE_TSC, 0x7001), Ok(()));
            let pg = page(&e, 0x7000);
            assert!(pg.0 != 0 && pg.0 != u32::MAX);
            let mut tsc = base;
            let mut last = 0u64;
            let step = hz / 997 + 13;
            for i in 0..2000u64 {
                let vp = VpId((i % 2) as u32);
                let a = page_time(pg, tsc);
                tsc = tsc.saturating_add(step / 3);
                e.platform().set_vp_tsc(vp, tsc);
                let m = e.read_msr(vp, TIME_REF_COUNT).unwrap_or(0);
                tsc = tsc.saturating_add(step / 3);
                let b = page_time(pg, tsc);
                assert!(
                    last <= a && a <= m && m <= b,
                    "hz={hz} base={base} i={i}: {last} {a} {m} {b}"
                );
                last = b;
            }
            // It starts near 0 at VM creation.
            assert!(page_time(pg, base) <= 1);
        }
    }
}

#[test]
fn rebase_and_tsc_emulation_freeze() {
    let e = all();
    e.platform().set_tsc(10 * TSC_HZ);
    assert_eq!(wr(&e, REFERENCE_TSC, 0x7001), Ok(()));
    let t = e.reference_time(VP0);
    assert!((99_999_990..=100_000_000).contains(&t), "{t}");
    // The VMM resets the guest TSC and re-bases: time continues, the page is rewritten.
    e.platform().set_tsc(0);
    e.rebase_reference_time(t);
    let after = e.reference_time(VP0);
    assert!(after >= t - 1 && after <= t + 1, "{after} vs {t}");
    let pg = page(&e, 0x7000);
    assert_eq!(pg.0, 2);
    assert!(page_time(pg, 0) + 1 >= t);
    // TSC emulation on: host-initiated refreshes keep the page (and TIME_REF_COUNT's parameters) frozen.
    assert_eq!(wr(&e, TSC_EMULATION_CONTROL, 1), Ok(()));
    e.rebase_reference_time(5);
    assert_eq!(page(&e, 0x7000), pg);
    // A guest write still refreshes it.
    assert_eq!(wr(&e, REFERENCE_TSC, 0x7001), Ok(()));
    assert_eq!(page(&e, 0x7000).0, 3);
}

// ----- reset and save/restore ---------------------------------------------------------------------------------

fn dirty_everything(e: &Engine<FakePlatform>) {
    for (msr, v) in [
        (GUEST_OS_ID, 0x8100u64 << 48),
        (HYPERCALL, 0x3001),
        (REFERENCE_TSC, 0x7001),
        (CRASH_P0, 1),
        (CRASH_P4, 5),
        (REENLIGHTENMENT_CONTROL, 0x1_00FF),
        (TSC_EMULATION_CONTROL, 1),
        (TSC_INVARIANT_CONTROL, 1),
        (SCONTROL, 1),
        (SIMP, 0x5001),
        (SIEFP, 0x6001),
        (SINT0 + 2, 0x20030),
        (VP_ASSIST_PAGE, 0x4001),
    ] {
        assert_eq!(wr(e, msr, v), Ok(()), "{msr:#x}");
    }
}

#[test]
fn reset_clears_state_like_qemu() {
    let e = all();
    dirty_everything(&e);
    e.platform().set_runtime_ns(VP0, 5_000_000);
    e.platform().set_tsc(TSC_HZ);
    let t = e.reference_time(VP0);
    let page_before = e.platform().peek(0x7000, 24);
    e.reset();
    let zero = [
        GUEST_OS_ID,
        HYPERCALL,
        REFERENCE_TSC,
        CRASH_P0,
        CRASH_P4,
        REENLIGHTENMENT_CONTROL,
        TSC_EMULATION_CONTROL,
        TSC_EMULATION_STATUS,
        TSC_INVARIANT_CONTROL,
        SCONTROL,
        SIMP,
        SIEFP,
        VP_ASSIST_PAGE,
        VP_RUNTIME,
    ];
    for msr in zero {
        assert_eq!(rd(&e, msr), Ok(0), "{msr:#x}");
    }
    for n in 0..16 {
        assert_eq!(rd(&e, SINT0 + n), Ok(SINT_INITIAL));
    }
    assert_eq!(rd(&e, CRASH_CTL), Ok(CRASH_CTL_NOTIFY));
    assert_eq!(e.read_msr(VP1, VP_INDEX), Ok(5));
    assert!(
        e.reference_time(VP0) >= t,
        "reference time survives a reset"
    );
    assert_eq!(
        e.platform().peek(0x7000, 24),
        page_before,
        "a disabled page is not touched"
    );
    assert!(!e.hypercalls_enabled());
    e.platform().set_runtime_ns(VP0, 5_000_300);
    assert_eq!(rd(&e, VP_RUNTIME), Ok(3));
}

#[test]
fn save_restore_roundtrip() {
    let src = all();
    dirty_everything(&src);
    src.platform().set_runtime_ns(VP0, 7_000_000_000);
    let state = src.save();
    let json = serde_json::to_string(&state).unwrap_or_default();
    let back: EngineState = match serde_json::from_str(&json) {
        Ok(s) => s,
        Err(err) => panic!("{err}"),
    };
    assert_eq!(back, state);
    let dst = all();
    dst.platform().set_runtime_ns(VP0, 100);
    assert_eq!(dst.restore(&back), Ok(()));
    for msr in [
        GUEST_OS_ID,
        HYPERCALL,
        REFERENCE_TSC,
        CRASH_P0,
        CRASH_P4,
        SIMP,
        SIEFP,
        SINT0 + 2,
        VP_ASSIST_PAGE,
    ] {
        assert_eq!(rd(&dst, msr), rd(&src, msr), "{msr:#x}");
    }
    // VP_RUNTIME continues from the source's value.
    assert_eq!(rd(&dst, VP_RUNTIME), Ok(70_000_000));
    assert_eq!(dst.save().partition, state.partition);
    assert!(dst.hypercalls_enabled());

    let mut bad = state.clone();
    bad.version = 99;
    assert_eq!(
        dst.restore(&bad),
        Err(RestoreError::Version {
            found: 99,
            expected: 1
        })
    );
    let mut bad = state.clone();
    bad.vps.pop();
    assert_eq!(
        dst.restore(&bad),
        Err(RestoreError::VpCount {
            found: 1,
            expected: 2
        })
    );
    let mut bad = state;
    bad.vps[1].vp_index = 9;
    assert_eq!(
        dst.restore(&bad),
        Err(RestoreError::VpIndex {
            vp: 1,
            found: 9,
            expected: 5
        })
    );
    assert!(serde_json::from_str::<EngineState>("{\"version\":1}").is_err());
}

#[test]
fn crash_info_and_reenlightenment_queries() {
    let e = all();
    assert!(e.crash_info_available());
    assert!(!make(cpuid_min(), false, true).crash_info_available());
    assert!(!e.reenlightenment_enabled());
    assert_eq!(wr(&e, REENLIGHTENMENT_CONTROL, 0xFF), Ok(()));
    assert!(!e.reenlightenment_enabled());
    assert_eq!(wr(&e, REENLIGHTENMENT_CONTROL, (1 << 16) | 0xFF), Ok(()));
    assert!(e.reenlightenment_enabled());
}

#[test]
fn tlfs_layouts() {
    use std::mem::size_of;
    use tlfs::pages::*;
    let sizes = [
        (size_of::<ReferenceTscPage>(), 24),
        (size_of::<MessageHeader>(), 16),
        (size_of::<Message>(), 256),
        (size_of::<TimerMessagePayload>(), 24),
        (size_of::<PostMessageInput>(), 256),
        (size_of::<VpSetHeader>(), 16),
        (size_of::<FlushInput>(), 24),
        (size_of::<FlushExInput>(), 16),
        (size_of::<SendIpiInput>(), 16),
        (size_of::<SendIpiExInput>(), 8),
    ];
    for (i, (got, want)) in sizes.iter().enumerate() {
        assert_eq!(got, want, "layout {i}");
    }
    let c = |f: fn(hc::Control) -> hc::Control| f(hc::Control::new()).into_bits();
    assert_eq!(c(|c| c.with_code(0xFFFF)), 0xFFFF);
    assert_eq!(c(|c| c.with_fast(true)), 1 << 16);
    assert_eq!(c(|c| c.with_var_header_size(0x3FF)), 0x3FF << 17);
    assert_eq!(c(|c| c.with_nested(true)), 1 << 31);
    assert_eq!(c(|c| c.with_rep_count(0xFFF)), 0xFFF << 32);
    assert_eq!(c(|c| c.with_rep_start(0xFFF)), 0xFFF << 48);
    assert_eq!(HypercallMsr::new().with_gpn(1).into_bits(), 0x1000);
    assert_eq!(SintMsr::new().with_masked(true).into_bits(), SINT_INITIAL);
    assert_eq!(SintMsr::new().with_auto_eoi(true).into_bits(), 1 << 17);
    assert_eq!(StimerConfig::new().with_sintx(0xF).into_bits(), 0xF << 16);
    assert_eq!(
        StimerConfig::new().with_apic_vector(0xFF).into_bits(),
        0xFF << 4
    );
    assert_eq!(
        StimerConfig::new().with_direct_mode(true).into_bits(),
        1 << 12
    );
    assert_eq!(
        ReenlightenmentControl::new().with_enable(true).into_bits(),
        1 << 16
    );
    assert_eq!(
        ReenlightenmentControl::new().with_target_vp(1).into_bits(),
        1 << 32
    );
    assert_eq!(
        hc::SignalEventInput::new().with_flag_number(1).into_bits(),
        1 << 32
    );
}

//! Hostile input never panics: arbitrary MSR traffic and arbitrary hypercall registers, with every feature
//! combination of enforcement and SynIC activation, through the public API.

use hyperv::testing::FakePlatform;
use hyperv::{
    CpuMode, Engine, EngineConfig, HvCpuid, HypercallOutcome, HypercallRegs, TimerId, VpId,
};
use proptest::prelude::*;

fn engine(enforce: bool, synic: bool, eax: u32, ebx: u32, edx: u32) -> Engine<FakePlatform> {
    let cpuid = HvCpuid {
        features_eax: eax,
        features_ebx: ebx,
        features_edx: edx,
        ..HvCpuid::ALL
    };
    let mut cfg = EngineConfig::new(cpuid, enforce, 2);
    cfg.synic = synic;
    let p = FakePlatform::new(64 << 10, 2, 1_000_000_000).with_hole(0x8000, 0x9000);
    Engine::new(cfg, p).expect("engine")
}

const KNOWN_STATUSES: &[u64] = &[0, 2, 3, 4, 5, 6, 8, 11, 17, 18];

fn mode(m: u8) -> CpuMode {
    match m % 3 {
        0 => CpuMode::Long64,
        1 => CpuMode::Protected32,
        _ => CpuMode::Real,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn msr_and_hypercall_storm(
        enforce: bool,
        synic: bool,
        eax: u32,
        ebx: u32,
        edx: u32,
        ops in proptest::collection::vec((0u32..0x130, any::<u64>(), any::<bool>(), 0u32..3), 1..60),
        calls in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), 0u8..6, 0u8..4), 1..30),
        tsc in any::<u64>(),
    ) {
        let e = engine(enforce, synic, eax, ebx, edx);
        e.platform().set_tsc(tsc / 2);
        for (off, value, write, vp) in ops {
            let index = 0x4000_0000 + off;
            let vp = VpId(vp);
            if write {
                let _ = e.write_msr(vp, index, value);
            } else {
                let _ = e.read_msr(vp, index);
            }
            e.timer_expired(vp, TimerId((off % 5) as u8));
        }
        // Make hypercalls Hyper-V ones for the second half.
        let _ = e.write_msr(VpId(0), 0x4000_0000, 1);
        for (rcx, rdx, r8, m, cpl) in calls {
            let regs = HypercallRegs {
                mode: mode(m),
                cpl,
                rax: rcx >> 7,
                rbx: rdx >> 3,
                rcx,
                rdx,
                rsi: r8 >> 5,
                rdi: r8,
                r8,
                xmm: None,
            };
            match e.hypercall(VpId(u32::from(m % 3)), &regs) {
                HypercallOutcome::InjectUd => {}
                HypercallOutcome::Complete(w) => {
                    if e.hypercalls_enabled() && cpl == 0 && mode(m) != CpuMode::Real {
                        prop_assert!(KNOWN_STATUSES.contains(&(w.rax & 0xFFFF)), "{:#x}", w.rax);
                        prop_assert_eq!(w.rax >> 16 & 0xFFFF, 0);
                        prop_assert_eq!(w.rdx.is_some(), mode(m) == CpuMode::Protected32);
                    }
                }
            }
        }
        e.reset();
        let state = e.save();
        prop_assert!(e.restore(&state).is_ok());
    }
}

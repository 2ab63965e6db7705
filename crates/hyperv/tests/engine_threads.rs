//! The engine shared between vCPU threads through the public API only: concurrent MSR traffic on several VPs,
//! page ≤ MSR ≤ page with a shared, advancing TSC, and partition-wide writes seen by every VP.

use hyperv::testing::FakePlatform;
use hyperv::{Engine, EngineConfig, HvCpuid, Platform, VpId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tlfs::msr;

const VPS: u32 = 4;
const HZ: u64 = 3_000_000_000;

fn page_time(p: &FakePlatform, gpa: u64, tsc: u64) -> Option<(u32, u64)> {
    let b = p.peek(gpa, 24)?;
    let seq = u32::from_le_bytes(b[0..4].try_into().ok()?);
    let scale = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let offset = i64::from_le_bytes(b[16..24].try_into().ok()?);
    let t = (((u128::from(tsc) * u128::from(scale)) >> 64) as u64).wrapping_add(offset as u64);
    Some((seq, t))
}

#[test]
fn vps_on_threads_see_monotonic_consistent_time() {
    let platform = FakePlatform::new(1 << 20, VPS as usize, HZ);
    let engine = Arc::new(
        Engine::new(EngineConfig::new(HvCpuid::ALL, false, VPS), platform).expect("engine"),
    );
    engine
        .write_msr(VpId(0), msr::REFERENCE_TSC, 0x7001)
        .expect("enable TSC page");
    let clock = Arc::new(AtomicU64::new(1000));
    let threads: Vec<_> = (0..VPS)
        .map(|i| {
            let engine = Arc::clone(&engine);
            let clock = Arc::clone(&clock);
            std::thread::spawn(move || {
                let vp = VpId(i);
                let mut last = 0u64;
                for _ in 0..2000 {
                    let t1 = clock.fetch_add(997, Ordering::SeqCst);
                    let (seq, a) = page_time(engine.platform(), 0x7000, t1).expect("page");
                    assert!(seq != 0 && seq != u32::MAX);
                    let t2 = clock.fetch_add(997, Ordering::SeqCst);
                    engine.platform().set_vp_tsc(vp, t2);
                    let m = engine
                        .read_msr(vp, msr::TIME_REF_COUNT)
                        .expect("TIME_REF_COUNT");
                    let t3 = clock.fetch_add(997, Ordering::SeqCst);
                    let (_, b) = page_time(engine.platform(), 0x7000, t3).expect("page");
                    assert!(last <= a && a <= m && m <= b, "vp {i}: {last} {a} {m} {b}");
                    last = b;
                    // Per-VP traffic in between.
                    assert_eq!(engine.read_msr(vp, msr::VP_INDEX), Ok(u64::from(i)));
                    engine
                        .write_msr(vp, msr::SINT0 + i, 0x10020 + u64::from(i))
                        .expect("SINT");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("vCPU thread");
    }
    for i in 0..VPS {
        assert_eq!(
            engine.read_msr(VpId(i), msr::SINT0 + i),
            Ok(0x10020 + u64::from(i))
        );
        assert_eq!(engine.vp_by_index(i), Some(VpId(i)));
    }
    // A partition-wide write on one VP is seen by all.
    engine
        .write_msr(VpId(3), msr::GUEST_OS_ID, 0x1234)
        .expect("GUEST_OS_ID");
    for i in 0..VPS {
        assert_eq!(engine.read_msr(VpId(i), msr::GUEST_OS_ID), Ok(0x1234));
    }
    assert!(engine.platform().tsc_frequency_hz() == HZ);
}

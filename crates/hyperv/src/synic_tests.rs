//! SynIC and synthetic-timer tests with the fake platform.

use crate::testing::FakePlatform;
use crate::*;
use tlfs::msr::*;
use tlfs::pages::HVMSG_TIMER_EXPIRED;

const RAM: usize = 1 << 20;
const HOLE: (u64, u64) = (0x8_0000, 0x9_0000);
const HZ: u64 = 2_000_000_000;
const VP0: VpId = VpId(0);
const SIMP_GPA: u64 = 0x5000;
const SIEFP_GPA: u64 = 0x6000;
const STIMER1_CONFIG: u32 = STIMER0_CONFIG + 2;

fn engine() -> Engine<FakePlatform> {
    let p = FakePlatform::new(RAM, 2, HZ).with_hole(HOLE.0, HOLE.1);
    match Engine::new(EngineConfig::new(HvCpuid::ALL, false, 2), p) {
        Ok(e) => e,
        Err(err) => panic!("{err}"),
    }
}

fn wr(e: &Engine<FakePlatform>, msr: u32, v: u64) {
    assert_eq!(e.write_msr(VP0, msr, v), Ok(()), "write {msr:#x} = {v:#x}");
}

fn rd(e: &Engine<FakePlatform>, msr: u32) -> u64 {
    match e.read_msr(VP0, msr) {
        Ok(v) => v,
        Err(gp) => panic!("read {msr:#x}: {gp}"),
    }
}

/// SIMP and SIEFP enabled, SCONTROL on, SINT n unmasked with vector 0x40 + n (SINT 1 auto-EOI).
fn synic_on(e: &Engine<FakePlatform>) {
    wr(e, SCONTROL, 1);
    wr(e, SIMP, SIMP_GPA | 1);
    wr(e, SIEFP, SIEFP_GPA | 1);
    for n in 0..4u32 {
        let auto_eoi = if n == 1 { 1 << 17 } else { 0 };
        wr(e, SINT0 + n, (0x40 + u64::from(n)) | auto_eoi);
    }
    e.platform().take_record();
}

fn slot(e: &Engine<FakePlatform>, sint: u64) -> (u32, u8, u8, Vec<u8>) {
    let b = e
        .platform()
        .peek(SIMP_GPA + sint * 256, 256)
        .unwrap_or_default();
    (
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        b[4],
        b[5],
        b[16..].to_vec(),
    )
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Moves every VP's TSC so that reference time is `t` (100 ns) and returns the exact reference time.
fn set_time(e: &Engine<FakePlatform>, t: u64) -> u64 {
    e.platform()
        .set_tsc(t.saturating_mul(HZ / 10_000_000) + 199);
    e.reference_time(VP0)
}

#[test]
fn raise_sint_masked_and_auto_eoi() {
    let e = engine();
    assert_eq!(e.raise_sint(VP0, 0), Err(SynicError::Masked));
    synic_on(&e);
    assert_eq!(e.raise_sint(VP0, 0), Ok(()));
    assert_eq!(e.raise_sint(VP0, 1), Ok(()));
    assert_eq!(e.raise_sint(VP0, 16), Err(SynicError::NoTarget));
    assert_eq!(e.raise_sint(VpId(7), 0), Err(SynicError::NoTarget));
    assert_eq!(
        e.platform().record().interrupts,
        vec![(VP0, 0x40, false), (VP0, 0x41, true)]
    );
    assert!(e.is_auto_eoi_vector(VP0, 0x41));
    assert!(!e.is_auto_eoi_vector(VP0, 0x40));
}

#[test]
fn message_slot_pending_protocol() {
    let e = engine();
    assert_eq!(
        e.post_message(VP0, 2, 7, b"hi"),
        Err(SynicError::NotEnabled)
    );
    synic_on(&e);
    assert_eq!(
        e.post_message(VP0, 2, 7, &[0xAB; 241]),
        Err(SynicError::Invalid)
    );
    assert_eq!(e.post_message(VP0, 2, 7, b"hello"), Ok(()));
    let (ty, size, flags, payload) = slot(&e, 2);
    assert_eq!((ty, size, flags, &payload[..5]), (7, 5, 0, &b"hello"[..]));
    assert_eq!(e.platform().record().interrupts, vec![(VP0, 0x42, false)]);
    // Slot busy: msg_pending is set and the post fails; no interrupt.
    assert_eq!(e.post_message(VP0, 2, 8, b"second"), Err(SynicError::Busy));
    let (ty, _, flags, _) = slot(&e, 2);
    assert_eq!((ty, flags), (7, 1));
    assert_eq!(e.platform().record().interrupts.len(), 1);
    // The guest frees the slot and writes EOM: the VMM hears about the ack and can retry.
    e.platform()
        .poke(SIMP_GPA + 2 * 256, &0u32.to_le_bytes())
        .ok();
    wr(&e, EOM, 0);
    assert_eq!(e.platform().record().sint_acks, vec![(VP0, 0xFFFF)]);
    assert_eq!(e.post_message(VP0, 2, 8, b"second"), Ok(()));
    assert_eq!(slot(&e, 2).0, 8);
    // Masked SINT: the message is written but the post reports Masked (KVM -ENOENT).
    assert_eq!(e.post_message(VP0, 9, 5, b"x"), Err(SynicError::Masked));
    assert_eq!(slot(&e, 9).0, 5);
    // SIMP outside RAM: an error, never a panic.
    wr(&e, SIMP, HOLE.0 | 1);
    assert_eq!(e.post_message(VP0, 0, 5, b"x"), Err(SynicError::Memory));
    // Message type 0 cannot be posted (it means "free").
    wr(&e, SIMP, SIMP_GPA | 1);
    assert_eq!(e.post_message(VP0, 3, 0, b"x"), Err(SynicError::Invalid));
}

#[test]
fn event_flags_fire_on_zero_to_one_only() {
    let e = engine();
    synic_on(&e);
    assert_eq!(e.signal_event_flag(VP0, 3, 65), Ok(true));
    assert_eq!(e.signal_event_flag(VP0, 3, 65), Ok(false));
    assert_eq!(e.signal_event_flag(VP0, 3, 2047), Ok(true));
    assert_eq!(e.signal_event_flag(VP0, 3, 2048), Err(SynicError::Invalid));
    let page = e
        .platform()
        .peek(SIEFP_GPA + 3 * 256, 256)
        .unwrap_or_default();
    assert_eq!(u64_at(&page, 8), 1 << 1);
    assert_eq!(page[255], 0x80);
    assert_eq!(
        e.platform().record().interrupts,
        vec![(VP0, 0x43, false), (VP0, 0x43, false)]
    );
    // The guest clears the flag: the next signal fires again.
    e.platform()
        .poke(SIEFP_GPA + 3 * 256 + 8, &0u64.to_le_bytes())
        .ok();
    assert_eq!(e.signal_event_flag(VP0, 3, 65), Ok(true));
    // QEMU needs SCONTROL bit 0 and SIEFP enabled.
    wr(&e, SCONTROL, 0);
    assert_eq!(e.signal_event_flag(VP0, 3, 1), Err(SynicError::NotEnabled));
    wr(&e, SCONTROL, 1);
    wr(&e, SIEFP, SIEFP_GPA);
    assert_eq!(e.signal_event_flag(VP0, 3, 1), Err(SynicError::NotEnabled));
    wr(&e, SIEFP, HOLE.0 | 1);
    assert_eq!(e.signal_event_flag(VP0, 3, 1), Err(SynicError::Memory));
}

#[test]
fn eoi_of_sint_vector_acks_that_sint() {
    let e = engine();
    synic_on(&e);
    e.apic_eoi(VP0, 0x42);
    e.apic_eoi(VP0, 0x99);
    assert_eq!(e.platform().record().sint_acks, vec![(VP0, 1 << 2)]);
}

const ENABLE: u64 = 1;
const PERIODIC: u64 = 1 << 1;
const AUTO_ENABLE: u64 = 1 << 3;
const DIRECT: u64 = 1 << 12;
fn sintx(n: u64) -> u64 {
    n << 16
}

#[test]
fn one_shot_message_timer() {
    let e = engine();
    synic_on(&e);
    let t0 = set_time(&e, 1_000_000);
    wr(&e, STIMER0_CONFIG, ENABLE | sintx(2));
    wr(&e, STIMER0_COUNT, t0 + 5000);
    assert_eq!(
        e.platform().record().timers.get(&(VP0, TimerId(0))),
        Some(&(t0 + 5000))
    );
    // An early expiry report changes nothing but re-arms.
    e.timer_expired(VP0, TimerId(0));
    assert_eq!(slot(&e, 2).0, 0);
    let now = set_time(&e, t0 + 6000);
    e.timer_expired(VP0, TimerId(0));
    let (ty, size, _, payload) = slot(&e, 2);
    assert_eq!((ty, size), (HVMSG_TIMER_EXPIRED, 24));
    assert_eq!(u64_at(&payload, 0) & 0xFFFF_FFFF, 0);
    assert_eq!(u64_at(&payload, 8), t0 + 5000);
    assert_eq!(u64_at(&payload, 16), now);
    assert_eq!(rd(&e, STIMER0_CONFIG) & ENABLE, 0, "one-shot clears enable");
    assert_eq!(e.platform().record().interrupts, vec![(VP0, 0x42, false)]);
    // A stale expiry is ignored.
    e.timer_expired(VP0, TimerId(0));
    e.timer_expired(VP0, TimerId(9));
    assert_eq!(e.platform().record().interrupts.len(), 1);
}

#[test]
fn one_shot_in_the_past_expires_at_once_and_busy_slot_retries_after_eom() {
    let e = engine();
    synic_on(&e);
    let t0 = set_time(&e, 50_000);
    assert_eq!(e.post_message(VP0, 0, 3, b"occupied"), Ok(()));
    wr(&e, STIMER1_CONFIG, ENABLE | sintx(0));
    wr(&e, STIMER1_CONFIG + 1, t0 - 10);
    // The slot was busy: nothing delivered, msg_pending set, the timer waits (still enabled).
    assert_eq!(slot(&e, 0).0, 3);
    assert_eq!(slot(&e, 0).2, 1);
    assert_eq!(rd(&e, STIMER1_CONFIG) & ENABLE, ENABLE);
    // The guest frees the slot and writes EOM: the timer message goes out.
    e.platform().poke(SIMP_GPA, &0u32.to_le_bytes()).ok();
    wr(&e, EOM, 0);
    let (ty, _, _, payload) = slot(&e, 0);
    assert_eq!(ty, HVMSG_TIMER_EXPIRED);
    assert_eq!(u64_at(&payload, 0) & 0xFFFF_FFFF, 1);
    assert_eq!(u64_at(&payload, 8), t0 - 10);
    assert_eq!(rd(&e, STIMER1_CONFIG) & ENABLE, 0);
}

#[test]
fn periodic_timer_keeps_its_grid_and_drops_busy_ticks() {
    let e = engine();
    synic_on(&e);
    let period = 10_000u64;
    let t0 = set_time(&e, 2_000_000);
    wr(&e, STIMER0_COUNT, period);
    wr(&e, STIMER0_CONFIG, ENABLE | PERIODIC | sintx(3));
    let first = t0 + period;
    assert_eq!(
        e.platform().record().timers.get(&(VP0, TimerId(0))),
        Some(&first)
    );
    // Late by 2.5 periods: one message for the scheduled expiry, next deadline on the grid.
    set_time(&e, first + 2 * period + period / 2);
    e.timer_expired(VP0, TimerId(0));
    let (_, _, _, payload) = slot(&e, 3);
    assert_eq!(u64_at(&payload, 8), first);
    assert_eq!(
        e.platform().record().timers.get(&(VP0, TimerId(0))),
        Some(&(first + 3 * period))
    );
    // Slot still busy at the next tick: the tick is dropped (no msg_pending), the timer re-arms.
    set_time(&e, first + 3 * period);
    e.timer_expired(VP0, TimerId(0));
    assert_eq!(slot(&e, 3).2, 0, "periodic timers post with no retry");
    assert_eq!(
        e.platform().record().timers.get(&(VP0, TimerId(0))),
        Some(&(first + 4 * period))
    );
    assert_eq!(rd(&e, STIMER0_CONFIG) & ENABLE, ENABLE);
    assert_eq!(e.platform().record().interrupts.len(), 1);
}

#[test]
fn direct_mode_and_enable_rules() {
    let e = engine();
    synic_on(&e);
    let t0 = set_time(&e, 100);
    wr(&e, STIMER0_CONFIG, ENABLE | DIRECT | (0xD1 << 4));
    wr(&e, STIMER0_COUNT, t0 + 1);
    set_time(&e, t0 + 2);
    e.timer_expired(VP0, TimerId(0));
    assert_eq!(e.platform().record().interrupts, vec![(VP0, 0xD1, false)]);
    assert_eq!(slot(&e, 0).0, 0, "direct mode posts no message");
    // auto_enable: a COUNT write enables; COUNT 0 disables.
    wr(&e, STIMER0_CONFIG + 4, AUTO_ENABLE | sintx(1));
    wr(&e, STIMER0_COUNT + 4, u64::MAX);
    assert_eq!(rd(&e, STIMER0_CONFIG + 4) & ENABLE, ENABLE);
    wr(&e, STIMER0_COUNT + 4, 0);
    assert_eq!(rd(&e, STIMER0_CONFIG + 4) & ENABLE, 0);
    // Enabled timer rewritten in message mode with SINT 0: enable is forced off.
    wr(&e, STIMER0_CONFIG + 6, ENABLE | sintx(1));
    wr(&e, STIMER0_CONFIG + 6, ENABLE);
    assert_eq!(rd(&e, STIMER0_CONFIG + 6), 0);
    // ... but not in direct mode.
    wr(&e, STIMER0_CONFIG + 6, ENABLE | sintx(1));
    wr(&e, STIMER0_CONFIG + 6, ENABLE | DIRECT | (0x30 << 4));
    assert_eq!(rd(&e, STIMER0_CONFIG + 6) & ENABLE, ENABLE);
}

#[test]
fn huge_counts_never_wrap_into_the_past() {
    let e = engine();
    synic_on(&e);
    let t0 = set_time(&e, 1000);
    for count in [u64::MAX, u64::MAX - 1, 1 << 63] {
        wr(&e, STIMER0_COUNT, count);
        wr(&e, STIMER0_CONFIG, ENABLE | PERIODIC | sintx(1));
        let deadline = e
            .platform()
            .record()
            .timers
            .get(&(VP0, TimerId(0)))
            .copied();
        assert!(
            deadline.is_some_and(|d| d >= t0),
            "{count:#x}: {deadline:?}"
        );
        // Late expiry far in the future: the next deadline is still ahead of now, no panic.
        let now = set_time(&e, u64::MAX / 300);
        e.timer_expired(VP0, TimerId(0));
        let next = e
            .platform()
            .record()
            .timers
            .get(&(VP0, TimerId(0)))
            .copied()
            .unwrap_or(0);
        assert!(
            next >= now || next == 0,
            "{count:#x}: next {next} now {now}"
        );
        wr(&e, STIMER0_CONFIG, 0);
        set_time(&e, 1000);
    }
}

#[test]
fn restore_rearms_absolute_deadlines_and_reset_cancels() {
    let e = engine();
    synic_on(&e);
    let t0 = set_time(&e, 10_000);
    wr(&e, STIMER0_COUNT, 500);
    wr(&e, STIMER0_CONFIG, ENABLE | PERIODIC | sintx(1));
    let state = e.save();
    let dst = engine();
    assert_eq!(dst.restore(&state), Ok(()));
    assert_eq!(
        dst.platform().record().timers.get(&(VP0, TimerId(0))),
        Some(&(t0 + 500))
    );
    assert_eq!(dst.read_msr(VP0, STIMER0_COUNT), Ok(500));
    dst.reset();
    assert!(dst.platform().record().timers.is_empty());
    assert_eq!(dst.read_msr(VP0, STIMER0_CONFIG), Ok(0));
}

#[test]
fn enabling_simp_or_siefp_at_a_new_page_zeroes_it() {
    let e = engine();
    for (msr, gpa) in [(SIMP, SIMP_GPA), (SIEFP, SIEFP_GPA)] {
        e.platform().poke(gpa, &[0xEE; 4096]).ok();
        wr(&e, msr, gpa); // disabled: untouched
        assert_eq!(e.platform().peek(gpa, 1), Some(vec![0xEE]));
        wr(&e, msr, gpa | 1);
        assert_eq!(e.platform().peek(gpa, 4096), Some(vec![0; 4096]));
        assert!(e.platform().record().dirty.contains(&(gpa, 4096)));
        // Rewriting the same enabled page keeps its contents (pending messages survive).
        e.platform().poke(gpa, &[0x11; 8]).ok();
        wr(&e, msr, gpa | 1);
        assert_eq!(e.platform().peek(gpa, 1), Some(vec![0x11]));
        // Outside RAM: accepted, nothing written.
        wr(&e, msr, HOLE.0 | 1);
        assert_eq!(rd(&e, msr), HOLE.0 | 1);
    }
}

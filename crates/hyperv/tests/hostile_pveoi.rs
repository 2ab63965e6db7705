//! The VP assist page changed by a hostile (or merely unusual) guest, through the engine's public API: the
//! platform must hear of the change **before** the engine zeroes the new page's first u32, so that a VMM with an
//! exit-less EOI pending against the old page can settle it from the old contents, as KVM does at the exit
//! before it handles the MSR write (found by `guests/tests/hostile_msr.c`: an interrupt handler that cleared the
//! "no EOI required" bit and then moved or disabled the page lost its EOI). Enabling outside RAM #GPs before the
//! platform hears anything.

use hyperv::testing::FakePlatform;
use hyperv::{
    ApicAccess, Engine, EngineConfig, Event, Gp, HvCpuid, MemError, Platform, TimerId, VpId, VpWork,
};
use std::sync::Mutex;
use tlfs::msr;

const RAM: u64 = 1 << 20;
const HOLE: (u64, u64) = (0x8_0000, 0x9_0000);
const VP: VpId = VpId(0);

/// What the platform saw at one `pv_eoi_page_changed`: the page, and the first u32 of the old and the new page
/// at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    page: Option<u64>,
    old_word: Option<u32>,
    new_word: Option<u32>,
}

/// The fake platform, plus a record of the memory the VMM would see at each assist-page change.
struct Observing {
    inner: FakePlatform,
    current: Mutex<Option<u64>>,
    seen: Mutex<Vec<Seen>>,
}

impl Observing {
    fn word(&self, gpa: Option<u64>) -> Option<u32> {
        let b = self.inner.peek(gpa?, 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Platform for Observing {
    fn read_gpa(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read_gpa(gpa, buf)
    }
    fn write_gpa(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.inner.write_gpa(gpa, data)
    }
    fn fetch_or_u64(&self, gpa: u64, bits: u64) -> Result<u64, MemError> {
        self.inner.fetch_or_u64(gpa, bits)
    }
    fn compare_exchange_u64(&self, gpa: u64, current: u64, new: u64) -> Result<u64, MemError> {
        self.inner.compare_exchange_u64(gpa, current, new)
    }
    fn mark_dirty(&self, gpa: u64, len: u64) {
        self.inner.mark_dirty(gpa, len)
    }
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.inner.is_ram(gpa, len)
    }
    fn deliver_interrupt(&self, vp: VpId, vector: u8, auto_eoi: bool) {
        self.inner.deliver_interrupt(vp, vector, auto_eoi)
    }
    fn apic_access(&self, vp: VpId, msr: u32, access: ApicAccess) -> Result<u64, Gp> {
        self.inner.apic_access(vp, msr, access)
    }
    fn pv_eoi_page_changed(&self, vp: VpId, gpa: Option<u64>) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Seen {
                page: gpa,
                old_word: self.word(*cur),
                new_word: self.word(gpa),
            });
        *cur = gpa;
        self.inner.pv_eoi_page_changed(vp, gpa)
    }
    fn guest_tsc(&self, vp: VpId) -> u64 {
        self.inner.guest_tsc(vp)
    }
    fn tsc_frequency_hz(&self) -> u64 {
        self.inner.tsc_frequency_hz()
    }
    fn vp_runtime_ns(&self, vp: VpId) -> u64 {
        self.inner.vp_runtime_ns(vp)
    }
    fn arm_timer(&self, vp: VpId, timer: TimerId, deadline: u64) {
        self.inner.arm_timer(vp, timer, deadline)
    }
    fn cancel_timer(&self, vp: VpId, timer: TimerId) {
        self.inner.cancel_timer(vp, timer)
    }
    fn run_on_vp(&self, vp: VpId, work: VpWork) {
        self.inner.run_on_vp(vp, work)
    }
    fn kick_vp(&self, vp: VpId) {
        self.inner.kick_vp(vp)
    }
    fn yield_vp(&self, vp: VpId) {
        self.inner.yield_vp(vp)
    }
    fn flush_remote_tlb(&self, caller: VpId, targets: &[VpId]) {
        self.inner.flush_remote_tlb(caller, targets)
    }
    fn event(&self, event: Event) {
        self.inner.event(event)
    }
}

fn engine() -> Engine<Observing> {
    let p = Observing {
        inner: FakePlatform::new(RAM as usize, 1, 1_000_000_000).with_hole(HOLE.0, HOLE.1),
        current: Mutex::new(None),
        seen: Mutex::new(Vec::new()),
    };
    Engine::new(EngineConfig::new(HvCpuid::ALL, false, 1), p).expect("engine")
}

const A: u64 = 0x3000;
const B: u64 = 0x5000;
/// What the guest leaves in the pages' first u32 before the write (bit 0: "no EOI required" still set).
const GUEST_WORD: u32 = 0xABCD_0001;

#[test]
fn the_platform_hears_of_a_page_change_before_the_page_is_zeroed() {
    // (case, value written second (after enabling A), #GP, what the platform sees at the second change)
    let cases: &[(&str, u64, bool, Option<Seen>)] = &[
        (
            "moved to B",
            B | 1,
            false,
            Some(Seen {
                page: Some(B),
                old_word: Some(GUEST_WORD),
                new_word: Some(GUEST_WORD),
            }),
        ),
        (
            "re-enabled in place",
            A | 1,
            false,
            Some(Seen {
                page: Some(A),
                old_word: Some(GUEST_WORD),
                new_word: Some(GUEST_WORD),
            }),
        ),
        (
            "disabled",
            A,
            false,
            Some(Seen {
                page: None,
                old_word: Some(GUEST_WORD),
                new_word: None,
            }),
        ),
        ("enabled beyond RAM", RAM | 1, true, None),
        ("enabled in the hole", HOLE.0 | 1, true, None),
        (
            "enabled at the last page of the address space",
            0xFFFF_FFFF_FFFF_F001,
            true,
            None,
        ),
    ];
    for &(name, value, gp, want) in cases {
        let e = engine();
        e.write_msr(VP, msr::VP_ASSIST_PAGE, A | 1)
            .expect("enable A");
        for page in [A, B] {
            e.platform()
                .inner
                .poke(page, &GUEST_WORD.to_le_bytes())
                .expect("poke");
        }
        let r = e.write_msr(VP, msr::VP_ASSIST_PAGE, value);
        assert_eq!(r.is_err(), gp, "{name}: {r:?}");
        let seen = e.platform().seen.lock().expect("seen").clone();
        assert_eq!(
            seen.len(),
            1 + usize::from(want.is_some()),
            "{name}: {seen:?}"
        );
        assert_eq!(seen.get(1).copied(), want, "{name}");
        // Afterwards the engine has zeroed the new page's first u32 (KVM), and only on success.
        let now = e.read_msr(VP, msr::VP_ASSIST_PAGE).expect("read");
        if gp {
            assert_eq!(now, A | 1, "{name}: value kept");
            assert_eq!(e.platform().word(Some(A)), Some(GUEST_WORD), "{name}");
        } else {
            assert_eq!(now, value, "{name}");
            if value & 1 != 0 {
                assert_eq!(e.platform().word(Some(value & !0xFFF)), Some(0), "{name}");
            }
        }
    }
}

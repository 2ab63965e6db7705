//! Engine III through the public API with the fake platform: every status of the flush and cluster-IPI
//! hypercalls (KVM's `kvm_hv_flush_tlb` / `kvm_hv_send_ipi` rules, in KVM's order), slow, fast and XMM fast
//! input, rep handling, sparse VP sets (holes, every bank, empty sets, format ALL), VP indexes outside the
//! partition, the 32-bit convention, ENFORCE_CPUID gating and a 1024-VP partition.

use hyperv::flush_ipi::{for_each_sparse_vp, xmm_halves, VpIndexTable, MAX_SET_VP_INDEX};
use hyperv::hypercall::result_value;
use hyperv::testing::{FakePlatform, Record};
use hyperv::{
    CpuMode, Engine, EngineConfig, HvCpuid, HypercallOutcome, HypercallRegs, RegisterWrites, VpId,
};
use proptest::prelude::*;
use std::collections::BTreeSet;
use tlfs::hypercall as hc;
use tlfs::msr;

const RAM: usize = 1 << 20;
/// A non-RAM hole, for unreadable inputs.
const HOLE: (u64, u64) = (0x8_0000, 0x9_0000);
/// Where slow inputs are placed.
const IN: u64 = 0x1000;
/// An input that starts in RAM and runs into the hole after `HOLE_EDGE_WORDS` words.
const HOLE_EDGE_WORDS: u64 = 4;
const IN_EDGE: u64 = HOLE.0 - HOLE_EDGE_WORDS * 8;

const FLUSH_SPACE: u16 = hc::FLUSH_VIRTUAL_ADDRESS_SPACE;
const FLUSH_LIST: u16 = hc::FLUSH_VIRTUAL_ADDRESS_LIST;
const FLUSH_SPACE_EX: u16 = hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX;
const FLUSH_LIST_EX: u16 = hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX;
const IPI: u16 = hc::SEND_SYNTHETIC_CLUSTER_IPI;
const IPI_EX: u16 = hc::SEND_SYNTHETIC_CLUSTER_IPI_EX;

const OK: u16 = hc::STATUS_SUCCESS;
const BAD: u16 = hc::STATUS_INVALID_HYPERCALL_INPUT;

const ALL_PROCESSORS: u64 = tlfs::pages::FLUSH_ALL_PROCESSORS;
const ALL_SPACES: u64 = tlfs::pages::FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
const EXT_RANGE: u64 = tlfs::pages::FLUSH_USE_EXTENDED_RANGE_FORMAT;

/// The control word.
fn control(code: u16, fast: bool, var_cnt: u16, rep_cnt: u16, rep_idx: u16) -> u64 {
    u64::from(code)
        | (u64::from(fast) << 16)
        | (u64::from(var_cnt) << 17)
        | (u64::from(rep_cnt) << 32)
        | (u64::from(rep_idx) << 48)
}

/// An engine with `vp_indexes.len()` vCPUs, hypercalls enabled (GUEST_OS_ID written on every VP's behalf once).
fn engine_with(cpuid: HvCpuid, enforce: bool, vp_indexes: Vec<u32>) -> Engine<FakePlatform> {
    let n = vp_indexes.len();
    let p = FakePlatform::new(RAM, n, 1_000_000_000).with_hole(HOLE.0, HOLE.1);
    let mut cfg = EngineConfig::new(cpuid, enforce, n as u32);
    cfg.vp_indexes = vp_indexes;
    let e = Engine::new(cfg, p).expect("engine");
    e.write_msr(VpId(0), msr::GUEST_OS_ID, 0x8100 << 48)
        .expect("GUEST_OS_ID");
    e
}

/// Four vCPUs with VP indexes 0, 2, 65 and 130 (banks 0, 0, 1, 2), every feature on, no enforcement.
fn engine4() -> Engine<FakePlatform> {
    engine_with(HvCpuid::ALL, false, vec![0, 2, 65, 130])
}

fn poke_words(e: &Engine<FakePlatform>, gpa: u64, words: &[u64]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    e.platform().poke(gpa, &bytes).expect("poke");
}

/// Packs u64 words into XMM0..5 (XMM0.lo first).
fn xmm(words: &[u64]) -> [u128; 6] {
    let mut x = [0u128; 6];
    for (i, &w) in words.iter().take(12).enumerate() {
        x[i / 2] |= u128::from(w) << (64 * (i % 2));
    }
    x
}

fn call(
    e: &Engine<FakePlatform>,
    vp: VpId,
    control: u64,
    rdx: u64,
    r8: u64,
    x: Option<[u128; 6]>,
) -> HypercallOutcome {
    let regs = HypercallRegs {
        mode: CpuMode::Long64,
        cpl: 0,
        rcx: control,
        rdx,
        r8,
        xmm: x,
        ..HypercallRegs::default()
    };
    e.hypercall(vp, &regs)
}

fn rax(o: HypercallOutcome) -> u64 {
    match o {
        HypercallOutcome::Complete(RegisterWrites { rax, rdx: None }) => rax,
        other => panic!("unexpected outcome {other:?}"),
    }
}

fn vps(ids: &[u32]) -> Vec<VpId> {
    ids.iter().map(|&i| VpId(i)).collect()
}

/// One flush case: the input (slow: words at `gpa`; fast: RDX, R8 and XMM words), the expected status and, on
/// success, the flushed vCPUs (`None`: no flush call at all).
struct FlushCase {
    name: &'static str,
    code: u16,
    fast: bool,
    var_cnt: u16,
    rep_cnt: u16,
    rep_idx: u16,
    gpa: u64,
    /// Slow: the memory words at `gpa`. Fast: RDX, R8, then the XMM halves.
    words: Vec<u64>,
    status: u16,
    flushed: Option<Vec<u32>>,
}

fn run_flush(c: &FlushCase) -> (u64, Record) {
    let e = engine4();
    let caller = VpId(1);
    let out = if c.fast {
        let rdx = c.words.first().copied().unwrap_or(0);
        let r8 = c.words.get(1).copied().unwrap_or(0);
        let rest: Vec<u64> = c.words.iter().skip(2).copied().collect();
        call(
            &e,
            caller,
            control(c.code, true, c.var_cnt, c.rep_cnt, c.rep_idx),
            rdx,
            r8,
            Some(xmm(&rest)),
        )
    } else {
        poke_words(&e, c.gpa, &c.words);
        call(
            &e,
            caller,
            control(c.code, false, c.var_cnt, c.rep_cnt, c.rep_idx),
            c.gpa,
            0xDEAD_0000,
            None,
        )
    };
    (rax(out), e.platform().take_record())
}

fn check_flush(cases: &[FlushCase]) {
    for c in cases {
        let (result, rec) = run_flush(c);
        let reps = if c.status == OK { c.rep_cnt } else { 0 };
        assert_eq!(result, result_value(c.status, reps), "{}", c.name);
        match &c.flushed {
            Some(want) => {
                assert_eq!(rec.flushes, vec![(VpId(1), vps(want))], "{}", c.name)
            }
            None => assert!(rec.flushes.is_empty(), "{}: {:?}", c.name, rec.flushes),
        }
        assert!(rec.interrupts.is_empty(), "{}", c.name);
    }
}

#[allow(clippy::too_many_arguments)] // one table row
fn fc(
    name: &'static str,
    code: u16,
    fast: bool,
    (var_cnt, rep_cnt, rep_idx): (u16, u16, u16),
    gpa: u64,
    words: Vec<u64>,
    status: u16,
    flushed: Option<&[u32]>,
) -> FlushCase {
    FlushCase {
        name,
        code,
        fast,
        var_cnt,
        rep_cnt,
        rep_idx,
        gpa,
        words,
        status,
        flushed: flushed.map(|f| f.to_vec()),
    }
}

const ALL4: &[u32] = &[0, 1, 2, 3];

#[test]
fn flush_space_and_list_statuses() {
    let gva = 0x7000_0000u64;
    #[rustfmt::skip]
    let cases = vec![
        // HvCallFlushVirtualAddressSpace: address space, flags, processor mask.
        fc("space mask vp2", FLUSH_SPACE, false, (0, 0, 0), IN, vec![0, ALL_SPACES, 1 << 2], OK, Some(&[1])),
        fc("space mask vp0+vp2", FLUSH_SPACE, false, (0, 0, 0), IN, vec![0, 0, 0b101], OK, Some(&[0, 1])),
        fc("space mask names no vCPU", FLUSH_SPACE, false, (0, 0, 0), IN, vec![0, 0, 1 << 7], OK, None),
        fc("space mask 0 = all", FLUSH_SPACE, false, (0, 0, 0), IN, vec![0, 0, 0], OK, Some(ALL4)),
        fc("space all-processors flag", FLUSH_SPACE, false, (0, 0, 0), IN, vec![0, ALL_PROCESSORS, 1 << 2], OK, Some(ALL4)),
        fc("space var_cnt", FLUSH_SPACE, false, (1, 0, 0), IN, vec![0, 0, 1], BAD, None),
        fc("space rep_cnt", FLUSH_SPACE, false, (0, 1, 0), IN, vec![0, 0, 1], BAD, None),
        fc("space rep_idx", FLUSH_SPACE, false, (0, 0, 1), IN, vec![0, 0, 1], BAD, None),
        fc("space unreadable", FLUSH_SPACE, false, (0, 0, 0), HOLE.0, vec![], BAD, None),
        fc("space header crosses into hole", FLUSH_SPACE, false, (0, 0, 0), HOLE.0 - 16, vec![0, 0], BAD, None),
        fc("space fast", FLUSH_SPACE, true, (0, 0, 0), 0, vec![0, 0, 1 << 2], OK, Some(&[1])),
        fc("space fast mask 0", FLUSH_SPACE, true, (0, 0, 0), 0, vec![0, 0, 0], OK, Some(ALL4)),
        fc("space fast var_cnt", FLUSH_SPACE, true, (1, 0, 0), 0, vec![0, 0, 1], BAD, None),
        // HvCallFlushVirtualAddressList: rep count = GVA entries.
        fc("list 1 rep", FLUSH_LIST, false, (0, 1, 0), IN, vec![0, 0, 1 << 2, gva], OK, Some(&[1])),
        fc("list 15 reps", FLUSH_LIST, false, (0, 15, 0), IN, [vec![0, 0, 1 << 2], vec![gva; 15]].concat(), OK, Some(&[1])),
        fc("list rep_cnt 0", FLUSH_LIST, false, (0, 0, 0), IN, vec![0, 0, 1 << 2], BAD, None),
        fc("list rep_idx", FLUSH_LIST, false, (0, 2, 1), IN, vec![0, 0, 1 << 2, gva, gva], BAD, None),
        fc("list var_cnt", FLUSH_LIST, false, (1, 1, 0), IN, vec![0, 0, 1 << 2, gva], BAD, None),
        // Header readable, GVA list in the hole: KVM reads up to 15 entries.
        fc("list entries unreadable", FLUSH_LIST, false, (0, 2, 0), IN_EDGE + 8, vec![0, 0, 1 << 2], BAD, None),
        fc("list 16 reps not read", FLUSH_LIST, false, (0, 16, 0), IN_EDGE + 8, vec![0, 0, 1 << 2], OK, Some(&[1])),
        fc("list 4095 reps", FLUSH_LIST, false, (0, 4095, 0), IN_EDGE + 8, vec![0, 0, 1 << 2], OK, Some(&[1])),
        fc("list extended range format", FLUSH_LIST, false, (0, 1, 0), IN, vec![0, EXT_RANGE, 1 << 2, gva | 0x800], OK, Some(&[1])),
        // Fast list: processor mask in XMM0.lo, entries from XMM0.hi (11 halves left).
        fc("list fast 11 reps", FLUSH_LIST, true, (0, 11, 0), 0, [vec![0, 0, 1 << 2], vec![gva; 11]].concat(), OK, Some(&[1])),
        fc("list fast 12 reps too many", FLUSH_LIST, true, (0, 12, 0), 0, vec![0, 0, 1 << 2], BAD, None),
        fc("list fast 16 reps not read", FLUSH_LIST, true, (0, 16, 0), 0, vec![0, 0, 1 << 2], OK, Some(&[1])),
        fc("list fast all", FLUSH_LIST, true, (0, 1, 0), 0, vec![0, ALL_PROCESSORS, 0, gva], OK, Some(ALL4)),
    ];
    check_flush(&cases);
}

#[test]
fn flush_ex_statuses() {
    let gva = 0x7000_0000u64;
    let sparse = 0u64;
    let all = 1u64;
    #[rustfmt::skip]
    let cases = vec![
        // address space, flags, format, valid_bank_mask, banks..., (list) GVAs...
        fc("ex bank0 vp2", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, ALL_SPACES, sparse, 0b1, 1 << 2], OK, Some(&[1])),
        fc("ex bank1 vp65", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, 0, sparse, 0b10, 1 << 1], OK, Some(&[2])),
        fc("ex banks 0+1", FLUSH_SPACE_EX, false, (2, 0, 0), IN, vec![0, 0, sparse, 0b11, 1 << 2, 1 << 1], OK, Some(&[1, 2])),
        fc("ex hole: banks 0 and 2", FLUSH_SPACE_EX, false, (2, 0, 0), IN, vec![0, 0, sparse, 0b101, 1, 1 << 2], OK, Some(&[0, 3])),
        fc("ex bank 63 only (no vCPU)", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, 0, sparse, 1 << 63, u64::MAX], OK, None),
        fc("ex empty sparse set", FLUSH_SPACE_EX, false, (0, 0, 0), IN, vec![0, 0, sparse, 0], OK, None),
        fc("ex empty set, rest unreadable", FLUSH_SPACE_EX, false, (0, 0, 0), IN_EDGE, vec![0, 0, sparse, 0], OK, None),
        fc("ex zero bank words", FLUSH_SPACE_EX, false, (2, 0, 0), IN, vec![0, 0, sparse, 0b11, 0, 0], OK, None),
        fc("ex format all", FLUSH_SPACE_EX, false, (0, 0, 0), IN, vec![0, 0, all, 0], OK, Some(ALL4)),
        fc("ex format 7 = all", FLUSH_SPACE_EX, false, (0, 0, 0), IN, vec![0, 0, 7, 0], OK, Some(ALL4)),
        fc("ex format all with banks", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, 0, all, 0b100, 1], OK, Some(ALL4)),
        fc("ex var_cnt < popcount", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, 0, sparse, 0b11, 1, 1], BAD, None),
        fc("ex var_cnt > popcount", FLUSH_SPACE_EX, false, (2, 0, 0), IN, vec![0, 0, sparse, 0b1, 1, 1], BAD, None),
        fc("ex format all, var_cnt mismatch", FLUSH_SPACE_EX, false, (1, 0, 0), IN, vec![0, 0, all, 0], BAD, None),
        fc("ex var_cnt 64 mismatch", FLUSH_SPACE_EX, false, (64, 0, 0), IN, vec![0, 0, sparse, 1], BAD, None),
        fc("ex rep", FLUSH_SPACE_EX, false, (1, 1, 0), IN, vec![0, 0, sparse, 1, 1], BAD, None),
        fc("ex rep_idx", FLUSH_SPACE_EX, false, (1, 0, 3), IN, vec![0, 0, sparse, 1, 1], BAD, None),
        fc("ex header unreadable", FLUSH_SPACE_EX, false, (0, 0, 0), HOLE.0 - 24, vec![0, 0, 0], BAD, None),
        // 4 header words in RAM, the bank in the hole.
        fc("ex banks unreadable", FLUSH_SPACE_EX, false, (1, 0, 0), IN_EDGE, vec![0, 0, sparse, 1], BAD, None),
        // Format ALL reads no banks.
        fc("ex all, banks unreadable", FLUSH_SPACE_EX, false, (1, 0, 0), IN_EDGE, vec![0, 0, all, 1], OK, Some(ALL4)),
        // ListEx: the GVA list follows the banks.
        fc("listex vp65", FLUSH_LIST_EX, false, (1, 1, 0), IN, vec![0, 0, sparse, 0b10, 1 << 1, gva], OK, Some(&[2])),
        fc("listex both", FLUSH_LIST_EX, false, (2, 2, 0), IN, vec![0, 0, sparse, 0b11, 1 << 2, 1 << 1, gva, gva], OK, Some(&[1, 2])),
        fc("listex all, list after banks", FLUSH_LIST_EX, false, (1, 1, 0), IN_EDGE - 8, vec![0, 0, all, 1, 0], BAD, None),
        fc("listex all, list readable", FLUSH_LIST_EX, false, (1, 1, 0), IN_EDGE - 16, vec![0, 0, all, 1, 0, gva], OK, Some(ALL4)),
        fc("listex rep_cnt 0", FLUSH_LIST_EX, false, (1, 0, 0), IN, vec![0, 0, sparse, 1, 1], BAD, None),
        fc("listex rep_idx", FLUSH_LIST_EX, false, (1, 1, 1), IN, vec![0, 0, sparse, 1, 1, gva], BAD, None),
        fc("listex empty set", FLUSH_LIST_EX, false, (0, 3, 0), IN, vec![0, 0, sparse, 0], OK, None),
        fc("listex list unreadable", FLUSH_LIST_EX, false, (0, 1, 0), IN_EDGE, vec![0, 0, all, 0], BAD, None),
        fc("listex 16 reps not read", FLUSH_LIST_EX, false, (0, 16, 0), IN_EDGE, vec![0, 0, all, 0], OK, Some(ALL4)),
        // Fast Ex: RDX, R8, XMM0 = (format, mask), banks from XMM1.lo (10 halves left).
        fc("ex fast bank1", FLUSH_SPACE_EX, true, (1, 0, 0), 0, vec![0, 0, sparse, 0b10, 1 << 1], OK, Some(&[2])),
        fc("ex fast both", FLUSH_SPACE_EX, true, (2, 0, 0), 0, vec![0, 0, sparse, 0b11, 1 << 2, 1 << 1], OK, Some(&[1, 2])),
        fc("ex fast all", FLUSH_SPACE_EX, true, (0, 0, 0), 0, vec![0, 0, all, 0], OK, Some(ALL4)),
        fc("ex fast 10 banks", FLUSH_SPACE_EX, true, (10, 0, 0), 0, [vec![0, 0, sparse, 0x3FF], vec![1; 10]].concat(), OK, Some(&[0])),
        fc("ex fast 11 banks too many", FLUSH_SPACE_EX, true, (11, 0, 0), 0, [vec![0, 0, sparse, 0x7FF], vec![1; 10]].concat(), BAD, None),
        fc("ex fast all, 11 banks (not read)", FLUSH_SPACE_EX, true, (11, 0, 0), 0, vec![0, 0, all, 0x7FF], OK, Some(ALL4)),
        fc("listex fast", FLUSH_LIST_EX, true, (1, 1, 0), 0, vec![0, 0, sparse, 0b100, 1 << 2, gva], OK, Some(&[3])),
        fc("listex fast 9 reps after 1 bank", FLUSH_LIST_EX, true, (1, 9, 0), 0, [vec![0, 0, sparse, 1, 1], vec![gva; 9]].concat(), OK, Some(&[0])),
        fc("listex fast 10 reps after 1 bank", FLUSH_LIST_EX, true, (1, 10, 0), 0, vec![0, 0, sparse, 1, 1], BAD, None),
        fc("listex fast all, 10 reps", FLUSH_LIST_EX, true, (0, 10, 0), 0, vec![0, 0, all, 0], OK, Some(ALL4)),
        fc("listex fast all, 11 reps", FLUSH_LIST_EX, true, (0, 11, 0), 0, vec![0, 0, all, 0], BAD, None),
    ];
    check_flush(&cases);
}

/// One IPI case: the input and the expected status and receivers.
struct IpiCase {
    name: &'static str,
    code: u16,
    fast: bool,
    var_cnt: u16,
    rep: (u16, u16),
    gpa: u64,
    words: Vec<u64>,
    status: u16,
    receivers: Option<(Vec<u32>, u8)>,
}

#[allow(clippy::too_many_arguments)] // one table row
fn ic(
    name: &'static str,
    code: u16,
    fast: bool,
    var_cnt: u16,
    gpa: u64,
    words: Vec<u64>,
    status: u16,
    receivers: Option<(&[u32], u8)>,
) -> IpiCase {
    IpiCase {
        name,
        code,
        fast,
        var_cnt,
        rep: (0, 0),
        gpa,
        words,
        status,
        receivers: receivers.map(|(r, v)| (r.to_vec(), v)),
    }
}

fn check_ipi(cases: &[IpiCase]) {
    for c in cases {
        let e = engine4();
        let ctl = control(c.code, c.fast, c.var_cnt, c.rep.0, c.rep.1);
        let out = if c.fast {
            let rest: Vec<u64> = c.words.iter().skip(2).copied().collect();
            call(&e, VpId(0), ctl, c.words[0], c.words[1], Some(xmm(&rest)))
        } else {
            poke_words(&e, c.gpa, &c.words);
            call(&e, VpId(0), ctl, c.gpa, 0, None)
        };
        assert_eq!(rax(out), u64::from(c.status), "{}", c.name);
        let rec = e.platform().take_record();
        match &c.receivers {
            Some((want, vector)) => {
                assert_eq!(rec.ipi_sets, vec![(vps(want), *vector)], "{}", c.name);
                let got: Vec<(VpId, u8, bool)> =
                    want.iter().map(|&v| (VpId(v), *vector, false)).collect();
                assert_eq!(rec.interrupts, got, "{}", c.name);
            }
            None => assert!(
                rec.interrupts.is_empty(),
                "{}: {:?}",
                c.name,
                rec.interrupts
            ),
        }
        assert!(rec.flushes.is_empty(), "{}", c.name);
    }
}

/// `u32 vector; u32 reserved` as one word.
fn vec_word(vector: u32, reserved: u32) -> u64 {
    u64::from(vector) | (u64::from(reserved) << 32)
}

#[test]
fn send_ipi_statuses() {
    let v = 0xFE;
    #[rustfmt::skip]
    let cases = vec![
        ic("mask vp2", IPI, false, 0, IN, vec![vec_word(v, 0), 1 << 2], OK, Some((&[1], 0xFE))),
        ic("mask vp0+vp2", IPI, false, 0, IN, vec![vec_word(0x30, 0), 0b101], OK, Some((&[0, 1], 0x30))),
        ic("mask 0 sends nothing", IPI, false, 0, IN, vec![vec_word(v, 0), 0], OK, None),
        ic("mask names no vCPU", IPI, false, 0, IN, vec![vec_word(v, 0), 1 << 40], OK, None),
        ic("slow reserved half ignored", IPI, false, 0, IN, vec![vec_word(v, 7), 1 << 2], OK, Some((&[1], 0xFE))),
        ic("vector 0x10", IPI, false, 0, IN, vec![vec_word(0x10, 0), 1], OK, Some((&[0], 0x10))),
        ic("vector 0xFF", IPI, false, 0, IN, vec![vec_word(0xFF, 0), 1], OK, Some((&[0], 0xFF))),
        ic("vector 0x0F", IPI, false, 0, IN, vec![vec_word(0x0F, 0), 1], BAD, None),
        ic("vector 0", IPI, false, 0, IN, vec![vec_word(0, 0), 1], BAD, None),
        ic("vector 0x100", IPI, false, 0, IN, vec![vec_word(0x100, 0), 1], BAD, None),
        ic("bad vector, empty mask", IPI, false, 0, IN, vec![vec_word(5, 0), 0], BAD, None),
        ic("var_cnt", IPI, false, 1, IN, vec![vec_word(v, 0), 1], BAD, None),
        ic("unreadable", IPI, false, 0, HOLE.0 - 8, vec![vec_word(v, 0)], BAD, None),
        ic("fast", IPI, true, 0, 0, vec![u64::from(v), 1 << 2], OK, Some((&[1], 0xFE))),
        ic("fast reserved half set", IPI, true, 0, 0, vec![vec_word(v, 1), 1 << 2], BAD, None),
        ic("fast bad vector", IPI, true, 0, 0, vec![0x0F, 1 << 2], BAD, None),
        // Ex: vector, format, valid_bank_mask, banks.
        ic("ex bank0 vp2", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 0, 1, 1 << 2], OK, Some((&[1], 0xFE))),
        ic("ex bank1 vp65", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 0, 0b10, 1 << 1], OK, Some((&[2], 0xFE))),
        ic("ex both", IPI_EX, false, 2, IN, vec![vec_word(v, 0), 0, 0b11, 1 << 2, 1 << 1], OK, Some((&[1, 2], 0xFE))),
        ic("ex hole banks 0,2", IPI_EX, false, 2, IN, vec![vec_word(v, 0), 0, 0b101, 1, 1 << 2], OK, Some((&[0, 3], 0xFE))),
        ic("ex all", IPI_EX, false, 0, IN, vec![vec_word(v, 0), 1, 0], OK, Some((ALL4, 0xFE))),
        ic("ex all with a bank", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 1, 0b1000], OK, Some((ALL4, 0xFE))),
        ic("ex all bad vector", IPI_EX, false, 0, IN, vec![vec_word(3, 0), 1, 0], BAD, None),
        ic("ex all var_cnt mismatch", IPI_EX, false, 0, IN, vec![vec_word(v, 0), 1, 1], BAD, None),
        // Only format 1 means all: format 2 is decoded as a sparse set.
        ic("ex format 2 is sparse", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 2, 1, 1 << 2], OK, Some((&[1], 0xFE))),
        ic("ex empty set skips vector check", IPI_EX, false, 0, IN, vec![vec_word(0, 0), 0, 0], OK, None),
        ic("ex var_cnt mismatch", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 0, 0b11, 1, 1], BAD, None),
        ic("ex var_cnt mismatch before vector", IPI_EX, false, 2, IN, vec![vec_word(1, 0), 0, 0b1, 1], BAD, None),
        ic("ex bad vector after banks", IPI_EX, false, 1, IN, vec![vec_word(0x0F, 0), 0, 1, 1], BAD, None),
        ic("ex zero bank", IPI_EX, false, 1, IN, vec![vec_word(v, 0), 0, 1, 0], OK, None),
        ic("ex header unreadable", IPI_EX, false, 0, HOLE.0 - 16, vec![vec_word(v, 0), 0], BAD, None),
        ic("ex banks unreadable", IPI_EX, false, 1, IN_EDGE + 8, vec![vec_word(v, 0), 0, 1], BAD, None),
        // Fast Ex: RDX = vector, R8 = format, XMM0.lo = mask, banks from XMM0.hi (11 halves).
        ic("ex fast vp2", IPI_EX, true, 1, 0, vec![u64::from(v), 0, 1, 1 << 2], OK, Some((&[1], 0xFE))),
        ic("ex fast vp65", IPI_EX, true, 1, 0, vec![u64::from(v), 0, 0b10, 1 << 1], OK, Some((&[2], 0xFE))),
        ic("ex fast both", IPI_EX, true, 2, 0, vec![u64::from(v), 0, 0b11, 1 << 2, 1 << 1], OK, Some((&[1, 2], 0xFE))),
        ic("ex fast all", IPI_EX, true, 0, 0, vec![u64::from(v), 1, 0], OK, Some((ALL4, 0xFE))),
        ic("ex fast 11 banks", IPI_EX, true, 11, 0, [vec![u64::from(v), 0, 0x7FF], vec![1; 11]].concat(), OK, Some((&[0], 0xFE))),
        ic("ex fast 12 banks too many", IPI_EX, true, 12, 0, vec![u64::from(v), 0, 0xFFF], BAD, None),
        // The Ex vector is a u32 taken from RDX's low half; the high half is not checked.
        ic("ex fast rdx high half ignored", IPI_EX, true, 1, 0, vec![vec_word(v, 9), 0, 1, 1], OK, Some((&[0], 0xFE))),
        ic("ex fast bad vector", IPI_EX, true, 1, 0, vec![0x100, 0, 1, 1], BAD, None),
    ];
    check_ipi(&cases);
    // Rep forms of both IPI calls.
    let mut reps = Vec::new();
    for (code, var_cnt, words) in [
        (IPI, 0, vec![vec_word(v, 0), 1]),
        (IPI_EX, 1, vec![vec_word(v, 0), 0, 1, 1]),
    ] {
        for rep in [(1, 0), (0, 1), (4095, 4095)] {
            reps.push(IpiCase {
                name: "rep",
                code,
                fast: false,
                var_cnt,
                rep,
                gpa: IN,
                words: words.clone(),
                status: BAD,
                receivers: None,
            });
        }
    }
    check_ipi(&reps);
}

/// KVM's selftest `hyperv_ipi`: receivers with VP indexes 2 and 65, every call form.
#[test]
#[rustfmt::skip] // one call per line: the table of KVM selftest steps
fn kvm_selftest_ipi_sequence() {
    let e = engine_with(HvCpuid::ALL, true, vec![0, 2, 65]);
    let v = 0xFEu64;
    let run = |ctl: u64, rdx: u64, r8: u64, x: Option<[u128; 6]>, words: &[u64], want: &[u32]| {
        poke_words(&e, IN, words);
        assert_eq!(rax(call(&e, VpId(0), ctl, rdx, r8, x)), 0, "{ctl:#x}");
        let rec = e.platform().take_record();
        let got: BTreeSet<VpId> = rec.interrupts.iter().map(|&(vp, _, _)| vp).collect();
        assert_eq!(got, vps(want).into_iter().collect(), "{ctl:#x}");
        assert!(rec.interrupts.iter().all(|&(_, vec, _)| u64::from(vec) == v));
    };
    run(control(IPI, false, 0, 0, 0), IN, 0, None, &[v, 1 << 2], &[1]);
    run(control(IPI, true, 0, 0, 0), v, 1 << 2, None, &[], &[1]);
    run(control(IPI_EX, false, 1, 0, 0), IN, 0, None, &[v, 0, 1, 1 << 2], &[1]);
    run(control(IPI_EX, true, 1, 0, 0), v, 0, Some(xmm(&[1, 1 << 2])), &[], &[1]);
    run(control(IPI_EX, false, 1, 0, 0), IN, 0, None, &[v, 0, 0b10, 1 << 1], &[2]);
    run(control(IPI_EX, true, 1, 0, 0), v, 0, Some(xmm(&[0b10, 1 << 1])), &[], &[2]);
    run(control(IPI_EX, false, 2, 0, 0), IN, 0, None, &[v, 0, 0b11, 1 << 2, 1 << 1], &[1, 2]);
    run(control(IPI_EX, true, 2, 0, 0), v, 0, Some(xmm(&[0b11, 1 << 2, 1 << 1])), &[], &[1, 2]);
    run(control(IPI_EX, false, 0, 0, 0), IN, 0, None, &[v, 1, 0], &[0, 1, 2]);
    run(control(IPI_EX, true, 0, 0, 0), v, 1, Some(xmm(&[0])), &[], &[0, 1, 2]);
}

/// KVM's selftest `hyperv_tlb_flush`: workers with VP indexes 2 and 65, every call in slow and XMM fast form.
#[test]
fn kvm_selftest_flush_sequence() {
    let e = engine_with(HvCpuid::ALL, true, vec![0, 2, 65]);
    const GVA: u64 = 0x1_0000;
    const F: u64 = ALL_SPACES;
    type Case<'a> = (u64, u64, u64, Option<[u128; 6]>, &'a [u64], &'a [u32], u16);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        (control(FLUSH_SPACE, false, 0, 0, 0), IN, 0, None, &[0, F, 1 << 2], &[1], 0),
        (control(FLUSH_SPACE, true, 0, 0, 0), 0, F, Some(xmm(&[1 << 2])), &[], &[1], 0),
        (control(FLUSH_LIST, false, 0, 1, 0), IN, 0, None, &[0, F, 1 << 2, GVA], &[1], 1),
        (control(FLUSH_LIST, true, 0, 1, 0), 0, F, Some(xmm(&[1 << 2, GVA])), &[], &[1], 1),
        (control(FLUSH_SPACE, false, 0, 0, 0), IN, 0, None, &[0, F | ALL_PROCESSORS, 0], &[0, 1, 2], 0),
        (control(FLUSH_LIST, true, 0, 1, 0), 0, F | ALL_PROCESSORS, Some(xmm(&[0, GVA])), &[], &[0, 1, 2], 1),
        (control(FLUSH_SPACE_EX, false, 1, 0, 0), IN, 0, None, &[0, F, 0, 0b10, 1 << 1], &[2], 0),
        (control(FLUSH_SPACE_EX, true, 1, 0, 0), 0, F, Some(xmm(&[0, 0b10, 1 << 1])), &[], &[2], 0),
        (control(FLUSH_LIST_EX, false, 1, 1, 0), IN, 0, None, &[0, F, 0, 0b10, 1 << 1, GVA], &[2], 1),
        (control(FLUSH_LIST_EX, true, 1, 1, 0), 0, F, Some(xmm(&[0, 0b10, 1 << 1, GVA])), &[], &[2], 1),
        (control(FLUSH_SPACE_EX, false, 2, 0, 0), IN, 0, None, &[0, F, 0, 0b11, 1 << 2, 1 << 1], &[1, 2], 0),
        (control(FLUSH_LIST_EX, true, 2, 1, 0), 0, F, Some(xmm(&[0, 0b11, 1 << 2, 1 << 1, GVA])), &[], &[1, 2], 1),
        (control(FLUSH_SPACE_EX, false, 0, 0, 0), IN, 0, None, &[0, F, 1, 0], &[0, 1, 2], 0),
        (control(FLUSH_LIST_EX, true, 0, 1, 0), 0, F, Some(xmm(&[1, 0, GVA])), &[], &[0, 1, 2], 1),
    ];
    for (ctl, rdx, r8, x, words, want, reps) in cases {
        poke_words(&e, IN, words);
        assert_eq!(
            rax(call(&e, VpId(0), ctl, rdx, r8, x)),
            result_value(0, reps),
            "{ctl:#x}"
        );
        let rec = e.platform().take_record();
        assert_eq!(rec.flushes, vec![(VpId(0), vps(want))], "{ctl:#x}");
    }
}

#[test]
fn every_bank_bit_and_holes_with_sparse_vp_indexes() {
    // 128 vCPUs with VP indexes 0, 32, 64, ..., 4064: two per bank, in every bank.
    let indexes: Vec<u32> = (0..128).map(|i| i * 32).collect();
    let e = engine_with(HvCpuid::ALL, false, indexes.clone());
    for bank in 0..64u32 {
        for bit in [0u32, 1, 31, 32, 63] {
            poke_words(&e, IN, &[vec_word(0x40, 0), 0, 1u64 << bank, 1u64 << bit]);
            assert_eq!(
                rax(call(
                    &e,
                    VpId(0),
                    control(IPI_EX, false, 1, 0, 0),
                    IN,
                    0,
                    None
                )),
                0
            );
            let rec = e.platform().take_record();
            let index = bank * 64 + bit;
            let want: Vec<VpId> = indexes
                .iter()
                .position(|&i| i == index)
                .map(|p| VpId(p as u32))
                .into_iter()
                .collect();
            let got: Vec<VpId> = rec.interrupts.iter().map(|&(vp, _, _)| vp).collect();
            assert_eq!(got, want, "bank {bank} bit {bit}");
        }
    }
    // All 64 banks present, every other bank empty (holes inside the packed array).
    let mut words = vec![0, 0, 0, u64::MAX];
    words.extend((0..64).map(|b| if b % 2 == 0 { u64::MAX } else { 0 }));
    poke_words(&e, IN, &words);
    assert_eq!(
        rax(call(
            &e,
            VpId(5),
            control(FLUSH_SPACE_EX, false, 64, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    let rec = e.platform().take_record();
    let want: Vec<VpId> = (0..128u32)
        .filter(|i| (i * 32 / 64) % 2 == 0)
        .map(VpId)
        .collect();
    assert_eq!(rec.flushes, vec![(VpId(5), want)]);
}

#[test]
fn thirty_two_bit_convention_reports_reps_in_edx() {
    let e = engine4();
    poke_words(&e, IN, &[0, 0, 1 << 2, 0x5000, 0x6000, 0x7000]);
    let ctl = control(FLUSH_LIST, false, 0, 3, 0);
    let regs = HypercallRegs {
        mode: CpuMode::Protected32,
        cpl: 0,
        rax: ctl & 0xFFFF_FFFF,
        rdx: ctl >> 32,
        rcx: IN,
        ..HypercallRegs::default()
    };
    assert_eq!(
        e.hypercall(VpId(0), &regs),
        HypercallOutcome::Complete(RegisterWrites {
            rax: 0,
            rdx: Some(3)
        })
    );
    assert_eq!(
        e.platform().record().flushes,
        vec![(VpId(0), vec![VpId(1)])]
    );
}

#[test]
fn enforce_cpuid_gates_and_xmm_ud() {
    use hyperv::guest::{eax3, eax4, edx3};
    let base = HvCpuid {
        interface_eax: tlfs::cpuid::HV_INTERFACE_SIGNATURE,
        features_eax: eax3::HYPERCALL,
        ..HvCpuid::default()
    };
    let with = |eax4_bits: u32, edx3_bits: u32| HvCpuid {
        recommendations_eax: eax4_bits,
        features_edx: edx3_bits,
        ..base
    };
    const UD: Option<u16> = None;
    // (cpuid, code, fast, var_cnt, rep_cnt, expected status or #UD)
    let flush = eax4::REMOTE_TLB_FLUSH;
    let ipi = eax4::CLUSTER_IPI;
    let ex = eax4::EX_PROCESSOR_MASKS;
    let xmm_bit = edx3::XMM_HYPERCALL_INPUT;
    type Row = (HvCpuid, u16, bool, u16, u16, Option<u16>);
    let cases: &[Row] = &[
        (with(0, 0), FLUSH_SPACE, false, 0, 0, Some(6)),
        (with(flush, 0), FLUSH_SPACE, false, 0, 0, Some(0)),
        (with(flush, 0), FLUSH_LIST, false, 0, 1, Some(0)),
        (with(flush, 0), FLUSH_SPACE_EX, false, 0, 0, Some(6)),
        (with(ex, 0), FLUSH_SPACE_EX, false, 0, 0, Some(6)),
        (with(flush | ex, 0), FLUSH_SPACE_EX, false, 0, 0, Some(0)),
        (with(flush | ex, 0), FLUSH_LIST_EX, false, 0, 1, Some(0)),
        (with(flush, 0), FLUSH_SPACE, true, 0, 0, UD),
        (with(flush, 0), FLUSH_LIST, true, 0, 1, UD),
        (with(flush | ex, 0), FLUSH_LIST_EX, true, 0, 1, UD),
        (with(flush, xmm_bit), FLUSH_SPACE, true, 0, 0, Some(0)),
        // The gate comes before the #UD, and the reserved bits in between.
        (with(0, 0), FLUSH_SPACE, true, 0, 0, Some(6)),
        (with(0, 0), IPI, false, 0, 0, Some(6)),
        (with(ipi, 0), IPI, false, 0, 0, Some(3)),
        // Fast 0x000B takes no XMM input: no #UD.
        (with(ipi, 0), IPI, true, 0, 0, Some(3)),
        (with(ipi, 0), IPI_EX, false, 0, 0, Some(6)),
        (with(ipi | ex, 0), IPI_EX, false, 0, 0, Some(0)),
        (with(ipi | ex, 0), IPI_EX, true, 0, 0, UD),
        (with(ipi | ex, xmm_bit), IPI_EX, true, 0, 0, Some(0)),
    ];
    for (i, &(cpuid, code, fast, var_cnt, rep_cnt, want)) in cases.iter().enumerate() {
        let e = engine_with(cpuid, true, vec![0, 1]);
        // Zeroed input: vector 0 for the IPIs, empty or mask-0 sets elsewhere.
        let out = call(
            &e,
            VpId(0),
            control(code, fast, var_cnt, rep_cnt, 0),
            IN,
            0,
            Some([0; 6]),
        );
        let got = match out {
            HypercallOutcome::Complete(w) => Some((w.rax & 0xFFFF) as u16),
            HypercallOutcome::InjectUd => None,
        };
        assert_eq!(got, want, "case {i}: code {code:#x} fast {fast}");
    }
}

#[test]
fn needs_xmm_only_for_fast_xmm_codes() {
    let e = engine4();
    for code in [0u16, 2, 3, 8, 0xB, 0x13, 0x14, 0x15, 0x5C, 0x5D, 0x8001] {
        for fast in [false, true] {
            let regs = HypercallRegs {
                rcx: control(code, fast, 0, 0, 0),
                ..HypercallRegs::default()
            };
            let want = fast && matches!(code, 2 | 3 | 0x13 | 0x14 | 0x15);
            assert_eq!(e.hypercall_needs_xmm(&regs), want, "{code:#x} fast {fast}");
        }
    }
    // Real mode never needs them (#UD).
    let regs = HypercallRegs {
        mode: CpuMode::Real,
        rcx: control(2, true, 0, 0, 0),
        ..HypercallRegs::default()
    };
    assert!(!e.hypercall_needs_xmm(&regs));
    // A VMM that does not supply XMM: fast flush reads a zero mask = all processors.
    assert_eq!(
        rax(call(&e, VpId(0), control(2, true, 0, 0, 0), 0, 0, None)),
        0
    );
    assert_eq!(
        e.platform().take_record().flushes,
        vec![(VpId(0), vps(ALL4))]
    );
}

#[test]
fn kvm_hypercall_when_disabled_or_cpl3() {
    let p = FakePlatform::new(RAM, 2, 1_000_000_000);
    let e = Engine::new(EngineConfig::new(HvCpuid::ALL, false, 2), p).expect("engine");
    // GUEST_OS_ID still 0: a KVM hypercall, nothing flushed.
    let out = call(&e, VpId(0), control(2, false, 0, 0, 0), IN, 0, None);
    assert_eq!(rax(out), hyperv::hypercall::KVM_ENOSYS_RESULT);
    e.write_msr(VpId(0), msr::GUEST_OS_ID, 1).expect("os id");
    let regs = HypercallRegs {
        cpl: 3,
        rcx: control(0x15, false, 0, 0, 0),
        rdx: IN,
        ..HypercallRegs::default()
    };
    assert_eq!(e.hypercall(VpId(0), &regs), HypercallOutcome::InjectUd);
    let rec = e.platform().record();
    assert!(rec.flushes.is_empty() && rec.interrupts.is_empty());
}

#[test]
fn partition_of_1024_vps() {
    let n = 1024u32;
    let e = engine_with(HvCpuid::ALL, true, (0..n).collect());
    let all: Vec<VpId> = (0..n).map(VpId).collect();
    // IPI-Ex to all, format ALL and as 16 full banks: each VP exactly once, in one platform call.
    poke_words(&e, IN, &[0xF0, 1, 0]);
    assert_eq!(
        rax(call(
            &e,
            VpId(7),
            control(IPI_EX, false, 0, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    let mut words = vec![0xF0, 0, 0xFFFF];
    words.extend([u64::MAX; 16]);
    poke_words(&e, IN, &words);
    assert_eq!(
        rax(call(
            &e,
            VpId(7),
            control(IPI_EX, false, 16, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    let rec = e.platform().take_record();
    assert_eq!(rec.ipi_sets, vec![(all.clone(), 0xF0), (all.clone(), 0xF0)]);
    assert_eq!(rec.interrupts.len(), 2 * n as usize);
    // Flush of all VPs, and of a sparse 3-VP subset whose work does not depend on the partition size.
    poke_words(&e, IN, &[0, 0, 1, 0]);
    assert_eq!(
        rax(call(
            &e,
            VpId(3),
            control(FLUSH_SPACE_EX, false, 0, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    let words = [0, 0, 0, (1 << 3) | (1 << 15), 1 << 5, 1 << 63];
    poke_words(&e, IN, &words);
    assert_eq!(
        rax(call(
            &e,
            VpId(3),
            control(FLUSH_SPACE_EX, false, 2, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    let rec = e.platform().take_record();
    assert_eq!(
        rec.flushes,
        vec![(VpId(3), all), (VpId(3), vec![VpId(197), VpId(1023)])]
    );
    // A set naming VPs beyond the partition (bank 16..63) is ignored.
    poke_words(&e, IN, &[0xF0, 0, 1 << 40, u64::MAX]);
    assert_eq!(
        rax(call(
            &e,
            VpId(0),
            control(IPI_EX, false, 1, 0, 0),
            IN,
            0,
            None
        )),
        0
    );
    assert!(e.platform().take_record().interrupts.is_empty());
    // Timing sanity: 1000 sparse 3-VP flushes on the 1024-VP partition stay far below 1000 full ones.
    let t = std::time::Instant::now();
    for _ in 0..1000 {
        call(
            &e,
            VpId(3),
            control(FLUSH_SPACE_EX, false, 2, 0, 0),
            IN,
            0,
            None,
        );
    }
    let sparse = t.elapsed();
    e.platform().take_record();
    poke_words(&e, IN, &[0, 0, 1, 0]);
    let t = std::time::Instant::now();
    for _ in 0..1000 {
        call(
            &e,
            VpId(3),
            control(FLUSH_SPACE_EX, false, 0, 0, 0),
            IN,
            0,
            None,
        );
    }
    let full = t.elapsed();
    assert!(sparse < full, "sparse {sparse:?} vs all {full:?}");
}

#[test]
fn vp_index_table_and_sparse_walk() {
    let t = VpIndexTable::new(&[5, 0, 4095, 4096, 70000]);
    assert_eq!(t.get(5), Some(VpId(0)));
    assert_eq!(t.get(0), Some(VpId(1)));
    assert_eq!(t.get(4095), Some(VpId(2)));
    assert_eq!(t.get(4096), None, "beyond what a set can name");
    assert_eq!(t.get(1), None);
    assert_eq!(t.get(u32::MAX), None);
    assert_eq!(MAX_SET_VP_INDEX, 4095);
    let walk = |mask: u64, banks: &[u64]| {
        let mut v = Vec::new();
        for_each_sparse_vp(mask, banks, |i| v.push(i));
        v
    };
    assert_eq!(walk(0, &[1, 2]), Vec::<u32>::new());
    assert_eq!(walk(0b1010, &[1, 1 << 63]), vec![64, 255]);
    assert_eq!(walk(1 << 63, &[0b11]), vec![4032, 4033]);
    // Banks missing from the slice count as empty.
    assert_eq!(walk(0b111, &[1]), vec![0]);
    assert_eq!(xmm_halves(Some(xmm(&[1, 2, 3]))), {
        let mut h = [0u64; 12];
        h[..3].copy_from_slice(&[1, 2, 3]);
        h
    });
    assert_eq!(xmm_halves(None), [0; 12]);
}

proptest! {
    /// The engine's sparse-set targets equal KVM's per-vCPU membership test (`hv_is_vp_in_sparse_set`) for any
    /// VP-index layout, mask and banks.
    #[test]
    fn sparse_set_matches_kvm_membership(
        indexes in proptest::collection::btree_set(0u32..4200, 1..40),
        mask in any::<u64>(),
        seed in proptest::collection::vec(any::<u64>(), 64),
        fast in any::<bool>(),
    ) {
        let indexes: Vec<u32> = indexes.into_iter().collect();
        let e = engine_with(HvCpuid::ALL, false, indexes.clone());
        let n_banks = mask.count_ones() as usize;
        let banks: Vec<u64> = seed[..n_banks].to_vec();
        let fits_xmm = n_banks <= 11;
        let out = if fast && fits_xmm {
            let mut w = vec![mask];
            w.extend(&banks);
            call(&e, VpId(0), control(IPI_EX, true, n_banks as u16, 0, 0), 0x80, 0, Some(xmm(&w)))
        } else {
            let mut w = vec![0x80, 0, mask];
            w.extend(&banks);
            poke_words(&e, IN, &w);
            call(&e, VpId(0), control(IPI_EX, false, n_banks as u16, 0, 0), IN, 0, None)
        };
        prop_assert_eq!(rax(out), 0);
        let in_set = |vp_index: u32| {
            let bank = vp_index / 64;
            if bank >= 64 || mask & (1u64 << bank) == 0 {
                return false;
            }
            let pos = (mask & ((1u64 << bank) - 1)).count_ones() as usize;
            banks[pos] & (1u64 << (vp_index % 64)) != 0
        };
        let want: BTreeSet<VpId> = indexes
            .iter()
            .enumerate()
            .filter(|&(_, &ix)| in_set(ix))
            .map(|(vcpu, _)| VpId(vcpu as u32))
            .collect();
        let rec = e.platform().take_record();
        let got: Vec<VpId> = rec.interrupts.iter().map(|&(vp, _, _)| vp).collect();
        let got_set: BTreeSet<VpId> = got.iter().copied().collect();
        prop_assert_eq!(got.len(), got_set.len(), "each VP once");
        prop_assert_eq!(got_set, want);
    }
}

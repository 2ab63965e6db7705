//! Engine III: the paravirtual TLB-flush and IPI hypercalls.
//!
//! HvCallFlushVirtualAddressSpace (0x0002), HvCallFlushVirtualAddressList (0x0003, rep), their Ex forms with
//! sparse VP sets (0x0013, 0x0014), HvCallSendSyntheticClusterIpi (0x000B) and HvCallSendSyntheticClusterIpiEx
//! (0x0015), in slow (memory), fast (RDX/R8) and XMM fast (RDX/R8 then XMM0..5) form. Every check follows KVM's
//! `kvm_hv_flush_tlb` / `kvm_hv_send_ipi` in KVM's order; `shared/reference/hyperv-msrs-and-hypercalls.md` §6.9
//! and §6.10 list them.
//!
//! Cost: a call touches only the VPs of its set. A sparse set is walked bit by bit (popcount of the banks) and
//! VP indexes are resolved through a table ([`VpIndexTable`]), so one call to all of 1024 VPs costs O(1024) and
//! a call to 3 VPs costs O(3), whatever the partition size. VP indexes that name no vCPU are ignored, as in KVM.
//!
//! Flushes are always full flushes of the targets (KVM also falls back to a full flush whenever its per-vCPU
//! list overflows; a full flush is a correct implementation of every flush call), so the GVA list, the address
//! space and the flags other than "all processors" only need validating, not interpreting. The extended GVA
//! range format (`HV_FLUSH_USE_EXTENDED_RANGE_FORMAT`, hv-tlbflush-ext) is accepted the same way.

use crate::engine::Engine;
use crate::hypercall::HypercallInput;
use crate::platform::{Platform, VpId};
use tlfs::hypercall::{
    self as hc, IPI_HIGH_VECTOR, IPI_LOW_VECTOR, MAX_SPARSE_VP_BANKS, MAX_XMM_REGISTERS,
    REP_COUNT_SHIFT, TLB_FLUSH_LIST_MAX, VPS_PER_SPARSE_BANK,
};
use tlfs::pages::{
    FlushExInput, FlushInput, SendIpiExInput, SendIpiInput, VpSetHeader, FLUSH_ALL_PROCESSORS,
    VP_SET_ALL, VP_SET_SPARSE_4K,
};
use zerocopy::FromBytes;

/// 8-byte halves of XMM0..5 available to XMM fast input.
pub const XMM_HALVES: usize = 2 * MAX_XMM_REGISTERS;

/// Highest VP index a sparse VP set can name (bank 63, bit 63).
pub const MAX_SET_VP_INDEX: u32 = MAX_SPARSE_VP_BANKS as u32 * VPS_PER_SPARSE_BANK - 1;

/// VP index → vCPU lookup for VP sets: a dense table over the indexes a set can name (0..4095), so resolving
/// one set member is O(1) and never scans the partition.
#[derive(Clone, Debug)]
pub struct VpIndexTable {
    table: Vec<u32>,
}

const NO_VP: u32 = u32::MAX;

impl VpIndexTable {
    /// Builds the table from the VP index of each vCPU (`vp_indexes[vcpu]`). Indexes above
    /// [`MAX_SET_VP_INDEX`] cannot be named by a set and are left out.
    pub fn new(vp_indexes: &[u32]) -> VpIndexTable {
        let len = vp_indexes
            .iter()
            .filter(|&&i| i <= MAX_SET_VP_INDEX)
            .map(|&i| i as usize + 1)
            .max()
            .unwrap_or(0);
        let mut table = vec![NO_VP; len];
        for (vcpu, &index) in vp_indexes.iter().enumerate() {
            if let Some(slot) = table.get_mut(index as usize) {
                *slot = vcpu as u32;
            }
        }
        VpIndexTable { table }
    }

    /// The vCPU with VP index `index`, if any.
    pub fn get(&self, index: u32) -> Option<VpId> {
        match self.table.get(index as usize) {
            Some(&v) if v != NO_VP => Some(VpId(v)),
            _ => None,
        }
    }
}

/// Calls `f` with every VP index in a sparse VP set, in ascending order: bank *i* (bit *i* of
/// `valid_bank_mask`) covers VPs 64·i..64·i+63 and its contents are `banks[popcount(mask below i)]`. Banks
/// missing from `banks` count as empty. Cost: one step per present bank plus one per set bit.
pub fn for_each_sparse_vp(valid_bank_mask: u64, banks: &[u64], mut f: impl FnMut(u32)) {
    let mut mask = valid_bank_mask;
    let mut position = 0usize;
    while mask != 0 {
        let bank = mask.trailing_zeros();
        mask &= mask - 1;
        let Some(&contents) = banks.get(position) else {
            return;
        };
        position += 1;
        let mut bits = contents;
        while bits != 0 {
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            f(bank * VPS_PER_SPARSE_BANK + bit);
        }
    }
}

/// Where the variable part of a hypercall input is read from (KVM's `kvm_hv_get_hc_data`).
struct HcData<'a, P: Platform> {
    platform: &'a P,
    fast: bool,
    ingpa: u64,
    /// XMM0.lo, XMM0.hi, ..., XMM5.hi.
    xmm: [u64; XMM_HALVES],
    /// Slow form: byte offset of the next datum from the input GPA.
    data_offset: u64,
    /// Fast form: XMM halves already used by fixed parameters.
    consumed_xmm_halves: usize,
}

impl<P: Platform> HcData<'_, P> {
    /// Reads a fixed-size input block at the input GPA (slow form).
    fn read_block<T: FromBytes>(&self) -> Option<T> {
        let mut buf = vec![0u8; core::mem::size_of::<T>()];
        self.platform.read_gpa(self.ingpa, &mut buf).ok()?;
        T::read_from_bytes(&buf).ok()
    }

    /// Reads `count` u64 data words into `out` (cleared first). Fast: from the unused XMM halves; more than are
    /// left is an error even when fewer words are wanted (KVM validates the original count). Slow: from
    /// `ingpa + data_offset`; any unreadable byte is an error.
    fn words(&self, count: usize, out: &mut Vec<u64>) -> bool {
        out.clear();
        if self.fast {
            let left = XMM_HALVES.saturating_sub(self.consumed_xmm_halves);
            if count > left {
                return false;
            }
            out.extend_from_slice(
                &self.xmm[self.consumed_xmm_halves..self.consumed_xmm_halves + count],
            );
            return true;
        }
        if count == 0 {
            return true;
        }
        let Some(gpa) = self.ingpa.checked_add(self.data_offset) else {
            return false;
        };
        let mut buf = vec![0u8; count * 8];
        if self.platform.read_gpa(gpa, &mut buf).is_err() {
            return false;
        }
        out.extend(buf.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        }));
        true
    }
}

/// Splits XMM0..5 into the 8-byte halves XMM fast input uses (low half first). Missing XMM values read as 0.
pub fn xmm_halves(xmm: Option<[u128; MAX_XMM_REGISTERS]>) -> [u64; XMM_HALVES] {
    let mut out = [0u64; XMM_HALVES];
    if let Some(regs) = xmm {
        for (i, r) in regs.iter().enumerate() {
            out[2 * i] = *r as u64;
            out[2 * i + 1] = (*r >> 64) as u64;
        }
    }
    out
}

/// The decoded target set of a flush or IPI call.
enum Targets {
    All,
    Sparse {
        valid_bank_mask: u64,
        banks: Vec<u64>,
    },
}

impl<P: Platform> Engine<P> {
    /// Resolves a target set to vCPUs: every vCPU for [`Targets::All`]; for a sparse set the vCPUs whose VP index
    /// is in the set, in ascending vCPU (`VpId`) order, ignoring indexes that name no vCPU.
    fn resolve_targets(&self, targets: &Targets) -> Vec<VpId> {
        match targets {
            Targets::All => (0..self.vp_count() as u32).map(VpId).collect(),
            Targets::Sparse {
                valid_bank_mask,
                banks,
            } => {
                let mut out = Vec::new();
                for_each_sparse_vp(*valid_bank_mask, banks, |index| {
                    if let Some(vp) = self.vp_table.get(index) {
                        out.push(vp);
                    }
                });
                // VP indexes need not follow vCPU order; the platform contract is ascending VpId.
                out.sort_unstable();
                out
            }
        }
    }

    /// The flush calls (0x0002, 0x0003, 0x0013, 0x0014) after the control-word checks of the dispatcher.
    /// Returns the result value (status and reps completed).
    pub(crate) fn hv_flush_tlb(
        &self,
        vp: VpId,
        h: &HypercallInput,
        xmm: Option<[u128; MAX_XMM_REGISTERS]>,
    ) -> u64 {
        let invalid = u64::from(hc::STATUS_INVALID_HYPERCALL_INPUT);
        // KVM's switch: the non-Ex forms take no variable header; the list forms need 1+ reps from index 0; the
        // space forms take no reps at all.
        let list = matches!(
            h.code,
            hc::FLUSH_VIRTUAL_ADDRESS_LIST | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX
        );
        let ex = matches!(
            h.code,
            hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX
        );
        if !ex && h.var_cnt != 0 {
            return invalid;
        }
        if list {
            if h.rep_cnt == 0 || h.rep_idx != 0 {
                return invalid;
            }
        } else if h.rep() {
            return invalid;
        }
        let success = u64::from(hc::STATUS_SUCCESS) | (u64::from(h.rep_cnt) << REP_COUNT_SHIFT);
        let mut data = HcData {
            platform: &self.platform,
            fast: h.fast,
            ingpa: h.ingpa,
            xmm: xmm_halves(xmm),
            data_offset: 0,
            consumed_xmm_halves: 0,
        };
        let mut words = Vec::new();
        let targets = if !ex {
            let (flags, processor_mask) = if h.fast {
                data.consumed_xmm_halves = 1;
                (h.outgpa, data.xmm[0])
            } else {
                let Some(input) = data.read_block::<FlushInput>() else {
                    return invalid;
                };
                data.data_offset = core::mem::size_of::<FlushInput>() as u64;
                (input.flags, input.processor_mask)
            };
            // KVM: an empty processor mask means all processors too (a Windows Server 2012 workaround).
            if flags & FLUSH_ALL_PROCESSORS != 0 || processor_mask == 0 {
                Targets::All
            } else {
                Targets::Sparse {
                    valid_bank_mask: 1,
                    banks: vec![processor_mask],
                }
            }
        } else {
            let set = if h.fast {
                data.consumed_xmm_halves = 2;
                VpSetHeader {
                    format: data.xmm[0],
                    valid_bank_mask: data.xmm[1],
                }
            } else {
                #[derive(FromBytes)]
                #[repr(C)]
                struct Header {
                    flush: FlushExInput,
                    set: VpSetHeader,
                }
                let Some(header) = data.read_block::<Header>() else {
                    return invalid;
                };
                data.data_offset = core::mem::size_of::<Header>() as u64;
                header.set
            };
            if u32::from(h.var_cnt) != set.valid_bank_mask.count_ones() {
                return invalid;
            }
            // Any format other than SPARSE_4K means all VPs for the flush calls.
            let all = set.format != VP_SET_SPARSE_4K;
            let targets = if all {
                Targets::All
            } else {
                if h.var_cnt == 0 {
                    return success;
                }
                if !data.words(usize::from(h.var_cnt), &mut words) {
                    return invalid;
                }
                Targets::Sparse {
                    valid_bank_mask: set.valid_bank_mask,
                    banks: std::mem::take(&mut words),
                }
            };
            // The GVA list follows the banks even for format ALL.
            if h.fast {
                data.consumed_xmm_halves += usize::from(h.var_cnt);
            } else {
                data.data_offset += u64::from(h.var_cnt) * 8;
            }
            targets
        };
        // KVM reads (and so validates) the GVA list only when it fits its per-vCPU FIFO; a longer list is a full
        // flush without reading it. The list's contents do not matter here: every flush is a full flush.
        if list
            && h.rep_cnt <= TLB_FLUSH_LIST_MAX
            && !data.words(usize::from(h.rep_cnt), &mut words)
        {
            return invalid;
        }
        let vps = self.resolve_targets(&targets);
        if !vps.is_empty() {
            self.platform.flush_remote_tlb(vp, &vps);
        }
        success
    }

    /// HvCallSendSyntheticClusterIpi (0x000B) and HvCallSendSyntheticClusterIpiEx (0x0015) after the
    /// control-word checks of the dispatcher. Returns the status.
    pub(crate) fn hv_send_ipi(
        &self,
        h: &HypercallInput,
        xmm: Option<[u128; MAX_XMM_REGISTERS]>,
    ) -> u16 {
        let invalid = hc::STATUS_INVALID_HYPERCALL_INPUT;
        let ex = h.code == hc::SEND_SYNTHETIC_CLUSTER_IPI_EX;
        if !ex && h.var_cnt != 0 {
            return invalid;
        }
        if h.rep() {
            return invalid;
        }
        let mut data = HcData {
            platform: &self.platform,
            fast: h.fast,
            ingpa: h.ingpa,
            xmm: xmm_halves(xmm),
            data_offset: 0,
            consumed_xmm_halves: 0,
        };
        let (vector, targets) = if !ex {
            let (vector, mask) = if h.fast {
                // The reserved upper half of the first input must be 0.
                if h.ingpa >> 32 != 0 {
                    return invalid;
                }
                (h.ingpa as u32, h.outgpa)
            } else {
                let Some(input) = data.read_block::<SendIpiInput>() else {
                    return invalid;
                };
                (input.vector, input.cpu_mask)
            };
            (
                vector,
                Targets::Sparse {
                    valid_bank_mask: 1,
                    banks: vec![mask],
                },
            )
        } else {
            let (vector, set) = if h.fast {
                (
                    h.ingpa as u32,
                    VpSetHeader {
                        format: h.outgpa,
                        valid_bank_mask: data.xmm[0],
                    },
                )
            } else {
                #[derive(FromBytes)]
                #[repr(C)]
                struct Header {
                    ipi: SendIpiExInput,
                    set: VpSetHeader,
                }
                let Some(header) = data.read_block::<Header>() else {
                    return invalid;
                };
                (header.ipi.vector, header.set)
            };
            if u32::from(h.var_cnt) != set.valid_bank_mask.count_ones() {
                return invalid;
            }
            // Only format ALL means all VPs here; any other format is decoded as a sparse set (KVM).
            if set.format == VP_SET_ALL {
                (vector, Targets::All)
            } else {
                if h.var_cnt == 0 {
                    // An empty set succeeds without looking at the vector.
                    return hc::STATUS_SUCCESS;
                }
                if h.fast {
                    data.consumed_xmm_halves = 1;
                } else {
                    data.data_offset = core::mem::size_of::<SendIpiExInput>() as u64
                        + core::mem::size_of::<VpSetHeader>() as u64;
                }
                let mut banks = Vec::new();
                if !data.words(usize::from(h.var_cnt), &mut banks) {
                    return invalid;
                }
                (
                    vector,
                    Targets::Sparse {
                        valid_bank_mask: set.valid_bank_mask,
                        banks,
                    },
                )
            }
        };
        if !(IPI_LOW_VECTOR..=IPI_HIGH_VECTOR).contains(&vector) {
            return invalid;
        }
        let vps = self.resolve_targets(&targets);
        if !vps.is_empty() {
            // The range check above makes the vector fit in a u8.
            self.platform.deliver_interrupt_set(&vps, vector as u8);
        }
        hc::STATUS_SUCCESS
    }
}

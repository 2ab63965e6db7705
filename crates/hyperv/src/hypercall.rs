//! Hypercall dispatch: register snapshot in, register values out.
//!
//! The VMM calls [`Engine::hypercall`] when the guest executes the `out` in the hypercall page (see
//! [`crate::hcpage`]). Checks run in KVM's order (`kvm_hv_hypercall`):
//! 1. CPL != 0 or real mode → #UD.
//! 2. With hv-enforce-cpuid, the call's CPUID gate ([`hypercall_cpuid_allowed`]) → ACCESS_DENIED.
//! 3. Reserved control bits → INVALID_HYPERCALL_INPUT.
//! 4. Fast XMM-input calls with hv-enforce-cpuid and no hv-xmm-input → #UD.
//! 5. Per-call handling; unknown codes → INVALID_HYPERCALL_CODE. Input/output GPAs are validated only by the calls
//!    that use them (some guests leave garbage in R8 for calls without output).
//!
//! A hypercall made while Hyper-V identification is off or GUEST_OS_ID is 0 is not a Hyper-V hypercall in KVM:
//! it is a KVM hypercall, which returns -KVM_ENOSYS (-KVM_EPERM at CPL > 0) in RAX.

use crate::engine::Engine;
use crate::guest::{eax4, ebx3, edx3, HvCpuid, SYNDBG_ALLOW_KERNEL_DEBUGGING};
use crate::platform::{Platform, VpId};
use std::sync::Arc;
use tlfs::hypercall::{self as hc, Control, CONTROL_RESERVED_MASK, REP_COUNT_SHIFT};
use tlfs::pages::{PostMessageInput, PAGE_SIZE};
use zerocopy::FromBytes;

/// -KVM_ENOSYS as KVM returns it for an unknown KVM hypercall.
pub const KVM_ENOSYS_RESULT: u64 = (-1000i64) as u64;
/// -KVM_EPERM as KVM returns it for a KVM hypercall at CPL > 0.
pub const KVM_EPERM_RESULT: u64 = (-1i64) as u64;

/// The processor mode at the hypercall, which selects the register convention.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode (CR0.PE = 0) or virtual-8086 mode: hypercalls raise #UD.
    Real,
    /// Protected mode, including compatibility mode: the 32-bit convention (EDX:EAX control and result,
    /// EBX:ECX input, EDI:ESI output).
    Protected32,
    /// 64-bit mode (EFER.LMA and CS.L): RCX control, RDX input, R8 output, RAX result.
    #[default]
    Long64,
}

/// The guest registers at the hypercall (from `KVM_CAP_SYNC_REGS`; XMM only when [`Engine::hypercall_needs_xmm`]
/// says so, since reading them costs an extra ioctl).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallRegs {
    /// Processor mode.
    pub mode: CpuMode,
    /// Current privilege level (CS.DPL / SS.DPL).
    pub cpl: u8,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    /// XMM0..5 (low 128 bits), for XMM fast input.
    pub xmm: Option<[u128; 6]>,
}

/// What the VMM must do after a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallOutcome {
    /// Write these registers and resume.
    Complete(RegisterWrites),
    /// Inject #UD (no register changes).
    InjectUd,
}

/// Register values to write back. Only the listed registers change; everything else is preserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterWrites {
    /// New RAX (64-bit: the result value; 32-bit: the low half of the result, zero-extended).
    pub rax: u64,
    /// New RDX (32-bit convention only: the high half of the result).
    pub rdx: Option<u64>,
}

/// The decoded control word and parameters, convention-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypercallInput {
    /// The raw control word.
    pub control: u64,
    /// Call code.
    pub code: u16,
    /// Fast (register) input.
    pub fast: bool,
    /// Variable header size (8-byte units).
    pub var_cnt: u16,
    /// Rep count.
    pub rep_cnt: u16,
    /// Rep start index.
    pub rep_idx: u16,
    /// Input GPA, or fast input 1.
    pub ingpa: u64,
    /// Output GPA, or fast input 2.
    pub outgpa: u64,
}

impl HypercallInput {
    /// Decodes the control word and the two parameters.
    pub fn decode(control: u64, ingpa: u64, outgpa: u64) -> HypercallInput {
        let c = Control::from_bits(control);
        HypercallInput {
            control,
            code: c.code(),
            fast: c.fast(),
            var_cnt: c.var_header_size(),
            rep_cnt: c.rep_count(),
            rep_idx: c.rep_start(),
            ingpa,
            outgpa,
        }
    }

    /// A rep call: rep count or rep start non-zero (KVM's `hc.rep`).
    pub fn rep(&self) -> bool {
        self.rep_cnt != 0 || self.rep_idx != 0
    }

    /// Any reserved control bit set.
    pub fn reserved_bits(&self) -> bool {
        self.control & CONTROL_RESERVED_MASK != 0
    }

    /// Extracts the inputs from the registers with the mode's convention (`None` in real mode).
    pub fn from_regs(regs: &HypercallRegs) -> Option<HypercallInput> {
        let lo = |r: u64| r & 0xFFFF_FFFF;
        match regs.mode {
            CpuMode::Long64 => Some(HypercallInput::decode(regs.rcx, regs.rdx, regs.r8)),
            CpuMode::Protected32 => Some(HypercallInput::decode(
                (lo(regs.rdx) << 32) | lo(regs.rax),
                (lo(regs.rbx) << 32) | lo(regs.rcx),
                (lo(regs.rdi) << 32) | lo(regs.rsi),
            )),
            CpuMode::Real => None,
        }
    }
}

/// A result value: status in bits 15:0, reps completed in bits 43:32.
pub fn result_value(status: u16, reps_completed: u16) -> u64 {
    u64::from(status) | (u64::from(reps_completed & 0xFFF) << REP_COUNT_SHIFT)
}

/// The codes whose fast form takes XMM input (KVM's `is_xmm_fast_hypercall`).
pub fn is_xmm_fast_code(code: u16) -> bool {
    matches!(
        code,
        hc::FLUSH_VIRTUAL_ADDRESS_SPACE
            | hc::FLUSH_VIRTUAL_ADDRESS_LIST
            | hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX
            | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX
            | hc::SEND_SYNTHETIC_CLUSTER_IPI_EX
    )
}

/// Whether the enforce table (KVM's `hv_check_hypercall_access`) lets the guest make call `code`; only consulted
/// with `hv-enforce-cpuid`. Unknown codes pass (they fail later with INVALID_HYPERCALL_CODE).
pub fn hypercall_cpuid_allowed(c: &HvCpuid, code: u16) -> bool {
    let r = |bit: u32| c.recommendations_eax & bit != 0;
    let b = |bit: u32| c.features_ebx & bit != 0;
    match code {
        hc::FLUSH_VIRTUAL_ADDRESS_SPACE | hc::FLUSH_VIRTUAL_ADDRESS_LIST => {
            r(eax4::REMOTE_TLB_FLUSH)
        }
        hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX => {
            r(eax4::REMOTE_TLB_FLUSH) && r(eax4::EX_PROCESSOR_MASKS)
        }
        hc::NOTIFY_LONG_SPIN_WAIT => c.spinlock_retries != 0 && c.spinlock_retries != u32::MAX,
        hc::SEND_SYNTHETIC_CLUSTER_IPI => r(eax4::CLUSTER_IPI),
        hc::SEND_SYNTHETIC_CLUSTER_IPI_EX => r(eax4::CLUSTER_IPI) && r(eax4::EX_PROCESSOR_MASKS),
        hc::POST_MESSAGE => b(ebx3::POST_MESSAGES),
        hc::SIGNAL_EVENT => b(ebx3::SIGNAL_EVENTS),
        hc::POST_DEBUG_DATA | hc::RETRIEVE_DEBUG_DATA | hc::RESET_DEBUG_SESSION => {
            c.syndbg_eax & SYNDBG_ALLOW_KERNEL_DEBUGGING == 0 || b(ebx3::DEBUGGING)
        }
        hc::EXT_QUERY_CAPABILITIES..=hc::EXT_CALL_MAX => b(ebx3::EXTENDED_HYPERCALLS),
        _ => true,
    }
}

fn complete(mode: CpuMode, result: u64) -> HypercallOutcome {
    HypercallOutcome::Complete(match mode {
        CpuMode::Long64 | CpuMode::Real => RegisterWrites {
            rax: result,
            rdx: None,
        },
        CpuMode::Protected32 => RegisterWrites {
            rax: result & 0xFFFF_FFFF,
            rdx: Some(result >> 32),
        },
    })
}

fn status(s: u16) -> Result<u64, HypercallFault> {
    Ok(u64::from(s))
}

/// A call that ends with an exception instead of a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HypercallFault {
    Ud,
}

impl<P: Platform> Engine<P> {
    /// Whether hypercalls are Hyper-V hypercalls right now (identification on and GUEST_OS_ID non-zero).
    pub fn hypercalls_enabled(&self) -> bool {
        self.config.cpuid.enabled() && self.part().guest_os_id != 0
    }

    /// Whether the VMM must read XMM0..5 into [`HypercallRegs::xmm`] before calling [`Engine::hypercall`] for
    /// these registers: a fast call of 0x0002, 0x0003, 0x0013, 0x0014 or 0x0015, whose inputs continue in
    /// XMM0..5. Like KVM, the engine uses XMM input for these whether or not hv-xmm-input is offered (only
    /// hv-enforce-cpuid turns a fast call without it into #UD). `xmm: None` for such a call reads as zeros.
    pub fn hypercall_needs_xmm(&self, regs: &HypercallRegs) -> bool {
        match HypercallInput::from_regs(regs) {
            Some(input) => input.fast && is_xmm_fast_code(input.code),
            None => false,
        }
    }

    /// Runs the hypercall VP `vp` made through the hypercall page. Never panics; every guest error becomes a
    /// status or an exception.
    pub fn hypercall(&self, vp: VpId, regs: &HypercallRegs) -> HypercallOutcome {
        let mode = regs.mode;
        if !self.hypercalls_enabled() || self.vp(vp).is_none() {
            // A KVM hypercall, not a Hyper-V one.
            let ret = if regs.cpl != 0 {
                KVM_EPERM_RESULT
            } else {
                KVM_ENOSYS_RESULT
            };
            let ret = if mode == CpuMode::Long64 {
                ret
            } else {
                ret & 0xFFFF_FFFF
            };
            return HypercallOutcome::Complete(RegisterWrites {
                rax: ret,
                rdx: None,
            });
        }
        let Some(input) = HypercallInput::from_regs(regs) else {
            return HypercallOutcome::InjectUd;
        };
        if regs.cpl != 0 {
            return HypercallOutcome::InjectUd;
        }
        match self.dispatch(vp, &input, regs) {
            Ok(result) => complete(mode, result),
            Err(HypercallFault::Ud) => HypercallOutcome::InjectUd,
        }
    }

    fn dispatch(
        &self,
        vp: VpId,
        h: &HypercallInput,
        regs: &HypercallRegs,
    ) -> Result<u64, HypercallFault> {
        let c = &self.config.cpuid;
        let enforce = self.config.enforce_cpuid;
        if enforce && !hypercall_cpuid_allowed(c, h.code) {
            return status(hc::STATUS_ACCESS_DENIED);
        }
        if h.reserved_bits() {
            return status(hc::STATUS_INVALID_HYPERCALL_INPUT);
        }
        if h.fast
            && is_xmm_fast_code(h.code)
            && enforce
            && c.features_edx & edx3::XMM_HYPERCALL_INPUT == 0
        {
            return Err(HypercallFault::Ud);
        }
        match h.code {
            hc::FLUSH_VIRTUAL_ADDRESS_SPACE
            | hc::FLUSH_VIRTUAL_ADDRESS_LIST
            | hc::FLUSH_VIRTUAL_ADDRESS_SPACE_EX
            | hc::FLUSH_VIRTUAL_ADDRESS_LIST_EX => Ok(self.hv_flush_tlb(vp, h, regs.xmm)),
            hc::SEND_SYNTHETIC_CLUSTER_IPI | hc::SEND_SYNTHETIC_CLUSTER_IPI_EX => {
                status(self.hv_send_ipi(h, regs.xmm))
            }
            hc::NOTIFY_LONG_SPIN_WAIT => {
                if h.rep() || h.var_cnt != 0 {
                    return status(hc::STATUS_INVALID_HYPERCALL_INPUT);
                }
                self.platform.yield_vp(vp);
                status(hc::STATUS_SUCCESS)
            }
            hc::POST_MESSAGE => status(self.hv_post_message(vp, h)),
            hc::SIGNAL_EVENT => status(self.hv_signal_event(vp, h)),
            hc::POST_DEBUG_DATA | hc::RETRIEVE_DEBUG_DATA | hc::RESET_DEBUG_SESSION => {
                // KVM: fast → INVALID_PARAMETER (not for ResetDebugSession); SynDbg not enabled (0x82.EAX[1]) →
                // INVALID_HYPERCALL_CODE; SYNDBG_OPTIONS bit 2 ("use hypercalls") clear → OPERATION_DENIED. The
                // SYNDBG MSRs are not implemented, so that bit can never be set.
                if h.fast && h.code != hc::RESET_DEBUG_SESSION {
                    status(hc::STATUS_INVALID_PARAMETER)
                } else if c.syndbg_eax & SYNDBG_ALLOW_KERNEL_DEBUGGING == 0 {
                    status(hc::STATUS_INVALID_HYPERCALL_CODE)
                } else {
                    status(hc::STATUS_OPERATION_DENIED)
                }
            }
            hc::EXT_QUERY_CAPABILITIES..=hc::EXT_CALL_MAX => {
                // KVM forwards them to userspace; QEMU answers INVALID_HYPERCALL_CODE.
                status(if h.fast {
                    hc::STATUS_INVALID_PARAMETER
                } else {
                    hc::STATUS_INVALID_HYPERCALL_CODE
                })
            }
            _ => status(hc::STATUS_INVALID_HYPERCALL_CODE),
        }
    }

    /// HvCallPostMessage: KVM's checks, then QEMU's (`hyperv_hcall_post_message`). Uses the input GPA only.
    fn hv_post_message(&self, vp: VpId, h: &HypercallInput) -> u16 {
        if h.rep() || h.var_cnt != 0 || !self.config.synic {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        }
        if h.fast {
            return hc::STATUS_INVALID_HYPERCALL_CODE;
        }
        if h.ingpa & 7 != 0 {
            return hc::STATUS_INVALID_ALIGNMENT;
        }
        let mut buf = [0u8; hc::POST_MESSAGE_INPUT_SIZE];
        if self.platform.read_gpa(h.ingpa, &mut buf).is_err() {
            return hc::STATUS_INSUFFICIENT_MEMORY;
        }
        let Ok(msg) = PostMessageInput::read_from_bytes(&buf[..]) else {
            return hc::STATUS_INSUFFICIENT_MEMORY;
        };
        if msg.payload_size > hc::MESSAGE_PAYLOAD_MAX {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        }
        let handler: Option<Arc<dyn crate::MessageConnection>> = {
            let conns = self.connections.read().unwrap_or_else(|e| e.into_inner());
            conns
                .messages
                .get(&(msg.connection_id & hc::CONNECTION_ID_MASK))
                .cloned()
        };
        match handler {
            Some(handler) => handler.post_message(
                vp,
                msg.message_type,
                &msg.payload[..msg.payload_size as usize],
            ),
            None => hc::STATUS_INVALID_CONNECTION_ID,
        }
    }

    /// HvCallSignalEvent: KVM's checks (there are no in-kernel eventfds here, so every connection goes the
    /// userspace way), then QEMU's. Slow calls use the input GPA only; fast calls no GPA.
    fn hv_signal_event(&self, vp: VpId, h: &HypercallInput) -> u16 {
        if h.rep() || h.var_cnt != 0 {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        }
        let mut param = h.ingpa;
        if !h.fast {
            let gpa = h.ingpa;
            if gpa & 7 != 0 || (gpa & (PAGE_SIZE - 1)) + 8 > PAGE_SIZE {
                return hc::STATUS_INVALID_ALIGNMENT;
            }
            let mut b = [0u8; 8];
            if self.platform.read_gpa(gpa, &mut b).is_err() {
                return hc::STATUS_INVALID_ALIGNMENT;
            }
            param = u64::from_le_bytes(b);
        }
        // KVM: any failure other than a valid in-kernel connection falls through to the PostMessage path, which
        // refuses when the SynIC is not active.
        if !self.config.synic {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        }
        let input = hc::SignalEventInput::from_bits(param);
        if input.flag_number() != 0 {
            return hc::STATUS_INVALID_PORT_ID;
        }
        if param & !u64::from(hc::CONNECTION_ID_MASK) != 0 {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        }
        let handler = {
            let conns = self.connections.read().unwrap_or_else(|e| e.into_inner());
            conns.events.get(&input.connection_id()).cloned()
        };
        match handler {
            Some(handler) => handler.signal_event(vp),
            None => hc::STATUS_INVALID_CONNECTION_ID,
        }
    }
}

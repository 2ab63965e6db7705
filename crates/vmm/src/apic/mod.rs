//! The userspace local APIC (xAPIC MMIO and x2APIC MSRs), owned by the VMM instead of KVM's in-kernel one.
//!
//! This module is a pure, deterministic model of one local APIC. It knows nothing about KVM, threads or
//! clocks: every operation that depends on time takes `now_ns`, the current value of a monotonic host clock in
//! nanoseconds, and TSC-deadline operations also take `now_tsc`, the guest TSC read at the same instant. The
//! machine (vCPU threads, exits, injection) owns one [`LocalApic`] per vCPU, typically behind a mutex, and
//! drives it as follows.
//!
//! # How the machine drives it
//!
//! * **Register access.** xAPIC MMIO exits inside `[mmio_base(), mmio_base() + 0x1000)` go to
//!   [`LocalApic::mmio_read`] / [`LocalApic::mmio_write`]; [`LocalApic::mmio_base`] is `None` when the APIC is
//!   disabled or in x2APIC mode (then the page is ordinary unassigned MMIO). MSRs 0x800..=0x8FF go to
//!   [`LocalApic::msr_read`] / [`LocalApic::msr_write`] (a `Err(Gp)` means inject #GP). IA32_APIC_BASE (0x1B) goes
//!   to [`LocalApic::read_apic_base`] / [`LocalApic::write_apic_base`]; IA32_TSC_DEADLINE (0x6E0) to
//!   [`LocalApic::read_tsc_deadline`] / [`LocalApic::write_tsc_deadline`]. The Hyper-V EOI/ICR/TPR MSRs
//!   (0x40000070..=0x40000072) go to [`LocalApic::hv_vapic_msr_read`] / [`LocalApic::hv_vapic_msr_write`], which
//!   work in xAPIC and x2APIC mode alike, as in KVM.
//! * **Effects.** Every write returns an [`ApicEffects`]: an IPI to route ([`ApicEffects::ipi`]), the vector
//!   that was EOI'd ([`ApicEffects::eoi`]), whether the interrupt state changed ([`ApicEffects::reevaluate`]:
//!   look at [`LocalApic::pending_interrupt`] again) and whether the next timer deadline may have changed
//!   ([`ApicEffects::timer_changed`]: re-arm the host timer from [`LocalApic::next_timer_deadline_ns`]).
//! * **IPI routing.** For an [`Ipi`] the machine calls [`LocalApic::matches_destination`] on every APIC (with
//!   [`Ipi::source_id`]) and [`LocalApic::deliver`] on each one that matches. Lowest-priority IPIs are
//!   delivered as fixed to the matching APIC with the lowest APIC ID (KVM without vector hashing does something
//!   similar; any matching APIC is architecturally valid). Physical broadcast (0xFF in xAPIC mode, 0xFFFF_FFFF
//!   in x2APIC mode) and logical broadcast are already turned into [`Destination::AllIncludingSelf`] when the
//!   ICR is decoded.
//! * **Injection.** When the vCPU can take an interrupt, [`LocalApic::pending_interrupt`] gives the vector to
//!   inject with `KVM_INTERRUPT`; the machine then calls [`LocalApic::ack_interrupt`] for it (IRR → ISR, as the
//!   CPU's interrupt acknowledge cycle does).
//! * **INIT / SIPI / NMI.** [`LocalApic::deliver`] latches them; the vCPU thread consumes them with
//!   [`LocalApic::take_init`] (then call [`LocalApic::init_reset`], reset the vCPU and enter wait-for-SIPI; the
//!   BSP stays runnable, as in KVM), [`LocalApic::take_sipi`] (honour it only in wait-for-SIPI) and
//!   [`LocalApic::take_nmi`]. An INIT discards a SIPI latched before it, so checking `take_init` before
//!   `take_sipi` gives the right order.
//! * **Timer.** Arm one host timer per vCPU at [`LocalApic::next_timer_deadline_ns`] and call
//!   [`LocalApic::timer_tick`] when it expires (early or spurious calls are harmless). Periodic mode re-arms
//!   from the previous deadline, so there is no drift; missed periods are skipped, not queued. As in KVM, a
//!   periodic timer's period is at least [`MIN_PERIODIC_NS`] (200 µs), whatever the initial count.
//! * **CR8.** Without an in-kernel APIC, KVM keeps CR8 in `kvm_run.cr8`: after each exit call
//!   [`LocalApic::set_cr8`] with it, and before each entry store [`LocalApic::cr8`] there.
//! * **Guest TSC writes.** Call [`LocalApic::resync_tsc`] so an armed TSC deadline follows the new TSC.
//! * **Hyper-V hooks.** [`LocalApic::set_auto_eoi`] marks vectors (SynIC SINTs with auto-EOI) that
//!   [`LocalApic::ack_interrupt`] does not leave in the ISR. Every EOI (MMIO, x2APIC MSR, Hyper-V EOI MSR, or
//!   the engine calling [`LocalApic::eoi`] for an exit-less PV-EOI) reports the vector in [`ApicEffects::eoi`] /
//!   the return value of [`LocalApic::eoi`]: this is the EOI observer through which the engine redelivers
//!   pending SynIC messages. [`LocalApic::highest_irr`], [`LocalApic::isr_count`] and
//!   [`LocalApic::is_level_triggered`] give what the exit-less EOI decision needs.
//! * **Snapshots.** [`LocalApic::save`] / [`LocalApic::restore`] use [`ApicState`], whose timer fields are
//!   relative to the clock passed in, so a state can be restored in another process.
//!
//! # Model limits (deliberate)
//!
//! No CMCI LVT (version 0x0005_0014: six LVT entries), no EOI-broadcast suppression, no LINT0/LINT1 or
//! thermal/performance-monitoring interrupt sources (the registers are stored), no "illegal register address"
//! error (reads have no side effects), SMI IPIs are dropped. x2APIC registers follow KVM where KVM and the SDM
//! differ: EOI accepts any value in bits 31:0; SELF_IPI #GPs on bits 31:8 and the ICR on its reserved bits;
//! other registers drop reserved bits. Unlike KVM, globally disabling the APIC resets its registers (SDM) and
//! the BSP bit of IA32_APIC_BASE is not guest-writable.

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;

/// IA32_APIC_BASE (MSR 0x1B).
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE (MSR 0x6E0).
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC MSR.
pub const X2APIC_MSR_FIRST: u32 = 0x800;
/// Last x2APIC MSR (inclusive).
pub const X2APIC_MSR_LAST: u32 = 0x8FF;
/// Hyper-V HV_X64_MSR_EOI.
pub const HV_MSR_EOI: u32 = 0x4000_0070;
/// Hyper-V HV_X64_MSR_ICR.
pub const HV_MSR_ICR: u32 = 0x4000_0071;
/// Hyper-V HV_X64_MSR_TPR.
pub const HV_MSR_TPR: u32 = 0x4000_0072;
/// Default xAPIC base address.
pub const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;
/// Size of the xAPIC MMIO page.
pub const APIC_MMIO_SIZE: u64 = 0x1000;

/// IA32_APIC_BASE bit 8: this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: APIC globally enabled.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// The value of the version register: integrated APIC (0x14), six LVT entries (max LVT index 5).
pub const APIC_VERSION: u32 = 0x0005_0014;

/// ESR bit 5: the APIC tried to send an illegal vector (0..=15).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: the APIC received an illegal vector (0..=15).
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;

/// xAPIC register offsets in the MMIO page (x2APIC MSR = 0x800 + offset / 16).
pub mod reg {
    /// Local APIC ID.
    pub const ID: u64 = 0x20;
    /// Version.
    pub const VERSION: u64 = 0x30;
    /// Task priority.
    pub const TPR: u64 = 0x80;
    /// Arbitration priority (xAPIC only).
    pub const APR: u64 = 0x90;
    /// Processor priority.
    pub const PPR: u64 = 0xA0;
    /// End of interrupt (write only).
    pub const EOI: u64 = 0xB0;
    /// Remote read (xAPIC only, reads 0).
    pub const RRD: u64 = 0xC0;
    /// Logical destination.
    pub const LDR: u64 = 0xD0;
    /// Destination format (xAPIC only).
    pub const DFR: u64 = 0xE0;
    /// Spurious interrupt vector.
    pub const SVR: u64 = 0xF0;
    /// In-service register, 8 x 32 bits at 0x100, 0x110, ...
    pub const ISR: u64 = 0x100;
    /// Trigger mode register, 8 x 32 bits.
    pub const TMR: u64 = 0x180;
    /// Interrupt request register, 8 x 32 bits.
    pub const IRR: u64 = 0x200;
    /// Error status.
    pub const ESR: u64 = 0x280;
    /// LVT corrected machine check (not implemented).
    pub const LVT_CMCI: u64 = 0x2F0;
    /// Interrupt command, low half.
    pub const ICR_LOW: u64 = 0x300;
    /// Interrupt command, high half (xAPIC only).
    pub const ICR_HIGH: u64 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u64 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u64 = 0x330;
    /// LVT performance monitoring counters.
    pub const LVT_PERFMON: u64 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u64 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u64 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u64 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u64 = 0x380;
    /// Timer current count (read only).
    pub const TIMER_CURRENT: u64 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u64 = 0x3E0;
    /// Self IPI (x2APIC only, write only).
    pub const SELF_IPI: u64 = 0x3F0;
}

/// LVT bit 16: masked.
pub const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_SHIFT: u32 = 17;
const LVT_TIMER_MODE_MASK: u32 = 3 << LVT_TIMER_MODE_SHIFT;
const LVT_INDEX_TIMER: usize = 0;
const LVT_INDEX_ERROR: usize = 5;
/// Writable bits of each LVT, in the order timer, thermal, perfmon, LINT0, LINT1, error.
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00FF,
    0x0001_07FF,
    0x0001_07FF,
    0x0001_A7FF,
    0x0001_A7FF,
    0x0001_00FF,
];
const SVR_WRITABLE: u32 = 0x3FF;
const SVR_ENABLE: u32 = 1 << 8;
const ICR_BUSY: u64 = 1 << 12;
/// x2APIC ICR bits that #GP when set (KVM's X2APIC_ICR_RESERVED_BITS).
const X2APIC_ICR_RESERVED: u64 = 0xFFF0_0000 | (3 << 16) | (1 << 13);
const XAPIC_ICR_LOW_WRITABLE: u32 = 0x000C_CFFF;
const NS_PER_SEC: u128 = 1_000_000_000;

/// The shortest period of a periodic APIC timer, as KVM's `min_timer_period_us` (200 µs by default): a guest
/// cannot make a host timer fire more often (KVM's reason: host timers are not throttled by the scheduler).
pub const MIN_PERIODIC_NS: u64 = 200_000;

/// A general-protection fault: the machine injects #GP(0) into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("general protection fault")]
pub struct Gp;

/// Why [`LocalApic::restore`] refused a state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The state belongs to another APIC.
    #[error("APIC state is for APIC ID {found}, this APIC has ID {expected}")]
    WrongApicId {
        /// This APIC's initial ID.
        expected: u32,
        /// The ID in the state.
        found: u32,
    },
    /// The APIC base value is not a reachable state for this APIC.
    #[error("invalid IA32_APIC_BASE value {0:#x} in APIC state")]
    InvalidApicBase(u64),
}

/// Static configuration of one local APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApicConfig {
    /// The APIC timer's input clock in Hz before the divider; what HV_X64_MSR_APIC_FREQUENCY reports
    /// (1_000_000_000 by default). Zero is treated as 1.
    pub bus_freq_hz: u64,
    /// The guest TSC frequency in Hz, for TSC-deadline mode. Zero is treated as 1.
    pub tsc_freq_hz: u64,
    /// Whether the guest may enable x2APIC mode (CPUID.1:ECX bit 21).
    pub x2apic_allowed: bool,
    /// Whether this is the bootstrap processor (IA32_APIC_BASE bit 8).
    pub bsp: bool,
    /// The guest's physical address width (CPUID 0x80000008 EAX bits 7:0); base bits at and above it are reserved.
    /// Values outside 32..=52 are clamped into that range.
    pub phys_addr_bits: u8,
}

impl Default for ApicConfig {
    fn default() -> Self {
        ApicConfig {
            bus_freq_hz: 1_000_000_000,
            tsc_freq_hz: 1_000_000_000,
            x2apic_allowed: true,
            bsp: false,
            phys_addr_bits: 46,
        }
    }
}

/// The delivery mode of an IPI (ICR bits 10:8, with the level bit for INIT de-assert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    /// Fixed: set the vector in each destination's IRR.
    Fixed,
    /// Lowest priority: the machine delivers it as fixed to the matching APIC with the lowest APIC ID.
    LowestPriority,
    /// System management interrupt (dropped by [`LocalApic::deliver`]).
    Smi,
    /// Non-maskable interrupt.
    Nmi,
    /// INIT (level assert).
    Init,
    /// INIT level de-assert (level 0, trigger level); has no effect on modern processors.
    InitDeassert,
    /// Start-up IPI; the vector is the start page number.
    StartUp,
}

/// Where an IPI goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Destination {
    /// Shorthand "self".
    SelfOnly,
    /// Shorthand "all including self", or a physical/logical broadcast.
    AllIncludingSelf,
    /// Shorthand "all excluding self".
    AllExcludingSelf,
    /// Physical destination: an APIC ID (8 bits in xAPIC mode, 32 bits in x2APIC mode).
    Physical(u32),
    /// Logical destination, matched against each receiver's LDR (and DFR in xAPIC mode): an 8-bit MDA in
    /// xAPIC mode, cluster (31:16) and member mask (15:0) in x2APIC mode.
    Logical(u32),
}

/// An inter-processor interrupt decoded from an ICR write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipi {
    /// The delivery mode.
    pub delivery_mode: DeliveryMode,
    /// The vector (fixed and lowest priority), or the start page (start-up); 0 for the others.
    pub vector: u8,
    /// Trigger mode: `true` for level (sets the receiver's TMR bit for fixed IPIs).
    pub level_triggered: bool,
    /// The destination.
    pub dest: Destination,
    /// The sender's initial APIC ID ([`LocalApic::initial_id`]), to evaluate "self" shorthands.
    pub source_id: u32,
}

/// An EOI that cleared an ISR bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eoi {
    /// The vector that left the ISR.
    pub vector: u8,
    /// Whether it was accepted level-triggered (its TMR bit is set).
    pub level_triggered: bool,
}

/// What the machine must do after an APIC write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct ApicEffects {
    /// An IPI to route to every APIC that [`LocalApic::matches_destination`].
    pub ipi: Option<Ipi>,
    /// An EOI that cleared an ISR bit (the EOI observer hook for SynIC redelivery).
    pub eoi: Option<Eoi>,
    /// IRR, ISR, TPR, enable or NMI/INIT state changed: re-evaluate [`LocalApic::pending_interrupt`].
    pub reevaluate: bool,
    /// The timer was armed, re-armed or disarmed: re-read [`LocalApic::next_timer_deadline_ns`].
    pub timer_changed: bool,
}

impl ApicEffects {
    /// Combines two effect sets (the later IPI/EOI wins if both have one).
    pub fn merge(self, other: ApicEffects) -> ApicEffects {
        ApicEffects {
            ipi: other.ipi.or(self.ipi),
            eoi: other.eoi.or(self.eoi),
            reevaluate: self.reevaluate || other.reevaluate,
            timer_changed: self.timer_changed || other.timer_changed,
        }
    }
}

/// The timer mode from LVT timer bits 18:17.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    /// Count down once.
    OneShot,
    /// Count down and reload.
    Periodic,
    /// Fire when the TSC reaches IA32_TSC_DEADLINE.
    TscDeadline,
    /// Encoding 3: reserved, the timer never fires.
    Reserved,
}

/// The one-shot/periodic countdown. Expiry `k` (0-based) happens at
/// `start_ns + ticks_to_ns(first_count + k * initial_count)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Countdown {
    armed: bool,
    start_ns: u64,
    first_count: u64,
    expiries: u64,
}

/// A 256-bit vector register (ISR, TMR, IRR, auto-EOI set).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorSet(pub [u32; 8]);

impl VectorSet {
    /// Whether `vector` is in the set.
    pub fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector / 32)] & (1 << (vector % 32)) != 0
    }
    fn set(&mut self, vector: u8, on: bool) {
        let word = &mut self.0[usize::from(vector / 32)];
        if on {
            *word |= 1 << (vector % 32);
        } else {
            *word &= !(1 << (vector % 32));
        }
    }
    /// The highest vector in the set.
    pub fn highest(&self) -> Option<u8> {
        (0..8usize).rev().find_map(|i| {
            let w = self.0[i];
            (w != 0).then(|| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
        })
    }
}

/// Serializable APIC state for snapshots and migration. Timer times are relative to the `now_ns` given to
/// [`LocalApic::save`], so the state does not depend on the host clock of the saving process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApicState {
    /// The initial (hardware) APIC ID.
    pub apic_id: u32,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// The xAPIC ID register (ID in bits 31:24).
    pub xapic_id_reg: u32,
    /// TPR.
    pub tpr: u32,
    /// xAPIC LDR.
    pub ldr: u32,
    /// xAPIC DFR.
    pub dfr: u32,
    /// SVR.
    pub svr: u32,
    /// ISR.
    pub isr: VectorSet,
    /// TMR.
    pub tmr: VectorSet,
    /// IRR.
    pub irr: VectorSet,
    /// Auto-EOI vectors.
    pub auto_eoi: VectorSet,
    /// ESR as read by the guest.
    pub esr: u32,
    /// Errors latched since the last ESR write.
    pub esr_pending: u32,
    /// LVT timer, thermal, perfmon, LINT0, LINT1, error.
    pub lvt: [u32; 6],
    /// ICR (low | high << 32).
    pub icr: u64,
    /// Timer initial count.
    pub timer_initial: u32,
    /// Timer divide configuration register.
    pub timer_divide: u32,
    /// Whether the countdown (one-shot/periodic) is armed.
    pub countdown_armed: bool,
    /// Nanoseconds since the countdown started (saturating at 0 if it started "in the future").
    pub countdown_elapsed_ns: u64,
    /// Ticks in the countdown's first period.
    pub countdown_first_count: u64,
    /// Periods already expired since the countdown started.
    pub countdown_expiries: u64,
    /// IA32_TSC_DEADLINE (0 = disarmed).
    pub tsc_deadline: u64,
    /// Latched NMI.
    pub nmi_pending: bool,
    /// Latched INIT.
    pub init_pending: bool,
    /// Latched SIPI vector.
    pub sipi_pending: Option<u8>,
}

/// One local APIC. See the module documentation for how the machine drives it.
#[derive(Debug, Clone)]
pub struct LocalApic {
    cfg: ApicConfig,
    apic_id: u32,
    apic_base: u64,
    xapic_id_reg: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    auto_eoi: VectorSet,
    esr: u32,
    esr_pending: u32,
    lvt: [u32; 6],
    icr: u64,
    timer_initial: u32,
    timer_divide: u32,
    countdown: Countdown,
    tsc_deadline: u64,
    tsc_deadline_ns: Option<u64>,
    nmi_pending: bool,
    init_pending: bool,
    sipi_pending: Option<u8>,
}

impl LocalApic {
    /// A local APIC in its power-up state: enabled in xAPIC mode at 0xFEE00000, software-disabled
    /// (SVR = 0xFF), all LVTs masked.
    pub fn new(apic_id: u32, cfg: ApicConfig) -> LocalApic {
        let cfg = ApicConfig {
            bus_freq_hz: cfg.bus_freq_hz.max(1),
            tsc_freq_hz: cfg.tsc_freq_hz.max(1),
            phys_addr_bits: cfg.phys_addr_bits.clamp(32, 52),
            ..cfg
        };
        let mut apic = LocalApic {
            cfg,
            apic_id,
            apic_base: DEFAULT_APIC_BASE
                | APIC_BASE_ENABLE
                | if cfg.bsp { APIC_BASE_BSP } else { 0 },
            xapic_id_reg: 0,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            auto_eoi: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            lvt: [0; 6],
            icr: 0,
            timer_initial: 0,
            timer_divide: 0,
            countdown: Countdown::default(),
            tsc_deadline: 0,
            tsc_deadline_ns: None,
            nmi_pending: false,
            init_pending: false,
            sipi_pending: None,
        };
        apic.reset_registers();
        apic
    }

    /// The configuration (with zero frequencies replaced by 1).
    pub fn config(&self) -> &ApicConfig {
        &self.cfg
    }

    /// The initial (hardware) APIC ID given to [`LocalApic::new`].
    pub fn initial_id(&self) -> u32 {
        self.apic_id
    }

    /// The current APIC ID used for destination matching: the x2APIC ID in x2APIC mode, the xAPIC ID
    /// register's bits 31:24 otherwise.
    pub fn id(&self) -> u32 {
        if self.is_x2apic() {
            self.apic_id
        } else {
            self.xapic_id_reg >> 24
        }
    }

    /// Whether the APIC is globally enabled (IA32_APIC_BASE bit 11).
    pub fn is_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// Whether the APIC is in x2APIC mode.
    pub fn is_x2apic(&self) -> bool {
        self.apic_base & APIC_BASE_EXTD != 0
    }

    /// Whether the APIC is software-enabled (SVR bit 8) and globally enabled.
    pub fn is_sw_enabled(&self) -> bool {
        self.is_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// The xAPIC MMIO page address while the APIC is enabled in xAPIC mode, else `None`.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.is_enabled() && !self.is_x2apic()).then_some(self.apic_base & self.base_addr_mask())
    }

    // ---------------------------------------------------------------- APIC base

    /// Reads IA32_APIC_BASE.
    pub fn read_apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Writes IA32_APIC_BASE with the SDM's rules: reserved bits, x2APIC without CPUID support, the invalid
    /// state (x2APIC without enable), x2APIC → xAPIC and disabled → x2APIC all give #GP. The BSP bit is
    /// fixed by the configuration (guest writes to it are ignored). Disabling the APIC resets its registers
    /// (the ID is kept) and disarms the timer.
    pub fn write_apic_base(&mut self, value: u64) -> Result<ApicEffects, Gp> {
        let allowed = self.base_addr_mask() | APIC_BASE_ENABLE | APIC_BASE_EXTD | APIC_BASE_BSP;
        if value & !allowed != 0 {
            return Err(Gp);
        }
        let new_en = value & APIC_BASE_ENABLE != 0;
        let new_x2 = value & APIC_BASE_EXTD != 0;
        if new_x2 && !self.cfg.x2apic_allowed {
            return Err(Gp);
        }
        if new_x2 && !new_en {
            return Err(Gp);
        }
        let (old_en, old_x2) = (self.is_enabled(), self.is_x2apic());
        if old_x2 && new_en && !new_x2 {
            return Err(Gp);
        }
        if !old_en && new_x2 {
            return Err(Gp);
        }
        let bsp = if self.cfg.bsp { APIC_BASE_BSP } else { 0 };
        self.apic_base = (value & !APIC_BASE_BSP) | bsp;
        let mut fx = ApicEffects::default();
        if old_en && !new_en {
            self.reset_registers();
            fx.reevaluate = true;
            fx.timer_changed = true;
        } else if !old_en && new_en {
            self.xapic_id_reg = (self.apic_id & 0xFF) << 24;
            fx.reevaluate = true;
        } else if old_x2 != new_x2 {
            fx.reevaluate = true;
        }
        Ok(fx)
    }

    fn base_addr_mask(&self) -> u64 {
        ((1u64 << self.cfg.phys_addr_bits) - 1) & !0xFFF
    }

    // ---------------------------------------------------------------- register access

    /// Reads `data.len()` bytes at `offset` in the xAPIC MMIO page. A read that crosses a 4-byte register
    /// boundary, or of a write-only or reserved register, returns zeros.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        data.fill(0);
        let within = (offset & 0xF) as usize;
        if offset >= APIC_MMIO_SIZE || within + data.len() > 4 {
            return;
        }
        let value = self.read_reg(offset & !0xF, now_ns).unwrap_or(0);
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[within..within + data.len()]);
    }

    /// Writes the xAPIC MMIO page. Only aligned 4-byte writes have an effect (as in KVM); others are dropped.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> ApicEffects {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return ApicEffects::default();
        };
        if offset >= APIC_MMIO_SIZE || offset & 0xF != 0 || self.mmio_base().is_none() {
            return ApicEffects::default();
        }
        self.write_reg(offset, u32::from_le_bytes(bytes), now_ns)
            .unwrap_or_default()
    }

    /// Reads an x2APIC MSR (0x800..=0x8FF). #GP outside x2APIC mode, for reserved and write-only registers
    /// (EOI, SELF_IPI) and for registers x2APIC does not have (APR, RRD, DFR, ICR high, CMCI).
    pub fn msr_read(&self, msr: u32, now_ns: u64) -> Result<u64, Gp> {
        if !self.is_x2apic() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(Gp);
        }
        let offset = u64::from(msr - X2APIC_MSR_FIRST) << 4;
        match offset {
            reg::ICR_LOW => Ok(self.icr),
            reg::APR | reg::RRD | reg::DFR | reg::ICR_HIGH | reg::EOI | reg::SELF_IPI => Err(Gp),
            _ => self.read_reg(offset, now_ns).map(u64::from),
        }
    }

    /// Writes an x2APIC MSR (0x800..=0x8FF). #GP outside x2APIC mode, for read-only and reserved registers,
    /// bits 63:32 set (except the 64-bit ICR), a non-zero ESR write, and reserved ICR bits.
    pub fn msr_write(&mut self, msr: u32, value: u64, now_ns: u64) -> Result<ApicEffects, Gp> {
        if !self.is_x2apic() || !(X2APIC_MSR_FIRST..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(Gp);
        }
        let offset = u64::from(msr - X2APIC_MSR_FIRST) << 4;
        match offset {
            reg::ICR_LOW => self.write_icr64(value),
            reg::TPR
            | reg::EOI
            | reg::SVR
            | reg::ESR
            | reg::LVT_TIMER..=reg::LVT_ERROR
            | reg::TIMER_INITIAL
            | reg::TIMER_DIVIDE
            | reg::SELF_IPI => {
                let v = u32::try_from(value).map_err(|_| Gp)?;
                if offset == reg::ESR && v != 0 {
                    return Err(Gp);
                }
                self.write_reg(offset, v, now_ns)
            }
            _ => Err(Gp),
        }
    }

    /// Reads a Hyper-V APIC-access MSR (HV_X64_MSR_EOI/ICR/TPR, 0x40000070..=0x40000072), as KVM forwards them
    /// to the local APIC in either mode: TPR reads the TPR, ICR reads the 64-bit ICR (in xAPIC mode the high
    /// half is the ICR high register, destination in bits 63:56), EOI is write-only (#GP).
    pub fn hv_vapic_msr_read(&self, msr: u32) -> Result<u64, Gp> {
        match msr {
            HV_MSR_TPR => Ok(u64::from(self.tpr)),
            HV_MSR_ICR => Ok(self.icr),
            _ => Err(Gp),
        }
    }

    /// Writes a Hyper-V APIC-access MSR: EOI performs an EOI (the value is ignored), ICR sends an IPI as the
    /// x2APIC ICR does (reserved bits #GP; in xAPIC mode the destination is bits 63:56), TPR sets the TPR
    /// (bits 63:32 #GP).
    pub fn hv_vapic_msr_write(&mut self, msr: u32, value: u64) -> Result<ApicEffects, Gp> {
        match msr {
            HV_MSR_EOI => {
                if value >> 32 != 0 {
                    return Err(Gp);
                }
                Ok(self.eoi_effects())
            }
            HV_MSR_ICR => self.write_icr64(value),
            HV_MSR_TPR => {
                let v = u32::try_from(value).map_err(|_| Gp)?;
                self.tpr = v & 0xFF;
                Ok(ApicEffects {
                    reevaluate: true,
                    ..ApicEffects::default()
                })
            }
            _ => Err(Gp),
        }
    }

    /// Reads a register by xAPIC offset (16-byte aligned). `Err(Gp)` for write-only and reserved registers.
    fn read_reg(&self, offset: u64, now_ns: u64) -> Result<u32, Gp> {
        let x2 = self.is_x2apic();
        Ok(match offset {
            reg::ID => {
                if x2 {
                    self.apic_id
                } else {
                    self.xapic_id_reg
                }
            }
            reg::VERSION => APIC_VERSION,
            reg::TPR => self.tpr,
            reg::APR => self.apr(),
            reg::PPR => self.ppr(),
            reg::RRD => 0,
            reg::LDR => {
                if x2 {
                    x2apic_ldr(self.apic_id)
                } else {
                    self.ldr
                }
            }
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            reg::ISR..=0x170 => self.isr.0[((offset - reg::ISR) >> 4) as usize],
            reg::TMR..=0x1F0 => self.tmr.0[((offset - reg::TMR) >> 4) as usize],
            reg::IRR..=0x270 => self.irr.0[((offset - reg::IRR) >> 4) as usize],
            reg::ESR => self.esr,
            reg::ICR_LOW => self.icr as u32,
            reg::ICR_HIGH => (self.icr >> 32) as u32,
            reg::LVT_TIMER..=reg::LVT_ERROR => self.lvt[((offset - reg::LVT_TIMER) >> 4) as usize],
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now_ns),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => return Err(Gp),
        })
    }

    /// Writes a register by xAPIC offset. Mode-specific #GP checks are done by the callers; here `Err(Gp)`
    /// means read-only or reserved.
    fn write_reg(&mut self, offset: u64, value: u32, now_ns: u64) -> Result<ApicEffects, Gp> {
        let x2 = self.is_x2apic();
        let mut fx = ApicEffects::default();
        match offset {
            reg::ID if !x2 => self.xapic_id_reg = value & 0xFF00_0000,
            reg::TPR => {
                self.tpr = value & 0xFF;
                fx.reevaluate = true;
            }
            reg::EOI => fx = self.eoi_effects(),
            reg::LDR if !x2 => self.ldr = value & 0xFF00_0000,
            reg::DFR if !x2 => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => {
                self.svr = value & SVR_WRITABLE;
                if self.svr & SVR_ENABLE == 0 {
                    for lvt in &mut self.lvt {
                        *lvt |= LVT_MASKED;
                    }
                }
                fx.reevaluate = true;
            }
            reg::ESR => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            reg::ICR_LOW if !x2 => {
                let low = value & XAPIC_ICR_LOW_WRITABLE;
                self.icr = (self.icr & !0xFFFF_FFFF) | u64::from(low);
                fx = self.send_icr(self.icr);
            }
            reg::ICR_HIGH if !x2 => {
                self.icr = (self.icr & 0xFFFF_FFFF) | (u64::from(value & 0xFF00_0000) << 32);
            }
            reg::LVT_TIMER..=reg::LVT_ERROR => {
                let idx = ((offset - reg::LVT_TIMER) >> 4) as usize;
                fx = self.write_lvt(idx, value);
            }
            reg::TIMER_INITIAL => fx = self.write_timer_initial(value, now_ns),
            reg::TIMER_DIVIDE => fx = self.write_timer_divide(value, now_ns),
            reg::SELF_IPI if x2 && value <= 0xFF => {
                fx.reevaluate = self.accept_fixed(value as u8, false);
            }
            _ => return Err(Gp),
        }
        Ok(fx)
    }

    fn write_lvt(&mut self, idx: usize, value: u32) -> ApicEffects {
        let mut v = value & LVT_WRITABLE[idx];
        if self.svr & SVR_ENABLE == 0 {
            v |= LVT_MASKED;
        }
        let mut fx = ApicEffects::default();
        if idx == LVT_INDEX_TIMER {
            let old_mode = self.timer_mode();
            self.lvt[idx] = v;
            let new_mode = self.timer_mode();
            if (old_mode == TimerMode::TscDeadline) != (new_mode == TimerMode::TscDeadline) {
                self.countdown = Countdown::default();
                self.timer_initial = 0;
                self.tsc_deadline = 0;
                self.tsc_deadline_ns = None;
            }
            fx.timer_changed = true;
        } else {
            self.lvt[idx] = v;
        }
        fx
    }

    // ---------------------------------------------------------------- priorities

    /// The task priority register.
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// CR8 as the guest sees it: TPR bits 7:4. Without an in-kernel APIC, KVM keeps CR8 in `kvm_run.cr8`; the
    /// machine copies `cr8()` there before each `KVM_RUN`.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// Sets the TPR from a guest CR8 value (`kvm_run.cr8` after an exit): TPR = CR8 bits 3:0, shifted left by 4. Only the low
    /// four bits are used (KVM already rejects others with #GP).
    pub fn set_cr8(&mut self, cr8: u64) -> ApicEffects {
        let tpr = ((cr8 & 0xF) << 4) as u32;
        if tpr == self.tpr {
            return ApicEffects::default();
        }
        self.tpr = tpr;
        ApicEffects {
            reevaluate: true,
            ..ApicEffects::default()
        }
    }

    /// The processor priority register: TPR if its class is at least the highest in-service vector's class,
    /// else that vector's class.
    pub fn ppr(&self) -> u32 {
        let isrv = u32::from(self.isr.highest().unwrap_or(0));
        if (self.tpr & 0xF0) >= (isrv & 0xF0) {
            self.tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    /// The arbitration priority register (SDM 10.6.2.4).
    fn apr(&self) -> u32 {
        let irrv = u32::from(self.irr.highest().unwrap_or(0));
        let isrv = u32::from(self.isr.highest().unwrap_or(0));
        let tpr = self.tpr & 0xFF;
        if (tpr & 0xF0) >= (irrv & 0xF0) && (tpr & 0xF0) > (isrv & 0xF0) {
            tpr
        } else {
            (tpr & 0xF0).max(isrv & 0xF0).max(irrv & 0xF0)
        }
    }

    // ---------------------------------------------------------------- interrupt acceptance

    /// Accepts a fixed (or lowest-priority) interrupt: sets its IRR bit and sets or clears its TMR bit.
    /// Dropped (returns `false`) when the APIC is not software-enabled; vectors 0..=15 are dropped and set
    /// ESR's "receive illegal vector" bit. Returns whether the IRR changed, i.e. whether to re-evaluate.
    pub fn accept_fixed(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !self.is_sw_enabled() {
            return false;
        }
        if vector < 16 {
            return self.set_error(ESR_RECV_ILLEGAL_VECTOR);
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, level_triggered);
        true
    }

    /// Latches an error bit and raises the LVT error interrupt if it is unmasked and legal. Returns whether
    /// the IRR changed.
    fn set_error(&mut self, bit: u32) -> bool {
        self.esr_pending |= bit;
        let lvt = self.lvt[LVT_INDEX_ERROR];
        let vector = lvt as u8;
        if lvt & LVT_MASKED != 0 || vector < 16 || !self.is_sw_enabled() {
            return false;
        }
        self.irr.set(vector, true);
        self.tmr.set(vector, false);
        true
    }

    /// Receives a routed IPI (after [`LocalApic::matches_destination`]): fixed and lowest priority go to
    /// [`LocalApic::accept_fixed`]; NMI, INIT and SIPI are latched for [`LocalApic::take_nmi`],
    /// [`LocalApic::take_init`] and [`LocalApic::take_sipi`]; SMI and INIT de-assert are ignored. An INIT
    /// discards a SIPI latched before it. Returns whether the vCPU must be kicked to look at its APIC.
    pub fn deliver(&mut self, ipi: &Ipi) -> bool {
        if !self.is_enabled() {
            return false;
        }
        match ipi.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_fixed(ipi.vector, ipi.level_triggered)
            }
            DeliveryMode::Nmi => {
                self.nmi_pending = true;
                true
            }
            DeliveryMode::Init => {
                self.init_pending = true;
                self.sipi_pending = None;
                true
            }
            DeliveryMode::StartUp => {
                self.sipi_pending = Some(ipi.vector);
                true
            }
            DeliveryMode::Smi | DeliveryMode::InitDeassert => false,
        }
    }

    /// Latches an NMI (for an NMI source other than an IPI).
    pub fn raise_nmi(&mut self) {
        self.nmi_pending = true;
    }

    /// Takes the latched NMI.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.nmi_pending)
    }

    /// Takes the latched INIT. The machine then calls [`LocalApic::init_reset`], resets the vCPU and puts it
    /// into wait-for-SIPI.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init_pending)
    }

    /// Takes the latched SIPI vector. The machine honours it only while the vCPU waits for a SIPI.
    pub fn take_sipi(&mut self) -> Option<u8> {
        self.sipi_pending.take()
    }

    /// Whether an NMI is latched (without taking it).
    pub fn nmi_latched(&self) -> bool {
        self.nmi_pending
    }

    /// Whether an INIT is latched (without taking it).
    pub fn init_latched(&self) -> bool {
        self.init_pending
    }

    /// The latched SIPI vector (without taking it).
    pub fn sipi_latched(&self) -> Option<u8> {
        self.sipi_pending
    }

    /// Whether anything would wake a halted vCPU: a deliverable interrupt, an NMI, INIT or SIPI. (A deliverable
    /// interrupt wakes HLT only while RFLAGS.IF is set; that check is the machine's.)
    pub fn has_wake_event(&self) -> bool {
        self.pending_interrupt().is_some()
            || self.nmi_pending
            || self.init_pending
            || self.sipi_pending.is_some()
    }

    /// The vector to inject now, if any: the highest IRR vector whose priority class is above the PPR's,
    /// only while the APIC is software-enabled.
    pub fn pending_interrupt(&self) -> Option<u8> {
        if !self.is_sw_enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        ((u32::from(v) & 0xF0) > (self.ppr() & 0xF0)).then_some(v)
    }

    /// The highest vector in the IRR, whatever the priorities (for the exit-less EOI decision).
    pub fn highest_irr(&self) -> Option<u8> {
        self.irr.highest()
    }

    /// Whether `vector` was accepted level-triggered (its TMR bit).
    pub fn is_level_triggered(&self, vector: u8) -> bool {
        self.tmr.contains(vector)
    }

    /// How many vectors are in service (KVM's PV-EOI is only offered when exactly one is, so that the
    /// deferred EOI cannot hit the wrong vector).
    pub fn isr_count(&self) -> u32 {
        self.isr.0.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether `vector` is in service.
    pub fn is_in_service(&self, vector: u8) -> bool {
        self.isr.contains(vector)
    }

    /// Whether `vector` is requested.
    pub fn is_requested(&self, vector: u8) -> bool {
        self.irr.contains(vector)
    }

    /// The CPU took `vector` (injected with `KVM_INTERRUPT`): it moves from the IRR to the ISR, except for
    /// auto-EOI vectors, which only leave the IRR. Returns whether the vector was auto-EOI. Nothing happens
    /// (and `false` is returned) if `vector` is not in the IRR.
    pub fn ack_interrupt(&mut self, vector: u8) -> bool {
        if !self.irr.contains(vector) {
            return false;
        }
        self.irr.set(vector, false);
        if self.auto_eoi.contains(vector) {
            return true;
        }
        self.isr.set(vector, true);
        false
    }

    /// Performs an EOI: clears the highest ISR bit and returns it, with its trigger mode. This is the EOI
    /// observer: the machine forwards the vector to the Hyper-V engine for SynIC redelivery. `None` if the
    /// ISR was empty.
    pub fn eoi(&mut self) -> Option<Eoi> {
        let vector = self.isr.highest()?;
        self.isr.set(vector, false);
        Some(Eoi {
            vector,
            level_triggered: self.tmr.contains(vector),
        })
    }

    fn eoi_effects(&mut self) -> ApicEffects {
        let eoi = self.eoi();
        ApicEffects {
            eoi,
            reevaluate: eoi.is_some(),
            ..ApicEffects::default()
        }
    }

    /// Marks or unmarks `vector` as auto-EOI (Hyper-V SynIC SINTs with the auto-EOI bit): acknowledging it
    /// does not set its ISR bit, so it needs no EOI.
    pub fn set_auto_eoi(&mut self, vector: u8, auto_eoi: bool) {
        self.auto_eoi.set(vector, auto_eoi);
    }

    /// Whether `vector` is auto-EOI.
    pub fn is_auto_eoi(&self, vector: u8) -> bool {
        self.auto_eoi.contains(vector)
    }

    // ---------------------------------------------------------------- IPIs

    fn write_icr64(&mut self, value: u64) -> Result<ApicEffects, Gp> {
        if value & X2APIC_ICR_RESERVED != 0 {
            return Err(Gp);
        }
        self.icr = value & !ICR_BUSY;
        Ok(self.send_icr(self.icr))
    }

    /// Decodes an ICR value in the current mode, or returns `Err(error bit)` for an illegal vector, or
    /// `Ok(None)` for a reserved delivery mode.
    fn decode_icr(&self, icr: u64) -> Result<Option<Ipi>, u32> {
        let vector = icr as u8;
        let level_assert = icr & (1 << 14) != 0;
        let level_triggered = icr & (1 << 15) != 0;
        let delivery_mode = match (icr >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 if !level_assert && level_triggered => DeliveryMode::InitDeassert,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            _ => return Ok(None),
        };
        let fixed_like = matches!(
            delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        );
        if fixed_like && vector < 16 {
            return Err(ESR_SEND_ILLEGAL_VECTOR);
        }
        let logical = icr & (1 << 11) != 0;
        let (raw_dest, broadcast) = if self.is_x2apic() {
            ((icr >> 32) as u32, u32::MAX)
        } else {
            ((icr >> 56) as u32, 0xFF)
        };
        let dest = match (icr >> 18) & 3 {
            1 => Destination::SelfOnly,
            2 => Destination::AllIncludingSelf,
            3 => Destination::AllExcludingSelf,
            _ if raw_dest == broadcast => Destination::AllIncludingSelf,
            _ if logical => Destination::Logical(raw_dest),
            _ => Destination::Physical(raw_dest),
        };
        let vector = match delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority | DeliveryMode::StartUp => vector,
            _ => 0,
        };
        Ok(Some(Ipi {
            delivery_mode,
            vector,
            level_triggered: fixed_like && level_triggered,
            dest,
            source_id: self.apic_id,
        }))
    }

    fn send_icr(&mut self, icr: u64) -> ApicEffects {
        match self.decode_icr(icr) {
            Ok(ipi) => ApicEffects {
                ipi,
                ..ApicEffects::default()
            },
            Err(bit) => ApicEffects {
                reevaluate: self.set_error(bit),
                ..ApicEffects::default()
            },
        }
    }

    /// Whether this APIC is a destination of `dest` sent by the APIC whose [`LocalApic::initial_id`] is
    /// `sender_id` (use [`Ipi::source_id`]). "Self" in the shorthands means the same APIC, so it is decided by
    /// the initial ID even if the guest rewrote an xAPIC ID register.
    /// A globally disabled APIC matches nothing. Logical destinations use this APIC's LDR, and its DFR (flat
    /// or cluster) in xAPIC mode.
    pub fn matches_destination(&self, dest: &Destination, sender_id: u32) -> bool {
        if !self.is_enabled() {
            return false;
        }
        let id = self.id();
        match *dest {
            Destination::SelfOnly => self.apic_id == sender_id,
            Destination::AllIncludingSelf => true,
            Destination::AllExcludingSelf => self.apic_id != sender_id,
            Destination::Physical(d) => d == id,
            Destination::Logical(d) => {
                if self.is_x2apic() {
                    let ldr = x2apic_ldr(self.apic_id);
                    d == u32::MAX || ((d >> 16) == (ldr >> 16) && (d & ldr & 0xFFFF) != 0)
                } else {
                    let mda = d & 0xFF;
                    let ldr = self.ldr >> 24;
                    if mda == 0xFF {
                        return true;
                    }
                    match self.dfr >> 28 {
                        0xF => ldr & mda != 0,
                        0x0 => (ldr >> 4) == (mda >> 4) && (ldr & mda & 0xF) != 0,
                        _ => false,
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- timer

    /// The timer mode selected by LVT timer bits 18:17.
    pub fn timer_mode(&self) -> TimerMode {
        match (self.lvt[LVT_INDEX_TIMER] & LVT_TIMER_MODE_MASK) >> LVT_TIMER_MODE_SHIFT {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }

    /// The divisor selected by the divide configuration register (1, 2, 4, ..., 128).
    pub fn timer_divisor(&self) -> u64 {
        let code = (self.timer_divide & 3) | ((self.timer_divide & 8) >> 1);
        1 << ((code + 1) & 7)
    }

    /// Nanoseconds (rounded up) that `ticks` timer ticks take; `None` on overflow.
    fn ticks_to_ns(&self, ticks: u128) -> Option<u64> {
        let num = ticks
            .checked_mul(u128::from(self.timer_divisor()))?
            .checked_mul(NS_PER_SEC)?;
        u64::try_from(num.div_ceil(u128::from(self.cfg.bus_freq_hz))).ok()
    }

    /// Whole timer ticks elapsed in `ns` nanoseconds.
    fn ns_to_ticks(&self, ns: u64) -> u128 {
        u128::from(ns) * u128::from(self.cfg.bus_freq_hz)
            / (u128::from(self.timer_divisor()) * NS_PER_SEC)
    }

    /// The period in timer ticks: the initial count, raised in periodic mode to the count that lasts
    /// [`MIN_PERIODIC_NS`] at the current divide (KVM's `limit_periodic_timer_frequency`).
    fn period_ticks(&self) -> u64 {
        let n = u64::from(self.timer_initial);
        if self.timer_mode() != TimerMode::Periodic || n == 0 {
            return n;
        }
        let min = (u128::from(MIN_PERIODIC_NS) * u128::from(self.cfg.bus_freq_hz))
            .div_ceil(u128::from(self.timer_divisor()) * NS_PER_SEC);
        n.max(u64::try_from(min).unwrap_or(u64::MAX))
    }

    /// Ticks from the countdown start to expiry number `k`.
    fn countdown_ticks(&self, k: u64) -> Option<u128> {
        u128::from(self.countdown.first_count)
            .checked_add(u128::from(k).checked_mul(u128::from(self.period_ticks()))?)
    }

    fn countdown_deadline(&self, k: u64) -> Option<u64> {
        let ns = self.ticks_to_ns(self.countdown_ticks(k)?)?;
        self.countdown.start_ns.checked_add(ns)
    }

    /// The host-clock time at which [`LocalApic::timer_tick`] must next be called, or `None` if the timer is
    /// not armed (or so far away that it does not fit in a u64).
    pub fn next_timer_deadline_ns(&self) -> Option<u64> {
        if !self.is_enabled() {
            return None;
        }
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic if self.countdown.armed => {
                self.countdown_deadline(self.countdown.expiries)
            }
            TimerMode::TscDeadline => self.tsc_deadline_ns,
            _ => None,
        }
    }

    /// The current-count register at `now_ns`.
    pub fn current_count(&self, now_ns: u64) -> u32 {
        if !self.countdown.armed
            || !matches!(self.timer_mode(), TimerMode::OneShot | TimerMode::Periodic)
        {
            return 0;
        }
        let t = self.ns_to_ticks(now_ns.saturating_sub(self.countdown.start_ns));
        let first = u128::from(self.countdown.first_count);
        if t < first {
            return (first - t) as u32;
        }
        let n = u128::from(self.period_ticks());
        if self.timer_mode() == TimerMode::Periodic && n != 0 {
            // Above the initial count while a period raised to the minimum runs (as KVM reads it).
            u32::try_from(n - (t - first) % n).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    fn write_timer_initial(&mut self, value: u32, now_ns: u64) -> ApicEffects {
        if !matches!(
            self.timer_mode(),
            TimerMode::OneShot | TimerMode::Periodic | TimerMode::Reserved
        ) {
            return ApicEffects::default();
        }
        self.timer_initial = value;
        self.countdown = Countdown {
            armed: value != 0,
            start_ns: now_ns,
            first_count: self.period_ticks(),
            expiries: 0,
        };
        ApicEffects {
            timer_changed: true,
            ..ApicEffects::default()
        }
    }

    fn write_timer_divide(&mut self, value: u32, now_ns: u64) -> ApicEffects {
        let remaining = self.current_count(now_ns);
        self.timer_divide = value & 0xB;
        if self.countdown.armed && remaining != 0 {
            // Keep the ticks left in the current period; count them at the new rate from now.
            self.countdown = Countdown {
                armed: true,
                start_ns: now_ns,
                first_count: u64::from(remaining),
                expiries: 0,
            };
        }
        ApicEffects {
            timer_changed: true,
            ..ApicEffects::default()
        }
    }

    /// Reads IA32_TSC_DEADLINE: the armed deadline in TSC-deadline mode, 0 otherwise (and after it fired).
    pub fn read_tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// Writes IA32_TSC_DEADLINE (guest TSC units). Ignored unless the APIC is enabled and in TSC-deadline mode.
    /// 0 disarms; a deadline at or before `now_tsc` fires at once; otherwise the host deadline is derived from
    /// the (`now_ns`, `now_tsc`) pair and the TSC frequency, rounded up.
    pub fn write_tsc_deadline(&mut self, value: u64, now_ns: u64, now_tsc: u64) -> ApicEffects {
        if !self.is_enabled() || self.timer_mode() != TimerMode::TscDeadline {
            return ApicEffects::default();
        }
        self.tsc_deadline = value;
        self.tsc_deadline_ns = None;
        let mut fx = ApicEffects {
            timer_changed: true,
            ..ApicEffects::default()
        };
        if value == 0 {
            return fx;
        }
        if value <= now_tsc {
            self.tsc_deadline = 0;
            fx.reevaluate = self.fire_timer();
        } else {
            self.tsc_deadline_ns = Some(self.tsc_to_ns_deadline(value, now_ns, now_tsc));
        }
        fx
    }

    fn tsc_to_ns_deadline(&self, deadline: u64, now_ns: u64, now_tsc: u64) -> u64 {
        let delta = u128::from(deadline.saturating_sub(now_tsc)) * NS_PER_SEC;
        let ns = delta.div_ceil(u128::from(self.cfg.tsc_freq_hz));
        u64::try_from(ns).map_or(u64::MAX, |ns| now_ns.saturating_add(ns))
    }

    /// The guest TSC was written (or the TSC/host-clock relation changed otherwise): re-derive the host
    /// deadline of an armed TSC deadline from the new (`now_ns`, `now_tsc`) pair, firing it if the TSC is
    /// already past it. No effect in the other timer modes.
    pub fn resync_tsc(&mut self, now_ns: u64, now_tsc: u64) -> ApicEffects {
        if !self.is_enabled()
            || self.timer_mode() != TimerMode::TscDeadline
            || self.tsc_deadline == 0
        {
            return ApicEffects::default();
        }
        let mut fx = ApicEffects {
            timer_changed: true,
            ..ApicEffects::default()
        };
        if now_tsc >= self.tsc_deadline {
            self.tsc_deadline = 0;
            self.tsc_deadline_ns = None;
            fx.reevaluate = self.fire_timer();
        } else {
            self.tsc_deadline_ns =
                Some(self.tsc_to_ns_deadline(self.tsc_deadline, now_ns, now_tsc));
        }
        fx
    }

    /// Sets the LVT timer vector in the IRR unless the LVT is masked. Returns whether the IRR changed.
    fn fire_timer(&mut self) -> bool {
        let lvt = self.lvt[LVT_INDEX_TIMER];
        if lvt & LVT_MASKED != 0 {
            return false;
        }
        self.accept_fixed(lvt as u8, false)
    }

    /// Processes timer expiry at `now_ns` (guest TSC `now_tsc`): fires a due one-shot, periodic (re-armed from
    /// the previous deadline, skipping periods that were missed entirely) or TSC-deadline timer. Calls before
    /// the deadline only re-report the deadline. `reevaluate` is set if an interrupt was requested,
    /// `timer_changed` if the deadline moved.
    pub fn timer_tick(&mut self, now_ns: u64, now_tsc: u64) -> ApicEffects {
        let mut fx = ApicEffects::default();
        if !self.is_enabled() {
            return fx;
        }
        match self.timer_mode() {
            TimerMode::OneShot | TimerMode::Periodic if self.countdown.armed => {
                let Some(deadline) = self.countdown_deadline(self.countdown.expiries) else {
                    return fx;
                };
                if now_ns < deadline {
                    return fx;
                }
                fx.reevaluate = self.fire_timer();
                fx.timer_changed = true;
                if self.timer_mode() == TimerMode::OneShot || self.timer_initial == 0 {
                    self.countdown.armed = false;
                } else {
                    self.advance_periodic(now_ns);
                }
            }
            TimerMode::TscDeadline if self.tsc_deadline != 0 => {
                if now_tsc >= self.tsc_deadline {
                    self.tsc_deadline = 0;
                    self.tsc_deadline_ns = None;
                    fx.reevaluate = self.fire_timer();
                    fx.timer_changed = true;
                } else if self.tsc_deadline_ns.is_none_or(|d| d <= now_ns) {
                    // The host clock reached the converted deadline before the TSC did: re-derive it.
                    self.tsc_deadline_ns =
                        Some(self.tsc_to_ns_deadline(self.tsc_deadline, now_ns, now_tsc));
                    fx.timer_changed = true;
                }
            }
            _ => {}
        }
        fx
    }

    /// After a periodic expiry at or before `now_ns`: move to the first expiry after `now_ns`, and rebase the
    /// start onto the last expiry when that is an exact nanosecond, so the numbers stay small.
    fn advance_periodic(&mut self, now_ns: u64) {
        let n = u128::from(self.period_ticks());
        let first = u128::from(self.countdown.first_count);
        let t = self.ns_to_ticks(now_ns.saturating_sub(self.countdown.start_ns));
        // Smallest k with first + k*n > t (t >= first here, since the deadline passed).
        let next_k = (t.saturating_sub(first) / n + 1).max(u128::from(self.countdown.expiries) + 1);
        let Ok(next_k) = u64::try_from(next_k) else {
            self.countdown.armed = false;
            return;
        };
        self.countdown.expiries = next_k;
        let last_ticks = first + u128::from(next_k - 1) * n;
        let divisor = u128::from(self.timer_divisor());
        let exact = last_ticks
            .checked_mul(divisor * NS_PER_SEC)
            .is_some_and(|x| x % u128::from(self.cfg.bus_freq_hz) == 0);
        if exact {
            if let Some(last) = self.countdown_deadline(next_k - 1) {
                self.countdown = Countdown {
                    armed: true,
                    start_ns: last,
                    first_count: self.period_ticks(),
                    expiries: 0,
                };
            }
        }
    }

    // ---------------------------------------------------------------- reset and snapshots

    /// INIT reset (SDM 10.4.7.3): every register returns to its power-up value except the APIC ID, the APIC
    /// base (mode included) and the auto-EOI set; the timer is disarmed. Latched NMI and SIPI are kept (a SIPI
    /// that follows the INIT must survive).
    pub fn init_reset(&mut self) {
        let id = self.xapic_id_reg;
        self.reset_registers();
        self.xapic_id_reg = id;
    }

    /// Power-up register values (also used when the APIC is globally disabled).
    fn reset_registers(&mut self) {
        self.xapic_id_reg = (self.apic_id & 0xFF) << 24;
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = VectorSet::default();
        self.tmr = VectorSet::default();
        self.irr = VectorSet::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.lvt = [LVT_MASKED; 6];
        self.icr = 0;
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.countdown = Countdown::default();
        self.tsc_deadline = 0;
        self.tsc_deadline_ns = None;
    }

    /// Captures the state at `now_ns`.
    pub fn save(&self, now_ns: u64) -> ApicState {
        ApicState {
            apic_id: self.apic_id,
            apic_base: self.apic_base,
            xapic_id_reg: self.xapic_id_reg,
            tpr: self.tpr,
            ldr: self.ldr,
            dfr: self.dfr,
            svr: self.svr,
            isr: self.isr,
            tmr: self.tmr,
            irr: self.irr,
            auto_eoi: self.auto_eoi,
            esr: self.esr,
            esr_pending: self.esr_pending,
            lvt: self.lvt,
            icr: self.icr,
            timer_initial: self.timer_initial,
            timer_divide: self.timer_divide,
            countdown_armed: self.countdown.armed,
            countdown_elapsed_ns: now_ns.saturating_sub(self.countdown.start_ns),
            countdown_first_count: self.countdown.first_count,
            countdown_expiries: self.countdown.expiries,
            tsc_deadline: self.tsc_deadline,
            nmi_pending: self.nmi_pending,
            init_pending: self.init_pending,
            sipi_pending: self.sipi_pending,
        }
    }

    /// Restores a state saved by [`LocalApic::save`], at `now_ns` / guest TSC `now_tsc` of this process.
    /// Register values are masked to their writable bits; a state for another APIC ID or with an unreachable
    /// APIC base is refused and leaves this APIC unchanged.
    pub fn restore(
        &mut self,
        state: &ApicState,
        now_ns: u64,
        now_tsc: u64,
    ) -> Result<(), RestoreError> {
        if state.apic_id != self.apic_id {
            return Err(RestoreError::WrongApicId {
                expected: self.apic_id,
                found: state.apic_id,
            });
        }
        let b = state.apic_base;
        let allowed = self.base_addr_mask() | APIC_BASE_ENABLE | APIC_BASE_EXTD | APIC_BASE_BSP;
        let en = b & APIC_BASE_ENABLE != 0;
        let x2 = b & APIC_BASE_EXTD != 0;
        if b & !allowed != 0 || (x2 && (!en || !self.cfg.x2apic_allowed)) {
            return Err(RestoreError::InvalidApicBase(b));
        }
        let bsp = if self.cfg.bsp { APIC_BASE_BSP } else { 0 };
        self.apic_base = (b & !APIC_BASE_BSP) | bsp;
        self.xapic_id_reg = state.xapic_id_reg & 0xFF00_0000;
        self.tpr = state.tpr & 0xFF;
        self.ldr = state.ldr & 0xFF00_0000;
        self.dfr = state.dfr | 0x0FFF_FFFF;
        self.svr = state.svr & SVR_WRITABLE;
        self.isr = state.isr;
        self.tmr = state.tmr;
        self.irr = state.irr;
        self.auto_eoi = state.auto_eoi;
        self.esr = state.esr & 0xFF;
        self.esr_pending = state.esr_pending & 0xFF;
        for (i, lvt) in self.lvt.iter_mut().enumerate() {
            *lvt = state.lvt[i] & LVT_WRITABLE[i];
        }
        self.icr = state.icr & !ICR_BUSY;
        self.timer_initial = state.timer_initial;
        self.timer_divide = state.timer_divide & 0xB;
        self.countdown = Countdown {
            armed: state.countdown_armed,
            start_ns: now_ns.saturating_sub(state.countdown_elapsed_ns),
            first_count: state.countdown_first_count.min(u64::from(u32::MAX)),
            expiries: state.countdown_expiries,
        };
        self.tsc_deadline = state.tsc_deadline;
        self.tsc_deadline_ns = (self.tsc_deadline != 0
            && self.timer_mode() == TimerMode::TscDeadline)
            .then(|| self.tsc_to_ns_deadline(self.tsc_deadline, now_ns, now_tsc));
        self.nmi_pending = state.nmi_pending;
        self.init_pending = state.init_pending;
        self.sipi_pending = state.sipi_pending;
        Ok(())
    }
}

/// The x2APIC logical ID derived from the x2APIC ID: the cluster (ID bits 19:4) in bits 31:16 and one bit
/// for ID bits 3:0.
pub fn x2apic_ldr(apic_id: u32) -> u32 {
    ((apic_id >> 4) << 16) | (1 << (apic_id & 0xF))
}

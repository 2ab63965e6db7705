//! The engine: partition and VP state behind locks, life cycle (create, reset, save/restore) and reference time.

use crate::connections::{ConnectionError, Connections, EventConnection, MessageConnection};
use crate::guest::EngineConfig;
use crate::platform::{Platform, TimerId, VpId, VpWork, VpWorkKind};
use crate::refclock::{next_sequence, RefClock, TscPageStatus};
use crate::state::{
    ConnectionIds, EngineState, PartitionState, RestoreError, VpState, STATE_VERSION,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use tlfs::msr::STIMER_COUNT;
use tlfs::pages::{PAGE_OFFSET_MASK, TSC_PAGE_SCALE_OFFSET, TSC_PAGE_SEQUENCE_OFFSET};

/// Why an engine could not be created.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// `vp_indexes` is empty.
    #[error("the engine needs at least one vCPU")]
    NoVps,
    /// Two vCPUs share a VP index.
    #[error("VP index {0} is used by more than one vCPU")]
    DuplicateVpIndex(u32),
}

/// The Hyper-V engine for one VM. Share it between vCPU threads with `Arc`; see [`crate::platform`] for the
/// threading contract. Lock order: a VP lock before the partition lock, never two VP locks at once; platform calls
/// never re-enter.
pub struct Engine<P: Platform> {
    pub(crate) config: EngineConfig,
    pub(crate) platform: P,
    pub(crate) partition: Mutex<PartitionState>,
    pub(crate) vps: Vec<Mutex<VpState>>,
    pub(crate) connections: RwLock<Connections>,
    /// VP index → vCPU, for flush and IPI VP sets (fixed by the configuration).
    pub(crate) vp_table: crate::flush_ipi::VpIndexTable,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another thread cannot leave the plain-data state inconsistent in a way that matters more than
    // stopping the VM would; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<P: Platform> Engine<P> {
    /// Creates the engine. Reference time starts at 0 at VP 0's current guest TSC.
    pub fn new(config: EngineConfig, platform: P) -> Result<Engine<P>, EngineError> {
        if config.vp_indexes.is_empty() {
            return Err(EngineError::NoVps);
        }
        let mut seen = HashSet::new();
        for &i in &config.vp_indexes {
            if !seen.insert(i) {
                return Err(EngineError::DuplicateVpIndex(i));
            }
        }
        let clock = RefClock::new(platform.tsc_frequency_hz(), platform.guest_tsc(VpId(0)), 0);
        let vps = config
            .vp_indexes
            .iter()
            .map(|&i| Mutex::new(VpState::initial(i)))
            .collect();
        let vp_table = crate::flush_ipi::VpIndexTable::new(&config.vp_indexes);
        Ok(Engine {
            vp_table,
            partition: Mutex::new(PartitionState::initial(clock)),
            vps,
            config,
            platform,
            connections: RwLock::new(Connections::default()),
        })
    }

    /// The platform the engine was created with.
    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// The configuration the engine was created with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Number of vCPUs.
    pub fn vp_count(&self) -> usize {
        self.vps.len()
    }

    pub(crate) fn vp(&self, vp: VpId) -> Option<MutexGuard<'_, VpState>> {
        self.vps.get(vp.index()).map(lock)
    }

    pub(crate) fn part(&self) -> MutexGuard<'_, PartitionState> {
        lock(&self.partition)
    }

    /// The Hyper-V VP index of vCPU `vp` (what VP_INDEX reads), or `None` for an unknown vCPU.
    pub fn vp_index(&self, vp: VpId) -> Option<u32> {
        self.vp(vp).map(|s| s.vp_index)
    }

    /// The vCPU with Hyper-V VP index `index` (for IPI and flush VP sets).
    pub fn vp_by_index(&self, index: u32) -> Option<VpId> {
        // VP indexes are fixed by the configuration (restore refuses another layout): no lock needed.
        if index <= crate::flush_ipi::MAX_SET_VP_INDEX {
            return self.vp_table.get(index);
        }
        self.config
            .vp_indexes
            .iter()
            .position(|&i| i == index)
            .map(|i| VpId(i as u32))
    }

    /// Whether a crash report carries Hyper-V crash information: QEMU attaches `arg1..arg5` to GUEST_PANICKED only
    /// when hv-crash is on (guest CPUID 3.EDX bit 10). CRASH_CTL works without it (KVM), so the VMM asks here.
    pub fn crash_info_available(&self) -> bool {
        self.config.cpuid.features_edx & crate::guest::edx3::CRASH_MSRS != 0
    }

    /// Whether the guest enabled re-enlightenment notifications (REENLIGHTENMENT_CONTROL bit 16), for QEMU's
    /// migration rule that then requires `tsc-frequency=`.
    pub fn reenlightenment_enabled(&self) -> bool {
        tlfs::msr::ReenlightenmentControl::from_bits(self.part().reenlightenment_control).enable()
    }

    /// Partition reference time (TIME_REF_COUNT, 100 ns units) as seen by VP `vp`, from its guest TSC. Uses the
    /// TSC page's parameters when the page is valid, so page ≤ MSR ≤ page holds.
    pub fn reference_time(&self, vp: VpId) -> u64 {
        let p = self.part();
        let tsc = self.platform.guest_tsc(vp);
        match p.tsc_page {
            TscPageStatus::Set(params) => params.ref_time(tsc),
            _ => p.clock.ref_time(tsc),
        }
    }

    /// Re-bases reference time so that it reads `ref_now` at VP 0's current guest TSC, and refreshes an enabled
    /// TSC page (KVM's "host changed" update, honouring the TSC_EMULATION_CONTROL freeze). Call it after the VMM
    /// changed guest TSCs non-monotonically, e.g. `let t = engine.reference_time(VpId(0));` before resetting the
    /// vCPUs' TSCs and `engine.rebase_reference_time(t)` after, so that reference time never steps back.
    pub fn rebase_reference_time(&self, ref_now: u64) {
        let mut p = self.part();
        p.clock = RefClock::new(
            self.platform.tsc_frequency_hz(),
            self.platform.guest_tsc(VpId(0)),
            ref_now,
        );
        self.refresh_tsc_page(&mut p, true);
    }

    /// (Re)writes the reference TSC page per KVM's fill protocol: read the old sequence, write sequence 0, write
    /// scale and offset, write the next valid sequence. A page outside RAM, or a clock the page cannot describe,
    /// leaves it BROKEN (sequence 0 where writable) and TIME_REF_COUNT uses the clock directly.
    pub(crate) fn refresh_tsc_page(&self, p: &mut PartitionState, host_initiated: bool) {
        let msr = tlfs::msr::ReferenceTscMsr::from_bits(p.reference_tsc);
        if !msr.enable() {
            p.tsc_page = TscPageStatus::Unset;
            return;
        }
        if host_initiated && p.tsc_emulation_control != 0 {
            if let TscPageStatus::Set(_) = p.tsc_page {
                // Freeze rule: keep what the guest sees constant while TSC emulation is on.
                return;
            }
        }
        let gpa = p.reference_tsc & !PAGE_OFFSET_MASK;
        let seq_gpa = gpa + TSC_PAGE_SEQUENCE_OFFSET;
        let mut old = [0u8; 4];
        if self.platform.read_gpa(seq_gpa, &mut old).is_err()
            || self
                .platform
                .write_gpa(seq_gpa, &0u32.to_le_bytes())
                .is_err()
        {
            p.tsc_page = TscPageStatus::Broken;
            return;
        }
        self.platform.mark_dirty(gpa, 24);
        let Some(params) = p.clock.page_params() else {
            p.tsc_page = TscPageStatus::Broken;
            return;
        };
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&params.scale.to_le_bytes());
        body[8..].copy_from_slice(&params.offset.to_le_bytes());
        let seq = next_sequence(u32::from_le_bytes(old));
        if self
            .platform
            .write_gpa(gpa + TSC_PAGE_SCALE_OFFSET, &body)
            .is_err()
            || self
                .platform
                .write_gpa(seq_gpa, &seq.to_le_bytes())
                .is_err()
        {
            p.tsc_page = TscPageStatus::Broken;
            return;
        }
        p.tsc_page = TscPageStatus::Set(params);
    }

    /// Clears the Hyper-V partition and VP state as a QEMU system reset does: GUEST_OS_ID, HYPERCALL,
    /// REFERENCE_TSC (page disabled, not touched), crash parameters, re-enlightenment and TSC emulation MSRs
    /// read 0; CRASH_CTL reads bit 63 again; every VP's SynIC is cleared with all SINTs masked, stimers are
    /// disabled and cancelled, the VP assist page is disabled and VP_RUNTIME restarts at 0. VP indexes and the
    /// reference clock are kept (KVM's clock survives a reset; see [`Engine::rebase_reference_time`]).
    /// Call it with every vCPU stopped.
    pub fn reset(&self) {
        for (i, m) in self.vps.iter().enumerate() {
            let id = VpId(i as u32);
            let mut v = lock(m);
            for (t, timer) in v.stimers.iter().enumerate() {
                if timer.armed {
                    self.platform.cancel_timer(id, TimerId(t as u8));
                }
            }
            let had_assist = v.vp_assist_page & 1 != 0;
            let runtime = (self.platform.vp_runtime_ns(id) / 100) as i64;
            *v = VpState {
                runtime_offset: runtime.wrapping_neg(),
                ..VpState::initial(v.vp_index)
            };
            if had_assist {
                self.platform.pv_eoi_page_changed(id, None);
            }
        }
        let mut p = self.part();
        let clock = p.clock;
        *p = PartitionState::initial(clock);
    }

    /// Snapshot of the whole engine state. Call it with every vCPU stopped.
    pub fn save(&self) -> EngineState {
        let mut vps = Vec::with_capacity(self.vps.len());
        // VP_RUNTIME continues across migration: the saved `runtime_offset` is the VP_RUNTIME value itself.
        for (i, m) in self.vps.iter().enumerate() {
            let mut v = lock(m).clone();
            let now = (self.platform.vp_runtime_ns(VpId(i as u32)) / 100) as i64;
            v.runtime_offset = v.runtime_offset.wrapping_add(now);
            vps.push(v);
        }
        EngineState {
            version: STATE_VERSION,
            partition: self.part().clone(),
            vps,
            connections: ConnectionIds::of(
                &self.connections.read().unwrap_or_else(|e| e.into_inner()),
            ),
        }
    }

    /// Restores a state from [`Engine::save`] (possibly from another process). Call it with every vCPU stopped,
    /// after guest RAM and guest TSCs were restored. Nothing is changed on error.
    pub fn restore(&self, state: &EngineState) -> Result<(), RestoreError> {
        if state.version != STATE_VERSION {
            return Err(RestoreError::Version {
                found: state.version,
                expected: STATE_VERSION,
            });
        }
        if state.vps.len() != self.vps.len() {
            return Err(RestoreError::VpCount {
                found: state.vps.len(),
                expected: self.vps.len(),
            });
        }
        for (i, v) in state.vps.iter().enumerate() {
            let expected = self.config.vp_indexes[i];
            if v.vp_index != expected {
                return Err(RestoreError::VpIndex {
                    vp: i,
                    found: v.vp_index,
                    expected,
                });
            }
        }
        state.connections.check(&ConnectionIds::of(
            &self.connections.read().unwrap_or_else(|e| e.into_inner()),
        ))?;
        for (i, (m, v)) in self.vps.iter().zip(&state.vps).enumerate() {
            let id = VpId(i as u32);
            let mut cur = lock(m);
            for (t, timer) in cur.stimers.iter().enumerate() {
                if timer.armed {
                    self.platform.cancel_timer(id, TimerId(t as u8));
                }
            }
            let now = (self.platform.vp_runtime_ns(id) / 100) as i64;
            *cur = VpState {
                runtime_offset: v.runtime_offset.wrapping_sub(now),
                ..v.clone()
            };
            let assist =
                (cur.vp_assist_page & 1 != 0).then_some(cur.vp_assist_page & !PAGE_OFFSET_MASK);
            self.platform.pv_eoi_page_changed(id, assist);
        }
        *self.part() = state.partition.clone();
        self.rearm_stimers();
        Ok(())
    }

    /// Timer `timer` of VP `vp` expired (see [`Platform::arm_timer`]). Call on VP `vp`'s thread. Stale or unknown
    /// expiries are ignored; an early one re-arms the timer.
    pub fn timer_expired(&self, vp: VpId, timer: TimerId) {
        let n = usize::from(timer.0);
        let Some(mut v) = self.vp(vp) else { return };
        if n >= STIMER_COUNT || !v.stimers[n].armed {
            return;
        }
        v.stimers[n].armed = false;
        let now = || self.reference_time(vp);
        crate::stimer::process(&self.platform, vp, &mut v, n, &now);
    }

    /// Runs deferred work queued with [`Platform::run_on_vp`]. Call on VP `vp`'s thread.
    pub fn run_vp_work(&self, vp: VpId, work: VpWork) {
        match work.0 {
            VpWorkKind::SynicRetry(mask) => {
                let Some(mut v) = self.vp(vp) else { return };
                let now = || self.reference_time(vp);
                crate::stimer::retry_acked(&self.platform, vp, &mut v, mask, &now);
            }
        }
    }

    /// Registers the HvCallPostMessage handler for `connection_id` (24 bits).
    pub fn register_message_connection(
        &self,
        connection_id: u32,
        handler: Arc<dyn MessageConnection>,
    ) -> Result<(), ConnectionError> {
        if connection_id & !tlfs::hypercall::CONNECTION_ID_MASK != 0 {
            return Err(ConnectionError::InvalidId(connection_id));
        }
        let mut c = self.connections.write().unwrap_or_else(|e| e.into_inner());
        if c.messages.contains_key(&connection_id) {
            return Err(ConnectionError::InUse(connection_id));
        }
        c.messages.insert(connection_id, handler);
        Ok(())
    }

    /// Registers the HvCallSignalEvent handler for `connection_id` (24 bits).
    pub fn register_event_connection(
        &self,
        connection_id: u32,
        handler: Arc<dyn EventConnection>,
    ) -> Result<(), ConnectionError> {
        if connection_id & !tlfs::hypercall::CONNECTION_ID_MASK != 0 {
            return Err(ConnectionError::InvalidId(connection_id));
        }
        let mut c = self.connections.write().unwrap_or_else(|e| e.into_inner());
        if c.events.contains_key(&connection_id) {
            return Err(ConnectionError::InUse(connection_id));
        }
        c.events.insert(connection_id, handler);
        Ok(())
    }

    /// Removes the message handler of `connection_id`; returns whether one was registered.
    pub fn unregister_message_connection(&self, connection_id: u32) -> bool {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .messages
            .remove(&connection_id)
            .is_some()
    }

    /// Removes the event handler of `connection_id`; returns whether one was registered.
    pub fn unregister_event_connection(&self, connection_id: u32) -> bool {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .events
            .remove(&connection_id)
            .is_some()
    }
}

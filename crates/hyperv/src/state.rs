//! Engine state and its save/restore format.
//!
//! [`EngineState`] is the complete, self-describing engine state (partition + every VP). It is serialised with
//! serde (the VMM picks the encoding; JSON works) and carries [`STATE_VERSION`]. Restore refuses another version or
//! another vCPU count with a [`RestoreError`] naming the mismatch. Guest pages the engine wrote (hypercall, TSC,
//! SynIC, assist pages) travel with guest RAM; they were marked dirty when written.

use crate::refclock::{RefClock, TscPageStatus};
use crate::stimer::StimerState;
use crate::synic::SynicState;
use serde::{Deserialize, Serialize};
use tlfs::msr::{CRASH_CTL_NOTIFY, CRASH_PARAM_COUNT, STIMER_COUNT};

/// Version of [`EngineState`]. Bump on any incompatible change; issue 8 extends it.
pub const STATE_VERSION: u32 = 1;

/// Partition-wide Hyper-V state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// GUEST_OS_ID.
    pub guest_os_id: u64,
    /// HYPERCALL, as stored (all 64 bits).
    pub hypercall: u64,
    /// REFERENCE_TSC, as stored (all 64 bits).
    pub reference_tsc: u64,
    /// What the reference TSC page currently holds.
    pub tsc_page: TscPageStatus,
    /// The reference clock (guest TSC → reference time).
    pub clock: RefClock,
    /// CRASH_P0..P4.
    pub crash_params: [u64; CRASH_PARAM_COUNT],
    /// CRASH_CTL read value (host-set: bit 63, advertising crash notification).
    pub crash_ctl: u64,
    /// REENLIGHTENMENT_CONTROL.
    pub reenlightenment_control: u64,
    /// TSC_EMULATION_CONTROL.
    pub tsc_emulation_control: u64,
    /// TSC_EMULATION_STATUS.
    pub tsc_emulation_status: u64,
    /// TSC_INVARIANT_CONTROL.
    pub tsc_invariant_control: u64,
}

impl PartitionState {
    /// The state after creation or system reset, keeping the reference clock.
    pub fn initial(clock: RefClock) -> PartitionState {
        PartitionState {
            guest_os_id: 0,
            hypercall: 0,
            reference_tsc: 0,
            tsc_page: TscPageStatus::Unset,
            clock,
            crash_params: [0; CRASH_PARAM_COUNT],
            crash_ctl: CRASH_CTL_NOTIFY,
            reenlightenment_control: 0,
            tsc_emulation_control: 0,
            tsc_emulation_status: 0,
            tsc_invariant_control: 0,
        }
    }
}

/// Per-VP Hyper-V state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpState {
    /// VP_INDEX.
    pub vp_index: u32,
    /// Added to the thread's CPU time (100 ns units) to form VP_RUNTIME; set so that VP_RUNTIME restarts at 0 on
    /// reset. In a saved [`EngineState`] it holds the VP_RUNTIME value at save time, so that VP_RUNTIME continues
    /// across migration.
    pub runtime_offset: i64,
    /// VP_ASSIST_PAGE, as stored.
    pub vp_assist_page: u64,
    /// SynIC registers.
    pub synic: SynicState,
    /// Synthetic timers.
    pub stimers: [StimerState; STIMER_COUNT],
}

impl VpState {
    /// The state after creation or reset.
    pub fn initial(vp_index: u32) -> VpState {
        VpState {
            vp_index,
            runtime_offset: 0,
            vp_assist_page: 0,
            synic: SynicState::initial(),
            stimers: [StimerState::default(); STIMER_COUNT],
        }
    }
}

/// The complete engine state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineState {
    /// [`STATE_VERSION`] at save time.
    pub version: u32,
    /// Partition-wide state.
    pub partition: PartitionState,
    /// One entry per vCPU, indexed by [`crate::VpId`].
    pub vps: Vec<VpState>,
    /// The HvCallPostMessage / HvCallSignalEvent connections registered at save time (absent in states
    /// saved before they were recorded: none).
    #[serde(default)]
    pub connections: ConnectionIds,
}

/// The ids of the registered message and event connections, ascending. Their handlers belong to the VMM (a
/// device such as hyperv-testdev registered them), so they are not part of the engine's state: the
/// destination's devices register them again from their own saved state before [`crate::Engine::restore`],
/// which checks that exactly these ids are registered, so that no message or event to a connection is lost.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionIds {
    /// Message connection ids.
    pub messages: Vec<u32>,
    /// Event connection ids.
    pub events: Vec<u32>,
}

impl ConnectionIds {
    /// The ids registered in `c`.
    pub(crate) fn of(c: &crate::connections::Connections) -> ConnectionIds {
        let mut messages: Vec<u32> = c.messages.keys().copied().collect();
        let mut events: Vec<u32> = c.events.keys().copied().collect();
        messages.sort_unstable();
        events.sort_unstable();
        ConnectionIds { messages, events }
    }

    /// Checks that `registered` (this engine's) has exactly the saved connections.
    pub(crate) fn check(&self, registered: &ConnectionIds) -> Result<(), RestoreError> {
        for (kind, saved, have) in [
            ("message", &self.messages, &registered.messages),
            ("event", &self.events, &registered.events),
        ] {
            let mut saved = saved.clone();
            saved.sort_unstable();
            if &saved != have {
                return Err(RestoreError::Connections {
                    kind,
                    saved,
                    registered: have.clone(),
                });
            }
        }
        Ok(())
    }
}

/// Why a state could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The state was saved by another format version.
    #[error("engine state version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
    /// The state has another number of vCPUs.
    #[error("engine state has {found} vCPUs but this VM has {expected}")]
    VpCount { found: usize, expected: usize },
    /// The registered connections differ from the saved ones.
    #[error(
        "engine state has {kind} connections {saved:?} but this VM registered {registered:?} (a device did \
         not restore its connections)"
    )]
    Connections {
        kind: &'static str,
        saved: Vec<u32>,
        registered: Vec<u32>,
    },
    /// A VP index in the state differs from the configured one.
    #[error("engine state gives vCPU {vp} VP index {found} but this VM uses {expected}")]
    VpIndex {
        vp: usize,
        found: u32,
        expected: u32,
    },
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing::FakePlatform;
    use crate::{Engine, EngineConfig, EventConnection, MessageConnection, VpId};

    struct Sink;

    impl MessageConnection for Sink {
        fn post_message(&self, _vp: VpId, _message_type: u32, _payload: &[u8]) -> u16 {
            0
        }
    }

    impl EventConnection for Sink {
        fn signal_event(&self, _vp: VpId) -> u16 {
            0
        }
    }

    fn engine() -> Engine<FakePlatform> {
        Engine::new(
            EngineConfig::new(Default::default(), false, 1),
            FakePlatform::new(1 << 20, 1, 1_000_000_000),
        )
        .unwrap()
    }

    fn register(e: &Engine<FakePlatform>, messages: &[u32], events: &[u32]) {
        for &m in messages {
            e.register_message_connection(m, Arc::new(Sink)).unwrap();
        }
        for &v in events {
            e.register_event_connection(v, Arc::new(Sink)).unwrap();
        }
    }

    #[test]
    fn connections_are_saved_and_must_be_registered_again() {
        let src = engine();
        register(&src, &[7, 3], &[5]);
        let saved = src.save();
        assert_eq!(
            saved.connections,
            ConnectionIds {
                messages: vec![3, 7],
                events: vec![5],
            }
        );
        // (destination's messages, events, expected error fragment or None)
        let cases: &[(&[u32], &[u32], Option<&str>)] = &[
            (&[3, 7], &[5], None),
            (
                &[],
                &[],
                Some("message connections [3, 7] but this VM registered []"),
            ),
            (
                &[3],
                &[5],
                Some("message connections [3, 7] but this VM registered [3]"),
            ),
            (
                &[3, 7],
                &[],
                Some("event connections [5] but this VM registered []"),
            ),
            (&[3, 7, 9], &[5], Some("registered [3, 7, 9]")),
        ];
        for (messages, events, err) in cases {
            let dst = engine();
            register(&dst, messages, events);
            let before = dst.save();
            match (dst.restore(&saved), err) {
                (Ok(()), None) => assert_eq!(dst.save().connections, saved.connections),
                (Err(e), Some(frag)) => {
                    assert!(e.to_string().contains(frag), "{messages:?} {events:?}: {e}");
                    assert_eq!(
                        dst.save().partition,
                        before.partition,
                        "refused but changed"
                    );
                }
                (r, _) => panic!("{messages:?} {events:?}: unexpected {r:?}"),
            }
        }
    }

    #[test]
    fn states_without_connections_still_load() {
        let mut v = serde_json::to_value(engine().save()).unwrap();
        v.as_object_mut().unwrap().remove("connections");
        let s: EngineState = serde_json::from_value(v).unwrap();
        assert_eq!(s.connections, ConnectionIds::default());
        assert!(engine().restore(&s).is_ok());
    }
}

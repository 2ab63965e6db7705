//! QEMU's `hyperv-testdev` at I/O port 0x3000, wired into the Hyper-V engine's SynIC.
//!
//! Each 32-bit write is one command: SINT number in bits 7:0, VP index in bits 15:8, command in bits 23:16,
//! connection id in bits 31:24. Reads return 0 (except after the enlighten-only [`CMD_LATCH_EXITS`] command).
//!
//! | cmd | name | effect |
//! |---|---|---|
//! | 1 | SINT_ROUTE_CREATE | route to SINT `sint` of VP `vp` (the VP must exist and have a SynIC) |
//! | 2 | SINT_ROUTE_DESTROY | removes it |
//! | 3 | SINT_ROUTE_SET_SINT | raises the SINT of an existing route (masked / auto-EOI rules apply) |
//! | 4 | MSG_CONN_CREATE | HvCallPostMessage on connection `conn` echoes the message into slot `sint` of VP `vp` |
//! | 5 | MSG_CONN_DESTROY | removes it |
//! | 6 | EVT_CONN_CREATE | HvCallSignalEvent on `conn` sets flag `conn` of slot `sint` of VP `vp` |
//! | 7 | EVT_CONN_DESTROY | removes it |
//!
//! Where QEMU asserts (a route or connection that does not exist, a VP without SynIC, a message that cannot be
//! delivered) this device ignores the command. The message echo uses one staging buffer per connection: while
//! an echo waits for a busy slot (its `msg_pending` is set) a second post returns INSUFFICIENT_BUFFERS, and the
//! staged echo is retried when the guest acknowledges that SINT (EOM, or the EOI of its vector), on the target
//! vCPU's thread.
//!
//! Without `-device hyperv-testdev` the port keeps the placeholder that ignores every write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use hyperv::{Engine, EventConnection, MessageConnection, SynicError, VpId};
use tlfs::hypercall as hc;

use super::{le_value, DeviceAction, PioDevice};
use crate::hv::VmmPlatform;

/// Creates a SINT route.
pub const CMD_SINT_ROUTE_CREATE: u8 = 1;
/// Destroys a SINT route.
pub const CMD_SINT_ROUTE_DESTROY: u8 = 2;
/// Fires a SINT route.
pub const CMD_SINT_ROUTE_SET_SINT: u8 = 3;
/// Creates a message (echo) connection.
pub const CMD_MSG_CONN_CREATE: u8 = 4;
/// Destroys a message connection.
pub const CMD_MSG_CONN_DESTROY: u8 = 5;
/// Creates an event connection.
pub const CMD_EVT_CONN_CREATE: u8 = 6;
/// Destroys an event connection.
pub const CMD_EVT_CONN_DESTROY: u8 = 7;
/// enlighten extension (QEMU ignores unknown commands): latch the KVM exit count of VP `vp`; the next two
/// 32-bit reads return its low and high halves. Used by guest tests to count the exits exit-less EOI saves.
pub const CMD_LATCH_EXITS: u8 = 0x80;

/// One decoded command word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// SINT number (bits 7:0).
    pub sint: u8,
    /// VP index (bits 15:8).
    pub vp: u8,
    /// Command (bits 23:16).
    pub cmd: u8,
    /// Connection id (bits 31:24).
    pub conn: u8,
}

impl Command {
    /// Splits a 32-bit command word.
    pub fn decode(v: u32) -> Command {
        let [sint, vp, cmd, conn] = v.to_le_bytes();
        Command {
            sint,
            vp,
            cmd,
            conn,
        }
    }
}

type HvEngine = Engine<VmmPlatform>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    vp: VpId,
    sint: u8,
}

struct Staged {
    target: Target,
    message_type: u32,
    payload: Vec<u8>,
}

#[derive(Default)]
struct State {
    routes: HashSet<(u32, u8)>,
    msg_conns: HashMap<u8, Target>,
    evt_conns: HashMap<u8, Target>,
    /// Echoes waiting for their slot, by connection.
    staged: HashMap<u8, Staged>,
    /// Latched exit count and how many halves were read.
    latched: Option<(u64, u8)>,
}

struct Inner {
    engine: OnceLock<Weak<HvEngine>>,
    state: Mutex<State>,
    /// Echoes staged or about to be (see [`crate::hv::VmmPlatform::set_sint_ack_listener`]).
    waiting: Arc<AtomicUsize>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn engine(&self) -> Option<Arc<HvEngine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    /// Tries to copy a staged echo into its slot. Returns true when the staging buffer is free again (delivered,
    /// or lost because the target cannot take messages), false while the slot is busy.
    fn try_deliver(engine: &HvEngine, s: &Staged) -> bool {
        match engine.post_message(s.target.vp, s.target.sint, s.message_type, &s.payload) {
            Ok(()) => true,
            Err(SynicError::Busy) => false,
            // Masked: the message is in the slot, only the interrupt is suppressed.
            Err(SynicError::Masked) => true,
            Err(e) => {
                tracing::debug!(vp = s.target.vp.0, sint = s.target.sint, %e, "hyperv-testdev echo lost");
                true
            }
        }
    }

    fn command(self: &Arc<Inner>, c: Command) {
        let Some(engine) = self.engine() else {
            return;
        };
        let mut st = lock(&self.state);
        let target = || {
            engine.vp_by_index(u32::from(c.vp)).and_then(|vp| {
                (usize::from(c.sint) < tlfs::msr::SINT_COUNT && engine.config().synic)
                    .then_some(Target { vp, sint: c.sint })
            })
        };
        match c.cmd {
            CMD_SINT_ROUTE_CREATE if target().is_some() => {
                st.routes.insert((u32::from(c.vp), c.sint));
            }
            CMD_SINT_ROUTE_DESTROY => {
                st.routes.remove(&(u32::from(c.vp), c.sint));
            }
            CMD_SINT_ROUTE_SET_SINT if st.routes.contains(&(u32::from(c.vp), c.sint)) => {
                if let Some(t) = target() {
                    // Masked SINT: nothing happens, as in KVM.
                    let _ = engine.raise_sint(t.vp, t.sint);
                }
            }
            CMD_MSG_CONN_CREATE => {
                if let (Some(t), false) = (target(), st.msg_conns.contains_key(&c.conn)) {
                    let h = Arc::new(MsgConn {
                        inner: Arc::downgrade(self),
                        conn: c.conn,
                    });
                    if engine
                        .register_message_connection(u32::from(c.conn), h)
                        .is_ok()
                    {
                        st.msg_conns.insert(c.conn, t);
                    }
                }
            }
            CMD_MSG_CONN_DESTROY if st.msg_conns.remove(&c.conn).is_some() => {
                engine.unregister_message_connection(u32::from(c.conn));
                if st.staged.remove(&c.conn).is_some() {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                }
            }
            CMD_EVT_CONN_CREATE => {
                if let (Some(t), false) = (target(), st.evt_conns.contains_key(&c.conn)) {
                    let h = Arc::new(EvtConn {
                        inner: Arc::downgrade(self),
                        conn: c.conn,
                    });
                    if engine
                        .register_event_connection(u32::from(c.conn), h)
                        .is_ok()
                    {
                        st.evt_conns.insert(c.conn, t);
                    }
                }
            }
            CMD_EVT_CONN_DESTROY if st.evt_conns.remove(&c.conn).is_some() => {
                engine.unregister_event_connection(u32::from(c.conn));
            }
            CMD_LATCH_EXITS => {
                let count = engine
                    .vp_by_index(u32::from(c.vp))
                    .and_then(|vp| engine.platform().handle().exit_count(vp.index()));
                st.latched = count.map(|n| (n, 0));
            }
            _ => {}
        }
    }

    fn read(&self) -> u32 {
        let mut st = lock(&self.state);
        match st.latched {
            Some((n, 0)) => {
                st.latched = Some((n, 1));
                n as u32
            }
            Some((n, _)) => {
                st.latched = None;
                (n >> 32) as u32
            }
            None => 0,
        }
    }

    /// The guest acknowledged `sints` of `vp`: retry the staged echoes waiting there. On `vp`'s thread.
    fn acked(&self, vp: VpId, sints: u16) {
        let Some(engine) = self.engine() else {
            return;
        };
        let mut st = lock(&self.state);
        let waiting: Vec<u8> = st
            .staged
            .iter()
            .filter(|(_, s)| s.target.vp == vp && sints & (1u16 << (s.target.sint & 15)) != 0)
            .map(|(&c, _)| c)
            .collect();
        for conn in waiting {
            let done = st
                .staged
                .get(&conn)
                .is_some_and(|s| Inner::try_deliver(&engine, s));
            if done && st.staged.remove(&conn).is_some() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

struct MsgConn {
    inner: Weak<Inner>,
    conn: u8,
}

impl MessageConnection for MsgConn {
    fn post_message(&self, _vp: VpId, message_type: u32, payload: &[u8]) -> u16 {
        let (Some(inner), true) = (
            self.inner.upgrade(),
            payload.len() <= hc::MESSAGE_PAYLOAD_MAX as usize,
        ) else {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        };
        let Some(engine) = inner.engine() else {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        };
        let mut st = lock(&inner.state);
        let Some(&target) = st.msg_conns.get(&self.conn) else {
            return hc::STATUS_INVALID_HYPERCALL_INPUT;
        };
        if st.staged.contains_key(&self.conn) {
            return hc::STATUS_INSUFFICIENT_BUFFERS;
        }
        let staged = Staged {
            target,
            message_type,
            payload: payload.to_vec(),
        };
        // Counted before the attempt: an acknowledgement racing with a busy slot must not be missed.
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        if Inner::try_deliver(&engine, &staged) {
            inner.waiting.fetch_sub(1, Ordering::SeqCst);
        } else {
            st.staged.insert(self.conn, staged);
        }
        hc::STATUS_SUCCESS
    }
}

struct EvtConn {
    inner: Weak<Inner>,
    conn: u8,
}

impl EventConnection for EvtConn {
    fn signal_event(&self, _vp: VpId) -> u16 {
        let Some(inner) = self.inner.upgrade() else {
            return hc::STATUS_INVALID_CONNECTION_ID;
        };
        let Some(engine) = inner.engine() else {
            return hc::STATUS_INVALID_CONNECTION_ID;
        };
        let target = lock(&inner.state).evt_conns.get(&self.conn).copied();
        if let Some(t) = target {
            // SCONTROL or SIEFP disabled, page outside RAM: the event is dropped (QEMU asserts).
            if let Err(e) = engine.signal_event_flag(t.vp, t.sint, u32::from(self.conn)) {
                tracing::debug!(vp = t.vp.0, sint = t.sint, %e, "hyperv-testdev event dropped");
            }
        }
        hc::STATUS_SUCCESS
    }
}

/// The port device (put it on the bus at [`super::HYPERV_TESTDEV_PORT`], 4 ports).
pub struct HypervTestDev {
    inner: Arc<Inner>,
}

/// The link that connects a [`HypervTestDev`] to the engine once the engine exists.
#[derive(Clone)]
pub struct HypervTestDevLink {
    inner: Arc<Inner>,
}

impl HypervTestDev {
    /// A device not yet connected (commands are ignored until [`HypervTestDevLink::attach`]).
    pub fn new() -> (HypervTestDev, HypervTestDevLink) {
        let inner = Arc::new(Inner {
            engine: OnceLock::new(),
            state: Mutex::new(State::default()),
            waiting: Arc::new(AtomicUsize::new(0)),
        });
        (
            HypervTestDev {
                inner: inner.clone(),
            },
            HypervTestDevLink { inner },
        )
    }

    /// Checks a saved `hyperv-testdev` device state as [`PioDevice::restore_state`] does before it changes
    /// anything, for a device connected to an engine with `engine = Some((vcpus, synic))` (or not connected:
    /// `None`), and returns the state a save writes after that restore: restoring it again is accepted and gives
    /// itself. Pure: for tests and the fuzz harness (the real restore also re-registers the connections with
    /// the engine).
    pub fn check_state(
        version: u32,
        state: &serde_json::Value,
        engine: Option<(usize, bool)>,
    ) -> Result<serde_json::Value, String> {
        let saved: SavedTestDev = super::decode_state(version, TESTDEV_STATE_VERSION, state)?;
        let st = check_saved(saved, engine)?;
        Ok(super::encode_state(&saved_of(&st)))
    }
}

impl HypervTestDevLink {
    /// Connects the device to `engine` (once; later calls are ignored) and subscribes to SINT
    /// acknowledgements for the message-echo retries.
    pub fn attach(&self, engine: &Arc<HvEngine>) {
        if self.inner.engine.set(Arc::downgrade(engine)).is_err() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        engine.platform().set_sint_ack_listener(
            Arc::new(move |vp: VpId, sints: u16| {
                if let Some(inner) = weak.upgrade() {
                    inner.acked(vp, sints);
                }
            }),
            self.inner.waiting.clone(),
        );
    }
}

/// Schema version of the device's saved state.
const TESTDEV_STATE_VERSION: u32 = 1;

/// A route or connection target: vCPU index and SINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedTarget {
    vp: u32,
    sint: u8,
}

/// An echo waiting for its message slot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedEcho {
    conn: u8,
    target: SavedTarget,
    message_type: u32,
    payload: Vec<u8>,
}

/// The device's state: its SINT routes, message and event connections (re-registered with the destination's
/// engine), the echoes waiting for a slot and the exit-count latch.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedTestDev {
    routes: Vec<(u32, u8)>,
    msg_conns: Vec<(u8, SavedTarget)>,
    evt_conns: Vec<(u8, SavedTarget)>,
    staged: Vec<SavedEcho>,
    latched: Option<(u64, u8)>,
}

fn saved_target(t: Target) -> SavedTarget {
    SavedTarget {
        vp: t.vp.0,
        sint: t.sint,
    }
}

/// The saved form of `st`, in a stable order (equal states save equally).
fn saved_of(st: &State) -> SavedTestDev {
    let mut s = SavedTestDev {
        routes: st.routes.iter().copied().collect(),
        msg_conns: st
            .msg_conns
            .iter()
            .map(|(&c, &t)| (c, saved_target(t)))
            .collect(),
        evt_conns: st
            .evt_conns
            .iter()
            .map(|(&c, &t)| (c, saved_target(t)))
            .collect(),
        staged: st
            .staged
            .iter()
            .map(|(&conn, e)| SavedEcho {
                conn,
                target: saved_target(e.target),
                message_type: e.message_type,
                payload: e.payload.clone(),
            })
            .collect(),
        latched: st.latched,
    };
    s.routes.sort_unstable();
    s.msg_conns.sort_unstable_by_key(|&(c, _)| c);
    s.evt_conns.sort_unstable_by_key(|&(c, _)| c);
    s.staged.sort_unstable_by_key(|e| e.conn);
    s
}

/// What a restore checks, with nothing changed: `engine` is the connected engine's vCPU count and whether it
/// has a SynIC (`None`: not connected, so no connection or echo can be restored). Returns the state the
/// restore installs. Routes name a VP index (a command's byte) and a SINT below 16, each once; connections
/// and echoes name an existing vCPU's SynIC SINT, each connection once, an echo only on an existing message
/// connection with at most 240 payload bytes. So an accepted state has at most 4096 routes, 256 connections
/// of each kind and 256 echoes.
fn check_saved(saved: SavedTestDev, engine: Option<(usize, bool)>) -> Result<State, String> {
    let target = |t: SavedTarget| -> Result<Target, String> {
        let (vps, synic) = engine.ok_or("the device is not connected to the Hyper-V engine")?;
        let ok = (t.vp as usize) < vps && usize::from(t.sint) < tlfs::msr::SINT_COUNT && synic;
        ok.then_some(Target {
            vp: VpId(t.vp),
            sint: t.sint,
        })
        .ok_or_else(|| format!("no SynIC SINT {} on vCPU {}", t.sint, t.vp))
    };
    let mut routes = HashSet::new();
    for &(vp, sint) in &saved.routes {
        if vp > u32::from(u8::MAX) || usize::from(sint) >= tlfs::msr::SINT_COUNT {
            return Err(format!("a SINT route to SINT {sint} of VP index {vp}"));
        }
        if !routes.insert((vp, sint)) {
            return Err(format!(
                "the route to SINT {sint} of VP index {vp} appears twice"
            ));
        }
    }
    let mut msg_conns = HashMap::new();
    for &(c, t) in &saved.msg_conns {
        if msg_conns.insert(c, target(t)?).is_some() {
            return Err(format!("message connection {c} appears twice"));
        }
    }
    let mut evt_conns = HashMap::new();
    for &(c, t) in &saved.evt_conns {
        if evt_conns.insert(c, target(t)?).is_some() {
            return Err(format!("event connection {c} appears twice"));
        }
    }
    let mut staged = HashMap::new();
    for e in saved.staged {
        if !msg_conns.contains_key(&e.conn) {
            return Err(format!(
                "a waiting echo on connection {} has no connection",
                e.conn
            ));
        }
        if e.payload.len() > hc::MESSAGE_PAYLOAD_MAX as usize {
            return Err(format!(
                "a waiting echo of {} bytes (at most {})",
                e.payload.len(),
                hc::MESSAGE_PAYLOAD_MAX
            ));
        }
        let s = Staged {
            target: target(e.target)?,
            message_type: e.message_type,
            payload: e.payload,
        };
        if staged.insert(e.conn, s).is_some() {
            return Err(format!("two waiting echoes on connection {}", e.conn));
        }
    }
    Ok(State {
        routes,
        msg_conns,
        evt_conns,
        staged,
        latched: saved.latched,
    })
}

impl Inner {
    fn save(&self) -> SavedTestDev {
        saved_of(&lock(&self.state))
    }

    /// Replaces the device's state with `saved`, re-registering its connections with the engine. Everything
    /// is checked first; only a connection id that something else registered with the engine meanwhile can
    /// fail half-way.
    fn restore(self: &Arc<Inner>, saved: SavedTestDev) -> Result<(), String> {
        let engine = self.engine();
        let new = check_saved(
            saved,
            engine
                .as_ref()
                .map(|e| (e.config().vp_indexes.len(), e.config().synic)),
        )?;
        let mut st = lock(&self.state);
        if let Some(engine) = engine.as_ref() {
            for &c in st.msg_conns.keys() {
                engine.unregister_message_connection(u32::from(c));
            }
            for &c in st.evt_conns.keys() {
                engine.unregister_event_connection(u32::from(c));
            }
            for &c in new.msg_conns.keys() {
                let h = Arc::new(MsgConn {
                    inner: Arc::downgrade(self),
                    conn: c,
                });
                engine
                    .register_message_connection(u32::from(c), h)
                    .map_err(|e| format!("message connection {c}: {e}"))?;
            }
            for &c in new.evt_conns.keys() {
                let h = Arc::new(EvtConn {
                    inner: Arc::downgrade(self),
                    conn: c,
                });
                engine
                    .register_event_connection(u32::from(c), h)
                    .map_err(|e| format!("event connection {c}: {e}"))?;
            }
        }
        self.waiting.fetch_sub(st.staged.len(), Ordering::SeqCst);
        self.waiting.fetch_add(new.staged.len(), Ordering::SeqCst);
        *st = new;
        Ok(())
    }
}

impl PioDevice for HypervTestDev {
    fn save_state(&self) -> Option<(&'static str, u32, serde_json::Value)> {
        Some((
            "hyperv-testdev",
            TESTDEV_STATE_VERSION,
            super::encode_state(&self.inner.save()),
        ))
    }

    fn restore_state(&mut self, version: u32, state: &serde_json::Value) -> Result<(), String> {
        let saved: SavedTestDev = super::decode_state(version, TESTDEV_STATE_VERSION, state)?;
        self.inner.restore(saved)
    }

    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.inner.read().to_le_bytes());
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        // Only aligned 32-bit accesses are commands (QEMU's region accepts nothing else).
        if offset == 0 && data.len() == 4 {
            self.inner.command(Command::decode(le_value(data) as u32));
        }
        DeviceAction::None
    }

    fn reset(&mut self) {
        // Routes and connections are QEMU device state that survives a guest reset only as long as the
        // guest does not recreate them; drop the in-flight echoes and the exit latch, keep the table (the
        // engine's connection table is not reset either).
        let mut st = lock(&self.inner.state);
        self.inner
            .waiting
            .fetch_sub(st.staged.len(), Ordering::SeqCst);
        st.staged.clear();
        st.latched = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words_decode() {
        let cases = [
            (
                0x0401_0203u32,
                Command {
                    sint: 3,
                    vp: 2,
                    cmd: 1,
                    conn: 4,
                },
            ),
            (
                0xFF07_0000,
                Command {
                    sint: 0,
                    vp: 0,
                    cmd: 7,
                    conn: 0xFF,
                },
            ),
            (
                0x0003_010F,
                Command {
                    sint: 15,
                    vp: 1,
                    cmd: 3,
                    conn: 0,
                },
            ),
        ];
        for (word, want) in cases {
            assert_eq!(Command::decode(word), want, "{word:#x}");
        }
    }

    /// The pure check, as the restore applies it: accepted states come back in save form (which is accepted
    /// again and gives itself), refused ones with their reason; an unattached device takes routes and the
    /// latch only, and restores exactly what the check returns; a refused restore changes nothing.
    #[test]
    fn saved_states_are_checked_before_anything_changes() {
        use serde_json::json;
        let t = |vp: u32, sint: u8| json!({"vp": vp, "sint": sint});
        let base = |routes, msg, evt, staged| {
            json!({"routes": routes, "msg_conns": msg, "evt_conns": evt, "staged": staged,
                   "latched": [5, 1]})
        };
        let echo = |conn: u8, len: usize| json!({"conn": conn, "target": t(1, 2), "message_type": 7, "payload": vec![0u8; len]});
        let two = Some((2usize, true));
        type Case = (
            &'static str,
            serde_json::Value,
            Option<(usize, bool)>,
            Result<(), &'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "empty",
                base(json!([]), json!([]), json!([]), json!([])),
                None,
                Ok(()),
            ),
            (
                "routes, unattached",
                base(
                    json!([[3, 15], [0, 0], [255, 1]]),
                    json!([]),
                    json!([]),
                    json!([]),
                ),
                None,
                Ok(()),
            ),
            (
                "route SINT 16",
                base(json!([[0, 16]]), json!([]), json!([]), json!([])),
                two,
                Err("a SINT route to SINT 16 of VP index 0"),
            ),
            (
                "route VP index 256",
                base(json!([[256, 0]]), json!([]), json!([]), json!([])),
                two,
                Err("VP index 256"),
            ),
            (
                "route twice",
                base(json!([[1, 1], [1, 1]]), json!([]), json!([]), json!([])),
                two,
                Err("appears twice"),
            ),
            (
                "connections and an echo",
                base(
                    json!([]),
                    json!([[9, t(1, 2)]]),
                    json!([[4, t(0, 15)]]),
                    json!([echo(9, 240)]),
                ),
                two,
                Ok(()),
            ),
            (
                "a connection, unattached",
                base(json!([]), json!([[9, t(1, 2)]]), json!([]), json!([])),
                None,
                Err("not connected to the Hyper-V engine"),
            ),
            (
                "no SynIC",
                base(json!([]), json!([]), json!([[4, t(0, 1)]]), json!([])),
                Some((2, false)),
                Err("no SynIC SINT 1 on vCPU 0"),
            ),
            (
                "vCPU beyond the count",
                base(json!([]), json!([[9, t(2, 2)]]), json!([]), json!([])),
                two,
                Err("no SynIC SINT 2 on vCPU 2"),
            ),
            (
                "connection twice",
                base(
                    json!([]),
                    json!([]),
                    json!([[4, t(0, 1)], [4, t(1, 1)]]),
                    json!([]),
                ),
                two,
                Err("event connection 4 appears twice"),
            ),
            (
                "echo without connection",
                base(
                    json!([]),
                    json!([[9, t(1, 2)]]),
                    json!([]),
                    json!([echo(8, 1)]),
                ),
                two,
                Err("has no connection"),
            ),
            (
                "echo too long",
                base(
                    json!([]),
                    json!([[9, t(1, 2)]]),
                    json!([]),
                    json!([echo(9, 241)]),
                ),
                two,
                Err("a waiting echo of 241 bytes"),
            ),
            (
                "two echoes",
                base(
                    json!([]),
                    json!([[9, t(1, 2)]]),
                    json!([]),
                    json!([echo(9, 1), echo(9, 2)]),
                ),
                two,
                Err("two waiting echoes on connection 9"),
            ),
            ("not an object", json!(17), two, Err("does not decode")),
        ];
        for (name, v, engine, want) in cases {
            let got = HypervTestDev::check_state(1, &v, engine);
            match (&got, want) {
                (Ok(saved), Ok(())) => {
                    let again = HypervTestDev::check_state(1, saved, engine);
                    assert_eq!(again.as_ref(), Ok(saved), "{name}: not a fixed point");
                }
                (Err(e), Err(frag)) => assert!(e.contains(frag), "{name}: {e}"),
                _ => panic!("{name}: got {got:?}, want {want:?}"),
            }
            // An unattached device restores exactly what the unattached check accepts, and nothing else.
            let (mut dev, _link) = HypervTestDev::new();
            let before = base(json!([[7, 7]]), json!([]), json!([]), json!([]));
            dev.restore_state(1, &before).unwrap();
            let saved_before = dev.save_state();
            match HypervTestDev::check_state(1, &v, None) {
                Ok(want) => {
                    dev.restore_state(1, &v).unwrap();
                    assert_eq!(dev.save_state().map(|s| s.2), Some(want), "{name}");
                }
                Err(e) => {
                    assert_eq!(dev.restore_state(1, &v), Err(e), "{name}");
                    assert_eq!(
                        dev.save_state(),
                        saved_before,
                        "{name}: a refused restore changed it"
                    );
                }
            }
        }
        assert!(HypervTestDev::check_state(2, &json!({}), None)
            .unwrap_err()
            .contains("state version 2"));
    }

    #[test]
    fn unattached_device_ignores_everything() {
        let (mut dev, _link) = HypervTestDev::new();
        for cmd in 0u32..=8 {
            assert_eq!(dev.write(0, &(cmd << 16).to_le_bytes()), DeviceAction::None);
        }
        assert_eq!(dev.write(1, &[1]), DeviceAction::None);
        let mut d = [0xAAu8; 4];
        dev.read(0, &mut d);
        assert_eq!(d, [0; 4]);
    }
}

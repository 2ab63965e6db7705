//! Asynchronous events and the broadcaster the VMM emits them through.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::types::{GuestPanicAction, GuestPanicInformation, ShutdownCause};
use crate::wire::write_json;

/// A QMP event: a name and optional data (QEMU omits `data` for events without members).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Option<Value>,
}

impl Event {
    /// Any event.
    pub fn new(name: impl Into<String>, data: Option<Value>) -> Self {
        Self {
            name: name.into(),
            data,
        }
    }

    /// `SHUTDOWN {"guest": cause.is_guest(), "reason": cause}`.
    pub fn shutdown(cause: ShutdownCause) -> Self {
        Self::new(
            "SHUTDOWN",
            Some(json!({"guest": cause.is_guest(), "reason": cause})),
        )
    }

    /// `RESET {"guest": cause.is_guest(), "reason": cause}`.
    pub fn reset(cause: ShutdownCause) -> Self {
        Self::new(
            "RESET",
            Some(json!({"guest": cause.is_guest(), "reason": cause})),
        )
    }

    /// `STOP` (no data).
    pub fn stop() -> Self {
        Self::new("STOP", None)
    }

    /// `RESUME` (no data).
    pub fn resume() -> Self {
        Self::new("RESUME", None)
    }

    /// `POWERDOWN` (no data): emitted when `system_powerdown` asks the guest to power off.
    pub fn powerdown() -> Self {
        Self::new("POWERDOWN", None)
    }

    /// `GUEST_PANICKED {"action": ..., "info": {...}}`; `info` is left out when there is none
    /// (no hv-crash).
    pub fn guest_panicked(action: GuestPanicAction, info: Option<GuestPanicInformation>) -> Self {
        let mut data = json!({ "action": action });
        if let (Some(info), Value::Object(map)) = (info, &mut data) {
            map.insert("info".to_string(), json!(info));
        }
        Self::new("GUEST_PANICKED", Some(data))
    }

    /// The wire form with a given timestamp:
    /// `{"timestamp": {"seconds": S, "microseconds": U}, "event": NAME, "data": DATA}` + `\r\n`.
    pub fn to_wire_at(&self, seconds: u64, microseconds: u32) -> String {
        let mut out = Vec::with_capacity(96);
        // Members in QEMU's order: timestamp (seconds, microseconds), event, data.
        out.extend_from_slice(
            format!(
                "{{\"timestamp\": {{\"seconds\": {seconds}, \"microseconds\": {microseconds}}}, \"event\": "
            )
            .as_bytes(),
        );
        write_json(&mut out, &self.name);
        if let Some(data) = &self.data {
            out.extend_from_slice(b", \"data\": ");
            write_json(&mut out, data);
        }
        out.extend_from_slice(b"}\r\n");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The wire form stamped with the current wall-clock time, as QEMU does.
    pub fn to_wire_now(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.to_wire_at(now.as_secs(), now.subsec_micros())
    }
}

/// What a subscriber receives.
pub(crate) enum Delivery {
    /// One message, already encoded with its `\r\n`.
    Line(Arc<str>),
    /// Flush what came before, then stop (sent by the client's own reader).
    Close,
}

enum Subscriber {
    /// A negotiated QMP client. Overflow disconnects it (`on_overflow` shuts its socket down).
    Client {
        tx: SyncSender<Delivery>,
        on_overflow: Box<dyn Fn() + Send>,
    },
    /// An in-process listener (`EventSink::listen`); overflow drops events for it.
    Local(SyncSender<Arc<str>>),
}

#[derive(Default)]
struct SinkInner {
    subscribers: Mutex<HashMap<u64, Subscriber>>,
    next_id: AtomicU64,
}

/// Cloneable handle through which the VMM emits events, from any thread.
///
/// Every event goes to every client that has completed `qmp_capabilities` negotiation, on every
/// [`QmpServer`](crate::QmpServer) started with a clone of this sink. `emit` never blocks on a
/// client: each client has a bounded queue, and a client that lets its queue fill up is
/// disconnected.
#[derive(Clone, Default)]
pub struct EventSink {
    inner: Arc<SinkInner>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("subscribers", &self.subscriber_count())
            .finish()
    }
}

impl EventSink {
    /// A sink with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Subscriber>> {
        // A panic while holding the lock leaves the map consistent; keep going.
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Emits `name` with optional `data`, stamped with the wall-clock time.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        self.send(&Event::new(name, data));
    }

    /// Emits a prepared [`Event`], stamped with the wall-clock time.
    pub fn send(&self, event: &Event) {
        let line: Arc<str> = Arc::from(event.to_wire_now());
        tracing::debug!(event = %event.name, "qmp event");
        let mut subs = self.lock();
        subs.retain(|id, sub| match sub {
            Subscriber::Client { tx, on_overflow } => {
                match tx.try_send(Delivery::Line(line.clone())) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        tracing::warn!(
                            client = id,
                            "qmp client does not read its events; disconnecting it"
                        );
                        on_overflow();
                        false
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                }
            }
            Subscriber::Local(tx) => match tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(listener = id, "qmp event listener is full; event dropped");
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
        });
    }

    /// Number of current subscribers (negotiated clients and local listeners).
    pub fn subscriber_count(&self) -> usize {
        self.lock().len()
    }

    /// An in-process listener receiving every event in wire form (with its `\r\n`), for logging
    /// or tests. At most `capacity` events wait in it; newer ones are dropped when it is full.
    pub fn listen(&self, capacity: usize) -> Receiver<Arc<str>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Subscriber::Local(tx));
        rx
    }

    /// Queues `first` (the reply to `qmp_capabilities`) for the client and subscribes it, both
    /// under the subscriber lock: no event can overtake the reply, and none emitted after the
    /// client could have seen the reply is missed. Returns `None` if the client is gone.
    pub(crate) fn subscribe_client(
        &self,
        tx: SyncSender<Delivery>,
        first: Arc<str>,
        on_overflow: Box<dyn Fn() + Send>,
    ) -> Option<u64> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.lock();
        match tx.try_send(Delivery::Line(first)) {
            Ok(()) => {}
            Err(TrySendError::Full(delivery)) => {
                // The client has not read its replies; do not block emitters on it. Wait
                // outside the lock (an event emitted meanwhile may be missed; it could not
                // have been delivered before this reply anyway).
                drop(subs);
                tx.send(delivery).ok()?;
                subs = self.lock();
            }
            Err(TrySendError::Disconnected(_)) => return None,
        }
        subs.insert(id, Subscriber::Client { tx, on_overflow });
        Some(id)
    }

    pub(crate) fn unsubscribe(&self, id: u64) {
        self.lock().remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{GuestPanicAction, GuestPanicInformation, ShutdownCause};

    fn parse(line: &str) -> Value {
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(line.trim_end()).unwrap()
    }

    #[test]
    fn typed_event_shapes() {
        let cases = [
            (
                Event::shutdown(ShutdownCause::GuestShutdown),
                json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}),
            ),
            (
                Event::shutdown(ShutdownCause::HostQmpQuit),
                json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}),
            ),
            (
                Event::reset(ShutdownCause::HostQmpSystemReset),
                json!({"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}}),
            ),
            (
                Event::reset(ShutdownCause::GuestReset),
                json!({"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}}),
            ),
            (Event::stop(), json!({"event": "STOP"})),
            (Event::resume(), json!({"event": "RESUME"})),
            (Event::powerdown(), json!({"event": "POWERDOWN"})),
            (
                Event::guest_panicked(
                    GuestPanicAction::Poweroff,
                    Some(GuestPanicInformation::hyperv([0xd1, 2, 3, 4, 5])),
                ),
                json!({"event": "GUEST_PANICKED", "data": {"action": "poweroff",
                       "info": {"type": "hyper-v", "arg1": 0xd1, "arg2": 2, "arg3": 3,
                                "arg4": 4, "arg5": 5}}}),
            ),
            (
                Event::guest_panicked(GuestPanicAction::Pause, None),
                json!({"event": "GUEST_PANICKED", "data": {"action": "pause"}}),
            ),
        ];
        for (event, mut expected) in cases {
            let line = event.to_wire_at(1700000000, 123456);
            expected["timestamp"] = json!({"seconds": 1700000000u64, "microseconds": 123456});
            assert_eq!(parse(&line), expected);
            assert!(
                line.starts_with(
                    "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": "
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn timestamp_is_wall_clock() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let v = parse(&Event::stop().to_wire_now());
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let s = v["timestamp"]["seconds"].as_u64().unwrap();
        let us = v["timestamp"]["microseconds"].as_u64().unwrap();
        assert!(before <= s && s <= after);
        assert!(us < 1_000_000);
    }

    #[test]
    fn local_listener_receives_and_overflow_drops() {
        let sink = EventSink::new();
        let rx = sink.listen(2);
        let clone = sink.clone();
        std::thread::spawn(move || clone.emit("X", Some(json!({"n": 1}))))
            .join()
            .unwrap();
        sink.send(&Event::stop());
        sink.send(&Event::resume()); // dropped: capacity 2
        let got: Vec<Value> = rx.try_iter().map(|l| parse(&l)).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["event"], "X");
        assert_eq!(got[0]["data"], json!({"n": 1}));
        assert_eq!(got[1]["event"], "STOP");
        drop(rx);
        sink.send(&Event::stop());
        assert_eq!(sink.subscriber_count(), 0);
    }
}

//! The connection table behind HvCallPostMessage and HvCallSignalEvent.
//!
//! Devices (e.g. hyperv-testdev, VMBus) register a handler per 24-bit connection id. The hypercall dispatcher
//! validates the input as KVM + QEMU do, then calls the handler **without holding any engine lock**, so a handler
//! may call back into the engine (for example to post a SynIC message).

use crate::platform::VpId;
use std::collections::HashMap;
use std::sync::Arc;

/// Receives HvCallPostMessage for one connection id.
pub trait MessageConnection: Send + Sync {
    /// Handles a message posted by VP `vp`. `payload` is at most 240 bytes. Returns the hypercall status
    /// (`tlfs::hypercall::STATUS_*`).
    fn post_message(&self, vp: VpId, message_type: u32, payload: &[u8]) -> u16;
}

/// Receives HvCallSignalEvent for one connection id.
pub trait EventConnection: Send + Sync {
    /// Handles an event signalled by VP `vp`. Returns the hypercall status.
    fn signal_event(&self, vp: VpId) -> u16;
}

/// Why a registration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    /// The id does not fit in 24 bits.
    #[error("connection id {0:#x} does not fit in 24 bits")]
    InvalidId(u32),
    /// The id is already registered.
    #[error("connection id {0:#x} is already registered")]
    InUse(u32),
}

#[derive(Default)]
pub(crate) struct Connections {
    pub(crate) messages: HashMap<u32, Arc<dyn MessageConnection>>,
    pub(crate) events: HashMap<u32, Arc<dyn EventConnection>>,
}

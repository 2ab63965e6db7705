//! A QEMU Machine Protocol (QMP) server.
//!
//! The crate knows the wire protocol (greeting, `qmp_capabilities` negotiation, framing by JSON
//! value, QEMU's error texts), the socket syntax of QEMU's `-qmp`, `-chardev` and `-mon` options,
//! and the QEMU-shaped reply and event types. It knows nothing about the VMM: the VMM implements
//! [`QmpHandler`] for the commands it supports and pushes events through an [`EventSink`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use qmp::{CommandSpec, EventSink, QmpEndpoint, QmpError, QmpHandler, QmpServer, ServerConfig};
//! use serde_json::{Map, Value};
//!
//! struct Vm;
//! impl QmpHandler for Vm {
//!     fn commands(&self) -> Vec<CommandSpec> {
//!         vec![CommandSpec::new("stop")]
//!     }
//!     fn execute(&self, command: &str, _args: &Map<String, Value>) -> Result<Value, QmpError> {
//!         match command {
//!             "stop" => Ok(qmp::empty_return()),
//!             other => Err(QmpError::command_not_found(other)),
//!         }
//!     }
//! }
//!
//! let endpoint = QmpEndpoint::parse_qmp("unix:/tmp/vm.qmp,server=on,wait=off").unwrap();
//! let events = EventSink::new();
//! let server = QmpServer::start(&endpoint, Arc::new(Vm), events.clone(), ServerConfig::default()).unwrap();
//! events.send(&qmp::Event::stop());
//! server.shutdown();
//! ```
#![forbid(unsafe_code)]
// Guest- and client-controlled data flows through this crate: no unwrap/expect outside tests (issue 10).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod error;
mod event;
mod framing;
mod server;
mod session;
mod spec;
mod types;
mod wire;

pub use error::{ErrorClass, QmpError};
pub use event::{Event, EventSink};
pub use framing::{Frame, JsonSplitter, DEFAULT_MAX_NESTING};
pub use server::{
    QmpServer, ServerConfig, ServerError, DEFAULT_MAX_CLIENTS, DEFAULT_MAX_REQUEST_BYTES,
};
pub use session::{
    ArgSpec, ArgType, CommandSpec, Dispatcher, QmpHandler, Session, BUILTIN_COMMANDS,
};
pub use spec::{
    chardev_id, endpoint_for_monitor, parse_chardev, parse_mon, ChardevSocket, MonitorMode,
    MonitorSpec, QmpEndpoint, SocketAddress, SpecError,
};
pub use types::{
    CpuInfoFast, CpuInstanceProperties, GuestPanicAction, GuestPanicInformation, KvmInfo, NameInfo,
    QemuVersion, RunState, ShutdownCause, StatusInfo, VersionInfo,
};
pub use wire::{empty_return, to_wire};

/// The QEMU version whose QMP behaviour enlighten follows (`version.qemu` in the greeting and in
/// `query-version`). Change these three constants, and only these, to follow another version.
pub const QEMU_MAJOR: u64 = 7;
/// See [`QEMU_MAJOR`].
pub const QEMU_MINOR: u64 = 2;
/// See [`QEMU_MAJOR`].
pub const QEMU_MICRO: u64 = 0;

/// The `package` string of the greeting and of `query-version`.
pub fn package_string() -> String {
    format!("enlighten {}", env!("CARGO_PKG_VERSION"))
}

//! Port-I/O devices of the test-kernel platform, as plain KVM-free structs: the COM1 16550 UART, QEMU's
//! isa-debug-exit, legacy fw_cfg, the Bochs shutdown port, the 8259 PIC ports ("all masked"), the
//! hyperv-testdev placeholder, and an all-ones/drop handler for everything else.
//!
//! Every device implements [`PioDevice`]: `read(offset, data)` fills `data` (1, 2 or 4 bytes, little-endian)
//! and `write(offset, data)` returns a [`DeviceAction`] for the VMM. A [`PioBus`] maps port ranges to devices so
//! the VMM dispatches an I/O exit with one call.

mod bochs;
mod debug_exit;
mod fw_cfg;
mod hyperv_testdev;
mod pic;
mod serial;
mod testdev;

use std::collections::HashSet;
use std::sync::Mutex;

pub use bochs::{BochsShutdown, BOCHS_SHUTDOWN_PORT};
pub use debug_exit::{parse_debug_exit, DebugExit, DebugExitConfig};
pub use fw_cfg::{
    FwCfg, FW_CFG_DATA_PORT, FW_CFG_FILE_DIR, FW_CFG_ID, FW_CFG_KERNEL_DATA, FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS, FW_CFG_RAM_SIZE, FW_CFG_SELECTOR_PORT, FW_CFG_SIGNATURE,
};
pub use hyperv_testdev::{HypervTestDev, HypervTestDevLink};
pub use pic::{Pic, PIC_MASTER_PORT, PIC_SLAVE_PORT};
pub use serial::{NoopTrigger, SerialDevice, SerialSink, COM1_PORT};
pub use testdev::{HypervTestDevPlaceholder, HYPERV_TESTDEV_PORT};

/// What the VMM must do after a device access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceAction {
    /// Nothing; resume the vCPU.
    None,
    /// Stop the VM and exit the process with this status (isa-debug-exit; the OS keeps the low 8 bits).
    Exit(i32),
    /// Power off (Bochs "Shutdown" sequence): stop the VM, exit status 0.
    Shutdown,
    /// Reset the VM (or stop it with `--no-reboot`).
    Reset,
}

/// A port-I/O device. `offset` is relative to the base of the range the device was registered at.
pub trait PioDevice: Send {
    /// Handles an `in` of `data.len()` bytes (1, 2 or 4): fills `data` (little-endian).
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Handles an `out` of `data.len()` bytes (little-endian).
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction;
    /// Returns the device to its power-on state (VM reset). Output sinks and configuration are kept.
    fn reset(&mut self) {}
    /// The device's state for a snapshot or migration: `(name, schema version, state)`, or `None` for a device
    /// without guest-visible state. Called with every vCPU stopped.
    fn save_state(&self) -> Option<(&'static str, u32, serde_json::Value)> {
        None
    }
    /// Loads a state from [`PioDevice::save_state`] of a device with the same name (on another machine);
    /// `version` is the saved schema version. Called with every vCPU held, before they run.
    fn restore_state(&mut self, version: u32, _state: &serde_json::Value) -> Result<(), String> {
        Err(format!(
            "this device has no state to load (version {version})"
        ))
    }
}

/// Little-endian value of up to 8 bytes (extra bytes are ignored).
pub fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0u64, |v, (i, &b)| v | (u64::from(b) << (8 * i)))
}

/// Which address space an unhandled access was in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// Unhandled port or MMIO accesses: reads return all-ones, writes are dropped, and each address is logged once
/// at debug level. Internally synchronised, so one instance can be shared by all vCPU threads.
#[derive(Debug, Default)]
pub struct Unhandled {
    seen: Mutex<HashSet<(AccessKind, u64)>>,
}

impl Unhandled {
    /// A tracker that has seen nothing yet.
    pub fn new() -> Unhandled {
        Unhandled::default()
    }

    /// Records an access; returns true the first time this address is seen.
    fn first_time(&self, kind: AccessKind, addr: u64) -> bool {
        match self.seen.lock() {
            Ok(mut seen) => seen.insert((kind, addr)),
            // A poisoned lock only means another thread panicked while logging; keep going.
            Err(poisoned) => poisoned.into_inner().insert((kind, addr)),
        }
    }

    /// An unhandled read: fills `data` with 0xFF.
    pub fn read(&self, kind: AccessKind, addr: u64, data: &mut [u8]) {
        data.fill(0xFF);
        if self.first_time(kind, addr) {
            tracing::debug!(
                ?kind,
                addr = format_args!("{addr:#x}"),
                size = data.len(),
                "unhandled read (returns all-ones)"
            );
        }
    }

    /// An unhandled write: dropped.
    pub fn write(&self, kind: AccessKind, addr: u64, data: &[u8]) {
        if self.first_time(kind, addr) {
            tracing::debug!(
                ?kind,
                addr = format_args!("{addr:#x}"),
                value = format_args!("{:#x}", le_value(data)),
                size = data.len(),
                "unhandled write (dropped)"
            );
        }
    }

    /// Whether an access to this address has been recorded.
    pub fn has_seen(&self, kind: AccessKind, addr: u64) -> bool {
        match self.seen.lock() {
            Ok(seen) => seen.contains(&(kind, addr)),
            Err(poisoned) => poisoned.into_inner().contains(&(kind, addr)),
        }
    }
}

struct BusEntry {
    base: u16,
    len: u16,
    device: Box<dyn PioDevice>,
}

/// Port ranges mapped to devices; unmapped ports go to an [`Unhandled`] tracker.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<BusEntry>,
    unhandled: Unhandled,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<String> = self
            .entries
            .iter()
            .map(|e| format!("{:#x}+{:#x}", e.base, e.len))
            .collect();
        f.debug_struct("PioBus").field("ranges", &ranges).finish()
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> PioBus {
        PioBus::default()
    }

    /// Maps `[base, base + len)` to `device`. Fails if the range is empty, wraps past 0xFFFF or overlaps a
    /// range already mapped.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Box<dyn PioDevice>,
    ) -> Result<(), String> {
        let end = u32::from(base) + u32::from(len);
        if len == 0 || end > 0x1_0000 {
            return Err(format!("invalid I/O port range {base:#x}+{len:#x}"));
        }
        if let Some(e) = self.entries.iter().find(|e| {
            u32::from(base) < u32::from(e.base) + u32::from(e.len) && u32::from(e.base) < end
        }) {
            return Err(format!(
                "I/O port range {base:#x}+{len:#x} overlaps {:#x}+{:#x}",
                e.base, e.len
            ));
        }
        self.entries.push(BusEntry { base, len, device });
        Ok(())
    }

    fn find(&mut self, port: u16) -> Option<(&mut Box<dyn PioDevice>, u16)> {
        self.entries
            .iter_mut()
            .find(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|e| (&mut e.device, port - e.base))
    }

    /// Dispatches an `in` from `port`.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((dev, offset)) => dev.read(offset, data),
            None => self.unhandled.read(AccessKind::Pio, u64::from(port), data),
        }
    }

    /// Dispatches an `out` to `port`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> DeviceAction {
        match self.find(port) {
            Some((dev, offset)) => dev.write(offset, data),
            None => {
                self.unhandled.write(AccessKind::Pio, u64::from(port), data);
                DeviceAction::None
            }
        }
    }

    /// Replaces the device mapped at exactly `base` (e.g. the hyperv-testdev placeholder by the real device).
    /// Fails if no range starts at `base`.
    pub fn replace(&mut self, base: u16, device: Box<dyn PioDevice>) -> Result<(), String> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.base == base)
            .ok_or_else(|| format!("no device at I/O port {base:#x}"))?;
        e.device = device;
        Ok(())
    }

    /// Resets every device (VM reset).
    pub fn reset(&mut self) {
        for e in &mut self.entries {
            e.device.reset();
        }
    }

    /// The tracker of unmapped ports.
    pub fn unhandled(&self) -> &Unhandled {
        &self.unhandled
    }

    /// The state of every device that has one, in bus order (Device sections of a migration stream).
    pub fn save_states(&self) -> Vec<DeviceState> {
        self.entries
            .iter()
            .filter_map(|e| {
                e.device
                    .save_state()
                    .map(|(name, version, state)| DeviceState {
                        id: device_id(name, e.base),
                        version,
                        state,
                    })
            })
            .collect()
    }

    /// Loads saved device states. Every state must name a device of this bus (by name and I/O base), each at
    /// most once; this is checked before any device is changed. Devices without a saved state keep theirs.
    pub fn restore_states(&mut self, states: &[DeviceState]) -> Result<(), String> {
        let mut targets = Vec::with_capacity(states.len());
        for s in states {
            let i = self
                .entries
                .iter()
                .position(|e| {
                    e.device
                        .save_state()
                        .is_some_and(|(name, _, _)| device_id(name, e.base) == s.id)
                })
                .ok_or_else(|| {
                    format!(
                        "the stream has the state of device '{}', which this VM does not have",
                        s.id
                    )
                })?;
            if targets.contains(&i) {
                return Err(format!("the stream has device '{}' twice", s.id));
            }
            targets.push(i);
        }
        for (s, i) in states.iter().zip(targets) {
            self.entries[i]
                .device
                .restore_state(s.version, &s.state)
                .map_err(|e| format!("cannot load the state of device '{}': {e}", s.id))?;
        }
        Ok(())
    }
}

/// One device's saved state: the payload of a Device section of the migration stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceState {
    /// The device: its name and I/O base, e.g. `serial@0x3f8`.
    pub id: String,
    /// The device's schema version.
    pub version: u32,
    /// The state, in the device's schema.
    pub state: serde_json::Value,
}

fn device_id(name: &str, base: u16) -> String {
    format!("{name}@{base:#x}")
}

/// Decodes a device state of schema version `expected`.
pub(crate) fn decode_state<T: serde::de::DeserializeOwned>(
    version: u32,
    expected: u32,
    state: &serde_json::Value,
) -> Result<T, String> {
    if version != expected {
        return Err(format!(
            "state version {version} is not supported (this build reads version {expected})"
        ));
    }
    T::deserialize(state).map_err(|e| format!("the state does not decode: {e}"))
}

/// Encodes a device state (serialising plain data into a JSON value cannot fail; a failure saves `null`,
/// which the destination then refuses).
pub(crate) fn encode_state<T: serde::Serialize>(state: &T) -> serde_json::Value {
    serde_json::to_value(state).unwrap_or(serde_json::Value::Null)
}

/// The standard devices of the test-kernel platform on a new bus: COM1 at 0x3F8 writing to `serial`, the
/// debug-exit device if configured, fw_cfg at 0x510 (`ram_size` bytes, `cpus` vCPUs), the Bochs shutdown port
/// 0x8900, both PICs, and the hyperv-testdev placeholder at 0x3000 (the VMM replaces it when the real device
/// exists by building its own bus instead).
pub fn standard_bus(
    serial: SerialSink,
    debug_exit: Option<DebugExitConfig>,
    ram_size: u64,
    cpus: u16,
) -> Result<PioBus, String> {
    let mut bus = PioBus::new();
    bus.insert(COM1_PORT, 8, Box::new(SerialDevice::new(serial)))?;
    if let Some(cfg) = debug_exit {
        bus.insert(cfg.iobase, cfg.iosize, Box::new(DebugExit::new(cfg)))?;
    }
    bus.insert(
        FW_CFG_SELECTOR_PORT,
        2,
        Box::new(FwCfg::new(ram_size, cpus)),
    )?;
    bus.insert(BOCHS_SHUTDOWN_PORT, 1, Box::new(BochsShutdown::new()))?;
    bus.insert(PIC_MASTER_PORT, 2, Box::new(Pic::new()))?;
    bus.insert(PIC_SLAVE_PORT, 2, Box::new(Pic::new()))?;
    bus.insert(HYPERV_TESTDEV_PORT, 4, Box::new(HypervTestDevPlaceholder))?;
    Ok(bus)
}

#[cfg(test)]
mod tests;

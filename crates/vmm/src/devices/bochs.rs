//! The old Bochs/QEMU power-off port 0x8900: writing the bytes of `"Shutdown"` in sequence powers off.

use super::{DeviceAction, PioDevice};

/// The port.
pub const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
const MAGIC: &[u8] = b"Shutdown";

/// Matches the `"Shutdown"` byte sequence; any other byte restarts the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BochsShutdown {
    matched: usize,
}

impl BochsShutdown {
    /// A device that has seen nothing.
    pub fn new() -> BochsShutdown {
        BochsShutdown::default()
    }

    /// Feeds one byte; returns [`DeviceAction::Shutdown`] when it completes the sequence.
    pub fn feed(&mut self, byte: u8) -> DeviceAction {
        if MAGIC.get(self.matched) == Some(&byte) {
            self.matched += 1;
        } else {
            self.matched = usize::from(MAGIC.first() == Some(&byte));
        }
        if self.matched == MAGIC.len() {
            self.matched = 0;
            DeviceAction::Shutdown
        } else {
            DeviceAction::None
        }
    }
}

/// Schema version of the saved state (how many bytes of `"Shutdown"` were matched).
const BOCHS_STATE_VERSION: u32 = 1;

impl PioDevice for BochsShutdown {
    fn reset(&mut self) {
        self.matched = 0;
    }

    fn save_state(&self) -> Option<(&'static str, u32, serde_json::Value)> {
        Some((
            "bochs-shutdown",
            BOCHS_STATE_VERSION,
            super::encode_state(&self.matched),
        ))
    }

    fn restore_state(&mut self, version: u32, state: &serde_json::Value) -> Result<(), String> {
        let matched: usize = super::decode_state(version, BOCHS_STATE_VERSION, state)?;
        if matched >= MAGIC.len() {
            return Err(format!(
                "{matched} bytes matched (at most {})",
                MAGIC.len() - 1
            ));
        }
        self.matched = matched;
        Ok(())
    }

    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }

    /// Only the low byte of a write counts (the port is 8 bits wide).
    fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
        match data.first() {
            Some(&b) => self.feed(b),
            None => DeviceAction::None,
        }
    }
}

//! Placeholder for QEMU's `hyperv-testdev` at port 0x3000: writes are accepted and ignored, reads return 0.
//! The SynIC issue replaces it with the real device; test kernels issue its commands unconditionally, so the
//! port must not fault or log even without `-device hyperv-testdev`.

use super::{DeviceAction, PioDevice};

/// The device's port (4 ports, 32-bit accesses).
pub const HYPERV_TESTDEV_PORT: u16 = 0x3000;

/// Accepts and ignores hyperv-testdev commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HypervTestDevPlaceholder;

impl PioDevice for HypervTestDevPlaceholder {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, _data: &[u8]) -> DeviceAction {
        DeviceAction::None
    }
}

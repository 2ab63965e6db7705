//! Stand-ins for unit tests that build a real (usually never started) KVM machine.

use vm_memory::GuestMemoryMmap;

use crate::boot::{BootEntry, EntryMode};
use crate::layout::MemoryLayout;
use crate::machine::{BootLoader, IoAction, IoDevices};

/// A boot loader that loads nothing and enters at 1 MiB in 32-bit protected mode.
pub(crate) struct NoKernel;

impl BootLoader for NoKernel {
    fn load(&self, _: &GuestMemoryMmap, _: &MemoryLayout) -> Result<BootEntry, String> {
        Ok(BootEntry {
            mode: EntryMode::Protected32,
            entry: 0x10_0000,
            mbi: 0,
        })
    }
}

/// No devices: every port reads all-ones, writes are dropped.
pub(crate) struct NoDevices;

impl IoDevices for NoDevices {
    fn pio_read(&self, _: usize, _: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn pio_write(&self, _: usize, _: u16, _: &[u8]) -> IoAction {
        IoAction::None
    }
}

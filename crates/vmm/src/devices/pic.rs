//! The 8259 PIC ports (master 0x20/0x21, slave 0xA0/0xA1), accepted as "all masked": writes are accepted and
//! ignored (there is no PIC behind them; the local APIC delivers every interrupt), the data port (IMR) reads
//! 0xFF and the command port (IRR/ISR) reads 0.

use super::{DeviceAction, PioDevice};

/// Master PIC command port (data port is +1).
pub const PIC_MASTER_PORT: u16 = 0x20;
/// Slave PIC command port (data port is +1).
pub const PIC_SLAVE_PORT: u16 = 0xA0;

/// One 8259 (registered with 2 ports). Counts writes for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pic {
    writes: u64,
}

impl Pic {
    /// A PIC that has seen no writes.
    pub fn new() -> Pic {
        Pic::default()
    }

    /// Writes accepted so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }
}

impl PioDevice for Pic {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Offset 1 is the mask register: everything masked. Offset 0 reads IRR/ISR: nothing pending.
        data.fill(if offset == 1 { 0xFF } else { 0 });
    }

    fn write(&mut self, _offset: u16, _data: &[u8]) -> DeviceAction {
        self.writes = self.writes.saturating_add(1);
        DeviceAction::None
    }
}

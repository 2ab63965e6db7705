//! The test-kernel platform on the machine: the device bus of [`crate::devices`] as the machine's
//! [`IoDevices`], and the kernel loaders of [`crate::loader`] as its [`BootLoader`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use vm_memory::GuestMemoryMmap;

use crate::boot::{BootEntry, EntryMode};
use crate::devices::{AccessKind, DeviceAction, PioBus};
use crate::layout::MemoryLayout;
use crate::loader::{self, BootState, Module, RamLayout};
use crate::machine::{BootLoader, IoAction, IoDevices};

/// What is known about one I/O port, 2 bits per port in [`PortClasses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortClass {
    /// Not accessed yet.
    Unknown = 0,
    /// A device answers it.
    Mapped = 1,
    /// No device: reads return all-ones, writes are dropped, nothing else happens.
    Unmapped = 2,
}

/// A lock-free table of [`PortClass`] for the 65,536 ports (16 KiB of atomics).
///
/// The bus's port map does not change once [`BusDevices`] owns it (it only offers accesses, reset and device
/// state), so a port found unmapped once stays unmapped: later accesses to it need neither the bus lock nor
/// the unhandled-access tracker's hash set, and never touch another vCPU's cache line for more than a load.
struct PortClasses {
    words: Box<[AtomicU64]>,
}

impl PortClasses {
    const PER_WORD: usize = 32;

    fn new() -> PortClasses {
        PortClasses {
            words: (0..0x1_0000 / Self::PER_WORD)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn slot(port: u16) -> (usize, u32) {
        let p = usize::from(port);
        (p / Self::PER_WORD, 2 * (p % Self::PER_WORD) as u32)
    }

    fn get(&self, port: u16) -> PortClass {
        let (w, shift) = Self::slot(port);
        match (self.words[w].load(Ordering::Relaxed) >> shift) & 3 {
            1 => PortClass::Mapped,
            2 => PortClass::Unmapped,
            _ => PortClass::Unknown,
        }
    }

    /// Records the class of `port` (from `Unknown`; a port's class never changes afterwards).
    fn set(&self, port: u16, class: PortClass) {
        let (w, shift) = Self::slot(port);
        self.words[w].fetch_or((class as u64) << shift, Ordering::Relaxed);
    }
}

/// A [`PioBus`] shared by all vCPUs. Accesses to mapped ports take the bus lock; accesses to ports found
/// unmapped take no lock ([`PortClasses`]).
pub struct BusDevices {
    bus: Mutex<PioBus>,
    classes: PortClasses,
}

impl BusDevices {
    /// Wraps `bus`.
    pub fn new(bus: PioBus) -> BusDevices {
        BusDevices {
            bus: Mutex::new(bus),
            classes: PortClasses::new(),
        }
    }

    fn bus(&self) -> std::sync::MutexGuard<'_, PioBus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After an access to `port` made with the bus locked: classifies the port if it was not yet (the bus's
    /// unhandled-access tracker has recorded it iff no device is mapped there; one hash lookup per port, ever).
    fn classify(&self, bus: &PioBus, port: u16) {
        if self.classes.get(port) == PortClass::Unknown {
            let class = if bus.unhandled().has_seen(AccessKind::Pio, u64::from(port)) {
                PortClass::Unmapped
            } else {
                PortClass::Mapped
            };
            self.classes.set(port, class);
        }
    }
}

impl IoDevices for BusDevices {
    fn pio_read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        if self.classes.get(port) == PortClass::Unmapped {
            // What the bus would do (it logs a port once, at its first access, which took the path below).
            data.fill(0xFF);
            return;
        }
        let mut bus = self.bus();
        bus.read(port, data);
        self.classify(&bus, port);
    }

    fn pio_write(&self, _vcpu: usize, port: u16, data: &[u8]) -> IoAction {
        if self.classes.get(port) == PortClass::Unmapped {
            return IoAction::None;
        }
        let mut bus = self.bus();
        let action = bus.write(port, data);
        self.classify(&bus, port);
        match action {
            DeviceAction::None => IoAction::None,
            DeviceAction::Exit(status) => IoAction::Exit(status),
            DeviceAction::Shutdown => IoAction::PowerOff,
            DeviceAction::Reset => IoAction::Reset,
        }
    }

    fn mmio_read(&self, _vcpu: usize, addr: u64, data: &mut [u8]) {
        tracing::debug!(addr, len = data.len(), "unhandled MMIO read");
        data.fill(0xFF);
    }

    fn mmio_write(&self, _vcpu: usize, addr: u64, data: &[u8]) -> IoAction {
        tracing::debug!(addr, len = data.len(), "unhandled MMIO write");
        IoAction::None
    }

    fn reset(&self) {
        self.bus().reset();
    }

    fn save_state(&self) -> Vec<crate::devices::DeviceState> {
        self.bus().save_states()
    }

    fn restore_state(&self, states: &[crate::devices::DeviceState]) -> Result<(), String> {
        self.bus().restore_states(states)
    }
}

/// A kernel image loaded with QEMU's `-kernel` semantics (Multiboot v1 ELF32, or an ELF64 entered in long
/// mode).
pub struct KernelLoader {
    /// The file contents.
    pub image: Vec<u8>,
    /// The path as given (the first token of the Multiboot command line).
    pub path: String,
    /// `-append`.
    pub append: String,
    /// `-initrd` modules.
    pub modules: Vec<Module>,
    warned: AtomicBool,
}

impl KernelLoader {
    /// A loader for `image` read from `path`.
    pub fn new(image: Vec<u8>, path: String, append: String, modules: Vec<Module>) -> KernelLoader {
        KernelLoader {
            image,
            path,
            append,
            modules,
            warned: AtomicBool::new(false),
        }
    }
}

/// The loader's view of the machine's RAM layout.
pub fn ram_layout(layout: &MemoryLayout) -> RamLayout {
    RamLayout {
        below_4g: layout.low_ram_size(),
        above_4g: layout.high_ram_size(),
    }
}

impl BootLoader for KernelLoader {
    fn load(&self, mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Result<BootEntry, String> {
        let loaded = loader::load_kernel(
            mem,
            &ram_layout(layout),
            &self.image,
            &self.path,
            &self.append,
            &self.modules,
        )
        .map_err(|e| e.to_string())?;
        if !self.warned.swap(true, Ordering::SeqCst) {
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
        }
        let mode = match loaded.boot {
            BootState::Protected32 { .. } => EntryMode::Protected32,
            BootState::Long64 { .. } => EntryMode::Long64,
        };
        Ok(BootEntry {
            mode,
            entry: loaded.boot.entry(),
            mbi: loaded.boot.mbi(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A 4-port device that answers reads with 0x40 + offset and counts its accesses.
    struct Counting(Arc<AtomicU64>);

    impl crate::devices::PioDevice for Counting {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            self.0.fetch_add(1, Ordering::SeqCst);
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, _offset: u16, _data: &[u8]) -> DeviceAction {
            self.0.fetch_add(1, Ordering::SeqCst);
            DeviceAction::None
        }
    }

    fn bus_with_device() -> (BusDevices, Arc<AtomicU64>) {
        let hits = Arc::new(AtomicU64::new(0));
        let mut bus = PioBus::new();
        bus.insert(0x100, 4, Box::new(Counting(hits.clone())))
            .unwrap();
        (BusDevices::new(bus), hits)
    }

    #[test]
    fn ports_are_classified_at_their_first_access_and_unmapped_ones_skip_the_bus() {
        // (port, read (else write), expected byte read, mapped)
        let cases: &[(u16, bool, u8, bool)] = &[
            (0x100, true, 0x40, true),
            (0x103, true, 0x43, true),
            (0x102, false, 0, true),
            (0x0FF, true, 0xFF, false),
            (0x104, true, 0xFF, false),
            (0x080, false, 0, false),
            (0x000, true, 0xFF, false),
            (0xFFFF, false, 0, false),
        ];
        for &(port, read, byte, mapped) in cases {
            let (dev, hits) = bus_with_device();
            assert_eq!(dev.classes.get(port), PortClass::Unknown, "{port:#x}");
            for round in 0..3 {
                if read {
                    let mut data = [0u8; 2];
                    dev.pio_read(0, port, &mut data);
                    assert_eq!(data, [byte; 2], "{port:#x} round {round}");
                } else {
                    assert_eq!(dev.pio_write(0, port, &[1]), IoAction::None, "{port:#x}");
                }
                let want = if mapped {
                    PortClass::Mapped
                } else {
                    PortClass::Unmapped
                };
                assert_eq!(dev.classes.get(port), want, "{port:#x} round {round}");
                // Only this port was classified: its neighbours are untouched.
                for other in [port.wrapping_sub(1), port.wrapping_add(1)] {
                    assert_eq!(dev.classes.get(other), PortClass::Unknown, "{other:#x}");
                }
            }
            // Every access to a mapped port reached the device; an unmapped port was logged (first access).
            let expected_hits = if mapped { 3 } else { 0 };
            assert_eq!(hits.load(Ordering::SeqCst), expected_hits, "{port:#x}");
            assert_eq!(
                dev.bus()
                    .unhandled()
                    .has_seen(AccessKind::Pio, u64::from(port)),
                !mapped,
                "{port:#x}"
            );
        }
    }

    #[test]
    fn every_port_class_round_trips_in_its_two_bits() {
        let classes = PortClasses::new();
        for port in 0..=u16::MAX {
            let class = match port % 3 {
                0 => PortClass::Mapped,
                1 => PortClass::Unmapped,
                _ => PortClass::Unknown,
            };
            if class != PortClass::Unknown {
                classes.set(port, class);
            }
        }
        for port in 0..=u16::MAX {
            let want = match port % 3 {
                0 => PortClass::Mapped,
                1 => PortClass::Unmapped,
                _ => PortClass::Unknown,
            };
            assert_eq!(classes.get(port), want, "{port:#x}");
        }
    }
}

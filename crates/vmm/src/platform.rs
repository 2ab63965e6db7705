//! The test-kernel platform on the machine: the device bus of [`crate::devices`] as the machine's
//! [`IoDevices`], and the kernel loaders of [`crate::loader`] as its [`BootLoader`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vm_memory::GuestMemoryMmap;

use crate::boot::{BootEntry, EntryMode};
use crate::devices::{DeviceAction, PioBus};
use crate::layout::MemoryLayout;
use crate::loader::{self, BootState, Module, RamLayout};
use crate::machine::{BootLoader, IoAction, IoDevices};

/// A [`PioBus`] shared by all vCPUs.
pub struct BusDevices {
    bus: Mutex<PioBus>,
}

impl BusDevices {
    /// Wraps `bus`.
    pub fn new(bus: PioBus) -> BusDevices {
        BusDevices {
            bus: Mutex::new(bus),
        }
    }

    fn bus(&self) -> std::sync::MutexGuard<'_, PioBus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IoDevices for BusDevices {
    fn pio_read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        self.bus().read(port, data);
    }

    fn pio_write(&self, _vcpu: usize, port: u16, data: &[u8]) -> IoAction {
        match self.bus().write(port, data) {
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

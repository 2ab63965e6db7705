//! Helpers for the machine tests: assemble tiny guests with the system assembler, load them raw, and a
//! minimal device set (a serial transmit register, isa-debug-exit, the Bochs shutdown port).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::{BootEntry, BootLoader, EntryMode, IoAction, IoDevices, MemoryLayout};

/// Where test code is loaded and entered.
pub const CODE_ADDR: u64 = 0x10_0000;

/// Assembles `src` (GNU as syntax; `.code32`/`.code64`/`.code16` inside) linked at `base` into flat binary.
pub fn assemble(src: &str, base: u64) -> Vec<u8> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vmm-test-asm-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let s = dir.join("t.S");
    let o = dir.join("t.o");
    let elf = dir.join("t.elf");
    let bin = dir.join("t.bin");
    std::fs::write(&s, src).unwrap();
    run(Command::new("as").args(["--64", "-o"]).arg(&o).arg(&s));
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-Ttext"])
        .arg(format!("{base:#x}"))
        .args(["-e", "0", "-o"])
        .arg(&elf)
        .arg(&o));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&elf)
        .arg(&bin));
    let bytes = std::fs::read(&bin).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run the assembler toolchain");
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loads pieces of code at fixed addresses and enters the first one.
pub struct RawLoader {
    pub pieces: Vec<(u64, Vec<u8>)>,
    pub mode: EntryMode,
    pub loads: AtomicUsize,
    /// Replaces `pieces` from the second load on (for reset tests).
    pub after_reset: Option<Vec<(u64, Vec<u8>)>>,
}

impl RawLoader {
    pub fn new(mode: EntryMode, pieces: Vec<(u64, Vec<u8>)>) -> Arc<RawLoader> {
        Arc::new(RawLoader {
            pieces,
            mode,
            loads: AtomicUsize::new(0),
            after_reset: None,
        })
    }
}

impl BootLoader for RawLoader {
    fn load(&self, mem: &GuestMemoryMmap, _layout: &MemoryLayout) -> Result<BootEntry, String> {
        let n = self.loads.fetch_add(1, Ordering::SeqCst);
        let pieces = match (&self.after_reset, n) {
            (Some(p), n) if n > 0 => p,
            _ => &self.pieces,
        };
        for (addr, code) in pieces {
            mem.write_slice(code, GuestAddress(*addr))
                .map_err(|e| e.to_string())?;
        }
        Ok(BootEntry {
            mode: self.mode,
            entry: pieces[0].0,
            mbi: 0,
        })
    }
}

/// Serial THR at 0x3F8 (LSR reads 0x60), isa-debug-exit at 0xF4, Bochs shutdown at 0x8900.
#[derive(Default)]
pub struct TestDevices {
    pub serial: Mutex<Vec<u8>>,
    pub shutdown: Mutex<Vec<u8>>,
    pub resets: AtomicUsize,
}

impl IoDevices for TestDevices {
    fn pio_read(&self, _vcpu: usize, port: u16, data: &mut [u8]) {
        let v = match port {
            0x3FD => 0x60,
            0xF4..=0xF7 => 0,
            _ => 0xFF,
        };
        data.fill(v);
    }

    fn pio_write(&self, _vcpu: usize, port: u16, data: &[u8]) -> IoAction {
        match port {
            0x3F8 => {
                self.serial.lock().unwrap().extend_from_slice(data);
                IoAction::None
            }
            0xF4 => {
                let mut b = [0u8; 4];
                b[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                IoAction::Exit(((u32::from_le_bytes(b) << 1) | 1) as i32)
            }
            0x8900 => {
                let mut s = self.shutdown.lock().unwrap();
                s.extend_from_slice(data);
                if s.ends_with(b"Shutdown") {
                    IoAction::PowerOff
                } else {
                    IoAction::None
                }
            }
            _ => IoAction::None,
        }
    }

    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn tmp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-test-{}-{name}", std::process::id()))
}

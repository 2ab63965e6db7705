//! QEMU's legacy fw_cfg interface: selector at 0x510 (16-bit write; resets the read offset), data at 0x511
//! (each byte read returns the next byte of the selected item; past the end → 0; writes ignored).
//!
//! Items: SIGNATURE `"QEMU"`, ID (bit 0: traditional I/O interface), RAM_SIZE (8 bytes), NB_CPUS and MAX_CPUS
//! (2 bytes), key 0x11 (read by test kernels as an 8-byte upper RAM limit; 0 = none), and the file directory
//! (0x0019: big-endian count, then 64-byte entries). Unknown keys read as 0. Integers are little-endian except in
//! the file directory.

use std::collections::BTreeMap;

use super::{le_value, DeviceAction, PioDevice};

/// Selector port.
pub const FW_CFG_SELECTOR_PORT: u16 = 0x510;
/// Data port.
pub const FW_CFG_DATA_PORT: u16 = 0x511;
/// `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
/// Feature bits.
pub const FW_CFG_ID: u16 = 0x0001;
/// RAM size in bytes (u64).
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
/// Number of vCPUs (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
/// Maximum number of vCPUs (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x000F;
/// QEMU's KERNEL_DATA key, which test kernels read as an 8-byte upper RAM limit (0 = no limit).
pub const FW_CFG_KERNEL_DATA: u16 = 0x0011;
/// The file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
/// First key given to files.
const FW_CFG_FILE_FIRST: u16 = 0x0020;
/// Bit 14 of the selector: write channel (ignored for the lookup).
const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// Length of a file name in a directory entry, including the NUL.
const FW_CFG_MAX_FILE_PATH: usize = 56;

/// The fw_cfg device (registered at 0x510 with 2 ports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// The device with the standard items for `ram_size` bytes of RAM and `cpus` vCPUs.
    pub fn new(ram_size: u64, cpus: u16) -> FwCfg {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.insert(FW_CFG_ID, 1u32.to_le_bytes().to_vec());
        items.insert(FW_CFG_RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(FW_CFG_NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(FW_CFG_MAX_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(FW_CFG_KERNEL_DATA, 0u64.to_le_bytes().to_vec());
        let mut cfg = FwCfg {
            items,
            files: Vec::new(),
            selected: 0,
            offset: 0,
        };
        cfg.rebuild_dir();
        cfg
    }

    /// Sets (or replaces) the item at `key`.
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// Adds a named file (e.g. `"etc/foo"`); it gets the next free key from 0x20 and an entry in the file
    /// directory. Returns the key. Names longer than 55 bytes are refused.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, String> {
        if name.is_empty() || name.len() >= FW_CFG_MAX_FILE_PATH {
            return Err(format!(
                "fw_cfg file name '{name}' must be 1..{} bytes",
                FW_CFG_MAX_FILE_PATH - 1
            ));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(format!("fw_cfg file '{name}' already exists"));
        }
        let key = FW_CFG_FILE_FIRST
            .checked_add(self.files.len() as u16)
            .filter(|&k| k < FW_CFG_WRITE_CHANNEL)
            .ok_or_else(|| "too many fw_cfg files".to_string())?;
        self.items.insert(key, data);
        self.files.push((name.to_string(), key));
        self.rebuild_dir();
        Ok(key)
    }

    /// Rebuilds the directory item: u32 count (big-endian), then per file u32 size (BE), u16 key (BE),
    /// u16 reserved, 56-byte NUL-padded name; sorted by name as QEMU does.
    fn rebuild_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &files {
            let size = self.items.get(key).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut n = [0u8; FW_CFG_MAX_FILE_PATH];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(FW_CFG_FILE_DIR, dir);
    }

    /// Selects an item and resets the read offset.
    pub fn select(&mut self, key: u16) {
        self.selected = key & !FW_CFG_WRITE_CHANNEL;
        self.offset = 0;
    }

    /// Reads the next byte of the selected item (0 past the end or for unknown keys).
    pub fn read_byte(&mut self) -> u8 {
        let byte = self
            .items
            .get(&self.selected)
            .and_then(|d| d.get(self.offset))
            .copied()
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }
}

/// Schema version of fw_cfg's saved state.
const FW_CFG_STATE_VERSION: u32 = 1;

/// fw_cfg's guest-visible state: the selected item and the read offset in it. The items themselves come from
/// the destination's configuration (which must match the source's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedFwCfg {
    selected: u16,
    offset: u64,
}

impl PioDevice for FwCfg {
    fn save_state(&self) -> Option<(&'static str, u32, serde_json::Value)> {
        let saved = SavedFwCfg {
            selected: self.selected,
            offset: self.offset as u64,
        };
        Some(("fw_cfg", FW_CFG_STATE_VERSION, super::encode_state(&saved)))
    }

    fn restore_state(&mut self, version: u32, state: &serde_json::Value) -> Result<(), String> {
        let saved: SavedFwCfg = super::decode_state(version, FW_CFG_STATE_VERSION, state)?;
        // An offset past the item's end reads zeros, as on the source; it only has to fit in usize.
        self.offset = usize::try_from(saved.offset)
            .map_err(|_| format!("read offset {} is out of range", saved.offset))?;
        self.selected = saved.selected & !FW_CFG_WRITE_CHANNEL;
        Ok(())
    }

    /// Items stay; the selection goes back to key 0 at offset 0.
    fn reset(&mut self) {
        self.select(FW_CFG_SIGNATURE);
    }

    /// The data port returns consecutive item bytes, one per byte of the access (so a 16- or 32-bit `in`
    /// reads 2 or 4 bytes in item order); the selector port reads 0.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            1 => data.iter_mut().for_each(|b| *b = self.read_byte()),
            _ => data.fill(0),
        }
    }

    /// A write to the selector port (any width; the low 16 bits count) selects an item. Data-port writes are
    /// ignored.
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if offset == 0 && !data.is_empty() {
            self.select(le_value(data) as u16);
        }
        DeviceAction::None
    }
}

//! QEMU's isa-debug-exit device: a write of value V ends the process with status `(V << 1) | 1`.

use super::{le_value, DeviceAction, PioDevice};

/// The device's port range (`-device isa-debug-exit,iobase=...,iosize=...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExitConfig {
    /// First port.
    pub iobase: u16,
    /// Number of ports.
    pub iosize: u16,
}

impl Default for DebugExitConfig {
    /// QEMU's defaults: iobase 0x501, iosize 0x2.
    fn default() -> Self {
        DebugExitConfig {
            iobase: 0x501,
            iosize: 0x2,
        }
    }
}

/// Parses a QEMU integer property: `0x`/`0X` hex, a leading `0` for octal, otherwise decimal.
fn parse_int(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses the properties of `-device isa-debug-exit,iobase=0xf4,iosize=0x4`. `props` may start with the
/// driver name `isa-debug-exit` or be just the property list. Missing properties take QEMU's defaults
/// (iobase 0x501, iosize 2). Errors use QEMU's wording where QEMU has one.
pub fn parse_debug_exit(props: &str) -> Result<DebugExitConfig, String> {
    let mut cfg = DebugExitConfig::default();
    let mut parts = props.split(',').peekable();
    if parts.peek().map(|p| p.trim()) == Some("isa-debug-exit") {
        parts.next();
    }
    for part in parts {
        if part.is_empty() {
            continue;
        }
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("isa-debug-exit: property '{part}' has no value"))?;
        let parsed = parse_int(value);
        match key {
            "iobase" => {
                cfg.iobase = parsed
                    .and_then(|v| u16::try_from(v).ok())
                    .ok_or_else(|| {
                        format!("isa-debug-exit: invalid iobase '{value}' (expected a port number 0..0xffff)")
                    })?
            }
            "iosize" => {
                cfg.iosize = parsed
                    .and_then(|v| u16::try_from(v).ok())
                    .filter(|&v| v > 0)
                    .ok_or_else(|| format!("isa-debug-exit: invalid iosize '{value}' (expected 1..0xffff)"))?
            }
            _ => return Err(format!("Property 'isa-debug-exit.{key}' not found")),
        }
    }
    if u32::from(cfg.iobase) + u32::from(cfg.iosize) > 0x1_0000 {
        return Err(format!(
            "isa-debug-exit: ports {:#x}+{:#x} extend beyond 0xffff",
            cfg.iobase, cfg.iosize
        ));
    }
    Ok(cfg)
}

/// The isa-debug-exit device. Any write inside its range (any offset, any width) exits; reads return 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExit {
    config: DebugExitConfig,
}

impl DebugExit {
    /// A device at the configured range.
    pub fn new(config: DebugExitConfig) -> DebugExit {
        DebugExit { config }
    }

    /// The configured range.
    pub fn config(&self) -> DebugExitConfig {
        self.config
    }

    /// The exit status for a written value: `(value << 1) | 1`, truncated to `i32` as QEMU's `exit()` call
    /// does. The operating system keeps only the low 8 bits (0 → 1, 1 → 3, 38 → 77, 63 → 127, 128 → 257 = 1).
    pub fn exit_status(value: u64) -> i32 {
        ((value << 1) | 1) as i32
    }
}

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
        DeviceAction::Exit(DebugExit::exit_status(le_value(data)))
    }
}

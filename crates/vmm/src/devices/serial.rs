//! COM1: a 16550 UART (vm-superio's `Serial`) whose output goes to stdout, a file, a shared buffer, or nowhere.
//! Output only: no interrupts are raised (the trigger is a no-op), and LSR always reads with THRE and TEMT set
//! (0x60), so polled output never stalls.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// vm-superio's input FIFO size.
const FIFO_SIZE: usize = 64;

use super::{DeviceAction, PioDevice};

/// I/O base of COM1 (registers 0x3F8..0x3FF).
pub const COM1_PORT: u16 = 0x3F8;

/// An interrupt line that goes nowhere (polled output needs none).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopTrigger;

impl Trigger for NoopTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the UART's output goes. Every byte is written through at once (vm-superio flushes after each byte),
/// so a harness reading the output sees it promptly and nothing is lost when the process exits.
pub enum SerialSink {
    /// The process's standard output (`-serial stdio`).
    Stdout,
    /// A file (`-serial file:PATH`).
    File(File),
    /// A shared in-memory buffer (tests, QMP, demo capture).
    Buffer(Arc<Mutex<Vec<u8>>>),
    /// Discarded (`-serial none`).
    Null,
}

impl fmt::Debug for SerialSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SerialSink::Stdout => "Stdout",
            SerialSink::File(_) => "File",
            SerialSink::Buffer(_) => "Buffer",
            SerialSink::Null => "Null",
        };
        f.write_str(name)
    }
}

impl SerialSink {
    /// Parses a `-serial` value: `stdio`, `file:PATH` (created or truncated), `none` or `null`.
    pub fn from_spec(spec: &str) -> Result<SerialSink, String> {
        match spec {
            "stdio" => Ok(SerialSink::Stdout),
            "none" | "null" => Ok(SerialSink::Null),
            _ => match spec.strip_prefix("file:") {
                Some(path) if !path.is_empty() => File::create(path)
                    .map(SerialSink::File)
                    .map_err(|e| format!("could not open serial output file '{path}': {e}")),
                _ => Err(format!(
                    "unsupported -serial backend '{spec}' (supported: stdio, file:PATH, none)"
                )),
            },
        }
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            // `Stdout` is line-buffered; the explicit flush below makes every byte visible at once.
            SerialSink::Stdout => io::stdout().lock().write(buf),
            SerialSink::File(f) => f.write(buf),
            SerialSink::Buffer(b) => {
                match b.lock() {
                    Ok(mut v) => v.extend_from_slice(buf),
                    Err(poisoned) => poisoned.into_inner().extend_from_slice(buf),
                }
                Ok(buf.len())
            }
            SerialSink::Null => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialSink::Stdout => io::stdout().lock().flush(),
            SerialSink::File(f) => f.flush(),
            SerialSink::Buffer(_) | SerialSink::Null => Ok(()),
        }
    }
}

/// The COM1 UART as a port-I/O device (registered with 8 ports).
pub struct SerialDevice {
    uart: Serial<NoopTrigger, NoEvents, SerialSink>,
}

impl SerialDevice {
    /// Takes the UART's sink out, leaving a fresh UART writing nowhere.
    fn take_sink(&mut self) -> SerialSink {
        let old = std::mem::replace(&mut self.uart, Serial::new(NoopTrigger, SerialSink::Null));
        old.into_writer()
    }
}

impl fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("sink", self.uart.writer())
            .finish()
    }
}

impl SerialDevice {
    /// A UART writing to `sink`.
    pub fn new(sink: SerialSink) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(NoopTrigger, sink),
        }
    }

    /// Queues bytes for the guest to read from RBR (e.g. stdin); returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }

    /// Flushes the sink.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush()
    }
}

/// Schema version of the serial port's saved state.
const SERIAL_STATE_VERSION: u32 = 1;

/// The UART's registers and unread input (vm-superio's `SerialState`, which has no serde support).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct SavedSerial {
    dll: u8,
    dlm: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    input: Vec<u8>,
}

impl From<SerialState> for SavedSerial {
    fn from(s: SerialState) -> Self {
        SavedSerial {
            dll: s.baud_divisor_low,
            dlm: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            input: s.in_buffer,
        }
    }
}

impl From<SavedSerial> for SerialState {
    fn from(s: SavedSerial) -> Self {
        SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlm,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.input,
        }
    }
}

impl PioDevice for SerialDevice {
    /// A fresh UART (registers at their power-on values, input FIFO empty) writing to the same sink.
    fn reset(&mut self) {
        let mut sink = self.take_sink();
        // Pending output was already written through; flushing is best effort.
        let _ = sink.flush();
        self.uart = Serial::new(NoopTrigger, sink);
    }

    fn save_state(&self) -> Option<(&'static str, u32, serde_json::Value)> {
        let saved = SavedSerial::from(self.uart.state());
        Some(("serial", SERIAL_STATE_VERSION, super::encode_state(&saved)))
    }

    /// The registers and the unread input are loaded; the output sink stays this process's.
    fn restore_state(&mut self, version: u32, state: &serde_json::Value) -> Result<(), String> {
        let saved: SavedSerial = super::decode_state(version, SERIAL_STATE_VERSION, state)?;
        // Check before the sink is taken, so a refused state leaves the UART as it was.
        if saved.input.len() > FIFO_SIZE {
            return Err(format!(
                "{} bytes of unread input (the FIFO holds {FIFO_SIZE})",
                saved.input.len()
            ));
        }
        let sink = self.take_sink();
        match Serial::from_state(&saved.into(), NoopTrigger, NoEvents, sink) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            // Cannot happen after the check above (NoopTrigger never fails); the sink is lost only then.
            Err(e) => Err(format!("the UART refused the state: {e:?}")),
        }
    }

    /// A wider access is split into byte accesses at consecutive registers, as QEMU does.
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let reg = usize::from(offset) + i;
            *byte = match u8::try_from(reg) {
                Ok(r) if r < 8 => self.uart.read(r),
                _ => 0xFF,
            };
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        for (i, &byte) in data.iter().enumerate() {
            let reg = usize::from(offset) + i;
            if let Ok(r) = u8::try_from(reg) {
                if r < 8 {
                    if let Err(e) = self.uart.write(r, byte) {
                        // A closed stdout or full disk must not stop the guest.
                        tracing::debug!("serial output failed: {e:?}");
                    }
                }
            }
        }
        DeviceAction::None
    }
}

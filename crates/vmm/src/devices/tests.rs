//! Device tests.

use std::sync::{Arc, Mutex};

use super::*;

fn buffer_sink() -> (SerialSink, Arc<Mutex<Vec<u8>>>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    (SerialSink::Buffer(buf.clone()), buf)
}

fn read1(dev: &mut dyn PioDevice, offset: u16) -> u8 {
    let mut b = [0u8; 1];
    dev.read(offset, &mut b);
    b[0]
}

#[test]
fn serial_polled_output_is_captured() {
    let (sink, buf) = buffer_sink();
    let mut uart = SerialDevice::new(sink);
    // What test kernels do: program the line (DLAB divisor, 8N1, FIFO, MCR), then poll LSR before each THR
    // write.
    for (reg, value) in [
        (1u16, 0x00u8),
        (3, 0x80),
        (0, 0x01),
        (1, 0x00),
        (3, 0x03),
        (2, 0xC7),
        (4, 0x0B),
    ] {
        assert_eq!(uart.write(reg, &[value]), DeviceAction::None);
    }
    for &byte in b"hello, world\n" {
        let lsr = read1(&mut uart, 5);
        assert_eq!(lsr & 0x20, 0x20, "THRE set");
        assert_eq!(lsr & 0x40, 0x40, "TEMT set");
        uart.write(0, &[byte]);
    }
    assert_eq!(buf.lock().unwrap().as_slice(), b"hello, world\n");
    // The divisor latch was written while DLAB was set: it did not produce output and reads back.
    uart.write(3, &[0x83]);
    assert_eq!(read1(&mut uart, 0), 0x01, "DLL");
    uart.write(3, &[0x03]);
    assert_eq!(read1(&mut uart, 3), 0x03, "LCR");
    assert_eq!(read1(&mut uart, 7), 0, "scratch");
    uart.write(7, &[0x5A]);
    assert_eq!(read1(&mut uart, 7), 0x5A, "scratch");
}

#[test]
fn serial_wide_accesses_are_split_into_bytes() {
    let (sink, buf) = buffer_sink();
    let mut uart = SerialDevice::new(sink);
    // A 16-bit write to THR: byte 0 to THR, byte 1 to IER.
    uart.write(0, &[b'A', 0x00]);
    assert_eq!(buf.lock().unwrap().as_slice(), b"A");
    // A 2-byte read at offset 5: LSR then MSR.
    let mut two = [0u8; 2];
    uart.read(5, &mut two);
    assert_eq!(two[0] & 0x60, 0x60);
    // Past the last register reads as all-ones.
    let mut four = [0u8; 4];
    uart.read(6, &mut four);
    assert_eq!(&four[2..], &[0xFF, 0xFF]);
}

#[test]
fn serial_input_can_be_read_by_the_guest() {
    let (sink, _buf) = buffer_sink();
    let mut uart = SerialDevice::new(sink);
    assert_eq!(uart.enqueue_input(b"ok"), 2);
    assert_eq!(read1(&mut uart, 5) & 1, 1, "data ready");
    assert_eq!(read1(&mut uart, 0), b'o');
    assert_eq!(read1(&mut uart, 0), b'k');
    assert_eq!(read1(&mut uart, 5) & 1, 0, "drained");
}

#[test]
fn serial_sink_specs() {
    assert!(matches!(
        SerialSink::from_spec("stdio"),
        Ok(SerialSink::Stdout)
    ));
    assert!(matches!(
        SerialSink::from_spec("none"),
        Ok(SerialSink::Null)
    ));
    assert!(matches!(
        SerialSink::from_spec("null"),
        Ok(SerialSink::Null)
    ));
    let path = std::env::temp_dir().join(format!("enlighten-serial-{}.log", std::process::id()));
    let spec = format!("file:{}", path.display());
    let sink = SerialSink::from_spec(&spec).expect("file sink");
    let mut uart = SerialDevice::new(sink);
    for &b in b"to file\n" {
        uart.write(0, &[b]);
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"to file\n");
    std::fs::remove_file(&path).unwrap();
    for bad in ["pty", "file:", "tcp:1234", ""] {
        let err = SerialSink::from_spec(bad).expect_err(bad);
        assert!(
            err.contains("-serial") || err.contains("serial"),
            "{bad}: {err}"
        );
    }
    let err = SerialSink::from_spec("file:/nonexistent-dir/x").expect_err("unwritable");
    assert!(
        err.contains("could not open serial output file '/nonexistent-dir/x'"),
        "{err}"
    );
}

#[test]
fn debug_exit_status_mapping() {
    // (value written, exit status, status the OS reports (low 8 bits))
    let cases: &[(u64, i32, u8)] = &[
        (0, 1, 1),
        (1, 3, 3),
        (38, 77, 77),
        (63, 127, 127),
        (127, 255, 255),
        (128, 257, 1),
        (0xFFFF_FFFF, -1, 255),
    ];
    for &(value, status, os) in cases {
        assert_eq!(DebugExit::exit_status(value), status, "value {value:#x}");
        assert_eq!(status as u8, os, "value {value:#x}");
    }
    let mut dev = DebugExit::new(DebugExitConfig {
        iobase: 0xF4,
        iosize: 4,
    });
    // (offset, bytes written, expected action)
    let writes: &[(u16, &[u8], DeviceAction)] = &[
        (0, &[38, 0, 0, 0], DeviceAction::Exit(77)),
        (0, &[1], DeviceAction::Exit(3)),
        (0, &[63, 0], DeviceAction::Exit(127)),
        (2, &[0], DeviceAction::Exit(1)),
        (0, &[0x00, 0x01, 0, 0], DeviceAction::Exit(0x201)),
    ];
    for &(offset, data, action) in writes {
        assert_eq!(dev.write(offset, data), action, "{data:?} at +{offset}");
    }
    let mut r = [0xAAu8; 4];
    dev.read(0, &mut r);
    assert_eq!(r, [0; 4], "reads return 0");
}

#[test]
fn debug_exit_property_parsing() {
    let ok: &[(&str, u16, u16)] = &[
        ("isa-debug-exit,iobase=0xf4,iosize=0x4", 0xF4, 4),
        ("iobase=0xf4,iosize=0x04", 0xF4, 4),
        ("isa-debug-exit", 0x501, 2),
        ("", 0x501, 2),
        ("iobase=244,iosize=4", 0xF4, 4),
        ("iobase=0364", 0xF4, 2),
        ("iosize=1,iobase=0XF4", 0xF4, 1),
        ("iobase=0xfffe,iosize=2", 0xFFFE, 2),
    ];
    for &(props, iobase, iosize) in ok {
        assert_eq!(
            parse_debug_exit(props),
            Ok(DebugExitConfig { iobase, iosize }),
            "{props:?}"
        );
    }
    let bad: &[(&str, &str)] = &[
        (
            "isa-debug-exit,foo=1",
            "Property 'isa-debug-exit.foo' not found",
        ),
        ("iobase=0x10000", "invalid iobase '0x10000'"),
        ("iobase=zz", "invalid iobase 'zz'"),
        ("iosize=0", "invalid iosize '0'"),
        ("iobase=0xffff,iosize=2", "extend beyond 0xffff"),
        ("iobase", "property 'iobase' has no value"),
    ];
    for &(props, want) in bad {
        let err = parse_debug_exit(props).expect_err(props);
        assert!(
            err.contains(want),
            "{props:?}: {err:?} does not contain {want:?}"
        );
    }
}

/// Selects `key` with a 16-bit write and reads `n` bytes one at a time from the data port.
fn fw_read(fw: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
    fw.write(0, &key.to_le_bytes());
    (0..n).map(|_| read1(fw, 1)).collect()
}

#[test]
fn fw_cfg_items_byte_by_byte() {
    let ram = 0x1_2345_6789u64;
    let mut fw = FwCfg::new(ram, 4);
    // (key, expected bytes, then zeros past the end)
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
        (FW_CFG_ID, vec![1, 0, 0, 0]),
        (FW_CFG_RAM_SIZE, vec![0x89, 0x67, 0x45, 0x23, 0x01, 0, 0, 0]),
        (FW_CFG_NB_CPUS, vec![4, 0]),
        (FW_CFG_MAX_CPUS, vec![4, 0]),
        (FW_CFG_KERNEL_DATA, vec![0; 8]),
        (FW_CFG_FILE_DIR, vec![0, 0, 0, 0]),
        (0x0002, vec![]),
        (0x1234, vec![]),
        (0x8003, vec![]),
    ];
    for (key, want) in cases {
        let got = fw_read(&mut fw, key, want.len() + 6);
        assert_eq!(&got[..want.len()], want.as_slice(), "key {key:#x}");
        assert!(
            got[want.len()..].iter().all(|&b| b == 0),
            "key {key:#x}: past the end reads 0"
        );
    }
    // Re-selecting resets the offset; a selector write with the write-channel bit selects the same item.
    assert_eq!(fw_read(&mut fw, FW_CFG_SIGNATURE, 2), b"QE");
    assert_eq!(fw_read(&mut fw, FW_CFG_SIGNATURE, 2), b"QE");
    assert_eq!(fw_read(&mut fw, FW_CFG_SIGNATURE | 0x4000, 4), b"QEMU");
    // Data-port writes are ignored; the selector port reads 0.
    fw.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
    fw.write(1, &[0x55]);
    assert_eq!(read1(&mut fw, 1), b'Q');
    assert_eq!(read1(&mut fw, 0), 0);
}

#[test]
fn fw_cfg_tolerates_wide_accesses() {
    let mut fw = FwCfg::new(128 << 20, 2);
    // 8-bit selector write.
    fw.write(0, &[FW_CFG_SIGNATURE as u8]);
    // 16-bit then 32-bit data reads return consecutive bytes.
    let mut two = [0u8; 2];
    fw.read(1, &mut two);
    assert_eq!(&two, b"QE");
    let mut four = [0u8; 4];
    fw.read(1, &mut four);
    assert_eq!(&four, b"MU\0\0");
    // 32-bit selector write: the low 16 bits count.
    fw.write(0, &[FW_CFG_NB_CPUS as u8, 0, 0xAA, 0xBB]);
    fw.read(1, &mut two);
    assert_eq!(two, [2, 0]);
}

#[test]
fn fw_cfg_file_directory() {
    let mut fw = FwCfg::new(1 << 30, 1);
    assert_eq!(fw.add_file("opt/zeta", b"zz".to_vec()), Ok(0x20));
    assert_eq!(fw.add_file("etc/alpha", b"hello".to_vec()), Ok(0x21));
    let dir = fw_read(&mut fw, FW_CFG_FILE_DIR, 4 + 2 * 64);
    assert_eq!(&dir[..4], &[0, 0, 0, 2], "count, big-endian");
    // Entries sorted by name: etc/alpha first.
    let entry = |i: usize| &dir[4 + 64 * i..4 + 64 * (i + 1)];
    assert_eq!(&entry(0)[..8], &[0, 0, 0, 5, 0x00, 0x21, 0, 0]);
    assert_eq!(&entry(0)[8..17], b"etc/alpha");
    assert!(entry(0)[17..].iter().all(|&b| b == 0));
    assert_eq!(&entry(1)[..8], &[0, 0, 0, 2, 0x00, 0x20, 0, 0]);
    assert_eq!(&entry(1)[8..16], b"opt/zeta");
    assert_eq!(fw_read(&mut fw, 0x21, 6), b"hello\0");
    assert!(fw.add_file("etc/alpha", vec![]).is_err(), "duplicate");
    assert!(fw.add_file("", vec![]).is_err(), "empty name");
    assert!(
        fw.add_file(&"x".repeat(56), vec![]).is_err(),
        "name too long"
    );
    assert!(fw.add_file(&"x".repeat(55), vec![]).is_ok());
    fw.set_item(0x0002, vec![9; 16]);
    assert_eq!(fw_read(&mut fw, 0x0002, 17)[15..], [9, 0]);
}

#[test]
fn bochs_shutdown_sequence() {
    // (bytes written, index of the byte that powers off, if any)
    let cases: &[(&[u8], Option<usize>)] = &[
        (b"Shutdown", Some(7)),
        (b"SShutdown", Some(8)),
        (b"ShutShutdown", Some(11)),
        (b"Shutdow", None),
        (b"Shutdowx", None),
        (b"shutdown", None),
        (b"xxShutdownyy", Some(9)),
    ];
    for &(bytes, fires_at) in cases {
        let mut dev = BochsShutdown::new();
        let actions: Vec<DeviceAction> = bytes.iter().map(|&b| dev.write(0, &[b])).collect();
        let fired: Vec<usize> = actions
            .iter()
            .enumerate()
            .filter(|(_, &a)| a == DeviceAction::Shutdown)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            fired,
            fires_at.into_iter().collect::<Vec<_>>(),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    // The sequence works again after it fired.
    let mut dev = BochsShutdown::new();
    for round in 0..2 {
        let last = b"Shutdown".iter().map(|&b| dev.write(0, &[b])).last();
        assert_eq!(last, Some(DeviceAction::Shutdown), "round {round}");
    }
    assert_eq!(dev.write(0, &[]), DeviceAction::None);
}

#[test]
fn pic_ports_read_all_masked() {
    let mut bus = standard_bus(SerialSink::Null, None, 1 << 27, 1).expect("bus");
    // What kernels do: mask both PICs.
    assert_eq!(bus.write(0x21, &[0xFF]), DeviceAction::None);
    assert_eq!(bus.write(0xA1, &[0xFF]), DeviceAction::None);
    // ICW sequence writes are accepted too.
    for (port, v) in [
        (0x20u16, 0x11u8),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xA0, 0x11),
    ] {
        assert_eq!(bus.write(port, &[v]), DeviceAction::None);
    }
    // (port, value read)
    for (port, want) in [(0x21u16, 0xFFu8), (0xA1, 0xFF), (0x20, 0), (0xA0, 0)] {
        let mut b = [0x55u8];
        bus.read(port, &mut b);
        assert_eq!(b[0], want, "port {port:#x}");
    }
    assert!(
        !bus.unhandled().has_seen(AccessKind::Pio, 0x21),
        "PIC ports are handled"
    );
    let mut pic = Pic::new();
    pic.write(1, &[0xFF]);
    assert_eq!(pic.writes(), 1);
}

#[test]
fn standard_bus_dispatch() {
    let (sink, buf) = buffer_sink();
    let cfg = parse_debug_exit("isa-debug-exit,iobase=0xf4,iosize=0x4").expect("props");
    let mut bus = standard_bus(sink, Some(cfg), 256 << 20, 2).expect("bus");
    // Serial through the bus.
    let mut lsr = [0u8];
    bus.read(0x3FD, &mut lsr);
    assert_eq!(lsr[0] & 0x20, 0x20);
    for &b in b"ok\n" {
        assert_eq!(bus.write(0x3F8, &[b]), DeviceAction::None);
    }
    assert_eq!(buf.lock().unwrap().as_slice(), b"ok\n");
    // Debug exit at every port of its range, 32-bit access.
    for port in 0xF4..0xF8u16 {
        assert_eq!(
            bus.write(port, &38u32.to_le_bytes()),
            DeviceAction::Exit(77),
            "port {port:#x}"
        );
    }
    assert_eq!(
        bus.write(0xF8, &[38]),
        DeviceAction::None,
        "outside the range"
    );
    // fw_cfg CPU count and RAM size.
    bus.write(0x510, &FW_CFG_NB_CPUS.to_le_bytes());
    let mut b = [0u8; 2];
    bus.read(0x511, &mut b);
    assert_eq!(u16::from_le_bytes(b), 2);
    bus.write(0x510, &FW_CFG_RAM_SIZE.to_le_bytes());
    let mut ram = [0u8; 8];
    for byte in ram.iter_mut() {
        let mut one = [0u8];
        bus.read(0x511, &mut one);
        *byte = one[0];
    }
    assert_eq!(u64::from_le_bytes(ram), 256 << 20);
    // Bochs shutdown port.
    let actions: Vec<DeviceAction> = b"Shutdown"
        .iter()
        .map(|&c| bus.write(0x8900, &[c]))
        .collect();
    assert_eq!(actions.last(), Some(&DeviceAction::Shutdown));
    // hyperv-testdev placeholder: accepted silently.
    assert_eq!(
        bus.write(0x3000, &0x0001_0002u32.to_le_bytes()),
        DeviceAction::None
    );
    let mut t = [0xAAu8; 4];
    bus.read(0x3000, &mut t);
    assert_eq!(t, [0; 4]);
    assert!(!bus.unhandled().has_seen(AccessKind::Pio, 0x3000));
}

#[test]
fn unhandled_ports_read_all_ones_and_drop_writes() {
    let mut bus = PioBus::new();
    // (port, access size)
    for (port, size) in [(0x80u16, 1usize), (0x64, 1), (0xCF8, 4), (0x70, 2)] {
        assert!(!bus.unhandled().has_seen(AccessKind::Pio, u64::from(port)));
        let mut data = vec![0u8; size];
        bus.read(port, &mut data);
        assert!(data.iter().all(|&b| b == 0xFF), "port {port:#x}");
        assert_eq!(bus.write(port, &data), DeviceAction::None);
        assert!(bus.unhandled().has_seen(AccessKind::Pio, u64::from(port)));
    }
    let mmio = Unhandled::new();
    let mut d = [0u8; 4];
    mmio.read(AccessKind::Mmio, 0xFEC0_0000, &mut d);
    assert_eq!(d, [0xFF; 4]);
    assert!(mmio.has_seen(AccessKind::Mmio, 0xFEC0_0000));
    assert!(!mmio.has_seen(AccessKind::Pio, 0xFEC0_0000));
    mmio.write(AccessKind::Mmio, 0xFED0_0000, &[1, 2, 3, 4]);
    assert!(mmio.has_seen(AccessKind::Mmio, 0xFED0_0000));
    // Logging happens once: the second access is not a first time.
    assert!(!mmio.first_time(AccessKind::Mmio, 0xFED0_0000));
}

#[test]
fn bus_rejects_bad_ranges() {
    let mut bus = PioBus::new();
    assert!(bus.insert(0x100, 4, Box::new(Pic::new())).is_ok());
    // (base, len, accepted?)
    for (base, len, ok) in [
        (0x103u16, 1u16, false),
        (0xFE, 3, false),
        (0xFC, 4, true),
        (0x104, 0, false),
        (0xFFFF, 2, false),
        (0xFFFF, 1, true),
    ] {
        assert_eq!(
            bus.insert(base, len, Box::new(Pic::new())).is_ok(),
            ok,
            "{base:#x}+{len}"
        );
    }
    // Overlapping debug-exit and COM1 ranges are reported.
    let err = standard_bus(
        SerialSink::Null,
        Some(DebugExitConfig {
            iobase: 0x3FC,
            iosize: 4,
        }),
        1 << 27,
        1,
    )
    .expect_err("overlap with COM1");
    assert!(err.contains("overlaps 0x3f8+0x8"), "{err}");
}

#[test]
fn le_value_widths() {
    for (bytes, v) in [
        (&[0x12u8][..], 0x12u64),
        (&[0x34, 0x12], 0x1234),
        (&[4, 3, 2, 1], 0x0102_0304),
        (&[], 0),
    ] {
        assert_eq!(le_value(bytes), v);
    }
}

#[test]
fn reset_returns_devices_to_power_on_state_and_keeps_sinks() {
    let (sink, buf) = buffer_sink();
    let mut bus = standard_bus(sink, None, 1 << 27, 3).expect("bus");
    // Change state everywhere: UART LCR and scratch, fw_cfg selection/offset, a partial Bochs sequence.
    let (fresh_sink, _) = buffer_sink();
    let power_on_lcr = read1(&mut SerialDevice::new(fresh_sink), 3);
    bus.write(0x3FB, &[0x1B]);
    bus.write(0x3FF, &[0x77]);
    let mut lcr = [0u8];
    bus.read(0x3FB, &mut lcr);
    assert_eq!(lcr[0], 0x1B);
    bus.write(0x510, &FW_CFG_NB_CPUS.to_le_bytes());
    let mut one = [0u8];
    bus.read(0x511, &mut one);
    assert_eq!(one[0], 3);
    for &c in b"Shutdo" {
        bus.write(0x8900, &[c]);
    }
    bus.reset();
    bus.read(0x3FB, &mut lcr);
    assert_eq!(lcr[0], power_on_lcr, "LCR back to its power-on value");
    bus.read(0x3FF, &mut one);
    assert_eq!(one[0], 0, "scratch back to 0");
    // fw_cfg: key 0 selected at offset 0.
    bus.read(0x511, &mut one);
    assert_eq!(one[0], b'Q');
    // Bochs: the partial sequence is forgotten ("wn" alone does nothing).
    assert_eq!(bus.write(0x8900, b"w"), DeviceAction::None);
    assert_eq!(bus.write(0x8900, b"n"), DeviceAction::None);
    // The UART still writes to the same sink.
    bus.write(0x3F8, b"!");
    assert_eq!(buf.lock().unwrap().as_slice(), b"!");
}

/// A bus like the platform's: COM1, fw_cfg, the Bochs port and hyperv-testdev (not attached to an engine).
fn state_bus(sink: SerialSink) -> PioBus {
    let mut bus = PioBus::new();
    bus.insert(COM1_PORT, 8, Box::new(SerialDevice::new(sink)))
        .unwrap();
    bus.insert(FW_CFG_SELECTOR_PORT, 2, Box::new(FwCfg::new(128 << 20, 2)))
        .unwrap();
    bus.insert(BOCHS_SHUTDOWN_PORT, 1, Box::new(BochsShutdown::new()))
        .unwrap();
    bus.insert(HYPERV_TESTDEV_PORT, 4, Box::new(HypervTestDev::new().0))
        .unwrap();
    bus.insert(PIC_MASTER_PORT, 2, Box::new(Pic::new()))
        .unwrap();
    bus
}

fn inb(bus: &mut PioBus, port: u16) -> u8 {
    let mut b = [0u8; 1];
    bus.read(port, &mut b);
    b[0]
}

#[test]
fn device_state_moves_to_another_bus() {
    let (sink, _) = buffer_sink();
    let mut src = state_bus(sink);
    // Serial: divisor, line control, scratch, and unread input.
    for (reg, v) in [
        (3u16, 0x80u8),
        (0, 0x0C),
        (1, 0x00),
        (3, 0x1B),
        (7, 0x5A),
        (4, 0x0B),
    ] {
        src.write(COM1_PORT + reg, &[v]);
    }
    // fw_cfg: the signature item, two bytes read.
    src.write(FW_CFG_SELECTOR_PORT, &FW_CFG_SIGNATURE.to_le_bytes());
    assert_eq!(inb(&mut src, FW_CFG_DATA_PORT), b'Q');
    assert_eq!(inb(&mut src, FW_CFG_DATA_PORT), b'E');
    // Bochs: half of "Shutdown".
    for &b in b"Shut" {
        src.write(BOCHS_SHUTDOWN_PORT, &[b]);
    }
    let states = src.save_states();
    let ids: Vec<&str> = states.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "serial@0x3f8",
            "fw_cfg@0x510",
            "bochs-shutdown@0x8900",
            "hyperv-testdev@0x3000"
        ]
    );

    let (sink, out) = buffer_sink();
    let mut dst = state_bus(sink);
    dst.restore_states(&states).unwrap();
    assert_eq!(dst.save_states(), states);
    // The guest continues where it was: the next fw_cfg bytes, the rest of "Shutdown", the UART settings.
    assert_eq!(inb(&mut dst, FW_CFG_DATA_PORT), b'M');
    assert_eq!(inb(&mut dst, COM1_PORT + 3), 0x1B);
    assert_eq!(inb(&mut dst, COM1_PORT + 7), 0x5A);
    let mut action = DeviceAction::None;
    for &b in b"down" {
        action = dst.write(BOCHS_SHUTDOWN_PORT, &[b]);
    }
    assert_eq!(action, DeviceAction::Shutdown);
    // Output goes to the destination's own sink.
    dst.write(COM1_PORT, b"x");
    assert_eq!(out.lock().unwrap().as_slice(), b"x");
}

#[test]
fn serial_unread_input_survives() {
    let mut src = SerialDevice::new(SerialSink::Null);
    assert_eq!(src.enqueue_input(b"hi"), 2);
    let (name, version, state) = src.save_state().unwrap();
    assert_eq!(name, "serial");
    let mut dst = SerialDevice::new(SerialSink::Null);
    dst.restore_state(version, &state).unwrap();
    assert_eq!(read1(&mut dst, 5) & 1, 1, "data ready");
    assert_eq!(read1(&mut dst, 0), b'h');
    assert_eq!(read1(&mut dst, 0), b'i');
    assert_eq!(read1(&mut dst, 5) & 1, 0);
}

#[test]
fn bad_device_states_are_refused() {
    let (sink, _) = buffer_sink();
    let good = state_bus(sink).save_states();
    let with = |id: &str, f: &dyn Fn(&mut DeviceState)| {
        let mut s = good.clone();
        let d = s.iter_mut().find(|d| d.id == id).unwrap();
        f(d);
        s
    };
    let mut twice = good.clone();
    twice.push(good[0].clone());
    let mut unknown = good.clone();
    unknown[1].id = "virtio@0x510".into();
    let cases: Vec<(&str, Vec<DeviceState>, &str)> = vec![
        (
            "unknown device",
            unknown,
            "device 'virtio@0x510', which this VM does not have",
        ),
        ("twice", twice, "device 'serial@0x3f8' twice"),
        (
            "serial version",
            with("serial@0x3f8", &|d| d.version = 2),
            "state version 2 is not supported (this build reads version 1)",
        ),
        (
            "serial garbage",
            with("serial@0x3f8", &|d| {
                d.state = serde_json::json!({"dll": "x"})
            }),
            "does not decode",
        ),
        (
            "serial FIFO overflow",
            with("serial@0x3f8", &|d| {
                d.state["input"] = serde_json::json!(vec![1u8; 65])
            }),
            "65 bytes of unread input",
        ),
        (
            "bochs overflow",
            with("bochs-shutdown@0x8900", &|d| d.state = serde_json::json!(8)),
            "8 bytes matched",
        ),
        (
            "testdev without engine",
            with("hyperv-testdev@0x3000", &|d| {
                d.state["msg_conns"] = serde_json::json!([[1, {"vp": 0, "sint": 2}]])
            }),
            "not connected to the Hyper-V engine",
        ),
        (
            "testdev echo without connection",
            with("hyperv-testdev@0x3000", &|d| {
                d.state["staged"] = serde_json::json!([{
                    "conn": 4, "target": {"vp": 0, "sint": 2}, "message_type": 1, "payload": []
                }])
            }),
            "has no connection",
        ),
    ];
    for (name, states, frag) in cases {
        let (sink, _) = buffer_sink();
        let mut bus = state_bus(sink);
        let e = bus.restore_states(&states).unwrap_err();
        assert!(e.contains(frag), "{name}: {e}");
    }
    // The empty list (a stream from a VM without device state) is accepted.
    let (sink, _) = buffer_sink();
    assert!(state_bus(sink).restore_states(&[]).is_ok());
}

//! The machine with the real platform: the Multiboot/ELF64 loaders and the standard device bus, booting the
//! guest runtime's test programs in-process (the binary-level tests live in crates/enlighten/tests).

use std::sync::{Arc, Mutex};

use vmm::devices::{standard_bus, DebugExitConfig, SerialSink};
use vmm::platform::{BusDevices, KernelLoader};
use vmm::{Machine, Outcome, VmConfig};

/// Boots guest program `name` (`elf64`: the long-mode entry image) with `vcpus` vCPUs and `append`; returns
/// the outcome and the serial output.
fn boot(name: &str, elf64: bool, vcpus: u32, append: &str) -> (Outcome, String) {
    let path = if elf64 {
        enlighten_guests::elf64_path(name)
    } else {
        enlighten_guests::kernel_path(name)
    }
    .unwrap_or_else(|| panic!("no guest program {name}"));
    let image = std::fs::read(path).unwrap();
    let out = Arc::new(Mutex::new(Vec::new()));
    let ram = 128 << 20;
    let bus = standard_bus(
        SerialSink::Buffer(out.clone()),
        Some(DebugExitConfig {
            iobase: 0xf4,
            iosize: 4,
        }),
        ram,
        vcpus as u16,
    )
    .unwrap();
    let loader = Arc::new(KernelLoader::new(
        image,
        path.to_string(),
        append.to_string(),
        Vec::new(),
    ));
    let cfg = VmConfig {
        ram_size: ram,
        vcpus,
        no_reboot: true,
        ..VmConfig::default()
    };
    let (machine, fds) = Machine::new(cfg, loader, Arc::new(BusDevices::new(bus))).unwrap();
    let outcome = machine.run(fds);
    let text = String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    (outcome, text)
}

fn assert_passed(outcome: &Outcome, out: &str, what: &str) {
    assert_eq!(*outcome, Outcome::Exit(1), "{what}\n{out}");
    assert!(out.contains("SUMMARY:"), "{what}\n{out}");
    assert!(!out.contains("FAIL"), "{what}\n{out}");
}

#[test]
fn hello_through_both_entry_paths() {
    for elf64 in [false, true] {
        let (outcome, out) = boot("hello", elf64, 1, "");
        assert_passed(&outcome, &out, &format!("hello elf64={elf64}"));
        let how = if elf64 { "ELF64" } else { "multiboot" };
        assert!(out.contains(how), "{out}");
    }
}

#[test]
fn smp_reports_every_apic_id_with_1_2_4_vcpus() {
    for n in [1u32, 2, 4] {
        for mode in ["xapic", "x2apic"] {
            let (outcome, out) = boot("smp", false, n, &format!("mode={mode} cpus={n}"));
            assert_passed(&outcome, &out, &format!("smp {n} {mode}"));
        }
    }
}

#[test]
fn fw_cfg_ipi_and_priorities() {
    let cases: &[(&str, u32, &str)] = &[
        ("fw_cfg", 2, "cpus=2 mem=134217728"),
        ("ipi", 2, "mode=x2apic"),
        ("ipi", 4, "mode=xapic"),
        ("apic_priority", 1, "mode=xapic"),
        ("apic_priority", 1, "mode=x2apic"),
    ];
    for (name, n, append) in cases {
        let (outcome, out) = boot(name, false, *n, append);
        assert_passed(&outcome, &out, &format!("{name} -smp {n} {append}"));
    }
}

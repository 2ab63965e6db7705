//! Platform devices and boot paths under real KVM: fw_cfg, isa-debug-exit status mapping, serial output,
//! Multiboot and ELF64 entry, CPL-3 and exception-fixup runtime checks, triple fault and an instruction
//! KVM cannot emulate.

mod guest_common;
use guest_common::*;

#[test]
fn hello_multiboot() {
    let o = run_guest("hello", 1, None, &[]);
    assert_passed_with(&o, &["entry magic is 0x2BADB002"]);
    assert!(
        o.stdout.contains("booted via multiboot"),
        "{}",
        o.describe()
    );
}

#[test]
fn hello_elf64_direct_boot() {
    let args = qemu_style_args(kernel_elf64("hello"), 1, None, &[]);
    let o = run_raw(&args);
    if under_qemu() {
        // QEMU refuses 64-bit images (multiboot: "Cannot load x86-64 image"; 7.2 tries PVH first).
        assert!(
            o.stderr.contains("Cannot load x86-64 image")
                || o.stderr.contains("without PVH ELF Note"),
            "{}",
            o.describe()
        );
        return;
    }
    assert_passed_with(&o, &["entry magic is 0x2BADB002"]);
    assert!(o.stdout.contains("booted via ELF64"), "{}", o.describe());
}

#[test]
fn runtime_user_mode_and_msr_fixups() {
    let o = run_guest("usermode", 1, None, &[]);
    assert_passed_with(
        &o,
        &[
            "run_user ran at CPL 3",
            "rdmsr of a non-existent MSR raises #GP",
            "wrmsr of a non-existent MSR raises #GP",
            "interrupts are off at entry",
            "pte_4k splits the 2 MiB page keeping the identity translation",
            "a remapped 4 KiB page reads at CPL 3",
            "remapping it again is seen after invlpg",
        ],
    );
}

#[test]
fn fw_cfg_cpu_count_and_ram_size() {
    // (smp, -m argument, bytes)
    let cases: &[(u32, Option<&str>, u64)] = &[
        (1, None, 128 << 20),
        (2, Some("256"), 256 << 20),
        (3, Some("512M"), 512 << 20),
        (4, Some("1G"), 1 << 30),
    ];
    for &(smp, mem, bytes) in cases {
        let mut extra = Vec::new();
        if let Some(m) = mem {
            extra.extend(["-m", m]);
        }
        let append = format!("cpus={smp} mem={bytes}");
        let o = run_guest("fw_cfg", smp, Some(&append), &extra);
        let cpus = format!("fw_cfg NB_CPUS is {smp} (expected {smp})");
        let ram = format!("fw_cfg RAM_SIZE is {bytes} (expected {bytes})");
        assert_passed_with(
            &o,
            &[
                "fw_cfg signature is \"QEMU\"",
                &cpus,
                &ram,
                "Multiboot mem_upper covers RAM",
                "an unknown key reads 0",
            ],
        );
    }
}

#[test]
fn debug_exit_status_mapping() {
    // QEMU: status = (code << 1) | 1, truncated to 8 bits by the OS.
    for (code, status) in [
        (0u32, 1),
        (1, 3),
        (2, 5),
        (38, 77),
        (63, 127),
        (127, 255),
        (128, 1),
    ] {
        let o = run_guest("debug_exit", 1, Some(&format!("code={code}")), &[]);
        assert!(!o.timed_out, "{}", o.describe());
        assert_eq!(o.status, Some(status), "code {code}\n{}", o.describe());
        assert!(
            o.stdout
                .contains(&format!("debug_exit: writing {code} to port 0xf4")),
            "{}",
            o.describe()
        );
        assert!(!o.stdout.contains("FAIL"), "{}", o.describe());
        assert!(o.stderr_noise().is_empty(), "{}", o.describe());
    }
}

#[test]
fn serial_output_is_captured_exactly() {
    let o = run_guest("serial", 1, None, &[]);
    assert_passed_with(
        &o,
        &[
            "LSR reads",
            "LCR reads back 8N1",
            "scratch register holds a byte",
        ],
    );
    let mut want = String::from("serial-begin\n");
    want.extend((0x20u8..0x7f).map(char::from));
    want.push('\n');
    for i in 0u32..10 {
        want.push_str(&format!(
            "line {i} of 10: {:08x} the quick brown fox jumps over the lazy dog\n",
            i.wrapping_mul(0x1111_1111)
        ));
    }
    want.push_str("serial-end\n");
    assert!(
        o.stdout.contains(&want),
        "serial text differs; want:\n{want}\n{}",
        o.describe()
    );
}

#[test]
fn triple_fault_stops_like_qemu() {
    let o = run_guest("triple_fault", 1, None, &[]);
    assert!(!o.timed_out, "{}", o.describe());
    // --no-reboot: QEMU stops the VM and exits 0.
    assert_eq!(o.status, Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("loading an empty IDT"),
        "{}",
        o.describe()
    );
    assert!(!o.stdout.contains("survived"), "{}", o.describe());
    if !under_qemu() {
        assert!(
            o.stderr.lines().any(|l| l.starts_with("warning:")),
            "a triple fault should log a warning: line\n{}",
            o.describe()
        );
        assert!(
            o.stderr.lines().all(|l| !l.starts_with("error:")),
            "{}",
            o.describe()
        );
    }
}

#[test]
fn unemulatable_instruction_is_an_error_with_registers_and_bytes() {
    if under_qemu() {
        // QEMU stops the VM with "KVM internal error" and keeps running: nothing to compare.
        eprintln!("skipped under QEMU");
        return;
    }
    let o = run_guest("bad_insn", 1, None, &[]);
    assert!(!o.timed_out, "the VMM hung\n{}", o.describe());
    assert!(
        o.stdout.contains("executing lock cmpxchg16b"),
        "{}",
        o.describe()
    );
    assert!(!o.stdout.contains("FAIL"), "{}", o.describe());
    assert!(
        matches!(o.status, Some(s) if s != 0 && s != 1),
        "status must be an error\n{}",
        o.describe()
    );
    assert!(o.stderr.contains("error:"), "{}", o.describe());
    let err = o.stderr.to_lowercase();
    assert!(err.contains("rip"), "registers missing\n{}", o.describe());
    // lock cmpxchg16b (%rsi)-ish: f0 48 0f c7 ..
    let compact: String = err.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert!(
        compact.contains("f0480fc7"),
        "instruction bytes missing\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
}

#[test]
fn halted_vcpus_with_interrupts_disabled() {
    // One AP parked in `cli; hlt` is normal: the guest goes on and passes.
    let o = run_guest("halt", 2, Some("case=ap"), &[]);
    assert_passed_with(
        &o,
        &["vCPU 1 is parked in cli; hlt", "the BSP keeps running"],
    );
    if under_qemu() {
        // QEMU waits forever when every vCPU is halted with interrupts off.
        eprintln!("case=all skipped under QEMU");
        return;
    }
    // Every vCPU halted with interrupts off and no NMI source: the VM can never run again.
    let o = run_guest("halt", 1, Some("case=all"), &[]);
    assert!(
        !o.timed_out,
        "the VMM did not notice the dead VM\n{}",
        o.describe()
    );
    assert!(o.stdout.contains("every vCPU halts"), "{}", o.describe());
    assert!(
        matches!(o.status, Some(s) if s != 0 && s != 1),
        "status must be an error\n{}",
        o.describe()
    );
    assert!(
        o.stderr.lines().any(|l| l.starts_with("error:")),
        "{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
}

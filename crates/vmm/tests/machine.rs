//! The machine under real KVM: boot, serial, debug-exit, SMP bring-up, APIC timer, IPIs, rendezvous, reset,
//! triple fault, internal errors and deadlock detection. Guests are a few instructions assembled at test time.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::{EntryMode, Machine, Outcome, VmConfig};

fn boot(cfg: VmConfig, loader: Arc<RawLoader>, devices: Arc<TestDevices>) -> (Outcome, Duration) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let start = Instant::now();
    let (machine, fds) = Machine::new(cfg, loader, devices).expect("create the machine");
    let outcome = machine.run(fds);
    (outcome, start.elapsed())
}

fn cfg(vcpus: u32) -> VmConfig {
    VmConfig {
        vcpus,
        ..VmConfig::default()
    }
}

/// Prints `msg` on the serial port, then writes `code` to isa-debug-exit.
fn hello32(msg: &str, code: u32) -> String {
    let mut s = String::from(".code32\n");
    for b in msg.bytes() {
        s += &format!("mov $0x3f8, %dx\nmov ${b}, %al\nout %al, %dx\n");
    }
    s += &format!("mov $0xf4, %dx\nmov ${code}, %eax\nout %eax, %dx\n1: hlt\njmp 1b\n");
    s
}

#[test]
fn protected_mode_hello_and_debug_exit() {
    let cases: &[(u32, i32)] = &[(0, 1), (1, 3), (38, 77), (63, 127)];
    for &(code, status) in cases {
        let loader = RawLoader::new(
            EntryMode::Protected32,
            vec![(CODE_ADDR, assemble(&hello32("hi\n", code), CODE_ADDR))],
        );
        let devices = Arc::new(TestDevices::default());
        let (outcome, took) = boot(cfg(1), loader, devices.clone());
        assert_eq!(outcome, Outcome::Exit(status));
        assert_eq!(&*devices.serial.lock().unwrap(), b"hi\n");
        assert!(took < Duration::from_secs(5));
    }
}

#[test]
fn long_mode_entry_state() {
    // Checks the long-mode contract: CS.L (we execute 64-bit code), paging with the identity map (reads
    // 0xFEE00030, the APIC version, through it), RAX magic and RBX.
    let src = r#"
        .code64
        mov $0x2BADB002, %ecx
        cmp %rcx, %rax
        jne fail
        mov %cr0, %rax
        bt $31, %rax
        jnc fail
        mov $0xFEE00030, %rdi
        mov (%rdi), %eax
        cmp $0x50014, %eax
        jne fail
        mov $0xf4, %dx
        mov $5, %eax
        out %eax, %dx
    fail:
        mov $0xf4, %dx
        mov $9, %eax
        out %eax, %dx
    "#;
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, assemble(src, CODE_ADDR))],
    );
    let (outcome, _) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(11));
}

/// BSP: enable the APIC, INIT + SIPI (vector 0x08 → 0x8000) to all excluding self through xAPIC MMIO, wait
/// until every AP has set its APIC-ID bit at 0x9004, then report the bitmask through debug-exit. APs (real
/// mode): set their bit from CPUID.1:EBX[31:24] and park with cli; hlt.
fn smp_bringup(n: u32) -> (Vec<(u64, Vec<u8>)>, u32) {
    let bsp = format!(
        r#"
        .code32
        movl $0x1FF, 0xFEE000F0
        movl $0, 0xFEE00310
        movl $0x000C4500, 0xFEE00300
        movl $0x000C4608, 0xFEE00300
    wait:
        mov 0x9004, %eax
        and ${mask}, %eax
        cmp ${mask}, %eax
        jne wait
        mov $0xf4, %dx
        out %eax, %dx
    1:  hlt
        jmp 1b
    "#,
        mask = ((1u64 << n) - 2) as u32
    );
    let ap = r#"
        .code16
        mov $1, %eax
        cpuid
        shr $24, %ebx
        lock btsl %ebx, 0x9004
        cli
    1:  hlt
        jmp 1b
    "#;
    (
        vec![
            (CODE_ADDR, assemble(&bsp, CODE_ADDR)),
            (0x8000, assemble(ap, 0x8000)),
        ],
        ((1u64 << n) - 2) as u32,
    )
}

#[test]
fn smp_bringup_1_2_4() {
    for n in [2u32, 4] {
        let (pieces, mask) = smp_bringup(n);
        let loader = RawLoader::new(EntryMode::Protected32, pieces);
        let (outcome, _) = boot(cfg(n), loader, Arc::new(TestDevices::default()));
        assert_eq!(
            outcome,
            Outcome::Exit(((mask << 1) | 1) as i32),
            "{n} vCPUs"
        );
    }
    // One vCPU: the broadcast reaches nobody and the BSP is not disturbed.
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![(
            CODE_ADDR,
            assemble(
                r#"
                .code32
                movl $0x1FF, 0xFEE000F0
                movl $0x000C4500, 0xFEE00300
                movl $0x000C4608, 0xFEE00300
                mov $0xf4, %dx
                mov $7, %eax
                out %eax, %dx
                "#,
                CODE_ADDR,
            ),
        )],
    );
    let (outcome, _) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(15));
}

/// A 64-bit IDT at 0x20000 with one gate for `vector` pointing at `handler`, loaded with lidt.
fn idt64(vector: u8) -> String {
    format!(
        r#"
        mov $handler, %rax
        mov $0x20000 + {vector} * 16, %rdi
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8E00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        movw $0xFFF, 0x1F000
        movq $0x20000, 0x1F002
        lidt 0x1F000
        mov $0x80000, %rsp
        "#
    )
}

#[test]
fn apic_timer_periodic_interrupts_are_injected() {
    // Periodic timer, vector 0x40, divide by 1, 1 ms period: count 5 interrupts in the handler (with EOI),
    // the main loop halts with IF=1 between them; then report the count.
    let src = format!(
        r#"
        .code64
        {idt}
        mov $0xFEE00000, %rsi
        movl $0x1FF, 0xF0(%rsi)
        movl $0xB, 0x3E0(%rsi)
        movl $0x20040, 0x320(%rsi)
        movl $1000000, 0x380(%rsi)
        sti
    loop:
        hlt
        cmpl $5, 0x9000
        jb loop
        cli
        movl $0x10040, 0x320(%rsi)
        mov 0x9000, %eax
        mov $0xf4, %dx
        out %eax, %dx
    handler:
        incl 0x9000
        movl $0, 0xB0(%rsi)
        iretq
    "#,
        idt = idt64(0x40)
    );
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, assemble(&src, CODE_ADDR))],
    );
    let (outcome, took) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(11));
    assert!(
        took >= Duration::from_millis(5),
        "5 periods of 1 ms took {took:?}"
    );
}

#[test]
fn fixed_ipi_wakes_a_halted_ap() {
    // The AP (real mode) enables interrupts and halts: its IVT entry for vector 0x50 points at a handler that
    // sets a flag; the BSP starts it, waits a bit, sends a fixed IPI 0x50 to APIC ID 1, then waits for the
    // flag. The AP's APIC must be software-enabled: it writes SPIV itself (real mode cannot reach 0xFEE00000,
    // so the BSP enables... ) -- instead the AP uses x2APIC MSRs: enable x2APIC, SPIV = 0x1FF.
    let bsp = r#"
        .code32
        movl $0x1FF, 0xFEE000F0
        movl $0x000C4500, 0xFEE00300
        movl $0x000C4608, 0xFEE00300
    wait_ready:
        cmpl $1, 0x9008
        jne wait_ready
        movl $0x01000000, 0xFEE00310
        movl $0x00004050, 0xFEE00300
    wait_flag:
        cmpl $1, 0x900C
        jne wait_flag
        mov $0xf4, %dx
        mov $0x21, %eax
        out %eax, %dx
    "#;
    let ap = r#"
        .code16
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7000, %sp
        movw $handler - 0x8000, 0x50 * 4
        movw $0x800, 0x50 * 4 + 2
        mov $0x1B, %ecx
        rdmsr
        or $0xC00, %eax
        wrmsr
        mov $0x80F, %ecx
        mov $0x1FF, %eax
        xor %edx, %edx
        wrmsr
        movl $1, 0x9008
        sti
    1:  hlt
        jmp 1b
    handler:
        movl $1, 0x900C
        mov $0x80B, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        iret
    "#;
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![
            (CODE_ADDR, assemble(bsp, CODE_ADDR)),
            (0x8000, assemble(ap, 0x8000)),
        ],
    );
    let (outcome, _) = boot(cfg(2), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(0x43));
}

#[test]
fn triple_fault_with_no_reboot_stops() {
    let src = r#"
        .code64
        movw $0, 0x1F000
        movq $0, 0x1F002
        lidt 0x1F000
        ud2
    "#;
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, assemble(src, CODE_ADDR))],
    );
    let (outcome, _) = boot(
        VmConfig {
            no_reboot: true,
            ..cfg(1)
        },
        loader,
        Arc::new(TestDevices::default()),
    );
    assert_eq!(outcome, Outcome::Stopped);
}

#[test]
fn triple_fault_resets_and_reloads() {
    let fault = assemble(
        r#"
        .code64
        movw $0, 0x1F000
        movq $0, 0x1F002
        lidt 0x1F000
        ud2
        "#,
        CODE_ADDR,
    );
    let ok = assemble(
        &hello32("again", 2).replace(".code32", ".code64"),
        CODE_ADDR,
    );
    let loader = Arc::new(RawLoader {
        pieces: vec![(CODE_ADDR, fault)],
        mode: EntryMode::Long64,
        loads: Default::default(),
        after_reset: Some(vec![(CODE_ADDR, ok)]),
    });
    let devices = Arc::new(TestDevices::default());
    let (outcome, _) = boot(cfg(2), loader.clone(), devices.clone());
    assert_eq!(outcome, Outcome::Exit(5));
    assert_eq!(loader.loads.load(Ordering::SeqCst), 2);
    assert_eq!(devices.resets.load(Ordering::SeqCst), 1);
    assert_eq!(&*devices.serial.lock().unwrap(), b"again");
}

#[test]
fn emulation_failure_reports_instruction_bytes() {
    let src = r#"
        .code64
        mov $0x20000, %rdi
        xor %eax, %eax
        xor %edx, %edx
        lock cmpxchg16b (%rdi)
        mov $0xf4, %dx
        out %eax, %dx
    "#;
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, assemble(src, CODE_ADDR))],
    );
    let (outcome, _) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    match outcome {
        Outcome::Error(msg) => {
            assert!(msg.contains("internal error"), "{msg}");
            assert!(msg.contains("RIP="), "{msg}");
            assert!(msg.contains("f0 48 0f c7 0f"), "{msg}");
        }
        // Hosts whose KVM can emulate the instruction run on to the debug exit.
        other => assert_eq!(other, Outcome::Exit(1), "unexpected outcome"),
    }
}

#[test]
fn cli_hlt_everywhere_is_a_deadlock() {
    let src = ".code32\ncli\nhlt\n";
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![(CODE_ADDR, assemble(src, CODE_ADDR))],
    );
    let (outcome, took) = boot(cfg(2), loader, Arc::new(TestDevices::default()));
    match outcome {
        Outcome::Error(msg) => assert!(msg.contains("halted with interrupts disabled"), "{msg}"),
        other => panic!("unexpected outcome {other:?}"),
    }
    assert!(took < Duration::from_secs(5));
}

#[test]
fn bochs_shutdown_port_powers_off() {
    let mut src = String::from(".code32\nmov $0x8900, %dx\n");
    for b in b"Shutdown" {
        src += &format!("mov ${b}, %al\nout %al, %dx\n");
    }
    src += "cli\nhlt\n";
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![(CODE_ADDR, assemble(&src, CODE_ADDR))],
    );
    let (outcome, _) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::PowerOff);
}

#[test]
fn pause_stops_all_vcpus_at_a_consistent_point_and_resume_restarts_them() {
    // Every vCPU increments its own counter at 0x9100 + 8 * APIC ID, and does port I/O in the loop so that
    // pending exits must be completed at the rendezvous. The BSP starts the APs.
    let bsp = r#"
        .code32
        movl $0x1FF, 0xFEE000F0
        movl $0x000C4500, 0xFEE00300
        movl $0x000C4608, 0xFEE00300
    1:  incl 0x9100
        mov $0x3fd, %dx
        in %dx, %al
        jmp 1b
    "#;
    let ap = r#"
        .code16
        mov $1, %eax
        cpuid
        shr $24, %ebx
        shl $3, %ebx
    1:  addr32 incl 0x9100(%ebx)
        mov $0x3fd, %dx
        in %dx, %al
        jmp 1b
    "#;
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![
            (CODE_ADDR, assemble(bsp, CODE_ADDR)),
            (0x8000, assemble(ap, 0x8000)),
        ],
    );
    let (machine, fds) =
        Machine::new(cfg(3), loader, Arc::new(TestDevices::default())).expect("machine");
    let handle = machine.handle();
    let runner = std::thread::spawn(move || machine.run(fds));
    let counters = |h: &vmm::VmHandle| -> Vec<u32> {
        (0..3)
            .map(|i| {
                h.memory()
                    .read_obj::<u32>(GuestAddress(0x9100 + 8 * i))
                    .unwrap()
            })
            .collect()
    };
    // Wait until everyone runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counters(&handle).contains(&0) {
        assert!(
            Instant::now() < deadline,
            "vCPUs did not start: {:?}",
            counters(&handle)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 0..3 {
        let paused = handle.pause_all();
        assert!((0..3).all(|i| handle.is_parked(i)), "round {round}");
        let a = counters(&handle);
        let exits: Vec<u64> = (0..3).map(|i| paused.exit_count(i).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(counters(&handle), a, "counters moved while paused");
        let exits2: Vec<u64> = (0..3).map(|i| paused.exit_count(i).unwrap()).collect();
        assert_eq!(exits, exits2, "exits while paused");
        paused.resume();
        // Every vCPU moves again (allow for a loaded host: up to 10 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let b = counters(&handle);
            if a.iter().zip(&b).all(|(x, y)| y > x) {
                break;
            }
            assert!(Instant::now() < deadline, "not resumed: {a:?} -> {b:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Pausing a subset leaves the others running.
    let paused = handle.pause(&[1]);
    let a = counters(&handle);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = counters(&handle);
        if b[0] > a[0] && b[2] > a[2] {
            assert_eq!(a[1], b[1], "the paused vCPU moved");
            break;
        }
        assert!(Instant::now() < deadline, "others stopped: {a:?} -> {b:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(paused);
    handle.stop();
    assert_eq!(runner.join().unwrap(), Outcome::Cancelled);
}

/// Long-mode guest: IDT gate `vector` → `handler`, xAPIC software-enabled, then `body`; `handler` is appended.
fn lm_guest(vector: u8, body: &str, handler: &str) -> Vec<u8> {
    let src = format!(
        r#"
        .code64
        {idt}
        mov $0xFEE00000, %rsi
        movl $0x1FF, 0xF0(%rsi)
        {body}
    handler:
        {handler}
    "#,
        idt = idt64(vector)
    );
    assemble(&src, CODE_ADDR)
}

struct HvRange;

impl vmm::MsrHook for HvRange {
    fn rdmsr(&self, _vcpu: usize, msr: u32) -> Option<Result<u64, vmm::apic::Gp>> {
        (msr == 0x4000_0001).then_some(Ok(0x2A))
    }
    fn wrmsr(&self, _vcpu: usize, _msr: u32, _value: u64) -> Option<Result<(), vmm::apic::Gp>> {
        None
    }
}

#[test]
fn hyperv_range_msrs_gp_unless_a_hook_answers() {
    let body = "mov $0x40000001, %ecx\nrdmsr\nmov $0xf4, %dx\nout %eax, %dx\n";
    let on_gp = "mov $0xf4, %dx\nmov $7, %eax\nout %eax, %dx\n";
    let cases: &[(bool, i32)] = &[(false, 15), (true, 85)];
    for &(hook, status) in cases {
        let loader = RawLoader::new(
            EntryMode::Long64,
            vec![(CODE_ADDR, lm_guest(13, body, on_gp))],
        );
        let msr_hook: Option<Arc<dyn vmm::MsrHook>> =
            if hook { Some(Arc::new(HvRange)) } else { None };
        let (outcome, _) = boot(
            VmConfig { msr_hook, ..cfg(1) },
            loader,
            Arc::new(TestDevices::default()),
        );
        assert_eq!(outcome, Outcome::Exit(status), "hook {hook}");
    }
}

#[test]
fn self_nmi_wakes_a_cli_hlt_vcpu() {
    // ICR: shorthand self, NMI, assert. The vCPU then sits in cli; hlt until the NMI handler runs.
    let body = "movl $0x44400, 0x300(%rsi)\ncli\n1: hlt\njmp 1b\n";
    let handler = "mov $0xf4, %dx\nmov $0x11, %eax\nout %eax, %dx\n";
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, lm_guest(2, body, handler))],
    );
    let (outcome, _) = boot(cfg(1), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(0x23));
}

#[derive(Default)]
struct EoiLog(std::sync::Mutex<Vec<(usize, u8)>>);

impl vmm::EoiHook for EoiLog {
    fn eoi(&self, vcpu: usize, eoi: vmm::apic::Eoi) {
        self.0.lock().unwrap().push((vcpu, eoi.vector));
    }
}

#[test]
fn external_fixed_interrupt_wakes_a_halted_vcpu_and_eoi_is_observed() {
    // The guest halts with IF=1; the test delivers vector 0x41 from outside; the handler EOIs (MMIO) and
    // reports the vector it saw in its ISR (bit 1 of ISR register 2 at 0x120).
    let body = "sti\n1: hlt\njmp 1b\n";
    let handler = "mov 0x120(%rsi), %eax\nmovl $0, 0xB0(%rsi)\nmov $0xf4, %dx\nout %eax, %dx\n";
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, lm_guest(0x41, body, handler))],
    );
    let (machine, fds) =
        Machine::new(cfg(1), loader, Arc::new(TestDevices::default())).expect("machine");
    let log = Arc::new(EoiLog::default());
    machine.set_eoi_hook(log.clone()).unwrap();
    let handle = machine.handle();
    let runner = std::thread::spawn(move || machine.run(fds));
    std::thread::sleep(Duration::from_millis(50));
    assert!(handle.deliver_fixed(0, 0x41, false));
    let outcome = runner.join().unwrap();
    // ISR bit for 0x41 is bit 1 of the third ISR register: the handler sends 2, status (2 << 1) | 1.
    assert_eq!(outcome, Outcome::Exit(5));
    assert_eq!(*log.0.lock().unwrap(), vec![(0, 0x41)]);
}

#[test]
fn init_sipi_restarts_running_aps() {
    // APs first run a busy loop (from SIPI 0x08); the BSP then sends INIT + SIPI 0x0A, which must stop them
    // wherever they are, reset them to wait-for-SIPI and start them at 0xA000.
    let bsp = r#"
        .code32
        movl $0x1FF, 0xFEE000F0
        movl $0x000C4500, 0xFEE00300
        movl $0x000C4608, 0xFEE00300
    1:  cmpl $3, 0x9100
        jne 1b
        movl $0x000C4500, 0xFEE00300
        movl $0x000C460A, 0xFEE00300
    2:  cmpl $3, 0x9200
        jne 2b
        mov $0xf4, %dx
        mov $0x9, %eax
        out %eax, %dx
    "#;
    let first = ".code16\nlock incl 0x9100\n1: jmp 1b\n";
    let second = ".code16\nlock incl 0x9200\ncli\n1: hlt\njmp 1b\n";
    let loader = RawLoader::new(
        EntryMode::Protected32,
        vec![
            (CODE_ADDR, assemble(bsp, CODE_ADDR)),
            (0x8000, assemble(first, 0x8000)),
            (0xA000, assemble(second, 0xA000)),
        ],
    );
    let (outcome, took) = boot(cfg(4), loader, Arc::new(TestDevices::default()));
    assert_eq!(outcome, Outcome::Exit(0x13));
    assert!(took < Duration::from_secs(10));
}

/// One run of the wake-up stress test: `deliverers` threads deliver interrupts until the guest has handled
/// `interrupts` of them, and, with `pauses`, another thread pauses and resumes the vCPU (at least that many
/// times, and until the deliverers are done). Returns the number of wake-ups.
fn wake_up_stress(deliverers: usize, interrupts: u32, pauses: Option<u32>) -> u64 {
    // The guest alternates, at every interrupt, between an exit-free spin (only a kick gets it out of KVM_RUN:
    // a lost one leaves it there for good) and HLT (asleep on its condition variable).
    let body = r#"
        movl $0, 0x9000
        sti
    spin:
        testl $1, 0x9000
        jz spin
    halt:
        hlt
        testl $1, 0x9000
        jnz halt
        jmp spin
    "#;
    // Counts the interrupt, EOI, back to whichever loop was interrupted (which then looks at the new parity).
    let handler = "lock incl 0x9000\nmovl $0, 0xB0(%rsi)\niretq\n";
    let loader = RawLoader::new(
        EntryMode::Long64,
        vec![(CODE_ADDR, lm_guest(0x41, body, handler))],
    );
    let (machine, fds) =
        Machine::new(cfg(1), loader, Arc::new(TestDevices::default())).expect("machine");
    let handle = machine.handle();
    let runner = std::thread::spawn(move || machine.run(fds));
    let count = |h: &vmm::VmHandle| -> u32 {
        h.memory()
            .read_obj::<u32>(GuestAddress(0x9000))
            .expect("read the counter")
    };
    let delivering = Arc::new(std::sync::atomic::AtomicUsize::new(deliverers));
    let wakeups = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (finished_tx, finished_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    for _ in 0..deliverers {
        let (h, tx, delivering, wakeups) = (
            handle.clone(),
            finished_tx.clone(),
            delivering.clone(),
            wakeups.clone(),
        );
        std::thread::spawn(move || {
            let r = (|| loop {
                let c = count(&h);
                if c >= interrupts {
                    return Ok(());
                }
                // Accepted (or already pending in the IRR): either way an interrupt follows. Refused only before
                // the guest has software-enabled its APIC.
                let accepted = h.deliver_fixed(0, 0x41, false);
                wakeups.fetch_add(1, Ordering::SeqCst);
                if !accepted {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while count(&h) == c {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "the interrupt after count {c} was not handled in 10 s"
                        ));
                    }
                    std::thread::yield_now();
                }
            })();
            delivering.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(r);
        });
    }
    if let Some(min_pauses) = pauses {
        // Each pause kicks the vCPU and waits until it has parked: a lost kick hangs it.
        let (h, tx, delivering, wakeups) = (
            handle.clone(),
            finished_tx.clone(),
            delivering.clone(),
            wakeups.clone(),
        );
        std::thread::spawn(move || {
            let mut done = 0u32;
            while done < min_pauses || delivering.load(Ordering::SeqCst) > 0 {
                let p = h.pause_all();
                wakeups.fetch_add(1, Ordering::SeqCst);
                if !h.is_parked(0) {
                    let _ = tx.send(Err("pause_all returned with the vCPU not parked".into()));
                    return;
                }
                drop(p);
                done += 1;
                // Let it re-enter (or not quite), so the next pause races with its entry.
                for _ in 0..done % 64 {
                    std::thread::yield_now();
                }
            }
            let _ = tx.send(Ok(()));
        });
    }
    drop(finished_tx);
    let threads = deliverers + usize::from(pauses.is_some());
    for _ in 0..threads {
        match finished_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("lost wake-up: {e} (count {})", count(&handle)),
            Err(e) => panic!(
                "a pause or a delivery hangs ({e}); count {}",
                count(&handle)
            ),
        }
    }
    if deliverers > 0 {
        assert!(count(&handle) >= interrupts);
    }
    handle.stop();
    assert_eq!(runner.join().unwrap(), Outcome::Cancelled);
    wakeups.load(Ordering::SeqCst)
}

#[test]
fn wake_ups_are_never_lost_while_the_vcpu_alternates_halting_and_running() {
    // Stress test of the wake-up protocol (crates/vmm/src/kick.rs): state changed under the vCPU's lock, then
    // the condition variable and the kick. Each case fails (a 10 s or 60 s timeout) if one wake-up is lost.
    // Deliveries and pauses also run separately, because either one's kick would rescue a lost kick of the
    // other.
    // (deliverer threads, interrupts, pauses)
    let cases: &[(usize, u32, Option<u32>)] = &[
        (1, 1000, None),
        (3, 1500, None),
        (0, 0, Some(2000)),
        (3, 1500, Some(0)),
    ];
    for &(deliverers, interrupts, pauses) in cases {
        let wakeups = wake_up_stress(deliverers, interrupts, pauses);
        eprintln!("{deliverers} deliverers, {interrupts} interrupts, pauses {pauses:?}: {wakeups} wake-ups");
        assert!(wakeups >= u64::from(interrupts), "{wakeups} wake-ups");
    }
}

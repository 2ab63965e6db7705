//! SMP bring-up under real KVM: 1, 2 and 4 vCPUs in xAPIC and x2APIC mode (and 16 in x2APIC mode); every
//! vCPU comes online through INIT + one SIPI, reports its APIC ID (== its index), runs a function on
//! request and runs code at CPL 3.

mod guest_common;
use guest_common::*;

#[test]
fn smp_bring_up_every_vcpu_reports_its_apic_id() {
    let cases: &[(u32, &str)] = &[
        (1, "xapic"),
        (1, "x2apic"),
        (2, "xapic"),
        (2, "x2apic"),
        (4, "xapic"),
        (4, "x2apic"),
        (16, "x2apic"),
    ];
    for &(smp, mode) in cases {
        let append = format!("mode={mode} cpus={smp}");
        let o = run_guest("smp", smp, Some(&append), &[]);
        let online = format!("{smp} CPUs online, expected {smp}");
        assert_passed_with(
            &o,
            &[
                &online,
                "every vCPU reports APIC ID == index",
                "on_cpu ran once on every vCPU",
                "every vCPU ran a function at CPL 3",
                "IA32_APIC_BASE.EXTD matches",
            ],
        );
        let want_mode = if mode == "x2apic" {
            "(x2APIC)"
        } else {
            "(xAPIC)"
        };
        for cpu in 0..smp {
            let line = format!("CPU {cpu}: APIC ID {cpu} {want_mode}");
            assert!(
                o.stdout.contains(&line),
                "missing {line:?}\n{}",
                o.describe()
            );
        }
    }
}

#[test]
fn smp_bring_up_from_the_elf64_long_mode_entry() {
    // The same kernel entered directly in long mode (enlighten's ELF64 path); the APs still start in real
    // mode from the SIPI. QEMU cannot boot ELF64 images.
    if under_qemu() {
        eprintln!("skipped under QEMU (no ELF64 boot)");
        return;
    }
    for (smp, mode) in [(2u32, "xapic"), (3, "x2apic")] {
        let append = format!("mode={mode} cpus={smp}");
        let o = run_raw(&qemu_style_args(
            kernel_elf64("smp"),
            smp,
            Some(&append),
            &[],
        ));
        let online = format!("{smp} CPUs online, expected {smp}");
        assert_passed_with(&o, &[&online, "every vCPU reports APIC ID == index"]);
    }
}

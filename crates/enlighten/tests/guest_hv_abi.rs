//! The Hyper-V hypercall ABI through the page the VMM writes (`guests/tests/hv_hypercall.c`) and reference time
//! on 2 vCPUs (`guests/tests/hv_reftime.c`), under real KVM.

mod guest_common;
use guest_common::*;

#[test]
fn hypercall_statuses_and_register_preservation() {
    // (-cpu, -append)
    let cases: &[(&str, &str)] = &[
        ("host,hv-relaxed", "spin=0"),
        ("host,hv-relaxed,hv-vpindex,hv-synic", "synic=1 spin=0"),
        // hv-enforce-cpuid: NotifyLongSpinWait needs a spinlock retry count other than "never" (0xFFFFFFFF).
        (
            "host,hv-relaxed,hv-vpindex,hv-synic,hv-enforce-cpuid",
            "synic=1 spin=6",
        ),
        (
            "host,hv-relaxed,hv-vpindex,hv-synic,hv-spinlocks=0x1fff,hv-enforce-cpuid",
            "synic=1 spin=0",
        ),
    ];
    for (cpu, append) in cases {
        let o = run_guest("hv_hypercall", 1, Some(append), &["-cpu", cpu]);
        assert_passed_with(
            &o,
            &[
                "unknown code 0x7fff (slow): status 2 (expected 2), every register but RAX preserved",
                "unknown code 0x7fff (fast): status 2 (expected 2), every register but RAX preserved",
                "NotifyLongSpinWait with garbage RDX/R8",
                "reserved control bit 27",
                "reserved control bit 31",
                "reserved control bit 44",
                "reserved control bit 63",
                "SignalEvent with a misaligned input GPA: status 4",
                "SignalEvent with an input GPA outside RAM: status 4",
                "200 consecutive calls through the page",
                "return path, stack in one page: RSP after the call",
                "return path, return address split across two distant frames",
                "`out` followed by `mov al, 0x77; ret`: RSP after the call",
            ],
        );
        if append.contains("synic=1") {
            assert_passed_with(
                &o,
                &[
                    "PostMessage with a misaligned input GPA: status 4",
                    "PostMessage with an input GPA outside RAM: status b",
                ],
            );
        }
    }
}

fn assert_reference_time_passed(o: &Outcome, cpus: u32) {
    let mut lines = vec!["the TSC page is valid".to_string()];
    for cpu in 0..cpus {
        lines.push(format!("CPU {cpu}: reference time never stepped back (0"));
        lines.push(format!(
            "CPU {cpu}: page <= TIME_REF_COUNT <= page in every round (0 errors"
        ));
        lines.push(format!("CPU {cpu}: the sequence was never 0 or 0xFFFFFFFF"));
    }
    lines.push("reference time ran at 10 MHz against the TSC".to_string());
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_passed_with(o, &refs);
}

#[test]
fn reference_time_on_two_vcpus() {
    let o = run_guest(
        "hv_reftime",
        2,
        None,
        &["-cpu", "host,hv-relaxed,hv-vpindex,hv-time,hv-frequencies"],
    );
    assert_reference_time_passed(&o, 2);
}

#[test]
fn qemu_style_hv_passthrough_smp2_reference_clock() {
    // The command line a QEMU harness uses, with QEMU's underscore spelling.
    let o = run_guest("hv_reftime", 2, None, &["-cpu", "host,hv_passthrough"]);
    assert_reference_time_passed(&o, 2);
}

#[test]
fn hypercall_32bit_convention_from_protected_mode() {
    // `hv_hypercall32` is a standalone Multiboot kernel that stays in 32-bit protected mode.
    for cpu in ["host,hv-relaxed", "host,hv-relaxed,hv-vpindex,hv-time"] {
        let o = run_guest("hv_hypercall32", 1, None, &["-cpu", cpu]);
        assert_passed_with(
            &o,
            &[
                "32-bit unknown code: EDX:EAX = 2, EBX/ECX/ESI/EDI/EBP/ESP preserved",
                "32-bit reserved control bit 44 (EDX bit 12): status 3",
                "32-bit input GPA from EBX:ECX: in RAM -> 3 (no SynIC), above 4 GiB -> 4",
                "32-bit NotifyLongSpinWait: status 0",
            ],
        );
    }
}

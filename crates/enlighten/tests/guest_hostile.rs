//! Hostile guests under real KVM (issue 10): each guest program in `guests/tests/hostile_*.c` feeds the VMM
//! bad hypercall inputs, bad MSR values or races, expects exactly the status or #GP KVM's in-kernel Hyper-V
//! emulation gives, and the VMM must stay up: every run has a timeout (`guest_common::TIMEOUT`), must end
//! through debug-exit with status 1 and must print nothing on stderr but QEMU's CPU-model warnings (so no panic
//! message, no error report).

mod guest_common;
use guest_common::*;

/// Every enlightenment the userspace backend has, and the test device for PostMessage/SignalEvent connections.
const PASSTHROUGH: &[&str] = &["-cpu", "host,hv-passthrough", "-device", "hyperv-testdev"];

/// A run that must pass and contain these PASS lines (prefix match).
fn check(o: &Outcome, lines: &[&str]) {
    assert_passed_with(o, lines);
    assert!(
        o.elapsed < TIMEOUT,
        "took {:?}\n{}",
        o.elapsed,
        o.describe()
    );
}

#[test]
fn hypercall_inputs_outside_ram_on_mmio_straddling_huge_reps_full_sparse_sets() {
    let o = run_guest("hostile_hcall", 2, None, PASSTHROUGH);
    check(
        &o,
        &[
            "FlushVirtualAddressSpace with its input beyond RAM: result 3",
            "FlushVirtualAddressSpace with its input on the local APIC page: result 3",
            "FlushVirtualAddressSpace with its input in the 0xF0000000 hole: result 3",
            "SendSyntheticClusterIpiEx with its input 8 bytes before the end of RAM: result 3",
            "PostMessage with its input on the local APIC page: result b",
            "PostMessage with its input at the last byte of RAM (misaligned): result 4",
            "SignalEvent with its input beyond RAM: result 4",
            "FlushVirtualAddressSpace with its input straddling two RAM pages: result 0",
            "PostMessage with its input straddling two RAM pages (unknown connection): result 12",
            "FlushVirtualAddressSpace with the output GPA beyond RAM: result 0",
            // rep counts, rep start indexes, sparse sets with every bank, reserved control bits
            "FlushVirtualAddressList, rep 0xFFF, 1-entry input: result fff00000000",
            "FlushVirtualAddressList, rep 15, list beyond RAM: result 3",
            "FlushVirtualAddressList, rep 16, list beyond RAM (not read): result 1000000000",
            "FlushVirtualAddressList, rep 12, fast (one more than XMM0..5 hold): result 3",
            "FlushVirtualAddressListEx, rep 0xFFF, 1-entry input: result fff00000000",
            "FlushVirtualAddressList, rep 1, start 2: result 3",
            "unknown code 0x7FFF, rep 0xFFF start 0xFFF: result 2",
            "FlushVirtualAddressSpaceEx, 64 banks of all ones: result 0",
            "FlushVirtualAddressSpaceEx, 64 banks, input ends after 4 banks (end of RAM): result 3",
            "SendSyntheticClusterIpiEx, 64 banks of all ones: result 0",
            "... every vCPU got the IPI once (2 of 2)",
            "SendSyntheticClusterIpiEx, 64 banks, input ends after 3 banks (end of RAM): result 3",
            "each of the 14 reserved control bits gives INVALID_HYPERCALL_INPUT",
            // other accesses to the hypercall port
            "`out dx, al` to port 0xE4 outside the page is a hypercall (2)",
            "2- and 4-byte writes to port 0xE4 are ignored",
            "a read of port 0xE4 returns all-ones",
            "`rep outsb` of 5 bytes to port 0xE4: ignored or one hypercall per byte",
            "a single `outsb` to port 0xE4 is a 1-byte OUT, hence a hypercall (2)",
        ],
    );
}

#[test]
fn msr_read_only_reserved_bits_sint_vectors_pages_outside_ram_stimer_edges_eom_flood() {
    let o = run_guest("hostile_msr", 1, None, PASSTHROUGH);
    check(
        &o,
        &[
            "every write to the 6 read-only MSRs #GPs and changes nothing",
            "the 26 unimplemented synthetic MSRs #GP on read and write",
            "GUEST_OS_ID = ~0 and HYPERCALL with bits 11:2 set are stored",
            "REFERENCE_TSC with bits 11:1 set is stored and the page is valid",
            "VP_ASSIST_PAGE with bits 11:1 set is stored",
            "SCONTROL = ~0, SIMP and SIEFP with bits 11:1 set are stored",
            "every SINT stores all 64 bits",
            "STIMER CONFIG reserved bits (63:20, 15:13) and COUNT = ~0 are stored",
            "CRASH_P0..4 store ~0; CRASH_CTL writes without the notify bit keep reading 8000000000000000",
            "REENLIGHTENMENT_CONTROL and TSC_EMULATION_CONTROL store ~0",
            "TSC_EMULATION_STATUS #GPs on every non-zero value",
            "TSC_INVARIANT_CONTROL #GPs on bits other than 0 and on clearing bit 0",
            "RESET ignores every value but 1",
            "SINT0..15 with vectors 0..15: #GP unmasked (value kept), stored masked",
            "HYPERCALL enabled beyond RAM: #GP, value kept",
            "HYPERCALL enabled on the local APIC page: #GP, value kept",
            "HYPERCALL enabled in the 0xF0000000 hole: #GP, value kept",
            "VP_ASSIST_PAGE enabled on the local APIC page: #GP",
            "REFERENCE_TSC enabled on the local APIC page: stored, TIME_REF_COUNT still advances",
            "SIMP beyond RAM: stored; a stimer message is not delivered",
            "SIEFP on the local APIC page: SignalEvent returns 0, no interrupt",
            "SIMP in the 0xF0000000 hole: PostMessage echoes return 0 0 and are dropped",
            "direct one-shot stimers with vectors 0..15 expire without delivering anything",
            "a periodic direct stimer with vector 5 and a 100 ns period: nothing",
            "a 100 ns periodic direct stimer delivers",
            "count 0 clears enable (one-shot and periodic)",
            "count u64::MAX (one-shot, periodic, direct): enabled, nothing fires",
            "5000 EOM writes with nothing pending",
            "3000 EOMs while a timer message waits for a busy slot",
            "freeing the slot and one EOM delivers it exactly once (1)",
            "2000 more EOMs after delivery: no duplicate",
            "768 hyperv-testdev commands naming missing VPs/SINTs/connections are ignored",
            "a duplicate MSG_CONN_CREATE keeps the first target",
            "after MSG_CONN_DESTROY (twice) PostMessage gives 12",
            "four 100 ns periodic stimers at once",
            "exit-less EOI cleared, then the page disabled: the EOI is done",
            "exit-less EOI cleared, then the page moved: the EOI is done",
            "exit-less EOI not cleared, then the page disabled: no EOI",
            "exit-less EOI not cleared, then the page moved: no EOI",
            "... and nothing stays in service afterwards",
            "SIMP, SIEFP, TSC, assist and hypercall pages on one page: accepted",
            "hypercalls still work at the end",
        ],
    );
}

#[test]
fn hypercall_page_rewritten_moved_and_disabled_while_another_vcpu_calls_it() {
    let o = run_guest("hostile_page", 2, Some("calls=4000"), PASSTHROUGH);
    check(
        &o,
        &[
            "the page works before the race",
            "every call ended with the status or what the bytes in the page do (other: 0",
            "CPU 1 made all 4000 calls while CPU 0 rewrote the page",
            "re-enabling the page makes it work again",
        ],
    );
}

#[test]
fn vcpus_1024_hammer_the_same_hypercall_page() {
    let o = run_guest(
        "hostile_page",
        1024,
        Some("mode=hammer iters=16"),
        PASSTHROUGH,
    );
    check(
        &o,
        &[
            "all 1024 CPUs finished 16 rounds of 3 hypercalls",
            "49152 hypercalls through the same page, every status exact (0 wrong)",
        ],
    );
}

#[test]
fn partition_msrs_change_while_other_vcpus_use_time_timers_and_hypercalls() {
    let o = run_guest(
        "hostile_page",
        4,
        Some("mode=msrrace rounds=3000"),
        PASSTHROUGH,
    );
    check(
        &o,
        &[
            "3 CPUs kept running through 3000 rounds of partition MSR changes",
            "TIME_REF_COUNT never went backwards on any CPU (0, 0)",
            "every hypercall during the race kept its status (0 wrong)",
        ],
    );
}

#[test]
fn three_vcpus_flood_one_post_message_connection() {
    let o = run_guest(
        "hostile_page",
        4,
        Some("mode=postflood posts=200"),
        PASSTHROUGH,
    );
    check(
        &o,
        &[
            "3 CPUs posted 600 messages: every status SUCCESS or INSUFFICIENT_BUFFERS",
            "every accepted message delivered exactly once (sent 600, delivered 600, missing 0, duplicated 0, bad 0)",
        ],
    );
}

/// Runs `hostile_page mode=endrace end=<end>` and checks that the VMM stopped cleanly: status 0 through
/// `--no-reboot`, the guest reached the end, and stderr holds only `warning:` lines (the triple-fault report,
/// QEMU's crash messages), no error and no panic.
fn end_race(end: &str, smp: u32) -> Outcome {
    let append = format!("mode=endrace end={end}");
    let mut extra = PASSTHROUGH.to_vec();
    extra.extend(["-action", "panic=shutdown"]);
    let o = run_guest("hostile_page", smp, Some(&append), &extra);
    assert!(!o.timed_out, "{}", o.describe());
    assert_eq!(o.status, Some(0), "{}", o.describe());
    assert!(
        o.stdout
            .contains(&format!("every CPU is busy; ending the VM with {end}")),
        "{}",
        o.describe()
    );
    assert!(o.failures().is_empty(), "{}", o.describe());
    assert!(
        o.stderr_noise().iter().all(|l| l.starts_with("warning: ")),
        "{}",
        o.describe()
    );
    o
}

#[test]
fn reset_triple_fault_and_crash_while_every_other_vcpu_is_busy() {
    for smp in [2, 16] {
        let o = end_race("reset", smp);
        assert!(o.stderr_noise().is_empty(), "{}", o.describe());
        let o = end_race("triple", smp);
        assert!(o.stderr.contains("triple fault"), "{}", o.describe());
        let o = end_race("crash", smp);
        assert!(
            o.stderr.contains("warning: Guest crashed")
                && o.stderr.contains("HV crash parameters: (0xbad"),
            "{}",
            o.describe()
        );
    }
}

#[test]
fn reset_while_busy_reboots_with_every_vcpu_and_clean_hyperv_state() {
    // Without --no-reboot: the RESET reboots the VM; the second boot checks the state.
    let args: Vec<String> = qemu_style_args(
        kernel("hostile_page"),
        4,
        Some("mode=endrace end=reboot"),
        PASSTHROUGH,
    )
    .into_iter()
    .filter(|a| a != "--no-reboot")
    .collect();
    let o = run_raw(&args);
    check(
        &o,
        &[
            "every CPU came back after the reset (4)",
            "Hyper-V state reads as after a reset on every CPU",
            "hypercalls can be enabled again",
        ],
    );
    let first = o.stdout.find("ending the VM with reboot");
    let second = o.stdout.find("endrace: second boot");
    assert!(
        matches!((first, second), (Some(f), Some(s)) if f < s),
        "{}",
        o.describe()
    );
}

#[test]
fn post_message_flood_while_the_target_moves_disables_and_misplaces_its_simp() {
    let o = run_guest(
        "hostile_page",
        4,
        Some("mode=postflood posts=200 toggle=1"),
        PASSTHROUGH,
    );
    check(
        &o,
        &[
            "3 CPUs posted 600 messages: every status SUCCESS or INSUFFICIENT_BUFFERS",
            "with SIMP moved, disabled and put outside RAM",
            "after the toggling, a new message is delivered (status 0, 1)",
        ],
    );
}

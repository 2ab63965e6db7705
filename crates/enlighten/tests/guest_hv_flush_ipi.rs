//! The Hyper-V flush and cluster-IPI hypercalls under real KVM, from inside the guest:
//! `guests/tests/hv_flush.c` (a CPL-3 reader on another vCPU sees a remapped page after every flush form, and a
//! negative control shows the stale page without a flush) and `guests/tests/hv_ipi.c` (IPI and IPI-Ex reach
//! exactly their set, invalid inputs deliver nothing).

mod guest_common;
use guest_common::*;

/// The PASS lines of `hv_flush` (prefixes): the negative control and every flush form.
const FLUSH_LINES: &[&str] = &[
    "B reads the test page at CPL 3",
    "negative control: without a flush B still reads the old page",
    "resynchronised by a flush of all processors",
    "FlushVirtualAddressSpace, processor mask = B",
    "FlushVirtualAddressSpace, HV_FLUSH_ALL_PROCESSORS",
    "FlushVirtualAddressSpace, empty mask (= all)",
    "FlushVirtualAddressList, 1 GVA, mask = B",
    "FlushVirtualAddressList, 2 entries with a page range",
    "FlushVirtualAddressSpaceEx, sparse set {B}",
    "FlushVirtualAddressSpaceEx, format ALL",
    "FlushVirtualAddressListEx, sparse set {B}, GVA after the bank",
    "FlushVirtualAddressListEx, format ALL",
    "concurrent flushes:",
];

#[test]
fn flush_hypercalls_remove_stale_translations_on_the_target() {
    for smp in [2, 4] {
        let o = run_guest(
            "hv_flush",
            smp,
            Some("rounds=10"),
            &["-cpu", "host,hv-vpindex,hv-tlbflush,hv-tlbflush-ext"],
        );
        assert_passed_with(&o, FLUSH_LINES);
        assert!(
            !o.stdout.contains("UNVERIFIED"),
            "negative control did not show a stale read\n{}",
            o.describe()
        );
    }
}

#[test]
fn flush_hypercalls_with_enforced_cpuid() {
    let o = run_guest(
        "hv_flush",
        2,
        Some("rounds=3"),
        &["-cpu", "host,hv-vpindex,hv-tlbflush,hv-enforce-cpuid"],
    );
    assert_passed_with(&o, FLUSH_LINES);
}

const IPI_LINES: &[&str] = &[
    "VP index = vCPU index",
    "SendSyntheticClusterIpi, mask with a hole: status 0",
    "SendSyntheticClusterIpi fast, mask {2}: status 0",
    "SendSyntheticClusterIpi, every vCPU including the sender: status 0",
    "SendSyntheticClusterIpi, VP 40 (beyond the partition) ignored: status 0",
    "SendSyntheticClusterIpi, empty mask: status 0",
    "SendSyntheticClusterIpi, vector 15 refused: status 3",
    "SendSyntheticClusterIpi, vector 256 refused: status 3",
    "SendSyntheticClusterIpi fast, reserved upper half set: status 3",
    "SendSyntheticClusterIpi with var_cnt refused: status 3",
    "SendSyntheticClusterIpiEx, sparse bank 0 with a hole: status 0",
    "SendSyntheticClusterIpiEx, format ALL (sender included): status 0",
    "SendSyntheticClusterIpiEx, banks 0 and 2 (bank 2 beyond the partition): status 0",
    "SendSyntheticClusterIpiEx, bank 1 only (no vCPU): status 0",
    "SendSyntheticClusterIpiEx, empty set succeeds without a vector check: status 0",
    "SendSyntheticClusterIpiEx, var_cnt 1 for 2 banks refused: status 3",
    "SendSyntheticClusterIpiEx, format ALL with vector 15 refused: status 3",
    "SendSyntheticClusterIpiEx as a rep call refused: status 3",
];

#[test]
fn cluster_ipis_reach_exactly_their_set() {
    for smp in [3, 4, 8] {
        let o = run_guest("hv_ipi", smp, None, &["-cpu", "host,hv-vpindex,hv-ipi"]);
        assert_passed_with(&o, IPI_LINES);
    }
    let o = run_guest(
        "hv_ipi",
        4,
        None,
        &["-cpu", "host,hv-vpindex,hv-ipi,hv-enforce-cpuid"],
    );
    assert_passed_with(&o, IPI_LINES);
}

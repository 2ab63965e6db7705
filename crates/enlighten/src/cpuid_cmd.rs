//! `enlighten cpuid -cpu SPEC [--json]`: the hypervisor-range CPUID leaves a `-cpu` string produces.

use std::process::ExitCode;

use clap::Parser;
use hyperv::config::CpuConfig;
use hyperv::cpuid::{build_report, hypervisor_leaves, CpuidEntry, HostCpuid};

#[derive(Parser, Debug)]
#[command(
    name = "enlighten cpuid",
    about = "Print the hypervisor CPUID leaves (0x40000000 and up) that a -cpu string gives the guest"
)]
struct Args {
    /// The CPU model and features, as QEMU's -cpu: MODEL[,hv-FEATURE[=on|off]...].
    #[arg(long = "cpu", value_name = "SPEC")]
    cpu: String,
    /// Print a JSON array of {"function","index","eax","ebx","ecx","edx"} objects, sorted by function.
    #[arg(long)]
    json: bool,
}

/// One leaf in the `--json` output.
#[derive(serde::Serialize)]
struct JsonLeaf {
    function: u32,
    index: u32,
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
}

impl From<&CpuidEntry> for JsonLeaf {
    fn from(e: &CpuidEntry) -> Self {
        JsonLeaf {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

pub fn main(args: &[String]) -> ExitCode {
    let args = crate::cli::qemu_to_clap(args, &["cpu", "json"]);
    let args =
        match Args::try_parse_from(std::iter::once("enlighten cpuid".to_string()).chain(args)) {
            Ok(a) => a,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
    let cfg = match CpuConfig::parse(&args.cpu) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The host's supported CPUID supplies the KVM feature word (0x40000101) and the base leaves. Without KVM the
    // Hyper-V leaves are still computed; the host-dependent ones are then missing.
    let host = match vmm::host::open_kvm().and_then(|kvm| vmm::host::host_cpuid(&kvm)) {
        Ok(host) => host,
        Err(e) => {
            eprintln!("warning: {e}; host-dependent leaves are omitted");
            HostCpuid::new(Vec::new())
        }
    };
    let report = match build_report(&cfg, &host) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let mut leaves: Vec<&CpuidEntry> = hypervisor_leaves(&report.entries).collect();
    leaves.sort_by_key(|e| (e.function, e.index));
    if args.json {
        let json: Vec<JsonLeaf> = leaves.iter().map(|e| JsonLeaf::from(*e)).collect();
        match serde_json::to_string_pretty(&json) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        println!("function   index      eax        ebx        ecx        edx");
        for e in leaves {
            println!(
                "0x{:08x} 0x{:08x} 0x{:08x} 0x{:08x} 0x{:08x} 0x{:08x}",
                e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
            );
        }
        if !report.migration_blockers.is_empty() {
            println!(
                "migration blocked: {}",
                report.migration_blockers.join("; ")
            );
        }
    }
    ExitCode::SUCCESS
}

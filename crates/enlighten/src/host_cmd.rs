//! `enlighten host [--json]`: what this host's KVM offers, in the spirit of `virt-host-validate`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use vmm::host::{probe, HostReport};

#[derive(Parser, Debug)]
#[command(
    name = "enlighten host",
    about = "Report this host's KVM capabilities and Hyper-V support"
)]
struct Args {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(args: &[String]) -> ExitCode {
    let args = crate::cli::qemu_to_clap(args, &["json"]);
    let args = match Args::try_parse_from(std::iter::once("enlighten host".to_string()).chain(args))
    {
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
    let report = match probe() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", render(&report, std::io::stdout().is_terminal()));
    }
    if report.userspace_mode_available {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Renders the report as `virt-host-validate`-style lines.
fn render(r: &HostReport, color: bool) -> String {
    let (green, red, yellow, reset) = if color {
        ("\x1b[32m", "\x1b[31m", "\x1b[33m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let line = |what: &str, ok: bool, detail: &str, warn_only: bool| {
        let (c, word) = match (ok, warn_only) {
            (true, _) => (green, "PASS"),
            (false, true) => (yellow, "NOTE"),
            (false, false) => (red, "FAIL"),
        };
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        };
        format!("  {what:<52}: {c}{word}{reset}{detail}\n")
    };
    let mut out = String::new();
    out.push_str(&format!(
        "KVM device {}: API version {}\n",
        r.kvm_device, r.kvm_api_version
    ));
    out.push_str("Capabilities enlighten uses:\n");
    for c in &r.capabilities {
        if c.name.starts_with("KVM_CAP_HYPERV") || c.name == "KVM_CAP_SYS_HYPERV_CPUID" {
            continue;
        }
        let detail = format!("value {}", c.value);
        out.push_str(&line(c.name, c.value > 0, &detail, !c.required));
    }
    out.push_str("Kernel Hyper-V emulation (not needed by enlighten):\n");
    for c in r
        .capabilities
        .iter()
        .filter(|c| c.name.starts_with("KVM_CAP_HYPERV") || c.name == "KVM_CAP_SYS_HYPERV_CPUID")
    {
        out.push_str(&line(
            c.name,
            c.value > 0,
            &format!("value {}", c.value),
            true,
        ));
    }
    let hv_detail = match &r.kernel_hv_cpuid_error {
        Some(e) => format!("KVM_GET_SUPPORTED_HV_CPUID: {e}"),
        None => "KVM_GET_SUPPORTED_HV_CPUID works".to_string(),
    };
    out.push_str(&line(
        "Kernel emulates Hyper-V",
        r.kernel_hyperv_emulation,
        &hv_detail,
        true,
    ));
    out.push_str("enlighten:\n");
    let tsc = r
        .tsc_khz
        .map(|k| format!("{k} kHz"))
        .unwrap_or_else(|| "unknown".to_string());
    out.push_str(&line("Host TSC frequency", r.tsc_khz.is_some(), &tsc, true));
    let smt = match r.smt_active {
        Some(true) => "SMT active",
        Some(false) => "SMT inactive",
        None => "unknown",
    };
    out.push_str(&line(
        "SMT state (for hv-no-nonarch-coresharing=auto)",
        r.smt_active.is_some(),
        smt,
        true,
    ));
    let problems = r.problems.join("; ");
    out.push_str(&line(
        "Userspace Hyper-V mode available",
        r.userspace_mode_available,
        &problems,
        false,
    ));
    if r.userspace_mode_available {
        out.push_str(&format!(
            "  enlightenments available in userspace mode: {}\n",
            r.userspace_enlightenments.join(", ")
        ));
    }
    out
}

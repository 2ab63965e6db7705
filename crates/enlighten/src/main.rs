//! `enlighten`: run KVM guests with the Hyper-V enlightenments implemented in userspace.
//!
//! `enlighten [run] [QEMU-style options]` boots a guest (the built-in demo guest without `-kernel`);
//! `enlighten cpuid -cpu SPEC [--json]` prints the hypervisor CPUID leaves a `-cpu` string produces;
//! `enlighten host [--json]` reports what this host's KVM offers.

mod cli;
mod cpuid_cmd;
mod host_cmd;
mod migrate;
mod qmp_glue;
mod run;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::utf8_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.first().map(String::as_str) {
        Some("cpuid") => cpuid_cmd::main(&args[1..]),
        Some("host") => host_cmd::main(&args[1..]),
        Some("run") => run::main(args[1..].to_vec()),
        Some("snapshot") => migrate::snapshot_main(&args[1..]),
        Some("restore") => migrate::restore_main(&args[1..]),
        Some("help" | "-h" | "--help" | "-help") => {
            print!("{}", cli::TOP_LEVEL_HELP);
            ExitCode::SUCCESS
        }
        Some("-V" | "--version" | "-version") => {
            println!("enlighten {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => run::main(args),
    }
}

//! `enlighten cpuid -cpu SPEC [--json]`: the hypervisor-range CPUID leaves a `-cpu` string produces.

use std::process::ExitCode;

use clap::Parser;

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
    let _ = args;
    eprintln!("error: the CPUID builder is not wired up yet");
    ExitCode::FAILURE
}

//! `enlighten [run]`: boot a guest. (Placeholder until the VMM lands.)

use std::process::ExitCode;

pub fn main(args: Vec<String>) -> ExitCode {
    let _ = args;
    eprintln!("error: booting guests is not implemented yet");
    ExitCode::FAILURE
}

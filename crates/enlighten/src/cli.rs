//! Command-line helpers shared by the subcommands.
//!
//! QEMU spells long options with one dash (`-cpu host`); clap wants two. [`qemu_to_clap`] rewrites the known
//! single-dash spellings so both `-cpu` and `--cpu` work, as they do in QEMU.

/// The top-level help.
pub const TOP_LEVEL_HELP: &str = "\
enlighten: KVM guests with the Hyper-V enlightenments implemented in userspace

Usage:
  enlighten [run] [OPTIONS]         boot a guest (the built-in demo guest when no -kernel is given)
  enlighten cpuid -cpu SPEC [--json] print the hypervisor CPUID leaves (0x40000000 and up) for SPEC
  enlighten host [--json]           report this host's KVM: capabilities, Hyper-V support, userspace mode
  enlighten snapshot -qmp SOCK [--stream | --resume] STATE [MEMORY]
                                    save a running VM (started with -qmp): state file + memory file
                                    (or one stream with --stream), with progress; the VM stays paused
                                    unless --resume; see snapshot --help
  enlighten restore FILE [MEMORY] [--verify-memory] [OPTIONS]
                                    run a VM from FILE (same as OPTIONS plus -incoming file:FILE); MEMORY:
                                    the snapshot's memory file if moved; --verify-memory checks its CRC32
  enlighten help | --version

Run options follow QEMU's spelling (see `enlighten run --help` and docs/cli.md):
  -kernel FILE -append STR -initrd FILE[,FILE] -smp N -m SIZE -cpu MODEL[,FEATURE...]
  -serial stdio|file:PATH|none -device isa-debug-exit,iobase=0xf4,iosize=0x4 -device hyperv-testdev
  --no-reboot -action panic=shutdown|pause|none|exit-failure -qmp unix:PATH,server=on,wait=off -S
  -name NAME -incoming file:PATH|unix:PATH|tcp:HOST:PORT|exec:CMD|defer
  (QEMU no-ops such as -nodefaults, -display none, -machine accel=kvm are accepted)
";

/// The process arguments after the program name, as UTF-8 strings.
pub fn utf8_args() -> Result<Vec<String>, String> {
    std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument {a:?} is not valid UTF-8"))
        })
        .collect()
}

/// Rewrites `-name` to `--name` for each long option in `long_options`, leaving everything else alone.
/// `-name=value` is rewritten too. Arguments after a bare `--` are untouched.
pub fn qemu_to_clap(args: &[String], long_options: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut rest = false;
    for arg in args {
        if rest {
            out.push(arg.clone());
            continue;
        }
        if arg == "--" {
            rest = true;
            out.push(arg.clone());
            continue;
        }
        let rewritten = arg
            .strip_prefix('-')
            .filter(|s| !s.starts_with('-'))
            .and_then(|s| {
                let name = s.split('=').next().unwrap_or(s);
                long_options.contains(&name).then(|| format!("-{arg}"))
            });
        out.push(rewritten.unwrap_or_else(|| arg.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn rewrites_single_dash_long_options() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["-cpu", "host"], &["--cpu", "host"]),
            (&["--cpu", "host"], &["--cpu", "host"]),
            (&["-cpu=host", "--json"], &["--cpu=host", "--json"]),
            (&["-j"], &["-j"]),
            (&["-unknown"], &["-unknown"]),
            (&["--", "-cpu"], &["--", "-cpu"]),
            (&["-"], &["-"]),
        ];
        for (input, expected) in cases {
            assert_eq!(qemu_to_clap(&v(input), &["cpu"]), v(expected), "{input:?}");
        }
    }
}

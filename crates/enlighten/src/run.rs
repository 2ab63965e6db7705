//! `enlighten [run] [QEMU-style options]`: boot a guest (the built-in demo guest without `-kernel`).
//!
//! Options follow QEMU's spelling; each also works with two dashes (`--kernel`). Options QEMU harnesses pass
//! that need nothing here are accepted as no-ops. Anything else is refused with an `error:` naming it.

use std::process::ExitCode;
use std::sync::Arc;

use hyperv::config::{CpuConfig, HostInfo};
use hyperv::cpuid::HostCpuid;
use vmm::devices::{parse_debug_exit, standard_bus, DebugExitConfig, SerialSink};
use vmm::loader::Module;
use vmm::platform::{BusDevices, KernelLoader};
use vmm::{Machine, Outcome, VmConfig};

/// Exit status when the VM fails while running (KVM internal error, all vCPUs stuck, ...).
pub const RUNTIME_ERROR_STATUS: u8 = 2;

/// Usage text for `enlighten run -help`.
const USAGE: &str = "\
Usage: enlighten [run] [OPTIONS]

Boots a guest under KVM with the Hyper-V enlightenments implemented in userspace. Without -kernel, boots the
built-in demo guest. Options (QEMU spelling; two dashes also work):
  -kernel FILE            Multiboot v1 ELF32 kernel, or an ELF64 entered in long mode
  -append STRING          kernel command line (after the kernel path)
  -initrd FILE[ ARGS][,FILE...]  Multiboot modules
  -smp N | cpus=N[,...]   number of vCPUs (default 1)
  -m SIZE                 RAM size: 128, 128M, 2G, ... (default 128 MiB)
  -cpu MODEL[,FLAG...]    CPU model and features, with the hv-* enlightenment flags (default host)
  -serial stdio|file:PATH|none   COM1 output (default stdio; none with -nodefaults)
  -device isa-debug-exit[,iobase=0xf4,iosize=0x4]
  -device hyperv-testdev
  --no-reboot             stop (exit 0) instead of resetting on a triple fault or reset
  -qmp unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off   QMP socket (docs/qmp.md)
  -chardev socket,id=ID,path=PATH,server=on,wait=off  with  -mon chardev=ID,mode=control
  -S                      start with the vCPUs stopped until QMP 'cont' (status prelaunch)
  -name NAME | guest=NAME[,...]   the VM name (QMP query-name)
  -action panic=shutdown|pause|none|exit-failure[,...]   what a guest panic (Hyper-V CRASH_CTL) does
  -incoming file:PATH|unix:PATH|tcp:HOST:PORT|exec:CMD   load a migration stream before running
Accepted and ignored: -nodefaults, -display none, -machine/-M ...,accel=kvm, -enable-kvm,
  -device pc-testdev, -device pci-testdev, -global ...
";

/// The parsed run options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub kernel: Option<String>,
    pub append: String,
    pub initrd: Option<String>,
    /// `-qmp` values, in order.
    pub qmp: Vec<String>,
    /// `-chardev` values, in order.
    pub chardevs: Vec<String>,
    /// `-mon` values, in order.
    pub mons: Vec<String>,
    /// `-S`: start with the vCPUs stopped (run state `prelaunch`).
    pub prelaunch: bool,
    /// `-name`: the VM name.
    pub name: Option<String>,
    pub smp: u32,
    pub ram_size: u64,
    pub cpu: String,
    /// `-serial` value; `None` means the default (stdio, or none with `-nodefaults`).
    pub serial: Option<String>,
    pub nodefaults: bool,
    pub debug_exit: Option<DebugExitConfig>,
    pub hyperv_testdev: bool,
    pub no_reboot: bool,
    /// `-action panic=`.
    pub panic_action: vmm::lifecycle::PanicAction,
    /// `-incoming URI` (docs/migration.md).
    pub incoming: Option<String>,
    pub help: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            kernel: None,
            append: String::new(),
            initrd: None,
            qmp: Vec::new(),
            chardevs: Vec::new(),
            mons: Vec::new(),
            prelaunch: false,
            name: None,
            smp: 1,
            ram_size: vmm::layout::DEFAULT_RAM_SIZE,
            cpu: "host".to_string(),
            serial: None,
            nodefaults: false,
            debug_exit: None,
            hyperv_testdev: false,
            no_reboot: false,
            panic_action: vmm::lifecycle::PanicAction::default(),
            incoming: None,
            help: false,
        }
    }
}

impl RunOptions {
    /// The effective `-serial` backend.
    pub fn serial_spec(&self) -> &str {
        match &self.serial {
            Some(s) => s,
            None if self.nodefaults => "none",
            None => "stdio",
        }
    }
}

/// Parses `-smp`: `N`, `cpus=N`, optionally with `maxcpus`, `sockets`, `dies`, `clusters`, `cores`,
/// `threads` (without `cpus`, the count is their product, as in QEMU).
pub fn parse_smp(spec: &str) -> Result<u32, String> {
    let bad = || format!("invalid -smp value '{spec}'");
    let num = |v: &str| -> Result<u32, String> {
        v.parse::<u32>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("invalid -smp value '{spec}': '{v}' is not a positive number"))
    };
    let mut cpus = None;
    let mut product: Option<u32> = None;
    let mut maxcpus = None;
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            None if i == 0 => cpus = Some(num(item)?),
            None => return Err(bad()),
            Some(("cpus", v)) => cpus = Some(num(v)?),
            Some(("maxcpus", v)) => maxcpus = Some(num(v)?),
            Some(("sockets" | "dies" | "clusters" | "cores" | "threads", v)) => {
                let n = num(v)?;
                product = Some(product.unwrap_or(1).checked_mul(n).ok_or_else(bad)?);
            }
            Some((k, _)) => {
                return Err(format!(
                    "invalid -smp value '{spec}': unknown property '{k}'"
                ))
            }
        }
    }
    let n = cpus.or(product).ok_or_else(bad)?;
    if let Some(max) = maxcpus.filter(|&m| m < n) {
        // QEMU's wording.
        return Err(format!(
            "Invalid CPU topology: maxcpus must be equal to or greater than smp: {n} > {max}"
        ));
    }
    if n > vmm::machine::MAX_VCPUS {
        return Err(format!(
            "-smp {n} is more than the {} vCPUs enlighten supports",
            vmm::machine::MAX_VCPUS
        ));
    }
    Ok(n)
}

/// Options that take a value, by their single-dash name.
const WITH_VALUE: &[&str] = &[
    "kernel", "append", "initrd", "smp", "m", "cpu", "serial", "device", "display", "machine", "M",
    "global", "action", "incoming",
];

/// The options of the QMP integration (`docs/qmp.md`) that take a value.
const QMP_WITH_VALUE: &[&str] = &["qmp", "chardev", "mon", "name"];

/// Handles the QMP-related options; returns whether `name` was one of them.
fn parse_qmp_option(name: &str, v: &str, o: &mut RunOptions) -> Result<bool, String> {
    match name {
        "qmp" => o.qmp.push(v.to_string()),
        "chardev" => o.chardevs.push(v.to_string()),
        "mon" => o.mons.push(v.to_string()),
        "S" => o.prelaunch = true,
        "name" => o.name = Some(parse_name(v)?),
        _ => return Ok(false),
    }
    Ok(true)
}

/// `-name NAME` or `-name guest=NAME[,process=P][,debug-threads=on|off]` (QEMU's syntax).
pub fn parse_name(spec: &str) -> Result<String, String> {
    let mut name = None;
    for (i, item) in spec.split(',').enumerate() {
        match item.split_once('=') {
            None if i == 0 => name = Some(item.to_string()),
            Some(("guest", v)) => name = Some(v.to_string()),
            Some(("process" | "debug-threads", _)) => {}
            _ => return Err(format!("-name {spec}: Invalid parameter '{item}'")),
        }
    }
    name.ok_or_else(|| format!("-name {spec}: no name given"))
}

impl RunOptions {
    /// The QMP sockets of `-qmp` and `-mon` (QEMU's error texts, prefixed with the option).
    pub fn qmp_endpoints(&self) -> Result<Vec<qmp::QmpEndpoint>, String> {
        let mut out = Vec::new();
        for spec in &self.qmp {
            out.push(qmp::QmpEndpoint::parse_qmp(spec).map_err(|e| format!("-qmp {spec}: {e}"))?);
        }
        for spec in &self.chardevs {
            qmp::parse_chardev(spec).map_err(|e| format!("-chardev {spec}: {e}"))?;
        }
        for spec in &self.mons {
            out.push(
                qmp::endpoint_for_monitor(spec, &self.chardevs)
                    .map_err(|e| format!("-mon {spec}: {e}"))?,
            );
        }
        Ok(out)
    }
}

/// Parses the run options.
pub fn parse_args(args: &[String]) -> Result<RunOptions, String> {
    let mut o = RunOptions::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(name) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|n| !n.is_empty())
        else {
            return Err(format!(
                "unexpected argument '{arg}' (options start with '-')"
            ));
        };
        let value = if WITH_VALUE.contains(&name) || QMP_WITH_VALUE.contains(&name) {
            Some(
                it.next()
                    .ok_or_else(|| format!("option '-{name}' needs a value"))?
                    .as_str(),
            )
        } else {
            None
        };
        let v = value.unwrap_or("");
        if parse_qmp_option(name, v, &mut o)? {
            continue;
        }
        match name {
            "kernel" => o.kernel = Some(v.to_string()),
            "append" => o.append = v.to_string(),
            "initrd" => o.initrd = Some(v.to_string()),
            "smp" => o.smp = parse_smp(v)?,
            "m" => o.ram_size = vmm::parse_mem_size(v).map_err(|e| e.to_string())?,
            "cpu" => o.cpu = v.to_string(),
            "serial" => o.serial = Some(v.to_string()),
            "device" => {
                let (dev, props) = v.split_once(',').unwrap_or((v, ""));
                match dev {
                    "isa-debug-exit" => o.debug_exit = Some(parse_debug_exit(props)?),
                    "hyperv-testdev" => o.hyperv_testdev = true,
                    "pc-testdev" | "pci-testdev" => {}
                    _ => return Err(format!("unsupported device '{dev}'")),
                }
            }
            "display" => {
                if v != "none" {
                    return Err(format!("unsupported -display '{v}' (only 'none')"));
                }
            }
            "machine" | "M" => {
                let accel = v
                    .split(',')
                    .find_map(|p| p.strip_prefix("accel="))
                    .unwrap_or("kvm");
                if !accel.split(':').any(|a| a == "kvm") {
                    return Err(format!(
                        "unsupported accelerator '{accel}' (enlighten always uses KVM)"
                    ));
                }
            }
            "global" => {}
            "nodefaults" => o.nodefaults = true,
            "enable-kvm" => {}
            "no-reboot" => o.no_reboot = true,
            "help" | "h" => o.help = true,
            "action" => parse_action(v, &mut o)?,
            "incoming" => {
                crate::migrate::parse_uri(v, true).map_err(|e| format!("-incoming {v}: {e}"))?;
                o.incoming = Some(v.to_string());
            }
            "qmp" | "S" | "monitor" => {
                return Err(format!("option '{arg}' is not supported yet"));
            }
            _ => return Err(format!("unsupported option '{arg}'")),
        }
    }
    o.qmp_endpoints()?;
    Ok(o)
}

/// Parses `-action KEY=VALUE[,...]` (QEMU): `panic=` is applied; QEMU's other keys (`reboot`, `shutdown`,
/// `watchdog`) are accepted with their QEMU values and have their default meaning here.
fn parse_action(spec: &str, o: &mut RunOptions) -> Result<(), String> {
    for item in spec.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("invalid -action '{spec}': expected KEY=VALUE"))?;
        match k {
            "panic" => o.panic_action = vmm::lifecycle::PanicAction::parse(v)?,
            // QEMU: reboot=shutdown is --no-reboot (a reset ends the VM with a SHUTDOWN event).
            "reboot" => match v {
                "reset" => {}
                "shutdown" => o.no_reboot = true,
                _ => return Err(format!("Parameter 'reboot' does not accept value '{v}'")),
            },
            "shutdown" => {
                match v {
                    "poweroff" => {}
                    "pause" => return Err(
                        "-action shutdown=pause is not supported (the VM always ends on shutdown)"
                            .to_string(),
                    ),
                    _ => return Err(format!("Parameter 'shutdown' does not accept value '{v}'")),
                }
            }
            // There is no watchdog device: QEMU's values are accepted and never used.
            "watchdog" => match v {
                "reset" | "shutdown" | "poweroff" | "pause" | "debug" | "none" | "inject-nmi" => {}
                _ => return Err(format!("Parameter 'watchdog' does not accept value '{v}'")),
            },
            _ => return Err(format!("invalid -action '{spec}': unknown action '{k}'")),
        }
    }
    Ok(())
}

fn host_cpuid_table(cpu: &str) -> Result<Vec<hyperv::cpuid::CpuidEntry>, String> {
    let cfg = CpuConfig::parse(cpu).map_err(|e| e.to_string())?;
    let kvm = vmm::host::open_kvm().map_err(|e| e.to_string())?;
    let entries = vmm::host::supported_cpuid(&kvm).map_err(|e| e.to_string())?;
    let host = HostCpuid {
        entries,
        info: HostInfo {
            smt_active: vmm::host::smt_active().unwrap_or(true),
            tsc_khz: None,
        },
        backend: hyperv::config::Backend::Userspace,
    };
    let report = hyperv::cpuid::build_report(&cfg, &host).map_err(|e| e.to_string())?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    Ok(report.entries)
}

fn boot(o: &RunOptions) -> Result<Outcome, String> {
    let (image, path) = match &o.kernel {
        Some(path) => (
            std::fs::read(path).map_err(|e| format!("could not read kernel '{path}': {e}"))?,
            path.clone(),
        ),
        None => (enlighten_guests::demo().to_vec(), "demo".to_string()),
    };
    let modules: Vec<Module> = match &o.initrd {
        Some(arg) => Module::load_initrd_arg(arg).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let cpuid = host_cpuid_table(&o.cpu)?;
    let serial = SerialSink::from_spec(o.serial_spec())?;
    let cpus = u16::try_from(o.smp).map_err(|_| format!("invalid vCPU count {}", o.smp))?;
    let mut bus = standard_bus(serial, o.debug_exit, o.ram_size, cpus)?;
    // -device hyperv-testdev: the real device replaces the placeholder and is connected to the engine below.
    let testdev = if o.hyperv_testdev {
        let (dev, link) = vmm::devices::HypervTestDev::new();
        bus.replace(vmm::devices::HYPERV_TESTDEV_PORT, Box::new(dev))?;
        Some(link)
    } else {
        None
    };
    let hv_setup = vmm::hv::hyperv_enabled(&cpuid).then(|| vmm::hv::HvSetup {
        cpuid: cpuid.clone(),
        enforce_cpuid: CpuConfig::parse(&o.cpu).is_ok_and(|c| c.enforce_cpuid),
        apic_frequency_hz: VmConfig::default().apic_bus_hz,
        panic_action: o.panic_action,
    });
    let cfg = VmConfig {
        ram_size: o.ram_size,
        vcpus: o.smp,
        no_reboot: o.no_reboot,
        cpuid: Some(cpuid.clone()),
        ..VmConfig::default()
    };
    let loader = Arc::new(KernelLoader::new(image, path, o.append.clone(), modules));
    let devices = Arc::new(BusDevices::new(bus));
    let (machine, fds) = Machine::new(cfg, loader, devices).map_err(|e| e.to_string())?;
    // The Hyper-V engine, only when the guest CPUID identifies Hyper-V (vmm::hv).
    let hv = match hv_setup {
        Some(setup) => Some(vmm::hv::HvGlue::install(&machine, setup).map_err(|e| e.to_string())?),
        None => None,
    };
    if let (Some(link), Some(hv)) = (&testdev, &hv) {
        link.attach(hv.engine());
    }
    let qmp = crate::qmp_glue::start(o, &machine, &cpuid, hv.as_ref())?;
    // tsc-frequency= check, migration blockers, QMP migrate, -incoming (docs/migration.md).
    crate::migrate::prepare(o, &machine, &cpuid, hv.as_ref())?;
    let outcome = machine.run(fds);
    if let Some(qmp) = qmp {
        qmp.shutdown();
    }
    if let Some(hv) = hv {
        hv.shutdown();
    }
    Ok(outcome)
}

/// Runs a guest; the arguments follow `run` (or the program name).
pub fn main(args: Vec<String>) -> ExitCode {
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if opts.help {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let outcome = boot(&opts);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match outcome {
        Ok(Outcome::Exit(status)) => ExitCode::from((status & 0xFF) as u8),
        Ok(Outcome::PowerOff | Outcome::Stopped | Outcome::Cancelled) => ExitCode::SUCCESS,
        // A VM that failed at run time exits with 2: an even status can never be mistaken for an
        // isa-debug-exit status ((value << 1) | 1), and harnesses built around QEMU treat 1 as success.
        Ok(Outcome::Error(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(RUNTIME_ERROR_STATUS)
        }
        // Configuration and start-up errors exit with 1, as QEMU's do.
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_qemu_harness_command_line() {
        let o = parse_args(&v(&[
            "--no-reboot",
            "-nodefaults",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x4",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-machine",
            "accel=kvm",
            "-kernel",
            "k.elf",
            "-smp",
            "2",
            "-cpu",
            "host,hv-vpindex",
            "-device",
            "hyperv-testdev",
            "-append",
            "a b",
            "-initrd",
            "env.txt",
            "-global",
            "kvm-pit.lost_tick_policy=discard",
            "-device",
            "pc-testdev",
            "-enable-kvm",
        ]))
        .unwrap();
        assert_eq!(o.kernel.as_deref(), Some("k.elf"));
        assert_eq!(o.smp, 2);
        assert!(o.no_reboot && o.nodefaults && o.hyperv_testdev);
        assert_eq!(o.cpu, "host,hv-vpindex");
        assert_eq!(o.append, "a b");
        assert_eq!(o.initrd.as_deref(), Some("env.txt"));
        let d = o.debug_exit.unwrap();
        assert_eq!((d.iobase, d.iosize), (0xf4, 4));
        assert_eq!(o.serial_spec(), "stdio");
    }

    #[test]
    fn option_spellings_and_errors() {
        let cases: &[(&[&str], Result<(), &str>)] = &[
            (&["--kernel", "k"], Ok(())),
            (&["-no-reboot"], Ok(())),
            (&["--nodefaults"], Ok(())),
            (&["-m", "2G"], Ok(())),
            (&["-m", "size=256M"], Ok(())),
            (&["-smp", "cpus=4"], Ok(())),
            (&["-M", "pc,accel=kvm"], Ok(())),
            (&["-machine", "q35"], Ok(())),
            (
                &["-machine", "accel=tcg"],
                Err("unsupported accelerator 'tcg'"),
            ),
            (&["-display", "gtk"], Err("unsupported -display 'gtk'")),
            (
                &["-device", "virtio-net"],
                Err("unsupported device 'virtio-net'"),
            ),
            (&["-vga", "std"], Err("unsupported option '-vga'")),
            (&["-qmp", "unix:/tmp/x,server=on,wait=off"], Ok(())),
            (&["-qmp", "unix:/tmp/x,server,nowait"], Ok(())),
            (&["-qmp", "tcp:127.0.0.1:4444,server=on,wait=off"], Ok(())),
            (
                &[
                    "-chardev",
                    "socket,id=m,path=/tmp/x,server=on,wait=off",
                    "-mon",
                    "chardev=m,mode=control",
                ],
                Ok(()),
            ),
            (
                &["-mon", "chardev=nope,mode=control"],
                Err("-mon chardev=nope,mode=control: "),
            ),
            (
                &["-qmp", "unix:/tmp/x,server=maybe"],
                Err("-qmp unix:/tmp/x,server=maybe: "),
            ),
            (&["-qmp", "stdio"], Err("-qmp stdio: ")),
            (&["-S"], Ok(())),
            (&["-action", "reboot=shutdown,panic=pause"], Ok(())),
            (&["-action", "shutdown=poweroff,watchdog=none"], Ok(())),
            (
                &["-action", "shutdown=pause"],
                Err("-action shutdown=pause is not supported"),
            ),
            (
                &["-action", "reboot=maybe"],
                Err("Parameter 'reboot' does not accept value 'maybe'"),
            ),
            (&["-name", "win"], Ok(())),
            (&["-name", "guest=win,debug-threads=on"], Ok(())),
            (
                &["-name", "a,bogus=1"],
                Err("-name a,bogus=1: Invalid parameter"),
            ),
            (&["-kernel"], Err("option '-kernel' needs a value")),
            (&["kernel"], Err("unexpected argument 'kernel'")),
            (&["-m", "lots"], Err("invalid RAM size 'lots'")),
            (&["-smp", "0"], Err("invalid -smp value '0'")),
        ];
        for (args, expected) in cases {
            let got = parse_args(&v(args));
            match expected {
                Ok(()) => assert!(got.is_ok(), "{args:?}: {got:?}"),
                Err(msg) => {
                    let e = got.expect_err("should fail");
                    assert!(e.starts_with(msg), "{args:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn qmp_options() {
        let o = parse_args(&v(&[
            "-S",
            "-name",
            "guest=vm1,debug-threads=on",
            "-qmp",
            "unix:/tmp/a,server,nowait",
            "-chardev",
            "socket,id=c,path=/tmp/b,server=on,wait=off",
            "-mon",
            "chardev=c,mode=control",
        ]))
        .unwrap();
        assert!(o.prelaunch);
        assert!(!o.no_reboot);
        assert!(
            parse_args(&v(&["-action", "reboot=shutdown"]))
                .unwrap()
                .no_reboot
        );
        assert_eq!(o.name.as_deref(), Some("vm1"));
        let eps = o.qmp_endpoints().unwrap();
        assert_eq!(eps.len(), 2);
        assert!(eps.iter().all(|e| !e.wait));
        assert_eq!(parse_name("plain").unwrap(), "plain");
    }

    #[test]
    fn smp_values() {
        let cases: &[(&str, Option<u32>)] = &[
            ("1", Some(1)),
            ("4", Some(4)),
            ("cpus=2", Some(2)),
            ("2,maxcpus=4", Some(2)),
            ("sockets=2,cores=2", Some(4)),
            ("sockets=2,cores=2,threads=2", Some(8)),
            ("0", None),
            ("x", None),
            ("cpus=", None),
            ("4,foo=1", None),
            ("256", Some(256)),
            ("1024", Some(1024)),
            ("1025", None),
            ("4,maxcpus=2", None),
            ("", None),
        ];
        for (spec, expected) in cases {
            assert_eq!(parse_smp(spec).ok(), *expected, "{spec}");
        }
    }

    #[test]
    fn serial_default_follows_nodefaults() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "stdio"),
            (&["-nodefaults"], "none"),
            (&["-nodefaults", "-serial", "stdio"], "stdio"),
            (&["-serial", "file:/tmp/x"], "file:/tmp/x"),
        ];
        for (args, spec) in cases {
            assert_eq!(parse_args(&v(args)).unwrap().serial_spec(), *spec);
        }
        assert_eq!(parse_args(&v(&[])).unwrap().ram_size, 128 << 20);
    }
}

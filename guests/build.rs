//! Compiles the guest runtime (`rt/`) and every guest program (`tests/*.c` linked with the runtime,
//! `tests/*.S` standalone, `demo/demo.c`) with the system gcc into `$OUT_DIR`:
//!
//! - `<name>.elf64`: the 64-bit ELF as linked, entry = `entry64` (long-mode direct boot);
//! - `<name>.elf`: the Multiboot v1 image, the same code linked with entry = `entry32` and converted to ELF32
//!   with `objcopy -O elf32-i386`, as QEMU's `-kernel` requires.
//!
//! It also writes `$OUT_DIR/guests.rs` (the table of programs) that `lib.rs` includes.
//! The tools can be overridden with `GUEST_CC` and `GUEST_OBJCOPY`.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
    "-ffreestanding",
    "-fno-builtin",
    "-nostdlib",
    "-nostdinc",
    "-m64",
    "-march=x86-64",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    "-fno-delete-null-pointer-checks",
    "-fno-strict-aliasing",
    "-fcf-protection=none",
    "--param=min-pagesize=0",
];

fn die(msg: &str) -> ! {
    eprintln!("error: enlighten-guests: {msg}");
    println!("cargo:warning=enlighten-guests: {msg}");
    exit(1);
}

fn run(cmd: &mut Command, what: &str) {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => die(&format!(
            "{what} failed ({})\ncommand: {shown}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => die(&format!(
            "cannot run {what} ({e}); the guest programs need gcc and binutils \
             (Debian: apt-get install gcc binutils)\ncommand: {shown}"
        )),
    }
}

fn check_tool(tool: &str) {
    match Command::new(tool).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => die(&format!("`{tool} --version` failed: {}", String::from_utf8_lossy(&out.stderr))),
        Err(e) => die(&format!(
            "cannot run `{tool}` ({e}); the guest programs are built with the system gcc and objcopy \
             (Debian: apt-get install gcc binutils; or set GUEST_CC / GUEST_OBJCOPY)"
        )),
    }
}

/// Sources with extension `ext` in `dir`, sorted.
fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| die("OUT_DIR is not set")));
    let cc = env::var("GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let objcopy = env::var("GUEST_OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    println!("cargo:rerun-if-env-changed=GUEST_CC");
    println!("cargo:rerun-if-env-changed=GUEST_OBJCOPY");

    let rt = manifest.join("rt");
    let tests = manifest.join("tests");
    let demo = manifest.join("demo");
    for dir in [&rt, &tests, &demo] {
        println!("cargo:rerun-if-changed={}", dir.display());
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                println!("cargo:rerun-if-changed={}", e.path().display());
            }
        }
    }

    check_tool(&cc);
    check_tool(&objcopy);

    let objdir = out.join("obj");
    if let Err(e) = fs::create_dir_all(&objdir) {
        die(&format!("cannot create {}: {e}", objdir.display()));
    }

    let compile = |src: &Path, obj: &Path| {
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&rt)
            .arg("-c")
            .arg(src)
            .arg("-o")
            .arg(obj);
        run(&mut cmd, &format!("compiling {}", src.display()));
    };

    let rt_objs = [
        (rt.join("entry.S"), objdir.join("rt-entry.o")),
        (rt.join("rt.c"), objdir.join("rt-rt.o")),
    ];
    for (src, obj) in &rt_objs {
        compile(src, obj);
    }

    // (name, source); `.c` programs are linked with the runtime, `.S` programs stand alone.
    let mut programs: Vec<(String, PathBuf)> = sources(&tests, "c")
        .into_iter()
        .chain(sources(&tests, "S"))
        .filter_map(|p| Some((p.file_stem()?.to_str()?.to_owned(), p)))
        .collect();
    let demo_src = demo.join("demo.c");
    if demo_src.exists() {
        programs.push(("demo".into(), demo_src.clone()));
    }

    let link = |objs: &[&Path], entry: &str, output: &Path| {
        let mut cmd = Command::new(&cc);
        cmd.args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-Wl,--build-id=none",
            "-Wl,-z,max-page-size=0x1000",
            "-Wl,--no-warn-rwx-segments",
        ])
        .arg(format!("-Wl,-T,{}", rt.join("link.ld").display()))
        .arg(format!("-Wl,-e,{entry}"))
        .args(objs)
        .arg("-lgcc")
        .arg("-o")
        .arg(output);
        run(&mut cmd, &format!("linking {}", output.display()));
    };

    let mut table = String::new();
    for (name, src) in &programs {
        let obj = objdir.join(format!("{name}.o"));
        compile(src, &obj);
        let standalone = src.extension().is_some_and(|x| x == "S");
        let objs: Vec<&Path> = if standalone {
            vec![obj.as_path()]
        } else {
            rt_objs
                .iter()
                .map(|(_, o)| o.as_path())
                .chain([obj.as_path()])
                .collect()
        };
        let elf64 = out.join(format!("{name}.elf64"));
        let mb64 = objdir.join(format!("{name}.mb64"));
        let mb32 = out.join(format!("{name}.elf"));
        link(&objs, "entry64", &elf64);
        link(&objs, "entry32", &mb64);
        run(
            Command::new(&objcopy)
                .args(["-O", "elf32-i386"])
                .arg(&mb64)
                .arg(&mb32),
            &format!("objcopy of {}", mb64.display()),
        );
        let _ = writeln!(
            table,
            "    ({name:?}, {:?}, {:?}),",
            mb32.display().to_string(),
            elf64.display().to_string()
        );
    }

    let mut gen = String::new();
    gen.push_str("/// (name, Multiboot ELF32 path, ELF64 path) of every guest program.\n");
    gen.push_str("const PROGRAMS: &[(&str, &str, &str)] = &[\n");
    gen.push_str(&table);
    gen.push_str("];\n");
    let names: Vec<String> = programs.iter().map(|(n, _)| format!("{n:?}")).collect();
    let _ = writeln!(
        gen,
        "/// Names of every guest program (the test programs and \"demo\")."
    );
    let _ = writeln!(gen, "pub const NAMES: &[&str] = &[{}];", names.join(", "));
    if demo_src.exists() {
        let _ = writeln!(
            gen,
            "const DEMO_ELF32: &[u8] = include_bytes!({:?});",
            out.join("demo.elf").display().to_string()
        );
        let _ = writeln!(
            gen,
            "const DEMO_ELF64: &[u8] = include_bytes!({:?});",
            out.join("demo.elf64").display().to_string()
        );
    } else {
        gen.push_str("const DEMO_ELF32: &[u8] = &[];\nconst DEMO_ELF64: &[u8] = &[];\n");
    }
    if let Err(e) = fs::write(out.join("guests.rs"), gen) {
        die(&format!("cannot write guests.rs: {e}"));
    }
}

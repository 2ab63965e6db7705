#!/usr/bin/env bash
# Snapshot/restore benchmark against QEMU 7.2 (issue 8), in one run. Prints markdown rows (docs/migration.md).
#
# A 1 GiB guest (guests/tests/migr_touch.c: writes a distinct non-zero value into every page from 16 MiB up,
# then prints a "t N" line every few ms forever) is booted, saved once it has touched its pages, and restored
# in a new process, under:
#   - enlighten, Firecracker-style snapshot: QMP x-snapshot-save (state file + sparse raw memory file), restored
#     with `enlighten restore STATE`, which maps the memory file MAP_PRIVATE;
#   - enlighten, checksummed stream: QMP migrate file:PATH (max-bandwidth unlimited, as for QEMU), restored
#     with -incoming file:PATH;
#   - QEMU 7.2 (-accel kvm): QMP migrate exec:cat>PATH (max-bandwidth unlimited; QEMU 7.2 has no file: URI),
#     restored with -incoming "exec:cat PATH".
# Save time: from the save command to query-migrate "completed" (polled every 2 ms). Restore latency: from
# starting the restoring process to the first byte the restored guest writes to its serial file. Throughput:
# guest RAM size / time. Each figure is the median of REPS runs (default 3); files are read once before each
# restore so that every restore starts from the page cache.
#
# Usage: bench/migration.sh            (builds enlighten --release into $CARGO_TARGET_DIR or target/)
# Environment: ENLIGHTEN=path/to/enlighten, KERNEL=path/to/migr_touch.elf, QEMU=qemu-system-x86_64,
#              RAM_MB=1024, REPS=3, WORK=scratch directory (default: a new one under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=${CARGO_TARGET_DIR:-target}
if [[ -z "${ENLIGHTEN:-}" ]]; then
    cargo build --release -q -p enlighten
    ENLIGHTEN=$TARGET/release/enlighten
fi
if [[ -z "${KERNEL:-}" ]]; then
    KERNEL=$(ls -t "$TARGET"/release/build/enlighten-guests-*/out/migr_touch.elf 2>/dev/null | head -1 || true)
    [[ -n "$KERNEL" ]] || KERNEL=$(ls -t "$TARGET"/debug/build/enlighten-guests-*/out/migr_touch.elf | head -1)
fi
QEMU=${QEMU:-qemu-system-x86_64}
RAM_MB=${RAM_MB:-1024}
REPS=${REPS:-3}
WORK=${WORK:-$(mktemp -d /tmp/enlighten-migbench.XXXXXX)}
mkdir -p "$WORK"
export ENLIGHTEN KERNEL QEMU RAM_MB REPS WORK

python3 - <<'PY'
import json, os, socket, statistics, subprocess, sys, time

ENL, KERNEL, QEMU = os.environ["ENLIGHTEN"], os.environ["KERNEL"], os.environ["QEMU"]
RAM_MB, REPS, WORK = int(os.environ["RAM_MB"]), int(os.environ["REPS"]), os.environ["WORK"]
RAM = RAM_MB << 20
COMMON = ["-nodefaults", "-display", "none", "-machine", "accel=kvm",
          "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4",
          "-kernel", KERNEL, "-m", f"{RAM_MB}M", "-smp", "1", "-append", "ticks=0 spin=2000"]


class Qmp:
    def __init__(self, path):
        deadline = time.monotonic() + 60
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        self.f.write(json.dumps({"execute": name, "arguments": args or {}}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.001)


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def stop(p):
    p.kill()
    p.wait()


def start_source(vmm, tag):
    log, sock = f"{WORK}/{tag}-src.log", f"{WORK}/{tag}.qmp"
    for f in (log, sock):
        if os.path.exists(f):
            os.remove(f)
    binary = ENL if vmm == "enlighten" else QEMU
    p = subprocess.Popen([binary] + COMMON + ["-serial", f"file:{log}",
                                              "-qmp", f"unix:{sock},server=on,wait=off"],
                         stdout=subprocess.DEVNULL, stderr=open(f"{WORK}/{tag}-src.err", "w"))
    try:
        wait_for(lambda: b"touched " in read(log) or p.poll() is not None, 600, "the guest's pages")
        if p.poll() is not None:
            raise RuntimeError(f"{vmm} source exited: {read(f'{WORK}/{tag}-src.err').decode()}")
        return p, Qmp(sock)
    except Exception:
        stop(p)
        raise


def save(vmm, kind, q, path):
    for f in (path, path + ".mem"):  # no truncation of an old file inside the measurement
        if os.path.exists(f):
            os.remove(f)
    if kind == "snapshot":
        q.cmd("x-snapshot-save", {"state": path, "memory": path + ".mem"})
    else:
        # Both VMMs default to QEMU's 128 MiB/s migration rate limit; lift it for both.
        q.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        if vmm == "qemu":
            q.cmd("migrate", {"uri": f"exec:cat > {path}"})
        else:
            q.cmd("migrate", {"uri": f"file:{path}"})
    t0 = time.monotonic()
    while True:
        r = q.cmd("query-migrate")
        if r.get("status") == "completed":
            return time.monotonic() - t0
        if r.get("status") == "failed":
            raise RuntimeError(f"{vmm} {kind} save failed: {r}")
        time.sleep(0.002)


def restore(vmm, kind, path, tag):
    log = f"{WORK}/{tag}-dst.log"
    if os.path.exists(log):
        os.remove(log)
    for f in (path, path + ".mem"):  # the page cache, as after a save
        if os.path.exists(f):
            subprocess.run(["cat", f], stdout=subprocess.DEVNULL, check=True)
    if vmm == "qemu":
        args = [QEMU] + COMMON + ["-incoming", f"exec:cat {path}"]
    elif kind == "snapshot":
        args = [ENL, "restore", path] + COMMON
    else:
        args = [ENL] + COMMON + ["-incoming", f"file:{path}"]
    args += ["-serial", f"file:{log}"]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(f"{WORK}/{tag}-dst.err", "w"))
    try:
        wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0 or p.poll() is not None,
                 600, "the restored guest")
        latency = time.monotonic() - t0
        if p.poll() is not None:
            raise RuntimeError(f"{vmm} restore exited: {read(f'{WORK}/{tag}-dst.err').decode()}")
        return latency
    finally:
        stop(p)


def on_disk(path):
    total = 0
    for f in (path, path + ".mem"):
        if os.path.exists(f):
            total += os.stat(f).st_blocks * 512
    return total


CASES = [
    ("enlighten", "snapshot", "enlighten snapshot (state file + MAP_PRIVATE memory file)"),
    ("enlighten", "stream", "enlighten `migrate` file: / `-incoming file:` (checksummed stream)"),
    ("qemu", "stream", "QEMU 7.2 `migrate` exec:cat>FILE / `-incoming exec:cat FILE`"),
]
results = {}
for rep in range(REPS):
    # A different order in each run, so that no case always follows the same one (page-cache and host
    # memory state left by the previous case).
    for vmm, kind, _ in CASES[rep % len(CASES):] + CASES[:rep % len(CASES)]:
        tag = f"{vmm}-{kind}"
        path = f"{WORK}/{tag}.snap"
        p, q = start_source(vmm, tag)
        try:
            t_save = save(vmm, kind, q, path)
        finally:
            stop(p)
        time.sleep(0.2)  # exec:cat may still be writing its last pipe buffer
        t_restore = restore(vmm, kind, path, tag)
        r = results.setdefault((vmm, kind), {"save": [], "restore": [], "disk": 0})
        r["save"].append(t_save)
        r["restore"].append(t_restore)
        r["disk"] = on_disk(path)
        print(f"run {rep + 1}/{REPS}: {tag}: save {t_save * 1000:.0f} ms, restore latency "
              f"{t_restore * 1000:.0f} ms", file=sys.stderr)

med = {k: (statistics.median(v["save"]), statistics.median(v["restore"]), v["disk"]) for k, v in results.items()}
mib = RAM / (1 << 20)
print(f"| {RAM_MB} MiB guest, {REPS} runs (median) | save (ms) | save throughput (MiB/s) | restore latency (ms) "
      f"| restore throughput (MiB/s) | files on disk (MiB) |")
print("|---|---|---|---|---|---|")
for vmm, kind, name in CASES:
    s, r, d = med[(vmm, kind)]
    print(f"| {name} | {s * 1000:.0f} | {mib / s:.0f} | {r * 1000:.0f} | {mib / r:.0f} | {d / (1 << 20):.0f} |")
qs, qr, _ = med[("qemu", "stream")]
for vmm, kind, name in CASES[:2]:
    s, r, _ = med[(vmm, kind)]
    print(f"| ratio {vmm} {kind} / QEMU | {s / qs:.2f}x | {qs / s:.2f}x | {r / qr:.2f}x | {qr / r:.2f}x | |")
PY

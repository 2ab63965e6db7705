#!/usr/bin/env bash
# Startup benchmark (issue 3, item 8): time from process start to the guest's first instruction and to the
# debug-exit of an empty Multiboot kernel, for enlighten (release build) and for qemu-system-x86_64 with KVM,
# on the same kernel, in one run. Prints the medians and the ratio enlighten / QEMU.
#
# The kernel is guests/tests/first_insn.S: its first instruction writes 'X' to COM1, then it writes 0 to
# isa-debug-exit. "first" = when that byte reaches the VMM's stdout, "exit" = when the process has exited.
#
# Usage: bench/startup.sh [repetitions]      (default 10; needs /dev/kvm, python3, qemu-system-x86)
set -euo pipefail

REPS="${1:-10}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
QEMU="${QEMU:-qemu-system-x86_64}"

command -v "$QEMU" >/dev/null || { echo "error: $QEMU not found (Debian: apt-get install qemu-system-x86)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "error: python3 not found" >&2; exit 1; }

echo "building enlighten (release)..." >&2
(cd "$ROOT" && cargo build --release -q -p enlighten -p enlighten-guests)
ENLIGHTEN="$TARGET/release/enlighten"
KERNEL="$(ls -t "$TARGET"/release/build/enlighten-guests-*/out/first_insn.elf 2>/dev/null | head -n1)"
[ -n "$KERNEL" ] || { echo "error: first_insn.elf not found under $TARGET/release/build" >&2; exit 1; }

COMMON=(--no-reboot -nodefaults -device isa-debug-exit,iobase=0xf4,iosize=0x4 -display none -serial stdio
        -machine accel=kvm -kernel "$KERNEL" -smp 1)

echo "kernel: $KERNEL" >&2
echo "repetitions: $REPS" >&2
RESULTS="$(python3 "$ROOT/bench/startup_measure.py" "$REPS" \
    enlighten "$ENLIGHTEN" "${COMMON[@]}" :: \
    qemu "$QEMU" -enable-kvm "${COMMON[@]}")"

python3 - "$RESULTS" <<'PY'
import json, sys
rows = {r["name"]: r for r in map(json.loads, sys.argv[1].splitlines())}
e, q = rows["enlighten"], rows["qemu"]
def fmt(v):
    return "n/a" if v is None else f"{v:9.2f}"
def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{100.0 * a / b:6.2f} %"
print(f"startup, median of {e['runs']} runs (ms)   enlighten       QEMU   enlighten/QEMU")
print(f"  process start -> first guest insn   {fmt(e['first_ms'])}  {fmt(q['first_ms'])}   {ratio(e['first_ms'], q['first_ms'])}")
print(f"  process start -> debug-exit         {fmt(e['exit_ms'])}  {fmt(q['exit_ms'])}   {ratio(e['exit_ms'], q['exit_ms'])}")
print(f"  exit statuses: enlighten {e['statuses']}, QEMU {q['statuses']} (1 = debug-exit code 0)")
if e["first_seen"] < e["runs"] or q["first_seen"] < q["runs"]:
    print(f"  warning: first byte seen in {e['first_seen']}/{e['runs']} enlighten and {q['first_seen']}/{q['runs']} QEMU runs")
PY

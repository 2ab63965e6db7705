#!/usr/bin/env python3
"""Helper of bench/startup.sh: start a VMM command N times and time, from just before the process is
created, (a) the first byte the guest writes to the serial port (its first instruction writes it) and
(b) the process exit (the guest's debug-exit). Prints one JSON object per command on stdout."""
import json
import os
import statistics
import subprocess
import sys
import time


def measure(cmd, reps):
    first, total, statuses = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        t_first = None
        while True:
            b = os.read(p.stdout.fileno(), 1)
            if not b:
                break
            if t_first is None and b == b"X":
                t_first = time.perf_counter()
        status = p.wait()
        t_end = time.perf_counter()
        statuses.append(status)
        if t_first is not None:
            first.append(t_first - t0)
        total.append(t_end - t0)
    return {
        "first_ms": statistics.median(first) * 1000 if first else None,
        "exit_ms": statistics.median(total) * 1000,
        "runs": reps,
        "first_seen": len(first),
        "statuses": sorted(set(statuses)),
    }


def main():
    reps = int(sys.argv[1])
    # remaining arguments: name -- cmd... -- name -- cmd...
    args = sys.argv[2:]
    groups, cur = [], []
    for a in args:
        if a == "::":
            groups.append(cur)
            cur = []
        else:
            cur.append(a)
    if cur:
        groups.append(cur)
    for g in groups:
        name, cmd = g[0], g[1:]
        r = measure(cmd, reps)
        r["name"] = name
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Picks a handful of seed files for a committed corpus from a (large) campaign corpus.

    fuzz/select_seeds.py BINARY CAMPAIGN_CORPUS_DIR OUT_DIR [N]

Runs libFuzzer's set-cover merge over the campaign corpus with a control file, which records the features of
every input, then greedily picks the N inputs (default 8) that add the most features not covered yet, and
copies them to OUT_DIR named by their SHA-1 (libFuzzer's convention). Used to refresh fuzz/corpus/<target>/.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    binary, corpus, out = sys.argv[1], sys.argv[2], sys.argv[3]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    files = sorted(os.path.join(corpus, f) for f in os.listdir(corpus))
    files = [f for f in files if os.path.isfile(f)]
    with tempfile.TemporaryDirectory() as tmp:
        control = os.path.join(tmp, "control")
        # The control file format: line 0 = number of inputs, line 1 = number of inputs in the first corpus,
        # then the paths, then "STARTED i size" / "FT i f..." / "COV i pc..." records per input.
        with open(control, "w") as c:
            c.write(f"{len(files)}\n0\n")
            for f in files:
                c.write(f + "\n")
        merged = os.path.join(tmp, "merged")
        os.mkdir(merged)
        subprocess.run(
            [binary, "-set_cover_merge=1", f"-merge_control_file={control}", "-rss_limit_mb=2048", merged, corpus],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        features = {}
        with open(control) as c:
            lines = c.read().splitlines()
        for line in lines[2 + len(files):]:
            parts = line.split()
            if parts and parts[0] == "FT" and len(parts) >= 2:
                features[int(parts[1])] = set(parts[2:])
    covered = set()
    chosen = []
    for _ in range(n):
        best, gain = None, 0
        for i, ft in features.items():
            g = len(ft - covered)
            if g > gain or (g == gain and best is not None and g > 0 and
                            os.path.getsize(files[i]) < os.path.getsize(files[best])):
                best, gain = i, g
        if best is None or gain == 0:
            break
        covered |= features.pop(best)
        chosen.append(files[best])
    os.makedirs(out, exist_ok=True)
    for f in chosen:
        data = open(f, "rb").read()
        shutil.copyfile(f, os.path.join(out, hashlib.sha1(data).hexdigest()))
    print(f"{len(chosen)} seeds covering {len(covered)} features -> {out}")


if __name__ == "__main__":
    main()

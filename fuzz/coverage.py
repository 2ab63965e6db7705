#!/usr/bin/env python3
"""Function-level edge coverage of the project's crates reached by a corpus, per crate and per source file.

    fuzz/coverage.py [-v] ASAN_BINARY CORPUS_DIR [CRATE_PATH_PREFIX ...]

Needs an AddressSanitizer build of the target (`cargo fuzz build -s address`): libFuzzer's -print_coverage
symbolizes through the sanitizer runtime. Runs the corpus once with -print_coverage=1 and sums the
"edges: covered/total" of every instrumented function whose source lies under one of the prefixes (default: the
crates/ directory next to this script). `Debug::fmt` implementations, which only assertion messages use, are
reported separately.

Caveat: libFuzzer reports coverage per *function*, attributed to the file of the function's entry. Generic engine
code (`Engine<P>` methods) is monomorphised in the fuzz crate and mostly inlined into the harness, so those edges
are counted under fuzz/src or not at all; the figures below cover the functions that stay out of line. Use the
libFuzzer `cov:` (edges of the whole binary) figure for trends, and the uncovered-function list (`-v`) for gaps.
"""

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

LINE = re.compile(r"^(UN)?COVERED_FUNC: hits: \d+ edges: (\d+)/(\d+) (.*) (\S+):\d+$")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    verbose = "-v" in sys.argv
    args = [a for a in sys.argv[1:] if a != "-v"]
    if len(args) < 2:
        sys.exit(__doc__)
    binary, corpus = args[0], args[1]
    here = os.path.dirname(os.path.abspath(__file__))
    prefixes = args[2:] or [os.path.join(os.path.dirname(here), "crates") + "/"]
    with tempfile.TemporaryDirectory() as tmp:
        # Run on a copy: libFuzzer writes new inputs into its first corpus directory.
        work = os.path.join(tmp, "corpus")
        shutil.copytree(corpus, work)
        out = subprocess.run(
            [binary, "-runs=0", "-print_coverage=1", "-rss_limit_mb=2048", work],
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    per_file = collections.defaultdict(lambda: [0, 0, 0, 0])
    fmt = [0, 0]
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        covered, total, func, path = int(m.group(2)), int(m.group(3)), m.group(4), m.group(5)
        if not any(path.startswith(p) for p in prefixes):
            continue
        if verbose and covered == 0:
            print(f"uncovered: {func} ({path})")
        if "as core::fmt::Debug>::fmt" in func:
            fmt[0] += covered
            fmt[1] += total
            continue
        per_file[path][0] += covered
        per_file[path][1] += total
        per_file[path][2] += 1 if covered else 0
        per_file[path][3] += 1
    per_crate = collections.defaultdict(lambda: [0, 0, 0, 0])
    for path, (c, t, fc, ft) in sorted(per_file.items()):
        crate = path.split("/crates/", 1)[-1].split("/", 1)[0]
        for i, v in enumerate((c, t, fc, ft)):
            per_crate[crate][i] += v
        print(f"functions {fc:4}/{ft:<4} edges {c:6}/{t:<6}  {path}")
    for crate, (c, t, fc, ft) in sorted(per_crate.items()):
        print(f"crate {crate}: {fc}/{ft} out-of-line functions reached, {c}/{t} of their edges "
              f"({100.0 * c / max(t, 1):.1f}%; the totals include sanitizer and panic paths)")
    print(f"Debug::fmt (assertion messages only): {fmt[0]}/{fmt[1]} edges")


if __name__ == "__main__":
    main()

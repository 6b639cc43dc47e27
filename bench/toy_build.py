"""Time a full toy-world build (forced, into a temp dir) phase by phase, with the machine's load beside it.

Usage: `PYTHONPATH=. python bench/toy_build.py [--quick] [--threads N]`
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from helpers.core.manifest import load
from helpers.toy import world as toy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (build_world's default: 1)")
    a = ap.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = toy.build_world(Path(tmp) / "world", quick=a.quick, force=True, threads=a.threads)
        total = time.perf_counter() - t
        m = load(out)
        print(toy.summary(out))
    print(f"\n{'phase':<16}{'seconds':>9}")
    for k, v in m["timings_s"].items():
        print(f"{k:<16}{v:>9.1f}")
    print(f"{'total (build)':<16}{total:>9.1f}   target: {'30' if a.quick else '360'} s")
    print(
        f"threads {m['metrics']['threads']}, load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()

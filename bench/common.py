"""Bench plumbing: time commands side by side (alternating rounds) and read a child's peak RSS.

Usage: `t, rss = timed([sys.executable, "-m", "helpers", "copy", ...])`
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

# Linux carries a process's peak RSS across fork+exec, so a child forked from this (large) bench
# process would report our peak as its own. A tiny launcher forks the command from a small process.
_LAUNCH = """
import os, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
import resource
open(sys.argv[1], "w").write(f"{rc} {wall} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}")
"""


def timed(cmd: list[str], cwd=None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one command; raises on failure."""
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".txt") as f:
        r = subprocess.run([sys.executable, "-S", "-c", _LAUNCH, f.name, *cmd], cwd=cwd, stderr=subprocess.PIPE)
        rc, wall, rss = f.read().split()
    if r.returncode or int(rc):
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.decode()[-2000:]}")
    return float(wall), int(rss)


def alternate(cases: dict[str, tuple[list[str], Path]], rounds: int, cwd=None) -> dict[str, dict]:
    """Run each case once per round, in turn; the first round is a warm-up and is dropped.

    A case is (command, output path removed before each run).
    """
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in cases}
    for r in range(rounds + 1):
        for name, (cmd, out) in cases.items():
            shutil.rmtree(out, ignore_errors=True)
            res = timed(cmd, cwd)
            if r:
                runs[name].append(res)
    return {
        k: {
            "median_s": statistics.median(t for t, _ in v),
            "times_s": [round(t, 3) for t, _ in v],
            "peak_rss": max(m for _, m in v),
        }
        for k, v in runs.items()
    }


def cp_cmd(src: Path, dst: Path) -> list[str]:
    """`cp -r` then fsync of the copied files, so it is as durable as our atomic writer."""
    return ["bash", "-c", f'cp -r "{src}" "{dst}" && sync "{dst}"/*']


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"

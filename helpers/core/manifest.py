"""Run manifests: what a step was given, what it wrote (with sha256), versions, timings, metrics.

Usage: `m = Manifest("03_expert_prune", params); m.input("scores", p); ...; m.save(run_dir)`
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from helpers.core.fsutil import dir_bytes, read_json, tree_sha256, write_json

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "trl",
    "bitsandbytes",
    "safetensors",
    "tokenizers",
    "datasets",
    "lighteval",
    "numpy",
)
FILENAME = "manifest.json"


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            out[p] = metadata.version(p)
    return out


def git_sha(cwd=None) -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        # results a run rewrites (eval_results/) do not make the code dirty
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)eval_results"],
            cwd=cwd or Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(path, hash: bool = True) -> dict:
    """{path, sha256, bytes} of a file or directory; a hub id (not on disk) is kept as a string."""
    p = Path(path)
    if not p.exists():
        return {"path": str(path), "sha256": None, "bytes": None, "note": "not on disk (hub id?)"}
    return {"path": str(p), "sha256": tree_sha256(p) if hash else None, "bytes": dir_bytes(p)}


class Manifest:
    """One step's record, saved as `<run_dir>/manifest.json`."""

    def __init__(self, step: str, params: dict | None = None):
        self.data = {
            "step": step,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "params": dict(params or {}),
            "inputs": {},
            "outputs": {},
            "versions": versions(),
            "git_sha": git_sha(),
            "timings_s": {},
            "metrics": {},
        }

    def input(self, name: str, path, hash: bool = True) -> Manifest:
        self.data["inputs"][name] = describe(path, hash)
        return self

    def inputs(self, paths: dict, hash: bool = True) -> Manifest:
        """Several inputs at once: {name: path}."""
        for name, path in paths.items():
            self.input(name, path, hash)
        return self

    def output(self, name: str, path, hash: bool = True) -> Manifest:
        self.data["outputs"][name] = describe(path, hash)
        return self

    def metric(self, name: str, value) -> Manifest:
        self.data["metrics"][name] = value
        return self

    def metrics(self, **kv) -> Manifest:
        self.data["metrics"].update(kv)
        return self

    @contextmanager
    def timer(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.data["timings_s"][name] = round(time.perf_counter() - t, 3)

    def save(self, run_dir) -> Path:
        return write_json(Path(run_dir) / FILENAME, self.data)


def load(path) -> dict:
    """A manifest dict from its file or its run directory."""
    p = Path(path)
    return read_json(p / FILENAME if p.is_dir() else p)


def output_path(manifest, name: str) -> Path:
    """Path of a named output of a manifest (dict, file or run dir); error names what exists."""
    m = manifest if isinstance(manifest, dict) else load(manifest)
    try:
        return Path(m["outputs"][name]["path"])
    except KeyError:
        raise KeyError(
            f"manifest of step {m.get('step')!r} has no output {name!r}; it has {sorted(m['outputs'])}"
        ) from None

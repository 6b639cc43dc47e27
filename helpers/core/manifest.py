"""Run manifests: what a step was given, what it wrote (with sha256), versions, timings, metrics.

Paths are recorded so a manifest means the same on any machine: a path under the repo root is
written relative to it ("runs/toy/04_layer_drop_mistral/A"), never as this machine's absolute path;
anything else (a hub id, a directory outside the repo) as given. Readers (`output_path`,
`input_path`, `load`) resolve a relative path against the repo root, so they work from any cwd.

Usage: `m = Manifest("03_expert_prune", params); m.input("scores", p); ...; m.save(run_dir)`
"""

from __future__ import annotations

import os
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


def repo_root() -> Path | None:
    """The checkout this code runs from (None when installed elsewhere: paths are then kept as given)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").exists() and (root / "helpers").is_dir() else None


ROOT = repo_root()


def _under_root(path: Path) -> str | None:
    """`path` (absolute) relative to the repo root as a posix string, or None when outside it."""
    if ROOT is None:
        return None
    for p in {Path(os.path.abspath(path)), path.resolve()}:  # as written, and with symlinks followed
        try:
            return p.relative_to(ROOT).as_posix() or "."
        except ValueError:
            continue
    return None


def portable(path) -> str:
    """How a path is recorded: repo-relative when under the repo root, else as given (a hub id stays a hub id)."""
    p = Path(path)
    if not (p.is_absolute() or p.exists()):  # a hub id, or a path that is not there (yet)
        return str(path)
    rel = _under_root(p)
    if rel is not None:
        return rel
    return str(p) if p.is_absolute() else os.path.abspath(p)  # outside the repo: absolute, cwd-independent


def _portable_values(value):
    """Absolute paths under the repo root made relative, in strings, Paths, lists and dicts (params, metrics)."""
    if isinstance(value, Path) or (isinstance(value, str) and os.path.isabs(value)):
        rel = _under_root(Path(value))
        return rel if rel is not None else str(value)
    if isinstance(value, (list, tuple)):
        return [_portable_values(v) for v in value]
    if isinstance(value, dict):
        return {k: _portable_values(v) for k, v in value.items()}
    return value


def resolve(path) -> Path:
    """A recorded path usable from the current directory: relative ones are relative to the repo root.

    From the repo root itself (where notebooks, the runner and `step` run) the path stays relative,
    so what a step writes from it (results.json, plans) stays portable too.
    """
    p = Path(path)
    if p.is_absolute() or ROOT is None or Path.cwd().resolve() == ROOT:
        return p
    return ROOT / p


def versions() -> dict[str, str]:
    """Package versions, and (when torch is loaded) the CPU kernels it dispatches to and its thread count:
    toy numbers differ between AVX2 and AVX512 machines, so a result says which it came from."""
    out = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        with suppress(metadata.PackageNotFoundError):
            out[p] = metadata.version(p)
    if "torch" in sys.modules:  # never imported here: the torch-free command-line paths stay torch-free
        torch = sys.modules["torch"]
        out["cpu_capability"] = str(torch.backends.cpu.get_cpu_capability())
        out["torch_threads"] = str(torch.get_num_threads())
    out["cpu_count"] = str(os.cpu_count())
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
    """{path, sha256, bytes} of a file or directory (path as `portable` records it); a hub id is kept as given."""
    p = Path(path)
    if not p.exists():
        return {"path": portable(path), "sha256": None, "bytes": None, "note": "not on disk (hub id?)"}
    return {"path": portable(p), "sha256": tree_sha256(p) if hash else None, "bytes": dir_bytes(p)}


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

    def output(self, name: str, path, hash: bool = True, at=None) -> Manifest:
        """Record output `name`; `at`: its final path when `path` is still a transaction's temp path."""
        self.data["outputs"][name] = describe(path, hash)
        if at is not None:
            self.data["outputs"][name]["path"] = portable(at)
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

    def save(self, run_dir, to=None) -> Path:
        """Write `<run_dir>/manifest.json` (or `to`, a temp path); paths under the repo root made relative first."""
        data = dict(
            self.data, params=_portable_values(self.data["params"]), metrics=_portable_values(self.data["metrics"])
        )
        for kind in ("inputs", "outputs"):  # also paths set directly in .data (the toy world renames its temp dir)
            data[kind] = {n: dict(d, path=_portable_values(d["path"])) for n, d in self.data[kind].items()}
        return write_json(Path(to) if to is not None else Path(run_dir) / FILENAME, data)


def load(path) -> dict:
    """A manifest dict from its file or its run directory (a relative path not found here: from the repo root)."""
    p = Path(path)
    if not p.exists():
        p = resolve(p)
    return read_json(p / FILENAME if p.is_dir() else p)


def output_path(manifest, name: str) -> Path:
    """Path of a named output of a manifest (dict, file or run dir), usable from any cwd; error names what exists."""
    return resolve(_entry(manifest, "outputs", name)["path"])


def input_path(manifest, name: str) -> str:
    """A named input of a manifest: a path on disk as `output_path` gives it, a hub id as recorded."""
    recorded = _entry(manifest, "inputs", name)["path"]
    p = resolve(recorded)
    return str(p) if p.exists() else recorded


def _entry(manifest, kind: str, name: str) -> dict:
    m = manifest if isinstance(manifest, dict) else load(manifest)
    try:
        return m[kind][name]
    except KeyError:
        raise KeyError(
            f"manifest of step {m.get('step')!r} has no {kind[:-1]} {name!r}; it has {sorted(m.get(kind, {}))}"
        ) from None

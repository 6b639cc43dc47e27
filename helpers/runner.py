"""Headless notebook runs: a preset's parameters into each notebook through papermill, plus HTML.

Usage: `python -m helpers run --preset toy --only 03,04 --set 01.MAX_STEPS=5`

A preset is `configs/<name>.yaml`:
    toy_world: {out: runs/toy/world, quick: false, seed: 0}   # optional: built (cached) first
    notebooks:
      "01": {PARAM: value, ...}                               # "{run}" expands to the run root
The runner injects PRESET and RUN_DIR (= <run root>/<notebook stem>) into every notebook, refuses
parameters a notebook does not declare, writes executed notebooks to <run root>/notebooks/, and on
a failing cell stops with that cell's error and the path of the partial notebook.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers.core.fsutil import write_json
from helpers.nb import repo_root

KERNEL = "pruning-lab"


def load_preset(name: str, root: Path) -> dict:
    path = root / "configs" / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in (root / "configs").glob("*.yaml"))
        raise FileNotFoundError(f"{path}: no such preset; available: {', '.join(have)}")
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg["notebooks"] = {f"{int(k):02d}": v or {} for k, v in (cfg.get("notebooks") or {}).items()}
    return cfg


def notebooks(root: Path) -> list[Path]:
    return sorted(p for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def select(nbs: list[Path], only: str | None) -> list[Path]:
    if not only:
        return nbs
    want = [f"{int(x):02d}" for x in only.replace(" ", "").split(",") if x]
    have = {p.name[:2]: p for p in nbs}
    bad = [w for w in want if w not in have]
    if bad:
        raise ValueError(f"--only {only}: no notebook numbered {', '.join(bad)}; have {', '.join(sorted(have))}")
    return [have[w] for w in sorted(want)]


def declared_parameters(nb_path: Path) -> set[str]:
    """Names assigned in the notebook's `parameters`-tagged cell."""
    cells = json.loads(nb_path.read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{nb_path}: expected exactly one cell tagged 'parameters', found {len(tagged)}")
    tree = ast.parse("".join(tagged[0]["source"]))
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def _expand(value, run_root: str):
    if isinstance(value, str):
        return value.replace("{run}", run_root)
    if isinstance(value, list):
        return [_expand(v, run_root) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, run_root) for k, v in value.items()}
    return value


def parameters(preset: str, cfg: dict, nb_path: Path, run_root: str, overrides: dict) -> dict:
    num, stem = nb_path.name[:2], nb_path.stem
    params = {"PRESET": preset, "RUN_DIR": f"{run_root}/{stem}"}
    params.update(_expand(cfg["notebooks"].get(num, {}), run_root))
    params.update(overrides.get(num, {}))
    unknown = sorted(set(params) - declared_parameters(nb_path))
    if unknown:
        raise ValueError(f"{nb_path.name}: parameters {unknown} are not declared in its parameters cell")
    return params


def parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        try:
            key, value = item.split("=", 1)
            num, name = key.split(".", 1)
            out.setdefault(f"{int(num):02d}", {})[name] = yaml.safe_load(value)
        except ValueError:
            raise ValueError(f"--set {item}: expected NN.KEY=VALUE, e.g. 01.MAX_STEPS=5") from None
    return out


def kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL if KERNEL in KernelSpecManager().find_kernel_specs() else "python3"


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def tidy_streams(nb_path: Path) -> None:
    """Rewrite an executed notebook so each progress bar shows its final state only.

    Text-mode tqdm leaves one stream output per refresh; like a terminal, keep what the last
    carriage return left on each line, and drop cursor moves and lines left blank.
    """
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    nb = nbformat.read(str(nb_path), as_version=4)
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                lines = [ln.rsplit("\r", 1)[-1] for ln in _ESCAPES.sub("", out.text).split("\n")]
                out.text = "".join(ln + "\n" for ln in lines if ln.strip())
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if o.output_type != "stream" or o.text]
    nbformat.write(nb, str(nb_path))


def to_html(nb_path: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(nb_path))
    out = nb_path.with_suffix(".html")
    out.write_text(body)
    return out


def ensure_world(spec: dict, root: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "helpers",
        "toy",
        "build",
        "--out",
        str(spec.get("out", "runs/toy/world")),
        "--seed",
        str(spec.get("seed", 0)),
    ] + (["--quick"] if spec.get("quick") else [])
    print(f"[world] {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=root, check=True)


def run(
    preset: str = "toy",
    only: str | None = None,
    out: str | None = None,
    overrides: dict | None = None,
    html: bool = True,
    root: Path | None = None,
) -> list[Path]:
    """Execute the selected notebooks in order; returns the executed notebook paths."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    root = root or repo_root(Path(__file__).parent)
    cfg = load_preset(preset, root)
    run_root = out or f"runs/{preset}"
    chosen = select(notebooks(root), only)
    plan = [(nb, parameters(preset, cfg, nb, run_root, overrides or {})) for nb in chosen]  # fail before running
    if cfg.get("toy_world"):
        ensure_world(cfg["toy_world"], root)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if str(root) not in paths:  # kernels import this tree's helpers, whatever is installed
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), *paths]))
    dest = root / run_root / "notebooks"
    dest.mkdir(parents=True, exist_ok=True)
    kernel, done, timings = kernel_name(), [], {}
    try:
        for i, (nb, params) in enumerate(plan, 1):
            target = dest / nb.name
            print(f"[{i}/{len(plan)}] {nb.stem}", flush=True)
            t = time.perf_counter()
            try:
                pm.execute_notebook(
                    str(nb),
                    str(target),
                    parameters=params,
                    cwd=str(root),
                    kernel_name=kernel,
                    progress_bar=True,
                    log_output=False,
                    request_save_on_cell_execute=True,
                )
            except PapermillExecutionError as e:
                _failed(nb, f"cell {e.exec_count}: {e.ename}: {e.evalue}", target)
            except Exception as e:  # a dead kernel (out of memory), a broken notebook file, ...
                _failed(nb, f"{type(e).__name__}: {e}", target)
            timings[nb.stem] = round(time.perf_counter() - t, 1)
            tidy_streams(target)
            if html:
                to_html(target)
            print(f"[{i}/{len(plan)}] {nb.stem} done in {timings[nb.stem]:.0f} s -> {target}", flush=True)
            done.append(target)
    finally:  # merged, so `--only` runs and runs that stopped early add to the record of earlier ones
        log = dest / "run.json"
        previous = json.loads(log.read_text()).get("timings_s", {}) if log.exists() else {}
        write_json(log, {"preset": preset, "timings_s": {**previous, **timings}})
    return done


def _failed(nb: Path, what: str, partial: Path):
    print(f"\nFAILED {nb.stem}, {what}\npartial notebook: {partial}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def cli_run(args) -> int:
    run(args.preset, args.only, args.out, parse_overrides(args.set), html=not args.no_html)
    return 0

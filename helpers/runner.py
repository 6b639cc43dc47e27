"""Headless runs: a preset's parameters into each notebook through papermill (plus HTML), or one step's function.

Usage: `python -m helpers run --preset toy --only 03,04 --set 01.MAX_STEPS=5`; `python -m helpers step 04`

One source for every parameter: a notebook's `parameters` cell holds the toy defaults, and a preset
`configs/<name>.yaml` lists only what differs from them:
    toy_world: {quick: true}            # optional: the toy world, built (cached) before the steps
    notebooks:
      "05": {N_HEAL: 16, ...}           # "{run}" in a value expands to the run root
A notebook's parameters for a run are built in one place (`parameters`): its defaults, with paths
rebased (below), then PRESET and RUN_DIR (= <run root>/<notebook stem>), then the preset's values,
then `--set` overrides. A name the notebook does not declare is refused, naming it.

Run root and paths. The run root is `--out`, else `runs/<preset>`. The notebooks' defaults point at
the toy run, `runs/toy/...`; the rule: a default string that starts with `runs/toy/` is rebased onto
the run root (`runs/toy/04_layer_drop_mistral/manifest.json` -> `<run root>/04_layer_drop_mistral/...`,
`runs/toy/world` -> `<run root>/world`), and the toy world is built into `<run root>/world` unless
the preset's `toy_world.out` says otherwise. So every run root chains its own notebooks and holds its
own world; `runs/toy` itself is the identity. Preset values and `--set` values are taken as written.

`run` writes executed notebooks to <run root>/notebooks/ (papermill injects PRESET, RUN_DIR and what
differs from the defaults) and, on a failing cell, stops with that cell's error and the path of the
partial notebook. `step NN` calls the step's function (the one its notebook's Run cell calls) in this
process, from the repo root, with the same parameters, so both write the same files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers.core.fsutil import write_json
from helpers.core.steps import Params, notebook_defaults
from helpers.nb import repo_root

KERNEL = "pruning-lab"
TOY_RUN = "runs/toy"  # the run root the notebooks' default paths are written for
ALWAYS = ("PRESET", "RUN_DIR")  # injected into every notebook
STEPS = {  # notebook number -> the step function its Run cell calls (imported when its step runs)
    "01": "helpers.finetune.step:run",
    "02": "helpers.experts.heatmaps:run",
    "03": "helpers.experts.prune:run",
    "04": "helpers.layers.drop:run",
    "05": "helpers.layers.stages:run",
    "06": "helpers.benchmarks.suite:run",
}


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


def run_root_of(preset: str, out: str | None) -> str:
    return os.path.normpath(out) if out else f"runs/{preset}"


def _expand(value, run_root: str):
    if isinstance(value, str):
        return value.replace("{run}", run_root)
    if isinstance(value, list):
        return [_expand(v, run_root) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, run_root) for k, v in value.items()}
    return value


def rebase(value, run_root: str):
    """A notebook default under `runs/toy/` moved onto the run root (strings, inside lists and dicts too)."""
    if isinstance(value, str):
        return run_root + value[len(TOY_RUN) :] if value.startswith(TOY_RUN + "/") else value
    if isinstance(value, list):
        return [rebase(v, run_root) for v in value]
    if isinstance(value, dict):
        return {k: rebase(v, run_root) for k, v in value.items()}
    return value


def defaults(nb_path: Path, run_root: str) -> dict:
    """The notebook's parameters-cell values as they read under this run root."""
    return {k: rebase(v, run_root) for k, v in notebook_defaults(nb_path).items()}


def parameters(preset: str, cfg: dict, nb_path: Path, run_root: str, overrides: dict) -> dict:
    """Every parameter of notebook `nb_path` for this run: defaults (rebased), PRESET, RUN_DIR, preset, overrides.

    The one place both `run` (notebooks) and `step` (functions) get their parameters from.
    """
    num, stem = nb_path.name[:2], nb_path.stem
    params = defaults(nb_path, run_root)
    given = {"PRESET": preset, "RUN_DIR": f"{run_root}/{stem}"}
    given.update(_expand(cfg["notebooks"].get(num, {}), run_root))
    given.update(overrides.get(num, {}))
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"{nb_path.name}: parameters {unknown} are not declared in its parameters cell")
    params.update(given)
    return params


def same(a, b) -> bool:
    """Equal as data (True is not 1, 2 is not 2.0; dict order aside)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def injected(nb_path: Path, params: dict) -> dict:
    """What papermill injects: PRESET, RUN_DIR and the values that differ from the notebook's own cell."""
    own = notebook_defaults(nb_path)
    return {k: v for k, v in params.items() if k in ALWAYS or k not in own or not same(v, own[k])}


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


def world_out(spec: dict, run_root: str) -> str:
    """Where the preset's toy world goes: `toy_world.out` ("{run}" expanded), else <run root>/world."""
    return _expand(spec["out"], run_root) if spec.get("out") else rebase(f"{TOY_RUN}/world", run_root)


def ensure_world(spec: dict, root: Path, run_root: str = TOY_RUN) -> None:
    """Build (or find cached) the preset's toy world, the way `python -m helpers toy build` does."""
    cmd = [
        sys.executable,
        "-m",
        "helpers",
        "toy",
        "build",
        "--out",
        world_out(spec, run_root),
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
    run_root = run_root_of(preset, out)
    chosen = select(notebooks(root), only)
    plan = [(nb, parameters(preset, cfg, nb, run_root, overrides or {})) for nb in chosen]  # fail before running
    if cfg.get("toy_world") is not None:
        ensure_world(cfg["toy_world"], root, run_root)
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
                    parameters=injected(nb, params),
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


def step_function(num: str):
    """The function notebook `num`'s Run cell calls (imported now: it may pull in torch)."""
    module, name = STEPS[step_number(num)].split(":")
    return getattr(importlib.import_module(module), name)


def parse_step_sets(items: list[str], num: str) -> dict[str, dict]:
    """`--set KEY=VALUE` of `step NN` (YAML values) as `run`'s overrides; `NN.KEY=VALUE` is accepted too."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item}: expected KEY=VALUE, e.g. MAX_STEPS=5")
        if "." in key:
            pre, key = key.split(".", 1)
            if not pre.isdigit() or f"{int(pre):02d}" != num:
                raise ValueError(f"--set {item}: this is step {num}; use KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return {num: out}


def step_parameters(num: str, preset: str = "toy", out: str | None = None, sets: dict | None = None, root=None):
    """(Params, preset config) for `step NN`: exactly what `run` would give notebook NN."""
    root = root or repo_root(Path(__file__).parent)
    cfg = load_preset(preset, root)
    (nb,) = select(notebooks(root), step_number(num))
    return Params(parameters(preset, cfg, nb, run_root_of(preset, out), {nb.name[:2]: sets or {}})), cfg


def step_number(text: str) -> str:
    """`4` or `04` -> "04"; anything else, or a notebook without a step function, is refused naming the steps."""
    num = f"{int(text):02d}" if str(text).isdigit() else str(text)
    if num not in STEPS:
        raise ValueError(f"step {text}: no such step; steps are {', '.join(STEPS)}")
    return num


def run_step(num: str, preset: str = "toy", out: str | None = None, sets: dict | None = None, root=None):
    """Run step `num` as its notebook would (world first, repo root as cwd, same seeds); returns its result."""
    from helpers import nb

    root = root or repo_root(Path(__file__).parent)
    num = step_number(num)
    params, cfg = step_parameters(num, preset, out, sets, root)  # refuses unknown names before any work
    fn = step_function(num)
    if cfg.get("toy_world") is not None:
        ensure_world(cfg["toy_world"], root, run_root_of(preset, out))
    print(f"[step {num}] {fn.__module__}.{fn.__name__} -> {params.run_dir}", flush=True)
    nb.setup(root=root)
    return fn(params)


def cli_step(args) -> int:
    num = step_number(args.step)
    t = time.perf_counter()
    run_step(num, args.preset, args.out, parse_step_sets(args.set, num)[num])
    print(f"[step {num}] done in {time.perf_counter() - t:.0f} s", flush=True)
    return 0

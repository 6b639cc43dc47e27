"""Angular-distance layer dropping (Gromov et al., arXiv 2403.17887): plan the cut, apply it, run step 04.

`plan_layer_drop` picks the block of round(DROP_FRAC x L) layers whose two ends are closest in the
distance matrix D[n, l] (distance.py measures it), or takes an explicit `layers` block (pure, JSON);
`apply_layer_drop` streams stage A and the removed layers as bundles (bundles.py). `run(p)` is step
04, what notebook 04's Run cell and the `layer-drop` command both call: calibrate, measure, plan,
cut, draw, record. It writes, under RUN_DIR: `plan.json` (before any surgery), `distances.json`,
stage A (`A/` unless SAVE_DIR), the bundles (`bundles/` unless SAVE_REMOVED_DIR),
`figures/{distance_heatmap,min_distance_by_n}.png` and `manifest.json` last.

Models load through `core.models.load_model`, checkpoint paths resolve through `checkpoint.local_dir`.

Usage: `r = run(Params(notebook_defaults(NOTEBOOK)))`; `apply_layer_drop(src, plan_layer_drop(cfg, D), "A", "bundles")`
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers.core import arch, memplan
from helpers.core.checkpoint import Checkpoint, local_dir
from helpers.core.fsutil import dir_bytes, refuse_existing, write_json
from helpers.core.manifest import Manifest, output_path, resolve
from helpers.core.manifest import load as load_manifest
from helpers.core.models import load_model
from helpers.core.steps import Params, notebook_defaults
from helpers.core.txn import check_overlap, transaction
from helpers.core.writer import copied, write_checkpoint
from helpers.layers import bundles

PLAN_FORMAT = "layer-drop-plan/1"
STEP = "04_layer_drop_mistral"
TOY_WORLD = "runs/toy/world"  # resolved against the repo root, never the current directory
NOTEBOOK = f"notebooks/{STEP}.ipynb"  # its parameters cell holds run()'s defaults (the command line's too)


# ---- in memory ------------------------------------------------------------------------------
def keep_layers_copy(model, keep: list[int]):
    """A deep copy of `model` with only decoder layers `keep`, ready for cached generation.

    Everything transformers needs when layers go (facts.md): a new ModuleList, num_hidden_layers,
    layer_types sliced, and each attention's layer_idx renumbered 0..n-1 (else cached generate
    indexes past the cache). For stages that share weights, see bundles.load_stages.
    """
    import copy

    import torch

    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
    m.config.num_hidden_layers = len(keep)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [m.config.layer_types[i] for i in keep]
    for j, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = j
    return m.eval()


# ---- plan -----------------------------------------------------------------------------------
def parse_layers(spec, n_layers: int) -> tuple[int, int]:
    """'a-b' (0-based, inclusive) or 'a' -> (a, b), checked against the layer count."""
    if isinstance(spec, (tuple, list)):
        a, b = (int(spec[0]), int(spec[-1]))
    else:
        try:
            parts = [int(p) for p in str(spec).strip().split("-")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise ValueError(f"--layers {spec!r}: expected a-b (0-based, inclusive), e.g. 4-7")
        a, b = parts[0], parts[-1]
    if not 0 <= a <= b < n_layers:
        raise ValueError(
            f"--layers {a}-{b} is out of range for a {n_layers}-layer model (valid: 0-{n_layers - 1}, a <= b)"
        )
    return a, b


def block_size(n_layers: int, drop_frac: float) -> int:
    """n = round(drop_frac * L) (halves round up), checked: at least one dropped, something left."""
    if not (isinstance(drop_frac, (int, float)) and 0.0 <= drop_frac < 1.0):
        raise ValueError(f"--drop-frac {drop_frac} is outside [0, 1)")
    n = int(math.floor(drop_frac * n_layers + 0.5))
    if n == 0:
        raise ValueError(f"--drop-frac {drop_frac} of {n_layers} layers drops no layer (n = 0)")
    if n >= n_layers:
        raise ValueError(f"--drop-frac {drop_frac} drops {n} of {n_layers} layers: nothing left")
    return n


def split_bundles(dropped: list[int], n_bundles: int) -> dict[str, list[int]]:
    """Contiguous, near-equal groups named B, C, D, ... (earlier layers first)."""
    if not 1 <= n_bundles <= min(len(dropped), 25):
        raise ValueError(f"--n-bundles {n_bundles}: must be between 1 and the {len(dropped)} dropped layers")
    parts = np.array_split(np.asarray(dropped), n_bundles)
    return {chr(ord("B") + i): [int(x) for x in p] for i, p in enumerate(parts)}


def plan_layer_drop(
    config: dict,
    distances: np.ndarray | None = None,
    *,
    drop_frac: float = 0.25,
    keep_last_layer: bool = False,
    layers=None,
    n_bundles: int = 2,
) -> dict:
    """Pure: which block to drop and how to bundle it, as JSON. `layers` ('a-b') overrides the search."""
    fam = arch.detect(config)
    L = fam.n_layers(config)
    if layers is not None:
        a, b = parse_layers(layers, L)
        if keep_last_layer and b == L - 1:
            raise ValueError(f"--layers {a}-{b} touches the last layer ({L - 1}) but --keep-last-layer is set")
        if b - a + 1 >= L:
            raise ValueError(f"--layers {a}-{b} drops all {L} layers: nothing left")
        n, selection = b - a + 1, "explicit"
    else:
        n = block_size(L, drop_frac)
        if distances is None:
            raise ValueError("plan_layer_drop: no distance matrix; measure one (angular_distances) or give --layers")
        if distances.shape != (L + 1, L):
            raise ValueError(f"distance matrix has shape {distances.shape}, expected {(L + 1, L)} for {L} layers")
        from helpers.layers.distance import best_start  # torch: only when a distance matrix is given

        a = best_start(distances, n, keep_last_layer)  # n < L: a block always fits
        b, selection = a + n - 1, "angular-distance"
    dropped = list(range(a, b + 1))
    kept = [i for i in range(L) if i not in dropped]
    return {
        "format": PLAN_FORMAT,
        "model_type": fam.model_type,
        "n_layers": L,
        "selection": selection,
        "drop_frac": None if layers is not None else drop_frac,
        "keep_last_layer": keep_last_layer,
        "n_drop": n,
        "block": [a, b],
        "block_distance": None if distances is None else float(distances[n, a]),
        "dropped": dropped,
        "kept": {str(new): orig for new, orig in enumerate(kept)},  # new index -> original index
        "bundles": split_bundles(dropped, n_bundles),
        "distances": None if distances is None else _rows(distances),
    }


def calib_texts(source, n: int | None = None, **kw) -> list[str]:
    """distance.calib_texts, imported on use (torch): the surgery-only path never loads it."""
    from helpers.layers import distance

    return distance.calib_texts(source, n, **kw)


def _rows(D: np.ndarray) -> list:
    from helpers.layers.distance import distances_to_json

    return distances_to_json(D)["rows"]


# ---- apply (streaming) ----------------------------------------------------------------------
def check_outputs(save_dir, save_removed_dir, overwrite: bool, model_dir=None, files: dict | None = None) -> None:
    """Refuse, before any calibration or writing: outputs that overlap each other or the model, existing ones."""
    a, b = Path(save_dir).resolve(), Path(save_removed_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"--save-dir {save_dir} and --save-removed-dir {save_removed_dir} must not contain each other")
    outputs = {"--save-dir": save_dir, "--save-removed-dir": save_removed_dir, **(files or {})}
    check_overlap({"--model": model_dir}, outputs)
    refuse_existing(save_dir, overwrite)
    refuse_existing(save_removed_dir, overwrite)


def apply_layer_drop(model_dir, plan: dict, save_dir, save_removed_dir, overwrite: bool = False, txn=None):
    """Stream stage A (renumbered, config fixed) and the removed layers as bundles; return both dirs.

    Both directories appear together (one transaction, or the caller's `txn` holding both); tensors
    are copied byte for byte (renamed where renumbered); peak memory is one small slice. Both
    directories get `layer_drop.json` (the stage record bundles.py reads).
    """
    src = Checkpoint(local_dir(model_dir))
    fam = arch.detect(src.config)
    L = fam.n_layers(src.config)
    if (plan.get("model_type"), plan.get("n_layers")) != (fam.model_type, L):
        raise ValueError(
            f"plan is for a {plan.get('n_layers')}-layer {plan.get('model_type')}, "
            f"{src.path} is a {L}-layer {fam.model_type}"
        )
    check_outputs(save_dir, save_removed_dir, overwrite, model_dir=src.path)
    if txn is None:
        with transaction(dirs=[save_dir, save_removed_dir], overwrite=overwrite) as t:
            _write_drop(src, plan, t[save_dir], t[save_removed_dir])
    else:
        _write_drop(src, plan, txn[save_dir], txn[save_removed_dir])
    return Path(save_dir), Path(save_removed_dir)


def _write_drop(src: Checkpoint, plan: dict, a_tmp: Path, b_tmp: Path) -> None:
    L = arch.detect(src.config).n_layers(src.config)
    kept = {int(k): int(v) for k, v in plan["kept"].items()}
    new_of = {orig: new for new, orig in kept.items()}
    layer_names = [n for n in src.keys() if arch.layer_of(n) is not None]
    missing = sorted(set(range(L)) - {arch.layer_of(n) for n in layer_names})
    if missing:
        raise ValueError(f"{src.path}: no tensors for layers {missing}")
    record = bundles.stage_record(src, plan)
    entries = []
    for name in src.keys():
        l = arch.layer_of(name)
        if l is None:
            entries.append(copied(src, name))
        elif l in new_of:
            entries.append(copied(src, name, arch.renumber(name, new_of[l])))
    write_checkpoint(
        a_tmp,
        entries,
        config=arch.keep_layers_config(src.config, list(kept.values())),
        side_files_from=src.path,
        max_shard_size=bundles.largest_shard(src),
        extra_json={bundles.RECORD: record},
        desc="stage A",
        atomic=False,
    )
    bundles.save_bundles(src, plan["bundles"], b_tmp, record, atomic=False)


# ---- step 04 --------------------------------------------------------------------------------
@dataclass
class LayerDropResult:
    """What notebook 04 shows: the saved manifest, the plan, the distances, what was written, the figures."""

    manifest: Manifest
    plan: dict  # as saved to RUN_DIR/plan.json
    distances: np.ndarray | None  # D[n, l], [L + 1, L]; None when nothing was measured (LAYERS, CALIB None)
    best: list[dict]  # the cheapest block of each size n (min_distance_by_n)
    n_texts: int  # calibration texts measured
    stage_a: Path
    bundles: Path
    stages: object  # DataFrame: stage, layers, original indices
    saved: object  # DataFrame: directory, what it holds, MB
    figures: dict[str, Path]  # distance_heatmap, min_distance_by_n -> RUN_DIR/figures/<name>.png
    manifest_path: Path
    sweep: object = None  # DataFrame: the sweep at the chosen n (accuracy, 95% interval, paired diff); SWEEP

    @property
    def summary(self) -> str:
        p = self.plan
        (a, b), d = p["block"], p["block_distance"]
        dist = "" if d is None else f", distance {d:.3f}"
        sizes = ", ".join(f"{k}: {v[0]}-{v[-1]}" for k, v in p["bundles"].items())
        return (
            f"dropped layers {a}-{b} of {p['n_layers']} ({p['selection']}{dist}); stage A -> {self.stage_a} "
            f"({p['n_layers'] - p['n_drop']} layers); bundles -> {self.bundles} ({sizes}); "
            f"manifest: {self.manifest_path}"
        )


def check_params(config: dict, p: Params) -> None:
    """Bad parameters fail in one line before the model loads or anything is written."""
    if p.layers is not None:  # the plan without distances checks the block and the bundle count
        plan_layer_drop(config, None, layers=p.layers, keep_last_layer=p.keep_last_layer, n_bundles=p.n_bundles)
        return
    if p.calib is None:
        raise ValueError("no calibration text (CALIB / --calib) and no explicit block (LAYERS / --layers)")
    split_bundles(list(range(block_size(arch.detect(config).n_layers(config), p.drop_frac))), p.n_bundles)


def _figures(D: np.ndarray, best: list[dict], plan: dict, fig_dir: Path) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    from helpers import plots

    fig_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, fig in (
        ("distance_heatmap", plots.distance_heatmap(D, plan)),
        ("min_distance_by_n", plots.min_distance_curve(best, plan)),
    ):
        out[name] = fig_dir / f"{name}.png"
        fig.savefig(out[name], dpi=120)
        plt.close(fig)  # the notebook shows the saved file, not a second copy
    return out


def _tables(a_dir: Path, b_dir: Path):
    """(stages, saved): the layers each stage runs, and each written directory with what it holds."""
    import pandas as pd

    record = bundles.read_record(a_dir, b_dir)
    stages = [
        {
            "stage": s,
            "layers": len(bundles.stage_layers(record, s)),
            "original indices": bundles.stage_layers(record, s),
        }
        for s in bundles.default_stages(record)
    ]
    held = [(a_dir, list(record["kept"].values())), *[(b_dir / b, v) for b, v in record["bundles"].items()]]
    saved = [{"directory": str(d), "holds": f"layers {v}", "MB": round(dir_bytes(d) / 1e6, 2)} for d, v in held]
    return pd.DataFrame(stages), pd.DataFrame(saved)


def run(p: Params) -> LayerDropResult:
    """Measure, plan, cut, draw and record step 04 (notebook 04's parameters) as one transaction.

    Stage A, the bundles, plan.json, distances.json, figures/ and manifest.json are written into temp
    paths (the plan first, before any surgery) and swapped in together: after a kill, Ctrl-C or a full
    disk either the previous outputs are all intact or the new ones are all complete.
    """
    run_dir = Path(p.run_dir)
    save_dir = Path(p.save_dir) if p.save_dir else run_dir / "A"
    removed_dir = Path(p.save_removed_dir) if p.save_removed_dir else run_dir / "bundles"
    records = {n: run_dir / n for n in ("plan.json", "distances.json", "manifest.json")}
    fig_dir = run_dir / "figures"
    manifest = Manifest(STEP, {k: v for k, v in p.items() if k != "ROOT"})
    world_dir = resolve(Path(p.world_manifest).parent if p.world_manifest else TOY_WORLD)
    model_path = p.model or output_path(load_manifest(p.world_manifest), "mistral")
    config = arch.read_config(local_dir(model_path))
    memplan.announce_step("04", p, local_dir(model_path))
    check_params(config, p)
    check_outputs(save_dir, removed_dir, p.overwrite, local_dir(model_path), {**records, "figures": fig_dir})

    sweep = None
    if p.sweep:  # every method's accuracy vs layers dropped, before the surgery (helpers/layers/layer_sweep.py)
        from helpers.layers.layer_sweep import at_n, run_sweep

        with manifest.timer("sweep"):
            sw = run_sweep(p, {"limit": p.sweep_limit, "seeds": p.sweep_seeds}, out_dir=run_dir / "sweep")
        sweep = at_n(sw["rows"], block_size(config["num_hidden_layers"], p.drop_frac))
    owned = [fig_dir, *records.values()]  # the step's records: replaced with the outputs they describe
    with transaction([save_dir, removed_dir, fig_dir], records.values(), p.overwrite, replace=owned) as t:
        D, texts = None, []
        if p.calib is not None:  # with LAYERS the distances are still measured and recorded, unless CALIB is None
            from helpers.layers.distance import angular_distances, distances_to_json, min_distance_by_n

            texts = calib_texts(p.calib, p.n_samples, world=world_dir, seed=p.seed)
            with manifest.timer("calibration"):
                model, tokenizer = load_model(model_path, dtype=p.dtype)
                D = angular_distances(model, tokenizer, texts, seq_len=p.seq_len, batch_size=p.batch_size)
                del model
        plan = plan_layer_drop(
            config, D, drop_frac=p.drop_frac, keep_last_layer=p.keep_last_layer, layers=p.layers, n_bundles=p.n_bundles
        )
        write_json(t[records["plan.json"]], plan)  # the plan is written before any surgery
        if D is not None:
            final = "before the final norm"
            write_json(t[records["distances.json"]], distances_to_json(D, n_samples=len(texts), final=final))
        with manifest.timer("surgery"):
            apply_layer_drop(model_path, plan, save_dir, removed_dir, overwrite=p.overwrite, txn=t)
        best = [] if D is None else min_distance_by_n(D, p.keep_last_layer)
        figures = {} if D is None else _figures(D, best, plan, t[fig_dir])

        if p.world_manifest and (p.model is None or p.calib == "toy"):  # the world gave the model or the text
            manifest.input("world", p.world_manifest)
        manifest.input("model", local_dir(model_path), hash=False)  # its hash lives in the world manifest
        manifest.output("stage_a", t[save_dir], at=save_dir).output("bundles", t[removed_dir], at=removed_dir)
        if D is not None:
            manifest.output("distances", t[records["distances.json"]], at=records["distances.json"])
        manifest.output("plan", t[records["plan.json"]], at=records["plan.json"])
        if figures:
            manifest.output("figures", t[fig_dir], at=fig_dir)
        manifest.metrics(
            n_layers=plan["n_layers"],
            n_layers_a=plan["n_layers"] - plan["n_drop"],
            block=plan["block"],
            block_distance=plan["block_distance"],
            bundles=plan["bundles"],
            n_calibration_texts=len(texts),
        )
        if p.sweep:
            manifest.output("sweep", run_dir / "sweep")
        manifest.save(run_dir, to=t[records["manifest.json"]])
    figures = {k: fig_dir / v.name for k, v in figures.items()}
    if p.sweep:
        figures["sweep"] = sw["figure"]
    stages, saved = _tables(save_dir, removed_dir)
    path = records["manifest.json"]
    return LayerDropResult(
        manifest, plan, D, best, len(texts), save_dir, removed_dir, stages, saved, figures, path, sweep
    )


# ---- command line ---------------------------------------------------------------------------
# `layer-drop` flags, each the notebook parameter of the same name; unset: the notebook's default
FLAGS = ["model", "world_manifest", "calib", "n_samples", "seq_len", "batch_size", "drop_frac", "keep_last_layer"]
FLAGS += ["layers", "n_bundles", "dtype", "seed", "save_dir", "save_removed_dir"]


def cli_params(args) -> Params:
    """Notebook 04's defaults with the flags given on top (RUN_DIR: --run-dir, else the parent of --save-dir)."""
    values = notebook_defaults(Path(__file__).resolve().parents[2] / NOTEBOOK)
    values.update({k.upper(): getattr(args, k) for k in FLAGS if getattr(args, k) is not None})
    if args.layers is not None and args.calib is None:
        values["CALIB"] = None  # the block is given: nothing to measure unless --calib asks for the distances
    run_dir = args.run_dir or (Path(args.save_dir).parent if args.save_dir else None)
    if run_dir is not None:
        values["RUN_DIR"] = str(run_dir)
    if getattr(args, "world", None) and args.world_manifest is None:
        values["WORLD_MANIFEST"] = str(Path(args.world).absolute() / "manifest.json")
    values["PRESET"] = None  # a command-line run belongs to no preset
    values["OVERWRITE"] = args.overwrite  # the command line replaces nothing unless told
    values["SWEEP"] = False  # the sweep is `python -m helpers sweep layers`
    return Params(values)


def cli_layer_drop(args) -> int:
    print(run(cli_params(args)).summary)
    return 0

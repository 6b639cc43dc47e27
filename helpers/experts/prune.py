"""Keep k experts per layer of a Mixtral checkpoint: a pure plan, then a streaming apply.

The plan is `{"keep": {"<layer>": [sorted expert ids]}, ...}`. Applying it reads legacy or fused
input and writes legacy names: kept experts are renumbered 0..k-1 in ascending original id, the
router keeps their rows ([E, H] -> [k, H]) and `num_local_experts` becomes k. Every expert weight
is copied as a byte range (a fused tensor's [e, rows] block is contiguous) and each router as its
kept rows' byte ranges, so the prune reads only what it keeps and never deserialises a tensor
(torch is not even imported on the command-line path).

`run(p)` is step 03, notebook 03's Run cell: plan from notebook 02's scores (saved first as
RUN_DIR/plan.json), prune into RUN_DIR/pruned, check (logits, load), draw RUN_DIR/figures/
{kept_experts,sizes}.png and save RUN_DIR/manifest.json last. The `expert-prune` command is its
plan and prune alone (`make_plan` + `apply_expert_prune`), the same files for the same inputs.

Usage: `apply_expert_prune("in/", plan_expert_prune(cfg, scores=s, k=6), "out/", layout="both")`; `run(params)`
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers.core import arch, memplan
from helpers.core.checkpoint import Checkpoint, CheckpointError, local_dir
from helpers.core.fsutil import read_json, write_json
from helpers.core.manifest import Manifest, input_path, output_path
from helpers.core.manifest import load as load_manifest
from helpers.core.steps import Params, notebook_defaults
from helpers.core.txn import check_overlap, transaction
from helpers.core.verify import compare
from helpers.core.writer import copied, parse_size, write_checkpoint
from helpers.experts.masking import masked_router  # the reference a prune is checked against
from helpers.experts.streamcheck import streamed_logit_check
from helpers.experts.view import (
    ExpertView,
    check_expert_layout,
    expert_layout,
    moe_family,
    prune_entries,
    pruned_config,
)

LAYOUTS = ("standard", "consolidated", "both")
RECORD = "manifest.json"
STEP = "03_expert_prune"
NOTEBOOK = f"notebooks/{STEP}.ipynb"  # its parameters cell holds run()'s defaults (and the command line's)


# ---- plan -------------------------------------------------------------------------------------
def _check_k(k: int, n_experts: int, top_k: int, where: str) -> None:
    if k > n_experts:
        raise ValueError(f"{where}: keeps {k} experts but the model has only {n_experts}")
    if k < top_k:
        raise ValueError(
            f"{where}: keeps {k} experts, fewer than num_experts_per_tok={top_k} (each token needs {top_k})"
        )


def validate_plan(plan: dict, config: dict, name: str = "plan") -> dict[int, list[int]]:
    """{layer: sorted kept ids} of a plan checked against `config`; one-line error naming the flaw."""
    fam = moe_family(config)
    L, E, top_k = fam.n_layers(config), fam.n_experts(config), fam.top_k(config)
    keep = plan.get("keep") if isinstance(plan, dict) else None
    if not isinstance(keep, dict):
        raise ValueError(f"{name}: needs a 'keep' mapping {{\"<layer>\": [expert ids]}}")
    if "fingerprint" in plan:
        check_expert_layout(plan["fingerprint"], config, name)
    try:
        layers = {int(k): v for k, v in keep.items()}
    except ValueError:
        raise ValueError(f"{name}: layer keys must be integers, got {sorted(keep)}") from None
    if extra := sorted(set(layers) - set(range(L))):
        raise ValueError(f"{name}: names layer {extra[0]}, but the model has layers 0-{L - 1}")
    if missing := sorted(set(range(L)) - set(layers)):
        raise ValueError(f"{name}: no entry for layer {missing[0]} (the model has {L} layers; every layer needs one)")
    out = {}
    for l in range(L):
        ids = layers[l]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"{name}: layer {l}: expert ids must be a list of integers, got {ids!r}")
        _check_k(len(ids), E, top_k, f"{name}: layer {l}")
        if dup := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"{name}: layer {l}: duplicate expert id {dup[0]}")
        if bad := [i for i in ids if not 0 <= i < E]:
            raise ValueError(f"{name}: layer {l}: unknown expert id {bad[0]} (the model has experts 0-{E - 1})")
        out[l] = sorted(ids)
    if len({len(v) for v in out.values()}) > 1:
        raise ValueError(
            f"{name}: layers keep different numbers of experts {sorted({len(v) for v in out.values()})}; "
            "num_local_experts is one number for all layers"
        )
    return out


def plan_expert_prune(
    config: dict,
    *,
    scores: dict | None = None,
    criterion: str = "delta_l2",
    k: int | None = None,
    keep: dict | None = None,
    scores_name: str = "scores.json",
) -> dict:
    """The plan keeping, per layer, the k experts with the highest `criterion` score (or `keep`).

    Pure: no file is read or written. Ties go to the lower expert id.
    """
    fam = moe_family(config)
    E, top_k = fam.n_experts(config), fam.top_k(config)
    meta: dict = {"fingerprint": expert_layout(config)}
    if (scores is None) == (keep is None):
        raise ValueError("give exactly one of scores (with k) or an explicit keep mapping")
    if scores is not None:
        check_expert_layout(scores["fingerprint"], config, scores_name)
        if k is None:
            raise ValueError("k (--keep) is required with scores")
        _check_k(k, E, top_k, f"--keep {k}")
        crit = scores["criteria"]
        if criterion not in crit:
            raise KeyError(f"{scores_name} has no criterion {criterion!r}; it has {sorted(crit)}")
        grid = np.asarray([[np.nan if v is None else v for v in row] for row in crit[criterion]], float)  # [L, E]
        if not np.isfinite(grid).all():  # NaN would sort silently to one end: refuse to rank it
            l, e = (int(x) for x in np.argwhere(~np.isfinite(grid))[0])
            raise ValueError(f"{scores_name}: criterion {criterion!r} has a non-finite score (layer {l}, expert {e})")
        keep = {str(l): sorted(np.argsort(-row, kind="stable")[:k].tolist()) for l, row in enumerate(grid)}
        meta.update(criterion=criterion, scores=scores.get("meta", {}).get("source", scores_name))
    plan = {"keep": {str(l): ids for l, ids in keep.items()}, **meta}
    kept = validate_plan(plan, config)
    plan["keep"] = {str(l): ids for l, ids in kept.items()}
    plan["k"] = len(kept[0])
    plan["n_experts"] = E
    return plan


def save_plan(path, plan: dict) -> Path:
    return write_json(path, plan)


def load_plan(path) -> dict:
    return read_json(path)


def make_plan(model_dir, *, scores=None, criterion: str = "delta_l2", keep: int | None = None, plan=None) -> dict:
    """The plan for `model_dir`: a saved `plan` (plan.json) checked against it, or the top `keep` by
    `criterion` of a `scores` file (scores.json)."""
    config = arch.read_config(model_dir)
    if plan:
        if scores or keep is not None:
            raise ValueError("--plan excludes --scores/--keep (the plan already says what to keep)")
        loaded = load_plan(plan)
        validate_plan(loaded, config, name=str(plan))
        return loaded
    if not scores or keep is None:
        raise ValueError("give --plan PLAN.json, or --scores SCORES.json with --keep K")
    from helpers.experts.scores import load_scores  # torch: only this path needs it

    return plan_expert_prune(config, scores=load_scores(scores), criterion=criterion, k=keep, scores_name=str(scores))


# ---- apply ------------------------------------------------------------------------------------
def apply_expert_prune(
    model_dir, plan: dict, out, layout: str = "standard", max_shard_size=None, overwrite: bool = False
) -> dict:
    """Write the pruned checkpoint(s); returns a record of them, also saved as OUT/manifest.json.

    standard: OUT mirrors the input's shards (each tensor in its source's shard). consolidated:
    OUT packed into another shard count (half the input's, or `max_shard_size` each). both:
    OUT/standard and OUT/consolidated, verified tensor-identical. OUT/plan.json is the plan applied,
    written inside the same atomic directory as the weights.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if max_shard_size is not None:
        parse_size(max_shard_size)  # a bad size fails before anything is read
    out = Path(out)
    check_overlap({"--model": local_dir(model_dir)}, {"--out": out})
    view = ExpertView(model_dir)
    keep = validate_plan(plan, view.config)
    k = len(keep[0])
    entries = prune_entries(view, keep)
    config = pruned_config(view.config, k)
    n_in = len(view.ck.shards)
    packed = {"max_shard_size": max_shard_size} if max_shard_size else {"n_shards": max(1, n_in // 2)}
    source = [copied(view.ck, n) for n in view.ck.keys()]
    rec = {
        "source": str(view.ck.path),
        "source_format": view.format.name,
        "layout": layout,
        "plan": {"keep": {str(l): v for l, v in keep.items()}, "k": k, "n_experts": view.n_experts},
        "bytes": {"before": view.ck.nbytes, "after": sum(e.nbytes for e in entries)},
        "params": {"before": sum(e.numel for e in source), "after": sum(e.numel for e in entries)},
        "shards": {"source": n_in},
    }
    write = dict(config=config, side_files_from=view.ck.path, desc="prune", atomic=False)
    with transaction(dirs=[out], overwrite=overwrite) as t:  # weights, plan and manifest appear together
        tmp = t[out]
        if layout == "both":
            write_json(tmp / "plan.json", plan)
            std = write_checkpoint(tmp / "standard", entries, like=view.ck, **write)
            con = write_checkpoint(tmp / "consolidated", entries, **packed, **write)
            cmp = compare(std, con)
            if not cmp.equal:
                raise CheckpointError(f"{out}: standard and consolidated layouts differ: {cmp}")
            rec.update(identical=True, compare=str(cmp))
            rec["shards"].update(standard=len(Checkpoint(std).shards), consolidated=len(Checkpoint(con).shards))
            layouts = ("standard", "consolidated")
        else:
            kw = {"like": view.ck} if layout == "standard" else packed
            write_checkpoint(tmp, entries, extra_json={"plan.json": plan}, **kw, **write)
            rec["shards"][layout] = len(Checkpoint(tmp).shards)
            layouts = (layout,)
        view.close()
        rec["paths"] = {n: str(out / n if layout == "both" else out) for n in layouts}
        _record(tmp, out, rec, plan, max_shard_size)
    return rec


def _record(tmp: Path, out: Path, rec: dict, plan: dict, max_shard_size) -> Path:
    """OUT/manifest.json (written in the temp dir `tmp`): what was pruned from what, layouts, verification."""
    m = Manifest(
        "expert_prune",
        {
            "layout": rec["layout"],
            "max_shard_size": max_shard_size,
            "k": rec["plan"]["k"],
            "criterion": plan.get("criterion"),
        },
    )
    m.input("model", rec["source"], hash=False)
    m.output("plan", tmp / "plan.json", at=out / "plan.json")
    for name, path in rec["paths"].items():
        m.output(name, tmp / Path(path).relative_to(out), hash=False, at=path)
    m.metrics(**{k: rec[k] for k in ("source_format", "bytes", "params", "shards", "identical", "compare") if k in rec})
    m.data["plan"] = rec["plan"]
    return m.save(out, to=tmp / "manifest.json")


def size_table(rec: dict):
    """Parameters, GB and shard count before and after (per written layout), from a prune record."""
    import pandas as pd

    cols = {"before": [rec["params"]["before"], rec["bytes"]["before"] / 1e9, rec["shards"]["source"]]}
    for lay in ("standard", "consolidated"):
        if lay in rec["shards"]:
            cols[f"after ({lay})"] = [rec["params"]["after"], rec["bytes"]["after"] / 1e9, rec["shards"][lay]]
    return pd.DataFrame(cols, index=["params", "GB", "shards"])


def logit_check(source, pruned, plan: dict, texts: list[str], dtype="float32", streamed=True, **load_kw) -> dict:
    """Max |logits(pruned) - logits(source with pruned experts masked)| over `texts`.

    `streamed` (default): layer by layer, about one layer of each model in memory (`streamcheck`), on
    the first GPU if any; else both whole models side by side (`load_kw`: e.g. device_map).
    """
    import torch
    from transformers import AutoTokenizer

    from helpers.core.models import default_device, load_check

    if streamed:
        return streamed_logit_check(source, pruned, plan, texts, dtype=dtype, device=default_device())

    tok = AutoTokenizer.from_pretrained(str(pruned))
    base = load_check(source, dtype=dtype, **load_kw).eval()
    small = load_check(pruned, dtype=dtype, **load_kw).eval()
    worst, n = 0.0, 0
    for t in texts:
        enc = tok(t, return_tensors="pt").to(next(base.parameters()).device)
        with masked_router(base, plan), torch.no_grad():
            ref = base(**enc).logits.float()
            got = small(**enc).logits.float()
        worst = max(worst, float((got.to(ref.device) - ref).abs().max()))
        n += enc["input_ids"].numel()
    return {"max_abs_diff": worst, "n_tokens": n, "n_texts": len(texts)}


# ---- step 03 ----------------------------------------------------------------------------------
@dataclass
class ExpertPruneResult:
    """What notebook 03 shows: the saved manifest, the plan, the pruned layouts, their checks and figures."""

    manifest: Manifest
    model: str  # the checkpoint pruned (notebook 02's merged model unless MODEL)
    scores: Path  # notebook 02's scores.json
    plan: dict  # as saved to RUN_DIR/plan.json (and inside every layout)
    plan_path: Path
    record: dict  # apply_expert_prune's record: paths, bytes, params, shards, layout comparison
    sizes: object  # DataFrame: params, GB and shards before and after (size_table)
    check: dict  # logit check {max_abs_diff, n_tokens, n_texts}; {} without LOGIT_CHECK
    figures: dict[str, Path]  # kept_experts, sizes (and sweep with SWEEP) -> RUN_DIR/figures/<name>.png
    sweep: object = None  # DataFrame: the sweep at KEEP (accuracy and 95% interval per criterion, domain); SWEEP

    @property
    def paths(self) -> dict[str, str]:
        return self.record["paths"]

    @property
    def verification(self) -> dict:
        return {"layouts": self.record.get("compare", "single layout"), **self.check}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)  # the notebook shows the saved file, not a second copy
    return path


def run(p: Params) -> ExpertPruneResult:
    """Plan (saved first), prune, draw, check and record step 03 (notebook 03's parameters)."""
    from helpers import plots  # matplotlib: not on the command line's torch-free path
    from helpers.core.models import load_check

    run_dir = Path(p.run_dir)
    manifest = Manifest(STEP, {k: v for k, v in p.items() if k != "ROOT"})
    sweep = None
    if p.sweep:  # every criterion's accuracy vs experts kept, before the surgery (helpers/experts/sweep.py)
        from helpers.experts.sweep import at_keep, run_sweep

        with manifest.timer("sweep"):
            sw = run_sweep(p, {"limit": p.sweep_limit, "seeds": p.sweep_seeds}, out_dir=run_dir / "sweep")
        sweep = at_keep(sw["rows"], p.keep)
    m02 = load_manifest(p.scores_manifest)
    scores_path = output_path(m02, "scores")
    model_dir = p.model or input_path(m02, "merged")
    memplan.announce_step("03", p, model_dir)
    plan = make_plan(model_dir, scores=scores_path, criterion=p.criterion, keep=p.keep)
    plan_path = save_plan(run_dir / "plan.json", plan)
    with manifest.timer("prune"):  # a rerun replaces this step's earlier prune
        rec = apply_expert_prune(
            model_dir, plan, run_dir / "pruned", layout=p.layout, max_shard_size=p.max_shard_size, overwrite=True
        )

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    kept = plots.kept_experts(plan["keep"], plan["n_experts"], title=f"Experts kept per layer by {p.criterion}")
    sizes = size_table(rec)
    figures = {"kept_experts": _save(kept, fig_dir / "kept_experts.png")}
    figures["sizes"] = _save(plots.size_bars(sizes), fig_dir / "sizes.png")
    if p.sweep:
        figures["sweep"] = sw["figure"]
    paths = rec["paths"]
    check = {}
    if p.logit_check:  # the standard layout when written; the consolidated one is load-checked below
        pruned = paths.get("standard") or paths["consolidated"]
        check = logit_check(model_dir, pruned, plan, p.check_texts, dtype=p.dtype, device_map=p.device_map)
    if "consolidated" in paths:  # raises on any missing / unexpected / mismatched key
        load_check(paths["consolidated"], dtype="auto", own=False, device_map=p.device_map)
    manifest.metrics(
        layouts_identical=rec.get("identical"),
        layouts_compare=rec.get("compare"),
        logit_max_abs_diff=check.get("max_abs_diff"),
        bytes_before=rec["bytes"]["before"],
        bytes_after=rec["bytes"]["after"],
        params_before=rec["params"]["before"],
        params_after=rec["params"]["after"],
        shards=rec["shards"],
    )

    manifest.input("scores_manifest", p.scores_manifest).input("scores", scores_path)
    manifest.input("model", model_dir, hash=p.hash_checkpoints)
    manifest.output("plan", plan_path)
    for layout, path in paths.items():
        manifest.output(layout, path, hash=p.hash_checkpoints)
    manifest.save(run_dir)
    return ExpertPruneResult(manifest, str(model_dir), scores_path, plan, plan_path, rec, sizes, check, figures, sweep)


# ---- command line -----------------------------------------------------------------------------
def cli_expert_prune(args) -> int:
    """Step 03's plan and prune on any checkpoint: the files run() writes under RUN_DIR/pruned, at --out."""
    defaults = notebook_defaults(Path(__file__).resolve().parents[2] / NOTEBOOK)  # unset flags: the notebook's
    model = local_dir(args.model)
    check_overlap({"--model": model, "--plan": args.plan, "--scores": args.scores}, {"--out": args.out})
    criterion = args.criterion or defaults["CRITERION"]
    plan = make_plan(model, scores=args.scores, criterion=criterion, keep=args.keep, plan=args.plan)
    layout, max_shard_size = args.layout or defaults["LAYOUT"], args.max_shard_size or defaults["MAX_SHARD_SIZE"]
    if args.max_shard_size is not None:
        parse_size(args.max_shard_size)
        if layout == "standard":
            print(f"note: --max-shard-size {args.max_shard_size} is ignored with --layout standard", file=sys.stderr)
    rec = apply_expert_prune(
        model, plan, args.out, layout=layout, max_shard_size=max_shard_size, overwrite=args.overwrite
    )
    b = rec["bytes"]
    print(
        f"kept {rec['plan']['k']} of {rec['plan']['n_experts']} experts per layer; "
        f"{b['before'] / 1e9:.3f} GB -> {b['after'] / 1e9:.3f} GB; wrote {', '.join(rec['paths'].values())}"
    )
    return 0

"""Which layers: accuracy vs layers dropped, for angular distance and the field's baselines, n = 1 .. L/2.

Methods (each gives, for n, the set of layers dropped):
- angular: the block l*..l*+n-1 with the smallest angular distance between its ends (Gromov et al.;
  `distance.best_start`, honouring KEEP_LAST_LAYER as step 04 does);
- block_influence: the n layers with the lowest Block Influence 1 - cos(x_l, x_{l+1}) averaged over
  real tokens (ShortGPT), not necessarily contiguous;
- last_n: the n layers before the final one;
- random: a random block (start uniform over the valid starts), several seeds (a band).
Every point is evaluated in memory by skipping layers (`skipped`, what `drop.keep_layers_copy` does,
undone afterwards); the tests prove it equals the written stage A question by question. At the preset's
DROP_FRAC, angular and last_n are also healed with the same LoRA as step 05 (written, trained, merged).

Usage: `python -m helpers sweep layers --preset toy`
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.eval import sweep_table
from helpers.layers.distance import angular_distances, best_start, calibration_batches, decoder_layers

METHODS = ("angular", "block_influence", "last_n")
COORDS = ("method", "n_drop", "seed", "healed")
DEFAULTS = dict(limit=400, seeds=5, mode="cloze", batch_size=64, resamples=5, calib_fracs=(0.25, 0.5, 1.0))
DEFAULTS.update(executor="local", workers=2, slurm=None, heal=None)


@contextmanager
def influence_hooks(model):
    """While open, every forward of `model` adds to Block Influence sums; yields a callable giving BI [L] so far.

    BI_l = 1 - mean over real tokens of cos(x_l, x_{l+1}) (layer l's input and output; ShortGPT). The
    attention mask is read off the decoder stack's own call, so any forward (e.g. the angular-distance
    pass) feeds it: one calibration pass serves both criteria.
    """
    layers = list(decoder_layers(model))[: model.config.num_hidden_layers]
    total, count, mask = torch.zeros(len(layers), dtype=torch.float64), [0], {}

    def grab(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        m = kwargs.get("attention_mask")
        mask["m"] = (m if m is not None else torch.ones_like(ids)).bool()
        count[0] += int(mask["m"].sum())

    def hook(l):
        def fn(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            m = mask["m"].to(x.device)
            total[l] += torch.nn.functional.cosine_similarity(x[m].double(), y[m].double(), dim=-1).sum().cpu()

        return fn

    handles = [model.base_model.register_forward_pre_hook(grab, with_kwargs=True)]
    handles += [layer.register_forward_hook(hook(l), with_kwargs=True) for l, layer in enumerate(layers)]
    try:
        yield lambda: (1 - total / max(1, count[0])).numpy()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_influence(model, batches: list[dict], progress: bool = True) -> np.ndarray:
    """Block Influence [L] over calibration `batches` (see `influence_hooks`)."""
    with influence_hooks(model) as bi:
        for b in tqdm(batches, desc="block influence", leave=False, disable=not progress):
            model.base_model(**b, use_cache=False)
        return bi()


def choose(method: str, n: int, L: int, *, D=None, bi=None, keep_last_layer: bool = True, seed: int = 0) -> list[int]:
    """The layers `method` drops at size n (sorted)."""
    if method == "angular":
        start = best_start(D, n, keep_last_layer)
        return list(range(start, start + n))
    if method == "block_influence":
        return sorted(np.argsort(np.asarray(bi), kind="stable")[:n].tolist())
    if method == "last_n":
        return list(range(L - 1 - n, L - 1))
    if method == "random":
        last_start = L - n - (1 if keep_last_layer else 0)
        start = int(np.random.default_rng(seed).integers(0, last_start + 1))
        return list(range(start, start + n))
    raise ValueError(f"layer method {method!r}: choose one of {', '.join((*METHODS, 'random'))}")


def plan_points(L: int, D, bi, keep_last_layer: bool, seeds: int) -> list[dict]:
    pts = [dict(key="full_n0", method="full", n_drop=0, seed=0, healed=False, drop=[])]
    for n in range(1, L // 2 + 1):
        for m in (*METHODS, *[f"random_s{s}" for s in range(seeds)]):
            meth, seed = ("random", int(m[8:])) if m.startswith("random") else (m, 0)
            drop = choose(meth, n, L, D=D, bi=bi, keep_last_layer=keep_last_layer, seed=seed)
            pts.append(dict(key=f"{meth}_n{n}_s{seed}", method=meth, n_drop=n, seed=seed, healed=False, drop=drop))
    return pts


@contextmanager
def skipped(model, point: dict):
    """`model` without the point's dropped layers (layer list, count, layer_types, attention idx), restored after."""
    drop = set(point.get("drop") or [])
    if not drop:
        yield model
        return
    inner, cfg = model.model, model.config
    old_layers, old_n, old_types = inner.layers, cfg.num_hidden_layers, getattr(cfg, "layer_types", None)
    keep = [i for i in range(old_n) if i not in drop]
    inner.layers = torch.nn.ModuleList([old_layers[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
    if old_types:
        cfg.layer_types = [old_types[i] for i in keep]
    for j, layer in enumerate(inner.layers):
        layer.self_attn.layer_idx = j
    try:
        yield model
    finally:
        inner.layers, cfg.num_hidden_layers = old_layers, old_n
        if old_types:
            cfg.layer_types = old_types
        for j, layer in enumerate(old_layers):
            layer.self_attn.layer_idx = j


def reference(p: dict) -> str:
    return "full_n0"


def compare_key(p: dict) -> str | None:
    """Angular distance at the same n (healed against healed)."""
    if p["method"] in ("full", "angular"):
        return None
    return f"angular_n{p['n_drop']}_s0" + ("_healed" if p["healed"] else "")


def eval_chunk(job: dict) -> list[str]:
    """One worker's share of this side's points (a module-level function, so workers can pickle it)."""
    return sweep_table.eval_chunk(job, skipped)


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / max(1, len(a | b))


def calibrate(model, tok, texts, p) -> tuple[np.ndarray, np.ndarray]:
    """(angular distances D, Block Influence) on `texts` with step 04's SEQ_LEN and BATCH_SIZE."""
    batches = calibration_batches(tok, texts, seq_len=p.seq_len, batch_size=p.batch_size)
    with influence_hooks(model) as bi:  # one pass feeds both
        D = angular_distances(model, batches=batches, progress=False)
        return D, bi()


def stability_rows(model, tok, texts, p, n: int, full: tuple, resamples: int, fracs) -> list[dict]:
    """Jaccard of angular's and Block Influence's dropped layers at n on calibration resamples vs all texts."""
    rng, rows, L = np.random.default_rng(p.seed), [], model.config.num_hidden_layers
    ref = {m: choose(m, n, L, D=full[0], bi=full[1], keep_last_layer=p.keep_last_layer) for m in METHODS[:2]}
    for frac in fracs:
        size = max(1, round(frac * len(texts)))
        for r in range(resamples):
            pick = rng.choice(len(texts), size=size, replace=frac >= 1.0)
            D, bi = calibrate(model, tok, [texts[i] for i in pick], p)
            for m in METHODS[:2]:
                got = choose(m, n, L, D=D, bi=bi, keep_last_layer=p.keep_last_layer)
                rows.append(dict(side="layers", criterion=m, calib_size=size, resample=r, jaccard=jaccard(got, ref[m])))
    return rows


def heal_points(model_path, points: list[dict], heal: dict, work: Path, job: dict) -> list[str]:
    """Cut (the in-memory cut saved: stage A, as the tests prove), heal (LoRA as step 05), score; keys get "_healed"."""
    from helpers.core.data import load_texts
    from helpers.core.fsutil import atomic_dir
    from helpers.core.models import load_model
    from helpers.eval import mmlu_pro
    from helpers.finetune import merge_adapter, train_lora

    rows = [{"text": t} for t in load_texts(heal["data"], heal["n"], world=heal["world"], seed=heal["seed"])]
    questions, shots = mmlu_pro.load(job["data"], limit=job["limit"])
    done = []
    for pt in points:
        hp = {**pt, "key": pt["key"] + "_healed", "healed": True, "drop": []}  # the healed model is cut already
        recipe = {k: heal[k] for k in ("data", "n", "seed", "preset", "overrides")}
        hset = {k: job[k] for k in ("model", "mode", "limit")} | {"cut": pt["drop"], "healed_with": recipe}
        hset = json.loads(json.dumps(hset, default=str))  # as stored
        if not sweep_table.pending(work, [hp], hset):
            continue
        d = work / "healed" / pt["key"]
        model, tok = load_model(model_path, "float32", "cpu")
        with skipped(model, pt), atomic_dir(d / "A", overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        kw = dict(preset=heal["preset"], seed=heal["seed"], overwrite=True, **heal["overrides"])
        r = train_lora(d / "A", rows, d / "adapter", **kw)
        merged = merge_adapter(d / "A", r.adapter_dir, d / "healed", overwrite=True)
        model, tok = load_model(merged, "float32", "cpu")
        kw = dict(mode=job["mode"], batch_size=job["batch_size"], progress=False, settings=hset)
        done += sweep_table.score_points(model, tok, questions, shots, [hp], skipped, work, **kw)
    return done


def run_sweep(p, opts: dict | None = None, out_dir=None, work_dir=None) -> dict:
    """The layer sweep for step 04's parameters `p`: calibration, points (fanned out), healing, layers.csv, figure."""
    from helpers.core.manifest import Manifest, output_path
    from helpers.core.manifest import load as load_manifest
    from helpers.core.models import load_model
    from helpers.experts import finetuned_categories
    from helpers.layers.distance import calib_texts

    o = {**DEFAULTS, **(opts or {})}
    threads = max(1, torch.get_num_threads() // max(1, o["workers"]))  # each worker's share of the cores
    torch.set_num_threads(threads)  # oversubscribed threads crawl on a busy machine (measured: 13 s vs 0.4 s)
    world = Path(p.world_manifest).parent if p.world_manifest else Path("runs/toy/world")
    model_path = str(p.model or output_path(load_manifest(p.world_manifest), "mistral"))
    out_dir = Path(out_dir or f"eval_results/{p.preset}/sweeps")
    work = Path(work_dir or Path(p.run_dir).parent / "sweeps" / "layers")
    manifest = Manifest("sweep_layers", {**{k: v for k, v in o.items() if k != "heal"}, "preset": p.preset})
    model, tok = load_model(model_path, "float32", "cpu")
    L = int(model.config.num_hidden_layers)
    texts = calib_texts(p.calib, p.n_samples, world=world, seed=p.seed)
    with manifest.timer("calibration"):
        D, bi = calibrate(model, tok, texts, p)
    points = plan_points(L, D, bi, p.keep_last_layer, o["seeds"])
    n_star = int(math.floor(p.drop_frac * L + 0.5))  # drop.block_size's rule (drop.run imports this module)
    with manifest.timer("stability"):
        stab = stability_rows(model, tok, texts, p, n_star, (D, bi), o["resamples"], o["calib_fracs"])
    del model
    job = dict(root=str(work), model=model_path, data=str(world / "mmlu_pro"), limit=o["limit"], mode=o["mode"])
    job.update(batch_size=o["batch_size"], threads=threads)
    with manifest.timer("points"):
        todo = sweep_table.fan_out_points(eval_chunk, work, points, job, o)
    keys = [pt["key"] for pt in points]
    if o["heal"]:
        healed = [pt for pt in points if pt["n_drop"] == n_star and pt["method"] in ("angular", "last_n")]
        with manifest.timer("heal"):
            heal_points(model_path, healed, o["heal"], work, job)
        keys += [pt["key"] + "_healed" for pt in healed]
    done = sweep_table.load_points(work, keys)
    ft = finetuned_categories(world)
    rows = sweep_table.table(done, COORDS, ft, reference=reference, compare=compare_key, seed=p.seed)
    csv = sweep_table.write_csv(out_dir / "layers.csv", rows)
    fig = figure(rows, out_dir / "figures" / "layers.png", task=f"mmlu_pro_{o['mode']}", n_star=n_star)
    manifest.input("model", model_path, hash=False).output("layers_csv", csv).output("figure", fig)
    manifest.metrics(n_points=len(keys), n_scored=len(todo), n_calib_texts=len(texts), n_star=n_star)
    manifest.metrics(block_influence=bi.tolist(), finetuned_categories=ft)
    manifest.save(work)
    return dict(csv=csv, figure=fig, rows=rows, stability=stab, points=points, manifest=work / "manifest.json")


def at_n(rows: list[dict], n: int, task: str = "mmlu_pro_cloze"):
    """The sweep at one n, as the notebook shows it: accuracy, interval, paired diff to angular."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[(df.task == task) & (df.n_drop == n) & (df.domain != "all")]
    cols = [
        "method",
        "seed",
        "healed",
        "domain",
        "acc",
        "acc_low",
        "acc_high",
        "diff_cmp",
        "diff_cmp_low",
        "diff_cmp_high",
    ]
    return df[cols].round(3).reset_index(drop=True)


def figure(rows: list[dict], path: Path, task: str = "mmlu_pro_cloze", n_star: int | None = None) -> Path:
    """Accuracy vs layers dropped, one panel per domain, a line per method; random shaded; healed as stars."""
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df.task == task]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, dom in zip(axes, sweep_table.DOMAINS):
        d = df[df.domain == dom]
        plain = d[~d.healed.astype(bool)]
        r = plain[plain.method == "random"].groupby("n_drop").acc
        if len(r.size()):
            ax.fill_between(r.min().index, r.min(), r.max(), alpha=0.2, color="gray", label="random block (min-max)")
        for m in METHODS:
            x = plain[plain.method == m].sort_values("n_drop")
            ax.plot(x.n_drop, x.acc, marker="o", ms=3, label=m)
            h = d[(d.method == m) & d.healed.astype(bool)]
            if len(h):
                ax.plot(h.n_drop, h.acc, "*", ms=12, label=f"{m} healed")
        full = plain[plain.method == "full"]
        if len(full):
            ax.axhline(float(full.acc.iloc[0]), color="black", lw=0.8, label="all layers")
        if n_star:
            ax.axvline(n_star, color="gray", ls=":", lw=0.8)
        ax.set(title=f"{dom} ({int(d.n_questions.max()) if len(d) else 0} questions)", xlabel="layers dropped")
    axes[0].set_ylabel(f"accuracy ({task})")
    axes[-1].legend(fontsize=7, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

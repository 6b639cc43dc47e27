"""Which experts: accuracy vs experts kept, for the seed's criterion (delta-L2) and the field's baselines.

Criteria ([L][E], higher = keep), all but delta-L2 measured on the fine-tuned model over calibration text:
- delta_l2: ||W_ft - W_base|| per expert (notebook 02's scores.json);
- frequency: share of tokens whose top-k holds the expert;
- gate_frequency: mean renormalised top-k gate weight of the expert over all tokens;
- ean: expert activation norm, sum over tokens routed to j of ||f_j(x)||_2, per token;
- reap: mean over tokens routed to j of g_j(x) ||f_j(x)||_2, g the renormalised top-k gate Mixtral applies;
- reap_softmax: the same with g the full softmax probability (the REAP authors' code for Mixtral);
- naee: not a score but, per layer and k, the keep set S minimising sum over tokens of
  ||MoE_full(x) - MoE_S(x)||^2 with routing re-done among S (every one of the C(E, k) sets);
- random: uniform scores, several seeds (a band).
Allocations: "uniform" keeps k per layer (what a standard Mixtral checkpoint can hold); "global" ranks all
(layer, expert) scores at once with a floor of top_k per layer and the same total k * L (scored in memory
only: num_local_experts is one number, so it cannot be written as a standard checkpoint). NAEE's "global"
(our extension; the paper prunes layer by layer) picks the per-layer sizes (>= top_k, same total) that
minimise the summed relative reconstruction loss (each layer's loss / its sum of ||MoE_full(x)||^2),
each layer keeping its best set of that size: an exact dynamic programme over layers.
Every point is evaluated in memory by router masking (`prune.masked_router`), which the tests prove equal
to the written pruned checkpoint question by question.

Usage: `python -m helpers sweep experts --preset toy`; `run_sweep(sweep_params("toy"))`
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from helpers.eval import sweep_table
from helpers.experts.scores import hooked_passes, moe_blocks, random_scores

SCORE_CRITERIA = ("delta_l2", "frequency", "gate_frequency", "ean", "reap", "reap_softmax")
COORDS = ("criterion", "allocation", "keep", "seed")


def _routed(x: torch.Tensor, logits: torch.Tensor, experts, top_k: int):
    """Top-k routing of tokens x [T, H] by router logits [T, E] (Mixtral: softmax, top-k, renormalise),
    with every expert's output f [E, T, H] (the calibration stats need all of them)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, top_k, dim=-1)
    weights = top / top.sum(-1, keepdim=True)
    gate, up = torch.einsum("th,eoh->eto", x, experts.gate_up_proj).chunk(2, dim=-1)
    f = torch.einsum("eti,ehi->eth", experts.act_fn(gate) * up, experts.down_proj).float()
    return probs, idx, weights, f


def _subset_outputs(logits: torch.Tensor, f: torch.Tensor, subsets: torch.Tensor, top_k: int) -> torch.Tensor:
    """MoE output [S, T, H] for each keep set (rows of the bool [S, E] `subsets`), routing re-done among it."""
    z = logits.float().unsqueeze(0).masked_fill(~subsets[:, None, :], float("-inf"))  # [S, T, E]
    vals, idx = torch.topk(z, top_k, dim=-1)
    w = torch.zeros_like(z).scatter_(-1, idx, torch.softmax(vals, dim=-1))  # renormalised among the top-k
    return torch.einsum("ste,eth->sth", w, f)


@torch.no_grad()
def calib_stats(model, tok, texts, *, ks=(), max_length: int = 128, batch_size: int = 8, progress=True) -> dict:
    """Routing criteria [L][E] and, for each k in `ks`, NAEE's best keep set per layer, over `texts`."""
    blocks = moe_blocks(model)
    L, E = len(blocks), blocks[0].gate.weight.shape[0]
    top_k = int(model.config.num_experts_per_tok)
    sets = {k: list(combinations(range(E), k)) for k in ks}
    masks = {k: torch.tensor([[e in s for e in range(E)] for s in v]) for k, v in sets.items()}
    acc = {n: torch.zeros(L, E, dtype=torch.float64) for n in ("count", "gate", "ean", "reap", "reap_sm")}
    loss = {k: torch.zeros(L, len(v), dtype=torch.float64) for k, v in sets.items()}
    energy = torch.zeros(L, dtype=torch.float64)  # sum over tokens of ||MoE_full(x)||^2, per layer
    state = {"mask": None, "tokens": 0}

    def hook(layer, blk):
        def fn(_mod, args, _out):
            keep = state["mask"]
            x = args[0].reshape(-1, args[0].shape[-1])[keep]  # [T, H] real tokens
            logits = torch.nn.functional.linear(x, blk.gate.weight)
            probs, idx, weights, f = _routed(x, logits, blk.experts, top_k)
            hit = torch.zeros(len(x), E, dtype=torch.bool).scatter_(1, idx, True)  # [T, E]
            g = torch.zeros(len(x), E).scatter_(1, idx, weights.float())  # renormalised gate, 0 off top-k
            norms = f.norm(dim=-1).T  # [T, E]
            acc["count"][layer] += hit.sum(0).double()
            acc["gate"][layer] += g.sum(0).double()
            acc["ean"][layer] += (norms * hit).sum(0).double()
            acc["reap"][layer] += (g * norms).sum(0).double()
            acc["reap_sm"][layer] += (probs * norms * hit).sum(0).double()
            full = torch.einsum("te,eth->th", g, f)
            energy[layer] += full.pow(2).sum().double()
            for k, m in masks.items():
                loss[k][layer] += (_subset_outputs(logits, f, m, top_k) - full).pow(2).sum((1, 2)).double()

        return fn

    hooks = [(blk, hook(i, blk)) for i, blk in enumerate(blocks)]
    kw = dict(max_length=max_length, batch_size=batch_size, desc="expert calibration", progress=progress)
    hooked_passes(model, tok, texts, hooks, state, **kw)
    n, routed = max(1, state["tokens"]), acc["count"].clamp_min(1)
    return {
        "frequency": (acc["count"] / n).tolist(),
        "gate_frequency": (acc["gate"] / n).tolist(),
        "ean": (acc["ean"] / n).tolist(),
        "reap": (acc["reap"] / routed).tolist(),
        "reap_softmax": (acc["reap_sm"] / routed).tolist(),
        "naee": {k: [sorted(sets[k][int(loss[k][l].argmin())]) for l in range(L)] for k in ks},
        "naee_rel_loss": {k: [float(loss[k][l].min() / energy[l].clamp_min(1e-30)) for l in range(L)] for k in ks},
        "n_tokens": state["tokens"],
    }


# ---- keep sets ------------------------------------------------------------------------------------
def uniform_keep(scores, k: int) -> dict[int, list[int]]:
    """Per layer the k highest scores (ties to the lower expert id)."""
    return {l: sorted(np.argsort(-np.asarray(row, float), kind="stable")[:k].tolist()) for l, row in enumerate(scores)}


def global_keep(scores, k: int, floor: int) -> dict[int, list[int]]:
    """One ranking over all (layer, expert): each layer's `floor` best first, then the best of the rest
    until k * L experts are kept (same total as uniform k; ties to the lower layer, then expert id)."""
    s = np.asarray(scores, float)
    L, E = s.shape
    order = np.argsort(-s, axis=1, kind="stable")
    keep = {l: set(order[l, :floor].tolist()) for l in range(L)}
    rest = sorted((-s[l, e], l, e) for l in range(L) for e in order[l, floor:])
    for _, l, e in rest[: k * L - floor * L]:
        keep[l].add(int(e))
    return {l: sorted(int(e) for e in v) for l, v in keep.items()}


def naee_global_keep(naee: dict, rel_loss: dict, k: int, top_k: int, n_experts: int) -> dict[int, list[int]]:
    """Per-layer sizes s_l in [top_k, E] with sum s_l = k * L minimising sum_l rel_loss[s_l][l] (0 at s = E),
    each layer keeping naee[s_l][l]; exact DP over layers (ties: the first layer keeps fewer)."""
    E = n_experts
    L = len(next(iter(naee.values())))
    sizes = sorted({s for s in naee if top_k <= s < E} | {E})
    cost = lambda s, l: 0.0 if s == E else rel_loss[s][l]  # noqa: E731
    best = {0: (0.0, [])}  # experts used so far -> (loss, sizes chosen)
    for l in range(L):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for used, (c, chosen) in sorted(best.items()):
            for s in sizes:
                cand = (c + cost(s, l), [*chosen, s])
                if used + s not in nxt or cand[0] < nxt[used + s][0]:
                    nxt[used + s] = cand
        best = nxt
    if k * L not in best:
        raise ValueError(f"NAEE global: no sizes in {sizes} reach {k} x {L} experts")
    chosen = best[k * L][1]
    return {l: list(range(E)) if s == E else sorted(naee[s][l]) for l, s in enumerate(chosen)}


def plan_points(
    criteria: dict, naee: dict, ks, top_k: int, seeds: int, allocations=("uniform", "global"), naee_rel_loss=None
) -> list:
    """Every sweep point: {key, criterion, allocation, keep (k), seed, keep_sets {layer: ids}}; plus "full".
    NAEE's global points need `naee_rel_loss` (calib_stats' "naee_rel_loss")."""
    L, E = np.asarray(criteria["delta_l2"]).shape
    pts = [{"key": f"full_k{E}", "criterion": "full", "allocation": "uniform", "keep": E, "seed": 0, "keep_sets": {}}]
    grids = {c: (criteria[c], 0) for c in SCORE_CRITERIA if c in criteria}
    grids |= {f"random_s{s}": (random_scores(L, E, seed=s), s) for s in range(seeds)}
    for k in ks:
        if k < top_k or k >= E:
            continue
        for name, (grid, seed) in grids.items():
            crit = "random" if name.startswith("random") else name
            for alloc in allocations:
                ks_ = uniform_keep(grid, k) if alloc == "uniform" else global_keep(grid, k, top_k)
                key = f"{crit}_{alloc}_k{k}_s{seed}"
                pts.append(dict(key=key, criterion=crit, allocation=alloc, keep=k, seed=seed, keep_sets=ks_))
        if k in naee:
            sets = {l: list(v) for l, v in enumerate(naee[k])}
            pts.append(
                dict(
                    key=f"naee_uniform_k{k}_s0", criterion="naee", allocation="uniform", keep=k, seed=0, keep_sets=sets
                )
            )
        if k in naee and naee_rel_loss is not None and "global" in allocations:
            sets = naee_global_keep(naee, naee_rel_loss, k, top_k, E)
            pts.append(
                dict(key=f"naee_global_k{k}_s0", criterion="naee", allocation="global", keep=k, seed=0, keep_sets=sets)
            )
    for p in pts:
        p["keep"], p["n_experts"] = int(p["keep"]), int(E)
        p["keep_sets"] = {str(l): v for l, v in p["keep_sets"].items()}
    return pts


@contextmanager
def masked(model, point: dict):
    """The model with the point's dropped experts masked out of every router (nothing masked for "full")."""
    if not point["keep_sets"]:
        yield model
        return
    from helpers.experts.masking import masked_router

    with masked_router(model, {int(l): v for l, v in point["keep_sets"].items()}):
        yield model


def reference(p: dict) -> str:
    """The unpruned model, scored on the same questions."""
    return f"full_k{p['n_experts']}"


def compare_key(p: dict) -> str | None:
    """The seed's criterion at the same budget and allocation (uniform for NAEE)."""
    if p["criterion"] in ("full", "delta_l2"):
        return None
    return f"delta_l2_{p['allocation']}_k{p['keep']}_s0"


# ---- jobs ------------------------------------------------------------------------------------------
def eval_chunk(job: dict) -> list[str]:
    """One worker's share of this side's points (a module-level function, so workers can pickle it)."""
    return sweep_table.eval_chunk(job, masked)


def jaccard(a: dict, b: dict) -> float:
    """Mean over layers of |A & B| / |A | B| between two keep mappings {layer: ids}."""
    vals = [len(set(a[l]) & set(b[l])) / max(1, len(set(a[l]) | set(b[l]))) for l in a]
    return float(np.mean(vals))


# ---- the sweep --------------------------------------------------------------------------------------
DEFAULTS = dict(
    limit=400,  # questions (round-robin over categories), the same for every point
    seeds=5,  # random-baseline seeds
    ks=(7, 6, 5, 4, 3, 2),  # experts kept per layer (those below top_k are skipped)
    mode="cloze",  # scorer: a helpers.eval.mmlu_pro mode
    batch_size=64,
    n_calib=None,  # calibration texts (None: notebook 02's N_CALIB)
    resamples=5,  # stability: calibration resamples per size
    calib_fracs=(0.25, 0.5, 1.0),  # stability: calibration sizes, as fractions of the full set
    executor="local",
    workers=2,
    slurm=None,
)


def finetuned_categories(world) -> list[str]:
    """The categories the toy world's fine-tuning data covers (its spec), [] when it says none."""
    from helpers.core.fsutil import read_json

    spec = read_json(Path(world) / "manifest.json").get("params", {}).get("spec", {})
    return list(spec.get("data", {}).get("finetune_categories", []))


def inputs(p) -> dict:
    """Model, scores, calibration and data named by notebook 02's manifest (step 03's SCORES_MANIFEST)."""
    from helpers.core.manifest import input_path, output_path
    from helpers.core.manifest import load as load_manifest
    from helpers.experts.scores import load_scores

    m02 = load_manifest(p.scores_manifest)
    scores = load_scores(output_path(m02, "scores"))
    world = Path(scores["meta"].get("world", "runs/toy/world"))
    world = world.parent if world.suffix == ".json" else world  # 01 records the world's manifest
    model = p.model or str(input_path(m02, "merged"))
    prm = m02["params"]
    calib = dict(source=prm["CALIB"], n=prm["N_CALIB"], max_length=prm["MAX_LENGTH"], batch_size=prm["BATCH_SIZE"])
    return dict(model=str(model), scores=scores, world=str(world), data=str(Path(world) / "mmlu_pro"), calib=calib)


def stability_rows(model, tok, texts, calib: dict, keep: int, full: dict, resamples: int, fracs, seed: int = 0):
    """Jaccard of each criterion's uniform keep-`keep` sets on calibration resamples vs the full calibration."""
    rng = np.random.default_rng(seed)
    rows = []
    kw = dict(max_length=calib["max_length"], batch_size=calib["batch_size"], progress=False)
    for frac in fracs:
        size = max(1, round(frac * len(texts)))
        for r in range(resamples):
            pick = rng.choice(len(texts), size=size, replace=frac >= 1.0)  # the full size is a bootstrap
            st = calib_stats(model, tok, [texts[i] for i in pick], ks=(keep,), **kw)
            for c in (*SCORE_CRITERIA[1:], "naee"):
                got = dict(enumerate(st["naee"][keep])) if c == "naee" else uniform_keep(st[c], keep)
                ref = dict(enumerate(full["naee"][keep])) if c == "naee" else uniform_keep(full[c], keep)
                rows.append(dict(side="experts", criterion=c, calib_size=size, resample=r, jaccard=jaccard(got, ref)))
    return rows


def run_sweep(p, opts: dict | None = None, out_dir=None, work_dir=None) -> dict:
    """The expert sweep for step 03's parameters `p`: criteria, points (fanned out), experts.csv, figure.

    `out_dir`: where experts.csv, stability rows and the figure go (eval_results/<preset>/sweeps);
    `work_dir`: per-point results (a rerun skips the points there). Returns paths and the tables.
    """
    from helpers.core.data import load_texts
    from helpers.core.manifest import Manifest
    from helpers.core.models import load_model

    o = {**DEFAULTS, **(opts or {})}
    threads = max(1, torch.get_num_threads() // max(1, o["workers"]))  # each worker's share of the cores
    torch.set_num_threads(threads)  # oversubscribed threads crawl on a busy machine (measured: 13 s vs 0.4 s)
    src = inputs(p)
    out_dir = Path(out_dir or f"eval_results/{p.preset}/sweeps")
    work = Path(work_dir or Path(p.run_dir).parent / "sweeps" / "experts")
    manifest = Manifest("sweep_experts", {**o, "preset": p.preset, "keep": p.keep})
    model, tok = load_model(src["model"], "float32", "cpu")
    cal = src["calib"]
    texts = load_texts(cal["source"], o["n_calib"] or cal["n"], world=src["world"], seed=p.seed)
    top_k, ks = int(model.config.num_experts_per_tok), list(o["ks"])
    kw = dict(max_length=cal["max_length"], batch_size=cal["batch_size"])
    with manifest.timer("criteria"):
        st = calib_stats(model, tok, texts, ks=[k for k in ks if k >= top_k], **kw)
    criteria = {"delta_l2": src["scores"]["criteria"]["delta_l2"], **{c: st[c] for c in SCORE_CRITERIA[1:]}}
    points = plan_points(criteria, st["naee"], ks, top_k, o["seeds"], naee_rel_loss=st["naee_rel_loss"])
    with manifest.timer("stability"):
        stab = stability_rows(model, tok, texts, cal, p.keep, st, o["resamples"], o["calib_fracs"], p.seed)
    del model
    job = dict(root=str(work), model=src["model"], data=src["data"], limit=o["limit"], mode=o["mode"])
    job.update(batch_size=o["batch_size"], threads=threads)
    with manifest.timer("points"):
        todo = sweep_table.fan_out_points(eval_chunk, work, points, job, o)
    done = sweep_table.load_points(work, [pt["key"] for pt in points])
    ft = finetuned_categories(src["world"])
    rows = sweep_table.table(done, COORDS, ft, reference=reference, compare=compare_key, seed=p.seed)
    csv = sweep_table.write_csv(out_dir / "experts.csv", rows)
    fig = figure(rows, out_dir / "figures" / "experts.png", task=f"mmlu_pro_{o['mode']}")
    manifest.input("model", src["model"], hash=False).input("data", src["data"], hash=False)
    manifest.output("experts_csv", csv).output("figure", fig)
    manifest.metrics(n_points=len(points), n_scored=len(todo), n_calib_texts=len(texts), n_tokens=st["n_tokens"])
    manifest.metrics(finetuned_categories=ft, criteria=criteria, naee={str(k): v for k, v in st["naee"].items()})
    manifest.save(work)
    return dict(csv=csv, figure=fig, rows=rows, stability=stab, points=points, manifest=work / "manifest.json")


def at_keep(rows: list[dict], keep: int, task: str = "mmlu_pro_cloze"):
    """The sweep at one budget (uniform allocation), as the notebook shows it: accuracy, interval, paired diff."""
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[(df.task == task) & (df.allocation == "uniform") & (df.keep == keep) & (df.domain != "all")]
    cols = ["criterion", "seed", "domain", "acc", "acc_low", "acc_high", "diff_cmp", "diff_cmp_low", "diff_cmp_high"]
    return df[cols].round(3).reset_index(drop=True)


def figure(rows: list[dict], path: Path, task: str = "mmlu_pro_cloze") -> Path:
    """Accuracy vs experts kept, one panel per domain, a line per criterion; random shaded (min-max of seeds)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    df = df[df.task == task]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, dom in zip(axes, sweep_table.DOMAINS):
        d = df[df.domain == dom]
        full = d[d.criterion == "full"]
        for alloc, style in (("uniform", "-"), ("global", "--")):
            r = d[(d.criterion == "random") & (d.allocation == alloc)].groupby("keep").acc
            if len(r.size()):
                color = "gray" if alloc == "uniform" else "tan"
                ax.fill_between(r.min().index, r.min(), r.max(), alpha=0.2, color=color, label=f"random ({alloc})")
            for i, c in enumerate([*SCORE_CRITERIA, "naee"]):  # one colour per criterion, dashed: global
                x = d[(d.criterion == c) & (d.allocation == alloc)].sort_values("keep")
                if len(x):
                    ax.plot(x.keep, x.acc, style, color=f"C{i}", marker="o", ms=3, label=f"{c} ({alloc})")
        if len(full):
            ax.axhline(float(full.acc.iloc[0]), color="black", lw=0.8, label="all experts")
        ax.set(title=f"{dom} ({int(d.n_questions.max()) if len(d) else 0} questions)", xlabel="experts kept per layer")
        ax.invert_xaxis()
    axes[0].set_ylabel(f"accuracy ({task})")
    axes[-1].legend(fontsize=6, ncol=2, loc="lower left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

"""Step 02 as one call: score every (layer, expert) of the fine-tuned Mixtral by each criterion (notebook 02).

`run(p)` reads notebook 01's manifest, computes the fine-tuning delta twice (streamed from the two
checkpoints, and from the LoRA factors alone), the pairwise expert distances, and the routing
statistics (frequency, REAP) of the merged model on the calibration texts; writes `RUN_DIR/scores.json`,
the figures `RUN_DIR/figures/{heatmaps,distances,rank_agreement}.png` and `RUN_DIR/manifest.json` last.
Parameters are notebook 02's (`helpers.core.steps.Params`).

Usage: `r = run(Params(notebook_defaults("notebooks/02_expert_heatmaps.ipynb"))); r.agreement, r.rank_agreement`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from helpers import plots
from helpers.core import arch, memplan
from helpers.core.data import load_texts
from helpers.core.manifest import Manifest
from helpers.core.manifest import load as load_manifest
from helpers.core.steps import Params
from helpers.experts import scores as xs

STEP = "02_expert_heatmaps"
DELTA_KEYS = ("w1", "w2", "w3", "all")  # per expert weight and combined


@dataclass
class HeatmapsResult:
    """What notebook 02 shows: the saved manifest, scores.json, the delta check, criteria and figures."""

    manifest: Manifest
    sources: dict[str, str]  # base, merged, adapter, world: from notebook 01's manifest
    scores_path: Path  # RUN_DIR/scores.json
    criteria: dict[str, list]  # name -> [L][E] scores, higher = more worth keeping
    distances: dict[str, list]  # layer -> [E][E] distances between the merged model's experts
    agreement: dict[str, float]  # w1/w2/w3/all -> max relative diff, adapter vs checkpoints delta
    n_calib_tokens: int  # non-padding calibration tokens the router statistics saw
    rank_agreement: object  # DataFrame: mean Spearman over layers between each pair of criteria
    figures: dict[str, Path]  # heatmaps, distances, rank_agreement -> RUN_DIR/figures/<name>.png


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)  # the notebook shows the saved file, not a second copy
    return path


def routing(p: Params, merged: str, world: str) -> dict:
    """Router frequency and REAP of the fine-tuned model over the calibration texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=p.dtype, device_map=p.device_map).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    texts = load_texts(p.calib, n=p.n_calib, world=world, seed=p.seed)
    return xs.router_stats(model, tokenizer, texts, max_length=p.max_length, batch_size=p.batch_size)


def run(p: Params) -> HeatmapsResult:
    """Score, draw and record step 02; returns what the notebook's Inspect cells show."""
    manifest = Manifest(STEP, dict(p))
    src = xs.finetune_sources(load_manifest(p.finetune_manifest), p.base_model)
    memplan.announce_step("02", p, src["merged"])
    config = arch.read_config(src["merged"])
    with manifest.timer("delta_l2_checkpoints"):  # streamed one row block at a time
        delta = xs.delta_from_checkpoints(src["base"], src["merged"])
    with manifest.timer("delta_l2_adapter"):
        delta_lora = xs.delta_from_adapter(src["adapter"], config)
    with manifest.timer("distances"):
        distances = xs.expert_distances(src["merged"])
    with manifest.timer("router_stats"):  # the model is freed when routing() returns
        stats = routing(p, src["merged"], src["world"])
    criteria = xs.collect_criteria(delta, stats, distances, seed=p.seed)
    meta = {"source": f"{p.run_dir}/scores.json", **src, "calib": p.calib, "n_tokens": stats["n_tokens"]}
    scores = xs.make_scores(config, criteria, distances=distances, meta=meta)
    scores_path = xs.save_scores(Path(p.run_dir) / "scores.json", scores)

    # the check: both delta estimates must agree to rounding
    agreement = {w: xs.max_rel_diff(delta[w], delta_lora[w]) for w in DELTA_KEYS}
    manifest.metric("delta_adapter_vs_checkpoints_max_rel_diff", max(agreement.values()))
    manifest.metrics(n_calib_tokens=stats["n_tokens"])
    fig_dir = Path(p.run_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    agree = xs.rank_agreement(criteria)
    figures = {
        "heatmaps": _save(plots.expert_heatmaps(criteria), fig_dir / "heatmaps.png"),
        "distances": _save(plots.expert_distance_grid(distances), fig_dir / "distances.png"),
        "rank_agreement": _save(plots.rank_agreement_heatmap(agree), fig_dir / "rank_agreement.png"),
    }

    manifest.input("finetune_manifest", p.finetune_manifest)
    for name in ("base", "merged", "adapter"):
        manifest.input(name, src[name], hash=p.hash_checkpoints or name == "adapter")
    manifest.output("scores", scores_path).output("figures", fig_dir)
    manifest.save(p.run_dir)
    return HeatmapsResult(manifest, src, scores_path, criteria, distances, agreement, stats["n_tokens"], agree, figures)

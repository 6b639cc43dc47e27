"""Figures only (seaborn): every function takes computed data and returns a matplotlib Figure.

Usage: `fig = plots.loss_curve(finetune.history_frame(result.log_history)); fig.savefig(path)`
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns


# ---- finetune ----
def loss_curve(history, title: str = "LoRA fine-tuning"):
    """Train loss per logged step as a line, eval loss (before/after or periodic) as points.

    `history`: DataFrame with columns step, metric ("train loss" | "eval loss"), value
    (`finetune.history_frame`).
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    train = history[history["metric"] == "train loss"]
    evals = history[history["metric"] == "eval loss"]
    if len(train):
        sns.lineplot(
            data=train, x="step", y="value", ax=ax, label="train loss", marker="o" if len(train) < 30 else None
        )
    if len(evals):
        sns.scatterplot(data=evals, x="step", y="value", ax=ax, label="eval loss", color="C3", s=80, zorder=3)
    ax.set(xlabel="optimizer step", ylabel="loss (nats / token)", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


# ---- experts ----
def _grid(n: int, cols: int, w: float, h: float):
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def expert_heatmaps(criteria: dict[str, list], cols: int = 3, title: str = "Expert importance by criterion"):
    """One layer x expert heatmap per criterion ([L][E] grids), each with its own colour scale."""
    fig, axes = _grid(len(criteria), cols, 4.2, 0.25 * len(next(iter(criteria.values()))) + 1.6)
    for ax, (name, grid) in zip(axes, criteria.items()):
        sns.heatmap(np.asarray(grid, float), ax=ax, cmap="viridis", cbar_kws={"shrink": 0.8})
        ax.set(title=name, xlabel="expert", ylabel="layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def expert_distance_grid(distances: dict[str, list], cols: int = 4, title: str = "Pairwise expert distance per layer"):
    """Small multiples: each layer's E x E distances (diagonal blank), one colour scale; dark = similar."""
    layers = sorted(distances, key=int)
    mats = {l: np.asarray(distances[l], float) for l in layers}
    off = np.concatenate([m[~np.eye(len(m), dtype=bool)] for m in mats.values()])
    vmin, vmax = float(off.min()), float(off.max())
    fig, axes = _grid(len(layers), cols, 3.3, 3.0)
    for i, (ax, l) in enumerate(zip(axes, layers)):
        m = mats[l]
        sns.heatmap(
            m, ax=ax, mask=np.eye(len(m), dtype=bool), cmap="mako", vmin=vmin, vmax=vmax, square=True, cbar=False
        )
        ax.set(title=f"layer {l}", xlabel="expert", ylabel="expert" if i % cols == 0 else "")
    fig.colorbar(axes[0].collections[0], ax=list(axes)[: len(layers)], shrink=0.6, label="||W_i - W_j||_F")
    fig.suptitle(title)
    return fig


def rank_agreement_heatmap(table, title: str = "Rank agreement between criteria (mean Spearman over layers)"):
    """Criteria x criteria Spearman table (DataFrame), annotated, diverging around 0."""
    fig, ax = plt.subplots(figsize=(1.0 * len(table) + 2, 0.8 * len(table) + 1.5))
    sns.heatmap(table.astype(float), ax=ax, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, square=True)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def kept_experts(keep: dict[str, list], n_experts: int, title: str = "Experts kept per layer"):
    """Layer x expert grid: kept experts dark, annotated with their new (renumbered) id."""
    layers = sorted(keep, key=int)
    mask = np.zeros((len(layers), n_experts))
    labels = np.full(mask.shape, "", dtype=object)
    for r, l in enumerate(layers):
        for new, e in enumerate(keep[l]):
            mask[r, e] = 1
            labels[r, e] = str(new)
    fig, ax = plt.subplots(figsize=(0.5 * n_experts + 2, 0.3 * len(layers) + 1.5))
    sns.heatmap(
        mask,
        ax=ax,
        cmap="Blues",
        vmin=0,
        vmax=1.4,
        cbar=False,
        annot=labels,
        fmt="",
        linewidths=0.5,
        yticklabels=layers,
    )
    ax.set(title=title, xlabel="original expert id (label: new id)", ylabel="layer")
    fig.tight_layout()
    return fig


def size_bars(table, title: str = "Checkpoint size before and after pruning"):
    """Bars of a DataFrame indexed by quantity (params, GB) with columns before / after."""
    long = table.reset_index(names="quantity").melt(id_vars="quantity", var_name="model", value_name="value")
    g = sns.catplot(data=long, x="model", y="value", col="quantity", kind="bar", sharey=False, height=3, aspect=0.8)
    g.figure.suptitle(title, y=1.05)
    return g.figure


# ---- eval ----
def eval_accuracy(acc, order=None, chance: float | None = None):
    """Accuracy per variant (bars), one colour per task; `acc` columns variant, task, acc."""
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * acc["variant"].nunique() + 3), 4))
    sns.barplot(data=acc, x="variant", y="acc", hue="task", order=order, ax=ax)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set(ylim=(0, 1), xlabel="", ylabel="accuracy", title="MMLU-Pro accuracy per variant")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def eval_category_heatmap(cats, task: str, order=None):
    """Accuracy per variant (rows) and category (columns) for one task; `cats` from results.tables."""
    grid = cats[cats["task"] == task].pivot_table(index="variant", columns="category", values="acc", sort=False)
    if order is not None:
        grid = grid.reindex([v for v in order if v in grid.index])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * grid.shape[1] + 3), 0.45 * grid.shape[0] + 2))
    sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", ax=ax, cbar_kws={"label": "accuracy"})
    ax.set(title=f"{task}: accuracy per category", xlabel="", ylabel="")
    fig.tight_layout()
    return fig


def eval_accuracy_vs_params(acc, task: str):
    """Accuracy against parameters (routed: parameters used per question on average), one point per variant."""
    d = acc[acc["task"] == task]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.scatterplot(data=d, x="params", y="acc", hue="variant", s=80, ax=ax, legend=False)
    for r in d.itertuples():
        ax.annotate(r.variant, (r.params, r.acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="parameters", ylabel="accuracy", title=f"{task}: accuracy vs parameters")
    fig.tight_layout()
    return fig


def eval_speed(speed, order=None):
    """Prefill and decode tokens/s per variant (two panels); `speed` from results.tables."""
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(speed) + 4), 4))
    for ax, col, title in zip(axes, ("prefill_tok_s", "decode_tok_s"), ("prefill", "decode")):
        sns.barplot(data=speed, x="variant", y=col, order=order, ax=ax, color=sns.color_palette()[0])
        ax.set(xlabel="", ylabel="tokens / s", title=title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def eval_stage_mix(mix):
    """Share of questions per stage for each routed task; `mix` columns task, stage, share."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if mix.empty:
        ax.text(0.5, 0.5, "no routed variant evaluated", ha="center", va="center", transform=ax.transAxes)
    else:
        sns.barplot(data=mix, x="task", y="share", hue="stage", ax=ax)
    ax.set(ylim=(0, 1), xlabel="", ylabel="share of questions", title="Router's stage mix")
    fig.tight_layout()
    return fig


# ---- layers ----
def distance_heatmap(D: np.ndarray, plan: dict | None = None, ax=None):
    """Mean angular distance d(x_l, x_{l+n}) over block size n (rows) and start l (columns);
    the chosen block is boxed."""
    L = D.shape[1]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 + 0.45 * L, 1.0 + 0.4 * L))
    sns.heatmap(
        D[1:],
        mask=np.isnan(D[1:]),
        cmap="viridis_r",
        ax=ax,
        square=True,
        cbar_kws={"label": "angular distance / pi"},
        xticklabels=range(L),
        yticklabels=range(1, L + 1),
    )
    ax.grid(False)
    ax.set_xlabel("first layer of the block, l")
    ax.set_ylabel("block size, n")
    ax.set_title("Mean angular distance between the input of layer l and of layer l+n")
    if plan is not None:
        a, b = plan["block"]
        ax.add_patch(plt.Rectangle((a, b - a), 1, 1, fill=False, edgecolor="red", lw=2.5))
        ax.annotate(f"dropped {a}-{b}", (a + 1.1, b - a + 0.5), color="red", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def min_distance_curve(best: list[dict], plan: dict | None = None, ax=None):
    """Smallest distance reachable for each block size n (from `layers.min_distance_by_n`)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    ns = [r["n"] for r in best]
    ax.plot(ns, [r["distance"] for r in best], marker="o")
    for r in best:
        ax.annotate(
            str(r["l"]),
            (r["n"], r["distance"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
            color="gray",
        )
    if plan is not None and plan.get("block_distance") is not None:
        ax.scatter(
            [plan["n_drop"]],
            [plan["block_distance"]],
            s=120,
            facecolors="none",
            edgecolors="red",
            lw=2,
            zorder=3,
            label=f"chosen: n={plan['n_drop']}, l={plan['block'][0]}",
        )
        ax.legend(loc="lower right")
    ax.set_xlabel("block size n (layers dropped)")
    ax.set_ylabel("min over l of distance")
    ax.set_title("Cheapest block of each size (gray: its first layer l*)")
    fig.tight_layout()
    return fig


# ---- routing ----
def entropy_by_correctness(df: pd.DataFrame):
    """Stage A's entropy per question, split by whether each stage answered it right.

    `df`: long form, columns entropy, stage (A/AB/FULL), correct (bool).
    """
    g = sns.displot(
        df,
        x="entropy",
        hue="correct",
        col="stage",
        kind="hist",
        element="step",
        stat="density",
        common_norm=False,
        height=3.2,
        aspect=1.1,
        hue_order=[True, False],
        palette={True: "tab:green", False: "tab:red"},
    )
    g.set_axis_labels("stage A next-token entropy (nats)", "density")
    g.set_titles("answered by {col_name}")
    g.figure.suptitle("Does A's uncertainty predict who gets it right?", y=1.04)
    return g.figure


def routing_tradeoff(sweep: pd.DataFrame, marks: pd.DataFrame | None = None):
    """Routed accuracy vs average layers used over threshold pairs; the frontier and the blind baseline.

    `sweep`: columns avg_layers, accuracy, blind_accuracy, pareto. `marks`: columns name, avg_layers,
    accuracy (single stages, calibrated thresholds), drawn as labelled points.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(sweep, x="avg_layers", y="accuracy", color="0.75", s=18, ax=ax, label="threshold pairs")
    front = sweep[sweep["pareto"]].drop_duplicates(["avg_layers", "accuracy"]).sort_values("avg_layers")
    ax.plot(front["avg_layers"], front["accuracy"], "-o", color="tab:blue", ms=4, label="entropy routing (frontier)")
    ax.plot(
        front["avg_layers"],
        front["blind_accuracy"],
        "--",
        color="tab:gray",
        lw=1,
        label="frontier's mixes, routed blindly",
    )
    if marks is not None and len(marks):
        sns.scatterplot(marks, x="avg_layers", y="accuracy", hue="name", style="name", s=90, ax=ax, zorder=5)
    ax.set_xlabel("average decoder layers used per question")
    ax.set_ylabel("routed accuracy")
    ax.set_title("Accuracy vs compute: routing between A, AB and FULL")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def healing(losses: pd.DataFrame, history: pd.DataFrame | None = None):
    """Held-out loss per model (bars: A, A healed, FULL) and the LoRA training loss per preset (lines).

    `losses`: columns model, loss. `history`: columns preset, step, metric ("train loss" | "eval
    loss"), value (`finetune.history_frame` with a preset column).
    """
    n = 2 if history is not None and len(history) else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    ax = axes[0, 0]
    sns.barplot(losses, x="model", y="loss", hue="model", ax=ax, legend=False)
    for c in ax.containers:
        ax.bar_label(c, fmt="%.3f", fontsize=8)
    lo, hi = losses["loss"].min(), losses["loss"].max()
    ax.set(
        title="held-out loss (nats/token)",
        xlabel="",
        ylim=(max(0.0, lo - 0.5 * (hi - lo) - 1e-3), hi + 0.15 * (hi - lo) + 1e-3),
    )
    ax.tick_params(axis="x", rotation=20)
    if n == 2:
        train = history[history["metric"] == "train loss"]
        sns.lineplot(train, x="step", y="value", hue="preset", ax=axes[0, 1])
        axes[0, 1].set(title="healing: LoRA training loss", ylabel="loss (nats/token)")
    fig.tight_layout()
    return fig

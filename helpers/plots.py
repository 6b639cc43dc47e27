"""Figures only (seaborn): every function takes computed data and returns a matplotlib Figure.

Usage: `fig = plots.loss_curve(finetune.history_frame(result.log_history)); fig.savefig(path)`
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
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
        sns.lineplot(data=train, x="step", y="value", ax=ax, label="train loss", marker="o" if len(train) < 30 else None)
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
        sns.heatmap(m, ax=ax, mask=np.eye(len(m), dtype=bool), cmap="mako", vmin=vmin, vmax=vmax, square=True,
                    cbar=False)
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
    sns.heatmap(mask, ax=ax, cmap="Blues", vmin=0, vmax=1.4, cbar=False, annot=labels, fmt="", linewidths=0.5,
                yticklabels=layers)
    ax.set(title=title, xlabel="original expert id (label: new id)", ylabel="layer")
    fig.tight_layout()
    return fig


def size_bars(table, title: str = "Checkpoint size before and after pruning"):
    """Bars of a DataFrame indexed by quantity (params, GB) with columns before / after."""
    long = table.reset_index(names="quantity").melt(id_vars="quantity", var_name="model", value_name="value")
    g = sns.catplot(data=long, x="model", y="value", col="quantity", kind="bar", sharey=False, height=3, aspect=0.8)
    g.figure.suptitle(title, y=1.05)
    return g.figure

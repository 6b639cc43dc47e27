"""Figures for the notebooks (seaborn); figures only, no computation: callers pass tidy tables.

Usage: `fig = plots.eval_accuracy(acc_table)` (tables from helpers.eval.results.tables)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns


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

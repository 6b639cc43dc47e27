"""Figures only (seaborn): every function takes computed data and returns a matplotlib Figure.

Usage: `fig = plots.loss_curve(finetune.history_frame(result.log_history)); fig.savefig(path)`
"""

from __future__ import annotations

import matplotlib.pyplot as plt
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

"""Figures for the notebooks (seaborn); no computation here: every function takes a ready table.

Usage: `fig = plots.routing_tradeoff(sweep_df, marks_df); fig.savefig(RUN_DIR / "tradeoff.png")`
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


# ---- routing ----
def entropy_by_correctness(df: pd.DataFrame):
    """Stage A's entropy per question, split by whether each stage answered it right.

    `df`: long form, columns entropy, stage (A/AB/FULL), correct (bool).
    """
    g = sns.displot(df, x="entropy", hue="correct", col="stage", kind="hist", element="step", stat="density",
                    common_norm=False, height=3.2, aspect=1.1, hue_order=[True, False],
                    palette={True: "tab:green", False: "tab:red"})
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
    ax.plot(front["avg_layers"], front["blind_accuracy"], "--", color="tab:gray", lw=1,
            label="frontier's mixes, routed blindly")
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
    ax.set(title="held-out loss (nats/token)", xlabel="", ylim=(max(0.0, lo - 0.5 * (hi - lo) - 1e-3), hi + 0.15 * (hi - lo) + 1e-3))
    ax.tick_params(axis="x", rotation=20)
    if n == 2:
        train = history[history["metric"] == "train loss"]
        sns.lineplot(train, x="step", y="value", hue="preset", ax=axes[0, 1])
        axes[0, 1].set(title="healing: LoRA training loss", ylabel="loss (nats/token)")
    fig.tight_layout()
    return fig

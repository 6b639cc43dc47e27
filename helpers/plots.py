"""Figures for the notebooks (seaborn/matplotlib): drawing only, the numbers come from helpers.

Usage: `fig = plots.distance_heatmap(D, plan)`
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns


# ---- layers ----
def distance_heatmap(D: np.ndarray, plan: dict | None = None, ax=None):
    """Mean angular distance d(x_l, x_{l+n}) over block size n (rows) and start l (columns);
    the chosen block is boxed."""
    L = D.shape[1]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 + 0.45 * L, 1.0 + 0.4 * L))
    sns.heatmap(D[1:], mask=np.isnan(D[1:]), cmap="viridis_r", ax=ax, square=True,
                cbar_kws={"label": "angular distance / pi"}, xticklabels=range(L), yticklabels=range(1, L + 1))
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
        ax.annotate(str(r["l"]), (r["n"], r["distance"]), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7, color="gray")
    if plan is not None and plan.get("block_distance") is not None:
        ax.scatter([plan["n_drop"]], [plan["block_distance"]], s=120, facecolors="none", edgecolors="red", lw=2,
                   zorder=3, label=f"chosen: n={plan['n_drop']}, l={plan['block'][0]}")
        ax.legend(loc="lower right")
    ax.set_xlabel("block size n (layers dropped)")
    ax.set_ylabel("min over l of distance")
    ax.set_title("Cheapest block of each size (gray: its first layer l*)")
    fig.tight_layout()
    return fig

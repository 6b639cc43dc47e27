"""95% intervals for accuracies over questions: Wilson for one accuracy, paired bootstrap for a difference.

With 400 questions one accuracy has a standard error near 0.025, so every accuracy the sweeps and the
summary report carries an interval, and two variants are compared on the SAME questions (paired):
the difference's interval is the bootstrap over questions of mean(a_i - b_i), resampling question
indices once for both variants.

Usage: `lo, hi = wilson(k=230, n=400); d, lo, hi = paired_bootstrap(correct_a, correct_b, seed=0)`
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (NaNs when n = 0)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= k <= n:
        raise ValueError(f"wilson: {k} successes out of {n} trials")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = (0.0 if k == 0 else max(0.0, mid - half)), (1.0 if k == n else min(1.0, mid + half))
    return (min(lo, p), max(hi, p))  # exact at the ends (mid - half is 0 only up to rounding)


def paired_bootstrap(a, b, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """mean(a - b) over paired per-question outcomes, with its percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: outcomes must be two equal-length vectors, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return (float("nan"),) * 3
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(d.mean()), float(lo), float(hi))


def band(values) -> tuple[float, float, float]:
    """(mean, min, max) of several seeds' accuracies: the random baseline's band."""
    v = np.asarray(values, dtype=float)
    return (float(v.mean()), float(v.min()), float(v.max()))

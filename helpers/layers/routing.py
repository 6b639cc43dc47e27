"""Entropy routing over stages A / AB / FULL: stage A's next-token entropy decides how many layers a prompt gets.

Stage A (a block of layers dropped) reads the prompt. A sharp next-token distribution (low
entropy, in nats) means A answers; otherwise the prompt goes to AB (A + bundle B) or FULL (A + B +
C, the original model): entropy <= t_A -> A, <= t_AB -> AB, else FULL. Thresholds are calibrated on
a calibration set, to a target stage mix (entropy quantiles) or to an accuracy target (the
loosest thresholds whose routed accuracy stays >= target, given each stage's per-sample
correctness), and saved in thresholds.json with stage A's fingerprint: thresholds made for
another base refuse to load. Never hard-coded.

Usage: `th = calibrate_mix(prompt_entropy(a, tok, prompts), (0.5, 0.3, 0.2), fingerprint=fingerprint(a_dir))`
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.core.fsutil import read_json, write_json
from helpers.core.models import model_device
from helpers.layers.distance import ensure_pad, last_token_index, positions

STAGES = ("A", "AB", "FULL")
NEVER = -1.0  # entropy is >= 0, so a threshold of -1 routes nothing to its stage
FORMAT = "pruning-lab/thresholds/v1"
THRESHOLDS_FILE = "thresholds.json"


# ---- entropy --------------------------------------------------------------------------------
def entropy_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats over the last axis, computed in float64 (fp32 sums drift ~1e-6 at vocab 32k)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def last_token_entropy(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] entropy of the next-token distribution after each row's last real token (left or right padding)."""
    dev = model_device(model)
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    last = last_token_index(mask)  # [B]
    hidden = model.get_decoder()(
        input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
    ).last_hidden_state  # [B, T, H]
    h = hidden[torch.arange(len(last), device=dev), last]  # [B, H]: only these rows go through the head
    return entropy_of_logits(model.get_output_embeddings()(h))  # [B]


def _batches(texts: Sequence[str], batch_size: int, desc: str):
    """(indices, texts) batches, longest first so similar lengths share a batch (less padding)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[s : s + batch_size]
        yield idx, [texts[i] for i in idx]


def prompt_entropy(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8) -> np.ndarray:
    """Entropy (nats) of `model`'s next-token distribution after each prompt, batched."""
    ensure_pad(tokenizer)
    out = np.empty(len(prompts), dtype=np.float64)
    for idx, texts in _batches(prompts, batch_size, "entropy"):
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        out[idx] = last_token_entropy(model, enc["input_ids"], enc["attention_mask"]).cpu().double().numpy()
    return out


# ---- thresholds -----------------------------------------------------------------------------


def _json_t(t: float):
    return None if math.isinf(t) else float(t)  # JSON has no infinity; null = no upper bound


@dataclass
class Thresholds:
    """Entropy cut-offs: entropy <= t_a -> A, <= t_ab -> AB, else FULL."""

    t_a: float
    t_ab: float
    method: str  # "mix" | "accuracy" | "manual"
    target: object  # mix fractions [A, AB, FULL], or the accuracy target
    n_calib: int
    fingerprint: str  # of stage A, see fingerprint()
    calib: dict = field(default_factory=dict)  # what the thresholds achieve on their own calibration set

    def __post_init__(self):
        self.t_a = math.inf if self.t_a is None else float(self.t_a)
        self.t_ab = math.inf if self.t_ab is None else float(self.t_ab)
        if math.isnan(self.t_a) or math.isnan(self.t_ab) or self.t_a > self.t_ab:
            raise ValueError(f"thresholds need t_a <= t_ab, got t_a={self.t_a}, t_ab={self.t_ab}")

    def stage(self, entropy: float) -> str:
        return "A" if entropy <= self.t_a else "AB" if entropy <= self.t_ab else "FULL"

    def stages(self, entropies) -> np.ndarray:
        h = np.asarray(entropies, dtype=np.float64)
        return np.where(h <= self.t_a, "A", np.where(h <= self.t_ab, "AB", "FULL"))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(format=FORMAT, t_a=_json_t(self.t_a), t_ab=_json_t(self.t_ab))
        return d

    def save(self, path) -> Path:
        return write_json(Path(path), self.to_dict())

    def check(self, fp: str, where: str = "thresholds") -> Thresholds:
        if fp != self.fingerprint:
            raise ValueError(
                f"{where} were calibrated for base fingerprint {self.fingerprint}, but this stage A "
                f"has {fp}: recalibrate (notebook 05) for this base"
            )
        return self

    @classmethod
    def load(cls, path, fingerprint: str | None = None) -> Thresholds:
        """Read thresholds.json; with `fingerprint`, refuse thresholds calibrated for another base."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no thresholds file; calibrate them (notebook 05) or pass --thresholds")
        d = read_json(p)
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise ValueError(f"{p}: not a thresholds file (format is not {FORMAT})")
        try:
            th = cls(**d)
        except TypeError as e:
            raise ValueError(f"{p}: malformed thresholds file ({e})") from None
        return th.check(fingerprint, str(p)) if fingerprint is not None else th


def _cut(sorted_h: np.ndarray, k: int) -> float:
    """A threshold with exactly the k lowest entropies at or below it (midway to the next one)."""
    if k <= 0:
        return NEVER
    if k >= len(sorted_h):
        return math.inf
    return float((sorted_h[k - 1] + sorted_h[k]) / 2)


def _cuts(sorted_h: np.ndarray) -> np.ndarray:
    """Every k a threshold can realise: 0, n, and each k that does not split a tie."""
    n = len(sorted_h)
    inner = np.nonzero(sorted_h[:-1] < sorted_h[1:])[0] + 1
    return np.unique(np.concatenate([[0], inner, [n]])).astype(int)


def calibrate_mix(entropies, mix: Sequence[float] = (0.5, 0.3, 0.2), *, fingerprint: str) -> Thresholds:
    """Thresholds at entropy quantiles so that the calibration set splits A/AB/FULL as `mix`."""
    h = np.asarray(entropies, dtype=np.float64)
    m = np.asarray(mix, dtype=np.float64)
    if len(h) == 0:
        raise ValueError("calibrate_mix: empty calibration set")
    if m.shape != (3,) or (m < 0).any() or abs(m.sum() - 1) > 1e-6:
        raise ValueError(f"mix must be three fractions [A, AB, FULL] summing to 1, got {list(mix)}")
    s, n = np.sort(h), len(h)
    th = Thresholds(_cut(s, round(m[0] * n)), _cut(s, round((m[0] + m[1]) * n)), "mix", m.tolist(), n, fingerprint)
    th.calib = {"mix": stage_mix(th.stages(h))}
    return th


def calibrate_accuracy(entropies, correct: dict, target: float, layers: dict, *, fingerprint: str) -> Thresholds:
    """The loosest thresholds (fewest average layers) whose routed accuracy on this set is >= target.

    `correct[stage]` holds per-sample 0/1 correctness of each stage, `layers[stage]` its layer count.
    Every realisable pair of cuts over the sorted entropies is tried (prefix sums, O(n^2) adds).
    """
    h = np.asarray(entropies, dtype=np.float64)
    n = len(h)
    if n == 0:
        raise ValueError("calibrate_accuracy: empty calibration set")
    order = np.argsort(h, kind="stable")
    s = h[order]
    pre = {st: np.concatenate([[0.0], np.cumsum(np.asarray(correct[st], dtype=np.float64)[order])]) for st in STAGES}
    ks = _cuts(s)
    need = target * n - 1e-9
    best = None  # (avg layers, -hits, k_a, k_ab)
    for ka in ks:
        kab = ks[ks >= ka]  # [m]
        hits = pre["A"][ka] + (pre["AB"][kab] - pre["AB"][ka]) + (pre["FULL"][n] - pre["FULL"][kab])
        cost = (ka * layers["A"] + (kab - ka) * layers["AB"] + (n - kab) * layers["FULL"]) / n
        ok = np.nonzero(hits >= need)[0]
        if len(ok):
            j = ok[np.lexsort((-hits[ok], cost[ok]))[0]]
            cand = (cost[j], -hits[j], int(ka), int(kab[j]))
            best = cand if best is None or cand[:2] < best[:2] else best
    if best is None:
        top = max(np.mean(np.asarray(correct[st], dtype=np.float64)) for st in STAGES)
        raise ValueError(f"no thresholds reach accuracy {target} on the calibration set (best single stage {top:.3f})")
    th = Thresholds(_cut(s, best[2]), _cut(s, best[3]), "accuracy", float(target), n, fingerprint)
    th.calib = routed_outcome(h, correct, layers, th)
    return th


# ---- routed evaluation ----------------------------------------------------------------------
def stage_mix(stages: np.ndarray) -> dict[str, float]:
    return {st: float(np.mean(stages == st)) if len(stages) else 0.0 for st in STAGES}


def routed_outcome(entropies, correct: dict, layers: dict, th: Thresholds) -> dict:
    """Accuracy, average layers used and stage mix of routing these samples with `th`."""
    route = th.stages(entropies)
    hit = np.select([route == st for st in STAGES], [np.asarray(correct[st], dtype=np.float64) for st in STAGES])
    used = np.select([route == st for st in STAGES], [float(layers[st]) for st in STAGES])
    mix = stage_mix(route)
    # A router that ignores entropy but keeps this mix scores the mix-weighted stage accuracies.
    blind = sum(mix[st] * float(np.mean(correct[st])) for st in STAGES)
    return {
        "accuracy": float(hit.mean()),
        "avg_layers": float(used.mean()),
        "blind_accuracy": blind,
        **{f"frac_{st}": mix[st] for st in STAGES},
        "t_a": _json_t(th.t_a),
        "t_ab": _json_t(th.t_ab),
    }


def sweep(entropies, correct: dict, layers: dict, n_grid: int = 21) -> pd.DataFrame:
    """Routed accuracy vs average layers over a grid of threshold pairs (the trade-off curve).

    Cuts sit at `n_grid` evenly spaced entropy quantiles; column `pareto` marks pairs no other
    pair beats on both accuracy and layers.
    """
    h = np.asarray(entropies, dtype=np.float64)
    s, n = np.sort(h), len(h)
    ks = np.unique(np.round(np.linspace(0, n, n_grid)).astype(int))
    rows = [
        routed_outcome(h, correct, layers, Thresholds(_cut(s, a), _cut(s, b), "manual", None, n, ""))
        for a in ks
        for b in ks
        if b >= a
    ]
    df = pd.DataFrame(rows).drop_duplicates(["accuracy", "avg_layers", "frac_A", "frac_AB"]).reset_index(drop=True)
    acc, lay = df["accuracy"].to_numpy(), df["avg_layers"].to_numpy()
    beaten = [((acc >= a) & (lay <= l) & ((acc > a) | (lay < l))).any() for a, l in zip(acc, lay)]
    df["pareto"] = ~np.asarray(beaten)
    return df.sort_values("avg_layers").reset_index(drop=True)


def compare_table(entropies, correct: dict, layers: dict, named: dict[str, Thresholds]) -> pd.DataFrame:
    """Outcome of each single stage and of each named set of thresholds on the same samples."""
    only = {
        f"only {st}": Thresholds(*cuts, "manual", None, 0, "")
        for st, cuts in zip(STAGES, [(math.inf, math.inf), (NEVER, math.inf), (NEVER, NEVER)])
    }
    return pd.DataFrame(
        [{"name": k, **routed_outcome(entropies, correct, layers, th)} for k, th in {**only, **named}.items()]
    )


def auroc(entropies, wrong) -> float:
    """P(entropy of a wrong answer > entropy of a right one), ties count half: how well entropy flags errors."""
    h, w = np.asarray(entropies, dtype=np.float64), np.asarray(wrong, dtype=bool)
    if w.all() or not w.any():
        return float("nan")
    ranks = pd.Series(h).rank().to_numpy()  # average ranks for ties
    n1, n0 = w.sum(), (~w).sum()
    return float((ranks[w].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def correctness_frame(entropies, correct: dict) -> pd.DataFrame:
    """Long form (entropy, stage, correct) for plotting entropy by correctness."""
    return pd.concat(
        [
            pd.DataFrame({"entropy": entropies, "stage": st, "correct": np.asarray(correct[st], dtype=bool)})
            for st in STAGES
        ],
        ignore_index=True,
    )


def n_layers(model) -> int:
    return len(model.get_decoder().layers)

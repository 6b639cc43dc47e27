"""Sweep points: score a model under many in-memory variants, one JSON per point, then one CSV with intervals.

A point is a dict with a unique "key" and its coordinates (criterion, keep, seed, ...). `score_points`
scores each point not yet on disk with the model put into that variant by `variant(model, point)` (a
context manager: router masking, skipped layers), and writes `<root>/points/<key>.json` atomically
with the per-question outcome of every task the scorer returns. A rerun (or another worker) skips the
points already written. `table` turns the points into rows: accuracy per domain ("finetuned": the
fine-tuned categories, "rest", "all"), its 95% Wilson interval, and paired differences (same questions,
bootstrap) against a reference point per row (the unpruned model) and against the seed's criterion.

The scorer is `helpers.eval.mmlu_pro.evaluate` in the given mode (cloze on the toy; the final scoring
can be swapped in by mode name).

Usage: `score_points(model, tok, qs, shots, points, masked, root); rows = table(load_points(root), coords, cats)`
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from helpers.core.fsutil import read_json, write_json
from helpers.eval import mmlu_pro
from helpers.eval.stats import paired_bootstrap, wilson

DOMAINS = ("finetuned", "rest", "all")


def point_path(root, key: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", key):
        raise ValueError(f"point key {key!r}: use letters, digits and _.=+- only (it names a file)")
    return Path(root) / "points" / f"{key}.json"


def _variant(p: dict) -> dict:
    return {k: p[k] for k in ("keep_sets", "drop") if k in p}


def _stale(path: Path, p: dict, settings: dict | None) -> bool:
    """A result file of another variant (new scores, new calibration) or other settings (mode, questions, model)."""
    rec = read_json(path)
    return rec.get("variant") != _variant(p) or rec.get("settings") != settings


def pending(root, points: Sequence[dict], settings: dict | None = None) -> list[dict]:
    """The points without an up-to-date result under `root` (what a rerun still has to do)."""
    out = []
    for p in points:
        path = point_path(root, p["key"])
        if not path.exists() or _stale(path, p, settings):
            out.append(p)
    return out


def score_points(
    model,
    tok,
    questions,
    shots,
    points: Sequence[dict],
    variant: Callable,
    root,
    *,
    mode: str = "cloze",
    batch_size: int = 64,
    progress: bool = True,
    settings: dict | None = None,
) -> list[str]:
    """Score every pending point with `model` inside `variant(model, point)`; returns the keys written.

    `settings` (mode, question count, model) are stored with each result: a rerun under other settings,
    or a point whose keep sets / dropped layers changed, is scored again rather than skipped.
    """
    done = []
    for p in tqdm(pending(root, points, settings), desc=f"sweep points ({Path(root).name})", disable=not progress):
        with variant(model, p):
            tasks = mmlu_pro.evaluate(model, tok, questions, shots, mode=mode, batch_size=batch_size, progress=False)
        rec = {
            **{k: v for k, v in p.items() if k not in ("keep_sets", "drop")},
            "variant": _variant(p),
            "settings": settings,
            "question_ids": [q.question_id for q in questions],
            "categories": [q.category for q in questions],
            "correct": {t.task: [int(c) for c in t.correct] for t in tasks},
            "seconds": round(sum(t.seconds for t in tasks[:1]), 3),
        }
        write_json(point_path(root, p["key"]), rec, indent=None)
        done.append(p["key"])
    return done


def fan_out_points(chunk_fn: Callable, work, points: list[dict], job: dict, opts: dict) -> list[dict]:
    """Fan the points not yet scored under `work` out to `chunk_fn` (the side's eval_chunk), in
    opts["workers"] chunks on opts["executor"] (local processes or submitit); returns the points scored now."""
    from helpers.core.fanout import chunked, fan_out

    todo = pending(work, points, {k: job[k] for k in ("model", "mode", "limit")})
    chunks = [{**job, "points": c} for c in chunked(todo, opts["workers"])]
    w = opts["workers"]
    fan_out(chunk_fn, chunks, executor=opts["executor"], workers=w, folder=Path(work) / "jobs", slurm=opts["slurm"])
    return todo


def eval_chunk(job: dict, apply: Callable) -> list[str]:
    """One worker's share of a sweep: load the model once, score its points (skipping those already written).

    `apply(model, point)` is the side's in-memory variant: router masking for experts, skipped layers for depth.
    """
    import torch

    from helpers.core.models import load_model

    torch.set_num_threads(job.get("threads", 1))
    root = Path(job["root"])
    settings = {k: job[k] for k in ("model", "mode", "limit")}
    todo = pending(root, job["points"], settings)
    if not todo:
        return []
    model, tok = load_model(job["model"], job.get("dtype") or "float32", "cpu")
    questions, shots = mmlu_pro.load(job["data"], limit=job["limit"])
    kw = dict(mode=job["mode"], batch_size=job["batch_size"], progress=job.get("progress", True), settings=settings)
    return score_points(model, tok, questions, shots, todo, apply, root, **kw)


def load_points(root, keys: Sequence[str] | None = None) -> dict[str, dict]:
    """{key: point record} of the points written under `root` (only `keys` when given)."""
    folder = Path(root) / "points"
    paths = [point_path(root, k) for k in keys] if keys is not None else sorted(folder.glob("*.json"))
    return {p.stem: read_json(p) for p in paths}


def domain_mask(categories: Sequence[str], finetuned: Sequence[str], domain: str) -> np.ndarray:
    cats = np.asarray(categories)
    inside = np.isin(cats, list(finetuned))
    return {"finetuned": inside, "rest": ~inside, "all": np.ones(len(cats), bool)}[domain]


def table(
    points: dict[str, dict],
    coords: Sequence[str],
    finetuned: Sequence[str],
    *,
    reference: Callable[[dict], str | None] = lambda p: None,
    compare: Callable[[dict], str | None] = lambda p: None,
    seed: int = 0,
) -> list[dict]:
    """Rows: coords, domain, task, acc, its 95% interval, and paired differences with intervals.

    `reference(point)` / `compare(point)` name another point's key (or None); `diff_ref_*` is this point
    minus the reference (e.g. the unpruned model), `diff_cmp_*` this point minus the comparison point
    (e.g. delta_l2 at the same budget), both on the same questions.
    """
    rows = []
    for _key, p in sorted(points.items()):
        for task, correct in sorted(p["correct"].items()):
            c = np.asarray(correct, float)
            for domain in DOMAINS:
                m = domain_mask(p["categories"], finetuned, domain)
                n, k = int(m.sum()), int(c[m].sum())
                if n == 0:
                    continue
                lo, hi = wilson(k, n)
                row = {**{x: p.get(x) for x in coords}, "domain": domain, "task": task, "acc": k / n}
                row.update(acc_low=lo, acc_high=hi, n_questions=n, n_correct=k)
                for tag, fn in (("ref", reference), ("cmp", compare)):
                    other = points.get(fn(p) or "")
                    if other is None or other["question_ids"] != p["question_ids"]:
                        row.update({f"diff_{tag}": np.nan, f"diff_{tag}_low": np.nan, f"diff_{tag}_high": np.nan})
                        continue
                    o = np.asarray(other["correct"][task], float)
                    d, dlo, dhi = paired_bootstrap(c[m], o[m], seed=seed)
                    row.update({f"diff_{tag}": d, f"diff_{tag}_low": dlo, f"diff_{tag}_high": dhi})
                rows.append(row)
    return rows


def write_csv(path, rows: list[dict]) -> Path:
    """The rows as CSV (atomic: written beside the target, then renamed)."""
    import pandas as pd

    from helpers.core.fsutil import write_text

    return write_text(path, pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))

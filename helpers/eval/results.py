"""The results schema: one `results.json` per variant, merged across modes and benches, plus samples.

`eval_results/<preset>/<variant>/results.json`:
    {"config":  {model, variant, parent_manifest, dtype, params, bytes_on_disk, versions, git_sha, date, ...},
     "results": {task: {acc, acc_random_fill, n, n_unparsed, per_category: {cat: {same}}, seconds, ...}},
     "speed":   {prefill_tok_s, decode_tok_s, peak_memory_bytes, memory_kind, device, ...}}
`samples/<task>.jsonl` beside it: one row per question {question_id, category, answer, pred, output}, CoT rows
also {n_shots, prompt_sha256} (sha256 of the UTF-8 prompt: check it against the official one without storing it).
Tasks: mmlu_pro_cot, mmlu_pro_cot_text (toy diagnostic, not official), mmlu_pro_loglik, mmlu_pro_cloze,
mmlu_pro_cloze_norm, lighteval_loglik, lighteval_cot.
Paths in the config block (model, parent_manifest, data, thresholds, bundles) are `portable`: relative
to the repo root when they lie under it, else as given (a hub id stays a hub id), so committed results
never carry a machine's absolute path; paths to sample files are relative to the results dir.

Usage: `write_results("eval_results/toy/base", config_block(model_dir, "base"), task_results, speed)`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from helpers.core.fsutil import read_json, write_json, write_jsonl, write_text
from helpers.core.manifest import git_sha, versions
from helpers.core.manifest import portable as manifest_portable

RESULTS = "results.json"
SAMPLES = "samples"
PATH_KEYS = ("data", "thresholds", "bundles")  # config_block extras that name a file, dir or hub id


def portable(path) -> str | None:
    """How results name a path: `helpers.core.manifest.portable` (the manifests' rule: relative to the repo
    root when under it, else as given; a hub id stays a hub id); None stays None."""
    return None if path is None else manifest_portable(path)


def checkpoint_stats(paths: Sequence) -> tuple[int | None, int | None]:
    """(parameters, bytes) of every *.safetensors file under the given dirs (checkpoints, bundle dirs),
    read from the file headers only; (None, None) if a path is not on disk."""
    from helpers.core.checkpoint import read_header

    params = size = 0
    for p in paths:
        p = Path(p)
        if not p.is_dir():
            return None, None
        for f in sorted(p.rglob("*.safetensors")):
            header, _ = read_header(f)
            for name, h in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in h["shape"]:
                        n *= d
                    params += n
            size += f.stat().st_size
    return params, size


def config_block(
    model, variant: str, *, parent_manifest=None, dtype: str | None = None, weights: Sequence | None = None, **extra
) -> dict:
    """The config part of results.json; `weights` lists the dirs whose bytes make the variant (default: model).

    `model`, `parent_manifest` and the PATH_KEYS extras are recorded `portable`.
    """
    params, size = checkpoint_stats(weights or [model])
    extra = {k: portable(v) if k in PATH_KEYS and isinstance(v, (str, Path)) else v for k, v in extra.items()}
    return {
        "model": portable(model),
        "variant": variant,
        "parent_manifest": portable(parent_manifest) if parent_manifest else None,
        "dtype": dtype,
        "params": params,
        "bytes_on_disk": size,
        "versions": versions(),
        "git_sha": git_sha(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def parent_manifest_of(model_dir) -> Path | None:
    """The manifest.json of the run that wrote a checkpoint (its own dir or the one above)."""
    p = Path(model_dir)
    for d in (p, p.parent):
        if (d / "manifest.json").is_file():
            return d / "manifest.json"
    return None


def write_results(
    out_dir, config: dict, task_results: Sequence = (), speed: dict | None = None, overwrite: bool = False
) -> Path:
    """Merge tasks (mmlu_pro.TaskResult) and speed into `<out_dir>/results.json`; samples beside it.

    An existing results.json of ANOTHER model in the same dir is refused unless `overwrite`.
    """
    out = Path(out_dir)
    path = out / RESULTS
    doc = read_json(path) if path.exists() else {"config": {}, "results": {}, "speed": {}}
    old = doc.get("config", {}).get("model")
    if old and old != config["model"] and not overwrite:
        raise FileExistsError(
            f"{path} holds results of model {old}, not {config['model']}; use another --out or overwrite"
        )
    doc["config"] = {**doc.get("config", {}), **config}
    for r in task_results:
        write_jsonl(out / SAMPLES / f"{r.task}.jsonl", r.samples())
        doc.setdefault("results", {})[r.task] = r.summary() | {"samples": f"{SAMPLES}/{r.task}.jsonl"}
    if speed:
        doc["speed"] = speed
    return write_json(path, doc)


def read_samples(out_dir, task: str) -> list[dict]:
    p = Path(out_dir) / SAMPLES / f"{task}.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no samples for task {task}")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def load_all(root) -> dict[str, dict]:
    """{variant: results.json} for every variant dir under `root` (eval_results/<preset>)."""
    root = Path(root)
    return {p.parent.name: read_json(p) for p in sorted(root.glob(f"*/{RESULTS}"))}


def tables(root):
    """(accuracy, categories, speed) DataFrames over every variant under `root`, for plots and summary.md."""
    import pandas as pd

    acc, cats, speed = [], [], []
    for variant, doc in load_all(root).items():
        cfg = doc.get("config", {})
        base = {"variant": variant, "params": cfg.get("params"), "bytes_on_disk": cfg.get("bytes_on_disk")}
        for task, r in doc.get("results", {}).items():
            acc.append(
                base
                | {
                    "task": task,
                    "acc": r["acc"],
                    "n": r["n"],
                    "n_unparsed": r.get("n_unparsed", 0),
                    "acc_random_fill": r.get("acc_random_fill", r["acc"]),
                    "stage_mix": r.get("stage_mix"),
                }
            )
            for c, v in r.get("per_category", {}).items():
                cats.append(base | {"task": task, "category": c, "acc": v["acc"], "n": v["n"]})
        if doc.get("speed"):
            s = doc["speed"]
            speed.append(
                base
                | {k: s.get(k) for k in ("prefill_tok_s", "decode_tok_s", "peak_memory_bytes", "memory_kind", "device")}
                | {"note": s.get("note")}
            )
    return pd.DataFrame(acc), pd.DataFrame(cats), pd.DataFrame(speed)


def accuracy_dict(root) -> dict[str, dict[str, float]]:
    """{task: {variant: acc}} for a manifest's metrics."""
    out: dict[str, dict[str, float]] = {}
    for variant, doc in load_all(root).items():
        for task, r in doc.get("results", {}).items():
            out.setdefault(task, {})[variant] = round(r["acc"], 4)
    return out


def stage_mix_table(root):
    """Long table (variant, task, stage, share) of every routed task's stage mix under `root`."""
    import pandas as pd

    rows = [
        {"variant": v, "task": t, "stage": s, "share": n / sum(r["stage_mix"].values())}
        for v, doc in load_all(root).items()
        for t, r in doc.get("results", {}).items()
        for s, n in (r.get("stage_mix") or {}).items()
    ]
    return pd.DataFrame(rows, columns=["variant", "task", "stage", "share"])


def agreement(out_dir, task_a: str, task_b: str) -> dict:
    """How two tasks of one variant agree on the questions both scored (e.g. ours vs lighteval loglik)."""
    a = {r["question_id"]: r for r in read_samples(out_dir, task_a)}
    b = {r["question_id"]: r for r in read_samples(out_dir, task_b)}
    common = sorted(set(a) & set(b), key=str)
    same = sum(a[q]["pred"] == b[q]["pred"] for q in common)
    acc = lambda d: sum(d[q]["pred"] == d[q]["answer"] for q in common) / len(common) if common else float("nan")  # noqa: E731
    return {"questions": len(common), "same_prediction": same, f"acc_{task_a}": acc(a), f"acc_{task_b}": acc(b)}


def agreement_table(root, variants: Sequence[str], task_a: str = "mmlu_pro_loglik", task_b: str = "lighteval_loglik"):
    """agreement() for each variant that has both tasks' samples."""
    import pandas as pd

    rows = []
    for v in variants:
        d = Path(root) / v
        if (d / SAMPLES / f"{task_a}.jsonl").exists() and (d / SAMPLES / f"{task_b}.jsonl").exists():
            rows.append({"variant": v} | agreement(d, task_a, task_b))
    return pd.DataFrame(rows)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(df) -> str:
    """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
    head = [str(c) for c in df.columns]
    rows = [[_cell(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def _wilson_text(acc: float, n: int) -> str:
    from helpers.eval.stats import wilson

    lo, hi = wilson(round(acc * n), n)
    return f"{acc:.3f} [{lo:.3f}, {hi:.3f}]"


def summary_markdown(
    root, title: str | None = None, notes: Sequence[str] = (), order: Sequence[str] | None = None
) -> str:
    """summary.md: accuracy per variant and task, parameters, size, speed; notes (e.g. skipped variants)."""
    import pandas as pd

    acc, _, speed = tables(root)
    if order is not None and not acc.empty:
        rank = {v: i for i, v in enumerate(order)}
        acc = acc.sort_values("variant", key=lambda s: s.map(lambda v: rank.get(v, len(rank))), kind="stable")
    lines = [f"# {title or 'Benchmarks: ' + Path(root).name}", ""]
    if acc.empty:
        lines.append("No results yet.")
    else:
        wide = acc.pivot_table(index="variant", columns="task", values="acc", sort=False)
        meta = acc.groupby("variant", sort=False)[["params", "bytes_on_disk"]].first()
        n = acc.groupby("variant", sort=False)["n"].max().rename("questions")
        table = pd.concat([meta, n, wide.round(4)], axis=1)
        if not speed.empty:
            table = table.join(speed.set_index("variant")[["prefill_tok_s", "decode_tok_s", "peak_memory_bytes"]])
        lines += [
            "Accuracy (micro average over questions) per variant and task; speed from one prompt batch.",
            "",
            markdown_table(table.reset_index()),
            "",
        ]
        ci = acc.assign(ci95=[_wilson_text(a, n) for a, n in zip(acc["acc"], acc["n"])])
        ci = ci.pivot_table(index="variant", columns="task", values="ci95", aggfunc="first", sort=False)
        lines += [
            "The same accuracies with their 95% Wilson interval over questions (differences between variants",
            "are paired in the sweeps' CSVs; on a few hundred questions intervals are several points wide):",
            "",
            markdown_table(ci.reset_index()),
            "",
        ]
        side = acc[acc["task"].str.contains("cot")][["variant", "task", "n", "acc", "n_unparsed", "acc_random_fill"]]
        if not side.empty:
            lines += [
                "Generated scorings side by side: `acc` counts an unparsed reply wrong; `acc_random_fill` counts it",
                "1/len(options), the expectation of the official script's random guess. `mmlu_pro_cot_text` is a toy",
                "diagnostic (the option text the reasoning ends in), NOT the official metric. Letter log-likelihood",
                "drops the N/A padding options as the official script does (lm-eval's leaderboard keeps them).",
                "",
                markdown_table(side.round(4)),
                "",
            ]
        unparsed = acc[acc["n_unparsed"] > 0]
        if not unparsed.empty:
            lines += ["Unparsed CoT replies (counted wrong in acc; 1/len(options) in acc_random_fill):", ""]
            lines += [f"- {r.variant} / {r.task}: {r.n_unparsed} of {r.n}" for r in unparsed.itertuples()]
            lines.append("")
        measured = speed.dropna(subset=["note"]) if "note" in speed else speed.iloc[:0]
        if not measured.empty:  # e.g. the routed variant: decode_tok_s is end to end there
            lines += ["Speed notes:", ""] + [f"- {r.variant}: {r.note}" for r in measured.itertuples()] + [""]
        mixes = acc.dropna(subset=["stage_mix"]) if "stage_mix" in acc else acc.iloc[:0]
        if not mixes.empty:
            lines += ["Routed stage mix (questions per stage):", ""]
            lines += [f"- {r.variant} / {r.task}: {r.stage_mix}" for r in mixes.itertuples()]
            lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {x}" for x in notes] + [""]
    return "\n".join(lines)


def write_summary(
    root, title: str | None = None, notes: Sequence[str] = (), order: Sequence[str] | None = None
) -> Path:
    return write_text(Path(root) / "summary.md", summary_markdown(root, title, notes, order))

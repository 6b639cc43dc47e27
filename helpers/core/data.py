"""Calibration and fine-tuning text: the toy world, local jsonl/parquet/txt files, or hub datasets online.

Usage: `texts = load_texts("toy", n=64)`; `ds = load_sft("toy", n=200)` (a datasets.Dataset with "messages")

Sources: "toy" (the world's calib/calib.jsonl, finetune/{split}.jsonl), a path to a .jsonl,
.parquet or .txt file, "c4" / "wikitext", or any hub dataset id "owner/name[:config]" (these four
stream from the hub and need a network). Rows may hold "text", "messages", "prompt"/"completion",
"question"/"answer" (gsm8k), or the MMLU-Pro schema (question, options, answer_index): each is
turned into what the caller asked for. With `n`, rows are drawn by a
seeded shuffle (the same seed gives the same rows, and a smaller n a prefix of a larger one).
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

DEFAULT_WORLD = "runs/toy/world"
FILE_SUFFIXES = (".jsonl", ".parquet", ".txt")
HUB = {
    "c4": ("allenai/c4", {"data_files": "en/c4-validation.00000-of-00008.json.gz", "split": "train"}),
    "wikitext": ("Salesforce/wikitext", {"name": "wikitext-2-raw-v1", "split": "test"}),
}
HUB_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}  # datasets that need a config name


def _unknown(source) -> ValueError:
    return ValueError(
        f"unknown data source {str(source)!r}: expected 'toy', a path to a "
        f"{'/'.join(FILE_SUFFIXES)} file, one of {sorted(HUB)}, or a hub id owner/name[:config]"
    )


def hub_id(source) -> tuple[str, dict] | None:
    """(repo, load_dataset kwargs) for "c4", "wikitext" or "owner/name[:config]"; None for anything else."""
    s = str(source)
    if s in HUB:
        return HUB[s][0], dict(HUB[s][1])
    repo, _, config = s.partition(":")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or Path(s).suffix or Path(s).exists() or s.startswith((".", "/")):
        return None
    config = config or HUB_CONFIGS.get(repo)
    return repo, ({"name": config} if config else {})


def world_dir(world) -> Path:
    """A toy world directory from its path or its manifest.json; a relative path is the repo root's, never the cwd's."""
    from helpers.core.manifest import resolve

    p = resolve(world)
    return p.parent if p.name == "manifest.json" else p


def _toy_file(world, rel: str) -> Path:
    p = world_dir(world) / rel
    if not p.exists():
        raise FileNotFoundError(
            f"{p}: no toy world there; build it with `python -m helpers toy build --out {world_dir(world)}`"
        )
    return p


def read_rows(path) -> list[dict]:
    """Rows of a .jsonl or .parquet file (a .txt file: one {"text"} row per non-empty line)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".jsonl":
        rows = []
        for k, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{k}: not valid JSON ({e})") from None
        return rows
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".txt":
        return [{"text": line} for line in p.read_text().splitlines() if line.strip()]
    raise _unknown(path)


def _qa(row: dict) -> tuple[str, str]:
    """(question, answer text) of an MMLU-Pro-schema row, or of a question/answer row (gsm8k)."""
    if "options" in row and "answer_index" in row:
        return row["question"], row["options"][row["answer_index"]]
    return row["question"], row["answer"]


def row_text(row: dict, where: str = "row") -> str:
    """One calibration text from a row of any supported shape."""
    if isinstance(row.get("text"), str):
        return row["text"]
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"])
    if "prompt" in row and "completion" in row:
        return f"{row['prompt']} {row['completion']}"
    if {"question", "options", "answer_index"} <= set(row) or isinstance(row.get("answer"), str):
        q, a = _qa(row)
        return f"Question: {q}\nAnswer: {a}"
    raise ValueError(f"{where}: no 'text', 'messages', 'prompt'/'completion' or MMLU-Pro fields; keys {sorted(row)}")


def row_messages(row: dict, where: str = "row") -> list[dict]:
    """Chat messages (user, assistant) from a row of any supported shape."""
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    if {"question", "options", "answer_index"} <= set(row) or isinstance(row.get("answer"), str):
        q, a = _qa(row)
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    raise ValueError(
        f"{where}: no 'messages', 'prompt'/'completion' or MMLU-Pro fields for fine-tuning; keys {sorted(row)}"
    )


def _take(items: list, n: int | None, seed: int, where: str) -> list:
    if n is None:
        return items
    if n > len(items):
        warnings.warn(f"{where}: asked for {n} rows, it has {len(items)}; using all of them", stacklevel=3)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:n]]


def _hub_rows(source, n: int | None, seed: int, split: str | None = None) -> list[dict]:
    """n rows streamed (shuffled with a buffer) from a hub dataset; needs a network."""
    if n is None:
        raise ValueError(f"source {source!r} is streamed from the hub: pass n (how many rows)")
    repo, kw = hub_id(source)
    kw.setdefault("split", split or "train")
    try:
        from datasets import load_dataset

        ds = load_dataset(repo, streaming=True, **kw).shuffle(seed=seed, buffer_size=10_000)
        out = []
        for row in ds:
            if isinstance(row.get("text"), str):
                t = row["text"].strip()
                if not t or (repo.endswith("wikitext") and t.startswith("=")):  # blank lines, wikitext headings
                    continue
                row = {**row, "text": t}
            out.append(row)
            if len(out) == n:
                break
        return out
    except Exception as e:  # offline, gated, renamed: say which source and what to do instead
        raise ValueError(
            f"source {source!r}: could not stream {repo} ({type(e).__name__}: {str(e)[:200]}); "
            f"offline? use 'toy' or a local .jsonl/.parquet/.txt path"
        ) from None


def _local(source) -> Path | None:
    p = Path(str(source))
    return p if p.suffix in FILE_SUFFIXES else None


def load_texts(source, n: int | None = None, *, world=DEFAULT_WORLD, seed: int = 0) -> list[str]:
    """Texts for calibration: `n` of them (all when None), the same ones for the same seed."""
    if source == "toy":
        path = _toy_file(world, "calib/calib.jsonl")
    else:
        path = _local(source)
        if path is None and hub_id(source):
            return [row_text(r, f"{source} row {k}") for k, r in enumerate(_hub_rows(source, n, seed))]
        if path is None:
            raise _unknown(source)
    rows = read_rows(path)
    return _take([row_text(r, f"{path} row {k}") for k, r in enumerate(rows)], n, seed, str(path))


def load_sft(source, n: int | None = None, *, world=DEFAULT_WORLD, seed: int = 0, split: str = "train"):
    """A datasets.Dataset with one "messages" column (user, assistant) for LoRA fine-tuning.

    "toy" reads the world's finetune/{split}.jsonl (split "train" or "eval"); a hub id streams n rows
    of its "train" split (or "test" for split="eval").
    """
    from datasets import Dataset

    if source == "toy":
        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r}: the toy world has finetune splits 'train' and 'eval'")
        path = _toy_file(world, f"finetune/{split}.jsonl")
    elif str(source) in HUB:
        raise ValueError(f"source {source!r} holds plain text, not chat rows; use load_texts for it")
    else:
        path = _local(source)
        if path is None and hub_id(source):
            rows = _hub_rows(source, n, seed, split={"eval": "test"}.get(split, split))
            return Dataset.from_list([{"messages": row_messages(r, f"{source} row {k}")} for k, r in enumerate(rows)])
        if path is None:
            raise _unknown(source)
    rows = read_rows(path)
    msgs = [row_messages(r, f"{path} row {k}") for k, r in enumerate(rows)]
    return Dataset.from_list([{"messages": m} for m in _take(msgs, n, seed, str(path))])

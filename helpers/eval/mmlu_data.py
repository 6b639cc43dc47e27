"""MMLU-Pro data: the question record, the hub layout (local dir or hub id), round-robin limits, test rows.

`Question` is one row with its "N/A" padding dropped; `load` gives (test questions, validation shots by
category); `write_dataset` / `synthetic_rows` / `question_rows` write and make rows in the same schema
(question_id, question, options, answer, answer_index, category, cot_content, src). `helpers.eval.mmlu_pro`
offers these names too, beside the prompts and scorings.

Usage: `qs, shots = load("runs/toy/world/mmlu_pro", limit=200); take(qs, 20)`
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LETTERS = "ABCDEFGHIJKLMNOP"
HUB_ID = "TIGER-Lab/MMLU-Pro"
CATEGORY_KEYS = ("question_id", "question", "options", "answer", "answer_index", "category")


@dataclass(frozen=True)
class Question:
    question_id: int | str
    question: str
    options: tuple[str, ...]  # "N/A" padding dropped
    answer: str  # letter
    answer_index: int
    category: str
    cot_content: str = ""

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


# ---- data -----------------------------------------------------------------------------------
def _rows(data, split: str) -> list[dict]:
    """Rows of one split from a local dir in the hub layout (data/<split>-*.parquet) or a hub id."""
    p = Path(str(data))
    if p.exists():
        files = sorted((p / "data").glob(f"{split}-*.parquet")) or sorted(p.glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{p}: no {split}-*.parquet under data/ (expected the TIGER-Lab/MMLU-Pro layout)")
        import pandas as pd

        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        return df.to_dict("records")
    if "/" not in str(data) or str(data).startswith((".", "/")):
        raise FileNotFoundError(f"{data}: no such directory (and not a hub id like {HUB_ID})")
    from datasets import load_dataset

    return list(load_dataset(str(data), split=split))


def to_question(row: dict) -> Question:
    """One dataset row as a Question; "N/A" options dropped, the answer checked against them."""
    missing = [k for k in CATEGORY_KEYS if k not in row]
    if missing:
        raise ValueError(f"MMLU-Pro row {row.get('question_id', '?')}: missing columns {missing}")
    options = tuple(str(o) for o in row["options"] if str(o) != "N/A")
    idx = int(row["answer_index"])
    if not 0 <= idx < len(options) or LETTERS[idx] != row["answer"]:
        raise ValueError(
            f"MMLU-Pro question {row['question_id']}: answer {row['answer']!r} (index {idx}) "
            f"does not name one of its {len(options)} options"
        )
    return Question(
        row["question_id"],
        str(row["question"]),
        options,
        str(row["answer"]),
        idx,
        str(row["category"]),
        str(row.get("cot_content") or ""),
    )


def take(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """The first `limit` questions taken round-robin over categories (so every category is scored)."""
    if limit is None or limit >= len(questions):
        return list(questions)
    by_cat: dict[str, list[Question]] = defaultdict(list)
    for q in questions:
        by_cat[q.category].append(q)
    out: list[Question] = []
    queues = [iter(v) for v in by_cat.values()]
    while len(out) < limit and queues:
        for it in list(queues):
            q = next(it, None)
            if q is None:
                queues.remove(it)
            elif len(out) < limit:
                out.append(q)
    order = {id(q): i for i, q in enumerate(questions)}
    return sorted(out, key=lambda q: order[id(q)])


def load(
    data=None, limit: int | None = None, categories: Iterable[str] | None = None
) -> tuple[list[Question], dict[str, list[Question]]]:
    """(test questions, validation shots by category) from a local dir or the hub (default TIGER-Lab/MMLU-Pro)."""
    data = data or HUB_ID
    test = [to_question(r) for r in _rows(data, "test")]
    if categories is not None:
        keep = set(categories)
        test = [q for q in test if q.category in keep]
    shots: dict[str, list[Question]] = defaultdict(list)
    for r in _rows(data, "validation"):
        q = to_question(r)
        shots[q.category].append(q)
    return take(test, limit), dict(shots)


def write_dataset(out, test: Sequence[dict], validation: Sequence[dict]) -> Path:
    """Write rows in the hub layout (data/test-00000-of-00001.parquet, data/validation-...)."""
    import pandas as pd

    d = Path(out) / "data"
    d.mkdir(parents=True, exist_ok=True)
    for split, rows in (("test", test), ("validation", validation)):
        pd.DataFrame(list(rows)).to_parquet(d / f"{split}-00000-of-00001.parquet", index=False)
    return Path(out)


def synthetic_rows(
    n_per_category: int = 6,
    *,
    categories: Sequence[str] = ("math", "computer science", "history"),
    n_shots: int = 5,
    n_options: tuple[int, int] = (4, 10),
    pad_prob: float = 0.3,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """(test rows, validation rows) in the MMLU-Pro schema, for tests and benches (no hub needed).

    "what is a plus b ?" with `n_options` (min, max) numeric options, some padded to 10 with "N/A"
    as in the real set, a CoT answer; `n_shots` validation rows then `n_per_category` test rows
    per category.
    """
    rnd = random.Random(seed)
    test, val, qid = [], [], 0
    for cat in categories:
        for split, n in (("validation", n_shots), ("test", n_per_category)):
            for _ in range(n):
                k = rnd.randint(*n_options)
                a, b = rnd.randint(1, 9), rnd.randint(1, 9)
                opts = [str(a + b)] + [str(x) for x in rnd.sample([x for x in range(2, 19) if x != a + b], k - 1)]
                rnd.shuffle(opts)
                idx = opts.index(str(a + b))
                letter = LETTERS[idx]
                pad = ["N/A"] * (10 - k) if rnd.random() < pad_prob else []
                cot = f"A: Let's think step by step. {a} plus {b} is {a + b}. The answer is ({letter})."
                row = dict(
                    question_id=qid,
                    question=f"what is {a} plus {b} ?",
                    options=opts + pad,
                    answer=letter,
                    answer_index=idx,
                    category=cat,
                    src=f"toy-{cat}",
                    cot_content=cot,
                )
                (val if split == "validation" else test).append(row)
                qid += 1
    return test, val


def question_rows(questions: Sequence[Question]) -> list[dict]:
    """Questions back to dataset rows (the schema lighteval reads from a local dir)."""
    return [
        dict(
            question_id=q.question_id,
            question=q.question,
            options=list(q.options),
            answer=q.answer,
            answer_index=q.answer_index,
            cot_content=q.cot_content,
            category=q.category,
            src="",
        )
        for q in questions
    ]

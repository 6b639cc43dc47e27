"""Fixtures for the evaluation tests: a tiny MMLU-Pro-format dataset and manifests of tiny variants.

Imported by tests/test_eval*.py (`from tests.eval_fixtures import *`).
"""

from __future__ import annotations

import random

import pytest

from helpers.eval import mmlu_pro

CATEGORIES = ("math", "computer science", "history")


def tiny_rows(n_test_per_cat: int = 6, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(test rows, validation rows): 3 categories, 4 to 10 options ("N/A" padding on some), 5 shots each."""
    rnd = random.Random(seed)
    test, val, qid = [], [], 0
    for cat in CATEGORIES:
        for split, n in (("validation", 5), ("test", n_test_per_cat)):
            for _ in range(n):
                k = rnd.randint(4, 10)
                a, b = rnd.randint(1, 9), rnd.randint(1, 9)
                opts = [str(a + b)] + [str(x) for x in rnd.sample([x for x in range(2, 19) if x != a + b], k - 1)]
                rnd.shuffle(opts)
                idx = opts.index(str(a + b))
                letter = mmlu_pro.LETTERS[idx]
                pad = ["N/A"] * (10 - k) if rnd.random() < 0.3 else []
                row = dict(question_id=qid, question=f"what is {a} plus {b} ?", options=opts + pad, answer=letter,
                           answer_index=idx, category=cat, src=f"toy-{cat}",
                           cot_content=f"A: Let's think step by step. {a} plus {b} is {a + b}. The answer is ({letter}).")
                (val if split == "validation" else test).append(row)
                qid += 1
    return test, val


@pytest.fixture(scope="session")
def tiny_mmlu(tmp_path_factory):
    """A local dir in the hub layout: data/test-*.parquet (18 rows), data/validation-*.parquet (15)."""
    test, val = tiny_rows()
    return mmlu_pro.write_dataset(tmp_path_factory.mktemp("mmlu") / "mmlu_pro", test, val)

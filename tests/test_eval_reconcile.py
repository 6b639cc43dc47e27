"""Reconciliation with the official MMLU-Pro script and a plain reference, on a fixture set.

The reference CoT builder below is written from the official format description (TIGER-AI-Lab/MMLU-Pro
evaluate_from_local.py and cot_prompt_lib/initial_prompt.txt, as described in the README's comparison
table), from dataset rows as the hub gives them ("N/A" padding included), independent of
helpers.eval: our prompts, shot counts and prompt hashes must equal it. The letter log-likelihood must
equal a plain teacher-forced reference (one full row per option, no shared prefix, no cache).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from helpers.core.models import load_model
from helpers.eval import mmlu_pro

# the official header: initial_prompt.txt holds this line and three newlines; the script appends one more
OFFICIAL_FIRST_LINE = (
    "The following are multiple choice questions (with answers) about {$}. Think step by step and then finish "
    'your answer with "the answer is (X)" where X is the correct letter choice.'
)


def reference_block(row: dict, answered: bool) -> str:
    options = [o for o in row["options"] if o != "N/A"]
    text = "Question:\n" + row["question"] + "\n" + "Options:\n"
    for i, o in enumerate(options):
        text += "ABCDEFGHIJ"[i] + ". " + o + "\n"
    if not answered:
        return text + "Answer: Let's think step by step."
    shown = row["cot_content"].replace("A: Let's think step by step.", "Answer: Let's think step by step.")
    return text + shown + "\n\n"


def reference_prompt(row: dict, validation: list[dict], k: int, tok, max_model_length: int, max_new_tokens: int):
    """(prompt, shots): the first k validation rows of the category, k lowered while too long."""
    header = (OFFICIAL_FIRST_LINE + "\n\n\n").replace("{$}", row["category"]) + "\n"
    same = [v for v in validation if v["category"] == row["category"]]
    while True:
        prompt = header + "".join(reference_block(v, True) for v in same[:k]) + reference_block(row, False)
        if k == 0 or len(tok(prompt).input_ids) < max_model_length - max_new_tokens:
            return prompt, k
        k -= 1


@pytest.fixture(scope="module")
def fixture_set():
    from helpers.toy.synth import tiny_tokenizer

    test, val = mmlu_pro.synthetic_rows(n_per_category=4, categories=("math", "computer science", "law"), seed=3)
    return test, val, tiny_tokenizer()


def test_header_ends_in_four_newlines():
    h = mmlu_pro.cot_header("computer science")
    assert h.endswith("letter choice.\n\n\n\n") and not h.endswith("\n\n\n\n\n")
    assert h == (OFFICIAL_FIRST_LINE + "\n\n\n\n").replace("{$}", "computer science")


def test_cot_prompts_equal_the_official_format(fixture_set):
    test, val, tok = fixture_set
    qs = [mmlu_pro.to_question(r) for r in test]
    shots: dict[str, list] = {}
    for r in val:
        shots.setdefault(r["category"], []).append(mmlu_pro.to_question(r))
    assert any("N/A" in r["options"] for r in test + val)  # padding is exercised
    lengths = [len(tok(reference_prompt(r, val, 5, tok, 10**6, 0)[0]).input_ids) for r in test]
    budgets = [(10**6, 0), (4096, 2048), (sorted(lengths)[len(lengths) // 2], 100), (min(lengths) // 2, 0), (1, 0)]
    used = set()
    for max_len, new in budgets:
        for row, q in zip(test, qs):
            want, k_want = reference_prompt(row, val, 5, tok, max_len, new)
            got, k_got = mmlu_pro.fit_shots(q, shots, 5, tok, max_len, new)
            assert (got, k_got) == (want, k_want), (row["question_id"], max_len, new)
            used.add(k_got)
    assert {5, 0} <= used and len(used) >= 3  # full prompts, dropped shots and zero-shot all compared


def test_cot_samples_record_shots_and_prompt_hash(fixture_set, tiny_mistral):
    test, val, tok = fixture_set
    model, _ = load_model(tiny_mistral, "float32", "cpu")
    qs = [mmlu_pro.to_question(r) for r in test[:4]]
    shots: dict[str, list] = {}
    for r in val:
        shots.setdefault(r["category"], []).append(mmlu_pro.to_question(r))
    max_len, new = 128, 4  # the tiny model's context: shots are dropped
    res = mmlu_pro.score_cot(model, tok, qs, shots, max_new_tokens=new, max_model_length=max_len, progress=False)
    rows = res[0].samples()
    for row, s in zip(test[:4], rows):
        want, k = reference_prompt(row, val, 5, tok, max_len, new)
        assert k < 5 and s["n_shots"] == k and s["prompt_sha256"] == hashlib.sha256(want.encode("utf-8")).hexdigest()
    ex = res[0].extra
    assert (ex["max_model_length"], ex["max_new_tokens"], ex["stop"]) == (128, 4, "Question:")
    assert ex["chat_template"] is False and ex["decoding"] == "greedy"
    with pytest.raises(ValueError, match="max_position_embeddings"):
        mmlu_pro.score_cot(model, tok, qs, shots, max_model_length=10**6, progress=False)


def test_letter_loglik_equals_teacher_forced_reference(tiny_mistral, tiny_mmlu):
    model, tok = load_model(tiny_mistral, "float32", "cpu")
    qs, shots = mmlu_pro.load(tiny_mmlu, limit=9)
    ours = mmlu_pro.score_loglik(model, tok, qs, shots, batch_size=4, progress=False)
    for q, got, pred in zip(qs, ours.outputs, ours.preds):
        prompt = q.question + "\n" + "".join(f"{L}. {o}\n" for L, o in zip("ABCDEFGHIJ", q.options)) + "Answer:"
        ref = []
        for L in q.letters:
            ctx = tok(prompt).input_ids
            full = tok(prompt + " " + L).input_ids
            assert full[: len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
            ref.append(sum(logp[t - 1, full[t]].item() for t in range(len(ctx), len(full))))
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
        assert pred == q.letters[max(range(len(ref)), key=lambda i: (ref[i], -i))]
    assert ours.extra["options"].startswith("N/A padding options dropped")


def test_random_fill_is_the_expectation_of_the_official_guess():
    qs = [mmlu_pro.Question(i, "q", tuple("abcd"[: 2 + i % 3]), "A", 0, "c") for i in range(6)]
    preds = ["A", None, "B", None, None, "A"]  # options 2, 3, 4, 2, 3, 4
    s = mmlu_pro.summarize(qs, preds)
    assert s["acc"] == 2 / 6 and s["n_unparsed"] == 3
    assert s["acc_random_fill"] == pytest.approx((2 + 1 / 3 + 1 / 2 + 1 / 3) / 6)


def test_cli_defaults_are_the_official_ones():
    from helpers.cli import build_parser

    a = build_parser().parse_args(["evaluate", "--model", "m", "--out", "o"])
    assert (a.cot_shots, a.max_model_length, a.max_new_tokens) == (5, 4096, 2048)
    assert (mmlu_pro.COT_SHOTS, mmlu_pro.MAX_MODEL_LENGTH, mmlu_pro.MAX_NEW_TOKENS) == (5, 4096, 2048)

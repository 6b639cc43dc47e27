"""MMLU-Pro pieces without a model: extraction, the official prompt, data handling, the schema."""

from __future__ import annotations

import pytest

from helpers.core.models import load_check
from helpers.eval import mmlu_pro, results
from helpers.eval.mmlu_pro import Question, TaskResult, extract_answer
from helpers.eval.stats import wilson


# ---- extraction ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, want",
    [
        # pattern 1: "answer is (X)" / "answer is X", first occurrence wins
        ("Let's see. 3 plus 4 is 7. The answer is (C).", "C"),
        ("so the answer is D and not (B)", "D"),
        ("the answer is (B). Later: the answer is (E).", "B"),
        # pattern 2: "Answer: X" when pattern 1 is absent (greedy within the line: last on that line)
        ("We compute it.\nAnswer: F", "F"),
        ("answer: A ... final Answer: G", "G"),
        # pattern 1 beats pattern 2 even when pattern 2 comes first
        ("Answer: A\nbut actually the answer is (J)", "J"),
        # pattern 3: the last standalone capital A-J anywhere (DOTALL)
        ("I pick B.\nOr maybe H\n", "H"),
        ("Options B and C look right, C it is", "C"),
        # letters inside words or beyond J do not count
        ("Because BIG cats are K", None),
        ("no letter here at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_unparsed_counts_as_wrong_never_guessed():
    qs = [Question(i, "q", ("a", "b"), "A", 0, "c") for i in range(4)]
    s = mmlu_pro.summarize(qs, ["A", None, None, "B"])
    assert (s["acc"], s["n"], s["n_unparsed"]) == (0.25, 4, 2)
    assert s["per_category"]["c"] == {"acc": 0.25, "acc_random_fill": 0.5, "n": 4, "n_unparsed": 2}
    assert TaskResult("t", qs, ["A", None, None, "B"], [None] * 4).correct == [True, False, False, False]


# ---- prompts ------------------------------------------------------------------------------
def _q(qid, cat, question, options, answer_index, cot=""):
    return Question(qid, question, tuple(options), mmlu_pro.LETTERS[answer_index], answer_index, cat, cot)


def test_cot_prompt_is_the_official_format():
    shots = {
        "math": [
            _q(1, "math", "1+1?", ["2", "3"], 0, "A: Let's think step by step. 1+1=2. The answer is (A)."),
            _q(2, "math", "2+2?", ["3", "4", "5"], 1, "A: Let's think step by step. It is 4. The answer is (B)."),
        ]
    }
    q = _q(9, "math", "3+3?", ["6", "7"], 0)
    want = (
        "The following are multiple choice questions (with answers) about math. Think step by step and then "
        'finish your answer with "the answer is (X)" where X is the correct letter choice.\n\n\n\n'
        "Question:\n1+1?\nOptions:\nA. 2\nB. 3\nAnswer: Let's think step by step. 1+1=2. The answer is (A).\n\n"
        "Question:\n2+2?\nOptions:\nA. 3\nB. 4\nC. 5\nAnswer: Let's think step by step. It is 4. The answer is (B).\n\n"
        "Question:\n3+3?\nOptions:\nA. 6\nB. 7\nAnswer: Let's think step by step."
    )
    assert mmlu_pro.cot_prompt(q, shots, k=5) == want
    assert mmlu_pro.cot_prompt(q, shots, k=1).count("Question:") == 2
    assert mmlu_pro.cot_prompt(_q(3, "law", "x?", ["y", "z"], 0), shots).count("Question:") == 1  # no shots of law


def test_loglik_and_cloze_prompts():
    q = _q(1, "math", "3+3?", ["6", "7", "8"], 0)
    assert mmlu_pro.loglik_prompt(q) == "3+3?\nA. 6\nB. 7\nC. 8\nAnswer:"
    assert mmlu_pro.loglik_choices(q) == [" A", " B", " C"]
    shots = {"math": [_q(2, "math", "1+1?", ["2", "3"], 0)]}
    assert mmlu_pro.loglik_prompt(q, shots, k=1) == "1+1?\nA. 2\nB. 3\nAnswer: A\n\n3+3?\nA. 6\nB. 7\nC. 8\nAnswer:"
    assert mmlu_pro.cloze_context(q) == "Question: 3+3?\nAnswer:"
    assert mmlu_pro.cloze_choices(q) == [" 6", " 7", " 8"]


# ---- data ---------------------------------------------------------------------------------
def test_load_local_hub_layout_drops_na_and_keeps_shots(tiny_mmlu):
    test, val = mmlu_pro.synthetic_rows()
    qs, shots = mmlu_pro.load(tiny_mmlu)
    assert [q.question_id for q in qs] == [r["question_id"] for r in test]
    assert all("N/A" not in q.options for q in qs)
    assert any("N/A" in r["options"] for r in test)  # the fixture does pad some
    assert {c: len(v) for c, v in shots.items()} == {"math": 5, "computer science": 5, "history": 5}
    assert all(q.options[q.answer_index] == r["options"][r["answer_index"]] for q, r in zip(qs, test))


def test_limit_is_round_robin_over_categories(tiny_mmlu):
    qs, _ = mmlu_pro.load(tiny_mmlu, limit=7)
    cats = [q.category for q in qs]
    assert len(qs) == 7 and {cats.count(c) for c in set(cats)} == {2, 3} and len(set(cats)) == 3
    ids = [q.question_id for q in qs]
    assert ids == sorted(ids)  # dataset order kept


def test_bad_data_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test-\\*.parquet"):
        mmlu_pro.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        mmlu_pro.load(tmp_path / "missing")
    row = dict(question_id=5, question="q", options=["a", "N/A"], answer="B", answer_index=1, category="c")
    with pytest.raises(ValueError, match="question 5: answer 'B'"):
        mmlu_pro.to_question(row)


# ---- schema -------------------------------------------------------------------------------
def _result(task, preds):
    qs = [Question(i, "q", ("a", "b"), "A", 0, "c" if i % 2 else "d") for i in range(4)]
    return TaskResult(task, qs, preds, [f"out{i}" for i in range(4)], 1.0)


def test_results_merge_tasks_and_samples(tmp_path, tiny_mistral):
    out = tmp_path / "eval_results" / "toy" / "base"
    cfg = results.config_block(tiny_mistral, "base", dtype="float32")
    results.write_results(out, cfg, [_result("mmlu_pro_cloze", ["A", "A", "B", "A"])], {"decode_tok_s": 1.0})
    results.write_results(out, cfg, [_result("mmlu_pro_cot", ["A", None, "B", None])])
    doc = results.read_json(out / "results.json")
    assert set(doc["results"]) == {"mmlu_pro_cloze", "mmlu_pro_cot"}
    assert doc["results"]["mmlu_pro_cloze"]["acc"] == 0.75 and doc["results"]["mmlu_pro_cot"]["n_unparsed"] == 2
    assert doc["speed"] == {"decode_tok_s": 1.0}  # kept when a later run measures none
    assert doc["config"]["params"] == sum(p.numel() for p in load_check(tiny_mistral).parameters())
    rows = results.read_samples(out, "mmlu_pro_cot")
    assert [r["pred"] for r in rows] == ["A", None, "B", None]
    assert set(rows[0]) == {"question_id", "category", "answer", "pred", "output"}
    rec = TaskResult("mmlu_pro_cot", [Question(0, "q", ("a", "b"), "A", 0, "c")], [None], ["x"], 1.0)
    rec.records = [{"n_shots": 3, "prompt_sha256": "ab"}]
    assert rec.samples()[0]["n_shots"] == 3 and rec.summary()["acc_random_fill"] == 0.5
    with pytest.raises(FileExistsError, match="holds results of model"):
        results.write_results(out, dict(cfg, model="other/model"), [])
    md = results.summary_markdown(out.parent, notes=["skipped x: no manifest"])
    assert "| base |" in md and "skipped x" in md and "mmlu_pro_cot: 2 of 4" in md
    lo, hi = wilson(3, 4)  # cloze: 3 of 4 right, with its 95% interval
    assert f"0.750 [{lo:.3f}, {hi:.3f}]" in md and lo < 0.75 < hi


def test_cot_drops_shots_until_the_prompt_fits(tiny_mmlu):
    from helpers.toy.synth import tiny_tokenizer

    tok = tiny_tokenizer()
    qs, shots = mmlu_pro.load(tiny_mmlu)
    q = qs[0]
    n = lambda k: len(tok(mmlu_pro.cot_prompt(q, shots, k))["input_ids"])  # noqa: E731
    assert n(0) < n(1) < n(2) < n(3)
    prompt, k = mmlu_pro.fit_shots(q, shots, 5, tok, n(2) + 1 + 100, 100)  # < max_model_length - max_new_tokens
    assert k == 2 and prompt == mmlu_pro.cot_prompt(q, shots, 2)
    assert mmlu_pro.fit_shots(q, shots, 5, tok, n(2) + 100, 100)[1] == 1  # equal to the budget: one more dropped
    assert mmlu_pro.fit_shots(q, shots, 5, tok, None)[1] == 5
    assert mmlu_pro.fit_shots(q, shots, 5, tok, 1, 0)[1] == 0  # nothing fits: zero-shot


def test_portable_paths(tmp_path, monkeypatch):
    """Results name paths relative to the repo root when under it; elsewhere as given; hub ids stay."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    assert results.portable(root / "helpers" / "eval") == "helpers/eval"  # absolute, under the repo
    assert results.portable("helpers/eval/../eval") == "helpers/eval"  # relative to the cwd, normalised
    assert results.portable(root) == "."
    assert results.portable(root / "runs" / "not-yet") == "runs/not-yet"  # need not exist
    assert results.portable("TIGER-Lab/MMLU-Pro") == "TIGER-Lab/MMLU-Pro"  # a hub id
    assert results.portable(tmp_path) == str(tmp_path)  # outside the repo: as given
    assert results.portable(None) is None
    cfg = results.config_block(
        root / "runs" / "m", "v", parent_manifest=root / "runs" / "manifest.json", data=str(root / "runs" / "d")
    )
    assert (cfg["model"], cfg["parent_manifest"], cfg["data"]) == ("runs/m", "runs/manifest.json", "runs/d")


@pytest.mark.parametrize(
    "reply, want",
    [
        (" 41 plus 2 is 41 + 2 = 43. The answer is (A).", "C"),  # the text the reasoning ends in, not the letter
        (" Comparing 43, 41, the largest is 43.", "C"),  # no letter at all: still read
        (" Apple is a kind of fruit. The answer is (B).", "D"),  # any case, whole words
        (" 4 plus 1 is 5, not 413. The answer is (C). 41 43", None),  # "41" inside "413" does not count
        ("", None),
    ],
)
def test_cot_text_diagnostic(reply, want):
    q = Question(0, "q", ("41", "42", "43", "apple"), "C", 2, "c")
    assert mmlu_pro.answer_text_pred(q, reply) == want

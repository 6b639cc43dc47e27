"""MMLU-Pro: the official prompts, answer extraction, and the three scorings (data: `mmlu_data`, offered here too).

Modes (each a task name in results.json):
- `cot` (mmlu_pro_cot): the official 5-shot chain-of-thought prompt (first k validation rows of
  the question's category), greedy until "Question:", the official 3-pattern extraction; a reply
  with no letter counts as wrong and is counted in `n_unparsed` (the official script guesses).
- `loglik` (mmlu_pro_loglik): leaderboard style, log-likelihood of " A", " B", ... after
  `{question}\\nA. ..\\nAnswer:`; cheap, but tiny models cannot bind answers to letters.
- `cloze` (mmlu_pro_cloze, mmlu_pro_cloze_norm): log-likelihood of each option's TEXT after
  `Question: {question}\\nAnswer:`, raw sum and divided by the option's length in characters.

Usage: `qs, shots = load("runs/toy/world/mmlu_pro", limit=200); res = evaluate(model, tok, qs, shots, mode="cloze")`
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# the data half lives in mmlu_data; offered here too (mmlu_pro.load, mmlu_pro.Question, ...), as before
from helpers.eval.mmlu_data import CATEGORY_KEYS as CATEGORY_KEYS
from helpers.eval.mmlu_data import HUB_ID as HUB_ID
from helpers.eval.mmlu_data import LETTERS as LETTERS
from helpers.eval.mmlu_data import Question as Question
from helpers.eval.mmlu_data import load as load
from helpers.eval.mmlu_data import question_rows as question_rows
from helpers.eval.mmlu_data import synthetic_rows as synthetic_rows
from helpers.eval.mmlu_data import take as take
from helpers.eval.mmlu_data import to_question as to_question
from helpers.eval.mmlu_data import write_dataset as write_dataset

MODES = ("cot", "loglik", "cloze")

# The official CoT header (classic initial_prompt.txt), then a blank line.
COT_HEADER = (
    "The following are multiple choice questions (with answers) about {subject}. Think step by step and "
    'then finish your answer with "the answer is (X)" where X is the correct letter choice.\n\n'
)
COT_STOP = "Question:"
# Cloze: the question as a context, each option's text as the continuation.
CLOZE_CONTEXT = "Question: {question}\nAnswer:"


# ---- prompts --------------------------------------------------------------------------------
def options_block(q: Question) -> str:
    return "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(q.options))


def cot_example(q: Question, with_answer: bool) -> str:
    """One official CoT block; a shot carries its cot_content with "A:" turned into "Answer:"."""
    s = f"Question:\n{q.question}\nOptions:\n{options_block(q)}"
    if with_answer:
        return s + q.cot_content.replace("A: Let's think step by step.", "Answer: Let's think step by step.") + "\n\n"
    return s + "Answer: Let's think step by step."


def cot_prompt(q: Question, shots: dict[str, list[Question]], k: int = 5) -> str:
    """The official k-shot CoT prompt: header, the first k validation rows of the category, the question."""
    head = COT_HEADER.format(subject=q.category)
    return head + "".join(cot_example(s, True) for s in shots.get(q.category, [])[:k]) + cot_example(q, False)


def loglik_prompt(q: Question, shots: dict[str, list[Question]] | None = None, k: int = 0) -> str:
    """Leaderboard style `{q}\\nA. ..\\nAnswer:`; k > 0 prepends k answered shots of the category."""
    body = lambda x: f"{x.question}\n{options_block(x)}Answer:"  # noqa: E731
    pre = "".join(f"{body(s)} {s.answer}\n\n" for s in (shots or {}).get(q.category, [])[:k])
    return pre + body(q)


def loglik_choices(q: Question) -> list[str]:
    return [f" {L}" for L in q.letters]


def cloze_context(q: Question) -> str:
    return CLOZE_CONTEXT.format(question=q.question)


def cloze_choices(q: Question) -> list[str]:
    return [f" {o}" for o in q.options]


# ---- extraction (official order; no random guess) ------------------------------------------
_P1 = re.compile(r"answer is \(?([A-J])\)?")
_P2 = re.compile(r".*[aA]nswer:\s*([A-J])")
_P3 = re.compile(r"\b[A-J]\b(?!.*\b[A-J]\b)", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The official MMLU-Pro extraction: 'answer is (X)', then 'Answer: X', then the last lone letter."""
    for pat in (_P1, _P2):
        m = pat.search(text)
        if m:
            return m.group(1)
    m = _P3.search(text)
    return m.group(0) if m else None


# ---- scoring --------------------------------------------------------------------------------
@dataclass
class TaskResult:
    """One task's outcome: per-question predictions plus what the schema aggregates."""

    task: str
    questions: list[Question]
    preds: list[str | None]
    outputs: list  # generated text (cot) or per-option scores (loglik, cloze)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    stages: list[str] | None = None  # routed variants: the stage each question went to

    def summary(self) -> dict:
        return (
            summarize(self.questions, self.preds)
            | {
                "seconds": round(self.seconds, 3),
                "questions_per_s": round(len(self.questions) / max(self.seconds, 1e-9), 3),
            }
            | self.extra
        )

    @property
    def correct(self) -> list[bool]:
        """Per question: the prediction is the answer (an unparsed reply is wrong)."""
        return [p == q.answer for q, p in zip(self.questions, self.preds)]

    def samples(self) -> list[dict]:
        rows = [
            dict(question_id=q.question_id, category=q.category, answer=q.answer, pred=p, output=o)
            for q, p, o in zip(self.questions, self.preds, self.outputs)
        ]
        for r, s in zip(rows, self.stages or []):
            r["stage"] = s
        return rows


def summarize(questions: Sequence[Question], preds: Sequence[str | None]) -> dict:
    """{acc (micro), n, n_unparsed, per_category: {cat: {acc, n, n_unparsed}}}; unparsed count as wrong."""
    per: dict[str, Counter] = defaultdict(Counter)
    for q, p in zip(questions, preds):
        c = per[q.category]
        c["n"] += 1
        c["correct"] += int(p == q.answer)
        c["n_unparsed"] += int(p is None)
    n = sum(c["n"] for c in per.values())
    return {
        "acc": sum(c["correct"] for c in per.values()) / n if n else float("nan"),
        "n": n,
        "n_unparsed": sum(c["n_unparsed"] for c in per.values()),
        "per_category": {
            k: {"acc": c["correct"] / c["n"], "n": c["n"], "n_unparsed": c["n_unparsed"]}
            for k, c in sorted(per.items())
        },
    }


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of equal maxima, as numpy.argmax


def score_loglik(
    model, tok, questions: Sequence[Question], shots=None, k: int = 0, batch_size: int = 8, progress: bool = True
) -> TaskResult:
    from helpers.eval.engine import score_choices

    t = time.perf_counter()
    reqs = [(loglik_prompt(q, shots, k), loglik_choices(q)) for q in questions]
    lps = score_choices(model, tok, reqs, batch_size=batch_size, progress=progress, desc="loglik")
    preds = [q.letters[_argmax(lp)] for q, lp in zip(questions, lps)]
    return TaskResult(
        "mmlu_pro_loglik",
        list(questions),
        preds,
        [[round(x, 5) for x in lp] for lp in lps],
        time.perf_counter() - t,
        {"mode": "loglik", "n_shots": k},
    )


def score_cloze(
    model, tok, questions: Sequence[Question], batch_size: int = 8, progress: bool = True
) -> list[TaskResult]:
    """Two tasks from one pass: raw log-likelihood and per-character normalised."""
    from helpers.eval.engine import score_choices

    t = time.perf_counter()
    reqs = [(cloze_context(q), cloze_choices(q)) for q in questions]
    lps = score_choices(model, tok, reqs, batch_size=batch_size, progress=progress, desc="cloze")
    dt = time.perf_counter() - t
    raw = [q.letters[_argmax(lp)] for q, lp in zip(questions, lps)]
    norm_scores = [[x / len(c) for x, c in zip(lp, cloze_choices(q))] for q, lp in zip(questions, lps)]
    norm = [q.letters[_argmax(s)] for q, s in zip(questions, norm_scores)]
    outs = [[round(x, 5) for x in lp] for lp in lps]
    return [
        TaskResult("mmlu_pro_cloze", list(questions), raw, outs, dt, {"mode": "cloze", "normalisation": "none"}),
        TaskResult(
            "mmlu_pro_cloze_norm",
            list(questions),
            norm,
            outs,
            dt,
            {"mode": "cloze", "normalisation": "per character of the option"},
        ),
    ]


def cloze_correct(
    model, tok, questions: Sequence[Question], batch_size: int = 8, normalised: bool = False, progress: bool = True
):
    """[N] bool array: is each question's most likely option (cloze, raw or per-character) its answer."""
    import numpy as np

    raw, norm = score_cloze(model, tok, questions, batch_size=batch_size, progress=progress)
    return np.array((norm if normalised else raw).correct, dtype=bool)


def fit_shots(q: Question, shots, k: int, tok, budget: int | None) -> tuple[str, int]:
    """The CoT prompt with as many of k shots as fit `budget` tokens (the official script's rule).

    The count returned is the shots really in the prompt (fewer when the category has fewer rows)."""
    k = min(k, len(shots.get(q.category, [])))
    while True:
        prompt = cot_prompt(q, shots, k)
        if budget is None or k <= 0 or len(tok(prompt)["input_ids"]) < budget:
            return prompt, max(k, 0)
        k -= 1


def score_cot(
    model,
    tok,
    questions: Sequence[Question],
    shots,
    k: int = 5,
    max_new_tokens: int = 256,
    batch_size: int = 4,
    max_length: int | None = None,
    progress: bool = True,
) -> TaskResult:
    from helpers.eval.engine import generate, model_max_length

    t = time.perf_counter()
    max_length = max_length or model_max_length(model)
    budget = None if max_length is None else max_length - max_new_tokens
    fitted = [fit_shots(q, shots, k, tok, budget) for q in questions]
    texts = generate(
        model,
        tok,
        [p for p, _ in fitted],
        max_new_tokens=max_new_tokens,
        stop=COT_STOP,
        batch_size=batch_size,
        progress=progress,
    )
    preds = [extract_answer(x) for x in texts]
    shots_used = Counter(k_used for _, k_used in fitted)
    return TaskResult(
        "mmlu_pro_cot",
        list(questions),
        preds,
        texts,
        time.perf_counter() - t,
        {"mode": "cot", "n_shots": k, "shots_used": dict(sorted(shots_used.items())), "max_new_tokens": max_new_tokens},
    )


def evaluate(model, tok, questions: Sequence[Question], shots=None, mode: str = "cloze", **kw) -> list[TaskResult]:
    """Score `questions` in one mode; returns the task results (cloze gives raw and normalised)."""
    if mode == "loglik":
        return [score_loglik(model, tok, questions, shots, **kw)]
    if mode == "cloze":
        return score_cloze(model, tok, questions, **kw)
    if mode == "cot":
        return [score_cot(model, tok, questions, shots or {}, **kw)]
    raise ValueError(f"--mode {mode!r}: expected one of {MODES}")


def route_and_score(
    stage_models: dict,
    tok,
    questions: Sequence[Question],
    stage_of: dict | Callable,
    mode: str = "cloze",
    shots=None,
    **kw,
) -> list[TaskResult]:
    """Score each question with the model of the stage chosen for it (a routed variant).

    `stage_of` is {question_id: stage} or a callable (list of questions -> list of stages), e.g. the
    entropy router of helpers/routing.py. Results carry the stage mix overall and per category.
    """
    stages = [
        str(s)
        for s in (stage_of(list(questions)) if callable(stage_of) else [stage_of[q.question_id] for q in questions])
    ]
    unknown = sorted(set(stages) - set(stage_models))
    if unknown:
        raise KeyError(f"router chose stages {unknown}; models exist for {sorted(stage_models)}")
    merged: dict[str, dict] = {}
    for stage in sorted(set(stages)):
        idx = [i for i, s in enumerate(stages) if s == stage]
        for r in evaluate(stage_models[stage], tok, [questions[i] for i in idx], shots, mode=mode, **kw):
            m = merged.setdefault(
                r.task,
                {"preds": [None] * len(questions), "outs": [None] * len(questions), "seconds": 0.0, "extra": r.extra},
            )
            for j, i in enumerate(idx):
                m["preds"][i], m["outs"][i] = r.preds[j], r.outputs[j]
            m["seconds"] += r.seconds
    mix = dict(sorted(Counter(stages).items()))
    per_cat: dict[str, Counter] = defaultdict(Counter)
    for q, s in zip(questions, stages):
        per_cat[q.category][s] += 1
    extra = {
        "stage_mix": mix,
        "stage_mix_per_category": {c: dict(sorted(v.items())) for c, v in sorted(per_cat.items())},
    }
    return [
        TaskResult(task, list(questions), m["preds"], m["outs"], m["seconds"], m["extra"] | extra, stages)
        for task, m in merged.items()
    ]

"""MMLU-Pro: the official prompts, answer extraction, and the three scorings (data: `mmlu_data`, offered here too).

Modes (each a task name in results.json):
- `cot` (mmlu_pro_cot): the official 5-shot chain-of-thought prompt of TIGER-AI-Lab/MMLU-Pro
  evaluate_from_local.py, byte for byte (header, first k validation rows of the question's category,
  shots dropped while the prompt has >= max_model_length - max_new_tokens tokens; official defaults
  k 5, 4096, 2048), greedy until "Question:", the official 3-pattern extraction. Scores side by side:
  `acc` (an unparsed reply is wrong), `n_unparsed`, `acc_random_fill` (each unparsed question counted
  1/len(options): the expectation of the official script's seeded random guess). Optional toy
  diagnostic `mmlu_pro_cot_text` (NOT the official metric): the answer text the reasoning ends in.
- `loglik` (mmlu_pro_loglik): leaderboard style, log-likelihood of " A", " B", ... after
  `{question}\\nA. ..\\nAnswer:`; cheap, but tiny models cannot bind answers to letters.
- `cloze` (mmlu_pro_cloze, mmlu_pro_cloze_norm): log-likelihood of each option's TEXT after
  `Question: {question}\\nAnswer:`, raw sum and divided by the option's length in characters.

Usage: `qs, shots = load("runs/toy/world/mmlu_pro", limit=200); res = evaluate(model, tok, qs, shots, mode="cloze")`
"""

from __future__ import annotations

import hashlib
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

# cot_prompt_lib/initial_prompt.txt as the official script reads it since 2024-05-23 (three newlines at the
# end); the script replaces "{$}" by the category and appends one more newline: the header ends in four.
COT_INITIAL_PROMPT = (
    "The following are multiple choice questions (with answers) about {$}. Think step by step and then "
    'finish your answer with "the answer is (X)" where X is the correct letter choice.\n\n\n'
)
COT_STOP = "Question:"
# a row's cot_content opens with COT_LEAD; the prompt writes it as COT_ASK (shots) and ends with COT_ASK
COT_LEAD, COT_ASK = "A: Let's think step by step.", "Answer: Let's think step by step."
# the official script's constants: shots, context and generation budget (a preset may lower them; results record them)
COT_SHOTS, MAX_MODEL_LENGTH, MAX_NEW_TOKENS = 5, 4096, 2048
# N/A convention of the letter scorings: lm-eval's leaderboard_mmlu_pro keeps the "N/A" padding options
NA_CONVENTION = "N/A padding options dropped (as the official script; lm-eval leaderboard_mmlu_pro keeps them)"
# Cloze: the question as a context, each option's text as the continuation.
CLOZE_CONTEXT = "Question: {question}\nAnswer:"


# ---- prompts --------------------------------------------------------------------------------
def options_block(q: Question) -> str:
    return "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(q.options))


def cot_example(q: Question, with_answer: bool) -> str:
    """One official CoT block; a shot carries its cot_content with "A:" turned into "Answer:"."""
    s = f"Question:\n{q.question}\nOptions:\n{options_block(q)}"
    if with_answer:
        return s + q.cot_content.replace(COT_LEAD, COT_ASK) + "\n\n"
    return s + COT_ASK


def cot_header(category: str) -> str:
    return COT_INITIAL_PROMPT.replace("{$}", category) + "\n"


def cot_prompt(q: Question, shots: dict[str, list[Question]], k: int = COT_SHOTS) -> str:
    """The official k-shot CoT prompt: header, the first k validation rows of the category, the question."""
    head = cot_header(q.category)
    return head + "".join(cot_example(s, True) for s in shots.get(q.category, [])[: max(k, 0)]) + cot_example(q, False)


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
    records: list[dict] | None = None  # per question, added to its sample row (cot: n_shots, prompt_sha256)

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
        for r, x in zip(rows, self.records or []):
            r.update(x)
        return rows


def summarize(questions: Sequence[Question], preds: Sequence[str | None]) -> dict:
    """{acc, acc_random_fill, n, n_unparsed, per_category: {cat: same}}, micro averages.

    `acc` counts an unparsed reply (pred None) wrong; `acc_random_fill` counts it 1/len(options): the
    expectation of the official script's random guess, deterministic (no seed to match).
    """
    per: dict[str, Counter] = defaultdict(Counter)
    for q, p in zip(questions, preds):
        c = per[q.category]
        c["n"] += 1
        c["correct"] += int(p == q.answer)
        c["n_unparsed"] += int(p is None)
        c["fill"] += 1 / len(q.options) if p is None else 0.0
    block = lambda c: {  # noqa: E731
        "acc": c["correct"] / c["n"] if c["n"] else float("nan"),
        "acc_random_fill": (c["correct"] + c["fill"]) / c["n"] if c["n"] else float("nan"),
        "n": c["n"],
        "n_unparsed": c["n_unparsed"],
    }
    return block(sum(per.values(), Counter())) | {"per_category": {k: block(c) for k, c in sorted(per.items())}}


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
        {"mode": "loglik", "n_shots": k, "options": NA_CONVENTION},
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


def fit_shots(
    q: Question,
    shots,
    k: int,
    tok,
    max_model_length: int | None = MAX_MODEL_LENGTH,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> tuple[str, int]:
    """(prompt, shots used): the official rule, k drops by one while the prompt (BOS included) has
    >= max_model_length - max_new_tokens tokens; None: no limit. Stops at 0 shots (the official loop
    would go on to k = -1, i.e. all shots but the last: a prompt that cannot fit either way)."""
    k = min(k, len(shots.get(q.category, [])))  # a category with fewer rows: the shots really there
    while True:
        prompt = cot_prompt(q, shots, k)
        if max_model_length is None or k <= 0:
            return prompt, max(k, 0)
        if len(tok(prompt, verbose=False)["input_ids"]) < max_model_length - max_new_tokens:  # measured: no warning
            return prompt, k
        k -= 1


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def answer_text_pred(q: Question, reply: str) -> str | None:
    """TOY DIAGNOSTIC, not the official metric: the letter of the option whose text the reasoning ends in.

    The reasoning is the reply before its first "answer is"; the option whose text (whole words, any case)
    ends last in it wins, the longest on ties; None when no option text occurs.
    """
    m = _P1.search(reply)
    head = reply[: m.start()] if m else reply
    best, key = None, (-1, -1)
    for i, opt in enumerate(q.options):
        hits = list(re.finditer(rf"(?<!\w){re.escape(opt)}(?!\w)", head, re.IGNORECASE))
        if hits and (hits[-1].end(), len(opt)) > key:
            best, key = q.letters[i], (hits[-1].end(), len(opt))
    return best


def score_cot(
    model,
    tok,
    questions: Sequence[Question],
    shots,
    k: int = COT_SHOTS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 4,
    max_model_length: int | None = MAX_MODEL_LENGTH,
    progress: bool = True,
    text_diagnostic: bool = False,
) -> list[TaskResult]:
    """mmlu_pro_cot (official prompt and extraction), plus the toy diagnostic mmlu_pro_cot_text when asked."""
    from helpers.eval.engine import generate, model_max_length

    own = model_max_length(model)
    if max_model_length is not None and own is not None and max_model_length > own:
        raise ValueError(f"max_model_length {max_model_length} > the model's max_position_embeddings {own}: lower it")
    t = time.perf_counter()
    fitted = [fit_shots(q, shots, k, tok, max_model_length, max_new_tokens) for q in questions]
    texts = generate(
        model,
        tok,
        [p for p, _ in fitted],
        max_new_tokens=max_new_tokens,
        stop=COT_STOP,
        batch_size=batch_size,
        progress=progress,
    )
    dt = time.perf_counter() - t
    records = [{"n_shots": n, "prompt_sha256": sha256_text(p)} for p, n in fitted]
    extra = {
        "mode": "cot",
        "n_shots": k,
        "shots_used": dict(sorted(Counter(n for _, n in fitted).items())),
        "max_model_length": max_model_length,
        "max_new_tokens": max_new_tokens,
        "stop": COT_STOP,
        "decoding": "greedy",
        "chat_template": False,
    }
    qs = list(questions)
    out = [TaskResult("mmlu_pro_cot", qs, [extract_answer(x) for x in texts], texts, dt, extra, records=records)]
    if text_diagnostic:
        note = "toy diagnostic, NOT the official metric: the option text the reasoning ends in"
        preds = [answer_text_pred(q, x) for q, x in zip(qs, texts)]
        out.append(TaskResult("mmlu_pro_cot_text", qs, preds, texts, dt, extra | {"metric": note}, records=records))
    return out


def evaluate(model, tok, questions: Sequence[Question], shots=None, mode: str = "cloze", **kw) -> list[TaskResult]:
    """Score `questions` in one mode; returns the task results (cloze gives raw and normalised)."""
    if mode == "loglik":
        return [score_loglik(model, tok, questions, shots, **kw)]
    if mode == "cloze":
        return score_cloze(model, tok, questions, **kw)
    if mode == "cot":
        return score_cot(model, tok, questions, shots or {}, **kw)
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
    n = len(questions)
    for stage in sorted(set(stages)):
        idx = [i for i, s in enumerate(stages) if s == stage]
        for r in evaluate(stage_models[stage], tok, [questions[i] for i in idx], shots, mode=mode, **kw):
            m = merged.setdefault(
                r.task,
                {"preds": [None] * n, "outs": [None] * n, "recs": [{}] * n, "seconds": 0.0, "extra": r.extra},
            )
            for j, i in enumerate(idx):
                m["preds"][i], m["outs"][i] = r.preds[j], r.outputs[j]
                m["recs"][i] = (r.records or [{}] * len(idx))[j]
            m["seconds"] += r.seconds
    mix = dict(sorted(Counter(stages).items()))
    per_cat: dict[str, Counter] = defaultdict(Counter)
    for q, s in zip(questions, stages):
        per_cat[q.category][s] += 1
    extra = {
        "stage_mix": mix,
        "stage_mix_per_category": {c: dict(sorted(v.items())) for c, v in sorted(per_cat.items())},
    }
    for m in merged.values():
        if "shots_used" in m["extra"]:  # over every stage's questions, not the first stage's
            m["extra"] = m["extra"] | {"shots_used": dict(sorted(Counter(r["n_shots"] for r in m["recs"]).items()))}
    return [
        TaskResult(task, list(questions), m["preds"], m["outs"], m["seconds"], m["extra"] | extra, stages, m["recs"])
        for task, m in merged.items()
    ]

"""LightEval 0.13 through its Python API, offline, on our MMLU-Pro prompts; results in our schema.

Two custom tasks over the same local data (a dir in the hub layout that lighteval loads as
`hf_repo` with `hf_subset="default"`): `mmlu_pro_loglik` (letters, the exact prompt of
mmlu_pro.loglik_prompt, metric loglikelihood_acc) and `mmlu_pro_cot` (the official 5-shot prompt
built inside the prompt function per category, greedy until "Question:", scored with
mmlu_pro.extract_answer). The offline traps (shared/notes/facts.md) are handled here: the task
registry is limited to our tasks (the built-in modules, some of which download at import, are
never imported), the chat template is off, the prediction cache goes to a fresh temp dir and is
disabled. LightEval's own results/ and details/ are kept under `<out>/lighteval/<mode>/`, the
latest run of each mode (a later loglik run leaves the cot output that results.json points at).

LightEval writes its model and task configs into its results json, paths included: the temp dir
(`cache_dir`, and `hf_repo`, the temp copy of the scored questions, both deleted after the run) and
the tokenizer / model dirs as this process saw them. The kept files name the temp dir `<tmp>` and the
model by its `source` (`results.portable`: repo-relative under the repo, a hub id as given), so
committed results carry no machine's absolute path (`_make_portable`; the numbers are untouched).

Usage: `tasks = run_lighteval("runs/toy/world/mistral", questions, shots, "eval_results/toy/mistral", ("loglik",))`
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import types
from collections.abc import Sequence
from pathlib import Path

from helpers.eval import mmlu_pro
from helpers.eval.mmlu_pro import Question, TaskResult
from helpers.eval.results import portable

TASKS = {"loglik": "mmlu_pro_loglik", "cot": "mmlu_pro_cot"}
RESULT_NAMES = {"loglik": "lighteval_loglik", "cot": "lighteval_cot"}
TMP = "<tmp>"  # what kept files say for the run's temp dir (deleted after the run)


def _extract_metric():
    """A sample-level metric: 1 if the official extraction of the generation equals the gold letter."""
    import numpy as np
    from lighteval.metrics.metrics_sample import SampleLevelComputation
    from lighteval.metrics.utils.metric_utils import SampleLevelMetric
    from lighteval.tasks.requests import SamplingMethod

    class OfficialExtraction(SampleLevelComputation):
        def compute(self, doc, model_response, **kwargs) -> int:
            pred = mmlu_pro.extract_answer(model_response.final_text[0])
            return int(pred is not None and pred == doc.specific["answer"])

    return SampleLevelMetric(
        metric_name="acc",
        sample_level_fn=OfficialExtraction(),
        category=SamplingMethod.GENERATIVE,
        corpus_level_fn=np.mean,
        higher_is_better=True,
    )


def task_configs(
    data_dir,
    shots: dict[str, list[Question]],
    modes: Sequence[str],
    loglik_shots: int = 0,
    cot_shots: int = 5,
    max_new_tokens: int = 2048,
) -> list:
    """LightevalTaskConfigs reading `data_dir` (hub layout) with prompt functions equal to ours."""
    from lighteval.metrics.metrics import Metrics
    from lighteval.tasks.lighteval_task import LightevalTaskConfig
    from lighteval.tasks.requests import Doc

    def specific(q: Question) -> dict:
        return {"question_id": q.question_id, "category": q.category, "answer": q.answer}

    def loglik_doc(line, task_name: str = None):
        q = mmlu_pro.to_question(line)
        return Doc(
            task_name=task_name,
            query=mmlu_pro.loglik_prompt(q, shots, loglik_shots),
            choices=mmlu_pro.loglik_choices(q),
            gold_index=q.answer_index,
            specific=specific(q),
        )

    def cot_doc(line, task_name: str = None):
        q = mmlu_pro.to_question(line)
        return Doc(
            task_name=task_name,
            query=mmlu_pro.cot_prompt(q, shots, cot_shots),
            choices=[q.answer],
            gold_index=0,
            specific=specific(q),
        )

    common = dict(
        hf_repo=str(data_dir),
        hf_subset="default",
        hf_avail_splits=["test", "validation"],
        evaluation_splits=["test"],
        few_shots_split=None,
        few_shots_select="sequential",
        version=0,
    )
    out = []
    if "loglik" in modes:
        out.append(
            LightevalTaskConfig(
                name=TASKS["loglik"], prompt_function=loglik_doc, metrics=[Metrics.loglikelihood_acc], **common
            )
        )
    if "cot" in modes:
        out.append(
            LightevalTaskConfig(
                name=TASKS["cot"],
                prompt_function=cot_doc,
                metrics=[_extract_metric()],
                generation_size=max_new_tokens,
                stop_sequence=[mmlu_pro.COT_STOP],
                **common,
            )
        )
    bad = sorted(set(modes) - set(TASKS))
    if bad:
        raise ValueError(f"lighteval --mode {bad[0]!r}: expected one of {sorted(TASKS)}")
    return out


@contextlib.contextmanager
def only_our_tasks():
    """Build lighteval's registry from our custom tasks alone (no built-in task module is imported:
    tiny_benchmarks downloads at import and mt_bench/mix_eval break with huggingface_hub 2.x)."""
    from lighteval.tasks.registry import Registry

    original = Registry.__dict__["load_all_task_configs"]

    def load_custom_only(custom_tasks=None, load_multilingual: bool = False):
        return Registry._extract_configs(Registry.create_custom_tasks_module(custom_tasks)) if custom_tasks else {}

    Registry.load_all_task_configs = staticmethod(load_custom_only)
    try:
        yield
    finally:
        Registry.load_all_task_configs = original


def _write_subset(questions: Sequence[Question], shots: dict[str, list[Question]], out: Path) -> Path:
    val = [s for v in shots.values() for s in v]
    return mmlu_pro.write_dataset(out, mmlu_pro.question_rows(questions), mmlu_pro.question_rows(val))


@contextlib.contextmanager
def _keep_grad_mode():
    """lighteval turns autograd off process-wide (at import and per model); put it back after."""
    import torch

    was = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(was)


@_keep_grad_mode()  # a fresh context per call: grad mode restored however lighteval leaves it
def run_lighteval(
    model,
    questions: Sequence[Question],
    shots: dict[str, list[Question]],
    out_dir,
    modes: Sequence[str] = ("loglik",),
    tokenizer=None,
    batch_size: int = 8,
    max_length: int | None = None,
    loglik_shots: int = 0,
    cot_shots: int = 5,
    max_new_tokens: int = 2048,
    device: str | None = None,
    dtype: str = "float32",
    name: str | None = None,
    source=None,
) -> list[TaskResult]:
    """Evaluate `model` (checkpoint dir, or an in-memory model with `tokenizer` a dir) with lighteval.

    The questions are written as a local dataset so lighteval scores exactly the same set; its
    own output lands in `<out_dir>/lighteval/<mode>/`, its paths made portable (`source`: how those
    files name the model dir / tokenizer dir, e.g. the hub id they came from; default: the dir itself).
    Returns one TaskResult per mode (task names lighteval_loglik / lighteval_cot), with lighteval's
    aggregate kept as `lighteval_acc`.
    """
    from lighteval.logging.evaluation_tracker import EvaluationTracker
    from lighteval.models.transformers.transformers_model import TransformersModelConfig
    from lighteval.pipeline import ParallelismManager, Pipeline, PipelineParameters

    in_memory = not isinstance(model, (str, Path))
    if in_memory and tokenizer is None:
        raise ValueError("lighteval on an in-memory model needs tokenizer=<dir with the tokenizer files>")
    if not in_memory and not Path(model).is_dir():
        raise FileNotFoundError(f"{model}: no such model directory")
    if device is None:
        from helpers.core.models import default_device, model_device

        device = str(model_device(model)) if in_memory else default_device()
    n_choices = max(len(q.options) for q in questions)
    subs = {str(p): portable(source or p) for p in (tokenizer, None if in_memory else model) if p is not None}
    out = []
    with tempfile.TemporaryDirectory(prefix="lighteval-") as tmp:
        subs |= {tmp: TMP, str(Path(tmp).resolve()): TMP}
        data_dir = _write_subset(questions, shots, Path(tmp) / "data")
        for mode in modes:  # one pipeline per mode: loglik batches count (question, option) rows
            le_out = Path(out_dir) / "lighteval" / mode
            shutil.rmtree(le_out, ignore_errors=True)  # its files are timestamped: keep only this mode's latest run
            tasks_mod = types.ModuleType("pruning_lab_lighteval_tasks")
            tasks_mod.TASKS_TABLE = task_configs(data_dir, shots, [mode], loglik_shots, cot_shots, max_new_tokens)
            cfg = TransformersModelConfig(
                model_name=(name or "model") if in_memory else str(model),
                tokenizer=str(tokenizer) if tokenizer else None,
                device=device,
                dtype=dtype,
                batch_size=batch_size * n_choices if mode == "loglik" else batch_size,
                max_length=max_length,
                override_chat_template=False,
                cache_dir=str(Path(tmp) / f"cache-{mode}"),
                model_parallel=False,
            )
            params = PipelineParameters(
                launcher_type=ParallelismManager.NONE,
                custom_tasks_directory=tasks_mod,
                bootstrap_iters=0,
                max_samples=None,
            )
            tracker = EvaluationTracker(
                output_dir=str(le_out), save_details=True, results_path_template="{output_dir}/results"
            )
            with only_our_tasks():
                pipe = Pipeline(
                    tasks=f"{TASKS[mode]}|0",
                    pipeline_parameters=params,
                    evaluation_tracker=tracker,
                    model_config=cfg,
                    model=model if in_memory else None,
                )
            pipe.model._cache = None  # keyed on the config, not the weights: never reuse predictions
            t = time.perf_counter()
            pipe.evaluate()
            seconds = time.perf_counter() - t
            pipe.save_and_push_results()
            _make_portable(le_out, subs, None if in_memory else cfg.model_name)
            out.append(
                _convert(
                    dict(tracker.metrics_logger.metric_aggregated),
                    pipe.get_details(),
                    questions,
                    mode,
                    seconds,
                    le_out,
                    Path(out_dir),
                )
            )
    return out


def _make_portable(le_out: Path, subs: dict[str, str], model_name: str | None = None) -> None:
    """Rewrite the paths LightEval wrote into its results json (`subs`: old prefix -> new, longest first,
    as JSON-escaped text so the rest of the file stays byte for byte); a checkpoint-dir run's details
    dir, named after the dir, moves to the portable name."""
    pairs = [(json.dumps(o)[1:-1], json.dumps(n)[1:-1]) for o, n in subs.items() if o and o != n]
    pairs.sort(key=lambda p: -len(p[0]))  # a dir inside another is rewritten before its parent
    for f in le_out.rglob("results_*.json"):
        text = f.read_text()
        for old, new in pairs:
            text = text.replace(old, new)
        f.write_text(text)
    new_name = subs.get(model_name, model_name) if model_name else None
    if new_name and new_name != model_name:
        old_dir, new_dir = le_out / "details" / model_name.strip("/"), le_out / "details" / new_name.strip("/")
        if old_dir.is_dir():
            new_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(old_dir, new_dir)
            for d in [*old_dir.parents][: len(old_dir.relative_to(le_out / "details").parts) - 1]:
                if not any(d.iterdir()):
                    d.rmdir()  # the now empty dirs the absolute name left


def _convert(
    aggregated: dict,
    details: dict,
    questions: Sequence[Question],
    mode: str,
    seconds: float,
    le_out: Path,
    out_dir: Path,
) -> TaskResult:
    """LightEval's details -> our TaskResults (per question prediction, in our question order);
    `lighteval_results` is the path of its results file in `le_out`, relative to `out_dir`."""
    import numpy as np

    pos = {q.question_id: i for i, q in enumerate(questions)}
    newest = max(le_out.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    full = f"{TASKS[mode]}|0"
    if full not in details:
        raise KeyError(f"lighteval returned no details for {full}; it has {sorted(details)}")
    preds: list = [None] * len(questions)
    outs: list = [None] * len(questions)
    for d in details[full]:
        doc, resp = d.doc, d.model_response
        i = pos[doc.specific["question_id"]]
        if mode == "loglik":
            lps = list(resp.logprobs)
            preds[i], outs[i] = mmlu_pro.LETTERS[int(np.argmax(lps))], [round(float(x), 5) for x in lps]
        else:
            text = resp.final_text[0]
            preds[i], outs[i] = mmlu_pro.extract_answer(text), text
    missing = [questions[i].question_id for i, o in enumerate(outs) if o is None]
    if missing:
        raise KeyError(f"lighteval scored no output for questions {missing[:5]}")
    their_acc = aggregated.get(full, {}).get("acc")
    return TaskResult(
        RESULT_NAMES[mode],
        list(questions),
        preds,
        outs,
        seconds,
        {
            "mode": mode,
            "lighteval_acc": None if their_acc is None else float(their_acc),
            "lighteval_task": full,
            "lighteval_results": str(newest.relative_to(out_dir)),
        },
    )

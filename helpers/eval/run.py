"""Evaluate one model: run MMLU-Pro modes and LightEval per a Plan, measure speed, merge into results.json.

Usage: `evaluate_dir("runs/toy/world/mistral", "eval_results/toy/mistral_base", Plan(), data="runs/toy/world/mmlu_pro")`
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from helpers.core.models import default_device, default_dtype, load_model
from helpers.core.models import model_dir as checked_dir
from helpers.eval import mmlu_pro, results


@dataclass(frozen=True)
class Plan:
    """What to run on each model. Limits count questions in total (round-robin over categories)."""

    modes: Sequence[str] = ("cloze",)  # of mmlu_pro.MODES, scored by our engine
    limit: int | None = None  # questions for cloze / loglik
    cot_limit: int | None = None  # questions for cot (generation is the expensive mode)
    cot_shots: int = mmlu_pro.COT_SHOTS  # the official defaults: 5 shots, 4096-token context, 2048 new tokens
    loglik_shots: int = 0
    max_new_tokens: int = mmlu_pro.MAX_NEW_TOKENS
    max_model_length: int | None = mmlu_pro.MAX_MODEL_LENGTH
    cot_text: bool = False  # also the toy diagnostic mmlu_pro_cot_text (not the official metric)
    batch_size: int = 8
    lighteval_modes: Sequence[str] = ()  # "loglik", "cot"
    lighteval_limit: int | None = None
    speed: bool = True
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_tasks(
    model,
    tok,
    questions,
    shots,
    plan: Plan,
    tokenizer_dir=None,
    out_dir=None,
    name=None,
    progress: bool = True,
    source=None,
) -> list:
    """Every task of `plan` on one in-memory model (LightEval needs `tokenizer_dir` and `out_dir`).

    `source`: how LightEval's kept files name the model (the hub id or dir given); default `tokenizer_dir`.
    """
    tasks = []
    for mode in plan.modes:
        if mode == "cot":
            tasks += mmlu_pro.evaluate(
                model,
                tok,
                mmlu_pro.take(questions, plan.cot_limit),
                shots,
                mode="cot",
                k=plan.cot_shots,
                max_new_tokens=plan.max_new_tokens,
                max_model_length=plan.max_model_length,
                text_diagnostic=plan.cot_text,
                batch_size=plan.batch_size,
                progress=progress,
            )
        else:
            kw = {"k": plan.loglik_shots} if mode == "loglik" else {}
            tasks += mmlu_pro.evaluate(
                model,
                tok,
                mmlu_pro.take(questions, plan.limit),
                shots,
                mode=mode,
                batch_size=plan.batch_size,
                progress=progress,
                **kw,
            )
    if plan.lighteval_modes:
        from helpers.eval.lighteval_run import run_lighteval

        if tokenizer_dir is None or out_dir is None:
            raise ValueError("lighteval needs the tokenizer dir and an output dir")
        tasks += run_lighteval(
            model,
            mmlu_pro.take(questions, plan.lighteval_limit),
            shots,
            out_dir,
            modes=plan.lighteval_modes,
            tokenizer=tokenizer_dir,
            batch_size=plan.batch_size,
            loglik_shots=plan.loglik_shots,
            cot_shots=plan.cot_shots,
            max_new_tokens=plan.max_new_tokens,
            name=name,
            source=source,
        )
    return tasks


def speed_of(model, plan: Plan) -> dict | None:
    from helpers.eval.engine import measure_speed

    return measure_speed(model, plan.speed_prompt_tokens, plan.speed_new_tokens) if plan.speed else None


def evaluate_dir(
    model_dir,
    out_dir,
    plan: Plan = Plan(),
    *,
    data=None,
    variant: str | None = None,
    dtype: str | None = None,
    parent_manifest=None,
    progress: bool = True,
    loaded=None,
) -> Path:
    """Score one checkpoint (dir or hub id) per `plan` and merge the tasks into `<out_dir>/results.json`.

    results.json names the model as given (`results.portable`: repo-relative when under the repo), not
    the local snapshot a hub id resolves to.

    `loaded`: `mmlu_pro.load(data)` already done by the caller (questions, shots), so that several
    variants read the data once.
    """
    source = model_dir  # recorded as given (a hub id stays one), loaded from its local dir
    model_dir = checked_dir(model_dir)
    device = default_device()
    dtype = dtype or default_dtype(device)
    if plan.lighteval_modes and dtype == "4bit":
        raise ValueError("lighteval with --dtype 4bit: not offered here; use bfloat16")
    questions, shots = loaded or mmlu_pro.load(data)
    if not questions:
        raise ValueError(f"{data or mmlu_pro.HUB_ID}: the test split has no questions; nothing to score")
    variant = variant or Path(out_dir).name
    cfg = results.config_block(
        source,
        variant,
        weights=[model_dir],
        dtype=dtype,
        data=str(data or mmlu_pro.HUB_ID),
        parent_manifest=parent_manifest or results.parent_manifest_of(model_dir),
        plan=asdict(plan),
    )
    model, tok = load_model(model_dir, dtype, device)
    tasks = score_tasks(model, tok, questions, shots, plan, model_dir, out_dir, variant, progress, source)
    path = results.write_results(out_dir, cfg, tasks, speed_of(model, plan))
    del model
    free()
    return path


def cli_evaluate(args) -> int:
    if args.bench == "lighteval" and args.mode == "cloze":
        raise ValueError(
            "--bench lighteval --mode cloze: lighteval runs loglik and cot here; use --bench mmlu-pro for cloze"
        )
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit {args.limit}: must be a positive number of questions")
    common = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_model_length=args.max_model_length,
        cot_shots=args.cot_shots,
    )
    if args.bench == "lighteval":
        plan = Plan(modes=(), lighteval_modes=(args.mode,), lighteval_limit=args.limit, **common)
    else:
        plan = Plan(modes=(args.mode,), limit=args.limit, cot_limit=args.limit, **common)
    path = evaluate_dir(args.model, args.out, plan, data=args.data, variant=args.variant, dtype=args.dtype)
    doc = results.read_json(path)
    for task, r in doc["results"].items():
        fill = r.get("acc_random_fill", r["acc"])
        unparsed = r.get("n_unparsed", 0)
        print(f"{task:22s} acc {r['acc']:.4f}  acc_random_fill {fill:.4f}  n {r['n']}  unparsed {unparsed}")
    print(f"wrote {path}")
    return 0

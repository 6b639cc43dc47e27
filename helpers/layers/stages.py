"""Step 05: stages A / AB / FULL from 04's outputs, entropy routing calibrated and measured, stage A healed.

What notebook 05's Run cell does, in one call: load the stages (A plus bundles, modules shared),
check them against the base (FULL must give its logits exactly), score every question with every
stage (cloze) next to stage A's entropy, calibrate thresholds by stage mix and by accuracy on one
half and measure them on the other (the trade-off curve, AUROC), route a few held-out prompts,
assemble AB and FULL as standalone checkpoints, heal A with LoRA per preset, draw the figures, and
write router_report.json and manifest.json last. The logic lives in `routing`, `bundles`, `scoring`
and helpers.finetune; this module orders the calls and records what they made.

Usage: `result = run(Params(notebook_defaults("notebooks/05_bundles_and_routing.ipynb"))); result.outcomes`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from transformers import AutoTokenizer

from helpers import finetune, plots
from helpers.core import data, memplan
from helpers.core.fsutil import write_json
from helpers.core.manifest import Manifest, output_path
from helpers.core.manifest import load as load_manifest
from helpers.core.models import default_device, default_dtype, load_check
from helpers.core.steps import Params
from helpers.core.verify import Comparison, compare, fingerprint
from helpers.eval import mmlu_pro
from helpers.layers import bundles, routing, scoring, serve, speed

STEP = "05_bundles_and_routing"


@dataclass
class StagesResult:
    """What notebook 05 shows: tables, the report, output and figure paths, the saved manifest."""

    checks: pd.DataFrame  # per stage: layers, max |logit diff| from the base over N_CHECK prompts
    scores: pd.DataFrame  # per question: category, stage A's entropy, each stage's cloze correctness
    by_category: pd.DataFrame  # cloze accuracy per category (rows) and stage (columns)
    outcomes: pd.DataFrame  # held-out half: each single stage and each calibration, routed
    curve: pd.DataFrame  # held-out trade-off: routed accuracy vs average layers per threshold pair
    auroc: dict  # per stage: how well A's entropy flags that stage's errors (all questions)
    demo: pd.DataFrame  # the router on held-out prompts: stage, entropy, tokens/s, time saved vs FULL, text
    speed: dict  # routed throughput measured end to end on the demo prompts beside FULL, A and the ideal
    full_vs_base: Comparison  # assembled stage_full/ against the base, tensor by tensor
    heal_table: pd.DataFrame  # held-out loss and cloze accuracy: A, A healed per preset, FULL
    history: pd.DataFrame  # LoRA training log per preset (long form)
    report: dict  # what router_report.json holds
    manifest: Manifest  # saved as RUN_DIR/manifest.json
    paths: dict[str, Path] = field(default_factory=dict)  # the manifest's outputs but figures
    figures: dict[str, Path] = field(default_factory=dict)  # name -> png under RUN_DIR/figures


@dataclass
class _Ctx:
    """What every part of the step reads: parameters, places, the stages in memory, the questions."""

    p: Params
    run: Path
    manifest: Manifest
    a_dir: Path
    bundles_dir: Path
    base_dir: Path
    device: str
    dtype: torch.dtype
    stages: dict
    tok: object
    layers: dict  # stage -> decoder layers
    questions: list
    prompts: list[str]  # cloze context of each question


@dataclass
class _Calibration:
    is_cal: np.ndarray  # [N] bool: the calibration half (the rest is held out)
    test: dict  # stage -> [N_test] correctness on the held-out half
    fingerprint: str  # stage A's
    mix: routing.Thresholds
    accuracy: routing.Thresholds
    path: Path  # thresholds.json, the SHIP one
    outcomes: pd.DataFrame  # held-out outcome of each single stage and each calibration


def run(p: Params) -> StagesResult:
    """Notebook 05 end to end; writes every output under RUN_DIR, manifest.json last."""
    c = _setup(p)
    checks = _check_stages(c)
    entropy, correct, scores = _score(c)
    cal = _calibrate(c, entropy, correct)
    curve = routing.sweep(entropy[~cal.is_cal], cal.test, c.layers, p.n_grid)
    curve.to_csv(c.run / "tradeoff.csv", index=False)
    auroc = {st: routing.auroc(entropy, ~ok) for st, ok in correct.items()}
    demo, routed_speed = _router_demo(c, cal)
    paths, full_vs_base = _assemble(c)
    heal, healed, heal_table, history = _heal(c, correct)
    figures = _figures(c.run / "figures", entropy, correct, curve, cal.outcomes, heal_table, history)
    report = {
        "stage_checks": checks.to_dict("records"),
        "layers": c.layers,
        "thresholds": routing.Thresholds.load(cal.path).to_dict(),
        "held_out": cal.outcomes.to_dict("records"),
        "auroc_entropy_flags_errors": auroc,
        "router_demo": demo.to_dict("records"),
        "routed_speed": routed_speed,
        "full_vs_base": str(full_vs_base),
        "healing": heal_table.to_dict("records"),
        "healing_training": {name: r.metrics for name, r in heal.items()},
    }
    paths = {"thresholds": cal.path, **paths, "healed_a": healed[p.heal_presets[0]]}
    paths["router_report"] = write_json(c.run / "router_report.json", report)
    _record(c, paths, checks, full_vs_base, cal, report)
    return StagesResult(
        checks=checks,
        scores=scores,
        by_category=scores.groupby("category")[[f"correct_{st}" for st in routing.STAGES]].mean(),
        outcomes=cal.outcomes,
        curve=curve,
        auroc=auroc,
        demo=demo,
        speed=routed_speed,
        full_vs_base=full_vs_base,
        heal_table=heal_table,
        history=history,
        report=report,
        manifest=c.manifest,
        paths=paths,
        figures=figures,
    )


def _setup(p: Params) -> _Ctx:
    """04's outputs from its manifest, the stages in memory (modules shared), tokenizer, questions."""
    run = Path(p.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(STEP, dict(p))
    m04 = load_manifest(p.layer_drop_manifest)
    a_dir, bundles_dir = output_path(m04, "stage_a"), output_path(m04, "bundles")
    base_dir = Path(p.base_model or bundles.read_record(a_dir, bundles_dir)["base"]["path"])
    memplan.announce_step("05", p, base_dir)
    manifest.input("layer_drop_manifest", p.layer_drop_manifest).input("stage_a", a_dir).input("bundles", bundles_dir)
    manifest.input("base", base_dir)
    device = p.device or default_device()
    dtype = getattr(torch, p.dtype or default_dtype(device))
    with manifest.timer("load_stages"):
        stages = bundles.load_stages(a_dir, bundles_dir, dtype=dtype, device=device)
    tok = AutoTokenizer.from_pretrained(a_dir)
    layers = {st: routing.n_layers(stages[st]) for st in routing.STAGES}
    questions, _ = mmlu_pro.load(p.mmlu_data, p.n_questions)
    prompts = [mmlu_pro.cloze_context(q) for q in questions]
    return _Ctx(p, run, manifest, a_dir, bundles_dir, base_dir, device, dtype, stages, tok, layers, questions, prompts)


def _check_stages(c: _Ctx) -> pd.DataFrame:
    """Each stage's logits against the base model's on the first N_CHECK prompts (FULL: exactly 0)."""
    base = load_check(c.base_dir, dtype=c.dtype, device_map=c.device).eval()
    checks = scoring.stage_table(c.stages, c.tok, c.prompts[: c.p.n_check], base=base)
    del base  # a second copy of the full model: freed before scoring
    return checks


def _score(c: _Ctx) -> tuple[np.ndarray, dict, pd.DataFrame]:
    """Stage A's entropy [N] and each stage's cloze correctness [N] per question; writes scores.csv."""
    bs = c.p.batch_size
    with c.manifest.timer("score"):
        entropy = routing.prompt_entropy(c.stages["A"], c.tok, c.prompts, batch_size=bs)
        correct = {st: mmlu_pro.cloze_correct(c.stages[st], c.tok, c.questions, bs) for st in routing.STAGES}
    scores = pd.DataFrame(
        {
            "question_id": [q.question_id for q in c.questions],
            "category": [q.category for q in c.questions],
            "entropy": entropy,
            **{f"correct_{st}": ok for st, ok in correct.items()},
        }
    )
    scores.to_csv(c.run / "scores.csv", index=False)
    return entropy, correct, scores


def _calibrate(c: _Ctx, entropy: np.ndarray, correct: dict) -> _Calibration:
    """Thresholds by mix and by accuracy on a seeded calibration half, measured on the other half.

    Writes thresholds_mix.json, thresholds_accuracy.json, and the SHIP one again as thresholds.json.
    """
    p, n = c.p, len(c.questions)
    is_cal = np.random.default_rng(p.seed).permutation(n) < round(p.calib_frac * n)  # [N]
    cal = {st: ok[is_cal] for st, ok in correct.items()}
    test = {st: ok[~is_cal] for st, ok in correct.items()}
    fp = fingerprint(c.a_dir)
    th_mix = routing.calibrate_mix(entropy[is_cal], p.target_mix, fingerprint=fp)
    target = p.accuracy_keep * cal["FULL"].mean()
    th_acc = routing.calibrate_accuracy(entropy[is_cal], cal, target, c.layers, fingerprint=fp)
    th_mix.save(c.run / "thresholds_mix.json")
    th_acc.save(c.run / "thresholds_accuracy.json")
    path = {"accuracy": th_acc, "mix": th_mix}[p.ship].save(c.run / "thresholds.json")
    outcomes = routing.compare_table(entropy[~is_cal], test, c.layers, {"mix": th_mix, "accuracy": th_acc})
    return _Calibration(is_cal, test, fp, th_mix, th_acc, path, outcomes)


def _router_demo(c: _Ctx, cal: _Calibration) -> tuple[pd.DataFrame, dict]:
    """The first N_DEMO held-out prompts through Router, with thresholds read back from disk (fingerprint
    checked); then the same prompts timed end to end: routed (cascade) beside FULL, A and the ideal."""
    router = serve.Router(c.stages, c.tok, routing.Thresholds.load(cal.path, fingerprint=cal.fingerprint))
    held_out = [q for q, is_cal in zip(c.prompts, cal.is_cal) if not is_cal][: c.p.n_demo]
    demo = router.table(held_out, c.p.max_new_tokens)
    with c.manifest.timer("routed_speed"):
        batches = speed.batches_of(c.tok, held_out, 1)
        m = speed.measure_routed(c.stages, batches, speed.chooser(router.thresholds), new_tokens=c.p.max_new_tokens)
    return demo, {**m, "summary": speed.describe_routed(m)}


def _assemble(c: _Ctx) -> tuple[dict[str, Path], Comparison]:
    """AB and FULL as standalone checkpoints (byte copies, layers renumbered); FULL against the base."""
    with c.manifest.timer("assemble"):
        ab = bundles.assemble(c.a_dir, c.bundles_dir, "AB", c.run / "stage_ab", overwrite=True)
        full = bundles.assemble(c.a_dir, c.bundles_dir, "FULL", c.run / "stage_full", overwrite=True)
    return {"stage_ab": ab, "stage_full": full}, compare(c.base_dir, full)


def _heal(c: _Ctx, correct: dict):
    """LoRA on stage A per HEAL_PRESETS, merged (the first as healed_a/); held-out loss and cloze accuracy.

    Returns ({preset: TrainResult}, {preset: merged dir}, heal table, training history).
    """
    p, run = c.p, c.run
    texts = data.load_texts(p.heal_data, p.n_heal + p.n_heldout, world=p.world_dir, seed=p.seed)
    heldout, rows = texts[: p.n_heldout], [{"text": t} for t in texts[p.n_heldout :]]
    with c.manifest.timer("heal"):
        heal = {
            name: finetune.train_lora(
                c.a_dir,
                rows,
                run / f"adapter_{name}",
                preset=name,
                quantize=p.heal_quantize,
                seed=p.seed,
                overwrite=True,
                **p.heal_overrides,
            )
            for name in p.heal_presets
        }
        healed = {
            name: finetune.merge_adapter(
                c.a_dir,
                r.adapter_dir,
                run / ("healed_a" if name == p.heal_presets[0] else f"healed_a_{name}"),
                overwrite=True,
            )
            for name, r in heal.items()
        }
    models = {"A": c.stages["A"], **{f"A healed ({name})": d for name, d in healed.items()}, "FULL": c.stages["FULL"]}
    table = scoring.model_report(
        models,
        c.tok,
        heldout,
        c.questions,
        batch_size=p.batch_size,
        dtype=c.dtype,
        device=c.device,
        cloze={st: correct[st] for st in ("A", "FULL")},  # flags scored above: not scored again
    )
    history = pd.concat([finetune.history_frame(r.log_history).assign(preset=name) for name, r in heal.items()])
    return heal, healed, table, history


def _figures(figs: Path, entropy, correct, curve, outcomes, heal_table, history) -> dict[str, Path]:
    """The three figures as PNGs under RUN_DIR/figures; closed, so a notebook shows the files, once."""
    figs.mkdir(exist_ok=True)
    makers = {
        "entropy_by_correctness": lambda: plots.entropy_by_correctness(routing.correctness_frame(entropy, correct)),
        "tradeoff": lambda: plots.routing_tradeoff(curve, outcomes),
        "healing": lambda: plots.healing(heal_table, history),
    }
    out = {}
    for name, make in makers.items():
        fig = make()
        out[name] = figs / f"{name}.png"
        fig.savefig(out[name], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return out


def _record(c: _Ctx, paths: dict, checks, full_vs_base: Comparison, cal: _Calibration, report: dict) -> Path:
    """Outputs and metrics into the manifest, saved last as RUN_DIR/manifest.json."""
    m = c.manifest
    for name in ("thresholds", "stage_ab", "stage_full", "healed_a", "router_report"):
        m.output(name, paths[name])
    m.output("figures", c.run / "figures")
    held_out = {
        f"held_out_{r['name'].replace(' ', '_')}": {k: r[k] for k in ("accuracy", "avg_layers")}
        for r in report["held_out"]
    }
    m.metrics(
        full_max_abs_logit_diff=float(checks.set_index("stage").loc["FULL", "max_abs_logit_diff_vs_base"]),
        full_equals_base_tensors=full_vs_base.equal,
        layers=c.layers,
        n_questions=len(c.questions),
        n_calib=int(cal.is_cal.sum()),
        accuracy_target=cal.accuracy.target,
        **held_out,
        heal_loss={r["model"]: r["loss"] for r in report["healing"]},
        routed_over_full_measured=report["routed_speed"]["routed_over_full"],
        ideal_over_full_measured=report["routed_speed"]["ideal_over_full"],
    )
    return m.save(c.p.run_dir)

"""Step 06 as one call: every variant the earlier steps produced, evaluated the same way (notebook 06).

`run(p)` finds the variants through the earlier steps' manifests (a missing step is a note, not an
error), scores each with one `Plan` into `EVAL_ROOT/<variant>/results.json` (+ samples, LightEval's
own output for LIGHTEVAL_VARIANTS), draws the five figures `EVAL_ROOT/figures/{accuracy,categories,
accuracy_vs_params,speed,stage_mix}.png`, writes `EVAL_ROOT/summary.md` and `RUN_DIR/manifest.json`
last. Parameters are notebook 06's (`helpers.core.steps.Params`).

Usage: `r = run(Params(notebook_defaults("notebooks/06_benchmarks.ipynb"))); r.accuracy, r.figures["speed"]`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from helpers import plots
from helpers.benchmarks import variants
from helpers.core import memplan
from helpers.core.manifest import Manifest
from helpers.core.steps import Params
from helpers.eval import Plan, results

STEP = "06_benchmarks"
FIGURES = ("accuracy", "categories", "accuracy_vs_params", "speed", "stage_mix")  # EVAL_ROOT/figures/<name>.png


@dataclass
class BenchmarkResult:
    """What notebook 06 shows: the saved manifest, the variants, the tables behind summary.md, the figures."""

    manifest: Manifest
    variants: object  # DataFrame: variant, family, kind, path, from (the manifest that produced it)
    done: list[str]  # variants evaluated
    notes: list[str]  # skipped variants and why (missing steps first, then evaluation skips)
    eval_notes: list[str]  # the evaluation's own skips (e.g. an optional dependency missing)
    order: list[str]  # variant names in story order (base, fine-tuned, pruned, stages, healed, routed)
    accuracy: object  # DataFrame: variant (rows, story order) x task, accuracy rounded to 3 places
    speed: object  # DataFrame indexed by variant: prefill / decode tokens/s, peak memory, device
    agreement: object  # DataFrame: ours vs LightEval letter scores on the questions both scored
    figures: dict[str, Path]  # FIGURES -> EVAL_ROOT/figures/<name>.png
    summary: Path  # EVAL_ROOT/summary.md


def manifests(p: Params) -> dict[str, str | None]:
    """The earlier steps' manifests, by the names `variants.collect` reads."""
    return {
        "world": p.world_manifest,
        "finetune": p.finetune_manifest,
        "prune": p.prune_manifest,
        "layer_drop": p.layer_drop_manifest,
        "routing": p.routing_manifest,
    }


def plan_of(p: Params) -> Plan:
    """The evaluation plan every variant gets."""
    return Plan(
        modes=p.modes,
        limit=p.limit,
        cot_limit=p.cot_limit,
        cot_shots=p.cot_shots,
        max_new_tokens=p.max_new_tokens,
        max_model_length=p.max_model_length,
        cot_text=p.cot_text,
        batch_size=p.batch_size,
        lighteval_modes=p.lighteval_modes,
        lighteval_limit=p.lighteval_limit,
        speed_prompt_tokens=p.speed_prompt_tokens,
        speed_new_tokens=p.speed_new_tokens,
    )


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    plt.close(fig)  # the notebook shows the saved file, not a second copy
    return path


def draw(root, tables: tuple, headline_task: str, order: list[str]) -> dict[str, Path]:
    """The five figures of `root` (EVAL_ROOT) into `root/figures/`; `tables` = results.tables(root); {name: path}."""
    acc, cats, speed = tables
    fig_dir = Path(root) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = {
        "accuracy": lambda: plots.eval_accuracy(acc, order),
        "categories": lambda: plots.eval_category_heatmap(cats, headline_task, order),
        "accuracy_vs_params": lambda: plots.eval_accuracy_vs_params(acc, headline_task),
        "speed": lambda: plots.eval_speed(speed, order),
        "stage_mix": lambda: plots.eval_stage_mix(results.stage_mix_table(root)),
    }
    return {name: _save(figs[name](), fig_dir / f"{name}.png") for name in FIGURES}


def run(p: Params) -> BenchmarkResult:
    """Collect, evaluate, draw and record step 06; returns what the notebook's Inspect cells show."""
    manifest = Manifest(STEP, dict(p))
    memplan.announce_step("06", p, None)  # a row per hub model in MODELS (the toy world's are tiny)
    paths = manifests(p)
    manifest.inputs(paths)
    found, notes = variants.collect(paths, p.models)
    data = p.data or variants.data_of(p.world_manifest)
    with manifest.timer("evaluate"):
        done, eval_notes = variants.evaluate_all(
            found, p.eval_root, plan_of(p), data, lighteval_variants=p.lighteval_variants, dtype=p.dtype
        )
    notes = notes + eval_notes

    tables = results.tables(p.eval_root)
    acc, _, speed = tables
    order = variants.ordered(acc["variant"])
    figures = draw(p.eval_root, tables, p.headline_task, order)
    accuracy = acc.pivot_table(index="variant", columns="task", values="acc", sort=False).reindex(order).round(3)
    speed = speed.set_index("variant").reindex(variants.ordered(speed["variant"]))
    agreement = results.agreement_table(p.eval_root, p.lighteval_variants)

    summary = results.write_summary(p.eval_root, f"Benchmarks: preset {p.preset}", notes, order)
    manifest.output("eval_results", p.eval_root).output("summary", summary)
    manifest.metrics(variants=done, notes=notes, accuracy=results.accuracy_dict(p.eval_root))
    manifest.save(p.run_dir)
    return BenchmarkResult(
        manifest, variants.table(found), done, notes, eval_notes, order, accuracy, speed, agreement, figures, summary
    )

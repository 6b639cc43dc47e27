"""Step 01 as one call: fine-tune the world's Mixtral with LoRA, merge, check, record (notebook 01 and its CLI).

`run(p)` resolves the base model, trains an adapter on the preset with the notebook's overrides,
folds it into `RUN_DIR/merged`, draws the loss curve to `RUN_DIR/loss_curve.png`, summarises what the
merge changed per tensor kind, load-checks the merged checkpoint, and saves `RUN_DIR/manifest.json`
last. Parameters are notebook 01's (`helpers.core.steps.Params`).

Usage: `r = run(Params(notebook_defaults("notebooks/01_finetune_mixtral.ipynb"))); r.deltas, r.loss_curve`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from helpers import plots
from helpers.core import memplan
from helpers.core.checkpoint import local_dir
from helpers.core.manifest import Manifest, output_path
from helpers.core.models import load_check
from helpers.core.steps import Params
from helpers.finetune.merge import delta_summary, merge_adapter
from helpers.finetune.train import history_frame, sft_dataset, train_lora

STEP = "01_finetune_mixtral"


@dataclass
class FinetuneResult:
    """What notebook 01 shows: the saved manifest, checkpoints, training metrics, merge deltas, loss curve."""

    manifest: Manifest
    base: Path  # local checkpoint dir of the base model
    merged: Path  # RUN_DIR/merged, the standalone fine-tuned checkpoint
    adapter_dir: Path  # RUN_DIR/adapter
    preset: dict  # the LoRA preset as it ran (overrides applied)
    metrics: dict  # train_lora's metrics: eval loss before/after, first/final loss, trainable params, ...
    deltas: object  # DataFrame: per tensor kind, tensors changed by the merge and their relative delta
    history: object  # DataFrame: step, metric (train loss | eval loss), value
    loss_curve: Path  # RUN_DIR/loss_curve.png


def overrides(p: Params) -> dict:
    """The Preset fields the notebook sets (None keeps the preset's value)."""
    return dict(
        steps=p.steps,
        lr=p.lr,
        r=p.r,
        alpha=p.alpha,
        targets=p.targets,
        target_parameters=p.target_parameters,
        max_length=p.max_length,
        batch_size=p.batch_size,
        grad_accum=p.grad_accum,
        warmup_steps=p.warmup_steps,
    )


def run(p: Params) -> FinetuneResult:
    """Train, merge, inspect and record step 01; returns what the notebook's Inspect cells show."""
    manifest = Manifest(STEP, dict(p))
    base = local_dir(p.model or output_path(p.world_manifest, "mixtral"))  # a hub id becomes its local snapshot
    memplan.announce_step("01", p, base)  # prints the row; refuses when the visible GPUs cannot hold it
    world = Path(p.world_manifest).parent
    train_rows = sft_dataset(p.dataset, p.n_train, world=world, split="train", seed=p.seed)
    eval_rows = (
        sft_dataset(p.eval_dataset, p.n_eval, world=world, split="eval", seed=p.seed) if p.eval_dataset else None
    )
    with manifest.timer("train"):
        trained = train_lora(
            base,
            train_rows,
            f"{p.run_dir}/adapter",
            preset=p.lora_preset,
            quantize=p.quantize,
            eval_dataset=eval_rows,
            seed=p.seed,
            overwrite=p.overwrite,
            **overrides(p),
        )
    with manifest.timer("merge"):
        merged = merge_adapter(base, trained.adapter_dir, f"{p.run_dir}/merged", overwrite=p.overwrite)

    history = history_frame(trained.log_history)
    loss_curve = Path(f"{p.run_dir}/loss_curve.png")
    fig = plots.loss_curve(history, title=f"{p.lora_preset} on {p.model or base.name}")
    fig.savefig(loss_curve, dpi=120)
    plt.close(fig)  # the notebook shows the saved file, not a second copy
    deltas = delta_summary(base, merged)
    load_check(merged)  # raises on any missing / unexpected / mismatched key

    manifest.input("base", base, hash=p.hash_checkpoints).input("world", p.world_manifest)
    manifest.output("adapter", trained.adapter_dir).output("merged", merged, hash=p.hash_checkpoints)
    manifest.output("loss_curve", loss_curve)
    manifest.metrics(**trained.metrics, changed=deltas.set_index("kind")["changed"].astype(int).to_dict())
    manifest.save(p.run_dir)
    return FinetuneResult(
        manifest, base, merged, trained.adapter_dir, trained.preset, trained.metrics, deltas, history, loss_curve
    )

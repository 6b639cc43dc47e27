"""LoRA / QLoRA fine-tuning with peft + trl: train an adapter on a preset (merging: `finetune.merge`).

Recipes live in `helpers.finetune.presets`; rows come from `helpers.core.data` ("toy", local files,
hub ids) or are passed as a list / Dataset.

QLoRA (`quantize="4bit"`): nf4, double quant, bf16 compute, `device_map="auto"` on GPUs. bitsandbytes
quantizes Linear modules only, so a MoE model is loaded with per-expert Linear experts
(`helpers.core.moe`): every expert becomes three Linear4bit (Mixtral-8x7B: 24.5 GB of weights, not 91 GB
with the fused stacks left bf16) and the preset's fused target_parameters become per-expert
target_modules (gate_proj / up_proj / down_proj). We do NOT call peft's `prepare_model_for_kbit_training`
(it upcasts every bf16 parameter to fp32); only 1-D ones are upcast. On CPUs with AVX512-BF16,
bitsandbytes repacks a 4-bit weight at its first no-grad forward into a layout with no backward, after
which gradients stop silently (an evaluate() before training triggers it): `prepare_kbit` turns that
repacking off.
Per-expert LoRA factors of an adapter are decoded by `helpers.experts.expert_factors`.

Usage: `r = train_lora("runs/toy/world/mixtral", ds, "runs/toy/01/adapter", preset="mixtral-experts", steps=20)`
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.core import moe
from helpers.core.data import DEFAULT_WORLD, load_sft
from helpers.core.fsutil import atomic_dir, read_json, refuse_existing, write_json
from helpers.core.models import default_device
from helpers.finetune.presets import (
    Preset,
    check_lora_targets,
    get_preset,
    lora_config,
)

QUANTIZE = (None, "4bit")


# ---- data -----------------------------------------------------------------------------------
def sft_dataset(source, n: int | None = None, *, world=DEFAULT_WORLD, split: str = "train", seed: int = 0):
    """Training rows as a `datasets.Dataset` with a "messages" (chat) or "text" column.

    `source`: a Dataset or a list of row dicts (either column, `n` drawn by a seeded shuffle), or
    anything `helpers.core.data.load_sft` reads ("toy" = the world's finetune/<split>.jsonl, a local
    .jsonl/.parquet, a hub id), which gives "messages" rows.
    """
    from datasets import Dataset

    if not isinstance(source, (Dataset, list)):
        return load_sft(source, n, world=world, seed=seed, split=split)
    ds, name = (source, "dataset") if isinstance(source, Dataset) else (Dataset.from_list(source), "rows")
    if "messages" not in ds.column_names and "text" not in ds.column_names:
        raise ValueError(f"{name}: needs a 'messages' or 'text' column, has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{name}: no rows")
    if n is not None and len(ds) > n:
        ds = ds.shuffle(seed=seed).select(range(n))
    return ds


# ---- loading --------------------------------------------------------------------------------
def load_kwargs(quantize: str | None, dev: str | None = None) -> dict:
    """`from_pretrained` kwargs: fp32 on CPU, bf16 + device_map="auto" on GPUs, nf4 with "4bit"."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; use None or '4bit'")
    dev = dev or default_device()
    kw: dict = {"dtype": torch.bfloat16 if dev == "cuda" or quantize else torch.float32}
    if dev == "cuda":
        kw["device_map"] = "auto"  # accelerate places layers over every visible GPU
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return kw


def prepare_kbit(model):
    """Freeze a 4-bit model for LoRA; upcast only 1-D parameters (norms) to fp32.

    peft's prepare_model_for_kbit_training upcasts EVERY bf16 parameter, which would double the
    fused expert stacks bitsandbytes leaves unquantized. Gradient checkpointing is the trainer's.
    """
    for p in model.parameters():
        p.requires_grad_(False)
        if p.ndim == 1 and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    no_cpu_repack(model)
    return model


def no_cpu_repack(model):
    """Turn off (and undo) bitsandbytes' AVX512-BF16 CPU repacking of 4-bit weights: the packed layout is
    inference-only (gemv_4bit, no backward), so a no-grad forward before training would stop gradients."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
            w = m.weight
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
    return model


def load_for_training(model_path, p: Preset, quantize: str | None, kw: dict):
    """(model, preset as it trains). Quantized MoE: per-expert Linear4bit experts, fused target_parameters
    turned into per-expert target_modules (checked against the loaded model); else the stock fused layout."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if quantize and moe.is_moe(AutoConfig.from_pretrained(str(model_path))):
        model = moe.load_per_expert(model_path, **kw)
        p = dataclasses.replace(p, targets=moe.per_expert_targets(p.targets, p.target_parameters), target_parameters=())
        check_lora_targets(model, p, where=str(model_path))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kw)
    if quantize:
        prepare_kbit(model)
    return model, p


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters by dtype (uint8 = bitsandbytes 4-bit storage)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        k = str(p.dtype).removeprefix("torch.")
        out[k] = out.get(k, 0) + p.numel() * p.element_size()
    return out


def sft_kwargs(
    p: Preset, out_dir, *, quantize: str | None, dev: str, seed: int = 0, logging_steps: int | None = None
) -> dict:
    """trl SFTConfig fields for a preset on this device (CPU: use_cpu, no bf16, no checkpointing)."""
    gpu = dev == "cuda"
    return dict(
        output_dir=str(out_dir),
        max_steps=p.steps,
        learning_rate=p.lr,
        lr_scheduler_type=p.scheduler,
        warmup_steps=p.warmup_steps,
        weight_decay=p.weight_decay,
        per_device_train_batch_size=p.batch_size,
        per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum,
        max_length=p.max_length,
        use_cpu=not gpu,
        bf16=gpu or quantize is not None,
        activation_checkpointing=gpu,  # = gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if gpu else None,
        logging_steps=logging_steps or max(1, p.steps // 100),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )


# ---- training -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    adapter_dir: Path
    log_history: list[dict]
    preset: dict
    metrics: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(h["step"], h["loss"]) for h in self.log_history if "loss" in h]


def _progress_callback():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One tqdm bar with the latest loss, instead of a printed dict per logging step."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, desc="train", unit="step")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is not None and logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

        def on_train_end(self, args, state, control, **kw):
            self.bar.close()

    return Progress()


def train_lora(
    model_path,
    dataset,
    out_dir,
    *,
    preset: str,
    quantize: str | None = None,
    eval_dataset=None,
    seed: int = 0,
    overwrite: bool = False,
    logging_steps: int | None = None,
    **overrides,
) -> TrainResult:
    """Train a LoRA adapter on `dataset` and save it (atomically) to `out_dir` with its log history.

    `model_path`: checkpoint dir or hub id. `dataset`/`eval_dataset`: anything `sft_dataset` takes.
    `overrides`: any Preset field (steps, lr, r, alpha, dropout, targets, target_parameters,
    max_length, batch_size, grad_accum, warmup_steps, scheduler, weight_decay).
    With `eval_dataset`, the eval loss is measured before and after training.
    """
    import datasets
    from transformers import AutoConfig, AutoTokenizer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    p = get_preset(preset, **overrides)
    p = dataclasses.replace(p, warmup_steps=min(p.warmup_steps, p.steps // 10))  # what actually runs
    out_dir = refuse_existing(out_dir, overwrite)  # before minutes of training
    check_lora_targets(AutoConfig.from_pretrained(str(model_path)), p, where=str(model_path))
    kw = load_kwargs(quantize)
    dev = default_device()
    train_ds = sft_dataset(dataset, seed=seed)
    eval_ds = sft_dataset(eval_dataset, seed=seed, split="eval") if eval_dataset is not None else None
    tok = AutoTokenizer.from_pretrained(str(model_path))
    if tok.pad_token is None:  # Mistral/Mixtral tokenizers ship none
        tok.pad_token = tok.eos_token
    if "messages" in train_ds.column_names and not tok.chat_template:
        raise ValueError(f"{model_path}: tokenizer has no chat template for 'messages' rows; use 'text' rows")

    set_seed(seed)  # LoRA A init happens inside SFTTrainer
    model, p = load_for_training(model_path, p, quantize, kw)
    bytes_by_dtype = weight_bytes(model)

    with tempfile.TemporaryDirectory(prefix="sft-") as scratch:
        args = SFTConfig(**sft_kwargs(p, scratch, quantize=quantize, dev=dev, seed=seed, logging_steps=logging_steps))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # four map() bars per dataset otherwise
        try:
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=train_ds,
                eval_dataset=eval_ds,
                processing_class=tok,
                peft_config=lora_config(p),
            )
        finally:
            if bars:
                datasets.enable_progress_bars()
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(_progress_callback())
        metrics: dict = {}
        if eval_ds is not None:
            metrics["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        out = trainer.train()
        if eval_ds is not None:
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]
        peft_model = trainer.model
        history = list(trainer.state.log_history)
        if "eval_loss_before" in metrics:  # train() starts a fresh state, dropping the step-0 eval
            history.insert(0, {"step": 0, "eval_loss": metrics["eval_loss_before"]})
        n_train = sum(q.numel() for q in peft_model.parameters() if q.requires_grad)
        losses = [h["loss"] for h in history if "loss" in h]
        metrics.update(
            train_loss=out.training_loss,
            first_loss=losses[0] if losses else None,
            final_loss=losses[-1] if losses else None,
            runtime_s=out.metrics.get("train_runtime"),
            trainable_params=n_train,
            train_rows=len(train_ds),
            weight_bytes=bytes_by_dtype,
            device=dev,
            quantize=quantize,
        )
        info = {
            "model": str(model_path),
            "preset_name": preset,
            "preset": dataclasses.asdict(p),
            "seed": seed,
            "metrics": metrics,
        }
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            peft_model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            write_json(tmp / "log_history.json", history)
            write_json(tmp / "train_config.json", info)
    return TrainResult(out_dir, history, dataclasses.asdict(p), metrics)


def history_frame(log_history):
    """log_history (list or an adapter dir) -> long DataFrame: step, metric (train/eval loss), value."""
    import pandas as pd

    if not isinstance(log_history, list):
        log_history = read_json(Path(log_history) / "log_history.json")
    rows = [
        {"step": h["step"], "metric": name, "value": h[key]}
        for h in log_history
        for key, name in (("loss", "train loss"), ("eval_loss", "eval loss"))
        if key in h
    ]
    return pd.DataFrame(rows, columns=["step", "metric", "value"])


# ---- merging --------------------------------------------------------------------------------

"""LoRA / QLoRA fine-tuning with peft + trl: presets as data, train an adapter, merge it into a checkpoint.

Presets hold real-scale recipes; callers override any field (`steps=20, lr=1e-3`) for the toy world.
"mixtral-experts" reaches the experts as well as attention: transformers 5 keeps Mixtral's experts as
fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), not Linear
modules, so they are targeted with peft's `target_parameters` (one rank-r LoRA per expert).

QLoRA (`quantize="4bit"`): nf4, double quant, bf16 compute, `device_map="auto"` on GPUs (accelerate
spreads a large model over all of them). bitsandbytes quantizes Linear modules only, so the fused
expert stacks stay bf16 (bitsandbytes issue 1849): Mixtral-8x7B needs ~90 GB for its experts alone,
i.e. two 80 GB GPUs or one H200. We also do NOT call peft's `prepare_model_for_kbit_training`,
which upcasts every bf16 parameter (those expert stacks included) to fp32; only 1-D ones are upcast.

Usage: `r = train_lora("runs/toy/world/mixtral", ds, "runs/toy/01/adapter", preset="mixtral-experts", steps=20); merge_adapter("runs/toy/world/mixtral", r.adapter_dir, "runs/toy/01/merged")`
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.fsutil import atomic_dir, write_json

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QUANTIZE = (None, "4bit")


@dataclass(frozen=True)
class Preset:
    """One LoRA recipe. Effective batch = batch_size x grad_accum (x GPUs under data parallel)."""

    targets: tuple[str, ...]  # Linear module names (peft target_modules)
    target_parameters: tuple[str, ...] = ()  # fused 3-D parameters (peft target_parameters)
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0  # must be 0 with target_parameters (peft ParamWrapper cannot drop out)
    lr: float = 2e-4
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 4
    max_length: int = 1024
    scheduler: str = "cosine"
    warmup_steps: int = 100  # train_lora clamps it to steps // 10 for short runs
    weight_decay: float = 0.0
    note: str = ""


PRESETS: dict[str, Preset] = {
    # Expert-importance run: attention + every expert, so the fine-tuning delta shows per expert.
    "mixtral-experts": Preset(
        targets=ATTENTION, target_parameters=FUSED_EXPERTS, r=8, alpha=16, dropout=0.0, lr=2e-4, steps=1000,
        batch_size=4, grad_accum=4, max_length=1024, scheduler="cosine", warmup_steps=30,
        note="LoRA on q/k/v/o and the fused experts (gate_up_proj, down_proj)"),
    # Seed recipe for healing Mistral-7B after layer dropping (3e-4 diverges).
    "mistral-healing": Preset(
        targets=ATTENTION, r=4, alpha=4, dropout=0.05, lr=3e-6, steps=5000, batch_size=4, grad_accum=4,
        max_length=1024, scheduler="cosine", warmup_steps=100, note="q/k/v/o, lr 3e-6, r 4, alpha 4"),
    # Gromov et al. (arXiv 2403.17887): QLoRA, FFN-only, alpha = rank, dropout 0.05, cosine, 100 warmup,
    # 5000 steps of batch 16 on C4; Mistral-7B: lr 3e-6, rank 4.
    "ffn-healing": Preset(
        targets=FFN, r=4, alpha=4, dropout=0.05, lr=3e-6, steps=5000, batch_size=4, grad_accum=4,
        max_length=1024, scheduler="cosine", warmup_steps=100, note="paper's healing: gate/up/down, alpha = rank"),
}


def get_preset(name: str, **overrides) -> Preset:
    """A named preset with fields replaced; unknown names or fields are one-line errors."""
    if name not in PRESETS:
        raise ValueError(f"unknown LoRA preset {name!r}; known: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(Preset)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown LoRA override(s) {bad}; known: {sorted(fields - {'note'})}")
    for k in ("targets", "target_parameters"):
        if k in overrides and overrides[k] is not None:
            v = overrides[k]
            overrides[k] = (v,) if isinstance(v, str) else tuple(v)
    p = dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    if not (p.steps >= 1 and p.r >= 1 and p.batch_size >= 1 and p.grad_accum >= 1 and p.lr > 0):
        raise ValueError(f"preset {name!r}: steps, r, batch_size, grad_accum must be >= 1 and lr > 0")
    if p.target_parameters and p.dropout:
        raise ValueError(f"preset {name!r}: dropout={p.dropout} with target_parameters {list(p.target_parameters)}; "
                         "peft's ParamWrapper needs dropout=0")
    if not (p.targets or p.target_parameters):
        raise ValueError(f"preset {name!r}: no targets and no target_parameters")
    return p


def lora_config(p: Preset):
    from peft import LoraConfig

    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=list(p.targets) or None, target_parameters=list(p.target_parameters) or None)


def check_targets(model_or_config, p: Preset, where: str = "model") -> None:
    """Every target names a Linear module / parameter of the model; else a one-line error."""
    model = model_or_config
    if not isinstance(model, torch.nn.Module):  # a config: build the skeleton on meta, no weights
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    modules = [n for n, _ in model.named_modules()]
    params = [n for n, _ in model.named_parameters()]
    for t in p.targets:
        if not any(n == t or n.endswith("." + t) for n in modules):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in modules if n.startswith("model.layers.0.")} - {"0", ""})
            raise ValueError(f"unknown LoRA target module {t!r} in {where}; layer 0 has {leaves}")
    for t in p.target_parameters:
        if not any(n == t or n.endswith("." + t) for n in params):
            raise ValueError(f"unknown LoRA target parameter {t!r} in {where} (not a MoE model with fused experts?)")


# ---- data -----------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict]:
    # FALLBACK until helpers.data (toy helper) is merged: local jsonl / json / parquet only.
    if path.suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    return rows


def sft_dataset(source, n: int | None = None, *, world="runs/toy/world", split: str = "train", seed: int = 0):
    """Training rows as a `datasets.Dataset` with a "messages" (chat) or "text" column.

    `source`: a Dataset, a list of row dicts, "toy" (the world's finetune/<split>.jsonl), a local
    .jsonl/.parquet, or a hub id (through `helpers.data.load_sft`).
    """
    from datasets import Dataset

    if isinstance(source, Dataset):
        ds, name = source, "dataset"
    elif isinstance(source, list):
        ds, name = Dataset.from_list(source), "rows"
    else:
        name = str(source)
        if name == "toy":
            name = str(Path(world) / "finetune" / f"{split}.jsonl")
        try:
            from helpers.data import load_sft
        except ModuleNotFoundError as e:  # helpers.data not merged yet: local files only
            if e.name != "helpers.data":
                raise
            load_sft = None
        if load_sft is not None:
            ds = load_sft(name, n, world=world, seed=seed)
        else:
            path = Path(name)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such dataset file (hub ids need helpers.data)")
            ds = Dataset.from_list(_read_rows(path))
    if "messages" not in ds.column_names and "text" not in ds.column_names:
        raise ValueError(f"{name}: needs a 'messages' or 'text' column, has {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{name}: no rows")
    if n is not None and len(ds) > n:
        ds = ds.shuffle(seed=seed).select(range(n))
    return ds


# ---- loading --------------------------------------------------------------------------------
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_kwargs(quantize: str | None, dev: str | None = None) -> dict:
    """`from_pretrained` kwargs: fp32 on CPU, bf16 + device_map="auto" on GPUs, nf4 with "4bit"."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; use None or '4bit'")
    dev = dev or device()
    kw: dict = {"dtype": torch.bfloat16 if dev == "cuda" or quantize else torch.float32}
    if dev == "cuda":
        kw["device_map"] = "auto"  # accelerate places layers over every visible GPU
    if quantize == "4bit":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
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
    return model


def weight_bytes(model) -> dict[str, int]:
    """Bytes of the model's parameters by dtype (uint8 = bitsandbytes 4-bit storage)."""
    out: dict[str, int] = {}
    for p in model.parameters():
        k = str(p.dtype).removeprefix("torch.")
        out[k] = out.get(k, 0) + p.numel() * p.element_size()
    return out


def sft_kwargs(p: Preset, out_dir, *, quantize: str | None, dev: str, seed: int = 0,
               logging_steps: int | None = None) -> dict:
    """trl SFTConfig fields for a preset on this device (CPU: use_cpu, no bf16, no checkpointing)."""
    gpu = dev == "cuda"
    return dict(
        output_dir=str(out_dir), max_steps=p.steps, learning_rate=p.lr, lr_scheduler_type=p.scheduler,
        warmup_steps=p.warmup_steps, weight_decay=p.weight_decay,
        per_device_train_batch_size=p.batch_size, per_device_eval_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum, max_length=p.max_length,
        use_cpu=not gpu, bf16=gpu or quantize is not None, activation_checkpointing=gpu,  # = gradient_checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if gpu else None,
        logging_steps=logging_steps or max(1, p.steps // 100), save_strategy="no", eval_strategy="no",
        report_to="none", dataloader_num_workers=0, seed=seed, data_seed=seed, disable_tqdm=True)


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


def train_lora(model_path, dataset, out_dir, *, preset: str, quantize: str | None = None, eval_dataset=None,
               seed: int = 0, overwrite: bool = False, logging_steps: int | None = None, **overrides) -> TrainResult:
    """Train a LoRA adapter on `dataset` and save it (atomically) to `out_dir` with its log history.

    `model_path`: checkpoint dir or hub id. `dataset`/`eval_dataset`: anything `sft_dataset` takes.
    `overrides`: any Preset field (steps, lr, r, alpha, dropout, targets, target_parameters,
    max_length, batch_size, grad_accum, warmup_steps, scheduler, weight_decay).
    With `eval_dataset`, the eval loss is measured before and after training.
    """
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    p = get_preset(preset, **overrides)
    p = dataclasses.replace(p, warmup_steps=min(p.warmup_steps, p.steps // 10))  # what actually runs
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    check_targets(AutoConfig.from_pretrained(str(model_path)), p, where=str(model_path))
    kw = load_kwargs(quantize)
    dev = device()
    train_ds = sft_dataset(dataset, seed=seed)
    eval_ds = sft_dataset(eval_dataset, seed=seed, split="eval") if eval_dataset is not None else None
    tok = AutoTokenizer.from_pretrained(str(model_path))
    if tok.pad_token is None:  # Mistral/Mixtral tokenizers ship none
        tok.pad_token = tok.eos_token
    if "messages" in train_ds.column_names and not tok.chat_template:
        raise ValueError(f"{model_path}: tokenizer has no chat template for 'messages' rows; use 'text' rows")

    set_seed(seed)  # LoRA A init happens inside SFTTrainer
    model = AutoModelForCausalLM.from_pretrained(str(model_path), **kw)
    if quantize:
        prepare_kbit(model)
    bytes_by_dtype = weight_bytes(model)

    with tempfile.TemporaryDirectory(prefix="sft-") as scratch:
        args = SFTConfig(**sft_kwargs(p, scratch, quantize=quantize, dev=dev, seed=seed, logging_steps=logging_steps))
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # four map() bars per dataset otherwise
        try:
            trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                 processing_class=tok, peft_config=lora_config(p))
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
        metrics.update(train_loss=out.training_loss, first_loss=losses[0] if losses else None,
                       final_loss=losses[-1] if losses else None, runtime_s=out.metrics.get("train_runtime"),
                       trainable_params=n_train, train_rows=len(train_ds), weight_bytes=bytes_by_dtype,
                       device=dev, quantize=quantize)
        info = {"model": str(model_path), "preset_name": preset, "preset": dataclasses.asdict(p), "seed": seed,
                "metrics": metrics}
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
        log_history = json.loads((Path(log_history) / "log_history.json").read_text())
    rows = [{"step": h["step"], "metric": name, "value": h[key]}
            for h in log_history for key, name in (("loss", "train loss"), ("eval_loss", "eval loss")) if key in h]
    return pd.DataFrame(rows, columns=["step", "metric", "value"])


# ---- merging --------------------------------------------------------------------------------
def merge_adapter(base_dir, adapter_dir, out_dir, overwrite: bool = False, n_shards: int | None = None) -> Path:
    """Fold a LoRA adapter into its base: a standalone HF checkpoint with legacy expert keys.

    Loads the base unquantized in its own dtype on CPU (Mixtral-8x7B bf16: ~95 GB of RAM), merges
    with peft's merge_and_unload (safe_merge: NaNs raise), saves in about as many shards as a
    local base has (or `n_shards`), atomically.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter directory)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype="auto")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if n_shards is None:
        index = Path(base_dir) / "model.safetensors.index.json"
        n_shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else 1
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max(1, math.ceil(total / n_shards)))
        side = Path(base_dir) if Path(base_dir).is_dir() else adapter_dir
        for f in side.iterdir():  # tokenizer and chat template travel with the weights
            if re.match(r"(tokenizer|special_tokens_map|added_tokens|chat_template|vocab|merges)", f.name):
                shutil.copy2(f, tmp / f.name)
    return out_dir


def expert_factors(adapter_dir) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Fused-expert LoRA factors of an adapter, read from its file alone (no model, nothing merged).

    (layer, "gate_up_proj" | "down_proj") -> (B [E, out, r] with the scale folded in, A [E, r, in]):
    expert e's change is B[e] @ A[e], laid out like the fused parameter (gate_up_proj [2I, H]: w1 rows
    then w3 rows; down_proj [H, I]: w2). peft's ParamWrapper stores lora_A [r*E, in] expert-major
    and lora_B [out, r*E] rank-major (column k*E + e); two parameters of one module nest, and the
    deeper `base_layer.` wrapper holds the one the module defines first (gate_up_proj).
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pat = re.compile(r"layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_A\.weight$")
    out: dict = {}
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        found: dict[int, list[tuple[int, str]]] = {}
        for k in f.keys():
            if m := pat.search(k):
                found.setdefault(int(m.group(1)), []).append((m.group(2).count("base_layer."), k))
        for layer, keys in found.items():
            if len(keys) != 2:
                raise ValueError(f"{adapter_dir}: layer {layer} has {len(keys)} fused-expert LoRA pairs, expected 2")
            for (_, ka), name in zip(sorted(keys, reverse=True), ("gate_up_proj", "down_proj")):
                a, b = f.get_tensor(ka).float(), f.get_tensor(ka.replace("lora_A", "lora_B")).float()
                E = a.shape[0] // r
                A = a.reshape(E, r, -1)  # [E, r, in]
                B = b.reshape(b.shape[0], r, E).permute(2, 0, 1) * scale  # [out, r*E] -> [E, out, r]
                out[(layer, name)] = (B, A)
    return out


def delta_summary(base_dir, merged_dir):
    """Per tensor kind (attention, expert w1/w2/w3, router, ffn, other): how many changed, relative delta.

    Streams both checkpoints one tensor at a time; rel = ||W_merged - W_base|| / ||W_base||.
    """
    import pandas as pd

    from helpers.checkpoint import Checkpoint

    a, b = Checkpoint(base_dir), Checkpoint(merged_dir)

    def kind(n: str) -> str:
        if m := re.search(r"experts\.\d+\.(w[123])\.weight$", n):
            return f"expert {m.group(1)}"
        if "block_sparse_moe.gate" in n or n.endswith("mlp.gate.weight"):
            return "router"
        if re.search(r"self_attn\.[qkvo]_proj", n):
            return "attention"
        if re.search(r"mlp\.(gate|up|down)_proj", n):
            return "ffn"
        return "other"

    rows = []
    for n in a.keys():
        if n not in b:
            continue
        wa, wb = a.get(n).float(), b.get(n).float()
        d = (wb - wa).norm().item()
        rows.append({"kind": kind(n), "tensor": n, "changed": d > 0, "rel_delta": d / max(wa.norm().item(), 1e-12)})
    a.close()
    b.close()
    df = pd.DataFrame(rows)
    return (df.groupby("kind").agg(tensors=("tensor", "size"), changed=("changed", "sum"),
                                   mean_rel_delta=("rel_delta", "mean"), max_rel_delta=("rel_delta", "max"))
            .reset_index())

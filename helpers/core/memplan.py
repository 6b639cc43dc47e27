"""Memory plan: what each notebook needs on the GPU, from the model's config alone (built on the meta device).

Per notebook: weights (nf4 or bf16, counted over the meta model's parameters; a MoE model's experts as
per-expert Linear4bit, `helpers.core.moe`), LoRA parameters, their gradients and AdamW state (fp32),
activations at batch x sequence with gradient checkpointing (one saved hidden state per layer, one
layer recomputed, the fp32 logits and their gradient), the KV cache for evaluation, and a fixed CUDA
overhead. Configs come from a local checkpoint dir, the hub cache, the two gpu models' configs shipped in
`helpers/core/configs/` (offline), or the hub. `check` prints a row and refuses, in one line with the plan,
when the visible GPUs cannot hold it; on CPU it only prints.

Usage: `check(plan_row("01", "mistralai/Mixtral-8x7B-Instruct-v0.1", mode="qlora", batch=4, seq=1024))`
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
GB = 1e9
OVERHEAD = int(1.5 * GB)  # CUDA context, cuBLAS workspaces, allocator slack
NF4_BLOCK, NESTED_BLOCK = 64, 256
MODES = ("qlora", "lora", "forward", "eval", "stream")
LORA_TARGETS = {
    "mixtral-experts": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral-healing": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "ffn-healing": ("gate_proj", "up_proj", "down_proj"),
}


def _fallback_name(model: str) -> Path:
    return CONFIG_DIR / (str(model).replace("/", "--") + ".json")


def load_config(model):
    """A transformers config: local dir, hub cache, shipped fallback (the gpu models), then the hub."""
    from transformers import AutoConfig

    p = Path(str(model))
    if (p / "config.json").is_file():
        return AutoConfig.from_pretrained(str(p))
    try:
        return AutoConfig.from_pretrained(str(model), local_files_only=True)
    except OSError:
        pass
    if _fallback_name(model).is_file():
        d = json.loads(_fallback_name(model).read_text())
        return AutoConfig.for_model(d.pop("model_type"), **d)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"{model}: no local config.json, not in the hub cache, offline, no shipped fallback")
    return AutoConfig.from_pretrained(str(model))


def meta_model(config, per_expert: bool = False):
    """The model skeleton on the meta device (no memory); MoE experts as per-expert Linear if asked."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from helpers.core import moe

    ctx = moe.per_expert(config.model_type) if per_expert and moe.is_moe(config) else contextlib.nullcontext()
    with ctx, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def nf4_bytes(numel: int) -> int:
    """bitsandbytes nf4 with double quant: packed 4-bit data, uint8 absmax per 64-block, fp32 absmax per
    256 of those, the 16-entry nf4 and 256-entry nested code books (fp32) and the fp32 offset."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * (16 + 256 + 1)


def quantized_names(model) -> set[str]:
    """Linear modules bitsandbytes turns into Linear4bit (all but lm_head)."""
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"}


def weight_bytes(model, quant: str | None) -> int:
    """Bytes of the weights: nf4 for every quantized Linear (quant="nf4"), bf16 for everything else."""
    q = quantized_names(model) if quant == "nf4" else set()
    total = 0
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 1)[0]
        total += nf4_bytes(p.numel()) if mod in q else p.numel() * 2
    return total


def lora_params(model, targets, r: int) -> int:
    """LoRA parameters: r x (in + out) per targeted Linear (fused experts count as their per-expert Linears)."""
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    )


def activation_bytes(config, batch: int, seq: int, train: bool, checkpointing: bool = True) -> int:
    """bf16 activations: saved hidden states (one per layer with checkpointing), one layer's working set
    (attention q/k/v/o and the MLP's gate/up/product for top-k experts), fp32 logits (+ gradient if train)."""
    bt, h, layers = batch * seq, config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    k = getattr(config, "num_experts_per_tok", 1)
    layer = bt * (3 * h + 2 * kv) * 2 + bt * k * (3 * config.intermediate_size + h) * 2
    logits = bt * config.vocab_size * 4 * (3 if train else 1)
    if not train:
        return layer + logits
    saved = bt * h * 2 * (layers if checkpointing else 0)
    return saved + (layer * (2 if checkpointing else 2 * layers)) + logits


def kv_bytes(config, batch: int, tokens: int) -> int:
    """bf16 KV cache: 2 x layers x kv heads x head dim per token."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * hd * 2 * batch * tokens


def plan_row(
    notebook: str,
    model,
    *,
    mode: str,
    batch: int,
    seq: int,
    quant: str | None = None,
    r: int = 8,
    lora_preset: str = "mixtral-experts",
    kv_tokens: int = 0,
    note: str = "",
) -> dict:
    """One notebook's need. mode: qlora (nf4 weights + LoRA), lora (bf16 + LoRA), forward (calibration),
    eval (scoring and generation with a KV cache of batch x kv_tokens), stream (two models compared layer
    by layer: their embeddings and heads plus one layer of each in memory)."""
    if mode not in MODES:
        raise ValueError(f"memory plan: mode {mode!r} is not one of {MODES}")
    config = load_config(model)
    quant = "nf4" if mode == "qlora" else quant
    m = meta_model(config, per_expert=quant == "nf4")
    weights = weight_bytes(m, quant)
    if mode == "stream":
        one_layer = sum(p.numel() * 2 for p in m.model.layers[0].parameters())
        weights = 2 * (weights - config.num_hidden_layers * one_layer) + 2 * one_layer
    train = mode in ("qlora", "lora")
    n_lora = lora_params(m, LORA_TARGETS.get(lora_preset, LORA_TARGETS["mixtral-experts"]), r) if train else 0
    acts = activation_bytes(config, batch, seq, train)
    kv = kv_bytes(config, batch, kv_tokens) if mode == "eval" else 0
    row = {
        "notebook": notebook,
        "model": str(model),
        "mode": mode,
        "weights": quant or "bf16",
        "batch": batch,
        "seq": seq,
        "weights_bytes": weights,
        "lora_bytes": n_lora * 4,
        "grad_optim_bytes": n_lora * 12,  # fp32 gradient + AdamW's two moments
        "activation_bytes": acts,
        "kv_bytes": kv,
        "overhead_bytes": OVERHEAD,
        "note": note,
    }
    row["total_bytes"] = sum(v for k, v in row.items() if k.endswith("_bytes"))
    return row


def fmt(row: dict) -> str:
    g = {k: row[k] / GB for k in row if k.endswith("_bytes")}
    return (
        f"[plan {row['notebook']}] {row['model']} {row['mode']} ({row['weights']}, batch {row['batch']} x "
        f"{row['seq']}): weights {g['weights_bytes']:.1f} GB + LoRA {g['lora_bytes']:.2f} + grads/optim "
        f"{g['grad_optim_bytes']:.2f} + activations {g['activation_bytes']:.1f} + KV {g['kv_bytes']:.1f} "
        f"+ overhead {g['overhead_bytes']:.1f} = {g['total_bytes']:.1f} GB"
    )


def gpu_bytes() -> int:
    """Total memory of the visible GPUs (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def check(row: dict, available: int | None = None) -> dict:
    """Print the row; raise MemoryError (one line, with the plan) when the visible GPUs cannot hold it.
    Without CUDA (available 0) it only prints."""
    print(fmt(row), flush=True)
    have = gpu_bytes() if available is None else available
    if have and row["total_bytes"] > have:
        raise MemoryError(
            f"{fmt(row)}; the visible GPUs hold {have / GB:.1f} GB: use more or larger GPUs, or lower batch"
        )
    return row


def _family_dtype(dtype, model) -> str | None:
    """A step's DTYPE ("4bit", "bfloat16", or {family: dtype}) -> "nf4" or None (bf16)."""
    if isinstance(dtype, dict):
        fam = "mixtral" if "mixtral" in str(model).lower() else "mistral"
        dtype = dtype.get(fam)
    return "nf4" if dtype == "4bit" else None


def rows_for(num: str, p, model, heal: dict | None = None) -> list[dict]:
    """Plan rows of step `num` from its Params (notebook names) and the model it loads; 05 also takes its
    healing recipe (`heal`: batch, seq, r, lora_preset). 06 gives a row per model in MODELS."""
    if num == "01":
        mode = "qlora" if p.quantize else "lora"
        return [
            plan_row(num, model, mode=mode, batch=p.batch_size, seq=p.max_length, r=p.r or 8, lora_preset=p.lora_preset)
        ]
    if num == "02":
        return [plan_row(num, model, mode="forward", batch=p.batch_size, seq=p.max_length, note="calibration")]
    if num == "03":  # the prune copies byte ranges; the logit check streams layer by layer
        return [plan_row(num, model, mode="stream", batch=1, seq=256, note="streamed logit check")]
    if num == "04":
        return [plan_row(num, model, mode="forward", batch=p.batch_size, seq=p.seq_len, note="angular distances")]
    if num == "05":
        out = [plan_row(num, model, mode="eval", batch=p.batch_size, seq=2048, kv_tokens=2048 + p.max_new_tokens)]
        if heal:
            out.append(plan_row(num, model, mode="qlora" if p.heal_quantize else "lora", note="healing", **heal))
        return out
    if num == "06":
        models = p.models if isinstance(p.models, dict) else ({str(model): model} if model else {})
        return [
            plan_row(
                num,
                m,
                mode="eval",
                quant=_family_dtype(p.dtype, m),
                batch=p.batch_size,
                seq=2048,
                kv_tokens=2048 + p.max_new_tokens,
                note=name,
            )
            for name, m in models.items()
        ]
    raise ValueError(f"memory plan: no step {num}")


def announce_step(num: str, p, model, heal: dict | None = None) -> list[dict]:
    """Print step `num`'s rows at the start of its run(); refuse (MemoryError, one line) when the GPUs cannot
    hold one. A model whose config cannot be read yet (an earlier step's output) is noted and skipped."""
    try:
        rows = rows_for(num, p, model, heal)
    except (OSError, ValueError, KeyError) as e:
        print(f"[plan {num}] no plan for {model}: {str(e).splitlines()[0]}", flush=True)
        return []
    return [check(r) for r in rows]

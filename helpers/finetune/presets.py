"""LoRA recipes as data: the presets, their overrides, the peft LoraConfig, and a check of their targets.

"mixtral-experts" reaches the experts as well as attention: transformers 5 keeps Mixtral's experts as
fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]), not Linear
modules, so they are targeted with peft's `target_parameters` (one rank-r LoRA per expert).
Presets hold real-scale recipes; callers override any field (`steps=20, lr=1e-3`) for the toy world.

Usage: `cfg = lora_config(get_preset("mistral-healing", steps=20))`
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


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
        targets=ATTENTION,
        target_parameters=FUSED_EXPERTS,
        r=8,
        alpha=16,
        dropout=0.0,
        lr=2e-4,
        steps=1000,
        batch_size=4,
        grad_accum=4,
        max_length=1024,
        scheduler="cosine",
        warmup_steps=30,
        note="LoRA on q/k/v/o and the fused experts (gate_up_proj, down_proj)",
    ),
    # Seed recipe for healing Mistral-7B after layer dropping (3e-4 diverges).
    "mistral-healing": Preset(
        targets=ATTENTION,
        r=4,
        alpha=4,
        dropout=0.05,
        lr=3e-6,
        steps=5000,
        batch_size=4,
        grad_accum=4,
        max_length=1024,
        scheduler="cosine",
        warmup_steps=100,
        note="q/k/v/o, lr 3e-6, r 4, alpha 4",
    ),
    # Gromov et al. (arXiv 2403.17887): QLoRA, FFN-only, alpha = rank, dropout 0.05, cosine, 100 warmup,
    # 5000 steps of batch 16 on C4; Mistral-7B: lr 3e-6, rank 4.
    "ffn-healing": Preset(
        targets=FFN,
        r=4,
        alpha=4,
        dropout=0.05,
        lr=3e-6,
        steps=5000,
        batch_size=4,
        grad_accum=4,
        max_length=1024,
        scheduler="cosine",
        warmup_steps=100,
        note="paper's healing: gate/up/down, alpha = rank",
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    """A named preset with fields replaced (None keeps the preset's value); bad names or fields are one-line errors."""
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
        raise ValueError(
            f"preset {name!r}: dropout={p.dropout} with target_parameters {list(p.target_parameters)}; "
            "peft's ParamWrapper needs dropout=0"
        )
    if not (p.targets or p.target_parameters):
        raise ValueError(f"preset {name!r}: no targets and no target_parameters")
    return p


def lora_config(p: Preset):
    """The peft LoraConfig of a preset (causal LM, no bias)."""
    from peft import LoraConfig

    return LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=list(p.targets) or None,
        target_parameters=list(p.target_parameters) or None,
    )


def check_lora_targets(model_or_config, p: Preset, where: str = "model") -> None:
    """Every target names a Linear module / parameter of the model (or a config's skeleton); else a one-line error."""
    import torch

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

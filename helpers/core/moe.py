"""Mixtral experts as per-expert Linear modules (gate_proj / up_proj / down_proj), for QLoRA and 4-bit eval.

transformers 5 holds Mixtral's experts as fused 3-D parameters (gate_up_proj [E, 2I, H], down_proj
[E, H, I]); bitsandbytes quantizes nn.Linear modules only, so under `load_in_4bit` every expert would stay
bf16 (Mixtral-8x7B: 91 GB of weights instead of 24.5 GB). `load_per_expert` loads the experts as E x 3
nn.Linear per layer through transformers' public extension points: `monkey_patching.register_patch_mapping`
(the experts class) and `register_checkpoint_conversion_mapping` (legacy w1/w2/w3 tensors on disk land in
the per-expert modules; a fused checkpoint is loaded stock and unfused in memory), both registered only
for the duration of the load. The modules are named gate_proj / up_proj / down_proj (= w1 / w3 / w2):
peft remaps targets named w1/w2/w3 onto the fused target_parameters path. `fuse_experts` turns a
per-expert model back into the stock fused layout (a merge saves that way, legacy keys on disk).

Usage: `m = load_per_expert(d, dtype=torch.float32)`; `fuse_experts(m)`; `unfuse_experts(m)`
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

MOE_TYPES = ("mixtral",)
EXPERT_CLASS = "MixtralExperts"
# per-expert module name -> legacy (on-disk) weight name
ROLE_OF = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
PER_EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), three bias-free Linear layers."""

    def __init__(self, hidden: int, inter: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertExperts(nn.ModuleList):
    """Drop-in for MixtralExperts (same forward signature and routing arithmetic), experts as child modules."""

    def __init__(self, config):
        super().__init__(
            ExpertMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
            for _ in range(config.num_local_experts)
        )
        self.num_experts = config.num_local_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            y = self[e](hidden_states[tok]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _conversions():
    """On-disk legacy tensors (block_sparse_moe.experts.e.w1/w2/w3) -> mlp.experts.e.{gate,up,down}_proj.weight;
    the router's block_sparse_moe prefix -> mlp. (A fused checkpoint is loaded stock and `unfuse_experts`.)"""
    from transformers.core_model_loading import WeightRenaming

    ren = [
        WeightRenaming(rf"\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.{w}\.", rf".mlp.experts.\1.{name}.")
        for name, w in ROLE_OF.items()
    ]
    return [*ren, WeightRenaming(".block_sparse_moe.", ".mlp.")]


@contextlib.contextmanager
def per_expert(model_type: str = "mixtral"):
    """While open, `from_pretrained` / `from_config` build Mixtral with PerExpertExperts and load any on-disk
    expert layout into them; on exit the patch is unregistered and the stock conversion mapping restored."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping as stock_mapping
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping as register
    from transformers.monkey_patching import get_patch_mapping, register_patch_mapping, unregister_patch_mapping

    if model_type not in MOE_TYPES:
        raise ValueError(f"per-expert experts: model_type {model_type!r} is not one of {MOE_TYPES}")
    if EXPERT_CLASS in get_patch_mapping():
        raise RuntimeError(f"{EXPERT_CLASS} already has a patch mapping (nested per_expert()?)")
    stock = stock_mapping(model_type)
    register_patch_mapping({EXPERT_CLASS: PerExpertExperts})
    register(model_type, _conversions(), overwrite=True)
    try:
        yield
    finally:
        unregister_patch_mapping([EXPERT_CLASS])
        register(model_type, stock, overwrite=True)


def is_moe(config) -> bool:
    return getattr(config, "model_type", None) in MOE_TYPES


def load_per_expert(path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)` with per-expert Linear experts; refuses any
    missing, unexpected or mismatched key (one line naming them). A checkpoint with fused expert tensors on
    disk is loaded stock and unfused in memory (unquantized only: a 4-bit load needs legacy keys on disk)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers.core import arch
    from helpers.core.checkpoint import Checkpoint, CheckpointError, local_dir

    path = local_dir(path)
    cfg = AutoConfig.from_pretrained(str(path))
    fused = any(arch.FUSED_EXPERT_RE.match(k) for k in Checkpoint(path).keys())
    if fused and "quantization_config" in kwargs:
        raise CheckpointError(
            f"{path}: fused expert tensors on disk; a 4-bit per-expert load needs legacy w1/w2/w3 keys "
            "(re-save with save_pretrained(save_original_format=True))"
        )
    kwargs.setdefault("dtype", torch.float32)
    with contextlib.nullcontext() if fused else per_expert(cfg.model_type):
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, **kwargs)
    bad = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        detail = "; ".join(f"{k}: {v[:4]}{'...' if len(v) > 4 else ''}" for k, v in bad.items())
        raise CheckpointError(f"{path}: does not load cleanly with per-expert experts ({detail})")
    return unfuse_experts(model) if fused else model


def per_expert_targets(targets, target_parameters) -> tuple[str, ...]:
    """peft target_modules for a per-expert model: `targets` plus gate_proj/up_proj (for a fused gate_up_proj
    target) and down_proj (for down_proj); the per-expert model has no fused parameters to target."""
    out = list(targets)
    for t in target_parameters:
        leaf = t.rsplit(".", 1)[-1]
        names = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(leaf)
        if names is None:
            raise ValueError(f"target parameter {t!r}: no per-expert equivalent (expected gate_up_proj or down_proj)")
        out += [n for n in names if n not in out]
    return tuple(out)


def expert_linears(model) -> list[str]:
    """Names of the per-expert Linear (or Linear4bit) modules, in layer, expert, role order."""
    return [n for n, _ in model.named_modules() if PER_EXPERT_RE.search(n)]


@torch.no_grad()
def unfuse_experts(model):
    """In place: every stock fused experts module becomes PerExpertExperts holding the same weights (copies)."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != EXPERT_CLASS:
            continue
        w = mod.gate_up_proj
        with torch.device(w.device):
            per = PerExpertExperts(model.config).to(w.dtype)
        inter = per[0].gate_proj.out_features
        for e, x in enumerate(per):
            x.gate_proj.weight.copy_(mod.gate_up_proj[e, :inter])
            x.up_proj.weight.copy_(mod.gate_up_proj[e, inter:])
            x.down_proj.weight.copy_(mod.down_proj[e])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, per)
    return model


@torch.no_grad()
def fuse_experts(model):
    """In place: every PerExpertExperts becomes the stock fused experts module with the same weights
    (gate_up_proj = [gate; up] rows per expert, down_proj stacked), so save_pretrained writes legacy keys.
    Only for unquantized weights (a 4-bit model is merged from its on-disk base instead)."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    for name, mod in list(model.named_modules()):
        if not isinstance(mod, PerExpertExperts):
            continue
        w = mod[0].gate_proj.weight
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name}: expert weights are {w.dtype}; fuse_experts needs unquantized weights")
        with torch.device(w.device):
            fused = MixtralExperts(model.config).to(w.dtype)
        fused.gate_up_proj.copy_(torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in mod]))
        fused.down_proj.copy_(torch.stack([x.down_proj.weight for x in mod]))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, fused)
    return model

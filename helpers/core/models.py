"""Loading models: one loader, one default device and dtype, weights in owned memory, sharded saves.

`load_check` loads with AutoModelForCausalLM and refuses any missing, unexpected or mismatched key;
`load_model` is the one loader of (model, tokenizer) for scoring and calibration.

Usage: `model, tok = models.load_model("runs/toy/world/mistral")`; `models.load_check(path)`
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.core.checkpoint import CheckpointError, local_dir

if TYPE_CHECKING:
    import torch


def own_memory(model):
    """Copy every parameter and buffer out of the safetensors mmap into fresh allocations.

    Weights loaded straight from a mmap sit at whatever alignment their file offset gives, and
    some CPU kernels round differently on misaligned data (seen: 9e-8 logit drift between the
    same weights loaded from two layouts). Bit-exact comparisons load through this.
    """
    import torch
    import torch.nn as nn

    fresh: dict[int, nn.Parameter] = {}  # by id, so tied weights stay tied
    with torch.no_grad():
        for mod in model.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None:
                    if id(p) not in fresh:
                        fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    mod._parameters[k] = fresh[id(p)]
            for k, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[k] = b.clone()
    return model


def load_check(path, dtype="float32", own: bool = True, **kwargs):
    """Load with AutoModelForCausalLM; raise naming any missing, unexpected or mismatched key.

    `dtype`: a torch dtype, its name, or "auto" (the checkpoint's own dtype).

    `own=True` copies the weights into owned memory (see `own_memory`), so two loads of equal
    tensors give bit-equal logits whatever their on-disk layout.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True, **kwargs)
    if own:
        own_memory(model)
    bad = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        detail = "; ".join(f"{k}: {v[:4]}{'...' if len(v) > 4 else ''}" for k, v in bad.items())
        raise CheckpointError(f"{path}: does not load cleanly ({detail})")
    return model


LOAD_DTYPES = ("float32", "bfloat16", "float16")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> str:
    """bfloat16 on CUDA, float32 elsewhere (CPU kernels are slow or inexact in half precision)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def model_dir(model) -> Path:
    """`checkpoint.local_dir(model)`, checked to hold the config.json transformers loads from."""
    p = local_dir(model)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not a checkpoint directory (no config.json)")
    return p


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tekken.json")


def check_tokenizer(path) -> None:
    """A local model dir without any tokenizer file fails in one line naming it (not 'install sentencepiece')."""
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{p}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); copy them from the model it was made from"
        )


def load_tokenizer(path):
    from transformers import AutoTokenizer

    check_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def load_model(model, dtype: str | None = None, device: str | None = None):
    """(model in eval mode, tokenizer) from a checkpoint dir or hub id, through `load_check`.

    `dtype`: one of LOAD_DTYPES, "4bit" (bitsandbytes NF4, bf16 compute; a MoE model's experts as per-expert
    Linear4bit through `helpers.core.moe`, else they would stay bf16) or None (`default_dtype`).
    On CPU the weights are copied into owned memory (bit-reproducible logits, see `own_memory`).
    """
    import torch
    from transformers import AutoConfig

    path = model_dir(model)
    check_tokenizer(path)
    device = str(device or default_device())
    dtype = dtype or default_dtype(device)
    if dtype == "4bit":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(  # as QLoRA loads it, and as the memory plan counts it
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
        )
        from helpers.core import moe

        kw = dict(dtype=torch.bfloat16, quantization_config=q, device_map=device)
        moe_model = moe.is_moe(AutoConfig.from_pretrained(str(path)))
        m = moe.load_per_expert(path, **kw) if moe_model else load_check(path, own=False, **kw)
    elif dtype in LOAD_DTYPES:
        on_cpu = device == "cpu"
        m = load_check(path, dtype=dtype, own=on_cpu, **({} if on_cpu else {"device_map": device}))
    else:
        raise ValueError(f"--dtype {dtype!r}: expected one of {[*LOAD_DTYPES, '4bit']}")
    return m.eval(), load_tokenizer(path)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def save_sharded(model, out, n_shards: int, fused: bool = False) -> Path:
    """`model.save_pretrained(out)` in about `n_shards` shards (transformers packs greedily, so
    sometimes one more); legacy expert keys unless `fused`. Weights and config only."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(out, max_shard_size=max(1, math.ceil(total / n_shards)), save_original_format=not fused)
    return Path(out)

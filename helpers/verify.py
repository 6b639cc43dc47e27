"""Checking checkpoints: tensor-by-tensor comparison by hash, clean loading, weights in owned memory.

`load_model` is the one loader of (model, tokenizer) for scoring and calibration, with the one
default device and dtype (`default_device`, `default_dtype`).

Usage: `assert verify.compare("a/", "b/").equal; model = verify.load_check("b/")`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from helpers.checkpoint import Checkpoint, CheckpointError, local_dir
from helpers.fsutil import file_sha256


@dataclass
class Comparison:
    only_a: list[str]
    only_b: list[str]
    differ: list[str]  # same name, different dtype, shape or bytes
    n_equal: int

    @property
    def equal(self) -> bool:
        return not (self.only_a or self.only_b or self.differ)

    def __str__(self) -> str:
        if self.equal:
            return f"identical: {self.n_equal} tensors"
        return (f"{self.n_equal} equal, {len(self.differ)} differ {self.differ[:3]}, "
                f"{len(self.only_a)} only in a {self.only_a[:3]}, {len(self.only_b)} only in b {self.only_b[:3]}")


def tensor_sha256(ck: Checkpoint, name: str) -> str:
    i = ck.info(name)
    return file_sha256(ck.path / i.shard, i.start, i.nbytes)


def compare(a, b) -> Comparison:
    """Compare two checkpoints tensor by tensor: names, dtype, shape and sha256 of the bytes."""
    ca, cb = Checkpoint(a), Checkpoint(b)
    ka, kb = set(ca.keys()), set(cb.keys())
    differ, n_equal = [], 0
    for n in tqdm([n for n in ca.keys() if n in kb], desc="compare", leave=False):  # shard order
        ia, ib = ca.info(n), cb.info(n)
        same = (ia.dtype, ia.shape) == (ib.dtype, ib.shape) and tensor_sha256(ca, n) == tensor_sha256(cb, n)
        if same:
            n_equal += 1
        else:
            differ.append(n)
    return Comparison(sorted(ka - kb), sorted(kb - ka), differ, n_equal)


def shard_map(ck) -> dict[str, str]:
    """tensor name -> shard file of a checkpoint (path or Checkpoint)."""
    ck = ck if isinstance(ck, Checkpoint) else Checkpoint(ck)
    return {n: i.shard for n, i in ck.infos.items()}


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


# ---- loading for scoring --------------------------------------------------------------------
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


def load_model(model, dtype: str | None = None, device: str | None = None):
    """(model in eval mode, tokenizer) from a checkpoint dir or hub id, through `load_check`.

    `dtype`: one of LOAD_DTYPES, "4bit" (bitsandbytes NF4, bf16 compute) or None (`default_dtype`).
    On CPU the weights are copied into owned memory (bit-reproducible logits, see `own_memory`).
    """
    import torch
    from transformers import AutoTokenizer

    path = model_dir(model)
    device = str(device or default_device())
    dtype = dtype or default_dtype(device)
    if dtype == "4bit":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        m = load_check(path, dtype=torch.bfloat16, own=False, quantization_config=q, device_map=device)
    elif dtype in LOAD_DTYPES:
        on_cpu = device == "cpu"
        m = load_check(path, dtype=dtype, own=on_cpu, **({} if on_cpu else {"device_map": device}))
    else:
        raise ValueError(f"--dtype {dtype!r}: expected one of {[*LOAD_DTYPES, '4bit']}")
    return m.eval(), AutoTokenizer.from_pretrained(path)


# ---- command line ---------------------------------------------------------------------------
def cli_compare(args) -> int:
    c = compare(args.a, args.b)
    print(c)
    return 0 if c.equal else 1


def cli_load_check(args) -> int:
    model = load_check(args.model, dtype="auto", own=False)  # a key check: no fp32 upcast, no copies
    print(f"{args.model}: loads cleanly ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0

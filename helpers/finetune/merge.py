"""Folding a LoRA adapter into its base checkpoint, and what the merge changed per tensor kind.

Usage: `merged = merge_adapter("runs/toy/world/mixtral", "runs/toy/01/adapter", "runs/toy/01/merged")`
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers.core import arch, moe
from helpers.core.checkpoint import SIDE_FILES, Checkpoint, local_dir
from helpers.core.compat import make_portable
from helpers.core.fsutil import atomic_dir, refuse_existing
from helpers.core.models import load_check, save_sharded
from helpers.core.txn import check_overlap


def merge_adapter(base_dir, adapter_dir, out_dir, overwrite: bool = False, n_shards: int | None = None) -> Path:
    """Fold a LoRA adapter into its base: a standalone HF checkpoint with legacy expert keys.

    `base_dir`: a checkpoint dir or hub id (resolved to its local snapshot). Loads the base
    unquantized in its own dtype on CPU (Mixtral-8x7B bf16: ~95 GB of RAM), refusing one with
    missing or unexpected keys, merges with peft's merge_and_unload (safe_merge: NaNs raise), saves
    in about as many shards as the base has (or `n_shards`) with its tokenizer files, atomically.
    An adapter trained on per-expert Linear experts (QLoRA, `helpers.core.moe`) is merged into the base
    unfused in memory, then fused back, whichever layout (legacy or fused) the base has on disk.
    """
    from peft import PeftModel

    adapter_dir, out_dir = Path(adapter_dir), refuse_existing(out_dir, overwrite)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (not a LoRA adapter directory)")
    base_dir = local_dir(base_dir)
    check_overlap({"base": base_dir, "adapter": adapter_dir}, {"out": out_dir})
    base = load_check(base_dir, dtype="auto", own=False)
    per = is_per_expert_adapter(adapter_dir)
    if per:
        moe.unfuse_experts(base)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    if per:
        moe.fuse_experts(model)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_sharded(model, tmp, n_shards or len(Checkpoint(base_dir).shards))
        for f in SIDE_FILES:  # tokenizer and chat template travel with the weights
            if (base_dir / f).exists() and not (tmp / f).exists():  # keep what save_pretrained wrote
                shutil.copy2(base_dir / f, tmp / f)
        make_portable(tmp)  # transformers 4.57 reads it too
    return out_dir


def is_per_expert_adapter(adapter_dir) -> bool:
    """True when the adapter's LoRA sits on per-expert modules (mlp.experts.{e}.gate_proj ...)."""
    from safetensors import safe_open

    f = Path(adapter_dir) / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (a peft LoRA adapter directory?)")
    with safe_open(str(f), framework="pt") as h:
        return any(re.search(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.lora_", k) for k in h.keys())


def _kind(name: str) -> str:
    """attention, expert w1/w2/w3, router, ffn or other, for a tensor of a saved (legacy-key) checkpoint."""
    if m := arch.LEGACY_EXPERT_RE.match(name):
        return f"expert {m.group(3)}"
    if "block_sparse_moe.gate" in name or name.endswith("mlp.gate.weight"):
        return "router"
    if re.search(r"self_attn\.[qkvo]_proj", name):
        return "attention"
    if re.search(r"mlp\.(gate|up|down)_proj", name):
        return "ffn"
    return "other"


def delta_summary(base_dir, merged_dir):
    """Per tensor kind (attention, expert w1/w2/w3, router, ffn, other): how many changed, relative delta.

    Streams both checkpoints one tensor at a time; rel = ||W_merged - W_base|| / ||W_base||.
    `base_dir`: a checkpoint dir or hub id (its local snapshot is read).
    """
    import pandas as pd

    rows = []
    with Checkpoint(local_dir(base_dir)) as a, Checkpoint(merged_dir) as b:
        for n, wa in a.iter():
            if n not in b:
                continue
            wa = wa.float()
            d = (b.get(n).float() - wa).norm().item()
            rows.append(
                {"kind": _kind(n), "tensor": n, "changed": d > 0, "rel_delta": d / max(wa.norm().item(), 1e-12)}
            )
    df = pd.DataFrame(rows)
    return (
        df.groupby("kind")
        .agg(
            tensors=("tensor", "size"),
            changed=("changed", "sum"),
            mean_rel_delta=("rel_delta", "mean"),
            max_rel_delta=("rel_delta", "max"),
        )
        .reset_index()
    )

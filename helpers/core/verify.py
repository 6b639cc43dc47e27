"""Checking checkpoints: tensor-by-tensor comparison by hash, and a cheap content fingerprint.

Loading (and the clean-load check `load_check`) lives in `helpers.core.models`.

Usage: `assert verify.compare("a/", "b/").equal; fp = verify.fingerprint("runs/toy/04_layer_drop_mistral/stage_a")`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from tqdm.auto import tqdm

from helpers.core.arch import COSMETIC_CONFIG_KEYS
from helpers.core.checkpoint import Checkpoint
from helpers.core.fsutil import file_sha256


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
        return (
            f"{self.n_equal} equal, {len(self.differ)} differ {self.differ[:3]}, "
            f"{len(self.only_a)} only in a {self.only_a[:3]}, {len(self.only_b)} only in b {self.only_b[:3]}"
        )


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


# ---- loading for scoring --------------------------------------------------------------------


# ---- command line ---------------------------------------------------------------------------
def cli_compare(args) -> int:
    c = compare(args.a, args.b)
    print(c)
    return 0 if c.equal else 1


def cli_load_check(args) -> int:
    from helpers.core.models import load_check

    model = load_check(args.model, dtype="auto", own=False)  # a key check: no fp32 upcast, no copies
    print(f"{args.model}: loads cleanly ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0


def fingerprint(model_dir, sample_bytes: int = 1 << 16) -> str:
    """sha256 of a checkpoint's config and, per tensor, name, dtype, shape and first/last bytes.

    Reads ~128 KiB per tensor, so it is cheap at 7B scale; healing, re-quantising or another base
    changes it. A re-save with identical tensors keeps it.
    """
    ck = Checkpoint(model_dir)
    h = hashlib.sha256()
    cfg = {k: v for k, v in ck.config.items() if k not in COSMETIC_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name in sorted(ck.keys()):
        i = ck.info(name)
        h.update(f"{name}|{i.dtype}|{list(i.shape)}|".encode())
        with open(ck.path / i.shard, "rb") as f:
            f.seek(i.start)
            h.update(f.read(min(sample_bytes, i.nbytes)))
            if i.nbytes > 2 * sample_bytes:
                f.seek(i.end - sample_bytes)
                h.update(f.read(sample_bytes))
    return h.hexdigest()[:16]

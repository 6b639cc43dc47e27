"""Mixtral experts on disk: one view over legacy or fused checkpoints, and a model fingerprint.

Scores (scores.py) and pruning (prune.py) both read experts through `ExpertView`,
which hides whether a checkpoint stores `block_sparse_moe.experts.{e}.w1/w2/w3` (hub, legacy) or
`mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] (transformers 5.x fused). Every
read is a slice: a fused tensor is never loaded whole. `prune_entries` is the same checkpoint seen
with only some experts kept: the tensors a prune writes, each a byte range of the source.

Usage: `v = ExpertView("runs/toy/world/mixtral"); w1 = v.read(layer=0, expert=3, w="w1")  # [I, H]`
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from helpers.core import arch
from helpers.core.checkpoint import DTYPES, Checkpoint, local_dir
from helpers.core.writer import Entry, copied, rows_of

if TYPE_CHECKING:
    import torch

# legacy role -> (fused tensor holding it, its place in that tensor's rows): w3 is gate_up_proj's second half
_FUSED_OF = {w: (fused, i) for fused, roles in arch.FUSED_ROLES.items() for i, w in enumerate(roles)}

# Config keys that fix every tensor shape of a Mixtral; two checkpoints that agree on these hold
# comparable experts (a fine-tuned model and its base do; a pruned one does not).
SHAPE_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_local_experts",
    "num_experts_per_tok",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


def moe_family(config: dict) -> arch.Family:
    """The family of `config`, which must be a mixture-of-experts model (one-line error otherwise)."""
    fam = arch.detect(config)
    if not fam.is_moe:
        raise ValueError(
            f"model_type '{fam.model_type}' is not a mixture-of-experts model (no experts to score or prune)"
        )
    return fam


def expert_layout(config: dict) -> dict:
    """What identifies a model's expert layout: type, layers, experts, hidden size, hash of shapes."""
    fam = moe_family(config)
    shape = {k: config.get(k) for k in SHAPE_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "model_type": fam.model_type,
        "n_layers": fam.n_layers(config),
        "n_experts": fam.n_experts(config),
        "hidden_size": int(config["hidden_size"]),
        "config_hash": digest,
    }


def check_expert_layout(found: dict, config: dict, what: str) -> None:
    """Raise naming the first field where `found` (recorded with `what`) differs from `config`'s."""
    want = expert_layout(config)
    for k in ("model_type", "n_layers", "n_experts", "hidden_size", "config_hash"):
        if found.get(k) != want[k]:
            raise ValueError(f"{what} is from another model: {k} is {found.get(k)!r} there, {want[k]!r} in this model")


@dataclass(frozen=True)
class ByteRange:
    """Where one expert weight's bytes sit in a shard: enough to copy it without reading it."""

    shard: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, int]


class ExpertView:
    """Per-(layer, expert, w) access to a Mixtral checkpoint in either on-disk layout.

    `w` is the legacy role: w1 (gate) and w3 (up) are [I, H], w2 (down) is [H, I].
    """

    def __init__(self, ck):
        self.ck = ck if isinstance(ck, Checkpoint) else Checkpoint(local_dir(ck))
        if not self.ck.config:
            raise FileNotFoundError(f"{self.ck.path}: no config.json")
        self.config = self.ck.config
        self.family = moe_family(self.config)
        self.format = self.family.moe_format(self.ck.keys())
        self.fused = self.format is arch.FUSED
        self.n_layers = self.family.n_layers(self.config)
        self.n_experts = self.family.n_experts(self.config)
        self.hidden = int(self.config["hidden_size"])
        self.inter = int(self.config["intermediate_size"])
        for layer in range(self.n_layers):
            if self.router_name(layer) not in self.ck:
                raise KeyError(f"{self.ck.path}: no router tensor {self.router_name(layer)}")

    # ---- names --------------------------------------------------------------------------------
    def router_name(self, layer: int) -> str:
        return self.format.router.format(l=layer)

    def shape(self, w: str) -> tuple[int, int]:
        return (self.hidden, self.inter) if w == "w2" else (self.inter, self.hidden)

    def _fused_loc(self, layer: int, expert: int, w: str) -> tuple[str, int]:
        """(fused tensor name, first row inside expert's [rows, cols] block) of a legacy role."""
        fused, i = _FUSED_OF[w]
        return arch.FUSED.experts[fused].format(l=layer), i * self.shape(w)[0]

    # ---- reading ------------------------------------------------------------------------------
    def read(self, layer: int, expert: int, w: str, rows: slice = slice(None)) -> torch.Tensor:
        """Rows `rows` of one expert weight, in its stored dtype; reads only those bytes."""
        if not 0 <= expert < self.n_experts:
            raise ValueError(f"expert {expert} out of range (model has {self.n_experts})")
        r0, r1, _ = rows.indices(self.shape(w)[0])
        if not self.fused:
            return self.ck.get_slice(arch.LEGACY.experts[w].format(l=layer, e=expert))[r0:r1]
        name, off = self._fused_loc(layer, expert, w)
        return self.ck.get_slice(name)[expert : expert + 1, off + r0 : off + r1][0]  # [rows, cols]

    def byte_range(self, layer: int, expert: int, w: str) -> ByteRange:
        """The contiguous bytes of one expert weight (a fused tensor's [e, rows] block is contiguous)."""
        if not self.fused:
            i = self.ck.info(arch.LEGACY.experts[w].format(l=layer, e=expert))
            return ByteRange(i.shard, i.start, i.end, i.dtype, tuple(i.shape))
        name, off = self._fused_loc(layer, expert, w)
        i = self.ck.info(name)  # [E, 2I, H] or [E, H, I], row-major
        rows, cols = self.shape(w)
        item = DTYPES[i.dtype][0]  # bytes per element
        start = i.start + (expert * i.shape[1] + off) * i.shape[2] * item
        return ByteRange(i.shard, start, start + rows * cols * item, i.dtype, (rows, cols))

    def row_blocks(self, w: str, block_bytes: int, n_experts: int = 1) -> list[slice]:
        """Row ranges of one weight whose float32 copies for `n_experts` experts fit in `block_bytes`."""
        rows, cols = self.shape(w)
        step = max(1, block_bytes // (4 * cols * n_experts))
        return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]

    def close(self):
        self.ck.close()


# ---- the checkpoint keeping some experts (what prune.py writes) ------------------------------------
def pruned_config(config: dict, k: int) -> dict:
    """`config` with k experts per layer."""
    fam = moe_family(config)
    return {**config, fam.experts_key: k}


def prune_entries(view: ExpertView, keep: dict[int, list[int]]) -> list[Entry]:
    """Output tensors in source order: non-expert tensors copied, kept experts as renamed byte ranges."""
    ck, E = view.ck, view.n_experts
    legacy = arch.LEGACY
    for l, ids in keep.items():  # fail before writing if a kept tensor is absent
        for e in ids:
            for w in arch.EXPERT_WEIGHTS:
                view.byte_range(l, e, w)
    routers = {view.router_name(l): l for l in range(view.n_layers)}

    def expert(l: int, e: int, new: int, w: str) -> Entry:
        br = view.byte_range(l, e, w)
        return Entry(
            legacy.experts[w].format(l=l, e=new),
            br.dtype,
            br.shape,
            br.shard,
            src=(ck.path / br.shard, br.start, br.end),
        )

    entries = []
    for name in ck.keys():
        if name in routers:
            l = routers[name]
            out = legacy.router.format(l=l)
            if keep[l] == list(range(E)):
                entries.append(copied(ck, name, out))
            else:
                entries.append(rows_of(ck, name, keep[l], out))  # [E, H] -> [k, H]
        elif m := arch.LEGACY_EXPERT_RE.match(name):
            l, e, w = int(m.group(1)), int(m.group(2)), m.group(3)
            if e in keep[l]:
                entries.append(expert(l, e, keep[l].index(e), w))
        elif m := arch.FUSED_EXPERT_RE.match(name):
            l, roles = int(m.group(1)), arch.FUSED_ROLES[m.group(2)]
            entries += [expert(l, e, new, w) for new, e in enumerate(keep[l]) for w in roles]
        else:
            entries.append(copied(ck, name))
    return entries

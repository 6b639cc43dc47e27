"""Model families as data: tensor-name templates, config keys and on-disk expert formats.

Usage: `fam = arch.detect("runs/toy/world/mixtral"); fam.moe_format(Checkpoint(d).keys()) is arch.LEGACY`
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
LEGACY_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
FUSED_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
EXPERT_WEIGHTS = ("w1", "w2", "w3")  # gate, down, up (Mixtral naming)
# Which legacy weights a fused tensor holds, in row order: gate_up_proj [E, 2I, H] is w1 rows then w3.
FUSED_ROLES = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
# Config fields that say nothing about which weights a config describes (re-saves change them).
COSMETIC_CONFIG_KEYS = (
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
)


class UnsupportedModel(ValueError):
    """A checkpoint whose model_type no family here describes."""


@dataclass(frozen=True)
class MoEFormat:
    """Tensor names of one on-disk expert layout, as templates over layer l and expert e."""

    name: str
    router: str  # [E, H]
    experts: dict[str, str]  # role -> template


# Hub checkpoints and transformers' default save use legacy per-expert keys.
LEGACY = MoEFormat(
    name="legacy",
    router="model.layers.{l}.block_sparse_moe.gate.weight",
    experts={w: "model.layers.{l}.block_sparse_moe.experts.{e}." + w + ".weight" for w in EXPERT_WEIGHTS},
)
# transformers 5.x in memory (and on disk with save_original_format=False):
# gate_up_proj [E, 2I, H] holds w1 rows then w3 rows; down_proj [E, H, I] is w2.
FUSED = MoEFormat(
    name="fused",
    router="model.layers.{l}.mlp.gate.weight",
    experts={
        "gate_up_proj": "model.layers.{l}.mlp.experts.gate_up_proj",
        "down_proj": "model.layers.{l}.mlp.experts.down_proj",
    },
)


@dataclass(frozen=True)
class Family:
    """What surgery needs to know about one architecture."""

    model_type: str
    layers_key: str = "num_hidden_layers"
    per_layer_lists: tuple[str, ...] = ("layer_types",)  # config lists indexed by layer
    experts_key: str | None = None  # config key counting experts, None for dense models
    topk_key: str | None = None
    moe_formats: tuple[MoEFormat, ...] = field(default=())

    @property
    def is_moe(self) -> bool:
        return self.experts_key is not None

    def n_layers(self, config: dict) -> int:
        return int(config[self.layers_key])

    def n_experts(self, config: dict) -> int:
        self._need_moe()
        return int(config[self.experts_key])

    def top_k(self, config: dict) -> int:
        self._need_moe()
        return int(config[self.topk_key])

    def moe_format(self, keys) -> MoEFormat:
        """Which expert layout a set of tensor names uses (legacy or fused)."""
        self._need_moe()
        keys = set(keys)
        found = [f for f in self.moe_formats if f.router.format(l=0) in keys]
        if len(found) != 1:
            names = " or ".join(f.router.format(l=0) for f in self.moe_formats)
            raise ValueError(f"{self.model_type}: cannot tell the expert layout: expected exactly one of {names}")
        return found[0]

    def _need_moe(self):
        if not self.is_moe:
            raise ValueError(f"model_type '{self.model_type}' is not a mixture-of-experts model")


FAMILIES: dict[str, Family] = {
    "mistral": Family("mistral"),
    "llama": Family("llama"),
    "mixtral": Family(
        "mixtral",
        experts_key="num_local_experts",
        topk_key="num_experts_per_tok",
        moe_formats=(LEGACY, FUSED),
    ),
}


def read_config(path) -> dict:
    """config.json of a checkpoint directory (or the file itself) as a dict."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"{p}: no config.json")
    return json.loads(p.read_text())


def detect(config) -> Family:
    """The family of a config dict, config.json path, or checkpoint directory."""
    cfg = config if isinstance(config, dict) else read_config(config)
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise UnsupportedModel(f"unsupported model_type {mt!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[mt]


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor name, None for embeddings, final norm, lm_head."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def renumber(name: str, new_layer: int) -> str:
    """The same tensor name under another layer index."""
    m = LAYER_RE.match(name)
    if not m:
        raise ValueError(f"{name}: not a decoder-layer tensor")
    return f"model.layers.{new_layer}.{m.group(2)}"


def keep_layers_config(config: dict, keep: list[int]) -> dict:
    """Config of a model that keeps only decoder layers `keep` (original indices, in order)."""
    fam = detect(config)
    n = fam.n_layers(config)
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n}-layer {fam.model_type}")
    out = dict(config)
    out[fam.layers_key] = len(keep)
    for key in fam.per_layer_lists:
        if isinstance(out.get(key), list):
            if len(out[key]) != n:
                raise ValueError(f"config.{key} has {len(out[key])} entries for {n} layers")
            out[key] = [out[key][i] for i in keep]
    return out

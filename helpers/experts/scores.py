"""Importance of each (layer, expert): fine-tuning delta, pairwise distance, routing, REAP, random.

Scores are [L][E] lists, higher = more worth keeping. Fine-tuning deltas come two ways that must
agree: streamed from two checkpoints (legacy or fused on either side), or straight from a peft
LoRA adapter's factors (`expert_factors`, the one decoder of peft's per-expert layout), never forming
B @ A: ||B A||_F^2 = trace((B^T B)(A A^T)), two r x r Grams.
Routing criteria (frequency, REAP) come from forward hooks on the routers during calibration.

Usage: `d = delta_from_adapter("runs/toy/01_finetune_mixtral/adapter", config)["all"]  # [L][E]`
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from helpers.core import arch
from helpers.core.fsutil import read_json, write_json
from helpers.experts.view import ExpertView, check_expert_layout, expert_layout

WEIGHTS = arch.EXPERT_WEIGHTS  # w1 gate [I, H], w2 down [H, I], w3 up [I, H]
BLOCK_BYTES = 64 << 20  # float32 working set of one streamed block


def _combine(parts: dict[str, np.ndarray]) -> dict[str, list]:
    """{"w1","w2","w3"} squared norms [L, E] -> norms per weight and combined ("all")."""
    out = {w: np.sqrt(parts[w]).tolist() for w in WEIGHTS}
    out["all"] = np.sqrt(sum(parts[w] for w in WEIGHTS)).tolist()
    return out


# ---- delta-L2 from two checkpoints ------------------------------------------------------------
def delta_from_checkpoints(base, tuned, block_bytes: int = BLOCK_BYTES) -> dict[str, list]:
    """||W_tuned - W_base||_F per (layer, expert) for w1, w2, w3 and combined, streamed row blocks."""
    a, b = ExpertView(base), ExpertView(tuned)
    check_expert_layout(expert_layout(a.config), b.config, f"{a.ck.path} (base)")
    sq = {w: np.zeros((a.n_layers, a.n_experts)) for w in WEIGHTS}
    steps = [(l, e, w) for l in range(a.n_layers) for e in range(a.n_experts) for w in WEIGHTS]
    for l, e, w in tqdm(steps, desc="delta-L2 (checkpoints)", leave=False):
        for rows in a.row_blocks(w, block_bytes):
            d = b.read(l, e, w, rows).float() - a.read(l, e, w, rows).float()
            sq[w][l, e] += float(d.double().pow(2).sum())
    a.close(), b.close()
    return _combine(sq)


# ---- delta-L2 from LoRA factors ---------------------------------------------------------------
_PREFIX = re.compile(r"^(?:base_model\.model\.)?")
_FUSED_LORA = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_([AB])\.weight$")
_LEGACY_LORA = re.compile(
    r"^model\.layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123]|gate_proj|up_proj|down_proj)"
    r"\.lora_([AB])\.weight$"
)
_ROLE = {"w1": "w1", "w2": "w2", "w3": "w3", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _gram_norm2(B: torch.Tensor, A: torch.Tensor) -> float:
    """||B @ A||_F^2 from r x r Grams (B [out, r], A [r, in]); the [out, in] product is never formed."""
    B, A = B.double(), A.double()
    return float(((B.T @ B) * (A @ A.T)).sum())  # trace(XY) = sum(X * Y^T), Y symmetric


def _scaling(module: str, r: int, cfg: dict) -> float:
    """peft's alpha / r (or / sqrt(r) with rslora), honouring alpha_pattern by module-name suffix."""
    alpha = cfg.get("lora_alpha", 8)
    for key, val in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = val
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    f = adapter_dir / "adapter_model.safetensors"
    if not f.exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors (a peft LoRA adapter directory?)")
    with safe_open(str(f), framework="pt") as h:
        return {_PREFIX.sub("", k): h.get_tensor(k) for k in h.keys() if "lora_" in k}


class ExpertLoRA(NamedTuple):
    """One expert weight's LoRA: its change is scaling * B @ A, laid out like legacy w1/w2/w3 [out, in]."""

    B: torch.Tensor  # [out, r]
    A: torch.Tensor  # [r, in]
    scaling: float

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())  # [out, in]


def expert_factors(adapter_dir, config: dict) -> dict[tuple[int, int, str], ExpertLoRA]:
    """(layer, expert, "w1" | "w2" | "w3") -> ExpertLoRA of a peft LoRA adapter, from its file alone.

    Fused experts (`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`):
    peft's ParamWrapper holds A [E*r, in] expert-major and B [out, r*E] rank-major, so expert e
    uses A.reshape(E, r, in)[e] and B.reshape(out, r, E)[:, :, e]; gate_up's out rows are w1 then
    w3. Per-expert Linear adapters (`block_sparse_moe.experts.{e}.w1` ..., or QLoRA's
    `mlp.experts.{e}.gate_proj/up_proj/down_proj` = w1/w3/w2, `helpers.core.moe`) hold A [r, in],
    B [out, r]. The tensors are views of the adapter's (no product is formed); DoRA and non-LoRA adapters
    are refused.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_json(adapter_dir / "adapter_config.json")
    if cfg.get("use_dora") or cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{adapter_dir}: only plain LoRA adapters are supported (peft_type {cfg.get('peft_type')}, "
            f"use_dora {cfg.get('use_dora')}): their delta is not scaling * B @ A"
        )
    v = _shape_of(config)
    L, E, H, I = v["n_layers"], v["n_experts"], v["hidden"], v["inter"]
    groups: dict[tuple, dict[str, torch.Tensor]] = {}
    for k, t in _adapter_tensors(adapter_dir).items():
        if m := _FUSED_LORA.match(k):
            groups.setdefault(("fused", int(m.group(1)), m.group(2)), {})[m.group(3)] = t
        elif m := _LEGACY_LORA.match(k):
            key = ("legacy", int(m.group(1)), int(m.group(3)), _ROLE[m.group(4)], f"{m.group(2)}.experts.{m.group(3)}")
            groups.setdefault(key + (m.group(4),), {})[m.group(5)] = t
    if not groups:
        raise ValueError(
            f"{adapter_dir}: no LoRA factors on experts (expected target_parameters "
            "mlp.experts.gate_up_proj/down_proj or per-expert w1/w2/w3 modules)"
        )
    out: dict[tuple[int, int, str], ExpertLoRA] = {}
    for key, f in groups.items():
        if set(f) != {"A", "B"}:
            raise ValueError(f"{adapter_dir}: {key} has lora_{''.join(f)} but not both A and B")
        A, B = f["A"], f["B"]
        layer = key[1]
        if not 0 <= layer < L:
            raise ValueError(f"{adapter_dir}: LoRA on layer {layer}, model has {L} layers")
        if key[0] == "legacy":
            _, _, e, w, where, leaf = key
            module = f"model.layers.{layer}.{where}.{leaf}"
            out[(layer, e, w)] = ExpertLoRA(B, A, _scaling(module, A.shape[0], cfg))
            continue
        if A.shape[0] % E:
            raise ValueError(
                f"{adapter_dir}: layer {layer} expert LoRA A has {A.shape[0]} rows, not a multiple of {E} experts"
            )
        r = A.shape[0] // E
        fan_in, fan_out = A.shape[1], B.shape[0]
        if (fan_in, fan_out) == (H, 2 * I):
            roles = [("w1", slice(0, I)), ("w3", slice(I, 2 * I))]  # gate_up_proj
        elif (fan_in, fan_out) == (I, H):
            roles = [("w2", slice(None))]  # down_proj
        else:
            raise ValueError(
                f"{adapter_dir}: layer {layer} expert LoRA maps {fan_in} -> {fan_out}, neither gate_up_proj "
                f"({H} -> {2 * I}) nor down_proj ({I} -> {H}) of this model"
            )
        s = _scaling(f"model.layers.{layer}.mlp.experts", r, cfg)
        A_e = A.reshape(E, r, fan_in)  # [E, r, in]
        B_e = B.reshape(fan_out, r, E)  # [out, r, E]
        for e in range(E):
            for w, rows in roles:
                out[(layer, e, w)] = ExpertLoRA(B_e[rows, :, e], A_e[e], s)
    return out


def delta_from_adapter(adapter_dir, config: dict) -> dict[str, list]:
    """||scaling * B_e A_e||_F per (layer, expert) from a LoRA adapter (see `expert_factors`), without the model."""
    v = _shape_of(config)
    sq = {w: np.zeros((v["n_layers"], v["n_experts"])) for w in WEIGHTS}
    for (layer, e, w), f in expert_factors(adapter_dir, config).items():
        sq[w][layer, e] = f.scaling**2 * _gram_norm2(f.B, f.A)
    return _combine(sq)


def _shape_of(config: dict) -> dict:
    fp = expert_layout(config)
    return {
        "n_layers": fp["n_layers"],
        "n_experts": fp["n_experts"],
        "hidden": int(config["hidden_size"]),
        "inter": int(config["intermediate_size"]),
    }


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |a| over two [L][E] score grids (how well two estimates agree)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))


# ---- pairwise distance ------------------------------------------------------------------------
def expert_distances(model, block_bytes: int = BLOCK_BYTES, relative: bool = False) -> dict[str, list]:
    """Per layer, the E x E Frobenius distances between experts' concatenated (w1, w2, w3).

    Streams row blocks of all experts at once and accumulates the Gram matrix G;
    d_ij^2 = G_ii + G_jj - 2 G_ij. `relative`: d_ij / ((||W_i|| + ||W_j||) / 2), comparable across
    layers and models of different scale.
    """
    v = ExpertView(model)
    out = {}
    for l in tqdm(range(v.n_layers), desc="expert distances", leave=False):
        G = torch.zeros(v.n_experts, v.n_experts, dtype=torch.float64)
        for w in WEIGHTS:
            for rows in v.row_blocks(w, block_bytes, v.n_experts):
                X = torch.stack(
                    [v.read(l, e, w, rows).float().reshape(-1) for e in range(v.n_experts)]
                )  # [E, rows*cols]
                G += (X @ X.T).double()
        n = G.diagonal()
        D = (n[:, None] + n[None, :] - 2 * G).clamp_min(0).sqrt().fill_diagonal_(0)  # [E, E]
        if relative:
            D = D / ((n.sqrt()[:, None] + n.sqrt()[None, :]) / 2).clamp_min(1e-30)
        out[str(l)] = D.tolist()
    v.close()
    return out


def uniqueness(distances: dict[str, list]) -> list[list[float]]:
    """Mean distance of each expert to the others of its layer: [L][E] (high = least redundant)."""
    out = []
    for l in sorted(distances, key=int):
        D = np.asarray(distances[l])
        out.append((D.sum(1) / max(1, len(D) - 1)).tolist())
    return out


# ---- routing on calibration text --------------------------------------------------------------
def moe_blocks(model) -> list:
    """The sparse-MoE block of each decoder layer (transformers 5.x: layer.mlp with .gate, .experts)."""
    blocks = []
    for i, layer in enumerate(model.model.layers):
        blk = getattr(layer, "mlp", None)
        if blk is None or not hasattr(blk, "gate") or not hasattr(blk, "experts"):
            raise ValueError(f"layer {i} has no sparse-MoE block (mlp.gate + mlp.experts): not a Mixtral-style model")
        blocks.append(blk)
    return blocks


def _expert_out(experts, j: int, x: torch.Tensor) -> torch.Tensor:
    """f_j(x) of expert j for tokens x [T, H] -> [T, H], as MixtralExperts computes it."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[j])


@torch.no_grad()
def hooked_passes(
    model, tokenizer, texts, hooks, state: dict, *, max_length: int, batch_size: int, desc: str, progress=True
) -> None:
    """Forward `texts` in padded batches with forward `hooks` [(module, fn)] registered (removed after).

    Before each batch, state["mask"] is its real-token mask [B * T] (what the hooks keep) and
    state["tokens"] grows by the batch's real tokens.
    """
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=not progress):
            enc = tokenizer(
                texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(device)
            state["mask"] = enc["attention_mask"].reshape(-1).bool()
            state["tokens"] += int(state["mask"].sum())
            model(**enc)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def router_stats(model, tokenizer, texts: list[str], *, max_length: int = 256, batch_size: int = 4) -> dict:
    """Router frequency and REAP per (layer, expert) over the non-padding tokens of `texts`.

    frequency_j = share of tokens whose top-k holds j (rows sum to top_k);
    reap_j = mean over tokens routed to j of g_j(x) * ||f_j(x)||_2 (0 for an expert never routed to).
    """
    blocks = moe_blocks(model)
    L, E = len(blocks), blocks[0].gate.weight.shape[0]
    count = torch.zeros(L, E, dtype=torch.float64)
    reap = torch.zeros(L, E, dtype=torch.float64)
    state = {"mask": None, "tokens": 0}

    def hook(layer, blk):
        def fn(gate, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, H]
            _, weights, idx = output  # [T, k] normalised top-k gate weights, expert ids
            keep = state["mask"].to(idx.device)  # layers may sit on different GPUs
            for j in idx[keep].unique().tolist():
                hit = (idx == j) & keep[:, None]  # [T, k]
                t, slot = hit.nonzero(as_tuple=True)
                norms = _expert_out(blk.experts, j, x[t]).float().norm(dim=-1)
                reap[layer, j] += float((weights[t, slot].float() * norms).double().sum())
                count[layer, j] += len(t)

        return fn

    hooks = [(blk.gate, hook(i, blk)) for i, blk in enumerate(blocks)]
    kw = dict(max_length=max_length, batch_size=batch_size, desc="router stats")
    hooked_passes(model, tokenizer, texts, hooks, state, **kw)
    n = max(1, state["tokens"])
    return {
        "frequency": (count / n).tolist(),
        "reap": (reap / count.clamp_min(1)).tolist(),
        "n_tokens": state["tokens"],
    }


def random_scores(n_layers: int, n_experts: int, seed: int = 0) -> list[list[float]]:
    """The seeded random baseline: uniform scores, so keeping the top k keeps a random subset."""
    return np.random.default_rng(seed).random((n_layers, n_experts)).tolist()


def collect_criteria(delta: dict, routing: dict | None, distances: dict, seed: int = 0) -> dict[str, list]:
    """Every [L][E] criterion by name: delta_l2 (+ per weight), frequency, reap, uniqueness, random."""
    L, E = np.asarray(delta["all"]).shape
    out = {"delta_l2": delta["all"], **{f"delta_l2_{w}": delta[w] for w in WEIGHTS}}
    if routing is not None:
        out.update(frequency=routing["frequency"], reap=routing["reap"])
    out["uniqueness"] = uniqueness(distances)
    out["random"] = random_scores(L, E, seed)
    return out


# ---- scores.json ------------------------------------------------------------------------------
def make_scores(
    config: dict, criteria: dict[str, list], *, distances: dict | None = None, meta: dict | None = None
) -> dict:
    """scores.json content: the model fingerprint, [L][E] criteria (higher = keep), distances."""
    fp = expert_layout(config)
    for name, grid in criteria.items():
        shape = np.asarray(grid).shape
        if shape != (fp["n_layers"], fp["n_experts"]):
            raise ValueError(
                f"criterion {name!r} has shape {shape}, model has {fp['n_layers']} layers x {fp['n_experts']} experts"
            )
    return {
        "fingerprint": fp,
        "top_k": int(config["num_experts_per_tok"]),
        "higher_is_more_important": True,
        "criteria": {k: np.asarray(v, float).tolist() for k, v in criteria.items()},
        "distances": distances or {},
        "meta": meta or {},
    }


def save_scores(path, scores: dict) -> Path:
    return write_json(path, scores)


def load_scores(path) -> dict:
    s = read_json(path)
    if "fingerprint" not in s or "criteria" not in s:
        raise ValueError(f"{path}: not a scores.json (needs 'fingerprint' and 'criteria')")
    return s


def rank_agreement(criteria: dict[str, list]):
    """Mean over layers of the Spearman correlation between each pair of criteria's expert rankings (DataFrame)."""
    import pandas as pd
    from scipy.stats import spearmanr

    names = list(criteria)
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for a in names:
        for b in names:
            rs = [spearmanr(x, y).statistic for x, y in zip(criteria[a], criteria[b])]
            rs = [r for r in rs if np.isfinite(r)]  # a constant row (e.g. an untouched layer) ranks nothing
            out.loc[a, b] = float(np.mean(rs)) if rs else np.nan
    return out


def finetune_sources(manifest: dict, base_model: str | None = None) -> dict[str, str]:
    """Base model, adapter, merged checkpoint and toy world named by notebook 01's manifest.

    The base is 01's input "base" (unless `base_model` is given); the world is its input "world", so
    calibration on "toy" reads the world 01 fine-tuned in (the default world if 01 recorded none).
    """
    from helpers.core.data import DEFAULT_WORLD
    from helpers.core.manifest import input_path, output_path

    inputs = manifest.get("inputs", {})
    if base_model is None:
        if "base" not in inputs:
            raise KeyError(
                f"manifest of step {manifest.get('step')!r} names no base model (input 'base'); pass BASE_MODEL"
            )
        base_model = input_path(manifest, "base")
    return {
        "adapter": str(output_path(manifest, "adapter")),
        "merged": str(output_path(manifest, "merged")),
        "base": str(base_model),
        "world": input_path(manifest, "world") if "world" in inputs else DEFAULT_WORLD,
    }

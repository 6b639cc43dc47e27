"""Angular distances between decoder layers (Gromov et al., arXiv 2403.17887): calibration text in, D[n, l] out.

`angular_distances` measures d(x_l, x_{l+n}) = arccos(cos(x_l[T], x_{l+n}[T])) / pi on the last
real token T of each calibration text, for every block size n at once, from one forward pass per
batch: a pre-hook on every decoder layer keeps only the last-token row [B, H] of that layer's input
(x_l), a hook on the last layer keeps its output x_L. x_L is taken BEFORE the final norm (the
residual stream that a dropped tail would hand to the norm); `final_norm=True` applies the norm,
which is what `output_hidden_states` reports as its last entry. `best_start` and `min_distance_by_n`
read the cheapest blocks off D; drop.py plans and cuts with them. The padding helpers (`encode`,
`positions`, `last_token_index`) are shared with routing and stage scoring.

Usage: `D = angular_distances(model, tok, calib_texts("toy", 64)); best_start(D, n=8, keep_last_layer=True)`
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers.core.models import model_device


# ---- calibration text and padding ----------------------------------------------------------
def calib_texts(source, n: int | None = None, *, world="runs/toy/world", seed: int = 0) -> list[str]:
    """Calibration texts: a list of strings as is, else `helpers.core.data.load_texts(source, n, ...)`."""
    if isinstance(source, (list, tuple)):
        texts = [t for t in source if t]
        return texts[:n] if n else texts
    from helpers.core.data import load_texts

    return load_texts(source, n, world=world, seed=seed)


def ensure_pad(tokenizer):
    """Give a tokenizer without a pad token (Mistral's) its EOS (else UNK) as pad; returns it."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] position ids counted over real tokens only, so a left-padded row sees the same RoPE
    positions as the same text unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last real token of each row, whatever side the padding is on."""
    pos = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.long() * pos).argmax(-1)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.base_model.layers


# ---- angular distances ----------------------------------------------------------------------
def encode(tokenizer, texts: list[str], seq_len: int, padding_side: str | None = None) -> dict:
    """input_ids, attention_mask and position_ids [B, S]; positions count real tokens only, so a
    left-padded row sees the same positions as a right-padded one."""
    ensure_pad(tokenizer)
    side = tokenizer.padding_side
    tokenizer.padding_side = padding_side or side
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    finally:
        tokenizer.padding_side = side
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "position_ids": positions(mask)}


def calibration_batches(
    tokenizer, texts: list[str], *, seq_len: int = 128, batch_size: int = 8, padding_side: str | None = None
) -> list[dict]:
    """Texts batched by similar token length (less padding), encoded with `encode`."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no calibration text (all empty)")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [
        encode(tokenizer, [texts[i] for i in order[k : k + batch_size]], seq_len, padding_side)
        for k in range(0, len(order), batch_size)
    ]


@torch.no_grad()
def angular_distances(
    model,
    tokenizer=None,
    texts=None,
    *,
    batches: list[dict] | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    final_norm: bool = False,
    padding_side: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Mean angular distance D[n, l] between x_l and x_{l+n}, n = 1..L, l = 0..L-n (NaN elsewhere).

    Shape [L + 1, L]. Give `tokenizer` and `texts`, or pre-encoded `batches` (see `calibration_batches`).
    """
    if batches is None:
        batches = calibration_batches(
            tokenizer, texts, seq_len=seq_len, batch_size=batch_size, padding_side=padding_side
        )
    base = model.base_model
    layers = list(decoder_layers(model))[: model.config.num_hidden_layers]
    L = len(layers)
    rows: list[torch.Tensor | None] = [None] * (L + 1)
    where: dict[str, torch.Tensor] = {}

    def take(h: torch.Tensor) -> torch.Tensor:
        return h[where["b"], where["t"]]  # [B, H]

    def pre_hook(l):
        def hook(_mod, args, kwargs):
            rows[l] = take(args[0] if args else kwargs["hidden_states"])

        return hook

    def post_hook(_mod, _args, out):
        rows[L] = take(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_pre_hook(pre_hook(l), with_kwargs=True) for l, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(post_hook))
    device = model_device(model)
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)  # sum over samples of d(x_i, x_j)
    count = 0
    try:
        for batch in tqdm(batches, desc="angular distance", leave=False, disable=not progress):
            batch = {k: v.to(device) for k, v in batch.items()}
            where["t"] = last_token_index(batch["attention_mask"])
            where["b"] = torch.arange(len(where["t"]), device=device)
            base(**batch, use_cache=False)  # the decoder stack only: no lm_head logits
            if final_norm:
                rows[L] = base.norm(rows[L])
            x = F.normalize(torch.stack(rows).double(), dim=-1)  # [L+1, B, H]
            cos = torch.einsum("ibh,jbh->bij", x, x).clamp(-1.0, 1.0)  # [B, L+1, L+1]
            total += torch.arccos(cos).sum(0) / math.pi
            count += x.shape[1]
    finally:
        for h in handles:
            h.remove()
    mean = (total / max(count, 1)).cpu().numpy()
    D = np.full((L + 1, L), np.nan)
    for n in range(1, L + 1):
        D[n, : L - n + 1] = [mean[l, l + n] for l in range(L - n + 1)]
    return D


def distances_to_json(D: np.ndarray, **extra) -> dict:
    """D as JSON: rows[n - 1] holds D[n, l] for l = 0..L-n."""
    L = D.shape[1]
    return {
        "n_layers": L,
        "index": "rows[n-1][l] = mean d(x_l, x_{l+n})",
        "rows": [[float(v) for v in D[n, : L - n + 1]] for n in range(1, L + 1)],
        **extra,
    }


def distances_from_json(obj: dict) -> np.ndarray:
    L = int(obj["n_layers"])
    D = np.full((L + 1, L), np.nan)
    for n, row in enumerate(obj["rows"], start=1):
        D[n, : len(row)] = row
    return D


def best_start(D: np.ndarray, n: int, keep_last_layer: bool = False) -> int | None:
    """Start l* of the n-layer block l..l+n-1 with the smallest distance D[n, l] (None: no block fits).

    With `keep_last_layer` a block must end before the last layer.
    """
    L = D.shape[1]
    last_start = L - n - 1 if keep_last_layer else L - n
    return int(np.nanargmin(D[n, : last_start + 1])) if last_start >= 0 else None


def min_distance_by_n(D: np.ndarray, keep_last_layer: bool = False) -> list[dict]:
    """For each block size n: the best start l* and its distance (what the search would pick)."""
    L = D.shape[1]
    starts = {n: best_start(D, n, keep_last_layer) for n in range(1, L + 1)}
    return [{"n": n, "l": l, "distance": float(D[n, l]), "frac": n / L} for n, l in starts.items() if l is not None]

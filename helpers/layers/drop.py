"""Angular-distance layer dropping (Gromov et al., arXiv 2403.17887): measure, plan, cut.

`angular_distances` measures d(x_l, x_{l+n}) = arccos(cos(x_l[T], x_{l+n}[T])) / pi on the last
real token T of each calibration text, for every block size n at once, from one forward pass per
batch: a pre-hook on every decoder layer keeps only the last-token row [B, H] of that layer's input
(x_l), a hook on the last layer keeps its output x_L. x_L is taken BEFORE the final norm (the
residual stream that a dropped tail would hand to the norm); `final_norm=True` applies the norm,
which is what `output_hidden_states` reports as its last entry. `plan_layer_drop` picks the block
(pure, JSON); `apply_layer_drop` streams stage A and the removed layers as bundles (bundles.py).

Models load through `verify.load_model`, checkpoint paths resolve through `checkpoint.local_dir`.

Usage: `D = angular_distances(model, tok, texts); plan = plan_layer_drop(cfg, D, drop_frac=0.25); apply_layer_drop(src, plan, "A", "bundles")`
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers.core import arch
from helpers.core.checkpoint import Checkpoint, copied, local_dir, write_checkpoint
from helpers.core.fsutil import refuse_existing, write_json
from helpers.core.models import load_model, model_device
from helpers.layers import bundles

PLAN_FORMAT = "layer-drop-plan/1"


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
def keep_layers_copy(model, keep: list[int]):
    """A deep copy of `model` with only decoder layers `keep`, ready for cached generation.

    Everything transformers needs when layers go (facts.md): a new ModuleList, num_hidden_layers,
    layer_types sliced, and each attention's layer_idx renumbered 0..n-1 (else cached generate
    indexes past the cache). For stages that share weights, see bundles.load_stages.
    """
    import copy

    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList([m.model.layers[i] for i in keep])
    m.config.num_hidden_layers = len(keep)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [m.config.layer_types[i] for i in keep]
    for j, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = j
    return m.eval()


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


# ---- plan -----------------------------------------------------------------------------------
def parse_layers(spec, n_layers: int) -> tuple[int, int]:
    """'a-b' (0-based, inclusive) or 'a' -> (a, b), checked against the layer count."""
    if isinstance(spec, (tuple, list)):
        a, b = (int(spec[0]), int(spec[-1]))
    else:
        try:
            parts = [int(p) for p in str(spec).strip().split("-")]
        except ValueError:
            parts = []
        if len(parts) not in (1, 2):
            raise ValueError(f"--layers {spec!r}: expected a-b (0-based, inclusive), e.g. 4-7")
        a, b = parts[0], parts[-1]
    if not 0 <= a <= b < n_layers:
        raise ValueError(
            f"--layers {a}-{b} is out of range for a {n_layers}-layer model (valid: 0-{n_layers - 1}, a <= b)"
        )
    return a, b


def block_size(n_layers: int, drop_frac: float) -> int:
    """n = round(drop_frac * L) (halves round up), checked: at least one dropped, something left."""
    if not (isinstance(drop_frac, (int, float)) and 0.0 <= drop_frac < 1.0):
        raise ValueError(f"--drop-frac {drop_frac} is outside [0, 1)")
    n = int(math.floor(drop_frac * n_layers + 0.5))
    if n == 0:
        raise ValueError(f"--drop-frac {drop_frac} of {n_layers} layers drops no layer (n = 0)")
    if n >= n_layers:
        raise ValueError(f"--drop-frac {drop_frac} drops {n} of {n_layers} layers: nothing left")
    return n


def split_bundles(dropped: list[int], n_bundles: int) -> dict[str, list[int]]:
    """Contiguous, near-equal groups named B, C, D, ... (earlier layers first)."""
    if not 1 <= n_bundles <= min(len(dropped), 25):
        raise ValueError(f"--n-bundles {n_bundles}: must be between 1 and the {len(dropped)} dropped layers")
    parts = np.array_split(np.asarray(dropped), n_bundles)
    return {chr(ord("B") + i): [int(x) for x in p] for i, p in enumerate(parts)}


def plan_layer_drop(
    config: dict,
    distances: np.ndarray | None = None,
    *,
    drop_frac: float = 0.25,
    keep_last_layer: bool = False,
    layers=None,
    n_bundles: int = 2,
) -> dict:
    """Pure: which block to drop and how to bundle it, as JSON. `layers` ('a-b') overrides the search."""
    fam = arch.detect(config)
    L = fam.n_layers(config)
    if layers is not None:
        a, b = parse_layers(layers, L)
        if keep_last_layer and b == L - 1:
            raise ValueError(f"--layers {a}-{b} touches the last layer ({L - 1}) but --keep-last-layer is set")
        if b - a + 1 >= L:
            raise ValueError(f"--layers {a}-{b} drops all {L} layers: nothing left")
        n, selection = b - a + 1, "explicit"
    else:
        n = block_size(L, drop_frac)
        if distances is None:
            raise ValueError("plan_layer_drop: no distance matrix; measure one (angular_distances) or give --layers")
        if distances.shape != (L + 1, L):
            raise ValueError(f"distance matrix has shape {distances.shape}, expected {(L + 1, L)} for {L} layers")
        a = best_start(distances, n, keep_last_layer)  # n < L: a block always fits
        b, selection = a + n - 1, "angular-distance"
    dropped = list(range(a, b + 1))
    kept = [i for i in range(L) if i not in dropped]
    return {
        "format": PLAN_FORMAT,
        "model_type": fam.model_type,
        "n_layers": L,
        "selection": selection,
        "drop_frac": None if layers is not None else drop_frac,
        "keep_last_layer": keep_last_layer,
        "n_drop": n,
        "block": [a, b],
        "block_distance": None if distances is None else float(distances[n, a]),
        "dropped": dropped,
        "kept": {str(new): orig for new, orig in enumerate(kept)},  # new index -> original index
        "bundles": split_bundles(dropped, n_bundles),
        "distances": None if distances is None else distances_to_json(distances)["rows"],
    }


# ---- apply (streaming) ----------------------------------------------------------------------
def check_outputs(save_dir, save_removed_dir, overwrite: bool) -> None:
    """Refuse existing outputs up front (before any calibration or writing) unless overwrite."""
    a, b = Path(save_dir).resolve(), Path(save_removed_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ValueError(f"--save-dir {save_dir} and --save-removed-dir {save_removed_dir} must not contain each other")
    refuse_existing(save_dir, overwrite)
    if not overwrite and bundles.existing_bundles(b):
        raise FileExistsError(
            f"{save_removed_dir} already holds bundles; pass overwrite=True (--overwrite) to replace them"
        )


def apply_layer_drop(model_dir, plan: dict, save_dir, save_removed_dir, overwrite: bool = False) -> tuple[Path, Path]:
    """Stream stage A (renumbered, config fixed) and the removed layers as bundles; return both dirs.

    Tensors are copied byte for byte (renamed where renumbered); peak memory is one small slice.
    Both directories get `layer_drop.json` (the stage record bundles.py reads).
    """
    src = Checkpoint(local_dir(model_dir))
    fam = arch.detect(src.config)
    L = fam.n_layers(src.config)
    if (plan.get("model_type"), plan.get("n_layers")) != (fam.model_type, L):
        raise ValueError(
            f"plan is for a {plan.get('n_layers')}-layer {plan.get('model_type')}, "
            f"{src.path} is a {L}-layer {fam.model_type}"
        )
    check_outputs(save_dir, save_removed_dir, overwrite)
    kept = {int(k): int(v) for k, v in plan["kept"].items()}
    new_of = {orig: new for new, orig in kept.items()}
    layer_names = [n for n in src.keys() if arch.layer_of(n) is not None]
    missing = sorted(set(range(L)) - {arch.layer_of(n) for n in layer_names})
    if missing:
        raise ValueError(f"{src.path}: no tensors for layers {missing}")

    record = bundles.stage_record(src, plan)
    entries = []
    for name in src.keys():
        l = arch.layer_of(name)
        if l is None:
            entries.append(copied(src, name))
        elif l in new_of:
            entries.append(copied(src, name, arch.renumber(name, new_of[l])))
    a_dir = write_checkpoint(
        save_dir,
        entries,
        config=arch.keep_layers_config(src.config, list(kept.values())),
        side_files_from=src.path,
        max_shard_size=bundles.largest_shard(src),
        overwrite=overwrite,
        extra_json={bundles.RECORD: record},
        desc="stage A",
    )
    b_dir = bundles.save_bundles(src, plan["bundles"], save_removed_dir, record, overwrite=overwrite)
    return a_dir, b_dir


# ---- command line ---------------------------------------------------------------------------
def cli_layer_drop(args) -> int:
    src = local_dir(args.model)
    config = arch.read_config(src)
    L = arch.detect(config).n_layers(config)
    check_outputs(args.save_dir, args.save_removed_dir, args.overwrite)
    D = None
    if args.layers is None:
        block_size(L, args.drop_frac)  # bad flags fail before the model loads
        model, tok = load_model(src)
        texts = calib_texts(args.calib, args.n_samples)
        D = angular_distances(model, tok, texts, seq_len=args.seq_len)
        del model
    plan = plan_layer_drop(
        config,
        D,
        drop_frac=args.drop_frac,
        keep_last_layer=args.keep_last_layer,
        layers=args.layers,
        n_bundles=args.n_bundles,
    )
    removed = Path(args.save_removed_dir)
    write_json(removed / "plan.json", plan)  # the plan is on disk before any surgery
    a_dir, b_dir = apply_layer_drop(src, plan, args.save_dir, removed, overwrite=args.overwrite)
    a, b = plan["block"]
    sizes = ", ".join(f"{k}: {v[0]}-{v[-1]}" for k, v in plan["bundles"].items())
    print(
        f"dropped layers {a}-{b} of {L} ({plan['selection']}); stage A -> {a_dir} ({L - plan['n_drop']} layers); "
        f"bundles -> {b_dir} ({sizes})"
    )
    return 0

"""Bundles of removed layers, and stages A / AB / FULL rebuilt from stage A plus bundles.

On disk: a bundles directory holds one directory per bundle (B/, C/, ...: the removed layers'
tensors under their ORIGINAL indices, one safetensors shard, and `bundle.json` naming the base it
was cut from) plus `layer_drop.json`, the stage record (also inside stage A): original layer
count, map new -> original index, dropped layers, bundles, base config, distances.

A base is identified by its model_type, the sha256 of its config with the layer-count fields
removed and the remaining fields canonicalised through transformers (so stage A, which differs
only there, and re-saved configs agree), and the sha256 of the first rows of its input embeddings
(which layer dropping leaves untouched). Bundles from another base are refused, naming both.

In memory, stages share modules: one set of decoder layers (A's plus the bundles'), each stage a
thin model whose `layers` list references them, renumbered per call (helpers.layers.sharing).

Usage: `stages = load_stages("runs/toy/04/A", "runs/toy/04/bundles"); stages["AB"].generate(...)`
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np

from helpers.core import arch
from helpers.core.checkpoint import Checkpoint, torch_dtype
from helpers.core.fsutil import read_json, write_json
from helpers.core.models import load_check
from helpers.core.txn import transaction
from helpers.core.writer import Entry, computed, copied, write_checkpoint

RECORD = "layer_drop.json"
BUNDLE = "bundle.json"
STAGE = "stage.json"
RECORD_FORMAT = "layer-drop/1"
BUNDLE_FORMAT = "layer-bundle/1"
EMBED_ROWS = 64


# ---- identity of a base model ---------------------------------------------------------------
def config_sha256(config: dict) -> str:
    """sha256 of a config without its layer-count fields, canonicalised through transformers."""
    fam = arch.detect(config)
    d = {k: v for k, v in config.items() if k not in (fam.layers_key, *fam.per_layer_lists)}
    try:  # same defaults and field spellings whichever transformers version wrote the file
        from transformers import AutoConfig

        kw = {k: v for k, v in d.items() if k != "model_type"}
        d = AutoConfig.for_model(fam.model_type, **kw).to_dict()
    except Exception:  # noqa: BLE001 - an odd config still hashes, just less canonically
        pass
    d = {k: v for k, v in d.items() if k not in (fam.layers_key, *fam.per_layer_lists, *arch.COSMETIC_CONFIG_KEYS)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def embed_sha256(ck: Checkpoint) -> str | None:
    """sha256 of the first input-embedding rows as fp32 (independent of a bf16 <-> fp32 re-save)."""
    name = next((n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in ck), None)
    if name is None:
        return None
    i = ck.info(name)
    n = min(EMBED_ROWS, i.shape[0]) * (i.nbytes // i.shape[0])
    with open(ck.path / i.shard, "rb") as f:  # raw bytes widened with numpy: no torch import on the surgery path
        f.seek(i.start)
        raw = f.read(n)
    if i.dtype == "BF16":
        rows = (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4")
    elif i.dtype in ("F16", "F32", "F64"):
        rows = np.frombuffer(raw, {"F16": "<f2", "F32": "<f4", "F64": "<f8"}[i.dtype]).astype("<f4")
    else:
        import torch

        rows = ck.get_slice(name)[:EMBED_ROWS].to(torch.float32).contiguous().numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()


def base_identity(ck: Checkpoint) -> dict:
    return {
        "model_type": arch.detect(ck.config).model_type,
        "config_sha256": config_sha256(ck.config),
        "embed_sha256": embed_sha256(ck),
    }


def _same_base(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model_type", "config_sha256", "embed_sha256"))


def _short(fp: dict) -> str:
    return f"config {str(fp.get('config_sha256'))[:12]}, embeddings {str(fp.get('embed_sha256'))[:12]}"


# ---- writing --------------------------------------------------------------------------------
def largest_shard(ck: Checkpoint) -> int:
    """Bytes of the source's largest shard: outputs keep about the same shard size."""
    sizes: dict[str, int] = {}
    for i in ck.infos.values():
        sizes[i.shard] = sizes.get(i.shard, 0) + i.nbytes
    return max(sizes.values(), default=1)


def stage_record(src: Checkpoint, plan: dict) -> dict:
    """The record stage A and the bundles directory carry (what rebuilding a stage needs)."""
    keys = (
        "n_layers",
        "kept",
        "dropped",
        "block",
        "bundles",
        "selection",
        "drop_frac",
        "keep_last_layer",
        "block_distance",
        "distances",
    )
    return {
        "format": RECORD_FORMAT,
        "model_type": plan["model_type"],
        "n_layers_a": len(plan["kept"]),
        **{k: plan.get(k) for k in keys},
        "base": {**base_identity(src), "path": str(src.path)},
        "base_config": src.config,
    }


def existing_bundles(path) -> list[Path]:
    """Bundle directories (those holding bundle.json) under `path`, plus its record if present."""
    p = Path(path)
    if not p.is_dir():
        return []
    found = sorted(q.parent for q in p.glob(f"*/{BUNDLE}"))
    return found + ([p / RECORD] if (p / RECORD).exists() else [])


def save_bundles(
    src: Checkpoint, groups: dict[str, list[int]], out, record: dict, overwrite: bool = False, atomic: bool = True
) -> Path:
    """Write each group of layers as a bundle directory plus the record; the whole directory appears at once.

    `atomic=False`: write straight into `out`, a temp dir of the caller's transaction (layer-drop).
    """
    out = Path(out)
    if atomic:
        with transaction(dirs=[out], overwrite=overwrite) as t:
            save_bundles(src, groups, t[out], record, atomic=False)
        return out
    out.mkdir(parents=True, exist_ok=True)
    base = record["base"]
    for name, layers in groups.items():
        entries = [copied(src, n) for n in src.keys() if arch.layer_of(n) in set(layers)]
        dtypes = sorted({e.dtype for e in entries})
        meta = {
            "format": BUNDLE_FORMAT,
            "name": name,
            "model_type": base["model_type"],
            "layers": list(layers),
            "n_layers_base": arch.detect(src.config).n_layers(src.config),
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "n_tensors": len(entries),
            "base": base,
        }
        write_checkpoint(
            out / name,
            entries,
            config=None,
            n_shards=1,
            extra_json={BUNDLE: meta},
            desc=f"bundle {name}",
            atomic=False,
        )
    write_json(out / RECORD, record)
    return out


# ---- reading and checking -------------------------------------------------------------------
def read_record(a_dir, bundles_dir) -> dict:
    """Stage A's record (or, for an A re-saved without one, e.g. after healing, the bundles')."""
    for p in (Path(a_dir) / RECORD, Path(bundles_dir) / RECORD):
        if p.exists():
            rec = read_json(p)
            if rec.get("format") != RECORD_FORMAT:
                raise ValueError(f"{p}: not a layer-drop record (format {rec.get('format')!r})")
            return rec
    raise FileNotFoundError(
        f"neither {Path(a_dir) / RECORD} nor {Path(bundles_dir) / RECORD}: not the output of layer-drop"
    )


def bundle_names(record: dict) -> list[str]:
    return list(record["bundles"])


def stage_bundles(record: dict, stage: str) -> list[str]:
    """Bundles a stage adds to A: 'A' none, 'FULL' all, 'AB' / 'ABC' / 'AC' those letters."""
    names = bundle_names(record)
    if stage == "FULL":
        return names
    rest = list(stage[1:]) if stage.startswith("A") else None
    if rest is None or any(b not in names for b in rest) or len(set(rest)) != len(rest):
        raise ValueError(f"stage {stage!r}: expected A, FULL or A followed by bundle names from {names}")
    return sorted(rest, key=names.index)


def stage_layers(record: dict, stage: str) -> list[int]:
    """Original indices of the layers a stage runs, in order."""
    kept = [int(v) for v in record["kept"].values()]
    added = [l for b in stage_bundles(record, stage) for l in record["bundles"][b]]
    return sorted(kept + added)


def default_stages(record: dict) -> list[str]:
    names = bundle_names(record)
    return ["A"] + ["A" + "".join(names[:k]) for k in range(1, len(names))] + ["FULL"]


def check_bundle(a: Checkpoint, record: dict, bundles_dir, name: str, a_fp: dict | None = None) -> dict:
    """bundle.json of bundle `name`, checked against stage A (model type, base, layers).

    `a_fp`: `base_identity(a)` when the caller already has it (it reads embedding rows).
    """
    bdir = Path(bundles_dir) / name
    if not (bdir / BUNDLE).exists():
        raise FileNotFoundError(
            f"{bdir}: no {BUNDLE} (bundles there: {[p.name for p in existing_bundles(bundles_dir)]})"
        )
    meta = read_json(bdir / BUNDLE)
    a_fp = a_fp or base_identity(a)
    if meta.get("model_type") != a_fp["model_type"]:
        raise ValueError(
            f"bundle {bdir} holds {meta.get('model_type')!r} layers but stage A {a.path} is a "
            f"{a_fp['model_type']!r} model"
        )
    if not _same_base(meta.get("base", {}), a_fp):
        raise ValueError(
            f"bundle {bdir} was cut from another base ({_short(meta.get('base', {}))}, from "
            f"{meta.get('base', {}).get('path')}) than stage A {a.path} ({_short(a_fp)})"
        )
    if list(meta["layers"]) != list(record["bundles"].get(name, [])):
        raise ValueError(f"bundle {bdir} holds layers {meta['layers']}, the record says {record['bundles'].get(name)}")
    return meta


def check_stage_a(a: Checkpoint, record: dict, a_fp: dict | None = None) -> None:
    """Stage A is the model the record describes: same base, as many layers as it keeps."""
    a_fp = a_fp or base_identity(a)
    if not _same_base(record.get("base", {}), a_fp):
        raise ValueError(
            f"{RECORD} describes another base ({_short(record.get('base', {}))}, from "
            f"{record.get('base', {}).get('path')}) than stage A {a.path} ({_short(a_fp)})"
        )
    n_a = arch.detect(a.config).n_layers(a.config)
    if n_a != len(record["kept"]):
        raise ValueError(f"stage A {a.path} has {n_a} layers, {RECORD} keeps {len(record['kept'])}")


def check_inputs(a: Checkpoint, record: dict, bundles_dir, names: list[str]) -> None:
    """Every check before any weight is read: the bundles `names`, then stage A, against one base identity of A."""
    a_fp = base_identity(a)
    for b in names:
        check_bundle(a, record, bundles_dir, b, a_fp)
    check_stage_a(a, record, a_fp)


def stage_config(a_config: dict, record: dict, layers: list[int]) -> dict:
    """A's config (as saved, healed or not) with the layer fields of a stage running `layers`."""
    out = arch.keep_layers_config(record["base_config"], layers)
    fam = arch.detect(record["base_config"])
    cfg = dict(a_config)
    for key in (fam.layers_key, *fam.per_layer_lists):
        if key in out:
            cfg[key] = out[key]
    return cfg


# ---- in memory ------------------------------------------------------------------------------
def _stage_config_object(a_config, record: dict, layers: list[int]):
    """A copy of A's config object (attention implementation and all) with a stage's layer fields."""
    cfg = copy.deepcopy(a_config)
    fields = stage_config(a_config.to_dict(), record, layers)
    fam = arch.detect(record["base_config"])
    for key in (fam.layers_key, *fam.per_layer_lists):
        if key in fields:
            setattr(cfg, key, fields[key])
    return cfg


def load_stages(
    a_dir, bundles_dir, stages: list[str] | None = None, *, dtype=None, device=None, own: bool = True
) -> dict:
    """{"A", "AB", ..., "FULL"} (or the `stages` asked for) as models sharing module weights.

    Loads stage A once (`verify.load_check`: fails on missing keys; `own` copies the weights
    out of the mmap so logits are bit-reproducible) and each needed bundle once.
    """
    from helpers.layers import sharing  # torch: only when stages are loaded

    if dtype is None:
        import torch

        dtype = torch.float32
    a = Checkpoint(a_dir)
    record = read_record(a_dir, bundles_dir)
    stages = list(stages or default_stages(record))
    need = [b for b in bundle_names(record) if any(b in stage_bundles(record, s) for s in stages)]
    check_inputs(a, record, bundles_dir, need)
    a_model = load_check(a_dir, dtype=dtype, own=own, **({"device_map": str(device)} if device else {})).eval()
    a_layers = list(a_model.base_model.layers)
    first = next(a_model.parameters())
    by_orig = {int(orig): a_layers[int(new)] for new, orig in record["kept"].items()}
    full_cfg = _stage_config_object(a_model.config, record, stage_layers(record, "FULL"))
    for b in need:
        by_orig.update(
            sharing.load_bundle_layers(Path(bundles_dir) / b, type(a_layers[0]), full_cfg, first.dtype, first.device)
        )
    out = {}
    for s in stages:
        layers = [by_orig[l] for l in stage_layers(record, s)]
        if s == "A":
            model = a_model
        else:
            model = sharing.stage_view(
                a_model, layers, _stage_config_object(a_model.config, record, stage_layers(record, s))
            )
        model.base_model.register_forward_pre_hook(sharing.renumber_hook(layers))
        out[s] = model
    sharing.share_output_hooks(list(out.values()), [by_orig[l] for l in sorted(by_orig)], a_model)
    return out


def load_stage(a_dir, bundles_dir, stage: str, **kw):
    """One stage ("A", "AB", "FULL", ...) in memory; loads only the bundles it needs."""
    return load_stages(a_dir, bundles_dir, [stage], **kw)[stage]


# ---- standalone checkpoints -----------------------------------------------------------------
def assemble(a_dir, bundles_dir, stage: str, out, overwrite: bool = False) -> Path:
    """Write `stage` as a standalone HF checkpoint (layers renumbered 0..n-1), streaming byte copies."""
    a = Checkpoint(a_dir)
    record = read_record(a_dir, bundles_dir)
    layers = stage_layers(record, stage)
    bnames = stage_bundles(record, stage)
    check_inputs(a, record, bundles_dir, bnames)
    pos = {orig: p for p, orig in enumerate(layers)}
    orig_of = {int(new): int(orig) for new, orig in record["kept"].items()}
    a_dtype = a.info("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in a else None
    sources: list[tuple[int, Entry]] = []  # (sort key, entry): embeddings first, layers in order, head last
    for name in a.keys():
        l = arch.layer_of(name)
        key = (-1 if "embed" in name else len(layers)) if l is None else pos[orig_of[l]]
        sources.append((key, copied(a, name, None if l is None else arch.renumber(name, pos[orig_of[l]]))))
    for b in bnames:
        bck = Checkpoint(Path(bundles_dir) / b)
        for name in bck.keys():
            p = pos[arch.layer_of(name)]
            info = bck.info(name)
            if a_dtype and info.dtype != a_dtype:  # A was re-saved in another dtype (e.g. healed): match it
                ent = computed(
                    arch.renumber(name, p),
                    info,
                    (lambda c=bck, n=name, d=a_dtype: c.get(n).to(torch_dtype(d))),
                    dtype=a_dtype,
                )
            else:
                ent = copied(bck, name, arch.renumber(name, p))
            sources.append((p, ent))
    entries = [e for _, e in sorted(sources, key=lambda s: s[0])]
    info = {
        "stage": stage,
        "layers": layers,
        "bundles": bnames,
        "base": record["base"],
        "from": {"stage_a": str(a.path), "bundles": str(bundles_dir)},
    }
    return write_checkpoint(
        out,
        entries,
        config=stage_config(a.config, record, layers),
        side_files_from=a.path,
        max_shard_size=largest_shard(a),
        overwrite=overwrite,
        extra_json={STAGE: info},
        desc=f"assemble {stage}",
    )


def cli_assemble(args) -> int:
    out = assemble(args.base_model, args.bundles_dir, args.stage, args.out, overwrite=args.overwrite)
    n = len(stage_layers(read_record(args.base_model, args.bundles_dir), args.stage))
    print(f"stage {args.stage}: {n} layers -> {out}")
    return 0

"""Streaming safetensors checkpoints, the writing side: planned entries, shard packing, atomic writes.

The writer knows every tensor's dtype and shape before it writes, so it emits each shard's header
first and then streams tensors one by one: unchanged tensors are copied byte range to byte range
(`os.copy_file_range`, no deserialisation), computed ones are materialised one at a time. Peak
memory is one tensor, whatever the model size. Reading lives in helpers/core/checkpoint.py.

Usage: `src = Checkpoint("in/"); write_checkpoint("out/", passthrough(src), config=src.config, like=src)`
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from helpers.core.checkpoint import DTYPES, INDEX, SIDE_FILES, Checkpoint, CheckpointError, TensorInfo, dtype_code
from helpers.core.compat import make_portable
from helpers.core.fsutil import atomic_dir, disk_error, write_json
from helpers.core.txn import check_overlap

if TYPE_CHECKING:
    import torch


def parse_size(size, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB' or a positive int -> bytes (decimal units as in transformers)."""
    bad = ValueError(f"{flag} {size!r}: expected a positive size such as 5GB, 500MB or 2GiB")
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        s = str(size).strip().upper()
        units = {"GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
        mult = next((m for u, m in units.items() if s.endswith(u)), 1)
        num = next((s[: -len(u)] for u in units if s.endswith(u)), s)
        try:
            n = int(float(num) * mult)
        except ValueError:
            raise bad from None
    if n <= 0:
        raise bad
    return n


# ---- planning -------------------------------------------------------------------------------
@dataclass
class Entry:
    """One output tensor: its name, dtype, shape, target shard, and where its bytes come from.

    Exactly one of `src` (byte ranges of a source file, copied verbatim and concatenated: a
    `(path, start, end)` or `(path, [(start, end), ...])`) and `make` (a function returning the
    tensor, called when the writer reaches it) is set.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str | None = None
    src: tuple | None = None
    make: Callable[[], torch.Tensor] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][0]


def copied(ck: Checkpoint, name: str, new_name: str | None = None) -> Entry:
    """An entry that copies tensor `name` of `ck` byte for byte (optionally renamed)."""
    i = ck.info(name)
    return Entry(new_name or name, i.dtype, i.shape, i.shard, src=(ck.path / i.shard, i.start, i.end))


def computed(
    name: str,
    like: TensorInfo | None,
    make: Callable[[], torch.Tensor],
    *,
    dtype: str | None = None,
    shape=None,
    shard: str | None = None,
) -> Entry:
    """An entry materialised by `make()` at write time; dtype/shape/shard default to `like`'s."""
    return Entry(
        name,
        dtype or like.dtype,
        tuple(shape if shape is not None else like.shape),
        shard if shard is not None else (like.shard if like else None),
        make=make,
    )


def rows_of(ck: Checkpoint, name: str, rows: list[int], new_name: str | None = None) -> Entry:
    """An entry holding rows `rows` (dim 0, in that order) of tensor `name`, gathered as byte ranges."""
    i = ck.info(name)
    row = i.nbytes // i.shape[0]  # bytes per row, row-major
    ranges = [(i.start + r * row, i.start + (r + 1) * row) for r in rows]
    return Entry(new_name or name, i.dtype, (len(rows), *i.shape[1:]), i.shard, src=(ck.path / i.shard, ranges))


def passthrough(ck: Checkpoint) -> list[Entry]:
    """Every tensor of `ck`, copied verbatim, in the source's shard order."""
    return [copied(ck, n) for n in ck.keys()]


# ---- writing --------------------------------------------------------------------------------
def _copy_range(src: Path, start: int, end: int, dst) -> None:
    with open(src, "rb") as f:
        left, off = end - start, start
        while left > 0:
            dst.flush()  # the kernel copy writes at the fd's offset: nothing may sit in Python's buffer
            try:
                n = os.copy_file_range(f.fileno(), dst.fileno(), left, off)
            except OSError:  # cross-device on old kernels, unsupported fs: plain copy
                n = 0
            if n == 0:
                f.seek(off)
                buf = f.read(min(left, 64 << 20))
                if not buf:
                    raise CheckpointError(f"{src}: ended early at byte {off}")
                dst.write(buf)
                n = len(buf)
            else:  # keep Python's file position in step with the kernel copy
                dst.seek(0, os.SEEK_END)
            left -= n
            off += n


def _write_tensor(e: Entry, dst) -> None:
    t = e.make()
    if tuple(t.shape) != tuple(e.shape) or dtype_code(t.dtype) != e.dtype:
        raise CheckpointError(f"{e.name}: made {dtype_code(t.dtype)}{list(t.shape)}, planned {e.dtype}{list(e.shape)}")
    import torch

    dst.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _write_shard(path: Path, entries: list[Entry], metadata: dict, bar) -> None:
    header, off = {"__metadata__": metadata}, 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data buffer starts 8-byte aligned, as safetensors writes it
    try:
        _stream_shard(path, raw, entries, bar)
    except OSError as e:
        raise disk_error(e, path, off + len(raw) + 8) from None


def _stream_shard(path: Path, raw: bytes, entries: list[Entry], bar) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            if e.src is not None:
                ranges = e.src[1] if isinstance(e.src[1], list) else [e.src[1:]]
                for start, end in ranges:
                    _copy_range(e.src[0], start, end, f)
            else:
                _write_tensor(e, f)
            bar.update(e.nbytes)


def _pack(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.nbytes
    return shards + [cur] if cur else shards


def _split(entries: list[Entry], n: int) -> list[list[Entry]]:
    """Cut entries, in order, into n groups of about equal bytes."""
    total = max(1, sum(e.nbytes for e in entries))
    groups, start = [[] for _ in range(n)], 0
    for e in entries:
        groups[min(n - 1, (start + e.nbytes // 2) * n // total)].append(e)
        start += e.nbytes
    return groups


def write_checkpoint(
    out,
    entries: list[Entry],
    *,
    config: dict | None,
    like: Checkpoint | None = None,
    max_shard_size=None,
    n_shards: int | None = None,
    side_files_from=None,
    overwrite: bool = False,
    extra_json: dict[str, dict] | None = None,
    desc: str = "write",
    atomic: bool = True,
) -> Path:
    """Write `entries` as an HF safetensors checkpoint at `out`, atomically.

    Mode `mirror` (default when `like` is given and no `max_shard_size`): the same shard files as
    `like`, each entry in the shard named by `entry.shard`. Mode `max_size`: entries packed in
    order into shards of at most `max_shard_size` bytes (a larger single tensor gets its own).
    Mode `n_shards`: entries cut in order into that many shards of about equal size.
    Config, generation config and tokenizer files come from `side_files_from` (default `like`);
    `extra_json` ({file name: object}) lands in the same atomic directory (records, plans).
    An output that is, contains or replaces part of a source is refused before anything is written.
    `atomic=False` writes straight into `out` (a directory inside a caller's transaction temp dir).
    """
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"duplicate tensor names in output: {dup[:5]}")
    if n_shards is not None:
        packed = _split(entries, n_shards)
        files = [(f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors", g) for i, g in enumerate(packed)]
    elif max_shard_size is None and like is not None:
        groups = {s: [] for s in like.shards}
        for e in entries:
            if e.shard not in groups:
                raise CheckpointError(f"{e.name}: target shard {e.shard!r} is not a shard of {like.path}")
            groups[e.shard].append(e)
        files = list(groups.items())
    else:
        packed = _pack(entries, parse_size(max_shard_size or "5GB"))
        n = len(packed)
        files = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(packed)]
    total = sum(e.nbytes for e in entries)
    side = Path(side_files_from) if side_files_from else (like.path if like else None)
    out = Path(out)
    sources = {Path(e.src[0]).parent for e in entries if e.src is not None} | ({side} if side else set())
    check_overlap({f"source {p}": p for p in sorted(sources)}, {"output": out})
    if atomic:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            _write_all(tmp, files, entries, total, config, side, extra_json, f"{desc} {out.name}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_all(out, files, entries, total, config, side, extra_json, f"{desc} {out.name}")
    return out


def _write_all(tmp: Path, files, entries, total: int, config, side, extra_json, desc: str) -> None:
    meta = {"format": "pt"}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for fname, group in files:
            _write_shard(tmp / fname, group, meta, bar)
        weight_map = {e.name: fname for fname, group in files for e in group}
        params = sum(e.numel for e in entries)
        index = {"metadata": {"total_parameters": params, "total_size": total}, "weight_map": weight_map}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if side is not None:
            for f in SIDE_FILES:
                if (side / f).exists():
                    shutil.copy2(side / f, tmp / f)
        for name, obj in (extra_json or {}).items():
            write_json(tmp / name, obj)
        make_portable(tmp)


def copy_checkpoint(src, out, *, max_shard_size=None, overwrite: bool = False) -> Path:
    """Read `src` and write it again: mirror mode by default, `max_size` with max_shard_size."""
    ck = Checkpoint(src)
    return write_checkpoint(
        out,
        passthrough(ck),
        config=ck.config or None,
        like=ck,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        desc="copy",
    )


# ---- command line ---------------------------------------------------------------------------
def cli_copy(args) -> int:
    out = copy_checkpoint(args.model, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {out} ({len(Checkpoint(out).shards)} shards)")
    return 0

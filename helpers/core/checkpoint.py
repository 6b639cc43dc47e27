"""Streaming safetensors checkpoints, the reading side: index-first lazy reader, header parsing, dtypes.

The reader parses every shard header up front (bytes, not tensors) so that a missing or truncated
shard, or an index naming a tensor its shard lacks, fails before any work with the file named.
Writing (sharded, streamed, atomic) lives in helpers/core/writer.py; checking what was written
(hash comparison, clean loading) in helpers/core/verify.py.

Usage: `ck = Checkpoint("in/"); shape = ck.info(name).shape; t = ck.get(name)`
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Files a checkpoint carries beside its weights; config.json is written, not copied.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# safetensors dtype code -> (bytes per element, torch dtype name); torch is imported only when a
# tensor is materialised, so byte-copying surgery starts in milliseconds.
DTYPES = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}


class CheckpointError(ValueError):
    """A checkpoint on disk that cannot be read as it claims to be."""


def dtype_code(dtype) -> str:
    """safetensors code of a torch dtype (torch.bfloat16 -> 'BF16')."""
    name = str(dtype).removeprefix("torch.")
    for code, (_, n) in DTYPES.items():
        if n == name:
            return code
    raise ValueError(f"dtype {dtype} has no safetensors code")


def torch_dtype(code: str):
    import torch

    return getattr(torch, DTYPES[code][1])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes sit: shard file name, dtype code, shape, absolute byte range."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data buffer) of a safetensors file, validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors header (claims {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated: header needs {8 + n + data_end} bytes, file has {size}")
    return header, 8 + n


def local_dir(model) -> Path:
    """A checkpoint directory on disk: `model` itself, or the hub snapshot of an `org/name` id.

    The one place a hub id becomes a path (weights, configs, tokenizer files); anything that is
    neither fails with one line naming it.
    """
    p = Path(model)
    if p.is_dir():
        return p
    if p.exists() or str(model).startswith((".", "/")) or str(model).count("/") != 1:
        raise FileNotFoundError(f"{model}: not a checkpoint directory (nor a hub id org/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                str(model), allow_patterns=["*.safetensors", "*.json", "*.model", "*.jinja", "tokenizer*", "*.txt"]
            )
        )
    except Exception as e:  # offline, unknown repo, gated: one line naming what was asked for
        raise FileNotFoundError(
            f"{model}: no such checkpoint directory, and not fetchable from the hub ({type(e).__name__})"
        ) from None


class Checkpoint:
    """Lazy, index-first view of a safetensors checkpoint directory (single file or sharded)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        cfg = self.path / "config.json"
        self.config: dict = json.loads(cfg.read_text()) if cfg.exists() else {}
        index_path = self.path / INDEX
        if index_path.exists():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        elif (self.path / SINGLE).exists():
            weight_map = None
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE}")
        self.shards: list[str] = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        infos: dict[str, TensorInfo] = {}
        for shard in self.shards:
            p = self.path / shard
            if not p.exists():
                raise CheckpointError(f"{self.path}: shard {shard} named in {INDEX} is missing")
            header, base = read_header(p)
            header.pop("__metadata__", None)
            for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if weight_map is None or weight_map.get(name) == shard:
                    a, b = h["data_offsets"]
                    infos[name] = TensorInfo(name, shard, h["dtype"], tuple(h["shape"]), base + a, base + b)
        if weight_map:
            for name, shard in weight_map.items():
                if name not in infos:
                    raise CheckpointError(f"{self.path}: {INDEX} names tensor {name} in {shard}, which lacks it")
        self.infos: dict[str, TensorInfo] = infos  # shard order, then file order
        self._open: tuple[str, object] | None = None

    # ---- inspection -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name) -> bool:
        return name in self.infos

    def __len__(self) -> int:
        return len(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name}") from None

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def shard_of(self, name: str) -> str:
        return self.info(name).shard

    # ---- reading ----------------------------------------------------------------------------
    def _handle(self, shard: str):
        if self._open is None or self._open[0] != shard:
            self.close()
            from safetensors import safe_open

            self._open = (shard, safe_open(str(self.path / shard), framework="pt").__enter__())
        return self._open[1]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its shard (the only shard held open)."""
        return self._handle(self.info(name).shard).get_tensor(name)

    def get_slice(self, name: str):
        """A lazy slice handle: `ck.get_slice(n)[e, :I]` reads only those bytes."""
        return self._handle(self.info(name).shard).get_slice(name)

    def iter(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, in shard order so each shard is opened once."""
        wanted = self.keys() if names is None else sorted(names, key=self._order)
        for n in wanted:
            yield n, self.get(n)

    def _order(self, name: str) -> tuple[int, int]:
        i = self.info(name)
        return self.shards.index(i.shard), i.start

    def close(self):
        if self._open is not None:
            self._open[1].__exit__(None, None, None)
            self._open = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

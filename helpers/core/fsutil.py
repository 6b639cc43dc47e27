"""Atomic outputs and content hashes: nothing half-written ever sits at a target path.

Usage: `with atomic_dir("runs/toy/03/standard", overwrite=False) as tmp: write_into(tmp)`
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

CHUNK = 8 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkdtemp/mkstemp create 0700/0600 entries; outputs get the modes a plain mkdir/open would.
_DIR_MODE, _FILE_MODE = 0o777 & ~_umask(), 0o666 & ~_umask()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def refuse_existing(target, overwrite: bool = False) -> Path:
    """Raise FileExistsError if `target` exists (an empty dir does not count) and not `overwrite`.

    Call it before slow work that ends in atomic_dir / transaction; they check again under the lock.
    """
    from helpers.core.txn import _exists, sweep

    target = Path(target)
    sweep(target)  # a killed writer's half-swapped outputs are rolled back first: they never count as existing
    if _exists(target) and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    return target


@contextmanager
def atomic_dir(target, overwrite: bool = False):
    """Yield a temp dir beside `target`; on success fsync it and swap it in (helpers.core.txn.transaction).

    The target is locked for the whole write (a second writer fails naming this pid); an existing
    target is refused unless `overwrite`; on any error, Ctrl-C or SIGKILL it is untouched, and a
    killed writer's temp dir is swept by the next writer of the same target.
    """
    from helpers.core.txn import transaction

    with transaction(dirs=[target], overwrite=overwrite) as t:
        yield t[target]


def disk_error(e: OSError, path, need: int | None = None) -> OSError:
    """A full disk or file-size limit as one line naming the file and the bytes free; other errors as they are."""
    if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return e
    free = "unknown"
    with suppress(OSError):
        st = os.statvfs(Path(path).parent)
        free = f"{st.f_bavail * st.f_frsize:,}"
    what = {errno.ENOSPC: "no space left", errno.EFBIG: "file too large", errno.EDQUOT: "quota exceeded"}[e.errno]
    size = f" (writing {need:,} bytes)" if need else ""
    return OSError(e.errno, f"{path}: {what}{size}; {free} bytes free there; nothing was left at the output")


def write_text(path, text: str) -> Path:
    """Write a text file atomically (temp file + fsync + rename), creating parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # a killed writer's temp file
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finite(obj):
    """`obj` with every NaN / Infinity float replaced by None: JSON that every parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path, obj, indent: int = 2) -> Path:
    """Write JSON atomically, creating parent dirs; NaN / Infinity are written as null (valid JSON)."""
    return write_text(path, json.dumps(finite(obj), indent=indent, default=str, allow_nan=False) + "\n")


def write_jsonl(path, rows) -> Path:
    """Write one JSON object per line, atomically."""
    return write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def file_sha256(path, start: int = 0, length: int | None = None) -> str:
    """sha256 of a file, or of `length` bytes from `start`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = length
        while left is None or left > 0:
            buf = f.read(CHUNK if left is None else min(CHUNK, left))
            if not buf:
                break
            h.update(buf)
            if left is not None:
                left -= len(buf)
    return h.hexdigest()


def tree_sha256(path) -> str:
    """sha256 of a file, or of a directory as sorted (relative path, file sha256) pairs."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def dir_bytes(path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

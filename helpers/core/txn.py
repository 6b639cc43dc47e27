"""Outputs that appear whole or not at all: overlap guard, one writer per output, multi-path transactions.

- `check_overlap(inputs, outputs)`: an output equal to an input, containing one, or lying inside one
  and replacing something there is refused (one line naming both) before anything is read or written.
- `output_lock(*targets)`: an exclusive `flock` on `.NAME.lock` beside each target, held until the
  final rename; a second writer fails at once naming the holder's pid (`OutputBusy`).
- `transaction(dirs, files, overwrite)`: a temp path beside every target; on success all are fsynced,
  a journal (`.txn-PID-*.json`, one copy per parent) is written, and each target is swapped in. A
  crash before the journal leaves only temp paths (swept); a crash during the swap is rolled back by
  the next writer of any of its targets (or `sweep`), so a reader sees either all old or all new
  outputs once a writer has passed. An existing target is never put aside unless `overwrite`.

Usage: `with transaction([a_dir, b_dir], files=[plan], overwrite=False) as t: write(t[a_dir]); ...`
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _crash(point: str) -> None:
    """Test hook: SIGKILL this process at a named commit point (tests/test_reliability.py sets HELPERS_CRASH_AT)."""
    if os.environ.get("HELPERS_CRASH_AT") == point:
        os.kill(os.getpid(), 9)


class OutputBusy(FileExistsError):
    """Another live process holds the output's lock."""


def _abs(p) -> Path:
    return Path(os.path.abspath(Path(p).expanduser()))


def _real(p) -> Path:
    return Path(p).expanduser().resolve()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exists(p: Path) -> bool:
    """True for a file, a symlink, or a non-empty directory (an empty directory may be replaced freely)."""
    if p.is_symlink() or p.is_file():
        return True
    return p.is_dir() and any(p.iterdir())


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def _fsync_path(p: Path) -> None:
    if p.is_dir():
        for dirpath, _, files in os.walk(p):
            for f in files:
                _fsync_fd(os.path.join(dirpath, f))
            _fsync_fd(dirpath)
    elif p.exists():
        _fsync_fd(p)


def _fsync_fd(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- overlap guard ----------------------------------------------------------------------------
def check_overlap(inputs: dict, outputs: dict) -> None:
    """Refuse outputs that are, contain, or replace part of an input ({label: path}; None entries skipped)."""
    for on, o in outputs.items():
        if o is None:
            continue
        ro = _real(o)
        for inn, i in inputs.items():
            if i is None or not Path(i).exists():
                continue  # a hub id is not a local path
            ri = _real(i)
            if ro == ri:
                raise ValueError(f"{on} {o} is the input {inn} {i}: writing it would destroy what is read")
            if ro in ri.parents:
                raise ValueError(f"{on} {o} contains the input {inn} {i}: replacing it would delete the input")
            if ri in ro.parents and _exists(ro):
                raise ValueError(f"{on} {o} lies inside the input {inn} {i} and exists: replacing it changes the input")


# ---- one writer per output --------------------------------------------------------------------
_HELD: dict[Path, list] = {}  # target -> [fd, lock path, depth]: reentrant within this process


def _acquire(target: Path) -> None:
    if target in _HELD:
        _HELD[target][2] += 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusy(
                f"{target} is being written by another process (pid {pid}); wait or choose another output"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder unlinked it between our open and flock: retry on the new file
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[target] = [fd, lock, 1]


def _release(target: Path) -> None:
    held = _HELD[target]
    held[2] -= 1
    if held[2] == 0:
        del _HELD[target]
        Path(held[1]).unlink(missing_ok=True)  # while still locked: the next writer retries on a fresh file
        os.close(held[0])


@contextmanager
def output_lock(*targets):
    done = []
    try:
        for t in sorted({_abs(t) for t in targets}):
            _acquire(t)
            done.append(t)
        yield
    finally:
        for t in reversed(done):
            _release(t)


# ---- crash recovery -------------------------------------------------------------------------
def _journal_state(journal: dict) -> str:
    """'done' if any copy says so (copies are rewritten one by one), else 'committing'."""
    for j in journal["journals"]:
        try:
            if json.loads(Path(j).read_text()).get("state") == "done":
                return "done"
        except (OSError, ValueError):
            continue
    return "committing"


def _finish(journal: dict) -> None:
    """Roll a journal forward (state done: drop the old copies) or back (restore them), then delete it."""
    done = _journal_state(journal) == "done"
    for e in journal["entries"]:
        target, tmp, old = Path(e["target"]), e["tmp"] and Path(e["tmp"]), Path(e["old"])
        if done:
            _remove(old)
            continue
        moved_in = e["tmp"] is not None and not tmp.exists() and target.exists()
        if old.exists() or old.is_symlink():  # the target was put aside: what sits there now is new
            _remove(target)
            os.rename(old, target)
        elif moved_in and not e["existed"]:
            _remove(target)
        if tmp:
            _remove(tmp)
    for j in journal["journals"]:
        Path(j).unlink(missing_ok=True)


def _tag_pid(name: str, tag: str) -> int | None:
    try:
        return int(name.rsplit(tag, 1)[1].split("-")[0].split(".")[0])
    except (IndexError, ValueError):
        return None


def sweep(target) -> None:
    """Finish dead writers' journals beside `target`; remove their temp paths and put-aside copies."""
    target = _abs(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for j in parent.glob(".txn-*.json.part"):
        pid = _tag_pid(j.name, ".txn-")
        if pid is not None and not _pid_alive(pid):
            j.unlink(missing_ok=True)
    for j in parent.glob(".txn-*.json"):
        pid = _tag_pid(j.name, ".txn-")
        if pid is None or _pid_alive(pid):
            continue
        try:
            journal = json.loads(j.read_text())
        except (OSError, ValueError):
            j.unlink(missing_ok=True)  # torn before its rename: nothing was moved under it
            continue
        others = [_abs(e["target"]) for e in journal["entries"]]
        try:
            with output_lock(*others):
                _finish(journal)
        except OutputBusy:
            continue
    for p in parent.glob(".*.tmp-*"):  # every dead writer's temp path in this directory
        pid = _tag_pid(p.name, ".tmp-")
        if pid is not None and not _pid_alive(pid):
            _remove(p)
    for p in parent.glob(".*.old-*"):  # left by a writer without a journal (older versions)
        pid = _tag_pid(p.name, ".old-")
        orig = parent / p.name[1:].rsplit(".old-", 1)[0]
        if pid is not None and not _pid_alive(pid):
            if not (orig.exists() or orig.is_symlink()):
                os.rename(p, orig)
            else:
                _remove(p)
    for p in parent.glob(".*.lock"):  # a killed writer's lock file: free once nobody holds it
        other = parent / p.name[1:-5]
        if other not in _HELD:
            try:
                with output_lock(other):
                    pass
            except OutputBusy:
                pass


# ---- transactions ---------------------------------------------------------------------------
class Transaction:
    """Temp paths for a set of targets; `t[target]` is where to write it."""

    def __init__(self, dirs, files, overwrite: bool, replace=()):
        self.replace = {_abs(r) for r in replace}  # targets this writer owns (records): replaced even without overwrite
        self.overwrite = overwrite
        self.targets = [_abs(d) for d in dirs] + [_abs(f) for f in files]
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"the same output path is named twice: {[str(t) for t in self.targets]}")
        self.tmp: dict[Path, Path] = {}
        for t in self.targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            sweep(t)
            if _exists(t) and not (overwrite or t in self.replace):
                raise FileExistsError(f"{t} already exists; pass overwrite=True (--overwrite) to replace it")
        pid = os.getpid()
        for t in (_abs(d) for d in dirs):
            self.tmp[t] = Path(tempfile.mkdtemp(prefix=f".{t.name}.tmp-{pid}-", dir=t.parent))
            os.chmod(self.tmp[t], 0o777 & ~_umask())
        for t in (_abs(f) for f in files):
            fd, name = tempfile.mkstemp(prefix=f".{t.name}.tmp-{pid}-", dir=t.parent)
            os.close(fd)
            os.unlink(name)  # the caller creates the file (or leaves it out: then the target is removed)
            self.tmp[t] = Path(name)

    def __getitem__(self, target) -> Path:
        return self.tmp[_abs(target)]

    def abort(self) -> None:
        for p in self.tmp.values():
            _remove(p)

    def commit(self) -> None:
        pid = os.getpid()
        entries = []
        for t, tmp in self.tmp.items():
            written = tmp.exists() and not (tmp.is_dir() and not any(tmp.iterdir()))
            if tmp.is_dir() and not written:
                tmp.rmdir()  # an empty temp dir: nothing written, the target is removed
            if written:
                _fsync_path(tmp)
            if _exists(t) and not (self.overwrite or t in self.replace):
                raise FileExistsError(f"{t} appeared while this run wrote it; not replaced (use --overwrite)")
            present = t.exists() or t.is_symlink()
            old = t.parent / f".{t.name}.old-{pid}"
            entries.append(
                {"target": str(t), "tmp": str(tmp) if written else None, "old": str(old), "existed": present}
            )
        parents = sorted({t.parent for t in self.tmp})
        tag = next(iter(self.tmp.values())).name.rsplit("-", 1)[-1]
        journals = [str(p / f".txn-{pid}-{tag}.json") for p in parents]
        journal = {"pid": pid, "state": "committing", "entries": entries, "journals": journals}
        try:
            _crash("journal")
            for j in journals:
                _write_journal(Path(j), journal)
            for n, e in enumerate(entries):
                t = Path(e["target"])
                if e["existed"]:
                    os.rename(t, e["old"])
                _crash(f"aside-{n}")
                if e["tmp"]:
                    os.rename(e["tmp"], t)
                _crash(f"moved-{n}")
            for p in parents:
                _fsync_fd(p)
            for j in journals:
                _write_journal(Path(j), dict(journal, state="done"))
                _crash("done")
        except BaseException:
            _finish(journal)  # not all marked done: roll back to the old outputs
            raise
        _finish(dict(journal, journals=journals))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_journal(path: Path, journal: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(journal, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_fd(path.parent)


@contextmanager
def transaction(dirs=(), files=(), overwrite: bool = False, replace=()):
    """Lock every target, yield a Transaction of temp paths, commit all at once on success (see module doc).

    `replace`: targets replaced even without `overwrite` (a step's own records beside its outputs).
    """
    dirs, files = list(dirs), list(files)
    with output_lock(*dirs, *files):
        t = Transaction(dirs, files, overwrite, replace)
        try:
            yield t
        except BaseException:
            t.abort()
            raise
        try:
            t.commit()
        except BaseException:
            t.abort()
            raise

"""Fan independent work items out: in this process, local worker processes, or a scheduler through submitit.

Executors: `inline` (this process, one chunk after the other), `local` (a pool of worker processes,
the default: `concurrent.futures.ProcessPoolExecutor` with spawned workers), `slurm` (one submitit
job array on the cluster, a job per chunk) and `submitit-local` (submitit's LocalExecutor: the same
submission path as slurm, in local processes; what the tests run). No scheduling is done here beyond
cutting the items into chunks: each chunk is one call `fn(chunk)`, whose results come back in order.
Skipping work already done is the caller's business (it knows where its results live).

Usage: `results = fan_out(evaluate_chunk, chunks, executor="local", workers=2, folder="runs/toy/sweeps/jobs")`
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EXECUTORS = ("inline", "local", "slurm", "submitit-local")


def chunked(items: Sequence, n_chunks: int) -> list[list]:
    """`items` cut into at most `n_chunks` near-equal contiguous chunks (no empty chunk)."""
    n = max(1, min(int(n_chunks), len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(list(items[start:end]))
        start = end
    return [c for c in out if c]


def fan_out(
    fn: Callable,
    chunks: Sequence,
    *,
    executor: str = "local",
    workers: int = 2,
    folder=None,
    slurm: dict | None = None,
) -> list:
    """[fn(chunk) for chunk in chunks], run by `executor`; `fn` must be importable (a module-level function).

    `folder`: submitit's logs and pickles (slurm, submitit-local). `slurm`: extra submitit parameters
    (e.g. {"slurm_partition": "gpu", "timeout_min": 60, "gpus_per_node": 1}).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    chunks = list(chunks)
    if not chunks:
        return []
    if executor == "inline" or (executor == "local" and (workers <= 1 or len(chunks) == 1)):
        return [fn(c) for c in chunks]
    if executor == "local":
        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
            return list(pool.map(fn, chunks))
    import submitit

    if folder is None:
        raise ValueError(f"--executor {executor}: submitit needs a folder for its logs (--jobs-dir)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    if executor == "slurm":
        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        ex.update_parameters(**{"timeout_min": 60, "slurm_array_parallelism": workers, **(slurm or {})})
    else:
        ex = submitit.LocalExecutor(folder=str(folder))
        ex.update_parameters(timeout_min=60)
    jobs = ex.map_array(fn, chunks)
    return [j.result() for j in jobs]

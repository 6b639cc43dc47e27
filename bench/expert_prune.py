"""Bench: expert prune vs `cp -r` of the same checkpoint, and the prune's peak memory.

A Mixtral-shaped checkpoint (32 layers, 8 experts top-2, 19 shards, bf16, widths scaled to ~3.4 GB)
is synthesised into a temp dir under /work (not tmpfs), then pruned to 6 experts with
`--layout standard` and copied with `cp -r`, alternately, for several rounds; the first round is
dropped (cold caches) and medians are reported. Each prune is a fresh process that times its
import (Python + torch, a fixed cost) apart from the prune itself; the prune fsyncs its output
(atomic write), so `cp -r` is timed alone and followed by fsutil.fsync_tree of the copy (what the
writer does to its own output). Commands run through bench.common.timed, whose wall time and peak
RSS are the command process's own. Targets: prune / cp <= 1.0, peak RSS / checkpoint bytes < 0.10.
The big files are removed at the end.

Usage: `python bench/expert_prune.py [--rounds 4] [--hidden 768] [--root /work/bench_tmp]`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import timed  # noqa: E402
from helpers.core.fsutil import fsync_tree  # noqa: E402  (torch-free: this parent never imports torch)

ENV = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # for the children


# ---- children (run in their own processes) ----------------------------------------------------
def setup(tmp: Path, hidden: int, keep: int) -> None:
    """Synthesise the checkpoint and save a plan keeping `keep` random experts per layer."""
    import numpy as np
    import torch

    from helpers.core.checkpoint import Checkpoint
    from helpers.experts.prune import plan_expert_prune, save_plan
    from helpers.toy import synth

    # Mixtral-8x7B proportions: intermediate = 3.5 x hidden, head_dim 64, 4 query heads per kv head.
    cfg = synth.tiny_config(
        "mixtral",
        num_hidden_layers=32,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    synth.synth_checkpoint(cfg, tmp / "mixtral", n_shards=19, dtype=torch.bfloat16)
    ck = Checkpoint(tmp / "mixtral")
    rng = np.random.default_rng(0)
    plan = {str(l): sorted(rng.choice(8, keep, replace=False).tolist()) for l in range(32)}
    save_plan(tmp / "plan.json", plan_expert_prune(ck.config, keep=plan))


def child_prune(src: str, plan: str, out: str, result: str) -> None:
    """One prune, as `python -m helpers expert-prune` runs it, with import and work timed apart (JSON to `result`)."""
    t0 = time.perf_counter()
    import helpers.experts.prune  # noqa: F401  (what the CLI handler imports: numpy, no torch)
    from helpers.cli import main

    t1 = time.perf_counter()
    rc = main(["expert-prune", "--model", src, "--plan", plan, "--out", out, "--layout", "standard"])
    t2 = time.perf_counter()
    Path(result).write_text(json.dumps({"import_s": t1 - t0, "prune_s": t2 - t1, "rc": rc}))


# ---- parent -----------------------------------------------------------------------------------
def fsync_s(root: Path) -> float:
    t = time.perf_counter()
    fsync_tree(root)
    return time.perf_counter() - t


def bench(args) -> int:
    os.environ.update(ENV)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="expert_prune_", dir=args.root))
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        t = time.perf_counter()
        timed(me + ["--setup", str(tmp), "--hidden", str(args.hidden), "--keep", str(args.keep)])
        src, plan, out, copy = tmp / "mixtral", tmp / "plan.json", tmp / "pruned", tmp / "copy"
        total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        n_shards = len(list(src.glob("*.safetensors")))
        print(
            f"synthesised 32 layers x 8 experts, hidden {args.hidden}, {n_shards} shards, {total / 1e9:.2f} GB "
            f"in {time.perf_counter() - t:.0f} s; pruning to {args.keep} experts (layout standard)"
        )
        rows = []
        for r in range(args.rounds):
            row = {}
            for what in ("prune", "cp") if r % 2 == 0 else ("cp", "prune"):
                if what == "prune":
                    wall, row["rss"] = timed(
                        me + ["--child-prune", str(src), str(plan), str(out), str(tmp / "prune.json")]
                    )
                    row.update(json.loads((tmp / "prune.json").read_text()), wall_s=wall)
                    row["out_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                    shutil.rmtree(out)
                else:
                    row["cp_s"], _ = timed(["cp", "-r", str(src), str(copy)])
                    row["cp_fsync_s"] = row["cp_s"] + fsync_s(copy)
                    shutil.rmtree(copy)
            rows.append(row)
            print(
                f"round {r}: prune {row['prune_s']:.2f} s (+ {row['import_s']:.2f} s import;"
                f" process {row['wall_s']:.2f} s, peak RSS {row['rss'] / 1e6:.0f} MB)"
                f" | cp -r {row['cp_s']:.2f} s, + fsync {row['cp_fsync_s']:.2f} s"
                + ("  [dropped]" if r == 0 and args.rounds > 1 else "")
            )
        kept = rows[1:] or rows
        med = {
            k: statistics.median(x[k] for x in kept) for k in ("prune_s", "import_s", "wall_s", "cp_s", "cp_fsync_s")
        }
        rss = max(x["rss"] for x in rows)
        result = {
            "checkpoint_gb": round(total / 1e9, 3),
            "pruned_gb": round(rows[-1]["out_bytes"] / 1e9, 3),
            "shards": n_shards,
            "rounds_kept": len(kept),
            **{k: round(v, 3) for k, v in med.items()},
            "prune_over_cp": round(med["prune_s"] / med["cp_s"], 3),
            "prune_over_cp_fsync": round(med["prune_s"] / med["cp_fsync_s"], 3),
            "process_over_cp": round(med["wall_s"] / med["cp_s"], 3),
            "peak_rss_mb": round(rss / 1e6, 1),
            "peak_rss_over_checkpoint": round(rss / total, 4),
        }
        print(json.dumps(result, indent=2))
        print(
            f"prune / (cp -r + fsync) time: {result['prune_over_cp_fsync']:.2f}  target <= 1.0 "
            f"(both durable; the prune fsyncs before its atomic rename)"
        )
        print(
            f"prune / plain cp -r time: {result['prune_over_cp']:.2f} (cp leaves its copy in dirty page cache); "
            "whole prune process incl. Python start-up / cp+fsync: "
            f"{result['process_over_cp'] * result['cp_s'] / result['cp_fsync_s']:.2f}"
        )
        print(
            f"peak RSS / checkpoint bytes: {result['peak_rss_over_checkpoint']:.3f}"
            f" ({result['peak_rss_mb']:.0f} MB)  target < 0.10"
        )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds of (prune, cp); the first is dropped")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (768 -> ~3.4 GB checkpoint)")
    ap.add_argument("--keep", type=int, default=6, help="experts kept per layer")
    ap.add_argument("--root", default=str(ROOT / "runs" / "bench"), help="scratch dir on a real disk (not tmpfs)")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--child-prune", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.setup or args.child_prune:
        if args.setup:
            setup(Path(args.setup), args.hidden, args.keep)
        else:
            child_prune(*args.child_prune)
        return 0
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main())

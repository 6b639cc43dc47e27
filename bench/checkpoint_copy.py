"""Reader + writer copying a few-GB checkpoint vs `cp -r` of the same files, as ratios in one run.

Usage: `python bench/checkpoint_copy.py [--gb 3] [--rounds 3] [--dir bench/out]`
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import alternate, cp_cmd, gb  # noqa: E402
from helpers.core.checkpoint import Checkpoint  # noqa: E402
from helpers.core.fsutil import dir_bytes  # noqa: E402
from helpers.toy.synth import synth_checkpoint  # noqa: E402


def mistral_shaped(target_bytes: int):
    """Mistral-7B's depth and proportions, width scaled so bf16 weights total about target_bytes."""
    from transformers import MistralConfig

    # 32 layers of (4 H^2 attention-ish + 3 H * 3.5H MLP) + 2 * 32000 H embeddings, bf16
    h = 512
    while True:
        nxt = h + 128
        params = 32 * (2 * nxt * nxt + 2 * nxt * nxt // 4 + 3 * nxt * int(3.5 * nxt)) + 2 * 32000 * nxt
        if params * 2 > target_bytes:
            break
        h = nxt
    return MistralConfig(
        hidden_size=h,
        intermediate_size=int(3.5 * h),
        num_hidden_layers=32,
        num_attention_heads=h // 128,
        num_key_value_heads=max(1, h // 512),
        vocab_size=32000,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=3.0, help="checkpoint size")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="bench/out", help="scratch dir (on the disk you want to measure)")
    args = ap.parse_args()
    root = Path(args.dir).resolve() / "checkpoint_copy"
    src = root / "src"
    if not src.exists():
        synth_checkpoint(mistral_shaped(int(args.gb * 1e9)), src, n_shards=args.shards)
    size = Checkpoint(src).nbytes
    py = sys.executable
    res = alternate(
        {
            "cp -r + sync": (cp_cmd(src, root / "cp"), root / "cp"),
            "helpers copy (mirror)": (
                [py, "-m", "helpers", "copy", "--model", str(src), "--out", str(root / "mirror")],
                root / "mirror",
            ),
            "helpers copy (max_size 1GB)": (
                [
                    py,
                    "-m",
                    "helpers",
                    "copy",
                    "--model",
                    str(src),
                    "--out",
                    str(root / "packed"),
                    "--max-shard-size",
                    "1GB",
                ],
                root / "packed",
            ),
        },
        rounds=args.rounds,
        cwd=Path(__file__).resolve().parents[1],
    )
    base = res["cp -r + sync"]["median_s"]
    print(
        f"checkpoint: {gb(size)} in {len(Checkpoint(src).shards)} shards ({gb(dir_bytes(src))} on disk), "
        f"{args.rounds} alternating rounds after a warm-up"
    )
    print(f"{'case':32s} {'median s':>9s} {'/ cp':>7s} {'peak RSS':>10s} {'RSS / ckpt':>11s}")
    for name, r in res.items():
        print(
            f"{name:32s} {r['median_s']:9.2f} {r['median_s'] / base:7.2f} {gb(r['peak_rss']):>10s} "
            f"{r['peak_rss'] / size:11.3f}"
        )
    (root / "result.json").write_text(json.dumps({"bytes": size, "cases": res}, indent=2))
    for d in ("cp", "mirror", "packed"):
        shutil.rmtree(root / d, ignore_errors=True)


if __name__ == "__main__":
    main()

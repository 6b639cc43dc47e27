"""LightEval 0.13 (transformers backend, Python API, offline-safe) on one checkpoint, our MMLU-Pro prompts.

Usage: `python benchmark_eval/lighteval/run.py --model DIR --modes loglik,cot --out eval_results/gpu/mistral_base`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers.eval import Plan, evaluate_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint dir or hub id")
    ap.add_argument("--modes", default="loglik", help="comma-separated: loglik, cot")
    ap.add_argument("--data", default=None, help="local dir in the hub layout (default: TIGER-Lab/MMLU-Pro)")
    ap.add_argument("--limit", type=int, default=None, help="questions in total (round-robin over categories)")
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="questions per batch")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    ap.add_argument("--variant", default=None)
    ap.add_argument(
        "--out", required=True, help="eval_results/<preset>/<variant>/ (lighteval's own output in lighteval/)"
    )
    a = ap.parse_args(argv)
    plan = Plan(
        modes=(),
        lighteval_modes=tuple(a.modes.split(",")),
        lighteval_limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
    )
    print(evaluate_dir(a.model, a.out, plan, data=a.data, variant=a.variant, dtype=a.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""MMLU-Pro on one checkpoint, several scorings in one go; results merged into <out>/results.json.

Usage: `python benchmark_eval/mmlu_pro/run.py --model DIR --modes cot,loglik,cloze --out eval_results/gpu/mistral_base`
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
    ap.add_argument("--modes", default="cot,loglik,cloze", help="comma-separated: cot, loglik, cloze")
    ap.add_argument("--data", default=None, help="local dir in the hub layout (default: TIGER-Lab/MMLU-Pro)")
    ap.add_argument("--limit", type=int, default=None, help="questions for loglik/cloze (round-robin over categories)")
    ap.add_argument("--cot-limit", type=int, default=None, help="questions for cot")
    ap.add_argument("--cot-shots", type=int, default=5)
    ap.add_argument("--loglik-shots", type=int, default=0)
    ap.add_argument("--max-model-length", type=int, default=4096, help="CoT context (official: 4096)")
    ap.add_argument("--max-new-tokens", type=int, default=2048, help="official: 2048")
    ap.add_argument("--cot-text", action="store_true", help="also the toy diagnostic mmlu_pro_cot_text (not official)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 | 4bit (default: by device)")
    ap.add_argument("--variant", default=None)
    ap.add_argument("--out", required=True, help="eval_results/<preset>/<variant>/")
    a = ap.parse_args(argv)
    plan = Plan(
        modes=tuple(a.modes.split(",")),
        limit=a.limit,
        cot_limit=a.cot_limit,
        cot_shots=a.cot_shots,
        loglik_shots=a.loglik_shots,
        max_new_tokens=a.max_new_tokens,
        max_model_length=a.max_model_length,
        cot_text=a.cot_text,
        batch_size=a.batch_size,
    )
    print(evaluate_dir(a.model, a.out, plan, data=a.data, variant=a.variant, dtype=a.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

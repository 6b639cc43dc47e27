"""Questions/s of our MMLU-Pro loglik mode / LightEval's, same model, same questions, one run (target >= 1.0).

Both score the same prompt (`{question}\nA. ..\nAnswer:`, continuations " A".." J") on the same
in-memory model; LightEval runs one (context + option) row per option, ours one context per question.
Model: --model DIR (e.g. runs/toy/world/mistral), else a random Mistral of reduced width built here.

Usage: `PYTHONPATH=. python bench/eval.py [--model DIR] [--questions 60] [--batch-size 8]`
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from helpers.core.models import load_model  # noqa: E402
from helpers.eval import lighteval_run, mmlu_pro  # noqa: E402
from helpers.toy import synth  # noqa: E402

FILLER = [
    "consider",
    "the",
    "following",
    "carefully",
    "and",
    "pick",
    "the",
    "single",
    "best",
    "option",
    "from",
    "the",
    "list",
    "below",
]
CATEGORIES = ("math", "physics", "law", "history")


def bench_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """MMLU-Pro-shaped rows (`mmlu_pro.synthetic_rows`): 10 options, questions lengthened to ~40 words
    (real ones are longer still); at least n test questions."""
    test, val = mmlu_pro.synthetic_rows(
        -(-n // len(CATEGORIES)), categories=CATEGORIES, n_options=(10, 10), pad_prob=0.0, seed=seed
    )
    rnd = random.Random(seed)
    for r in test + val:
        r["question"] = " ".join(rnd.choices(FILLER, k=30)) + " : " + r["question"]
    return test, val


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a random reduced-width Mistral)")
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8, help="questions per batch (both sides)")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        model_dir = (
            Path(args.model)
            if args.model
            else synth.save_random(
                synth.tiny_config(
                    "mistral", hidden_size=128, intermediate_size=384, num_hidden_layers=8, max_position_embeddings=1024
                ),
                tmp / "model",
                n_shards=2,
                seed=0,
            )
        )
        model, tok = load_model(model_dir, "float32", "cpu")
        test, val = bench_rows(args.questions)
        data = mmlu_pro.write_dataset(tmp / "mmlu_pro", test, val)
        qs, shots = mmlu_pro.load(data, limit=args.questions)
        mmlu_pro.score_loglik(model, tok, qs[:2], progress=False)  # warm-up
        t = time.perf_counter()
        ours = mmlu_pro.score_loglik(model, tok, qs, batch_size=args.batch_size, progress=False)
        t_ours = time.perf_counter() - t
        # LightEval's batch is batch_size questions x 10 option rows; ours of equal rows holds 10x the questions
        t = time.perf_counter()
        wide = mmlu_pro.score_loglik(model, tok, qs, batch_size=args.batch_size * 10, progress=False)
        t_wide = time.perf_counter() - t
        (theirs,) = lighteval_run.run_lighteval(
            model,
            qs,
            shots,
            tmp / "le",
            modes=("loglik",),
            tokenizer=model_dir,
            batch_size=args.batch_size,
            name="bench",
        )
        t_theirs = theirs.seconds
    n = len(qs)
    same = sum(a == b for a, b in zip(ours.preds, theirs.preds))
    print(
        f"model: {model_dir if args.model else 'random Mistral, 8 layers, width 128'} "
        f"({sum(p.numel() for p in model.parameters()):,} params), {n} questions x 10 options, "
        f"{torch.get_num_threads()} threads, device cpu"
    )
    b = args.batch_size
    print(
        f"ours      loglik, {b:3d} questions/forward ({b:3d} rows): {t_ours:7.2f} s  {n / t_ours:7.2f} questions/s  "
        f"acc {ours.summary()['acc']:.4f}"
    )
    print(
        f"ours      loglik, {10 * b:3d} questions/forward ({10 * b:3d} rows): {t_wide:7.2f} s  {n / t_wide:7.2f} "
        f"questions/s  acc {wide.summary()['acc']:.4f}"
    )
    print(
        f"lighteval loglik, {b:3d} questions/forward ({10 * b:3d} rows): {t_theirs:7.2f} s  {n / t_theirs:7.2f} "
        f"questions/s  acc {theirs.summary()['acc']:.4f}"
    )
    print(
        f"same prediction on {same}/{n} questions (ours vs lighteval); wide batch agrees on "
        f"{sum(a == c for a, c in zip(ours.preds, wide.preds))}/{n}"
    )
    print(f"ratio ours/lighteval questions/s, same questions per batch: {t_theirs / t_ours:.2f}  (target >= 1.0)")
    print(f"ratio ours/lighteval questions/s, same rows per forward:    {t_theirs / t_wide:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

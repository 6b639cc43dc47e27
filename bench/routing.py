"""Routed throughput end to end (routing pass included) beside FULL, A and the ideal, at a 50/30/20 mix.

Two sets of stages, each a real layer drop loaded with `bundles.load_stages` (A, AB, FULL share the
layers before the block): the toy world's (notebook 04's A + bundles, if present, on toy MMLU-Pro
prompts) and a random reduced-width 32-layer Mistral shape cut to 24 layers in A (the 8 layers
before the last: bundles B and C of 4) on random prompts. Thresholds are set at entropy quantiles
of the prompt set itself so it splits 50/30/20 over A/AB/FULL. `helpers.layers.speed.measure_routed` times
FULL, A, the ideal (each prompt on its chosen stage, the choice free) and routed (the cascade),
interleaved. The last line reads "routed/FULL throughput = X (ideal Y)" for the 32 -> 24 shape.

Usage: `PYTHONPATH=. python bench/routing.py [--hidden 256] [--prompts 10] [--new-tokens 16] [--reps 3] [--threads 1]`
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from helpers.core.checkpoint import Checkpoint
from helpers.core.models import default_device
from helpers.layers import bundles, cascade, drop, routing, speed
from helpers.toy import synth

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "runs/toy/04_layer_drop_mistral"
MIX = (0.5, 0.3, 0.2)


def report(name: str, stages: dict, batches, args) -> dict:
    p = cascade.shared_prefix(stages["A"], [stages["AB"], stages["FULL"]])
    logits = [cascade.prefill(stages["A"], ids, mask, p).logits for ids, mask in batches]
    h = routing.entropy_of_logits(torch.cat(logits)).cpu().numpy()
    th = routing.calibrate_mix(h, MIX, fingerprint="bench")
    m = speed.measure_routed(
        stages, batches, speed.chooser(th), new_tokens=args.new_tokens, reps=args.reps, progress=False
    )
    print(
        f"[{name}] layers {m['layers']}, shared prefix {m['shared_prefix']}; {speed.describe_routed(m)}; {m['device']}"
    )
    for v in speed.VARIANTS:
        print(f"  {v:>6}: {m['tok_s'][v]:8.1f} tok/s   reps {m['seconds_all_reps'][v]} s")
    print(
        f"  routed/ideal = {m['routed_over_ideal']:.3f}   routed/FULL = {m['routed_over_full']:.3f}"
        f"   ideal/FULL = {m['ideal_over_full']:.3f}   A/FULL = {m['tok_s']['A'] / m['tok_s']['FULL']:.3f}"
    )
    return m


def toy(args) -> None:
    if not (TOY / "A").is_dir():
        print(f"[toy] skipped: no {TOY.relative_to(REPO)}/A (run `python -m helpers run --preset toy --only 04`)")
        return
    from transformers import AutoTokenizer

    from helpers.eval import mmlu_pro

    stages = bundles.load_stages(TOY / "A", TOY / "bundles", dtype=torch.float32, device=default_device())
    tok = AutoTokenizer.from_pretrained(TOY / "A")
    tok.pad_token = tok.pad_token or tok.eos_token
    questions, _ = mmlu_pro.load(REPO / "runs/toy/world/mmlu_pro")
    prompts = [mmlu_pro.cloze_context(q) for q in mmlu_pro.take(questions, args.prompts)]
    report("toy", stages, speed.batches_of(tok, prompts, args.batch_size), args)


def mistral_shape(args, root: Path) -> dict:
    L, keep = 32, 24
    cfg = synth.tiny_config(
        "mistral",
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 3.5),
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        num_hidden_layers=L,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    src = synth.save_random(cfg, root / "base", n_shards=2, seed=0, tokenizer=False)
    n = L - keep
    plan = drop.plan_layer_drop(Checkpoint(src).config, None, layers=f"{L - 1 - n}-{L - 2}")
    a_dir, b_dir = drop.apply_layer_drop(src, plan, root / "A", root / "bundles")
    stages = bundles.load_stages(a_dir, b_dir, dtype=torch.float32, device=default_device())
    g = torch.Generator().manual_seed(0)
    lens = np.random.default_rng(0).integers(args.prompt_tokens // 2, args.prompt_tokens + 1, args.prompts)
    ids = [torch.randint(3, args.vocab, (1, int(k)), generator=g) for k in lens]
    batches = [(x, torch.ones_like(x)) for x in ids]  # one prompt per batch (random ids: no padding to build)
    return report(f"mistral {L}->{keep}, hidden {args.hidden}", stages, batches, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=64, help="random prompts: lengths in [n/2, n]")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=1, help="toy prompts per batch (mixed stages are grouped)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    ap.add_argument("--skip-toy", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    if not args.skip_toy:
        toy(args)
    with tempfile.TemporaryDirectory() as d:
        m = mistral_shape(args, Path(d))
    print(f"routed/FULL throughput = {m['routed_over_full']:.3f} (ideal {m['ideal_over_full']:.3f})")


if __name__ == "__main__":
    main()

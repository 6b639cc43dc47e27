"""Routing overhead: the entropy pass on stage A against greedy generation on each stage, side by side.

Prints, for a random Mistral-shaped model (reduced width) and stand-in stages A (25% of layers
dropped) / AB / FULL: the entropy pass in ms, decode tokens/s per stage, the overhead ratio
(entropy pass / FULL generation) and the end-to-end speed-up of a prompt routed to A
(FULL generation / (entropy pass + A generation)). Timings interleave the variants, repeat, and
report medians.

Usage: `PYTHONPATH=. python bench/routing.py [--hidden 512] [--layers 16] [--new-tokens 32] [--reps 5]`
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from helpers.core.models import default_device, default_dtype
from helpers.layers import routing
from helpers.layers.drop import keep_layers_copy
from helpers.toy import synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dev = default_device()
    dtype = getattr(torch, default_dtype(dev))
    L = args.layers
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
    full = synth.random_model(cfg, seed=0).to(dev, dtype)
    n_drop = round(0.25 * L)
    block = list(range(L - 1 - n_drop, L - 1))  # the n layers before the last
    half = block[: len(block) // 2]
    stages = {
        "A": keep_layers_copy(full, [i for i in range(L) if i not in block]),
        "AB": keep_layers_copy(full, [i for i in range(L) if i not in block or i in half]),
        "FULL": full,
    }
    tok = synth.tiny_tokenizer()
    th = routing.Thresholds(0.0, 0.0, "manual", None, 0, "bench")
    router = routing.Router(stages, tok, th)
    ids = torch.randint(4, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    mask = torch.ones_like(ids)

    def t_entropy() -> float:
        routing._sync(torch.device(dev))
        t = time.perf_counter()
        routing.last_token_entropy(stages["A"], ids, mask)
        routing._sync(torch.device(dev))
        return time.perf_counter() - t

    def t_generate(st: str) -> float:
        routing._sync(torch.device(dev))
        t = time.perf_counter()
        out = stages[st].generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )
        routing._sync(torch.device(dev))
        assert out.shape[1] - ids.shape[1] == args.new_tokens
        return time.perf_counter() - t

    t_entropy(), [t_generate(st) for st in routing.STAGES]  # warm-up
    times = {k: [] for k in ("entropy", *routing.STAGES)}
    for _ in range(args.reps):  # interleaved, so drift in machine load hits every variant alike
        times["entropy"].append(t_entropy())
        for st in routing.STAGES:
            times[st].append(t_generate(st))
    med = {k: statistics.median(v) for k, v in times.items()}
    layers = {st: routing.n_layers(m) for st, m in stages.items()}
    name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; Mistral-shaped hidden {args.hidden}, vocab {args.vocab}, layers {layers}, {dtype}")
    print(
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.reps};"
        f" router {router.thresholds.method}"
    )
    print(f"entropy pass on A: {med['entropy'] * 1e3:.1f} ms")
    for st in routing.STAGES:
        print(f"generate {st:>4} ({layers[st]:2d} layers): {args.new_tokens / med[st]:8.1f} tok/s")
    print(f"overhead: entropy pass / FULL generation = {med['entropy'] / med['FULL']:.3f}")
    print(
        f"A / FULL decode speed = {med['FULL'] / med['A']:.3f} (layer ratio L/L_A = {layers['FULL'] / layers['A']:.3f})"
    )
    print(f"routed to A, end to end: FULL time / (entropy + A time) = {med['FULL'] / (med['entropy'] + med['A']):.3f}")
    print(
        "routed to FULL, end to end: (entropy + FULL time) / FULL time = "
        f"{(med['entropy'] + med['FULL']) / med['FULL']:.3f}"
    )


if __name__ == "__main__":
    main()

"""Routed throughput measured end to end: the cascade (routing pass included) beside FULL, A and the ideal.

On one prompt set, timed side by side (variants interleaved per batch, order rotated, each rep
summed, median over reps): FULL and A generate every prompt alone; `ideal` generates each prompt
on the stage the router picks, the choice taken as free (no routing pass, no reuse needed);
`routed` is `cascade.cascade` (stage A's prefill routes and is reused). Every variant decodes
exactly `new_tokens` per prompt (end-of-sequence ignored while timing) through the same decode loop,
so tokens/s compare like for like. Used by bench/routing.py, notebook 05 and the routed variant of 06.

Usage: `m = measure_routed(stages, batches_of(tok, prompts, 1), chooser(th), new_tokens=32); m["routed_over_full"]`
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from helpers.core.models import model_device
from helpers.layers import cascade
from helpers.layers.routing import STAGES, Thresholds, entropy_of_logits, stage_mix

VARIANTS = ("FULL", "A", "ideal", "routed")


def chooser(th: Thresholds) -> Callable[[torch.Tensor], Sequence[str]]:
    """A's last-token logits -> stage per row, by entropy and `th`."""
    return lambda logits: [str(s) for s in th.stages(entropy_of_logits(logits).cpu().numpy())]


def batches_of(tokenizer, prompts: Sequence[str], batch_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prompts as left-padded (input_ids, attention_mask) batches, in order."""
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = cascade.encode_left(tokenizer, prompts[s : s + batch_size])
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


@contextlib.contextmanager
def _no_eos(stages: dict):
    """Every stage decodes the full token budget while timed (same tokens for every variant)."""
    saved = {s: m.generation_config.eos_token_id for s, m in stages.items()}
    try:
        for m in stages.values():
            m.generation_config.eos_token_id = None
        yield
    finally:
        for s, m in stages.items():
            m.generation_config.eos_token_id = saved[s]


def _ideal(stages, ids, mask, picks, n):
    for st in dict.fromkeys(picks):
        rows = torch.tensor([i for i, p in enumerate(picks) if p == st])
        cascade.plain(stages[st], ids[rows], mask[rows], max_new_tokens=n)


@torch.no_grad()
def measure_routed(
    stages: dict, batches, choose, *, new_tokens: int = 32, reps: int = 3, progress: bool = True
) -> dict:
    """Seconds, tokens/s and ratios of FULL, A, ideal and routed over `batches` (see module doc)."""
    dev = model_device(stages["A"])
    p = cascade.shared_prefix(stages["A"], [m for s, m in stages.items() if s != "A"])
    picks = []
    for ids, mask in batches:  # the router's choices, untimed, for the ideal
        picks.append([str(c) for c in choose(cascade.prefill(stages["A"], ids, mask, p).logits)])
    run = {
        "FULL": lambda b, i: cascade.plain(stages["FULL"], *b, max_new_tokens=new_tokens),
        "A": lambda b, i: cascade.plain(stages["A"], *b, max_new_tokens=new_tokens),
        "ideal": lambda b, i: _ideal(stages, *b, picks[i], new_tokens),
        "routed": lambda b, i: cascade.cascade(stages, *b, choose, max_new_tokens=new_tokens),
    }
    totals = {v: [] for v in VARIANTS}
    with _no_eos(stages):
        for v in VARIANTS:  # warm-up
            run[v](batches[0], 0)
        for r in tqdm(range(reps), desc="routed speed", leave=False, disable=not progress):
            acc = dict.fromkeys(VARIANTS, 0.0)
            for i, b in enumerate(batches):
                k = (i + r) % len(VARIANTS)
                for v in VARIANTS[k:] + VARIANTS[:k]:  # rotated: drift in load hits every variant alike
                    cascade.sync(dev)
                    t = time.perf_counter()
                    run[v](b, i)
                    cascade.sync(dev)
                    acc[v] += time.perf_counter() - t
            for v in VARIANTS:
                totals[v].append(acc[v])
    n_prompts = sum(len(ids) for ids, _ in batches)
    tokens = n_prompts * new_tokens
    sec = {v: statistics.median(totals[v]) for v in VARIANTS}
    tok_s = {v: tokens / sec[v] for v in VARIANTS}
    flat = np.array([s for row in picks for s in row])
    return {
        "measured": "end to end, routing pass included",
        "prompts": n_prompts,
        "prompt_tokens": int(sum(int(m.sum()) for _, m in batches)),
        "new_tokens_per_prompt": new_tokens,
        "batches": len(batches),
        "reps": reps,
        "mix": stage_mix(flat),
        "layers": {s: len(m.base_model.layers) for s, m in stages.items()},
        "shared_prefix": p,
        "seconds": {v: round(sec[v], 4) for v in VARIANTS},
        "seconds_all_reps": {v: [round(t, 4) for t in totals[v]] for v in VARIANTS},
        "tok_s": {v: round(tok_s[v], 2) for v in VARIANTS},
        "routed_over_full": round(tok_s["routed"] / tok_s["FULL"], 4),
        "ideal_over_full": round(tok_s["ideal"] / tok_s["FULL"], 4),
        "routed_over_ideal": round(tok_s["routed"] / tok_s["ideal"], 4),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
    }


def describe_routed(m: dict) -> str:
    """One line: what was measured, on how many prompts and tokens."""
    mix = "/".join(f"{100 * m['mix'][s]:.0f}" for s in STAGES)
    return (
        f"measured {m['measured']}: {m['prompts']} prompts ({m['prompt_tokens']} prompt tokens), "
        f"{m['new_tokens_per_prompt']} new tokens each, mix A/AB/FULL {mix}%, median of {m['reps']}; "
        f"routed {m['tok_s']['routed']:.1f} tok/s, FULL {m['tok_s']['FULL']:.1f}, ideal {m['tok_s']['ideal']:.1f}"
    )

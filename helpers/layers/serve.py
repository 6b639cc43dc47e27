"""Serving routed prompts: Router (stage A's entropy picks A, AB or FULL; generation through the cascade), the REPL.

A batch goes through `cascade.cascade`: stage A's prefill is the routing pass and is kept; a prompt
sent to A decodes from A's cache, one sent to AB or FULL reuses A's cache and hidden state for the
layers the stages share and prefills only the rest. Per prompt: the stage, the entropy, tokens/s
end to end, and (REPL, `route` command) the time saved against running FULL alone, measured.

Usage: `Router(stages, tok, Thresholds.load(path)).generate("2 + 3 =", compare_full=True).header()`
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.core.models import model_device
from helpers.core.verify import fingerprint
from helpers.layers import cascade
from helpers.layers.distance import ensure_pad
from helpers.layers.routing import (
    STAGES,
    THRESHOLDS_FILE,
    Thresholds,
    entropy_of_logits,
    last_token_entropy,
    prompt_entropy,
)


# ---- router ---------------------------------------------------------------------------------
@dataclass
class Routed:
    """One routed generation; `seconds` is end to end (routing pass on A included, A's prefill reused)."""

    prompt: str
    stage: str
    entropy: float
    text: str
    new_tokens: int
    seconds: float
    route_seconds: float = 0.0  # stage A's prefill over the prompt, which chose the stage (shared by the batch)
    full_seconds: float = math.nan  # the same prompt on FULL alone (prefill + decode), measured when asked

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def saved_seconds(self) -> float:
        return self.full_seconds - self.seconds

    def row(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "saved_seconds": self.saved_seconds}

    def header(self) -> str:
        saved = "" if math.isnan(self.full_seconds) else f" | saved vs FULL {self.saved_seconds * 1e3:+.0f} ms"
        return (
            f"stage {self.stage} | entropy {self.entropy:.4f} nats | {self.new_tokens} tokens | "
            f"{self.tokens_per_s:.1f} tok/s | routed in {self.route_seconds * 1e3:.0f} ms{saved}"
        )


class Router:
    """Routes each prompt to A, AB or FULL by stage A's next-token entropy, then generates greedily from
    A's prefill (`cascade`: A's cache is kept; AB / FULL prefill only the layers A does not share)."""

    def __init__(self, stages: dict, tokenizer, thresholds: Thresholds, *, fingerprint: str | None = None):
        missing = [st for st in STAGES if st not in stages]
        if missing:
            raise KeyError(f"Router needs stages {list(STAGES)}; missing {missing}")
        self.stages, self.tokenizer, self.thresholds = stages, ensure_pad(tokenizer), thresholds
        if fingerprint is not None:
            thresholds.check(fingerprint)

    @classmethod
    def from_dirs(cls, a_dir, bundles_dir, thresholds=None) -> Router:
        """Stage A checkpoint + bundles dir (bundles layout); thresholds default to BUNDLES/thresholds.json."""
        path = Path(thresholds) if thresholds else Path(bundles_dir) / THRESHOLDS_FILE
        th = Thresholds.load(path, fingerprint=fingerprint(a_dir))  # before loading weights: fail fast
        from transformers import AutoTokenizer

        from helpers.core.models import default_device, default_dtype
        from helpers.layers import bundles

        device = default_device()
        stages = bundles.load_stages(a_dir, bundles_dir, dtype=getattr(torch, default_dtype(device)), device=device)
        return cls(stages, AutoTokenizer.from_pretrained(a_dir), th)

    def choose(self, prompt: str) -> tuple[str, float]:
        enc = self.tokenizer([prompt], return_tensors="pt")
        h = float(last_token_entropy(self.stages["A"], enc["input_ids"], enc["attention_mask"])[0])
        return self.thresholds.stage(h), h

    def route(self, prompts: Sequence[str], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(stages, entropies) for many prompts at once, without generating."""
        h = prompt_entropy(self.stages["A"], self.tokenizer, prompts, batch_size=batch_size)
        return self.thresholds.stages(h), h

    def generate_batch(self, prompts: Sequence[str], n_new: int = 32, compare_full: bool = False):
        """Route and answer a batch through the cascade (one A prefill, rows grouped by stage); list of Routed.

        `compare_full`: also time the batch on FULL alone (same decode loop) for the time saved against it.
        """
        enc = cascade.encode_left(self.tokenizer, prompts)
        dev = model_device(self.stages["A"])
        choose = lambda logits: self.thresholds.stages(entropy_of_logits(logits).cpu().numpy())  # noqa: E731
        cascade.sync(dev)
        t0 = time.perf_counter()
        out = cascade.cascade(self.stages, enc["input_ids"], enc["attention_mask"], choose, max_new_tokens=n_new)
        cascade.sync(dev)
        dt, t_full = time.perf_counter() - t0, math.nan
        if compare_full:
            t = time.perf_counter()
            cascade.plain(self.stages["FULL"], enc["input_ids"], enc["attention_mask"], max_new_tokens=n_new)
            cascade.sync(dev)
            t_full = time.perf_counter() - t
        h = entropy_of_logits(out.logits).cpu().numpy()
        return [
            Routed(
                p,
                st,
                float(e),
                self.tokenizer.decode(t, skip_special_tokens=True),
                len(t),
                dt,
                out.route_seconds,
                t_full,
            )
            for p, st, e, t in zip(prompts, out.stages, h, out.tokens)
        ]

    def generate(self, prompt: str, max_new_tokens: int = 32, compare_full: bool = False) -> Routed:
        return self.generate_batch([prompt], max_new_tokens, compare_full)[0]

    def table(self, prompts: Sequence[str], max_new_tokens: int = 32) -> pd.DataFrame:
        """Route and answer each prompt: one row per prompt (stage, entropy, text, tokens/s, time saved vs FULL)."""
        rows = [self.generate(p, max_new_tokens, True).row() for p in tqdm(prompts, desc="route", leave=False)]
        return pd.DataFrame(rows)


def repl(router: Router, lines: Iterable[str], out: TextIO | None = None, max_new_tokens: int = 32) -> int:
    """Route and answer each line until EOF or ':q'; prints stage, entropy, tokens/s and the time saved against
    FULL (the prompt also run on FULL alone). Returns prompts served."""
    out = out or sys.stdout
    served = 0
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == ":q":
            break
        if text.strip():
            r = router.generate(text, max_new_tokens, compare_full=True)
            print(r.header(), file=out)
            print(f"  {r.text}", file=out, flush=True)
            served += 1
    return served


def cli_route(args) -> int:
    router = Router.from_dirs(args.base_model, args.bundles_dir, args.thresholds)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        repl(router, [args.prompt], max_new_tokens=args.max_new_tokens)
        return 0
    if sys.stdin.isatty():
        print("one prompt per line; ':q' or Ctrl-D quits", file=sys.stderr)
    repl(router, sys.stdin, max_new_tokens=args.max_new_tokens)
    return 0

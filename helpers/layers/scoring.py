"""Scoring stage models (notebook 05): mean NLL, logits against a reference, a loss + cloze report.

MMLU-Pro questions, prompts and cloze correctness come from helpers.eval.mmlu_pro (`load`,
`cloze_context`, `cloze_correct`): one implementation for every notebook.

Usage: `scoring.model_report({"A": a, "FULL": full}, tok, texts, mmlu_pro.load("runs/toy/world/mmlu_pro", 200)[0])`
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.core.models import model_device
from helpers.eval import mmlu_pro
from helpers.layers.distance import ensure_pad, positions
from helpers.layers.routing import STAGES, n_layers


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits with positions counted over real tokens (any padding side)."""
    dev = model_device(model)
    ids, mask = ids.to(dev), mask.to(dev)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits


@torch.no_grad()
def mean_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> float:
    """Token-weighted mean next-token NLL (nats) of `texts`: the healing loss before/after."""
    ensure_pad(tokenizer)
    total, count = 0.0, 0
    for s in tqdm(range(0, len(texts), batch_size), desc="loss", leave=False):
        enc = tokenizer(
            list(texts[s : s + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        logits = forward_logits(model, enc["input_ids"], enc["attention_mask"])[:, :-1].float()  # [B, T-1, V]
        tgt = enc["input_ids"][:, 1:].to(logits.device)
        m = enc["attention_mask"][:, 1:].to(logits.device) * enc["attention_mask"][:, :-1].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")  # [B, T-1]
        total += float((nll * m).sum())
        count += int(m.sum())
    return total / max(count, 1)


@torch.no_grad()
def stage_table(stages: dict, tokenizer, texts: Sequence[str], base=None) -> pd.DataFrame:
    """Per stage: layers, and the max |logit difference| from `base` over the real tokens of `texts`."""
    ensure_pad(tokenizer)
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    ref = forward_logits(base, enc["input_ids"], enc["attention_mask"]).float() if base is not None else None
    real = enc["attention_mask"].bool()
    rows = []
    for st in STAGES:
        row = {"stage": st, "layers": n_layers(stages[st])}
        if ref is not None:
            lg = forward_logits(stages[st], enc["input_ids"], enc["attention_mask"]).float()
            row["max_abs_logit_diff_vs_base"] = float((lg - ref.to(lg.device)).abs()[real.to(lg.device)].max())
        rows.append(row)
    return pd.DataFrame(rows)


def model_report(
    models: dict,
    tokenizer,
    texts: Sequence[str],
    questions: Sequence[mmlu_pro.Question],
    *,
    batch_size: int = 16,
    dtype=torch.float32,
    device=None,
    cloze: dict | None = None,
) -> pd.DataFrame:
    """Per named model (in memory, or a checkpoint dir loaded one at a time): held-out loss and cloze accuracy.

    `cloze` {name: per-question correctness on `questions`} reuses flags already scored (e.g. the
    stages' in notebook 05) instead of scoring those models again.
    """
    from helpers.core.models import load_check

    cloze = cloze or {}
    rows = []
    for name, m in models.items():
        model = (
            load_check(m, dtype=dtype, **({"device_map": str(device)} if device else {})).eval()
            if isinstance(m, (str, Path))
            else m
        )
        correct = cloze[name] if name in cloze else mmlu_pro.cloze_correct(model, tokenizer, questions, batch_size)
        rows.append(
            {"model": name, "loss": mean_nll(model, tokenizer, texts, batch_size), "cloze_acc": float(np.mean(correct))}
        )
        del model  # a loaded checkpoint is freed before the next one loads
    return pd.DataFrame(rows)

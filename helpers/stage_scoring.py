"""Scoring stage models (notebook 05): per-question cloze correctness, mean NLL, logits against a reference.

The cloze scorer is a STAND-IN until helpers.eval (MMLU-Pro cloze mode) is merged. It uses the
same format (context `Question: {question}\\nAnswer:`, continuation ` {option}`, summed
log-likelihood of the option's tokens, the first maximum wins) so swapping it for the shared one
should change no verdict.

Usage: `qs = read_questions("runs/toy/world/mmlu_pro", n=200); ok = cloze_correct(model, tok, qs)`
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from helpers.routing import STAGES, ensure_pad, n_layers

CLOZE_CONTEXT = "Question: {question}\nAnswer:"


def read_questions(source, n: int | None = None, split: str = "test", seed: int = 0) -> list[dict]:
    """MMLU-Pro rows (dicts, "N/A" options dropped) from a dir in the hub layout or a hub id; `n` sampled with `seed`."""
    p = Path(str(source))
    if p.exists():
        files = sorted((p / "data").glob(f"{split}-*.parquet"))
        if not files:
            raise FileNotFoundError(f"{p}: no data/{split}-*.parquet (expected the TIGER-Lab/MMLU-Pro layout)")
        rows = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).to_dict("records")
    else:
        from datasets import load_dataset

        rows = list(load_dataset(str(source), split=split))
    if n is not None and n < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
        rows = [rows[i] for i in keep]
    out = []
    for r in rows:
        opts = [str(o) for o in r["options"] if str(o) != "N/A"]
        if not 0 <= int(r["answer_index"]) < len(opts):
            raise ValueError(f"{source}: question {r['question_id']} answer_index {r['answer_index']} out of its options")
        out.append(dict(question_id=r["question_id"], question=str(r["question"]), options=opts,
                        answer_index=int(r["answer_index"]), category=str(r["category"])))
    return out


def cloze_prompt(q: dict) -> str:
    """The text before the answer: what cloze scoring conditions on and what the router reads."""
    return CLOZE_CONTEXT.format(question=q["question"])


def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits with positions counted over real tokens (any padding side)."""
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def option_logliks(model, tokenizer, questions: Sequence[dict], batch_size: int = 16) -> list[list[float]]:
    """Per question, the summed log-likelihood of each option's tokens after its cloze prompt."""
    ensure_pad(tokenizer)
    items = []  # (question, option, token ids, continuation length)
    for qi, q in enumerate(questions):
        ctx = tokenizer(cloze_prompt(q))["input_ids"]
        for oi, opt in enumerate(q["options"]):
            cont = tokenizer(f" {opt}", add_special_tokens=False)["input_ids"]
            items.append((qi, oi, ctx + cont, len(cont)))
    items.sort(key=lambda it: -len(it[2]))  # similar lengths share a batch
    out = [[0.0] * len(q["options"]) for q in questions]
    for s in tqdm(range(0, len(items), batch_size), desc="cloze", leave=False):
        batch = items[s:s + batch_size]
        ids, mask = _pad([it[2] for it in batch], tokenizer.pad_token_id)
        logp = torch.log_softmax(forward_logits(model, ids, mask)[:, :-1].float(), -1)  # [B, T-1, V]
        tok_lp = logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0].cpu()  # [B, T-1]
        for row, (qi, oi, seq, n) in enumerate(batch):
            out[qi][oi] = float(tok_lp[row, len(seq) - 1 - n: len(seq) - 1].sum())
    return out


def cloze_correct(model, tokenizer, questions: Sequence[dict], batch_size: int = 16) -> np.ndarray:
    """[N] bool: the option with the highest log-likelihood is the answer (first maximum on ties)."""
    lls = option_logliks(model, tokenizer, questions, batch_size)
    return np.array([int(np.argmax(ll)) == q["answer_index"] for ll, q in zip(lls, questions)], dtype=bool)


@torch.no_grad()
def mean_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int = 256) -> float:
    """Token-weighted mean next-token NLL (nats) of `texts`: the healing loss before/after."""
    ensure_pad(tokenizer)
    total, count = 0.0, 0
    for s in tqdm(range(0, len(texts), batch_size), desc="loss", leave=False):
        enc = tokenizer(list(texts[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
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


def model_report(models: dict, tokenizer, texts: Sequence[str], questions: Sequence[dict], *, batch_size: int = 16,
                 dtype=torch.float32, device=None) -> pd.DataFrame:
    """Per named model (in memory, or a checkpoint dir loaded one at a time): held-out loss and cloze accuracy."""
    from helpers.checkpoint import load_check

    rows = []
    for name, m in models.items():
        model = load_check(m, dtype=dtype, **({"device_map": str(device)} if device else {})).eval() \
            if isinstance(m, (str, Path)) else m
        rows.append({"model": name, "loss": mean_nll(model, tokenizer, texts, batch_size),
                     "cloze_acc": float(cloze_correct(model, tokenizer, questions, batch_size).mean())})
        del model  # a loaded checkpoint is freed before the next one loads
    return pd.DataFrame(rows)

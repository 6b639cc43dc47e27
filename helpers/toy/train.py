"""Training the toy world's models: configs, Mixtral upcycled from a dense twin, a plain-torch loop.

Usage: `pretrain(model, encode_pairs(tok, rows, 0.2, 0), steps=900, batch=32, lr=3e-3, seed=0, pad_id=tok.pad_token_id)`
"""

from __future__ import annotations

import math
import random
from itertools import groupby
from pathlib import Path

import torch
from tqdm.auto import tqdm

from helpers.core.compat import make_portable
from helpers.core.models import save_sharded
from helpers.eval import mmlu_pro
from helpers.toy import tasks

BASE_CONFIG = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def model_config(kind: str, spec: dict, vocab_size: int):
    from transformers import AutoConfig

    kw = dict(BASE_CONFIG, vocab_size=vocab_size, **spec[kind]["config"])
    if kind == "mixtral":
        kw["output_router_logits"] = False  # set per forward while training: the saved model behaves as the hub one
    return AutoConfig.for_model(kind, **kw)


def dense_twin(moe_config):
    """The Mistral config whose MLP a Mixtral of `moe_config` is upcycled from (same attention, RoPE, sizes)."""
    from transformers import AutoConfig

    skip = {
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
        "model_type",
        "architectures",
        "transformers_version",
    }
    kw = {k: v for k, v in moe_config.to_dict().items() if k not in skip}
    return AutoConfig.for_model("mistral", **kw)


@torch.no_grad()
def upcycle(dense, moe_config, noise: float, seed: int):
    """A Mixtral whose every expert starts as the dense model's MLP plus `noise` x (that tensor's std).

    Sparse upcycling (as Mixtral is believed to descend from Mistral): experts begin near-identical and
    drift apart by what the router sends them, so their distances and loads carry information.
    """
    from transformers import AutoModelForCausalLM

    moe = AutoModelForCausalLM.from_config(moe_config, dtype=torch.float32)
    src = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    for name, p in moe.state_dict().items():
        if name in src:
            p.copy_(src[name])
    for li, layer in enumerate(moe.model.layers):
        mlp = f"model.layers.{li}.mlp."
        gate_up = torch.cat([src[mlp + "gate_proj.weight"], src[mlp + "up_proj.weight"]])  # [2I, H], w1 rows first
        down = src[mlp + "down_proj.weight"]  # [H, I]
        ex = layer.mlp.experts
        for e in range(ex.gate_up_proj.shape[0]):
            ex.gate_up_proj[e] = gate_up + noise * gate_up.std() * torch.randn(gate_up.shape, generator=g)
            ex.down_proj[e] = down + noise * down.std() * torch.randn(down.shape, generator=g)
    return moe.eval()


def encode_pairs(tok, rows: list[dict], chat_fraction: float, seed: int) -> list[tuple[list[int], int]]:
    """(token ids, answer length) per row: plain cloze form, or (a seeded fraction) chat form.

    The answer is tokenized on its own (" " + text, then EOS), exactly as the cloze scorer does.
    """
    rng = random.Random(f"toy-chat-{seed}")
    chat = [rng.random() < chat_fraction for _ in rows]
    prompts = [tasks.chat_prompt(r["question"]) if c else tasks.cloze_prompt(r["question"]) for r, c in zip(rows, chat)]
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    a_ids = tok([" " + tasks.answer_text(r) for r in rows], add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    return [((p if c else [bos, *p]) + a + [eos], len(a) + 1) for p, a, c in zip(p_ids, a_ids, chat)]


def cot_document(r: dict, pool: list[dict], n_shots: int, rng: random.Random) -> str:
    """The official CoT prompt for row `r` with `n_shots` worked shots drawn from `pool` (same category),
    then the row's reasoning, " The answer is (X).", and the next "Question:" (the official stop string)."""
    q = mmlu_pro.to_question(r)
    shots = [mmlu_pro.to_question(s) for s in rng.sample(pool, min(n_shots, len(pool)))]
    prompt = mmlu_pro.cot_prompt(q, {q.category: shots}, len(shots))
    return prompt + q.cot_content.removeprefix(mmlu_pro.COT_LEAD) + "\n\n" + mmlu_pro.COT_STOP


def encode_cot(
    tok, rows: list[dict], n_docs: int, shot_weights: list[float], seed: int
) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, answer spans) of `n_docs` official-layout CoT documents built on distinct seeded rows,
    with 0..len(shot_weights)-1 shots (weights `shot_weights`).

    Every reasoning, the shots' included, is an answer span: from after "Answer: Let's think step by
    step." through the next "Question:", so the model learns the reasoning, the answer line and the stop.
    The document is tokenized whole, as the scorer tokenizes a prompt; spans come from character offsets.
    """
    rng = random.Random(f"toy-cot-{seed}")
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    lead, stop = mmlu_pro.COT_ASK, mmlu_pro.COT_STOP
    out = []
    for i in rng.sample(range(len(rows)), min(n_docs, len(rows))):
        r = rows[i]
        n = rng.choices(range(len(shot_weights)), weights=shot_weights)[0]
        text = cot_document(r, [x for x in by_cat[r["category"]] if x is not r], n, rng)
        chars = []  # [start, end) character spans of the reasonings
        at = text.find(lead)
        while at >= 0:
            start = at + len(lead)
            chars.append((start, text.index(stop, start) + len(stop)))
            at = text.find(lead, start)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [any(a <= c < b for a, b in chars) for c, _ in enc["offset_mapping"]]
        spans, t = [], 1  # token positions after BOS
        for flag, run in groupby(inside):
            n = len(list(run))
            if flag:
                spans.append((t, t + n))
            t += n
        out.append(([tok.bos_token_id, *enc["input_ids"]], spans))
    return out


def _batches(seqs: list, batch: int, steps: int, seed: int):
    """Random batches, length-bucketed within groups of 16 batches so padding stays small."""
    g = random.Random(f"toy-batches-{seed}")
    out: list[list[int]] = []
    while len(out) < steps:
        idx = [g.randrange(len(seqs)) for _ in range(16 * batch)]
        idx.sort(key=lambda i: len(seqs[i][0]))
        group = [idx[k : k + batch] for k in range(0, len(idx), batch)]
        g.shuffle(group)
        out += group
    return out[:steps]


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T]."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def weighted_lm_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, each target token weighted (0 on padding)."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    w = weights[:, 1:].flatten()
    return (ce * w).sum() / w.sum()


def pretrain(
    model,
    seqs: list[tuple[list[int], int | list[tuple[int, int]]]],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    pad_id: int,
    question_weight: float = 0.25,
    desc: str = "pretrain",
) -> list[float]:
    """Plain-torch causal LM training (AdamW, warmup + cosine); Mixtral adds its load-balancing loss.

    Question tokens count `question_weight` as much as answer tokens: the model still models the
    whole text (calibration statistics stay meaningful) but spends its few steps on the answers.
    """
    torch.manual_seed(seed)
    model.train()
    cfg = model.config
    is_moe = getattr(cfg, "num_local_experts", 0) > 1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    losses = []
    bar = tqdm(_batches(seqs, batch, steps, seed), desc=desc, leave=False)
    for idx in bar:
        chunk = [seqs[i] for i in idx]
        ids, mask = pad([s for s, _ in chunk], pad_id)
        w = mask.float() * question_weight
        for b, (s, ans) in enumerate(chunk):
            for lo, hi in [(len(s) - ans, len(s))] if isinstance(ans, int) else ans:
                w[b, lo:hi] = 1.0
        # right padding: real tokens never attend to later pads, so no mask is needed (faster path)
        out = model(input_ids=ids, **({"output_router_logits": True} if is_moe else {}))
        loss = weighted_lm_loss(out.logits, ids, w)
        if is_moe:
            loss = loss + cfg.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}")
    model.eval()
    return losses


def save_model(model, tok, out: Path, n_shards: int) -> Path:
    """Several shards, legacy expert keys, tokenizer files beside the weights."""
    save_sharded(model, out, n_shards)
    tok.save_pretrained(out)
    make_portable(out)
    return out

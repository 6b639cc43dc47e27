"""Prompt-level cascade without recomputation: stage A's prefill is kept and extended, never redone.

Stages A / AB / FULL (helpers.layers.bundles.load_stages) share the same module objects for every
layer before the dropped block, so on the same prompt their KV cache for those layers and the
hidden state entering the block are identical. `prefill` runs stage A once over a (left-padded)
batch, keeping its cache, the hidden state entering position `p` (the first layer A does not
share with the other stages) and the last-token logits (the router's entropy comes from them).
`extend` builds a stage's cache from that: a prompt routed to A takes A's cache rows as they are;
one routed to AB or FULL copies A's rows for the shared prefix and prefills only the stage's
remaining layers from the kept hidden state. `decode` then continues greedily from any such cache.
`cascade` does the whole batch: route, group rows by stage, extend, decode, results in input order.

Usage: `out = cascade(stages, ids, mask, lambda logits: ["A"] * len(logits), max_new_tokens=32)`
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from helpers.core.models import model_device


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def encode_left(tokenizer, prompts: Sequence[str]):
    """The prompts as one left-padded batch (the tokenizer's own padding side is left as it was)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


def shared_prefix(a_model, others: Sequence) -> int:
    """Number of leading decoder layers stage A shares (same module objects) with every other stage."""
    a_layers = list(a_model.base_model.layers)
    p = len(a_layers)
    for m in others:
        layers = list(m.base_model.layers)
        k = 0
        while k < min(p, len(layers)) and layers[k] is a_layers[k]:
            k += 1
        p = k
    return p


def _renumber(layers) -> None:
    """Point every shared attention module at its position in this stage (as sharing.renumber_hook does)."""
    for pos, layer in enumerate(layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = pos


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` builds them for left padding: cumsum - 1, padding at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _causal_mask(base, embeds, mask, cache, pos):
    sliding = getattr(base.config, "sliding_window", None) is not None
    fn = create_sliding_window_causal_mask if sliding else create_causal_mask
    return fn(config=base.config, inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, position_ids=pos)


def _run(base, layers, hidden, causal, pos, cache):
    """`layers` in order over `hidden`, filling their `cache` slots; the hidden state after them."""
    pe = base.rotary_emb(hidden, position_ids=pos)
    kw = {"attention_mask": causal, "position_ids": pos, "past_key_values": cache, "use_cache": True}
    for layer in layers:
        hidden = layer(hidden, position_embeddings=pe, **kw)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def _head(model, hidden_last: torch.Tensor) -> torch.Tensor:
    """[B, V] logits from the hidden state of each row's last position (before the final norm)."""
    return model.get_output_embeddings()(model.base_model.norm(hidden_last)).float()


@dataclass
class Prefill:
    """Stage A's pass over a left-padded batch: everything a stage needs to continue without recomputing."""

    cache: DynamicCache  # A's KV cache, every A layer
    hidden: torch.Tensor  # [B, T, H] the hidden state entering A's layer `p` (the first unshared one)
    p: int
    mask: torch.Tensor  # [B, T] attention mask
    pos: torch.Tensor  # [B, T] position ids
    causal: torch.Tensor | None  # the 4-D mask the prompt's layers used (None when the kernel masks itself)
    logits: torch.Tensor  # [B, V] A's next-token logits after the prompt


@torch.no_grad()
def prefill(a_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, p: int) -> Prefill:
    """Stage A over the prompts (left-padded), keeping the cache and the hidden state entering layer `p`."""
    dev = model_device(a_model)
    ids, mask = input_ids.to(dev), attention_mask.to(dev)
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("cascade.prefill needs left padding (tokenizer.padding_side = 'left')")
    base, layers = a_model.base_model, list(a_model.base_model.layers)
    window = getattr(base.config, "sliding_window", None)
    if window is not None and ids.shape[1] + 1 >= window:  # a sliding cache copied row-wise would lose its count
        raise ValueError(f"cascade.prefill: prompts of {ids.shape[1]} tokens reach the sliding window ({window})")
    _renumber(layers)
    cache = DynamicCache(config=a_model.config)
    pos = _positions(mask)
    hidden = base.embed_tokens(ids)
    causal = _causal_mask(base, hidden, mask, cache, pos)
    kept = _run(base, layers[:p], hidden, causal, pos, cache)
    hidden = _run(base, layers[p:], kept, causal, pos, cache)
    return Prefill(cache, kept, p, mask, pos, causal, _head(a_model, hidden[:, -1]))


def _rows(t: torch.Tensor | None, rows: torch.Tensor):
    return None if t is None else t.index_select(0, rows)


@torch.no_grad()
def extend(stage, pre: Prefill, rows: Sequence[int], *, is_a: bool = False) -> tuple[DynamicCache, torch.Tensor]:
    """(cache, [b, V] next-token logits) of `stage` for rows `rows` of `pre`, reusing A's shared prefix.

    `is_a`: the stage is A itself; its cache rows are taken as they are and nothing is computed.
    """
    idx = torch.as_tensor(list(rows), dtype=torch.long, device=pre.hidden.device)
    if is_a and list(rows) == list(range(len(pre.mask))):  # the whole batch stays on A: its cache as it is
        return pre.cache, pre.logits
    cache = DynamicCache(config=stage.config)
    n_copy = len(pre.cache.layers) if is_a else pre.p
    for i in range(n_copy):
        src = pre.cache.layers[i]
        cache.update(src.keys.index_select(0, idx), src.values.index_select(0, idx), i)
    if is_a:
        return cache, pre.logits.index_select(0, idx)
    base, layers = stage.base_model, list(stage.base_model.layers)
    _renumber(layers)
    hidden = _run(base, layers[pre.p :], pre.hidden.index_select(0, idx), _rows(pre.causal, idx), pre.pos[idx], cache)
    return cache, _head(stage, hidden[:, -1])


@torch.no_grad()
def decode(model, cache, logits: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, max_new_tokens: int):
    """[b, n] greedy tokens continuing from `cache` whose prompt gave `logits` (first token = their argmax).

    `mask` / `pos`: the prompt's [b, T] attention mask and position ids. Stops early once every row has
    produced the end-of-sequence token (as `generate` does); rows that ended are padded with it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"cascade.decode: max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long, device=logits.device)
    pad = int(eos[0]) if len(eos) else 0
    tok = logits.argmax(-1)  # [b]
    out, done = [tok], torch.isin(tok, eos)
    nxt = pos[:, -1:] + 1
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        step = model(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, past_key_values=cache)
        tok = step.logits[:, -1].argmax(-1).masked_fill(done, pad)
        out.append(tok)
        done = done | torch.isin(tok, eos)
        nxt = nxt + 1
    return torch.stack(out, dim=1)


@dataclass
class CascadeOut:
    """One batch through the cascade, rows in input order."""

    stages: list[str]
    logits: torch.Tensor  # [B, V] A's next-token logits after each prompt (the router's input)
    tokens: list[torch.Tensor]  # per row, the new tokens (trailing end-of-sequence padding removed)
    route_seconds: float  # A's prefill and the choice (the routing pass), synchronised


@torch.no_grad()
def cascade(
    stages: dict,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    choose: Callable[[torch.Tensor], Sequence[str]],
    *,
    max_new_tokens: int = 32,
) -> CascadeOut:
    """Route a left-padded batch with `choose(A's last-token logits) -> stage per row`, then generate each
    row on its stage from A's prefill (rows grouped by stage, results back in input order)."""
    a = stages["A"]
    p = shared_prefix(a, [m for s, m in stages.items() if s != "A"])
    t = time.perf_counter()
    pre = prefill(a, input_ids, attention_mask, p)
    chosen = [str(c) for c in choose(pre.logits)]
    sync(pre.mask.device)
    t_route = time.perf_counter() - t
    tokens: list = [None] * len(chosen)
    for st in dict.fromkeys(chosen):
        rows = [i for i, c in enumerate(chosen) if c == st]
        cache, logits = extend(stages[st], pre, rows, is_a=st == "A")
        idx = torch.as_tensor(rows, device=pre.mask.device)
        new = decode(stages[st], cache, logits, pre.mask[idx], pre.pos[idx], max_new_tokens)
        for j, r in enumerate(rows):
            tokens[r] = _trim(new[j], stages[st])
    return CascadeOut(chosen, pre.logits, tokens, t_route)


def _trim(row: torch.Tensor, model) -> torch.Tensor:
    """Tokens up to and including the first end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    hit = [i for i, t in enumerate(row.tolist()) if t in eos]
    return row[: hit[0] + 1] if hit else row


@torch.no_grad()
def plain(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 32):
    """Per row, the greedy tokens of `model` alone (prefill + the same decode loop): the baseline the bench
    times for FULL, A and the ideal, so every variant pays the same per-step overhead."""
    pre = prefill(model, input_ids, attention_mask, len(model.base_model.layers))
    new = decode(model, pre.cache, pre.logits, pre.mask, pre.pos, max_new_tokens)
    return [_trim(r, model) for r in new]

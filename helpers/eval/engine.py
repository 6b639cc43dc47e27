"""Batched scoring on a causal LM: log-likelihood of continuations, greedy generation, speed.

Log-likelihood tokenises like LightEval (trailing spaces of the context move into the
continuation; the context gets special tokens, the continuation none) and shares the context:
tokens that all of a question's continuations start with are moved into the context, one forward
pass per batch of contexts scores those and the first remaining token of every continuation, and
only continuations with more tokens left are run again, as short rows on top of the contexts' KV
cache (expanded per option), never as full context + continuation rows. Letter scoring (" A"..
" J") thus costs one forward pass per question, where LightEval runs one full row per option.

Usage: `lps = score_choices(model, tok, [("Q: 2+2?\\nAnswer:", [" 4", " 5"])], batch_size=8)`
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helpers.core.models import model_device


def model_max_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "max_position_embeddings", None) if cfg is not None else None


def new_cache():
    """A cache built without a config: it grows by layer index, so it fits whatever layer count
    and `layer_idx` values a model has (a layer list filtered without renumbering included);
    bundles.load_stages' stages renumber their shared layers per call and need no special cache."""
    from transformers import DynamicCache

    return DynamicCache()


def encode_pair(tok, context: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, continuation ids) as LightEval's pairwise tokenisation does it."""
    n = len(context) - len(context.rstrip())
    if n:
        continuations = [context[-n:] + c for c in continuations]
        context = context[:-n]
    ctx = tok(context, add_special_tokens=True)["input_ids"]
    if ctx and ctx[-1] == tok.eos_token_id:
        ctx = ctx[:-1]
    conts = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    for c, ids in zip(continuations, conts):
        if not ids:
            raise ValueError(f"continuation {c!r} encodes to no tokens")
    return ctx, conts


def _expand(cache, rows: torch.Tensor):
    """A new cache holding the given batch rows of `cache` (rows may repeat)."""
    from transformers import DynamicCache

    data = [
        (l.keys.index_select(0, rows), l.values.index_select(0, rows)) if l.is_initialized else (None, None)
        for l in cache.layers
    ]
    return DynamicCache(ddp_cache_data=data)


def split_common(ctx: list[int], conts: list[list[int]]) -> tuple[list[int], int, list[list[int]]]:
    """Move the tokens every continuation starts with into the context: (context, n moved, rests).

    " A".." J" on a byte-level tokenizer is [" ", "A"]..: the shared " " is scored once, in the
    context pass, and each option is left one token. Every rest keeps at least one token.
    """
    n = 0
    shortest = min(len(k) for k in conts)
    while n < shortest - 1 and all(k[n] == conts[0][n] for k in conts):
        n += 1
    return ctx + conts[0][:n], n, [k[n:] for k in conts]


@torch.inference_mode()
def _score_batch(
    model, ctxs: list[list[int]], moved: list[int], conts: list[list[list[int]]], pad_id: int, max_rows: int
) -> list[list[float]]:
    """Scores of a batch; ctxs[i] ends with moved[i] tokens shared by all its continuations."""
    dev = model_device(model)
    B = len(ctxs)
    lens = torch.tensor([len(c) for c in ctxs])
    Lc = int(lens.max())
    ids = torch.full((B, Lc), pad_id, dtype=torch.long)
    for i, c in enumerate(ctxs):
        ids[i, : len(c)] = torch.tensor(c)
    multi = [(i, j) for i in range(B) for j, k in enumerate(conts[i]) if len(k) > 1]
    cache = new_cache() if multi else None
    # right padding and no mask, as LightEval: real positions never see the pads (causal)
    P = max(moved)
    keep = (lens[:, None] - 1 - P + torch.arange(P + 1)[None, :]).clamp(min=0)  # [B, P+1], last column: last token
    out = model(input_ids=ids.to(dev), past_key_values=cache, use_cache=bool(multi), logits_to_keep=keep.to(dev))
    lp = F.log_softmax(out.logits.float(), dim=-1)  # [B, P+1, V]
    del out
    scores = []
    for i in range(B):
        shared = sum(float(lp[i, t, ids[i, keep[i, t] + 1]]) for t in range(P - moved[i], P))
        scores.append([shared + float(lp[i, P, k[0]]) for k in conts[i]])
    if not multi:
        return scores
    ctx_mask = (torch.arange(Lc)[None, :] < lens[:, None]).long()  # [B, Lc]
    for s in range(0, len(multi), max_rows):
        chunk = multi[s : s + max_rows]
        rows = torch.tensor([i for i, _ in chunk])
        Lk = max(len(conts[i][j]) - 1 for i, j in chunk)
        inp = torch.full((len(chunk), Lk), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), Lc + Lk), dtype=torch.long)
        mask[:, :Lc] = ctx_mask[rows]
        for r, (i, j) in enumerate(chunk):
            k = conts[i][j][:-1]
            inp[r, : len(k)] = torch.tensor(k)
            mask[r, Lc : Lc + len(k)] = 1
        pos = lens[rows][:, None] + torch.arange(Lk)[None, :]  # [P, Lk] true positions after each context
        lp = F.log_softmax(
            model(
                input_ids=inp.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                past_key_values=_expand(cache, rows.to(dev)),
                use_cache=True,
            ).logits.float(),
            dim=-1,
        )
        for r, (i, j) in enumerate(chunk):
            tgt = torch.tensor(conts[i][j][1:], device=dev)
            scores[i][j] += float(lp[r, torch.arange(len(tgt), device=dev), tgt].sum())
    return scores


def score_choices(
    model,
    tok,
    requests: Sequence[tuple[str, Sequence[str]]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    desc: str = "score",
) -> list[list[float]]:
    """Sum of log-probabilities of each continuation after its context, for every request.

    Contexts are left-truncated so that context + longest continuation fits `max_length` (default
    the model's max_position_embeddings). Requests are batched longest first.
    """
    model.eval()
    max_length = max_length or model_max_length(model)
    enc = []
    for ctx, conts in requests:
        c, n, ks = split_common(*encode_pair(tok, ctx, conts))
        if max_length is not None:
            c = c[-max(1 + n, max_length - max(len(k) for k in ks)) :]
        enc.append((c, n, ks))
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    out: list[list[float] | None] = [None] * len(enc)
    bar = tqdm(total=len(enc), desc=desc, disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        max_rows = batch_size * max(len(enc[i][2]) for i in idx)
        res = _score_batch(
            model, [enc[i][0] for i in idx], [enc[i][1] for i in idx], [enc[i][2] for i in idx], pad, max_rows
        )
        for i, r in zip(idx, res):
            out[i] = r
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


class _StopOnText:
    """Stop a row once its generated text contains `stop` (checked on a decoded tail)."""

    def __init__(self, tok, stop: str, prompt_len: int):
        self.tok, self.stop, self.start = tok, stop, prompt_len

    def __call__(self, input_ids, scores, **kw) -> torch.BoolTensor:
        tail = input_ids[:, self.start :][:, -16:]
        texts = self.tok.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], device=input_ids.device)


@torch.inference_mode()
def generate(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    stop: str | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), cut at the first `stop`."""
    from transformers import StoppingCriteriaList

    model.eval()
    dev = model_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = [tok(prompts[i], add_special_tokens=True)["input_ids"] for i in idx]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, L - len(e) :], mask[r, L - len(e) :] = torch.tensor(e), 1
        crit = StoppingCriteriaList([_StopOnText(tok, stop, L)]) if stop else None
        gen = model.generate(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            stopping_criteria=crit,
            past_key_values=new_cache(),
        )
        texts = tok.batch_decode(gen[:, L:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t.split(stop)[0] if stop else t
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled; CPU runs).

    `.growth` is the peak above the level at entry: what the block itself allocated, not the
    models and data that happen to live in the same process (a notebook holds several).
    """

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize()
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.start


@torch.inference_mode()
def measure_speed(
    model, prompt_tokens: int = 128, new_tokens: int = 32, batch_size: int = 1, vocab: int | None = None, seed: int = 0
) -> dict:
    """Prefill tokens/s (one forward over random prompts), decode tokens/s (greedy with a KV cache
    after that prefill) and peak memory: CUDA max allocated, or on CPU the weights' bytes plus the
    peak RSS growth during the probe (activations and KV cache), comparable across variants."""
    model.eval()
    dev = model_device(model)
    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, prompt_tokens), generator=g).to(dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    weights = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with _PeakRSS() as rss:
        sync()
        t = time.perf_counter()
        out = model(input_ids=ids, past_key_values=new_cache(), use_cache=True)
        sync()
        t_prefill = time.perf_counter() - t
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for i in range(new_tokens):
            pos = torch.full((batch_size, 1), prompt_tokens + i, device=dev)
            out = model(input_ids=nxt, past_key_values=cache, position_ids=pos, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        t_decode = time.perf_counter() - t
    return {
        "prefill_tok_s": round(batch_size * prompt_tokens / t_prefill, 2),
        "decode_tok_s": round(batch_size * new_tokens / t_decode, 2),
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(dev)) if cuda else weights + int(rss.growth),
        "memory_kind": "cuda_max_allocated" if cuda else "weights_plus_peak_rss_growth",
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }

"""Step 03's logit check, streamed: the pruned model against the router-masked original, one layer at a time.

Both models are built as skeletons on the meta device; each decoder layer of each model is read from its
checkpoint (legacy or fused experts, through `ExpertView`), run on every text's hidden states, and freed
before the next, so the check needs about two layers plus the embeddings and head, not two whole models
(Mixtral-8x7B bf16: ~3.5 GB instead of ~190 GB). Same arithmetic as the whole-model forward.

`masked_router` is the reference both checks use: the base model with the pruned experts' router logits
set to -inf before top-k.

Usage: `streamed_logit_check(merged_dir, "runs/toy/03_expert_prune/pruned/standard", plan, texts)`
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from helpers.core.checkpoint import Checkpoint, local_dir
from helpers.experts.masking import masked_router
from helpers.experts.view import ExpertView


class _Streamed:
    """A checkpoint's model skeleton (meta) with its layers materialized one at a time."""

    def __init__(self, path, dtype, device):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path, self.dtype, self.device = local_dir(path), dtype, device
        self.ck = Checkpoint(self.path)
        self.view = ExpertView(self.ck)
        self.config = AutoConfig.from_pretrained(str(self.path))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        inner = self.model.model
        with torch.device(device):  # buffers computed from the config, not weights
            inner.rotary_emb = type(inner.rotary_emb)(config=self.config)
        for name in ("model.embed_tokens", "model.norm", "lm_head"):
            self._fill(self.model.get_submodule(name), name)

    def _tensor(self, l: int, name: str) -> torch.Tensor:
        v = self.view
        if name == "mlp.gate.weight":
            return self.ck.get(v.router_name(l))
        if name == "mlp.experts.gate_up_proj":
            return torch.stack([torch.cat([v.read(l, e, "w1"), v.read(l, e, "w3")]) for e in range(v.n_experts)])
        if name == "mlp.experts.down_proj":
            return torch.stack([v.read(l, e, "w2") for e in range(v.n_experts)])
        return self.ck.get(f"model.layers.{l}.{name}")

    def _fill(self, module, prefix: str, layer: int | None = None):
        sd = {
            n: (self._tensor(layer, n) if layer is not None else self.ck.get(f"{prefix}.{n}"))
            for n, _ in module.named_parameters()
        }
        sd = {n: t.to(device=self.device, dtype=self.dtype) for n, t in sd.items()}
        module.load_state_dict(sd, assign=True, strict=True)
        return module

    def layer(self, l: int):
        return self._fill(self.model.model.layers[l], "", layer=l)

    def free(self, l: int):
        self.model.model.layers[l].to("meta")


def _mask(config, emb, pos):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fn = create_causal_mask if getattr(config, "sliding_window", None) is None else create_sliding_window_causal_mask
    return fn(config=config, inputs_embeds=emb, attention_mask=None, past_key_values=None, position_ids=pos)


@torch.no_grad()
def streamed_logit_check(source, pruned, plan: dict, texts: list[str], dtype="float32", device="cpu") -> dict:
    """Max |logits(pruned) - logits(source with the pruned experts masked)| over `texts`, streamed per layer."""
    from transformers import AutoTokenizer

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tok = AutoTokenizer.from_pretrained(str(pruned))
    a, b = _Streamed(source, dtype, device), _Streamed(pruned, dtype, device)
    ids = [tok(t, return_tensors="pt").input_ids.to(device) for t in texts]
    pos = [torch.arange(x.shape[1], device=device)[None] for x in ids]
    states = {}
    for name, m in (("a", a), ("b", b)):
        h = [m.model.model.embed_tokens(x) for x in ids]
        states[name] = (
            h,
            [_mask(m.config, e, p) for e, p in zip(h, pos)],
            [m.model.model.rotary_emb(e, p) for e, p in zip(h, pos)],
        )
    n_layers = a.config.num_hidden_layers
    for l in tqdm(range(n_layers), desc="logit check", unit="layer"):
        for name, m in (("a", a), ("b", b)):
            layer = m.layer(l)
            h, masks, rope = states[name]
            keep = {0: {int(k): v for k, v in plan.get("keep", plan).items()}[l]}
            with masked_router(_OneLayer(layer), keep) if name == "a" else contextlib.nullcontext():
                for i in range(len(h)):
                    h[i] = layer(h[i], attention_mask=masks[i], position_ids=pos[i], position_embeddings=rope[i])
            m.free(l)
    worst = 0.0
    for ha, hb in zip(states["a"][0], states["b"][0]):
        ref = a.model.lm_head(a.model.model.norm(ha)).float()
        got = b.model.lm_head(b.model.model.norm(hb)).float()
        worst = max(worst, float((got - ref).abs().max()))
    return {"max_abs_diff": worst, "n_tokens": sum(x.numel() for x in ids), "n_texts": len(texts), "streamed": True}


class _OneLayer:
    """One decoder layer seen as a one-layer model (`.model.layers`), for masked_router's hooks."""

    def __init__(self, layer):
        self.model = type("Inner", (), {"layers": [layer]})()

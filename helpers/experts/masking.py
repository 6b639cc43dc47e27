"""Router masking: each router's logits of experts not kept are -inf before top-k (what a pruned model computes).

`prune.logit_check` proves a pruned checkpoint's logits equal the masked original's; the expert sweep
scores every point this way, in memory.

Usage: `with masked_router(model, {"0": [0, 2, 5, 7], ...}): model(**batch)`
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def masked_router(model, keep: dict):
    """Within the block, each router's logits of experts not in `keep` are -inf before top-k.

    This is what the pruned model must compute; its logits are the identity check for a prune.
    """
    import torch

    from helpers.experts.scores import moe_blocks

    keep = {int(l): v for l, v in keep.get("keep", keep).items()}
    handles = []

    def hook(ids):
        def fn(gate, args, output):
            x = args[0].reshape(-1, gate.weight.shape[1])  # [T, H]
            logits = torch.nn.functional.linear(x, gate.weight)  # [T, E]
            dropped = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            dropped[ids] = False
            logits = logits.masked_fill(dropped, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, gate.top_k, dim=-1)  # [T, k]
            return logits, (top / top.sum(-1, keepdim=True)).to(output[1].dtype), idx

        return fn

    try:
        for l, blk in enumerate(moe_blocks(model)):
            handles.append(blk.gate.register_forward_hook(hook(keep[l])))
        yield model
    finally:
        for h in handles:
            h.remove()

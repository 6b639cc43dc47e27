"""Random checkpoints the project builds itself: tiny ones for tests, large ones for benches.

Usage: `save_random(tiny_config("mixtral"), "tmp/mx", n_shards=4, tokenizer=True)`; `synth_checkpoint(cfg, "big/", 19)`
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.core import arch
from helpers.core.checkpoint import dtype_code
from helpers.core.models import save_sharded
from helpers.core.writer import Entry, write_checkpoint

TINY = dict(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TINY_LAYERS = {"mistral": 8, "llama": 4, "mixtral": 4}


def tiny_config(model_type: str, **overrides):
    """A small config of `model_type` (mixtral: 8 experts, top-2, like the real one)."""
    from transformers import AutoConfig  # imported on use: helpers that only save models skip it

    kw = dict(TINY, num_hidden_layers=TINY_LAYERS[model_type])
    if model_type == "mixtral":
        kw.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=24)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


_CORPUS = (
    "question : what is 3 plus 4 ? answer : 7 . which number is largest : 5 , 9 , 2 ? 9 . "
    "the following are multiple choice questions ( with answers ) about arithmetic . think step by step "
    "and then finish your answer with the answer is ( x ) . options : a b c d e f g h i j . "
    "count the letters in apple . sort these words : pear , fig , kiwi . the next letter after c is d . "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 "
)


def tiny_tokenizer(out=None, vocab_size: int = TINY["vocab_size"]):
    """The toy world's tokenizer (byte-level BPE, chat template) trained on a few lines; saved to `out` if given."""
    from helpers.toy.world import train_tokenizer  # toy imports the training code, which imports this module

    return train_tokenizer([_CORPUS] * 4, vocab_size, out)


def random_model(config, seed: int = 0, std: float | None = None):
    """A randomly initialised causal LM in fp32, eval mode. `std` widens init so layers matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if std is not None:
        config.initializer_range = std
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_random(
    config, out, n_shards: int = 4, fused: bool = False, seed: int = 0, model=None, tokenizer: bool = True
) -> Path:
    """Save a random model (or `model`) in about `n_shards` shards; legacy expert keys unless `fused`.

    With `tokenizer`, a tiny byte-level tokenizer (vocab = config.vocab_size) is saved beside it.
    """
    save_sharded(model or random_model(config, seed), out, n_shards, fused=fused)
    if tokenizer:
        tiny_tokenizer(out, vocab_size=config.vocab_size)
    return Path(out)


def legacy_shapes(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor name -> (shape, dtype) as the checkpoint is written on disk (legacy expert keys)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = config.to_dict()
    fam = arch.detect(cfg)
    out = {}
    for name, t in model.state_dict().items():
        m = arch.FUSED_EXPERT_RE.match(name)
        if m:
            layer, roles = int(m.group(1)), arch.FUSED_ROLES[m.group(2)]
            shape = (t.shape[1] // len(roles), t.shape[2])  # [E, 2I, H] -> w1, w3 [I, H]; [E, H, I] -> w2 [H, I]
            for e in range(t.shape[0]):
                for w in roles:
                    out[arch.LEGACY.experts[w].format(l=layer, e=e)] = (shape, t.dtype)
        elif fam.is_moe and name == arch.FUSED.router.format(l=arch.layer_of(name) or 0):
            out[arch.LEGACY.router.format(l=arch.layer_of(name))] = (tuple(t.shape), t.dtype)
        else:
            out[name] = (tuple(t.shape), t.dtype)
    return out


def synth_checkpoint(config, out, n_shards: int, dtype=torch.bfloat16, seed: int = 0, overwrite=False) -> Path:
    """Stream a random checkpoint of `config` to disk in `n_shards` shards without building the model."""
    shapes = legacy_shapes(config)
    gen = torch.Generator().manual_seed(seed)

    def maker(shape):
        return lambda: (torch.randn(shape, generator=gen) * 0.02).to(dtype)

    entries = [Entry(n, dtype_code(dtype), s, make=maker(s)) for n, (s, _) in shapes.items()]
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    return write_checkpoint(out, entries, config=cfg, n_shards=n_shards, overwrite=overwrite, desc="synth")

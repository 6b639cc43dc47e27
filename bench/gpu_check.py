"""GPU check, no network: real-width Mixtral and Mistral blocks with random weights, QLoRA steps at the
gpu preset's batch x length, peak memory per layer extrapolated to 32 layers beside the memory plan's
figure, and bf16 decode speed of stage A vs FULL at 7B width. Written to finish within ~8 min on one
H100/H200; `--tiny` runs the same code at tiny widths on CPU (tests/test_gpu_check.py).

Per model: a random checkpoint of n and n+1 layers (hidden 4096, intermediate 14336, 8 experts) is
written to a temp dir and trained with `finetune.train_lora` (QLoRA, the preset's recipe, gradient
checkpointing); peak(n+1) - peak(n) is one layer; peak(32) = peak(n) + (32 - n) x that. The plan's total
for the real 32-layer model (`helpers.core.memplan`) is printed beside it.

Usage: `PYTHONPATH=. python bench/gpu_check.py [--tiny] [--layers 1] [--steps 3] [--out bench/out/gpu_check.json]`
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers import finetune  # noqa: E402
from helpers.core import memplan  # noqa: E402
from helpers.toy import synth  # noqa: E402

MODELS = {"mixtral": "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral": "mistralai/Mistral-7B-v0.1"}
RECIPES = {"mixtral": ("01", "mixtral-experts"), "mistral": ("05", "ffn-healing")}
TINY = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512
)


def config(family: str, layers: int, tiny: bool):
    c = memplan.load_config(MODELS[family])
    c.num_hidden_layers = layers
    for k, v in (TINY if tiny else {}).items():
        setattr(c, k, v)
    return c


def rows(n: int, words: int, seed: int = 0) -> list[dict]:
    import random

    vocab = synth._CORPUS.split()
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(vocab) for _ in range(words))} for _ in range(n)]


def peak(family: str, layers: int, batch: int, seq: int, steps: int, tiny: bool, work: Path) -> dict:
    """QLoRA steps on a random `layers`-layer checkpoint; peak GPU bytes (CPU: None) and the plan's total."""
    ck = synth.save_random(config(family, layers, tiny), work / f"{family}{layers}", n_shards=1, tokenizer=True)
    num, preset = RECIPES[family]
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = finetune.train_lora(
        ck,
        rows(batch * steps, seq * 2),
        work / f"adapter_{family}{layers}",
        preset=preset,
        quantize="4bit",
        steps=steps,
        batch_size=batch,
        grad_accum=1,
        max_length=seq,
        warmup_steps=0,
        overwrite=True,
    )
    p = finetune.get_preset(preset)
    plan = memplan.plan_row(num, ck, mode="qlora", batch=batch, seq=seq, r=p.r, lora_preset=preset)
    return {
        "layers": layers,
        "peak_bytes": torch.cuda.max_memory_allocated() if gpu else None,
        "plan_total_bytes": plan["total_bytes"],
        "loss": res.losses[-1][1] if res.losses else None,
        "seconds": round(time.perf_counter() - t, 1),
    }


def qlora_row(family: str, n: int, batch: int, seq: int, steps: int, tiny: bool, work: Path) -> dict:
    a, b = (peak(family, k, batch, seq, steps, tiny, work) for k in (n, n + 1))
    num, preset = RECIPES[family]
    full = memplan.plan_row(num, MODELS[family], mode="qlora", batch=batch, seq=seq, lora_preset=preset)
    row = {"check": f"qlora {family}", "batch": batch, "seq": seq, "runs": [a, b], "plan_32_bytes": full["total_bytes"]}
    if a["peak_bytes"] is not None:
        per_layer = b["peak_bytes"] - a["peak_bytes"]
        row |= {"per_layer_bytes": per_layer, "extrapolated_32_bytes": a["peak_bytes"] + (32 - n) * per_layer}
    return row


def decode_row(layers: int, drop: int, prompt: int, new: int, tiny: bool) -> dict:
    """bf16 greedy decode tokens/s: FULL (`layers`) vs stage A (the last `drop` layers before the final one cut)."""
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = config("mistral", layers, tiny)
    torch.manual_seed(0)
    with torch.device(dev):
        full = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, prompt), device=dev)

    def tps(model) -> float:
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        return new / (time.perf_counter() - t)

    t_full = tps(full)
    keep = [i for i in range(layers) if not layers - 1 - drop <= i < layers - 1]
    full.model.layers = torch.nn.ModuleList(full.model.layers[i] for i in keep)
    for i, layer in enumerate(full.model.layers):
        layer.self_attn.layer_idx = i
    full.config.num_hidden_layers = len(keep)
    if getattr(full.config, "layer_types", None):
        full.config.layer_types = [full.config.layer_types[i] for i in keep]
    t_a = tps(full)
    return {
        "check": "decode bf16 A vs FULL",
        "layers_full": layers,
        "layers_a": len(keep),
        "tokens_per_s_full": round(t_full, 2),
        "tokens_per_s_a": round(t_a, 2),
        "ratio": round(t_a / t_full, 3),
        "ideal": round(layers / len(keep), 3),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths (CPU test of this script)")
    ap.add_argument("--layers", type=int, default=1, help="measure at n and n+1 layers")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="bench/out/gpu_check.json")
    a = ap.parse_args(argv)
    from helpers import runner

    p01, p05 = (runner.step_parameters(n, "gpu")[0] for n in ("01", "05"))
    batch, seq = (2, 32) if a.tiny else (p01.batch_size, p01.max_length)
    heal = finetune.get_preset("ffn-healing", **(p05.heal_overrides or {}))
    hb, hs = (2, 32) if a.tiny else (heal.batch_size, heal.max_length)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no GPU ({platform.processor() or 'cpu'})"
    out = {"device": gpu, "torch": torch.__version__, "tiny": a.tiny, "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out["rows"].append(qlora_row("mixtral", a.layers, batch, seq, a.steps, a.tiny, Path(tmp)))
        out["rows"].append(qlora_row("mistral", a.layers, hb, hs, a.steps, a.tiny, Path(tmp)))
    out["rows"].append(decode_row(8, 2, 16 if a.tiny else 128, 8 if a.tiny else 64, a.tiny))
    for r in out["rows"]:
        g = {k: f"{v / 1e9:.1f} GB" for k, v in r.items() if k.endswith("_bytes") and v is not None}
        print(r["check"], {k: v for k, v in r.items() if k not in ("runs",) and not k.endswith("_bytes")}, g)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out} on {gpu}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

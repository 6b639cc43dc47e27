"""Evaluate one checkpoint: load it, run MMLU-Pro or LightEval in the asked modes, write results.json.

Usage: `evaluate_dir("runs/toy/world/mistral", "eval_results/toy/base_mistral", modes=["cloze", "loglik"], data="runs/toy/world/mmlu_pro")`
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch

from helpers.eval import mmlu_pro, results

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def load_model(path, dtype: str | None = None, device: str | None = None):
    """(model, tokenizer) from a checkpoint dir; fails on missing/unexpected keys. dtype '4bit' uses bitsandbytes."""
    from transformers import AutoTokenizer

    from helpers.checkpoint import load_check

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if dtype == "4bit":
        from transformers import BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        model = load_check(path, dtype=torch.bfloat16, own=False, quantization_config=q, device_map=device)
    elif dtype in DTYPES:
        on_cpu = device == "cpu"
        model = load_check(path, dtype=DTYPES[dtype], own=on_cpu, **({} if on_cpu else {"device_map": device}))
    else:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES) + ['4bit']}")
    return model.eval(), AutoTokenizer.from_pretrained(path)


def free(*objs) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_dir(model_dir, out_dir, *, bench: str = "mmlu-pro", modes: Sequence[str] = ("cloze",), data=None,
                 limit: int | None = None, variant: str | None = None, dtype: str | None = None,
                 batch_size: int = 8, cot_shots: int = 5, loglik_shots: int = 0, max_new_tokens: int = 256,
                 speed: bool = True, parent_manifest=None, progress: bool = True) -> Path:
    """Score one checkpoint and merge the tasks into `<out_dir>/results.json` (see helpers.eval.results)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a checkpoint directory (no config.json)")
    device = default_device()
    dtype = dtype or default_dtype(device)
    questions, shots = mmlu_pro.load(data, limit)
    variant = variant or Path(out_dir).name
    cfg = results.config_block(model_dir, variant, dtype=dtype, data=str(data or mmlu_pro.HUB_ID), limit=limit,
                               parent_manifest=parent_manifest or results.parent_manifest_of(model_dir))
    if bench == "lighteval":
        from helpers.eval.lighteval_run import run_lighteval

        if dtype == "4bit":
            raise ValueError("--bench lighteval with --dtype 4bit: not offered; use bfloat16")
        model, tok = load_model(model_dir, dtype, device)
        tasks = run_lighteval(model, questions, shots, out_dir, modes=modes, tokenizer=model_dir,
                              batch_size=batch_size, loglik_shots=loglik_shots, cot_shots=cot_shots,
                              max_new_tokens=max_new_tokens, name=variant)
    elif bench == "mmlu-pro":
        model, tok = load_model(model_dir, dtype, device)
        tasks = []
        for mode in modes:
            kw = dict(batch_size=batch_size, progress=progress)
            if mode == "cot":
                kw.update(k=cot_shots, max_new_tokens=max_new_tokens)
            elif mode == "loglik":
                kw.update(k=loglik_shots)
            tasks += mmlu_pro.evaluate(model, tok, questions, shots, mode=mode, **kw)
    else:
        raise ValueError(f"--bench {bench!r}: expected mmlu-pro or lighteval")
    from helpers.eval.engine import measure_speed

    spd = measure_speed(model) if speed else None
    path = results.write_results(out_dir, cfg, tasks, spd)
    free(model)
    return path


def cli_evaluate(args) -> int:
    modes = [args.mode]
    if args.bench == "lighteval" and args.mode == "cloze":
        raise ValueError("--bench lighteval --mode cloze: lighteval runs loglik and cot here; use --bench mmlu-pro for cloze")
    path = evaluate_dir(args.model, args.out, bench=args.bench, modes=modes, data=args.data, limit=args.limit,
                        variant=args.variant, dtype=getattr(args, "dtype", None),
                        batch_size=getattr(args, "batch_size", None) or 8,
                        max_new_tokens=getattr(args, "max_new_tokens", None) or 256)
    doc = results.read_json(path)
    for task, r in doc["results"].items():
        print(f"{task:22s} acc {r['acc']:.4f}  n {r['n']}  unparsed {r.get('n_unparsed', 0)}")
    print(f"wrote {path}")
    return 0

"""Layer-pipeline performance, as ratios measured side by side in one run.

1. calibration: angular distances for all block sizes / a plain forward pass over the same batches
   (target <= 1.15), on a random Mistral-shaped model of reduced width;
2. decode speed: stage A tokens/s / FULL tokens/s (target >= 0.9 x L / L_A), on the same model
   and on the toy world's Mistral when runs/toy/world exists; stages come from bundles.load_stages;
3. surgery: layer-drop (stage A + bundles) and assemble FULL time / `cp -r` time, and peak RSS /
   checkpoint bytes, on a synth_checkpoint Mistral-shaped checkpoint of about 1 GB (bf16).

Usage: `PYTHONPATH=. python bench/layers.py [--quick] [--threads 1] [--out bench/out/layers]`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cp_cmd, timed  # noqa: E402
from helpers.core.checkpoint import Checkpoint  # noqa: E402
from helpers.core.fsutil import dir_bytes  # noqa: E402
from helpers.layers import bundles, distance  # noqa: E402
from helpers.layers import drop as layers  # noqa: E402
from helpers.toy import synth  # noqa: E402

WORDS = synth._CORPUS.split()


def mistral_shaped(layers_: int, hidden: int, inter: int, vocab: int = 32000, heads: int = 8, kv: int = 2):
    """Mistral-7B's proportions (4 query heads per kv head, head_dim 128 at full size), narrower."""
    return synth.tiny_config(
        "mistral",
        num_hidden_layers=layers_,
        hidden_size=hidden,
        intermediate_size=inter,
        vocab_size=vocab,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=4096,
    )


def texts(n: int, words: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(words // 2, words + 1, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out


def best_of(fns: dict, repeats: int) -> dict[str, float]:
    """Min wall time of each function, run interleaved so that machine load hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in times.items()}


# ---- 1. calibration overhead ----------------------------------------------------------------
@torch.no_grad()
def bench_calibration(model, tok, n_texts: int, seq_len: int, batch_size: int, repeats: int) -> dict:
    batches = distance.calibration_batches(tok, texts(n_texts, seq_len), seq_len=seq_len, batch_size=batch_size)

    def plain_decoder():
        for b in batches:
            model.base_model(**b, use_cache=False)

    def plain_full():
        for b in batches:
            model(**b, use_cache=False)

    t = best_of(
        {
            "calibration": lambda: distance.angular_distances(model, batches=batches, progress=False),
            "forward_decoder": plain_decoder,
            "forward_with_lm_head": plain_full,
        },
        repeats,
    )
    tokens = int(sum(b["attention_mask"].sum() for b in batches))
    return {
        "batches": len(batches),
        "tokens": tokens,
        **{f"{k}_s": round(v, 4) for k, v in t.items()},
        "ratio_vs_decoder_forward": round(t["calibration"] / t["forward_decoder"], 3),
        "ratio_vs_full_forward": round(t["calibration"] / t["forward_with_lm_head"], 3),
        "target": "<= 1.15",
    }


# ---- 2. decode speed per stage ----------------------------------------------------------------
@torch.no_grad()
def decode_seconds_per_token(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Decode time per token: (generate N tokens - generate 1 token) / (N - 1), cached, greedy."""
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0)

    def gen(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)

    t = best_of({"one": gen(1), "many": gen(new_tokens)}, repeats)
    return (t["many"] - t["one"]) / (new_tokens - 1)


def bench_stages(src: Path, work: Path, n_drop: int, new_tokens: int, repeats: int, name: str) -> dict:
    cfg = Checkpoint(src).config
    L = cfg["num_hidden_layers"]
    plan = layers.plan_layer_drop(cfg, None, layers=f"{L - 1 - n_drop}-{L - 2}", keep_last_layer=True)
    a, r = layers.apply_layer_drop(src, plan, work / f"{name}_A", work / f"{name}_bundles", overwrite=True)
    stages = bundles.load_stages(a, r)
    prompt = torch.randint(4, min(cfg["vocab_size"], 300), (1, 16), generator=torch.Generator().manual_seed(0))
    sec = {}
    for _ in range(2):  # alternate stages, keep each one's best
        for s in ("A", "FULL"):
            v = decode_seconds_per_token(stages[s], prompt, new_tokens, repeats)
            sec[s] = min(sec.get(s, v), v)
    tps = {s: 1.0 / v for s, v in sec.items()}
    L_a = L - n_drop
    ratio = tps["A"] / tps["FULL"]
    return {
        "model": name,
        "L": L,
        "L_A": L_a,
        "tokens_per_s_A": round(tps["A"], 2),
        "tokens_per_s_FULL": round(tps["FULL"], 2),
        "ratio_A_over_FULL": round(ratio, 3),
        "target": round(0.9 * L / L_a, 3),
        "ratio_over_target": round(ratio / (0.9 * L / L_a), 3),
    }


# ---- 3. surgery vs cp -------------------------------------------------------------------------
SURGERY = """
import json, re, shutil, sys, time
from helpers.layers import bundles, drop as layers
from helpers.core.checkpoint import Checkpoint
from transformers import AutoConfig  # a fixed import cost (seconds on a busy box), not surgery
src, a, r, full, what = sys.argv[1:6]
for old in ([a, r] if what == "drop" else [full] if what in ("assemble", "copy") else []):
    shutil.rmtree(old, ignore_errors=True)  # as for cp: removing the last run's output is not timed
t = time.perf_counter()
if what == "drop":
    plan = layers.plan_layer_drop(Checkpoint(src).config, None, layers=sys.argv[6], keep_last_layer=True)
    layers.apply_layer_drop(src, plan, a, r, overwrite=True)
elif what == "assemble":
    bundles.assemble(a, r, "FULL", full, overwrite=True)
elif what == "copy":  # the foundation's streaming copy, the same writer with nothing to change
    from helpers.core.writer import copy_checkpoint
    copy_checkpoint(src, full, overwrite=True)
dt = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"seconds": dt, "max_rss": hwm}))
"""


def child(*argv) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", SURGERY, *map(str, argv)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cp(src: Path, dst: Path, sync: bool) -> float:
    """Seconds of `cp -r` (with `sync`: then fsync of the copy, as durable as our atomic writer)."""
    shutil.rmtree(dst, ignore_errors=True)
    return timed(cp_cmd(src, dst) if sync else ["cp", "-r", str(src), str(dst)])[0]


def bench_surgery(work: Path, cfg, repeats: int) -> dict:
    src = work / "synth_src"
    if not (src / "model.safetensors.index.json").exists():
        synth.synth_checkpoint(cfg, src, n_shards=4, dtype=torch.bfloat16, overwrite=True)
    nbytes = dir_bytes(src)
    L = cfg.num_hidden_layers
    block = f"{L - 1 - L // 4}-{L - 2}"
    a, r, full, dst = work / "synth_A", work / "synth_bundles", work / "synth_full", work / "synth_cp"
    baseline = child(src, a, r, full, "import")  # RSS of the interpreter with torch and helpers loaded
    runs = {"cp": [], "cp_fsync": [], "copy_checkpoint": [], "drop": [], "assemble": []}
    rss = {"drop": 0, "assemble": 0, "copy_checkpoint": 0}
    for _ in range(repeats):
        runs["cp"].append(cp(src, dst, sync=False))
        runs["cp_fsync"].append(cp(src, dst, sync=True))
        for what in ("copy", "drop", "assemble"):
            res = child(src, a, r, full, what, block)
            key = "copy_checkpoint" if what == "copy" else what
            runs[key].append(res["seconds"])
            rss[key] = max(rss[key], res["max_rss"])
    t = {k: min(v) for k, v in runs.items()}
    shutil.rmtree(dst, ignore_errors=True)
    mb = 1e6
    return {
        "checkpoint_bytes": nbytes,
        "checkpoint_GB": round(nbytes / 1e9, 3),
        "layers": L,
        "dropped": block,
        **{f"{k}_s": round(v, 3) for k, v in t.items()},
        "drop_over_cp": round(t["drop"] / t["cp"], 3),
        "drop_over_cp_fsync": round(t["drop"] / t["cp_fsync"], 3),
        "drop_over_copy_checkpoint": round(t["drop"] / t["copy_checkpoint"], 3),
        "assemble_over_cp": round(t["assemble"] / t["cp"], 3),
        "assemble_over_cp_fsync": round(t["assemble"] / t["cp_fsync"], 3),
        "baseline_rss_MB": round(baseline["max_rss"] / mb, 1),
        "drop_peak_rss_MB": round(rss["drop"] / mb, 1),
        "assemble_peak_rss_MB": round(rss["assemble"] / mb, 1),
        "drop_peak_rss_over_bytes": round(rss["drop"] / nbytes, 3),
        "drop_rss_above_baseline_over_bytes": round((rss["drop"] - baseline["max_rss"]) / nbytes, 4),
        "assemble_rss_above_baseline_over_bytes": round((rss["assemble"] - baseline["max_rss"]) / nbytes, 4),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/layers", help="work directory (git-ignored)")
    ap.add_argument("--quick", action="store_true", help="smaller everything (a smoke run, not a measurement)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--toy", default="runs/toy/world/mistral", help="the toy world's Mistral checkpoint")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: calibration,stages,toy,surgery")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    q = args.quick
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "device": "cpu",
        }
    }

    narrow = mistral_shaped(*((8, 128, 448) if q else (32, 512, 1792)))
    if not ({"calibration", "stages"} <= skip):
        model = synth.random_model(narrow, seed=0)
        src = (
            synth.save_random(narrow, work / "narrow_src", n_shards=4, model=model, tokenizer=True)
            if "stages" not in skip
            else None
        )
        tok = synth.tiny_tokenizer()
        if "calibration" not in skip:
            report["calibration"] = bench_calibration(model, tok, 16 if q else 32, 32 if q else 64, 8, args.repeats + 2)
            print("calibration", json.dumps(report["calibration"]), flush=True)
        del model, tok
        if src is not None:
            report["stages_narrow"] = bench_stages(
                src, work, narrow.num_hidden_layers // 4, 8 if q else 48, args.repeats, "narrow"
            )
            print("stages", json.dumps(report["stages_narrow"]), flush=True)
    toy = Path(args.toy)
    if "toy" not in skip and toy.exists():
        L = Checkpoint(toy).config["num_hidden_layers"]
        report["stages_toy"] = bench_stages(toy, work, round(0.25 * L), 8 if q else 48, args.repeats, "toy")
        print("stages toy", json.dumps(report["stages_toy"]), flush=True)
    elif "toy" not in skip:
        report["stages_toy"] = f"skipped: {toy} does not exist (python -m helpers toy build)"
    if "surgery" not in skip:
        big = mistral_shaped(*((8, 256, 896) if q else (32, 1024, 3584)))
        report["surgery"] = bench_surgery(work, big, 1 if q else args.repeats)
        print("surgery", json.dumps(report["surgery"]), flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

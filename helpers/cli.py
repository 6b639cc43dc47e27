"""Command line: `python -m helpers <command>`; every command is a thin call into one module.

Usage: `python -m helpers --help`, `python -m helpers run --preset toy --only 03,04`, `python -m helpers step 04`

Arguments are declared here, handlers live in their modules as `cli_<name>(args) -> int` and are
imported only when their command runs, so `--help` stays instant (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _opt(p, *names, **kw):
    """An option under its dashed name and, where it has one, its snake_case alias."""
    names = list(names)
    for n in list(names):
        if n.startswith("--") and "-" in n[2:]:
            alias = "--" + n[2:].replace("-", "_")
            if alias not in names:
                names.append(alias)
    return p.add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m helpers", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", metavar="<command>")

    def cmd(name, handler, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = cmd("run", "helpers.runner:cli_run", "execute the notebooks headless with a preset's parameters")
    _opt(p, "--preset", default="toy", help="configs/<preset>.yaml (default: toy)")
    _opt(p, "--only", default=None, help="comma-separated notebook numbers, e.g. 03,04")
    _opt(p, "--out", default=None, help="output root (default: runs/<preset>)")
    _opt(
        p,
        "--set",
        action="append",
        default=[],
        metavar="NN.KEY=VALUE",
        help="override one notebook parameter (YAML value), e.g. 01.MAX_STEPS=5; repeatable",
    )
    _opt(p, "--no-html", action="store_true", help="skip the HTML renders")

    p = cmd(
        "step",
        "helpers.runner:cli_step",
        "run one step's function (what notebook NN's Run cell calls) with the parameters `run` would give it",
    )
    p.add_argument("step", metavar="NN", help="notebook number: 01 finetune ... 06 benchmarks")
    _opt(p, "--preset", default="toy", help="configs/<preset>.yaml (default: toy)")
    _opt(p, "--out", default=None, help="run root, relative to the repo root (default: runs/<preset>)")
    _opt(
        p,
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter of this step (YAML value), e.g. DROP_FRAC=0.5; repeatable",
    )

    p = cmd(
        "toy", "helpers.toy.world:cli_toy", "the toy world: tiny trained Mixtral and Mistral plus an MMLU-Pro-style set"
    )
    p.add_argument("action", choices=["build"], help="build (cached: rebuilt only when spec or seed change)")
    _opt(p, "--out", default="runs/toy/world", help="output directory (a relative default: under the repo root)")
    _opt(p, "--quick", action="store_true", help="tiny and fast (tests)")
    _opt(p, "--seed", type=int, default=0)
    _opt(p, "--force", action="store_true", help="rebuild even if cached")

    p = cmd("plan", "helpers.plan:cli_plan", "GPU memory each notebook needs, from the configs alone (no download)")
    _opt(p, "--preset", default="gpu", help="configs/<preset>.yaml (default: gpu)")
    _opt(p, "--out", default=None, help="run root (default: runs/<preset>)")
    _opt(
        p, "--json", action="store_true", help="a JSON list of rows (notebook, model, weights_bytes, total_bytes, ...)"
    )

    p = cmd(
        "expert-prune",
        "helpers.experts.prune:cli_expert_prune",
        "keep k experts per layer of a Mixtral checkpoint: step 03's plan and prune",
    )
    p.epilog = "Unset --criterion, --layout, --max-shard-size take notebook 03's defaults."
    _opt(p, "--model", required=True, help="checkpoint directory (legacy or fused expert keys)")
    _opt(p, "--scores", help="scores.json from notebook 02")
    _opt(p, "--criterion", help="score to rank experts by (with --scores)")
    _opt(p, "--keep", type=int, help="experts kept per layer (with --scores)")
    _opt(p, "--plan", help="plan.json {'keep': {'<layer>': [ids]}} instead of --scores")
    _opt(p, "--out", required=True, help="output directory")
    _opt(p, "--layout", choices=["standard", "consolidated", "both"])
    _opt(p, "--max-shard-size", help="consolidated shard size, e.g. 10GB")
    _opt(p, "--overwrite", action="store_true")

    p = cmd("sweep", "helpers.sweeps:cli_sweep", "accuracy vs experts kept / layers dropped, every criterion")
    p.add_argument("side", choices=["experts", "layers"])
    _opt(p, "--preset", default="toy", help="configs/<preset>.yaml: its step 03 / 04 parameters (default: toy)")
    _opt(p, "--out", default=None, help="run root holding the steps' outputs (default: runs/<preset>)")
    _opt(p, "--out-dir", default=None, help="CSVs and figures (default: eval_results/<preset>/sweeps)")
    _opt(p, "--executor", choices=["local", "inline", "slurm", "submitit-local"], help="default: local processes")
    _opt(p, "--workers", type=int, help="worker processes / concurrent slurm jobs (default 2)")
    _opt(p, "--limit", type=int, help="questions per point (default 400)")
    _opt(p, "--seeds", type=int, help="random-baseline seeds (default 5)")
    _opt(p, "--mode", help="scorer: an MMLU-Pro mode of helpers.eval (default cloze; cot, loglik)")
    _opt(p, "--work-dir", default=None, help="per-point results, skipped on a rerun (default: <run root>/sweeps/SIDE)")
    _opt(p, "--heal", action=argparse.BooleanOptionalAction, help="layers: heal angular and last_n at DROP_FRAC")

    p = cmd("sweep-findings", "helpers.sweeps:cli_findings", "findings.md over the sweeps of several toy-world seeds")
    _opt(p, "--presets", default="toy,toy_seed1,toy_seed2", help="comma-separated presets (their sweeps CSVs)")
    _opt(p, "--out-file", default=None, help="default: eval_results/<first preset>/sweeps/findings.md")

    p = cmd(
        "layer-drop",
        "helpers.layers.drop:cli_layer_drop",
        "drop the most redundant block of layers (angular distance): step 04, as notebook 04 runs it",
    )
    p.epilog = "Flags are notebook 04's parameters; an unset flag takes the notebook's default."
    _opt(p, "--model", required=True, help="checkpoint directory or hub id")
    _opt(p, "--drop-frac", type=float, help="fraction of layers to drop, in [0, 1)")
    _opt(
        p,
        "--keep-last-layer",
        action=argparse.BooleanOptionalAction,
        help="only blocks that end before the last layer",
    )
    _opt(p, "--layers", help="explicit block a-b (0-based, inclusive); overrides the search (measured with --calib)")
    _opt(p, "--calib", help="toy | PATH (jsonl/parquet/txt) | c4 | wikitext")
    _opt(p, "--world-manifest", help="toy world manifest (its calibration text for --calib toy)")
    _opt(p, "--world", help="toy world directory (its manifest.json); default: the repo's runs/toy/world")
    _opt(p, "--n-samples", type=int, help="calibration texts")
    _opt(p, "--seq-len", type=int, help="tokens per calibration text")
    _opt(p, "--batch-size", type=int, help="texts per forward pass")
    _opt(p, "--n-bundles", type=int, help="the removed layers as this many contiguous bundles (B, C, ...)")
    _opt(p, "--dtype", help="float32 | bfloat16 | float16 | 4bit (unset: fp32 on CPU, bf16 on GPU)")
    _opt(p, "--seed", type=int, help="calibration sampling seed")
    _opt(p, "--run-dir", help="plan.json, distances.json, figures/, manifest.json (default: the parent of --save-dir)")
    _opt(p, "--save-dir", help="stage A checkpoint (default: RUN_DIR/A)")
    _opt(p, "--save-removed-dir", help="directory for bundles B, C, ... (default: RUN_DIR/bundles)")
    _opt(p, "--overwrite", action="store_true", help="replace existing outputs")

    p = cmd("assemble", "helpers.layers.bundles:cli_assemble", "rebuild stage AB or FULL from stage A plus bundles")
    _opt(p, "--base-model", required=True, help="stage A checkpoint")
    _opt(p, "--bundles-dir", required=True)
    _opt(p, "--stage", required=True, choices=["A", "AB", "FULL"])
    _opt(p, "--out", required=True)
    _opt(p, "--overwrite", action="store_true")

    p = cmd(
        "route",
        "helpers.layers.serve:cli_route",
        "entropy-routed generation over stages A/AB/FULL (REPL without --prompt)",
    )
    _opt(p, "--base-model", required=True, help="stage A checkpoint")
    _opt(p, "--bundles-dir", required=True)
    _opt(p, "--thresholds", default=None, help="thresholds.json (default: BUNDLES/thresholds.json)")
    _opt(p, "--prompt", default=None)
    _opt(p, "--max-new-tokens", type=int, default=32)

    p = cmd("evaluate", "helpers.eval.run:cli_evaluate", "MMLU-Pro or LightEval on one model")
    _opt(p, "--model", required=True, help="checkpoint dir or hub id (results.json: repo-relative, or as given)")
    _opt(p, "--bench", choices=["mmlu-pro", "lighteval"], default="mmlu-pro")
    _opt(p, "--mode", choices=["cot", "loglik", "cloze"], default="loglik")
    _opt(p, "--data", default=None, help="local dir in the hub layout (default: TIGER-Lab/MMLU-Pro)")
    _opt(p, "--limit", type=int, default=None, help="questions in total")
    _opt(p, "--variant", default=None, help="variant name recorded in results.json")
    _opt(p, "--out", required=True, help="eval_results/<preset>/<variant>/")
    _opt(
        p,
        "--dtype",
        choices=["float32", "bfloat16", "float16", "4bit"],
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA",
    )
    _opt(p, "--batch-size", type=int, default=8)
    _opt(p, "--cot-shots", type=int, default=5, help="CoT shots before fitting (official: 5)")
    _opt(p, "--max-model-length", type=int, default=4096, help="CoT context the shots must fit (official: 4096)")
    _opt(p, "--max-new-tokens", type=int, default=2048, help="CoT generation budget (official: 2048)")

    p = cmd("copy", "helpers.core.writer:cli_copy", "re-write a checkpoint (mirror its shards, or pack to a size)")
    _opt(p, "--model", required=True)
    _opt(p, "--out", required=True)
    _opt(p, "--max-shard-size", default=None, help="pack to this size instead of mirroring")
    _opt(p, "--overwrite", action="store_true")

    p = cmd("compare", "helpers.core.verify:cli_compare", "compare two checkpoints tensor by tensor (sha256)")
    p.add_argument("a")
    p.add_argument("b")

    p = cmd(
        "load-check",
        "helpers.core.verify:cli_load_check",
        "load with AutoModelForCausalLM; fail on any missing/unexpected key",
    )
    p.add_argument("model")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "handler", None):
        ap.print_help()
        return 0
    mod, fn = args.handler.split(":")
    try:
        return int(getattr(importlib.import_module(mod), fn)(args) or 0)
    except (ValueError, OSError, KeyError) as e:
        # Bad input, a busy output or a full disk is a one-line message naming the culprit, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.strerror and not isinstance(e, (FileNotFoundError, FileExistsError)):
            msg = e.strerror if e.filename is None else f"{e.filename}: {e.strerror}"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: nothing was left at the outputs (temp files removed; earlier outputs intact)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""The variants notebook 06 evaluates, found through the earlier notebooks' manifests.

Each manifest names its outputs (shared contract): toy world "mixtral"/"mistral"/"mmlu_pro",
01 "merged", 03 "standard"/"consolidated", 04 "stage_a"/"bundles", 05 "stage_ab"/"stage_full"/
"healed_a"/"thresholds". A missing manifest or output is skipped with a note, never an error, so
the notebook runs on whatever part of the story exists. Notes name paths `results.portable`
(repo-relative under the repo), as summary.md and the manifest record them.

Usage: `vs, notes = collect({"world": "runs/toy/world/manifest.json", "prune": "runs/toy/03_expert_prune"})`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers.core import manifest
from helpers.eval import Plan, evaluate_dir, mmlu_pro, results, speed_of

# (manifest key, output name, variant name, family) in the order tables and plots show them
CHECKPOINTS = (
    ("world", "mixtral", "mixtral_base", "mixtral"),
    ("finetune", "merged", "mixtral_finetuned", "mixtral"),
    ("prune", "standard", "mixtral_pruned_standard", "mixtral"),
    ("prune", "consolidated", "mixtral_pruned_consolidated", "mixtral"),
    ("world", "mistral", "mistral_base", "mistral"),
    ("layer_drop", "stage_a", "mistral_stage_a", "mistral"),
    ("routing", "stage_ab", "mistral_stage_ab", "mistral"),
    ("routing", "stage_full", "mistral_stage_full", "mistral"),
    ("routing", "healed_a", "mistral_healed_a", "mistral"),
)
ROUTED = "mistral_routed"
SPEED_PROMPTS = 10  # cloze prompts the routed variant's speed is measured on
ORDER = [v for _, _, v, _ in CHECKPOINTS] + [ROUTED]


@dataclass
class Variant:
    name: str
    family: str
    path: str | None  # checkpoint dir; None for the routed variant
    parent: str | None  # manifest that produced it
    kind: str = "checkpoint"  # or "routed"
    stage_a: str | None = None
    bundles: str | None = None
    thresholds: str | None = None


def _manifests(paths: dict) -> tuple[dict[str, dict], list[str]]:
    found, notes = {}, []
    for key, p in paths.items():
        if not p:
            notes.append(f"no {key} manifest given")
        elif not (Path(p).is_file() or manifest.resolve(p).is_file()):
            notes.append(f"{key} manifest {results.portable(p)} does not exist (step not run yet)")
        else:
            found[key] = (str(p), manifest.load(p))
    return found, notes


def _output(found: dict, key: str, name: str) -> tuple[str | None, str | None]:
    """(path, reason it is missing)."""
    if key not in found:
        return None, f"{key} manifest missing"
    path, m = found[key]
    out = m.get("outputs", {}).get(name)
    if out is None:
        return None, f"{results.portable(path)} has no output {name!r}"
    on_disk = manifest.resolve(out["path"])  # recorded repo-relative: from the repo root, as is
    if not on_disk.exists():
        return None, f"{results.portable(out['path'])} (output {name!r} of {results.portable(path)}) is not on disk"
    return str(on_disk), None


def collect(paths: dict, models: dict | None = None) -> tuple[list[Variant], list[str]]:
    """Variants reachable from the manifests {world, finetune, prune, layer_drop, routing}; notes for the rest.

    `models` {variant: dir or hub id} adds or overrides variants (e.g. the hub base models when no toy world).
    """
    found, notes = _manifests(paths)
    models = {k: v for k, v in (models or {}).items() if v}
    out = []
    for key, name, variant, family in CHECKPOINTS:
        p, why = (models[variant], None) if variant in models else _output(found, key, name)
        if p:
            out.append(Variant(variant, family, p, found[key][0] if key in found else None))
        else:
            notes.append(f"skipped {variant}: {why}")
    parts = {
        n: _output(found, k, n)
        for k, n in (("layer_drop", "stage_a"), ("layer_drop", "bundles"), ("routing", "thresholds"))
    }
    missing = [f"{n} ({why})" for n, (p, why) in parts.items() if not p]
    if missing:
        notes.append(f"skipped {ROUTED}: needs {', '.join(missing)}")
    else:
        out.append(
            Variant(
                ROUTED,
                "mistral",
                None,
                found["routing"][0],
                "routed",
                parts["stage_a"][0],
                parts["bundles"][0],
                parts["thresholds"][0],
            )
        )
    known = {v for _, _, v, _ in CHECKPOINTS}
    out += [Variant(v, "other", p, None) for v, p in models.items() if v not in known]
    return out, list(dict.fromkeys(notes))


def ordered(names) -> list[str]:
    """Variant names in story order (base, fine-tuned, pruned, stages, healed, routed), others after."""
    names = set(names)
    return [v for v in ORDER if v in names] + sorted(names - set(ORDER))


def table(vs: list[Variant]):
    """The variants as a DataFrame (name, family, kind, path, parent manifest)."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "variant": v.name,
                "family": v.family,
                "kind": v.kind,
                "path": v.path or f"{v.stage_a} + {v.bundles}",
                "from": v.parent,
            }
            for v in vs
        ]
    )


def data_of(world_manifest) -> str | None:
    """The MMLU-Pro dir of the toy world (its "mmlu_pro" output), if there is one."""
    if world_manifest and Path(world_manifest).is_file():
        out = manifest.load(world_manifest).get("outputs", {}).get("mmlu_pro")
        return str(manifest.resolve(out["path"])) if out else None
    return None


# ---- routed -----------------------------------------------------------------------------------
def router_for(v: Variant) -> tuple[dict, object, Callable[[list[str]], list[str]], object]:
    """(stage models {A, AB, FULL} sharing weights, tokenizer, prompts -> stages, thresholds) from `serve.Router`."""
    from helpers.layers import Router

    router = Router.from_dirs(v.stage_a, v.bundles, v.thresholds)
    route = lambda prompts: [str(s) for s in router.route(prompts)[0]]  # noqa: E731
    return router.stages, router.tokenizer, route, router.thresholds


def _prompt(mode: str, shots, plan: Plan) -> Callable:
    if mode == "cot":
        return lambda q: mmlu_pro.cot_prompt(q, shots, plan.cot_shots)
    if mode == "loglik":
        return lambda q: mmlu_pro.loglik_prompt(q, shots, plan.loglik_shots)
    return mmlu_pro.cloze_context


def evaluate_routed(
    v: Variant, out_dir, plan: Plan, data, stages_router=None, progress: bool = True, loaded=None
) -> Path:
    """Score the routed variant: each question goes to the stage its router picks from that mode's prompt.

    `stages_router` = (stage models, tokenizer, prompts -> stages, thresholds); default `router_for(v)`.
    `loaded`: (questions, shots) of `mmlu_pro.load(data)` when the caller has them.
    params = parameters used per question averaged over the stage mix (params_stored: A + bundles).
    """
    stages, tok, choose, th = stages_router or router_for(v)
    questions, shots = loaded or mmlu_pro.load(data)
    tasks = []
    for mode in plan.modes:
        qs = mmlu_pro.take(questions, plan.cot_limit if mode == "cot" else plan.limit)
        prompt = _prompt(mode, shots, plan)
        kw = (
            {
                "k": plan.cot_shots,
                "max_new_tokens": plan.max_new_tokens,
                "max_model_length": plan.max_model_length,
                "text_diagnostic": plan.cot_text,
            }
            if mode == "cot"
            else ({"k": plan.loglik_shots} if mode == "loglik" else {})
        )
        tasks += mmlu_pro.route_and_score(
            stages,
            tok,
            qs,
            lambda qq, prompt=prompt: choose([prompt(q) for q in qq]),  # called within this mode's pass
            mode=mode,
            shots=shots,
            batch_size=plan.batch_size,
            progress=progress,
            **kw,
        )
    n_params = {s: sum(p.numel() for p in m.parameters()) for s, m in stages.items()}
    mix = tasks[0].extra["stage_mix"] if tasks else {}
    total = sum(mix.values()) or 1
    expected = sum(n_params[s] * c for s, c in mix.items()) / total if mix else None
    dtype = str(next(stages["A"].parameters()).dtype).removeprefix("torch.")
    cfg = results.config_block(
        v.stage_a,
        v.name,
        parent_manifest=v.parent,
        dtype=dtype,
        weights=[v.stage_a, v.bundles],
        data=str(data),
        plan=asdict(plan),
        thresholds=v.thresholds,
        bundles=v.bundles,
        params_per_stage=n_params,
    )
    cfg["params_stored"], cfg["params"] = cfg["params"], int(expected) if expected else cfg["params"]
    speed = _routed_speed(stages, tok, th, questions, plan, progress) if plan.speed else None
    return results.write_results(out_dir, cfg, tasks, speed)


def _routed_speed(stages, tok, th, questions, plan: Plan, progress: bool) -> dict:
    """Routed throughput measured end to end (routing pass included) on SPEED_PROMPTS cloze prompts, beside
    FULL, A and the ideal on the same prompts (`layers.measure_routed`); memory from FULL's speed probe."""
    from helpers.layers import batches_of, chooser, describe_routed, measure_routed

    prompts = [mmlu_pro.cloze_context(q) for q in mmlu_pro.take(questions, SPEED_PROMPTS)]
    m = measure_routed(
        stages, batches_of(tok, prompts), chooser(th), new_tokens=plan.speed_new_tokens, progress=progress
    )
    full = speed_of(stages["FULL"], plan)
    return {
        "prefill_tok_s": None,  # end to end only: prefill, routing and decode are one measured time here
        "decode_tok_s": m["tok_s"]["routed"],
        "peak_memory_bytes": full["peak_memory_bytes"],
        "memory_kind": full["memory_kind"],
        "device": full["device"],
        "routed": m,
        "note": describe_routed(m),
    }


# ---- all ----------------------------------------------------------------------------------------
def evaluate_all(
    variants: list[Variant],
    out_root,
    plan: Plan,
    data,
    lighteval_variants=(),
    dtype=None,
    progress: bool = True,
    routed_hook=None,
) -> tuple[list[str], list[str]]:
    """Evaluate every variant into `<out_root>/<name>/results.json`; returns (done, notes).

    `dtype`: one for all, or {family: dtype} (e.g. {"mixtral": "4bit", "mistral": "bfloat16"}); None = default.
    LightEval runs only on `lighteval_variants`. `routed_hook(variant)` may replace router_for.
    The data is read once for all variants.
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as tlog

    loaded = mmlu_pro.load(data) if variants else None
    done, notes = [], []
    no_le = Plan(**{**asdict(plan), "lighteval_modes": ()})
    tlog.disable_progress_bar()  # one bar over variants, not one per weight load
    bar = tqdm(variants, desc="variants", disable=not progress)
    try:
        for v in bar:
            bar.set_postfix_str(v.name)
            out = Path(out_root) / v.name
            fam_dtype = dtype.get(v.family) if isinstance(dtype, dict) else dtype
            try:
                if v.kind == "routed":
                    evaluate_routed(
                        v, out, no_le, data, routed_hook(v) if routed_hook else None, progress=False, loaded=loaded
                    )
                else:
                    evaluate_dir(
                        v.path,
                        out,
                        plan if v.name in lighteval_variants else no_le,
                        data=data,
                        variant=v.name,
                        dtype=fam_dtype,
                        parent_manifest=v.parent,
                        progress=False,
                        loaded=loaded,
                    )
                done.append(v.name)
            except ImportError as e:  # an optional dependency this machine lacks (bitsandbytes for 4bit)
                notes.append(f"skipped {v.name}: {e}")
    finally:
        tlog.enable_progress_bar()
    return done, notes

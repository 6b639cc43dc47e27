"""Notebook 06 end to end on manifests that point at tiny random checkpoints (the earlier steps faked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.benchmarks import suite, variants
from helpers.core.manifest import Manifest
from helpers.core.models import load_model
from helpers.core.writer import copy_checkpoint
from helpers.eval import mmlu_pro, results
from helpers.eval.run import Plan
from helpers.layers.routing import Thresholds
from helpers.toy import synth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory, tiny_mixtral, tiny_mixtral_fused, tiny_mistral, tiny_mmlu):
    """Manifests of the toy world and steps 01, 03, 04, 05 with the output names notebook 06 reads."""
    root = tmp_path_factory.mktemp("runs")
    m = {}
    m["world"] = (
        Manifest("toy")
        .output("mixtral", tiny_mixtral)
        .output("mistral", tiny_mistral)
        .output("mmlu_pro", tiny_mmlu)
        .save(root / "world")
    )
    m["finetune"] = Manifest("01_finetune_mixtral").output("merged", tiny_mixtral_fused).save(root / "01")
    std = copy_checkpoint(tiny_mixtral, root / "03" / "standard")
    cons = copy_checkpoint(tiny_mixtral, root / "03" / "consolidated", max_shard_size="30KB")
    m["prune"] = Manifest("03_expert_prune").output("standard", std).output("consolidated", cons).save(root / "03")
    a = synth.save_random(synth.tiny_config("mistral", num_hidden_layers=6), root / "04" / "A", n_shards=2, seed=4)
    m["layer_drop"] = Manifest("04_layer_drop_mistral").output("stage_a", a).save(root / "04")  # no bundles: no routed
    ab = synth.save_random(synth.tiny_config("mistral", num_hidden_layers=7), root / "05" / "AB", n_shards=2, seed=5)
    m["routing"] = (
        Manifest("05_bundles_and_routing")
        .output("stage_ab", ab)
        .output("stage_full", tiny_mistral)
        .output("healed_a", a)
        .save(root / "05")
    )
    return {k: str(v) for k, v in m.items()}


def test_collect_finds_variants_and_notes_the_missing(fake_runs, tmp_path):
    found, notes = variants.collect({**fake_runs, "routing": str(tmp_path / "nope.json")})
    names = [v.name for v in found]
    assert names == [
        "mixtral_base",
        "mixtral_finetuned",
        "mixtral_pruned_standard",
        "mixtral_pruned_consolidated",
        "mistral_base",
        "mistral_stage_a",
    ]
    assert any("routing manifest" in n and "does not exist" in n for n in notes)
    assert any(n.startswith("skipped mistral_stage_ab") for n in notes)
    assert any(n.startswith("skipped mistral_routed: needs bundles") for n in notes)
    assert variants.data_of(fake_runs["world"]) == str(
        Path(json.loads(Path(fake_runs["world"]).read_text())["outputs"]["mmlu_pro"]["path"])
    )


def test_notes_name_repo_paths_relative(fake_runs):
    """summary.md and the manifest carry the notes: a path under the repo is named relative to it."""
    missing = ROOT / "runs" / "no-such-step" / "manifest.json"
    _, notes = variants.collect({**fake_runs, "routing": str(missing)})
    assert "routing manifest runs/no-such-step/manifest.json does not exist (step not run yet)" in notes
    assert not any(str(ROOT) in n for n in notes)


def test_routed_variant_with_injected_router(fake_runs, tiny_mistral, tiny_mmlu, tmp_path):
    a, tok = load_model(json.loads(Path(fake_runs["layer_drop"]).read_text())["outputs"]["stage_a"]["path"])
    full, _ = load_model(tiny_mistral)
    v = variants.Variant(
        variants.ROUTED,
        "mistral",
        None,
        fake_runs["routing"],
        "routed",
        stage_a=str(Path(fake_runs["layer_drop"]).parent / "A"),
        bundles=str(tiny_mistral),
        thresholds=None,
    )
    choose = lambda prompts: ["A" if len(p) % 2 else "FULL" for p in prompts]  # noqa: E731
    plan = Plan(modes=("cloze",), limit=6, speed_prompt_tokens=8, speed_new_tokens=2)
    th = Thresholds(1.0, 1.0, "manual", None, 0, "")  # for the speed run: A below 1 nat, else FULL
    path = variants.evaluate_routed(
        v, tmp_path / "routed", plan, tiny_mmlu, ({"A": a, "FULL": full}, tok, choose, th), progress=False
    )
    doc = json.loads(path.read_text())
    qs, _ = mmlu_pro.load(tiny_mmlu, limit=6)
    want = [("A" if len(mmlu_pro.cloze_context(q)) % 2 else "FULL") for q in qs]
    assert [r["stage"] for r in results.read_samples(tmp_path / "routed", "mmlu_pro_cloze")] == want
    mix = doc["results"]["mmlu_pro_cloze"]["stage_mix"]
    assert mix == {s: want.count(s) for s in sorted(set(want))}
    n = doc["config"]["params_per_stage"]
    assert doc["config"]["params"] == int((n["A"] * mix.get("A", 0) + n["FULL"] * mix.get("FULL", 0)) / 6)
    sp = doc["speed"]  # measured end to end on the same prompts, not estimated from a mix
    assert (
        sp["routed"]["prompts"] == min(variants.SPEED_PROMPTS, len(mmlu_pro.load(tiny_mmlu)[0]))
        and sp["routed"]["new_tokens_per_prompt"] == 2
    )
    assert sp["decode_tok_s"] == sp["routed"]["tok_s"]["routed"] > 0 and sp["note"].startswith("measured end to end")
    assert set(sp["routed"]["tok_s"]) == {"FULL", "A", "ideal", "routed"}
    assert "- routed: measured end to end" in results.summary_markdown(tmp_path)  # dir name = variant


@pytest.mark.slow
def test_notebook_06_runs_on_fake_manifests(fake_runs, tmp_path):
    import papermill as pm

    out = tmp_path / "eval_results" / "smoke"
    params = dict(
        PRESET="smoke",
        RUN_DIR=str(tmp_path / "06"),
        WORLD_MANIFEST=fake_runs["world"],
        FINETUNE_MANIFEST=fake_runs["finetune"],
        PRUNE_MANIFEST=fake_runs["prune"],
        LAYER_DROP_MANIFEST=fake_runs["layer_drop"],
        ROUTING_MANIFEST=fake_runs["routing"],
        EVAL_ROOT=str(out),
        LIMIT=6,
        COT_LIMIT=2,
        MAX_MODEL_LENGTH=128,  # the fake models' context
        MAX_NEW_TOKENS=4,
        BATCH_SIZE=8,
        LIGHTEVAL_LIMIT=3,
        LIGHTEVAL_VARIANTS=["mistral_base"],
        SPEED_PROMPT_TOKENS=8,
        SPEED_NEW_TOKENS=2,
    )
    pm.execute_notebook(
        str(ROOT / "notebooks" / "06_benchmarks.ipynb"),
        str(tmp_path / "06.ipynb"),
        parameters=params,
        kernel_name="pruning-lab",
        cwd=str(ROOT),
        progress_bar=False,
    )
    docs = results.load_all(out)
    assert set(docs) == {
        "mixtral_base",
        "mixtral_finetuned",
        "mixtral_pruned_standard",
        "mixtral_pruned_consolidated",
        "mistral_base",
        "mistral_stage_a",
        "mistral_stage_ab",
        "mistral_stage_full",
        "mistral_healed_a",
    }
    assert set(docs["mistral_base"]["results"]) == {
        "mmlu_pro_cloze",
        "mmlu_pro_cloze_norm",
        "mmlu_pro_loglik",
        "mmlu_pro_cot",
        "mmlu_pro_cot_text",
        "lighteval_loglik",
    }
    cot = docs["mistral_base"]["results"]["mmlu_pro_cot"]
    assert (cot["max_model_length"], cot["max_new_tokens"], cot["n"]) == (128, 4, 2) and "acc_random_fill" in cot
    assert all(
        {"n_shots", "prompt_sha256"} <= set(r) for r in results.read_samples(out / "mistral_base", "mmlu_pro_cot")
    )
    # the two layouts of one pruned model: every option score equal
    for task in ("mmlu_pro_cloze", "mmlu_pro_loglik", "mmlu_pro_cot"):
        a = results.read_samples(out / "mixtral_pruned_standard", task)
        b = results.read_samples(out / "mixtral_pruned_consolidated", task)
        assert [r["output"] for r in a] == [r["output"] for r in b]
    ag = results.agreement(out / "mistral_base", "mmlu_pro_loglik", "lighteval_loglik")
    assert ag["questions"] == 3 and ag["same_prediction"] == 3
    summary = (out / "summary.md").read_text()
    assert "skipped mistral_routed" in summary and "| mistral_stage_ab |" in summary
    assert "acc_random_fill" in summary and "NOT the official metric" in summary
    assert {p.name for p in (out / "figures").iterdir()} == {f"{f}.png" for f in suite.FIGURES}
    m = json.loads((tmp_path / "06" / "manifest.json").read_text())
    assert m["metrics"]["accuracy"]["mmlu_pro_cloze"].keys() == set(docs)

"""The whole story headless: notebooks 01-06 chained through the runner on the smoke preset.

Asserts on the manifests each notebook writes (never on printed output): each step read the
previous step's outputs, and the identities the notebooks report hold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import runner
from helpers.core.checkpoint import Checkpoint
from helpers.core.manifest import load, output_path
from helpers.core.models import load_check
from helpers.core.verify import compare
from helpers.experts.view import expert_layout

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    done = runner.run("smoke", out=str(out), root=ROOT)
    return out, done


def _m(out: Path, stem: str) -> dict:
    return load(out / stem / "manifest.json")


def test_every_notebook_executed_with_html_reports(story):
    out, done = story
    assert [p.stem for p in done] == [p.stem for p in runner.notebooks(ROOT)]
    for p in done:  # (a failing cell already stopped the runner)
        assert p.with_suffix(".html").stat().st_size > 10_000
    assert set(json.loads((out / "notebooks/run.json").read_text())["timings_s"]) == {p.stem for p in done}


def test_finetune_reaches_experts(story):
    out, _ = story
    m = _m(out, "01_finetune_mixtral")
    base, merged = Path(m["inputs"]["base"]["path"]), output_path(m, "merged")
    assert base == output_path(load(m["inputs"]["world"]["path"]), "mixtral")  # the world's Mixtral
    assert {"adapter", "merged", "loss_curve"} <= set(m["outputs"])
    assert all(Path(o["path"]).exists() for o in m["outputs"].values())
    assert (output_path(m, "adapter") / "adapter_config.json").exists()
    assert m["inputs"]["base"]["sha256"] and m["outputs"]["merged"]["sha256"]  # HASH_CHECKPOINTS defaults on
    assert m["metrics"]["changed"]["router"] == 0 and m["metrics"]["changed"]["expert w2"] > 0
    diff = compare(base, merged)
    assert not diff.only_a and not diff.only_b
    assert any(".experts." in n for n in diff.differ) and any("self_attn" in n for n in diff.differ)
    assert not any("gate.weight" in n and "experts" not in n for n in diff.differ)  # router untouched
    load_check(merged)


def test_expert_scores(story):
    out, _ = story
    m1, m2 = _m(out, "01_finetune_mixtral"), _m(out, "02_expert_heatmaps")
    assert m2["inputs"]["merged"]["path"] == str(output_path(m1, "merged"))  # chained through the manifest
    assert m2["metrics"]["delta_adapter_vs_checkpoints_max_rel_diff"] < 1e-4
    scores = json.loads(output_path(m2, "scores").read_text())
    assert {"delta_l2", "delta_l2_w1", "frequency", "reap", "uniqueness", "random"} <= set(scores["criteria"])
    assert scores["fingerprint"] == expert_layout(Checkpoint(m1["inputs"]["base"]["path"]).config)
    assert scores["meta"]["calib"] == "toy" and scores["meta"]["world"] == m1["inputs"]["world"]["path"]  # 01's world
    assert m2["metrics"]["n_calib_tokens"] > 0
    assert {p.name for p in output_path(m2, "figures").glob("*.png")} == {
        "heatmaps.png",
        "distances.png",
        "rank_agreement.png",
    }


def test_pruned_layouts(story):
    out, _ = story
    m1, m2, m3 = (_m(out, s) for s in ("01_finetune_mixtral", "02_expert_heatmaps", "03_expert_prune"))
    scores = json.loads(output_path(m2, "scores").read_text())
    plan = json.loads(output_path(m3, "plan").read_text())
    k, grid = m3["params"]["KEEP"], np.asarray(scores["criteria"][m3["params"]["CRITERION"]])
    assert plan["keep"] == {str(l): sorted(np.argsort(-row, kind="stable")[:k].tolist()) for l, row in enumerate(grid)}
    assert plan["fingerprint"] == scores["fingerprint"] and plan["criterion"] == "delta_l2"
    std, con = output_path(m3, "standard"), output_path(m3, "consolidated")
    assert compare(std, con).equal and m3["metrics"]["layouts_identical"] is True
    assert len(Checkpoint(std).shards) == len(Checkpoint(output_path(m1, "merged")).shards)
    assert len(Checkpoint(con).shards) != len(Checkpoint(std).shards)
    assert m3["metrics"]["logit_max_abs_diff"] <= 1e-5
    assert m3["metrics"]["bytes_after"] < m3["metrics"]["bytes_before"]
    keep = plan["keep"]
    assert load_check(con).config.num_local_experts == len(keep["0"]) == k


def test_layer_drop_bundles_and_routing(story):
    out, _ = story
    m4, m5 = _m(out, "04_layer_drop_mistral"), _m(out, "05_bundles_and_routing")
    a, bundles = output_path(m4, "stage_a"), output_path(m4, "bundles")
    L, La = m4["metrics"]["n_layers"], m4["metrics"]["n_layers_a"]
    assert Checkpoint(a).config["num_hidden_layers"] == La == L - round(0.25 * L)
    assert all(len(v) >= 2 for v in m4["metrics"]["bundles"].values()) and len(m4["metrics"]["bundles"]) == 2
    assert m5["inputs"]["stage_a"]["path"] == str(a) and m5["inputs"]["bundles"]["path"] == str(bundles)
    assert compare(Path(m5["inputs"]["base"]["path"]), output_path(m5, "stage_full")).equal
    assert m5["metrics"]["full_max_abs_logit_diff"] == 0.0
    th = json.loads(output_path(m5, "thresholds").read_text())
    assert th and output_path(m5, "healed_a").is_dir()


def test_benchmarks_cover_every_variant(story):
    out, _ = story
    m6 = _m(out, "06_benchmarks")
    variants = m6["metrics"]["variants"]
    assert {
        "mixtral_base",
        "mixtral_finetuned",
        "mixtral_pruned_standard",
        "mixtral_pruned_consolidated",
        "mistral_base",
        "mistral_stage_a",
        "mistral_stage_ab",
        "mistral_stage_full",
        "mistral_healed_a",
        "mistral_routed",
    } <= set(variants)
    summary = output_path(m6, "summary").read_text()
    for v in variants:
        assert f"| {v} |" in summary
        doc = json.loads((output_path(m6, "eval_results") / v / "results.json").read_text())
        assert {"mmlu_pro_cloze", "mmlu_pro_loglik", "mmlu_pro_cot"} <= set(doc["results"])
    figures = {p.name for p in (output_path(m6, "eval_results") / "figures").glob("*.png")}
    assert figures == {"accuracy.png", "categories.png", "accuracy_vs_params.png", "speed.png", "stage_mix.png"}
    acc = m6["metrics"]["accuracy"]["mmlu_pro_cloze"]
    assert acc["mixtral_pruned_standard"] == acc["mixtral_pruned_consolidated"]
    assert acc["mistral_stage_full"] == acc["mistral_base"]

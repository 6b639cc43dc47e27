"""Notebooks 02 and 03 end to end through papermill on a tiny fine-tuned Mixtral (smoke preset)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from peft import LoraConfig, get_peft_model

from helpers import synth
from helpers import expert_scores as xs
from helpers.checkpoint import Checkpoint
from helpers.verify import compare, load_check
from helpers.experts import fingerprint
from helpers.manifest import Manifest, load, output_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(stem: str, out_dir: Path, **overrides) -> dict:
    import papermill as pm

    params = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())["notebooks"][stem[:2]]
    params.update(PRESET="smoke", RUN_DIR=str(out_dir), **overrides)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    old = os.environ.copy()
    os.environ.update(env)
    try:
        pm.execute_notebook(str(ROOT / "notebooks" / f"{stem}.ipynb"), str(out_dir / f"{stem}.ipynb"),
                            parameters=params, kernel_name="pruning-lab", cwd=str(ROOT), progress_bar=False)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return load(out_dir / "manifest.json")


@pytest.fixture(scope="module")
def finetune_manifest(tmp_path_factory, tiny_mixtral):
    """What notebook 01 leaves behind: an expert LoRA adapter, the merged model, a manifest naming the base."""
    root = tmp_path_factory.mktemp("nb01")
    cfg = synth.tiny_config("mixtral")
    lc = LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                    target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(synth.random_model(cfg, seed=2), lc)
    model.save_pretrained(root / "adapter")
    synth.save_random(cfg, root / "merged", n_shards=3, model=model.merge_and_unload())
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["question : what is 3 plus 4 ? answer : 7 .", "count the letters in apple",
                              "sort these words : pear , fig , kiwi", "the next letter after c is d ."]))
    m = Manifest("01_finetune_mixtral", {"MODEL": str(tiny_mixtral)}).input("model", tiny_mixtral)
    m.output("adapter", root / "adapter").output("merged", root / "merged")
    return m.save(root / "run"), calib


def test_notebooks_02_and_03(tmp_path, finetune_manifest, tiny_mixtral):
    manifest01, calib = finetune_manifest
    m02 = _run("02_expert_heatmaps", tmp_path / "02", FINETUNE_MANIFEST=str(manifest01), CALIB=str(calib))
    scores = xs.load_scores(output_path(m02, "scores"))
    assert scores["fingerprint"] == fingerprint(Checkpoint(tiny_mixtral).config)
    assert {"delta_l2", "delta_l2_w1", "frequency", "reap", "uniqueness", "random"} <= set(scores["criteria"])
    assert m02["metrics"]["delta_adapter_vs_checkpoints_max_rel_diff"] < 1e-4
    assert {p.name for p in output_path(m02, "figures").glob("*.png")} == {"heatmaps.png", "distances.png",
                                                                            "rank_agreement.png"}

    m03 = _run("03_expert_prune", tmp_path / "03", SCORES_MANIFEST=str(tmp_path / "02" / "manifest.json"))
    plan = json.loads(output_path(m03, "plan").read_text())
    grid = np.asarray(scores["criteria"]["delta_l2"])
    assert plan["keep"] == {str(l): sorted(np.argsort(-row, kind="stable")[:4].tolist()) for l, row in enumerate(grid)}
    std, con = output_path(m03, "standard"), output_path(m03, "consolidated")
    assert m03["metrics"]["layouts_identical"] is True and compare(std, con).equal
    assert m03["metrics"]["logit_max_abs_diff"] <= 1e-5
    assert load_check(con).config.num_local_experts == 4
    assert m03["metrics"]["bytes_after"] < m03["metrics"]["bytes_before"]
    assert plan["fingerprint"] == scores["fingerprint"] and plan["criterion"] == "delta_l2"

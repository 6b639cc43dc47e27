"""Every kind of output loads in transformers 4.57.6 as in 5.x: same token ids, logits equal.

transformers 4.57.6, tokenizers 0.22.2 and huggingface-hub 0.36.2 are installed once with
`pip install --no-deps --target` into a side directory (under the repo's .venv when there is one,
else the temp dir) and put first on PYTHONPATH of a subprocess that imports nothing of this repo.
Outputs: pruned standard and consolidated, stage A, AB, FULL, healed (stage A + LoRA, merged),
merged (Mixtral + LoRA). The test is skipped only when the package registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.core.manifest import ROOT
from helpers.toy import synth

PINS = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2"]
TEXT = "The answer is (B) because 12 + 7 = 19."
NETWORK = ("connection", "network", "temporary failure", "name resolution", "timed out", "proxy", "unreachable")

LOAD_457 = r"""
import json, sys, numpy as np, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
assert transformers.__version__ == "4.57.6", transformers.__version__
out = {}
for name, path in json.loads(sys.argv[1]).items():
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(sys.argv[2])["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    np.save(f"{sys.argv[3]}/{name}.npy", logits)
    out[name] = {"ids": ids, "rope_theta": getattr(model.config, "rope_theta", None)}
print(json.dumps(out))
"""


def side_dir() -> Path:
    venv = ROOT / ".venv"
    base = venv if venv.is_dir() and os.access(venv, os.W_OK) else Path(tempfile.gettempdir())
    d = base / "side" / "transformers-4.57.6"
    if not (d / "transformers" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(d), *PINS]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            if any(w in r.stderr.lower() for w in NETWORK):
                pytest.skip(f"PACKAGE REGISTRY UNREACHABLE, transformers 4.57.6 not installed: {r.stderr[-300:]}")
            raise AssertionError(f"pip install {' '.join(PINS)} failed: {r.stderr[-2000:]}")
    return d


def _adapter(base_dir: Path, out: Path, targets: list[str]) -> Path:
    """A LoRA adapter with non-zero B (so merging changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from helpers.experts.prune import apply_expert_prune
    from helpers.finetune.merge import merge_adapter
    from helpers.layers import bundles
    from helpers.layers.drop import apply_layer_drop, plan_layer_drop

    root = tmp_path_factory.mktemp("compat")
    mistral = synth.save_random(synth.tiny_config("mistral", rope_theta=50000.0), root / "mistral", n_shards=2, seed=4)
    cfg = json.loads((mistral / "config.json").read_text())
    a, b = apply_layer_drop(mistral, plan_layer_drop(cfg, None, layers="2-5"), root / "A", root / "bundles")
    out = {"stage_a": a}
    for stage in ("AB", "FULL"):
        out[f"stage_{stage.lower()}"] = bundles.assemble(a, b, stage, root / stage)
    heal = _adapter(a, root / "heal_adapter", ["q_proj", "v_proj"])
    out["healed"] = merge_adapter(a, heal, root / "healed")
    mixtral = synth.save_random(synth.tiny_config("mixtral"), root / "mixtral", n_shards=2, seed=5)
    rec = apply_expert_prune(mixtral, {"keep": {str(l): [1, 3, 4, 6] for l in range(4)}}, root / "pruned", "both")
    out.update({f"pruned_{k}": Path(v) for k, v in rec["paths"].items()})
    out["merged"] = merge_adapter(mixtral, _adapter(mixtral, root / "mx_adapter", ["q_proj"]), root / "merged")
    return {k: str(v) for k, v in out.items()}


def test_every_output_loads_in_transformers_457(outputs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    side = side_dir()
    env = {**os.environ, "PYTHONPATH": str(side), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", LOAD_457, json.dumps(outputs), TEXT, str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    old = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(old) == sorted(outputs)
    for name, path in outputs.items():
        ids = AutoTokenizer.from_pretrained(path)(TEXT)["input_ids"]
        assert old[name]["ids"] == ids, name
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].numpy()
        diff = float(np.abs(np.load(tmp_path / f"{name}.npy") - logits).max())
        assert diff < 1e-5, (name, diff)
        if name.startswith(("stage", "healed")):  # the non-default RoPE base reaches 4.57 too
            assert old[name]["rope_theta"] == 50000.0, (name, old[name])

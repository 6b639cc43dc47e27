"""Memory plan (helpers.core.memplan, `python -m helpers plan`): weight bytes equal what bitsandbytes holds,
the real configs' plans (offline fallback configs, meta device) and the refusal when the GPUs are too small."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.core import memplan, models, moe

MIXTRAL, MISTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1", "mistralai/Mistral-7B-v0.1"


def _bnb_meta(config):
    """The real model on meta as transformers' bitsandbytes integration converts it (per-expert experts)."""
    from transformers import BitsAndBytesConfig
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    m = memplan.meta_model(config, per_expert=True)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    return replace_with_bnb_linear(m, modules_to_not_convert=["lm_head"], quantization_config=q)


def test_tiny_plan_equals_a_real_4bit_load(tiny_mixtral):
    """nf4 bytes as planned = the loaded model's parameters plus every quant-state tensor bitsandbytes holds."""
    m, _ = models.load_model(tiny_mixtral, dtype="4bit", device="cpu")
    held = sum(p.numel() * p.element_size() for p in m.parameters())
    for mod in m.modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            held += sum(t.numel() * t.element_size() for t in parts)
    row = memplan.plan_row("01", tiny_mixtral, mode="qlora", batch=1, seq=8)
    assert row["weights_bytes"] == held


@pytest.mark.parametrize("model, n4", [(MIXTRAL, 32 * (8 * 3 + 4)), (MISTRAL, 32 * 7)])
def test_real_config_weights_equal_the_meta_models(model, n4):
    config = memplan.load_config(model)  # HF_HUB_OFFLINE: the shipped fallback
    m = _bnb_meta(config)
    lin4 = [(n, x) for n, x in m.named_modules() if type(x).__name__ == "Linear4bit"]
    assert len(lin4) == n4  # Mixtral: 768 expert Linear4bit + 128 attention = 896
    q = {n for n, _ in lin4}
    by_meta = sum(
        memplan.nf4_bytes(p.numel()) if n.rsplit(".", 1)[0] in q else p.numel() * 2 for n, p in m.named_parameters()
    )
    nf4 = memplan.plan_row("01", model, mode="qlora", batch=4, seq=1024)
    assert nf4["weights_bytes"] == by_meta
    bf16 = memplan.plan_row("02", model, mode="forward", batch=1, seq=8)
    n_params = sum(p.numel() for p in memplan.meta_model(config).parameters())
    assert bf16["weights_bytes"] == 2 * n_params
    if model == MIXTRAL:  # the figures: 24.5 GB nf4 (experts included), 93.4 GB bf16
        assert 24e9 < nf4["weights_bytes"] <= 26e9 and 93e9 < bf16["weights_bytes"] < 94e9
        assert len(moe.expert_linears(m)) == 768


def test_gpu_preset_plan_json():
    cmd = [sys.executable, "-m", "helpers", "plan", "--preset", "gpu", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert {r["notebook"] for r in rows} == {"01", "02", "03", "04", "05", "06"}
    assert all({"notebook", "model", "weights_bytes", "total_bytes"} <= set(r) for r in rows)
    (r01,) = [r for r in rows if r["notebook"] == "01"]
    assert r01["model"] == MIXTRAL and (r01["batch"], r01["seq"]) == (4, 1024)
    assert r01["weights_bytes"] <= 26e9 and r01["total_bytes"] <= 40e9  # one 48 GB GPU holds QLoRA
    (r03,) = [r for r in rows if r["notebook"] == "03"]
    assert r03["mode"] == "stream" and r03["weights_bytes"] < 8e9  # two layers + embeddings/heads, not two models


def test_check_refuses_in_one_line(capsys):
    row = memplan.plan_row("04", MISTRAL, mode="forward", batch=16, seq=512)
    assert memplan.check(row, available=0) is row  # CPU: printed only
    assert capsys.readouterr().out.startswith("[plan 04] mistralai/Mistral-7B-v0.1 forward")
    with pytest.raises(MemoryError) as e:
        memplan.check(row, available=row["total_bytes"] - 1)
    assert "\n" not in str(e.value) and "weights 14.5 GB" in str(e.value) and "visible GPUs hold" in str(e.value)
    memplan.check(row, available=row["total_bytes"])


def test_activations_grow_with_batch_and_checkpointing_saves():
    c = memplan.load_config(MIXTRAL)
    a1, a4 = (memplan.activation_bytes(c, b, 1024, train=True) for b in (1, 4))
    assert a4 == 4 * a1
    assert memplan.activation_bytes(c, 4, 1024, train=True, checkpointing=False) > 3 * a4
    assert memplan.kv_bytes(c, 1, 1) == 2 * 32 * 8 * 128 * 2

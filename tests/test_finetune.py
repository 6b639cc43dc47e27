"""LoRA fine-tuning: presets, the LoRA reaching the fused experts, merge exactness, QLoRA kwargs.

Notebook 01 itself runs in tests/test_notebooks.py (the smoke story)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import finetune
from helpers.core import arch, models, verify
from helpers.core.checkpoint import Checkpoint
from helpers.experts import scores as xs

ATTN_RE = r"self_attn\.[qkvo]_proj\.weight$"


def sft_rows(tok, n: int = 24) -> list[dict]:
    """Chat rows of a tiny arithmetic task, checked to render through the fixture's chat template."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {a} plus {b} ?"},
                {"role": "assistant", "content": f"the answer is {a + b} ."},
            ]
        }
        for a in range(6)
        for b in range(4)
    ][:n]
    text = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert "[INST] what is 0 plus 0 ? [/INST]" in text and text.endswith("</s>")
    return rows


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _names(ck_dir, pattern: str) -> set[str]:
    import re

    return {n for n in Checkpoint(ck_dir).keys() if re.search(pattern, n)}


@pytest.fixture(scope="module")
def mixtral_run(tmp_path_factory, tiny_mixtral):
    """mixtral-experts LoRA trained for a few steps on the tiny Mixtral, and its merged checkpoint."""
    out = tmp_path_factory.mktemp("ft")
    rows = sft_rows(_tok(tiny_mixtral))
    res = finetune.train_lora(
        tiny_mixtral,
        rows,
        out / "adapter",
        preset="mixtral-experts",
        steps=6,
        lr=1e-2,
        r=4,
        alpha=8,
        batch_size=4,
        grad_accum=1,
        max_length=48,
        eval_dataset=rows[:8],
        logging_steps=1,
    )
    merged = finetune.merge_adapter(tiny_mixtral, res.adapter_dir, out / "merged")
    return tiny_mixtral, res, merged


# ---- presets --------------------------------------------------------------------------------
def test_mistral_healing_preset_is_the_seed_recipe():
    p = finetune.get_preset("mistral-healing")
    assert (set(p.targets), p.target_parameters, p.r, p.alpha, p.lr) == (
        {"q_proj", "k_proj", "v_proj", "o_proj"},
        (),
        4,
        4,
        3e-6,
    )
    cfg = finetune.lora_config(p)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"} and cfg.r == 4 and cfg.lora_alpha == 4
    assert not cfg.target_parameters


def test_ffn_healing_preset_is_the_papers():
    p = finetune.get_preset("ffn-healing")
    assert set(p.targets) == {"gate_proj", "up_proj", "down_proj"} and p.alpha == p.r
    assert (p.dropout, p.scheduler, p.warmup_steps, p.lr, p.r) == (0.05, "cosine", 100, 3e-6, 4)
    assert p.batch_size * p.grad_accum == 16


def test_mixtral_preset_targets_attention_and_fused_experts():
    cfg = finetune.lora_config(finetune.get_preset("mixtral-experts"))
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert list(cfg.target_parameters) == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert cfg.lora_dropout == 0.0  # ParamWrapper refuses dropout


def test_overrides_replace_fields(tmp_path):
    p = finetune.get_preset("ffn-healing", steps=20, lr=1e-3, targets="up_proj")
    assert (p.steps, p.lr, p.targets, p.r) == (20, 1e-3, ("up_proj",), 4)
    from trl import SFTConfig

    args = SFTConfig(**finetune.sft_kwargs(p, tmp_path, quantize=None, dev="cpu"))  # CPU: trl needs use_cpu
    assert (args.max_steps, args.learning_rate, args.use_cpu, args.bf16, args.gradient_checkpointing) == (
        20,
        1e-3,
        True,
        False,
        False,
    )
    gpu = finetune.sft_kwargs(p, tmp_path, quantize="4bit", dev="cuda")  # SFTConfig refuses bf16 without a GPU
    assert (gpu["use_cpu"], gpu["bf16"], gpu["activation_checkpointing"]) == (False, True, True)


# ---- training reaches the experts; merge is exact --------------------------------------------
def test_training_lowers_loss(mixtral_run):
    _, res, _ = mixtral_run
    m = res.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["final_loss"] < m["first_loss"]
    assert len(res.losses) == 6
    assert res.preset["warmup_steps"] == 0  # 30 clamped to steps // 10
    evals = [(h["step"], h["eval_loss"]) for h in res.log_history if "eval_loss" in h]
    assert evals == [(0, m["eval_loss_before"]), (6, m["eval_loss_after"])]
    on_disk = json.loads((res.adapter_dir / "log_history.json").read_text())
    assert [h.get("loss") for h in on_disk] == [h.get("loss") for h in res.log_history]


def test_adapter_holds_per_expert_factors(mixtral_run):
    base, res, _ = mixtral_run
    cfg = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(finetune.FUSED_EXPERTS)
    E = Checkpoint(base).config["num_local_experts"]
    with safe_open(str(res.adapter_dir / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # one rank-4 factor pair per expert: A rows = r * E for both fused stacks of every layer
    fused_a = [s for k, s in shapes.items() if "mlp.experts" in k and "lora_A" in k]
    assert len(fused_a) == 2 * Checkpoint(base).config["num_hidden_layers"]
    assert all(s[0] == 4 * E for s in fused_a)


def test_merged_changes_exactly_experts_and_attention(mixtral_run):
    base, _, merged = mixtral_run
    c = verify.compare(base, merged)
    assert not c.only_a and not c.only_b  # legacy expert keys, same names as the base
    experts = {n for n in Checkpoint(base).keys() if arch.LEGACY_EXPERT_RE.match(n)}
    attention = _names(base, ATTN_RE)
    assert experts and attention
    assert set(c.differ) == experts | attention  # routers, norms, embeddings byte-identical
    assert not set(c.differ) & _names(base, r"block_sparse_moe\.gate\.weight$")


def test_delta_summary_separates_router_from_experts(mixtral_run):
    base, _, merged = mixtral_run
    d = finetune.delta_summary(base, merged).set_index("kind")
    for k in ("expert w1", "expert w2", "expert w3", "attention"):
        assert d.loc[k, "changed"] == d.loc[k, "tensors"] and d.loc[k, "mean_rel_delta"] > 0
    assert d.loc["router", "changed"] == 0 and d.loc["router", "max_rel_delta"] == 0.0
    assert d.loc["other", "changed"] == 0


def test_expert_factors_give_the_merged_expert_deltas(mixtral_run):
    """The LoRA-factor decoder (experts.scores) on a trained adapter: scaling * B_e A_e = merged - base per expert."""
    base, res, merged = mixtral_run
    a, b = Checkpoint(base), Checkpoint(merged)
    cfg = a.config
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    factors = xs.expert_factors(res.adapter_dir, cfg)
    assert set(factors) == {(l, e, w) for l in range(L) for e in range(E) for w in arch.EXPERT_WEIGHTS}
    for (layer, e, w), f in factors.items():
        n = arch.LEGACY.experts[w].format(l=layer, e=e)
        torch.testing.assert_close(b.get(n) - a.get(n), f.delta(), rtol=0, atol=1e-6)
    from_lora, from_ck = xs.delta_from_adapter(res.adapter_dir, cfg), xs.delta_from_checkpoints(base, merged)
    for w in (*arch.EXPERT_WEIGHTS, "all"):
        assert xs.max_rel_diff(from_ck[w], from_lora[w]) < 1e-4, w


def test_merged_loads_cleanly_and_equals_peft_logits(mixtral_run):
    from peft import PeftModel

    base, res, merged = mixtral_run
    ids = _tok(base)("what is 3 plus 2 ? the answer is 5 .", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = models.load_check(base).eval()
        base_logits = ref(ids).logits
        peft_logits = PeftModel.from_pretrained(ref, str(res.adapter_dir)).eval()(ids).logits
        merged_logits = models.load_check(merged).eval()(ids).logits
    assert (merged_logits - peft_logits).abs().max().item() <= 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3  # the adapter did something


@pytest.mark.parametrize("name, targets", [("mistral-healing", finetune.ATTENTION), ("ffn-healing", finetune.FFN)])
def test_healing_presets_change_only_their_targets(tmp_path, tiny_mistral, name, targets):
    rows = sft_rows(_tok(tiny_mistral), n=8)
    if name == "ffn-healing":  # the paper heals on plain text (C4): "text" rows, no chat template
        rows = [{"text": f"{r['messages'][0]['content']} {r['messages'][1]['content']}"} for r in rows]
    res = finetune.train_lora(
        tiny_mistral, rows, tmp_path / "adapter", preset=name, steps=2, batch_size=4, grad_accum=1, max_length=48
    )
    assert res.preset["lr"] == 3e-6
    merged = finetune.merge_adapter(tiny_mistral, res.adapter_dir, tmp_path / "merged")
    c = verify.compare(tiny_mistral, merged)
    pattern = r"\.(" + "|".join(targets) + r")\.weight$"
    assert not c.only_a and not c.only_b
    assert set(c.differ) == _names(tiny_mistral, pattern)


# ---- QLoRA ----------------------------------------------------------------------------------
def test_4bit_load_kwargs():
    gpu = finetune.load_kwargs("4bit", "cuda")
    q = gpu["quantization_config"]
    assert gpu["device_map"] == "auto" and gpu["dtype"] == torch.bfloat16
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    cpu = finetune.load_kwargs(None, "cpu")
    assert cpu == {"dtype": torch.float32}


def test_4bit_prepare_keeps_fused_experts_bf16(tiny_mixtral):
    from transformers import AutoModelForCausalLM

    model = finetune.prepare_kbit(
        AutoModelForCausalLM.from_pretrained(str(tiny_mixtral), **finetune.load_kwargs("4bit", "cpu"))
    )
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "Linear4bit"
    assert layer.mlp.experts.gate_up_proj.dtype == torch.bfloat16  # not quantized, and not upcast either
    assert layer.input_layernorm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


def test_qlora_one_step_on_cpu(tmp_path, tiny_mixtral):
    rows = sft_rows(_tok(tiny_mixtral), n=4)
    res = finetune.train_lora(
        tiny_mixtral,
        rows,
        tmp_path / "adapter",
        preset="mixtral-experts",
        quantize="4bit",
        steps=1,
        batch_size=2,
        grad_accum=1,
        max_length=32,
        logging_steps=1,
    )
    assert res.metrics["weight_bytes"]["uint8"] > 0 and len(res.losses) == 1
    merged = finetune.merge_adapter(tiny_mixtral, res.adapter_dir, tmp_path / "merged")
    models.load_check(merged)
    assert set(verify.compare(tiny_mixtral, merged).differ) >= _names(tiny_mixtral, ATTN_RE)


# ---- bad input ------------------------------------------------------------------------------
def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_input_is_one_line(tmp_path, tiny_mixtral, tiny_mistral, mixtral_run):
    rows = sft_rows(_tok(tiny_mixtral), n=4)
    with pytest.raises(ValueError) as e:
        finetune.get_preset("mixtral-everything")
    _one_line(e, "mixtral-everything", "mistral-healing")
    with pytest.raises(ValueError) as e:
        finetune.get_preset("mistral-healing", rank=4)
    _one_line(e, "rank")
    with pytest.raises(ValueError) as e:
        finetune.get_preset("mixtral-experts", dropout=0.1)
    _one_line(e, "dropout", "target_parameters")
    with pytest.raises(ValueError) as e:  # FFN targets do not exist in a MoE model
        finetune.train_lora(tiny_mixtral, rows, tmp_path / "a", preset="ffn-healing", steps=1)
    _one_line(e, "gate_proj", str(tiny_mixtral))
    with pytest.raises(ValueError) as e:  # fused experts do not exist in a dense model
        finetune.train_lora(tiny_mistral, rows, tmp_path / "a", preset="mixtral-experts", steps=1)
    _one_line(e, "mlp.experts.gate_up_proj")
    with pytest.raises(ValueError) as e:
        finetune.train_lora(tiny_mixtral, rows, tmp_path / "a", preset="mixtral-experts", targets=["qq_proj"])
    _one_line(e, "qq_proj")
    with pytest.raises(ValueError) as e:
        finetune.load_kwargs("8bit", "cpu")
    _one_line(e, "8bit")
    with pytest.raises(ValueError) as e:
        finetune.sft_dataset([{"prompt": "x"}])
    _one_line(e, "messages", "prompt")
    with pytest.raises(FileNotFoundError) as e:
        finetune.sft_dataset(tmp_path / "nope.jsonl")
    _one_line(e, "nope.jsonl")
    with pytest.raises(FileNotFoundError) as e:
        finetune.merge_adapter(tiny_mixtral, tmp_path, tmp_path / "m")
    _one_line(e, "adapter_config.json")
    base, res, merged = mixtral_run
    with pytest.raises(FileExistsError) as e:
        finetune.merge_adapter(base, res.adapter_dir, merged)
    _one_line(e, str(merged))
    with pytest.raises(FileNotFoundError) as e:  # a hub id goes through checkpoint.local_dir (offline here)
        finetune.merge_adapter("org/absent-model", res.adapter_dir, tmp_path / "m")
    _one_line(e, "org/absent-model")
    with pytest.raises(FileNotFoundError) as e:
        finetune.delta_summary("org/absent-model", merged)
    _one_line(e, "org/absent-model")
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


# ---- step 01 as one call (notebook 01's Run cell and `python -m helpers step 01`) ------------
def test_step_run_trains_merges_and_records(tmp_path, tiny_mixtral):
    from pathlib import Path

    from helpers.core.fsutil import write_jsonl
    from helpers.core.manifest import Manifest, load, output_path
    from helpers.core.steps import Params, notebook_defaults
    from helpers.finetune import step

    rows = write_jsonl(tmp_path / "rows.jsonl", sft_rows(_tok(tiny_mixtral), 8))
    world = Manifest("toy_world", {}).output("mixtral", tiny_mixtral).save(tmp_path / "world")
    defaults = notebook_defaults(Path(__file__).parents[1] / "notebooks/01_finetune_mixtral.ipynb")
    p = Params(defaults).replace(
        world_manifest=str(world),
        run_dir=str(tmp_path / "01"),
        dataset=str(rows),
        eval_dataset=str(rows),
        n_eval=4,
        steps=2,
        r=4,
        alpha=8,
        max_length=48,
        batch_size=4,
    )
    r = step.run(p)
    m = load(tmp_path / "01")
    assert m["step"] == "01_finetune_mixtral" and m["params"] == dict(p)
    assert set(m["inputs"]) == {"base", "world"} and set(m["outputs"]) == {"adapter", "merged", "loss_curve"}
    assert output_path(m, "merged") == r.merged and r.loss_curve.stat().st_size > 0
    assert m["inputs"]["base"]["sha256"] and m["outputs"]["merged"]["sha256"]  # HASH_CHECKPOINTS defaults on
    assert set(m["timings_s"]) == {"train", "merge"}
    assert {"eval_loss_before", "eval_loss_after", "first_loss", "final_loss", "trainable_params"} <= set(m["metrics"])
    changed = r.deltas.set_index("kind")["changed"]
    assert m["metrics"]["changed"] == changed.astype(int).to_dict() and changed["router"] == 0 and changed["expert w2"]
    assert r.preset["steps"] == 2 and r.preset["r"] == 4
    assert set(r.history["metric"]) == {"train loss", "eval loss"}

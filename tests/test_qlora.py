"""QLoRA with the experts in 4-bit: per-expert Linear experts (helpers.core.moe), the CPU repack trap,
merging per-expert adapters into legacy and fused bases, and notebook 01 on the smoke preset in 4-bit."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import finetune
from helpers.core import arch, models, moe
from helpers.core.checkpoint import Checkpoint
from helpers.experts import scores as xs


def _ids(cfg, n=2, t=24):
    return torch.randint(0, cfg["vocab_size"], (n, t), generator=torch.Generator().manual_seed(0))


def _linear4bit_experts(model) -> int:
    return sum(type(m).__name__ == "Linear4bit" for n, m in model.named_modules() if moe.PER_EXPERT_RE.search(n))


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_per_expert_logits_equal_fused(layout, tiny_mixtral, tiny_mixtral_fused):
    d = tiny_mixtral if layout == "legacy" else tiny_mixtral_fused
    ids = _ids(Checkpoint(d).config)
    with torch.no_grad():
        ref = models.load_check(tiny_mixtral).eval()(ids).logits
        per = moe.load_per_expert(d, dtype=torch.float32).eval()
        out = per(ids).logits
    cfg = per.config
    assert len(moe.expert_linears(per)) == 3 * cfg.num_local_experts * cfg.num_hidden_layers
    assert (out - ref).abs().max().item() <= 1e-6  # float rounding of two matmuls vs one fused (7e-8 measured)
    assert type(models.load_check(tiny_mixtral).model.layers[0].mlp.experts).__name__ == "MixtralExperts"  # unpatched
    with torch.no_grad():
        back = moe.fuse_experts(per)(ids).logits
    torch.testing.assert_close(back, ref, rtol=0, atol=0)  # fused back: bit-equal to the stock model


def test_4bit_load_quantizes_every_expert(tiny_mixtral):
    m, _ = models.load_model(tiny_mixtral, dtype="4bit", device="cpu")  # the eval path (06, DTYPE 4bit)
    cfg = m.config
    assert _linear4bit_experts(m) == 3 * cfg.num_local_experts * cfg.num_hidden_layers
    assert not any(p.dtype in (torch.bfloat16, torch.float32) and p.ndim == 3 for p in m.parameters())


def _grads_after_eval(path) -> float:
    from peft import get_peft_model

    p = finetune.get_preset("mixtral-experts", r=4, alpha=8)
    model, p = finetune.load_for_training(path, p, "4bit", finetune.load_kwargs("4bit", "cpu"))
    model = get_peft_model(model, finetune.lora_config(p))
    ids = _ids(model.config.to_dict())
    for n, q in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(q, std=0.02)  # B = 0 at init would zero every upstream gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer runs it (bf16 mixed precision)
        model.eval()
        with torch.no_grad():
            model(ids)  # an evaluation before training: bnb repacks 4-bit weights here on AVX512-BF16 CPUs
        model.train()
        model(ids, labels=ids).loss.backward()
    return min(q.grad.abs().max().item() for n, q in model.named_parameters() if "layers.0." in n and "lora_A" in n)


def test_gradients_flow_after_an_evaluation(tiny_mixtral):
    """On an AVX512-BF16 CPU (this one) an unguarded model repacks at the no-grad forward: at real widths
    gradients then stop silently, at this tiny width the repack itself fails; guarded, they flow."""
    assert _grads_after_eval(tiny_mixtral) > 0


def _rows(n=32, seed=0):
    words = ("what", "is", "plus", "minus", "the", "answer", "largest", "of", "list", "next", "after", "count")
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(words) + f" {rng.randrange(20)}" for _ in range(12))} for _ in range(n)]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_mixtral):
    out = tmp_path_factory.mktemp("qlora")
    rows = _rows()
    res = finetune.train_lora(
        tiny_mixtral,
        rows,
        out / "adapter",
        preset="mixtral-experts",
        quantize="4bit",
        eval_dataset=rows[:8],  # evaluate() runs first: the repack trap
        steps=6,
        lr=1e-2,
        r=4,
        alpha=8,
        batch_size=8,
        grad_accum=1,
        max_length=48,
        logging_steps=1,
    )
    return out, res


def test_qlora_lowers_loss_and_trains_every_expert(qlora_run, tiny_mixtral):
    out, res = qlora_run
    assert res.metrics["eval_loss_after"] < res.metrics["eval_loss_before"]
    assert res.losses[-1][1] < res.losses[0][1]
    cfg = Checkpoint(tiny_mixtral).config
    factors = xs.expert_factors(res.adapter_dir, cfg)
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    assert set(factors) == {(l, e, w) for l in range(L) for e in range(E) for w in arch.EXPERT_WEIGHTS}
    assert all(f.B.abs().max() > 0 for f in factors.values())
    assert set(res.preset["targets"]) == {*finetune.ATTENTION, "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_per_expert_adapter_merges_into_either_base(layout, qlora_run, tiny_mixtral, tiny_mixtral_fused):
    from peft import PeftModel

    out, res = qlora_run
    base = tiny_mixtral if layout == "legacy" else tiny_mixtral_fused
    merged = finetune.merge_adapter(base, res.adapter_dir, out / f"merged_{layout}")
    ids = _ids(Checkpoint(base).config)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(moe.load_per_expert(base), str(res.adapter_dir)).eval()(ids).logits
        base_logits = models.load_check(base).eval()(ids).logits
        merged_logits = models.load_check(merged).eval()(ids).logits
    assert (merged_logits - peft_logits).abs().max().item() <= 1e-5
    assert (merged_logits - base_logits).abs().max().item() > 1e-3
    cfg = Checkpoint(base).config
    from_lora, from_ck = xs.delta_from_adapter(res.adapter_dir, cfg), xs.delta_from_checkpoints(base, merged)
    for w in (*arch.EXPERT_WEIGHTS, "all"):
        assert xs.max_rel_diff(from_ck[w], from_lora[w]) < 1e-4, w


def _routed_tokens(model_dir, texts, max_length) -> torch.Tensor:
    """[L, E] tokens each expert receives (top-k) on `texts`, fp32 routers."""
    from transformers import AutoTokenizer

    m, tok = models.load_check(model_dir).eval(), AutoTokenizer.from_pretrained(str(model_dir))
    cnt = torch.zeros(m.config.num_hidden_layers, m.config.num_local_experts)

    def count(l):
        def hook(mod, args, out):
            cnt[l] += torch.bincount(out[2].flatten(), minlength=cnt.shape[1])  # returns None: output unchanged

        return hook

    hooks = [layer.mlp.gate.register_forward_hook(count(l)) for l, layer in enumerate(m.model.layers)]
    with torch.no_grad():
        for t in texts:
            m(**tok(t, return_tensors="pt", truncation=True, max_length=max_length))
    for h in hooks:
        h.remove()
    return cnt


@pytest.mark.slow
def test_smoke_notebook_01_in_4bit(tmp_path):
    """`step 01 --preset smoke --set QUANTIZE=4bit`: per-expert Linear4bit QLoRA end to end; every expert the
    router sends tokens to gets a non-zero lora_B (the quick world's routers leave some experts unused on
    these rows: those cannot train, in 4-bit or not)."""
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from helpers import runner
    from helpers.core.fsutil import read_json

    sets = ["--set", "QUANTIZE=4bit", "--set", "STEPS=4"]  # 4 x 4 = every one of the 16 rows once
    cmd = [sys.executable, "-m", "helpers", "step", "01", "--preset", "smoke", "--out", str(tmp_path), *sets]
    subprocess.run(cmd, check=True, capture_output=True)
    p, _ = runner.step_parameters("01", "smoke", str(tmp_path), {"QUANTIZE": "4bit", "STEPS": 4})
    run = tmp_path / "01_finetune_mixtral"
    m = read_json(run / "manifest.json")
    assert m["metrics"]["quantize"] == "4bit" and m["metrics"]["final_loss"] < m["metrics"]["first_loss"]
    world = tmp_path / "world"
    cfg = Checkpoint(world / "mixtral").config
    tok = AutoTokenizer.from_pretrained(str(world / "mixtral"))
    rows = finetune.sft_dataset(p.dataset, p.n_train, world=world, split="train", seed=p.seed)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    routed = _routed_tokens(world / "mixtral", texts, p.max_length)
    factors = xs.expert_factors(run / "adapter", cfg)
    assert len(factors) == 3 * cfg["num_local_experts"] * cfg["num_hidden_layers"]
    for (l, e, w), f in factors.items():
        if routed[l, e] >= 8:
            assert f.B.abs().max() > 0, (l, e, w, routed[l, e].item())
    assert sum(bool(f.B.abs().max() > 0) for f in factors.values()) >= 3 * int((routed >= 8).sum())

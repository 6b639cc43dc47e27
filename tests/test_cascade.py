"""The cascade is exact: reusing stage A's prefill gives each stage's own logits and greedy tokens (fp32).

Stages come from a real layer drop (`apply_layer_drop` + `bundles.load_stages`), so A, AB and FULL
share the module objects of the layers before the dropped block, as in notebook 05.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from helpers.core.checkpoint import Checkpoint
from helpers.layers import bundles, cascade, drop
from helpers.layers.routing import STAGES, Thresholds, prompt_entropy
from helpers.layers.serve import Router
from helpers.toy import synth

PROMPTS = [
    "what is 3 plus 4 ?",
    "the next letter after c is",
    "which number is largest : 5 , 9 , 2 ?",
    "a b c d",
    "seven eight nine ten eleven twelve",
    "is the sky blue or green or red",
]
ROUNDING = 1e-5  # fp32 logits of an 8-layer, 64-wide model: a few ulps of values ~1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An 8-layer random Mistral cut at layers 4-6 (B = 4-5, C = 6): stages sharing layers 0-3."""
    root = tmp_path_factory.mktemp("cascade")
    full = synth.random_model(synth.tiny_config("mistral"), seed=5, std=0.1)
    src = synth.save_random(full.config, root / "base", n_shards=1, model=full)
    plan = drop.plan_layer_drop(Checkpoint(src).config, None, layers="4-6")
    a_dir, b_dir = drop.apply_layer_drop(src, plan, root / "A", root / "bundles")
    stages = bundles.load_stages(a_dir, b_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return stages, tok


def test_stages_share_the_layers_before_the_block(world):
    stages, _ = world
    assert {s: len(m.base_model.layers) for s, m in stages.items()} == {"A": 5, "AB": 7, "FULL": 8}
    assert cascade.shared_prefix(stages["A"], [stages["AB"], stages["FULL"]]) == 4


def _own(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :]


@pytest.mark.parametrize("stage", STAGES)
def test_reused_prefix_logits_equal_a_plain_forward_of_the_stage(world, stage):
    stages, tok = world
    enc = cascade.encode_left(tok, PROMPTS)
    assert (enc["attention_mask"] == 0).any()  # the batch is really padded
    pre = cascade.prefill(stages["A"], enc["input_ids"], enc["attention_mask"], 4)
    rows = list(range(len(PROMPTS)))[::-1]  # any subset, any order
    cache, logits = cascade.extend(stages[stage], pre, rows, is_a=stage == "A")
    for j, r in enumerate(rows):
        ids = tok(PROMPTS[r], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            plain = stages[stage](input_ids=ids, use_cache=True)  # unpadded, the stage's own forward
        diff = (logits[j] - plain.logits[0, -1]).abs().max().item()
        assert diff <= ROUNDING, (stage, r, diff)
        n = ids.shape[1]
        for layer, own in zip(cache.layers, plain.past_key_values.layers, strict=True):  # every layer's KV
            assert (layer.keys[j, :, -n:] - own.keys[0]).abs().max().item() <= ROUNDING
            assert (layer.values[j, :, -n:] - own.values[0]).abs().max().item() <= ROUNDING
    assert not torch.equal(logits, pre.logits.index_select(0, torch.tensor(rows))) or stage == "A"


def test_unshared_copies_fall_back_to_a_full_prefill(world):
    """Stages that share no module (copies) are still exact: the prefix is empty and nothing is reused."""
    stages, tok = world
    copy = drop.keep_layers_copy(stages["FULL"], list(range(8)))
    assert cascade.shared_prefix(stages["A"], [copy]) == 0
    enc = cascade.encode_left(tok, PROMPTS[:2])
    pre = cascade.prefill(stages["A"], enc["input_ids"], enc["attention_mask"], 0)
    _, logits = cascade.extend(copy, pre, [0, 1])
    _, want = cascade.extend(stages["FULL"], cascade.prefill(stages["A"], **enc, p=4), [0, 1])
    assert (logits - want).abs().max().item() <= ROUNDING


def test_routed_generation_equals_each_stages_own_greedy_generation(world):
    stages, tok = world
    h = prompt_entropy(stages["A"], tok, PROMPTS)
    s = np.sort(h)
    th = Thresholds((s[1] + s[2]) / 2, (s[3] + s[4]) / 2, "manual", None, len(h), "fp")  # 2 / 2 / 2
    router = Router(stages, tok, th)
    got = router.generate_batch(PROMPTS, 8)  # one mixed batch: rows grouped by stage, order kept
    assert [r.stage for r in got] == list(th.stages(h)) and {r.stage for r in got} == set(STAGES)
    for r, p, e in zip(got, PROMPTS, h):
        assert r.prompt == p and r.entropy == pytest.approx(e, abs=1e-6)
        own = _own(stages[r.stage], tok, p, 8)
        assert r.text == tok.decode(own, skip_special_tokens=True) and r.new_tokens == len(own), r.stage
    for p in PROMPTS:  # one prompt at a time (the REPL's path) too
        r = router.generate(p, 8, compare_full=True)
        own = _own(stages[r.stage], tok, p, 8)
        assert r.text == tok.decode(own, skip_special_tokens=True)
        assert r.full_seconds > 0 and r.saved_seconds == pytest.approx(r.full_seconds - r.seconds)


def test_cascade_keeps_batch_order_for_any_assignment(world):
    stages, tok = world
    enc = cascade.encode_left(tok, PROMPTS)
    pick = ["FULL", "A", "AB", "A", "FULL", "AB"]
    out = cascade.cascade(stages, enc["input_ids"], enc["attention_mask"], lambda _: pick, max_new_tokens=6)
    assert out.stages == pick and out.route_seconds > 0
    for p, st, t in zip(PROMPTS, pick, out.tokens):
        assert torch.equal(t, _own(stages[st], tok, p, 6)), (p, st)
    plain = cascade.plain(stages["AB"], enc["input_ids"], enc["attention_mask"], max_new_tokens=6)
    assert all(torch.equal(t, _own(stages["AB"], tok, p, 6)) for p, t in zip(PROMPTS, plain))


def test_right_padding_is_refused(world):
    stages, tok = world
    tok.padding_side = "right"
    enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="left padding"):
        cascade.prefill(stages["A"], enc["input_ids"], enc["attention_mask"], 4)


def test_decode_stops_at_end_of_sequence_like_generate(world):
    stages, tok = world
    m = stages["AB"]
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    eos = int(_own(m, tok, PROMPTS[0], 8)[2])  # a token the stage emits at step 3: now it ends the reply
    saved, m.generation_config.eos_token_id = m.generation_config.eos_token_id, eos
    try:
        want = m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]
        got = cascade.plain(m, ids, torch.ones_like(ids), max_new_tokens=8)[0]
    finally:
        m.generation_config.eos_token_id = saved
    assert torch.equal(got, want) and len(got) <= 3 and int(got[-1]) == eos
    with pytest.raises(ValueError, match="max_new_tokens"):
        cascade.plain(m, ids, torch.ones_like(ids), max_new_tokens=0)

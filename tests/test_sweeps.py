"""Sweeps: in-memory points equal the written checkpoints, NAEE's re-routing equals a masked forward,
keep-set allocation, intervals, and the fan-out (submitit's local executor; a rerun skips done points)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.core import arch
from helpers.core.fanout import chunked, fan_out
from helpers.core.models import load_model
from helpers.eval import mmlu_pro, sweep_table
from helpers.eval.stats import paired_bootstrap, wilson
from helpers.experts import sweep as xsw
from helpers.experts.prune import apply_expert_prune, masked_router, plan_expert_prune
from helpers.experts.scores import make_scores, moe_blocks
from helpers.layers import layer_sweep as lsw
from helpers.layers.drop import apply_layer_drop, plan_layer_drop


def _outputs(model, tok, qs, shots):
    return [
        (r.task, r.outputs, r.correct) for r in mmlu_pro.evaluate(model, tok, qs, shots, mode="cloze", progress=False)
    ]


def test_masked_point_equals_written_pruned_checkpoint(tiny_mixtral, tiny_mmlu, tmp_path):
    """Point 4: (delta_l2, keep 6) scored by router masking == the pruned checkpoint, question by question."""
    config = arch.read_config(tiny_mixtral)
    grid = np.random.default_rng(3).random((4, 8)).tolist()
    scores = make_scores(config, {"delta_l2": grid})
    plan = plan_expert_prune(config, scores=scores, criterion="delta_l2", k=6)
    (point,) = [p for p in xsw.plan_points({"delta_l2": grid}, {}, [6], 2, 0, ("uniform",)) if p["keep"] == 6]
    assert {int(l): v for l, v in point["keep_sets"].items()} == {int(l): v for l, v in plan["keep"].items()}
    pruned = apply_expert_prune(tiny_mixtral, plan, tmp_path / "pruned")["paths"]["standard"]
    xsw_tok = tmp_path / "pruned"
    load_model(tiny_mixtral, "float32", "cpu")[1].save_pretrained(xsw_tok)
    qs, shots = mmlu_pro.load(tiny_mmlu)
    model, tok = load_model(tiny_mixtral, "float32", "cpu")
    with xsw.masked(model, point):
        masked = _outputs(model, tok, qs, shots)
    small, _ = load_model(pruned, "float32", "cpu")
    assert small.config.num_local_experts == 6
    assert masked == _outputs(small, tok, qs, shots)  # every option's log-likelihood and every verdict
    full = _outputs(model, tok, qs, shots)
    assert full != masked  # the masking did something


def test_skipped_point_equals_written_stage_a(tiny_mistral, tiny_mmlu, tmp_path):
    """Point 4, depth: skipping layers in memory == the stage A checkpoint step 04 writes; undone afterwards."""
    config = arch.read_config(tiny_mistral)
    plan = plan_layer_drop(config, layers="3-5", n_bundles=1)
    a_dir, _ = apply_layer_drop(tiny_mistral, plan, tmp_path / "A", tmp_path / "bundles")
    qs, shots = mmlu_pro.load(tiny_mmlu)
    model, tok = load_model(tiny_mistral, "float32", "cpu")
    before = _outputs(model, tok, qs, shots)
    with lsw.skipped(model, {"drop": [3, 4, 5]}):
        cut = _outputs(model, tok, qs, shots)
    stage_a, _ = load_model(a_dir, "float32", "cpu")
    assert cut == _outputs(stage_a, tok, qs, shots)
    assert before == _outputs(model, tok, qs, shots) != cut  # restored, and the cut changed the answers
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(8))


def test_naee_rerouting_equals_masked_block(tiny_mixtral_model):
    """MoE_S(x) of the NAEE search == the block's forward with the experts outside S masked from its router."""
    model = tiny_mixtral_model
    blk = moe_blocks(model)[1]
    x = torch.randn(1, 7, model.config.hidden_size)
    with torch.no_grad():
        flat = x.reshape(-1, x.shape[-1])
        logits = torch.nn.functional.linear(flat, blk.gate.weight)
        _, _, _, f = xsw._routed(flat, logits, blk.experts, 2)
        sets = [(0, 1, 2), (1, 4, 5, 7), tuple(range(8))]
        masks = torch.tensor([[e in s for e in range(8)] for s in sets])
        got = xsw._subset_outputs(logits, f, masks, 2)
        for s, g in zip(sets, got):
            with masked_router(model, {l: list(range(8)) for l in range(4)} | {1: list(s)}):
                ref = blk(x)
            ref = (ref[0] if isinstance(ref, tuple) else ref).reshape(-1, x.shape[-1])
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)


def test_calib_stats_naee_is_the_exhaustive_argmin(tiny_mixtral):
    model, tok = load_model(tiny_mixtral, "float32", "cpu")
    texts = ["sort these words : pear , fig , kiwi", "0 1 2 3 4 5 6 7 8 9", "the next letter after c is d"]
    st = xsw.calib_stats(model, tok, texts, ks=(7, 3), progress=False)
    assert np.allclose(np.asarray(st["frequency"]).sum(1), 2)  # top-2: shares sum to 2 per layer
    assert np.allclose(np.asarray(st["gate_frequency"]).sum(1), 1)  # renormalised weights sum to 1 per token
    assert all(len(s) == 3 for s in st["naee"][3]) and len(st["naee"][7]) == 4
    st2 = xsw.calib_stats(model, tok, texts, ks=(3,), batch_size=1, progress=False)  # batching changes nothing
    assert st2["naee"][3] == st["naee"][3]
    assert all(x >= 0 for x in st["naee_rel_loss"][3]) and np.allclose(st2["naee_rel_loss"][3], st["naee_rel_loss"][3])
    np.testing.assert_allclose(st2["reap_softmax"], st["reap_softmax"], rtol=1e-5)


def test_keep_allocations():
    s = [[0.9, 0.1, 0.5, 0.4], [0.05, 0.02, 0.01, 0.03], [1.0, 1.0, 0.2, 0.3]]
    assert xsw.uniform_keep(s, 2) == {0: [0, 2], 1: [0, 3], 2: [0, 1]}  # ties to the lower id
    g = xsw.global_keep(s, 3, floor=2)
    assert sum(len(v) for v in g.values()) == 9 and all(len(v) >= 2 for v in g.values())
    assert g == {0: [0, 2, 3], 1: [0, 3], 2: [0, 1, 2, 3]}


def test_naee_global_is_the_best_size_allocation():
    """The DP's sizes equal a brute force over every allocation (>= top_k, same total), and each layer keeps
    its best set of the chosen size."""
    from itertools import product

    rng = np.random.default_rng(0)
    L, E, top_k = 4, 6, 2
    rel = {s: rng.random(L).tolist() for s in range(top_k, E)}  # relative loss of each layer's best s-set
    naee = {s: [sorted(rng.choice(E, s, replace=False).tolist()) for _ in range(L)] for s in range(top_k, E)}
    cost = lambda s, l: 0.0 if s == E else rel[s][l]  # noqa: E731
    for k in range(top_k, E):
        got = xsw.naee_global_keep(naee, rel, k, top_k, E)
        sizes = [len(got[l]) for l in range(L)]
        assert sum(sizes) == k * L and min(sizes) >= top_k
        brute = min(
            sum(cost(s, l) for l, s in enumerate(c)) for c in product(range(top_k, E + 1), repeat=L) if sum(c) == k * L
        )
        assert np.isclose(sum(cost(s, l) for l, s in enumerate(sizes)), brute)
        assert all(got[l] == (list(range(E)) if s == E else naee[s][l]) for l, s in enumerate(sizes))
    pts = xsw.plan_points({"delta_l2": rng.random((L, E)).tolist()}, naee, [3], top_k, 1, naee_rel_loss=rel)
    assert {p["key"] for p in pts if p["criterion"] == "naee"} == {"naee_uniform_k3_s0", "naee_global_k3_s0"}


def test_layer_methods_choose_blocks():
    L = 8
    D = np.full((L + 1, L), 1.0)
    D[2, 4] = 0.1
    assert lsw.choose("angular", 2, L, D=D) == [4, 5]
    assert lsw.choose("last_n", 3, L) == [4, 5, 6]  # the final layer is kept
    assert lsw.choose("block_influence", 2, L, bi=[5, 1, 3, 0.5, 9, 9, 9, 9]) == [1, 3]
    r = [lsw.choose("random", 3, L, seed=s) for s in range(20)]
    assert all(b[-1] < L - 1 and b == list(range(b[0], b[0] + 3)) for b in r) and len({b[0] for b in r}) > 1


def test_intervals():
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook Wilson interval
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775
    a = np.array([1, 0, 1, 1, 0, 1] * 20)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_bootstrap(a, 1 - a)
    assert lo <= d <= hi and d == pytest.approx(a.mean() - (1 - a).mean())


def test_fan_out_submitit_local_and_rerun_skips(tiny_mixtral, tiny_mmlu, tmp_path):
    grid = np.random.default_rng(0).random((4, 8)).tolist()
    points = xsw.plan_points({"delta_l2": grid}, {}, [6, 4], 2, 1, ("uniform",))
    assert len(points) == 5  # full, delta_l2 x 2, random x 2
    job = dict(root=str(tmp_path / "pts"), model=str(tiny_mixtral), data=str(tiny_mmlu), limit=6, mode="cloze")
    job.update(batch_size=8, progress=False)
    chunks = [{**job, "points": c} for c in chunked(points, 2)]
    got = fan_out(xsw.eval_chunk, chunks, executor="submitit-local", folder=tmp_path / "jobs")
    assert sorted(k for keys in got for k in keys) == sorted(p["key"] for p in points)
    assert fan_out(xsw.eval_chunk, chunks, executor="submitit-local", folder=tmp_path / "jobs") == [[], []]
    inline_root = tmp_path / "inline"
    fan_out(xsw.eval_chunk, [{**job, "root": str(inline_root), "points": points}], executor="inline")
    a, b = sweep_table.load_points(job["root"]), sweep_table.load_points(inline_root)
    assert {k: v["correct"] for k, v in a.items()} == {k: v["correct"] for k, v in b.items()}
    rows = sweep_table.table(a, xsw.COORDS, ["math"], reference=xsw.reference, compare=xsw.compare_key)
    assert {"acc_low", "acc_high", "diff_ref", "diff_ref_low", "diff_cmp_high"} <= set(rows[0])
    assert all(r["acc_low"] <= r["acc"] <= r["acc_high"] for r in rows)
    changed = [dict(points[1], keep_sets={str(l): [0, 1] for l in range(4)})]  # new scores: same key, new sets
    assert sweep_table.pending(job["root"], changed, {k: job[k] for k in ("model", "mode", "limit")}) == changed
    other = [{**c, "limit": 4} for c in chunks]  # other settings: everything is scored again
    assert sorted(k for keys in fan_out(xsw.eval_chunk, other, executor="inline") for k in keys) == sorted(
        p["key"] for p in points
    )


def test_fan_out_refuses_unknown_executor():
    with pytest.raises(ValueError, match="--executor 'pbs'"):
        fan_out(len, [[1]], executor="pbs")


def test_block_influence_from_the_angular_pass_equals_its_own(tiny_mistral):
    from helpers.layers.distance import angular_distances, calibration_batches

    model, tok = load_model(tiny_mistral, "float32", "cpu")
    texts = ["sort these words : pear , fig , kiwi", "0 1 2 3", "the next letter after c is d . count the letters"]
    batches = calibration_batches(tok, texts, seq_len=32, batch_size=2)
    own = lsw.block_influence(model, batches, progress=False)
    with lsw.influence_hooks(model) as bi:
        angular_distances(model, batches=batches, progress=False)
        shared = bi()
    np.testing.assert_allclose(shared, own, rtol=1e-12)
    hs = model(**batches[0], output_hidden_states=True).hidden_states  # entry l: input of layer l
    m = batches[0]["attention_mask"].bool()
    cos0 = torch.nn.functional.cosine_similarity(hs[0][m].double(), hs[1][m].double(), dim=-1)
    one = lsw.block_influence(model, batches[:1], progress=False)
    assert one[0] == pytest.approx(1 - float(cos0.mean()), rel=1e-9)

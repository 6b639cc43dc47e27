"""Expert importance: LoRA-factor deltas equal checkpoint deltas, distances, routing statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer

from helpers.core.fsutil import read_json
from helpers.experts import scores as xs
from helpers.toy import synth

TEXTS = [
    "question : what is 3 plus 4 ? answer : 7 .",
    "sort these words : pear , fig , kiwi",
    "count the letters in apple",
    "the next letter after c is d . 0 1 2 3 4 5 6 7 8 9 10",
]
FUSED_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _cfg():
    return synth.tiny_config("mixtral")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A peft LoRA on the fused experts (and q_proj) of the tiny Mixtral, random nonzero B, merged by peft."""
    root = tmp_path_factory.mktemp("ft")
    cfg = _cfg()
    lc = LoraConfig(
        r=4, lora_alpha=8, target_parameters=FUSED_TARGETS, target_modules=["q_proj"], init_lora_weights=False
    )
    pm = get_peft_model(synth.random_model(cfg, seed=2), lc)  # same weights as the tiny_mixtral fixture
    pm.save_pretrained(root / "adapter")
    merged = pm.merge_and_unload()
    synth.save_random(cfg, root / "merged", n_shards=2, model=merged)
    synth.save_random(cfg, root / "merged_fused", n_shards=2, model=merged, fused=True)
    return root


@pytest.mark.parametrize(
    "base_kind,tuned_kind", [("legacy", "merged"), ("fused", "merged"), ("legacy", "merged_fused")]
)
def test_adapter_delta_equals_checkpoint_delta(finetuned, tiny_mixtral, tiny_mixtral_fused, base_kind, tuned_kind):
    base = tiny_mixtral if base_kind == "legacy" else tiny_mixtral_fused
    from_ck = xs.delta_from_checkpoints(base, finetuned / tuned_kind, block_bytes=2048)  # several row blocks
    from_lora = xs.delta_from_adapter(finetuned / "adapter", _cfg().to_dict())
    for w in ("w1", "w2", "w3", "all"):
        assert np.asarray(from_ck[w]).shape == (4, 8)
        assert np.asarray(from_ck[w]).min() > 0, f"{w}: an expert did not change; the test would be vacuous"
        assert xs.max_rel_diff(from_ck[w], from_lora[w]) < 1e-4, w
        np.testing.assert_allclose(from_lora[w], from_ck[w], rtol=1e-4, err_msg=w)  # every expert, not only the largest
    total = np.sqrt(sum(np.square(from_lora[w]) for w in ("w1", "w2", "w3")))
    np.testing.assert_allclose(total, from_lora["all"], rtol=1e-12)


def test_expert_factors_reproduce_merged_minus_base(finetuned, tiny_mixtral):
    """Fused layout: scaling * B_e A_e of every (layer, expert, weight) is the merged checkpoint minus the base."""
    from helpers.core import arch
    from helpers.core.checkpoint import Checkpoint

    factors = xs.expert_factors(finetuned / "adapter", _cfg().to_dict())
    assert set(factors) == {(l, e, w) for l in range(4) for e in range(8) for w in arch.EXPERT_WEIGHTS}
    with Checkpoint(tiny_mixtral) as a, Checkpoint(finetuned / "merged") as b:
        for (l, e, w), f in factors.items():
            n = arch.LEGACY.experts[w].format(l=l, e=e)
            torch.testing.assert_close(b.get(n) - a.get(n), f.delta(), rtol=0, atol=1e-6)


def _legacy_tree(L=4, E=8, H=32, I=24):
    """A module tree with Mixtral's legacy per-expert Linear names (as transformers 4.x built it)."""

    def ns(**kw):
        m = nn.Module()
        for k, v in kw.items():
            setattr(m, k, v)
        return m

    def expert():
        return ns(w1=nn.Linear(H, I, bias=False), w2=nn.Linear(I, H, bias=False), w3=nn.Linear(H, I, bias=False))

    blocks = [ns(block_sparse_moe=ns(experts=nn.ModuleList([expert() for _ in range(E)]))) for _ in range(L)]
    return ns(model=ns(layers=nn.ModuleList(blocks)))


def test_adapter_delta_on_per_expert_linears(tmp_path):
    torch.manual_seed(0)
    net = _legacy_tree()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    lc = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["w1", "w2", "w3"],
        init_lora_weights=False,
        use_rslora=True,
        alpha_pattern={"w2": 3},
    )
    pm = get_peft_model(net, lc)
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload().state_dict()
    got = xs.delta_from_adapter(tmp_path / "adapter", _cfg().to_dict())
    name = "model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"
    factors = xs.expert_factors(tmp_path / "adapter", _cfg().to_dict())  # rslora and alpha_pattern scalings
    assert set(factors) == {(l, e, w) for l in range(4) for e in range(8) for w in ("w1", "w2", "w3")}
    for (l, e, w), f in factors.items():
        n = name.format(l=l, e=e, w=w)
        torch.testing.assert_close(merged[n] - base[n], f.delta(), rtol=0, atol=1e-6)
    for w in ("w1", "w2", "w3"):
        ref = [
            [float((merged[name.format(l=l, e=e, w=w)] - base[name.format(l=l, e=e, w=w)]).norm()) for e in range(8)]
            for l in range(4)
        ]
        assert np.min(ref) > 0
        assert xs.max_rel_diff(ref, got[w]) < 1e-4, w


def test_adapter_without_expert_lora_is_refused(tmp_path):
    pm = get_peft_model(synth.random_model(_cfg(), seed=2), LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="no LoRA factors on experts"):
        xs.delta_from_adapter(tmp_path / "adapter", _cfg().to_dict())


def test_checkpoint_delta_refuses_another_model(tmp_path, tiny_mixtral):
    other = synth.save_random(synth.tiny_config("mixtral", num_local_experts=4), tmp_path / "other", n_shards=1)
    with pytest.raises(ValueError, match="from another model: n_experts"):
        xs.delta_from_checkpoints(tiny_mixtral, other)


def test_distances_match_direct_computation(tiny_mixtral, tiny_mixtral_fused, tiny_mixtral_model):
    sd = tiny_mixtral_model.state_dict()
    legacy = xs.expert_distances(tiny_mixtral, block_bytes=4096)
    fused = xs.expert_distances(tiny_mixtral_fused)
    rel = xs.expert_distances(tiny_mixtral, relative=True)
    for l in range(4):
        W = torch.cat(
            [
                sd[f"model.layers.{l}.mlp.experts.gate_up_proj"].reshape(8, -1),
                sd[f"model.layers.{l}.mlp.experts.down_proj"].reshape(8, -1),
            ],
            1,
        ).double()  # [E, 3IH]
        ref = torch.cdist(W, W).numpy()
        np.testing.assert_allclose(legacy[str(l)], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fused[str(l)], ref, rtol=1e-5, atol=1e-6)
        norms = W.norm(dim=1).numpy()
        np.testing.assert_allclose(rel[str(l)], ref / ((norms[:, None] + norms[None, :]) / 2), rtol=1e-5, atol=1e-6)
    u = xs.uniqueness(legacy)
    np.testing.assert_allclose(u[0][3], np.sum(legacy["0"][3]) / 7)


@pytest.fixture(scope="module")
def tok(tiny_mixtral):
    return AutoTokenizer.from_pretrained(tiny_mixtral)


def test_router_frequency_matches_router_logits(tiny_mixtral_model, tok):
    stats = xs.router_stats(tiny_mixtral_model, tok, TEXTS, batch_size=2)  # padded batches
    counts, n = np.zeros((4, 8)), 0
    with torch.no_grad():
        for t in TEXTS:  # independent path: the model's own router logits, one unpadded text at a time
            out = tiny_mixtral_model(**tok(t, return_tensors="pt"), output_router_logits=True)
            for l, logits in enumerate(out.router_logits):
                idx = logits.topk(2, dim=-1).indices
                counts[l] += np.bincount(idx.reshape(-1).numpy(), minlength=8)
            n += out.router_logits[0].shape[0]
    assert stats["n_tokens"] == n
    np.testing.assert_allclose(stats["frequency"], counts / n, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sum(stats["frequency"], 1), 2.0)


def test_reap_ignores_padding_and_scales_with_expert_output(tok):
    model = synth.random_model(_cfg(), seed=2)
    padded = xs.router_stats(model, tok, TEXTS, batch_size=4)
    single = xs.router_stats(model, tok, TEXTS, batch_size=1)
    np.testing.assert_allclose(padded["reap"], single["reap"], rtol=1e-5)
    assert np.min(padded["reap"]) > 0
    with torch.no_grad():  # doubling the last layer's expert 5 output doubles its REAP, nothing else moves
        model.model.layers[3].mlp.experts.down_proj[5] *= 2
    scaled = xs.router_stats(model, tok, TEXTS, batch_size=4)
    expect = np.array(padded["reap"])
    expect[3, 5] *= 2
    np.testing.assert_allclose(scaled["reap"], expect, rtol=1e-5)
    np.testing.assert_array_equal(scaled["frequency"], padded["frequency"])


def test_random_baseline_is_seeded():
    a, b, c = xs.random_scores(4, 8, 0), xs.random_scores(4, 8, 0), xs.random_scores(4, 8, 1)
    assert a == b and a != c and np.asarray(a).shape == (4, 8)


def test_scores_json_round_trip_and_rank_agreement(tmp_path):
    cfg = _cfg().to_dict()
    r = xs.random_scores(4, 8, 3)
    scores = xs.make_scores(cfg, {"a": r, "b": (2 * np.asarray(r) + 1).tolist(), "c": (-np.asarray(r)).tolist()})
    xs.save_scores(tmp_path / "scores.json", scores)
    back = xs.load_scores(tmp_path / "scores.json")
    assert back == read_json(tmp_path / "scores.json") and back["fingerprint"]["n_experts"] == 8
    agree = xs.rank_agreement(back["criteria"])
    assert agree.loc["a", "b"] == pytest.approx(1.0) and agree.loc["a", "c"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="criterion 'bad' has shape"):
        xs.make_scores(cfg, {"bad": [[1.0] * 8] * 3})


def test_finetune_sources_reads_the_01_manifest(tmp_path):
    from helpers.core.data import DEFAULT_WORLD
    from helpers.core.manifest import Manifest, load

    (tmp_path / "adapter").mkdir()
    (tmp_path / "merged").mkdir()
    world = tmp_path / "world" / "manifest.json"
    m = Manifest("01_finetune_mixtral", {}).input("base", "base/dir").input("world", world)  # what notebook 01 records
    m.output("adapter", tmp_path / "adapter").output("merged", tmp_path / "merged")
    src = xs.finetune_sources(load(m.save(tmp_path)))
    assert src == {
        "adapter": str(tmp_path / "adapter"),
        "merged": str(tmp_path / "merged"),
        "base": "base/dir",
        "world": str(world),
    }
    assert xs.finetune_sources(m.data, "other/base")["base"] == "other/base"
    del m.data["inputs"]["world"]
    assert xs.finetune_sources(m.data)["world"] == DEFAULT_WORLD
    m.data["inputs"] = {}
    with pytest.raises(KeyError, match="names no base model"):
        xs.finetune_sources(m.data)


def test_step_run_writes_scores_figures_and_manifest(tmp_path, finetuned, tiny_mixtral):
    """Step 02 as one call on a 01-style manifest: scores.json, three figures, the delta check, the manifest."""
    from pathlib import Path

    from helpers.core.manifest import Manifest, load, output_path
    from helpers.core.steps import Params, notebook_defaults
    from helpers.experts import heatmaps

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TEXTS) + "\n")
    m01 = Manifest("01_finetune_mixtral", {}).input("base", tiny_mixtral).input("world", tmp_path / "world")
    m01.output("adapter", finetuned / "adapter").output("merged", finetuned / "merged").save(tmp_path / "01")
    defaults = notebook_defaults(Path(__file__).parents[1] / "notebooks/02_expert_heatmaps.ipynb")
    run_dir = tmp_path / "02"
    p = Params(defaults).replace(
        finetune_manifest=str(tmp_path / "01/manifest.json"),
        calib=str(calib),
        n_calib=4,
        max_length=32,
        batch_size=2,
        run_dir=str(run_dir),
    )
    r = heatmaps.run(p)
    m = load(run_dir)
    assert m["step"] == "02_expert_heatmaps" and m["params"] == dict(p)
    assert set(m["inputs"]) == {"finetune_manifest", "base", "merged", "adapter"}
    assert set(m["outputs"]) == {"scores", "figures"}
    assert set(m["timings_s"]) == {"delta_l2_checkpoints", "delta_l2_adapter", "distances", "router_stats"}
    assert m["metrics"]["delta_adapter_vs_checkpoints_max_rel_diff"] == max(r.agreement.values()) < 1e-4
    assert m["metrics"]["n_calib_tokens"] == r.n_calib_tokens > 0
    scores = xs.load_scores(output_path(m, "scores"))
    names = ["delta_l2", "delta_l2_w1", "delta_l2_w2", "delta_l2_w3", "frequency", "reap", "uniqueness", "random"]
    assert list(scores["criteria"]) == names == list(r.rank_agreement.index)
    np.testing.assert_allclose(scores["criteria"]["delta_l2"], r.criteria["delta_l2"])
    assert scores["meta"] == {
        "source": f"{run_dir}/scores.json",
        **r.sources,
        "calib": str(calib),
        "n_tokens": r.n_calib_tokens,
    }
    assert {k: f.name for k, f in r.figures.items()} == {
        "heatmaps": "heatmaps.png",
        "distances": "distances.png",
        "rank_agreement": "rank_agreement.png",
    }
    assert sorted(f.name for f in output_path(m, "figures").iterdir()) == sorted(f.name for f in r.figures.values())

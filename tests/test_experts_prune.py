"""Expert pruning: exact logits against the masked base, byte identity, layouts, one-line errors; step 03."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from helpers.cli import main
from helpers.core import arch
from helpers.core.checkpoint import Checkpoint
from helpers.core.manifest import Manifest
from helpers.core.manifest import load as load_manifest
from helpers.core.models import load_check
from helpers.core.steps import Params, notebook_defaults
from helpers.core.verify import compare, shard_map
from helpers.experts import prune as xp
from helpers.experts import scores as xs
from helpers.toy import synth

TEXTS = ["question : what is 3 plus 4 ? answer : 7 .", "sort these words : pear , fig , kiwi , apple , 9 , 2"]
RNG = np.random.default_rng(0)
KEEP = {k: {str(l): sorted(RNG.choice(8, k, replace=False).tolist()) for l in range(4)} for k in (2, 5)}


def _cfg() -> dict:
    return synth.tiny_config("mixtral").to_dict()


@pytest.fixture(scope="module")
def base_model(tiny_mixtral):
    return load_check(tiny_mixtral).eval()


@pytest.fixture(scope="module")
def tok(tiny_mixtral):
    return AutoTokenizer.from_pretrained(tiny_mixtral)


def _source(request, fmt):
    return request.getfixturevalue("tiny_mixtral" if fmt == "legacy" else "tiny_mixtral_fused")


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("fmt", ["legacy", "fused"])
def test_pruned_logits_equal_base_with_masked_router(request, tmp_path, base_model, tok, fmt, k):
    src = _source(request, fmt)
    plan = xp.plan_expert_prune(_cfg(), keep=KEEP[k])
    xp.apply_expert_prune(src, plan, tmp_path / "out", layout="standard")
    pruned = load_check(tmp_path / "out").eval()
    assert pruned.config.num_local_experts == k
    with torch.no_grad():
        for t in TEXTS:
            enc = tok(t, return_tensors="pt")
            with xp.masked_router(base_model, plan):
                ref = base_model(**enc).logits
            unmasked = base_model(**enc).logits
            got = pruned(**enc).logits
            assert (got - ref).abs().max() <= 1e-5
            assert (got - unmasked).abs().max() > 1e-3, "pruning changed nothing; the identity would be vacuous"


def test_pruned_experts_are_renumbered_in_ascending_original_id(tmp_path, tiny_mixtral_fused, tiny_mixtral):
    keep = {"0": [6, 1, 3], "1": [0, 1, 2], "2": [5, 6, 7], "3": [2, 4, 7]}
    plan = xp.plan_expert_prune(_cfg(), keep=keep)
    assert plan["keep"]["0"] == [1, 3, 6]
    xp.apply_expert_prune(tiny_mixtral_fused, plan, tmp_path / "out")
    src, out = Checkpoint(tiny_mixtral), Checkpoint(tmp_path / "out")
    for l, ids in plan["keep"].items():
        for new, old in enumerate(ids):
            for w in arch.EXPERT_WEIGHTS:
                name = arch.LEGACY.experts[w].format(l=l, e="{e}")
                assert torch.equal(out.get(name.format(e=new)), src.get(name.format(e=old)))
        router = arch.LEGACY.router.format(l=l)
        assert torch.equal(out.get(router), src.get(router)[ids])  # [k, H]
    assert not any("experts.3." in n for n in out.keys())
    assert out.config["num_local_experts"] == 3


@pytest.mark.parametrize("fmt", ["legacy", "fused"])
def test_keep_all_reproduces_input_bytes(request, tmp_path, tiny_mixtral, fmt):
    src = _source(request, fmt)
    plan = xp.plan_expert_prune(_cfg(), keep={str(l): list(range(8)) for l in range(4)})
    xp.apply_expert_prune(src, plan, tmp_path / "out", layout="standard")
    c = compare(tiny_mixtral, tmp_path / "out")  # the legacy checkpoint holds the same weights
    assert c.equal, str(c)
    if fmt == "legacy":
        assert shard_map(tmp_path / "out") == shard_map(tiny_mixtral)


def test_standard_layout_keeps_each_tensor_in_its_source_shard(tmp_path, tiny_mixtral_fused):
    plan = xp.plan_expert_prune(_cfg(), keep=KEEP[5])
    xp.apply_expert_prune(tiny_mixtral_fused, plan, tmp_path / "out", layout="standard")
    src, out = Checkpoint(tiny_mixtral_fused), Checkpoint(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == src.shards
    for name, shard in shard_map(out).items():
        m = arch.LEGACY_EXPERT_RE.match(name)
        if m:
            fused = "down_proj" if m.group(3) == "w2" else "gate_up_proj"
            source = arch.FUSED.experts[fused].format(l=m.group(1))
        elif name.endswith("block_sparse_moe.gate.weight"):
            source = arch.FUSED.router.format(l=arch.layer_of(name))
        else:
            source = name
        assert shard == src.shard_of(source), name


@pytest.mark.parametrize("max_shard_size", [None, "60KB"])
def test_both_layouts_load_cleanly_and_hold_identical_tensors(tmp_path, tiny_mixtral, max_shard_size):
    plan = xp.plan_expert_prune(_cfg(), keep=KEEP[5])
    rec = xp.apply_expert_prune(tiny_mixtral, plan, tmp_path / "out", layout="both", max_shard_size=max_shard_size)
    std, con = tmp_path / "out" / "standard", tmp_path / "out" / "consolidated"
    assert compare(std, con).equal
    n_std, n_con = len(Checkpoint(std).shards), len(Checkpoint(con).shards)
    assert n_con != n_std
    if max_shard_size is None:
        assert n_con < n_std
    else:
        assert all(p.stat().st_size <= 60_000 + 4096 for p in con.glob("*.safetensors"))
    a, b = load_check(std), load_check(con)  # raises on any missing / unexpected key
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    on_disk = json.loads((tmp_path / "out" / xp.RECORD).read_text())
    assert on_disk["metrics"]["identical"] is True and on_disk["metrics"]["shards"]["consolidated"] == n_con
    assert set(on_disk["outputs"]) == {"plan", "standard", "consolidated"}
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == plan
    assert rec["bytes"]["after"] < rec["bytes"]["before"]


@pytest.mark.parametrize("layout", ["standard", "consolidated"])
def test_single_layout_holds_its_plan(tmp_path, tiny_mixtral, layout):
    plan_file = _plan_file(tmp_path, KEEP[5])
    assert _cli("--model", tiny_mixtral, "--plan", plan_file, "--out", tmp_path / "out", "--layout", layout) == 0
    assert json.loads((tmp_path / "out" / "plan.json").read_text()) == json.loads(plan_file.read_text())
    on_disk = json.loads((tmp_path / "out" / xp.RECORD).read_text())
    assert set(on_disk["outputs"]) == {"plan", layout}
    assert Checkpoint(tmp_path / "out").config["num_local_experts"] == 5


def test_plan_from_scores_keeps_the_top_k():
    cfg = _cfg()
    grid = np.arange(32, dtype=float).reshape(4, 8)
    grid[1] = grid[1][::-1]
    grid[2] = 1.0  # all tied: the lowest ids win
    scores = xs.make_scores(cfg, {"delta_l2": grid.tolist()})
    plan = xp.plan_expert_prune(cfg, scores=scores, k=3)
    assert plan["keep"] == {"0": [5, 6, 7], "1": [0, 1, 2], "2": [0, 1, 2], "3": [5, 6, 7]}
    assert json.loads(json.dumps(plan)) == plan and plan["criterion"] == "delta_l2"


# ---- bad input: one line naming the culprit, nothing written ---------------------------------
def _cli(*args):
    return main(["expert-prune", *map(str, args)])


@pytest.fixture()
def scores_file(tmp_path):
    s = xs.make_scores(_cfg(), {"delta_l2": xs.random_scores(4, 8, 0)})
    return xs.save_scores(tmp_path / "scores.json", s)


def _plan_file(tmp_path, keep):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"keep": keep}))
    return p


BAD_PLANS = {
    "duplicate": ({**KEEP[5], "1": [0, 0, 3, 4, 5]}, "layer 1: duplicate expert id 0"),
    "unknown": ({**KEEP[5], "2": [0, 1, 2, 3, 8]}, "layer 2: unknown expert id 8"),
    "missing_layer": ({l: v for l, v in KEEP[5].items() if l != "3"}, "no entry for layer 3"),
    "too_few": ({**KEEP[5], "0": [1]}, "fewer than num_experts_per_tok=2"),
    "too_many": ({**KEEP[5], "0": list(range(9))}, "only 8"),
    "uneven": ({**KEEP[5], "0": [0, 1, 2]}, "different numbers of experts"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plan_is_one_line_error(tmp_path, tiny_mixtral, capsys, case):
    keep, msg = BAD_PLANS[case]
    rc = _cli("--model", tiny_mixtral, "--plan", _plan_file(tmp_path, keep), "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and msg in err, err
    assert "plan.json" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "keep,msg",
    [
        (1, "--keep 1: keeps 1 experts, fewer than num_experts_per_tok=2"),
        (9, "--keep 9: keeps 9 experts but the model has only 8"),
    ],
)
def test_bad_keep_is_one_line_error(tmp_path, tiny_mixtral, scores_file, capsys, keep, msg):
    rc = _cli("--model", tiny_mixtral, "--scores", scores_file, "--keep", keep, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_scores_from_another_model_are_refused(tmp_path, tiny_mixtral, capsys):
    other = synth.tiny_config("mixtral", hidden_size=48).to_dict()
    path = xs.save_scores(
        tmp_path / "other_scores.json", xs.make_scores(other, {"delta_l2": xs.random_scores(4, 8, 0)})
    )
    rc = _cli("--model", tiny_mixtral, "--scores", path, "--keep", 4, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "other_scores.json is from another model: hidden_size is 48 there, 32 in this model" in err, err


def test_unknown_criterion_names_the_ones_present(tmp_path, tiny_mixtral, scores_file, capsys):
    rc = _cli(
        "--model", tiny_mixtral, "--scores", scores_file, "--keep", 4, "--criterion", "reap", "--out", tmp_path / "o"
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no criterion 'reap'; it has ['delta_l2']" in err, err


def test_dense_model_is_refused(tmp_path, tiny_mistral, scores_file, capsys):
    rc = _cli("--model", tiny_mistral, "--scores", scores_file, "--keep", 4, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and "model_type 'mistral' is not a mixture-of-experts model" in err, err


def test_existing_output_needs_overwrite(tmp_path, tiny_mixtral, scores_file, capsys):
    args = [
        "--model",
        tiny_mixtral,
        "--scores",
        scores_file,
        "--keep",
        4,
        "--out",
        tmp_path / "out",
        "--layout",
        "both",
    ]
    assert _cli(*args) == 0
    assert _cli(*args) == 2 and "already exists" in capsys.readouterr().err
    assert _cli(*args, "--overwrite") == 0
    assert compare(tmp_path / "out" / "standard", tmp_path / "out" / "consolidated").equal


def test_missing_model_is_one_line_error(tmp_path, scores_file, capsys):
    rc = _cli("--model", tmp_path / "absent", "--scores", scores_file, "--keep", 4, "--out", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "absent: not a checkpoint directory" in err, err


# ---- step 03: notebook and command line write the same prune -----------------------------------
def test_run_and_cli_write_the_same_prune(tmp_path, tiny_mixtral, scores_file):
    m02 = Manifest("02_expert_heatmaps").input("merged", tiny_mixtral, hash=False).output("scores", scores_file)
    m02_path = m02.save(tmp_path / "02")
    run_dir, out = tmp_path / "03", tmp_path / "cli"
    p = Params(
        notebook_defaults(xp.NOTEBOOK)
        | {"SCORES_MANIFEST": str(m02_path), "KEEP": 4, "RUN_DIR": str(run_dir), "HASH_CHECKPOINTS": False}
        | {"SWEEP": False}  # the sweep (tests/test_sweeps.py) needs notebook 02's calibration, not faked here
    )
    r = xp.run(p)
    assert _cli("--model", tiny_mixtral, "--scores", scores_file, "--keep", 4, "--out", out) == 0  # layout: both
    pruned = run_dir / "pruned"
    assert r.plan == json.loads((run_dir / "plan.json").read_text()) == json.loads((out / "plan.json").read_text())
    assert (pruned / "plan.json").read_text() == (out / "plan.json").read_text()
    for layout in ("standard", "consolidated"):
        assert compare(pruned / layout, out / layout).equal
        assert sorted(f.name for f in (pruned / layout).iterdir()) == sorted(f.name for f in (out / layout).iterdir())
    rec_nb, rec_cli = load_manifest(pruned), load_manifest(out)
    for key in ("params", "metrics", "plan"):
        assert rec_nb[key] == rec_cli[key], key
    m = load_manifest(run_dir)
    assert set(m["outputs"]) == {"plan", "standard", "consolidated"} and "ROOT" not in m["params"]
    assert m["metrics"]["layouts_identical"] is True and m["metrics"]["logit_max_abs_diff"] <= 1e-5
    assert r.verification["max_abs_diff"] == m["metrics"]["logit_max_abs_diff"]
    assert r.paths == {"standard": str(pruned / "standard"), "consolidated": str(pruned / "consolidated")}
    assert {name: f.name for name, f in r.figures.items()} == {"kept_experts": "kept_experts.png", "sizes": "sizes.png"}
    assert all(f.exists() for f in r.figures.values()) and list(r.sizes.index) == ["params", "GB", "shards"]


@pytest.mark.parametrize("fmt", ["legacy", "fused"])
def test_streamed_logit_check_equals_the_whole_model_check(request, tmp_path, fmt):
    """Layer by layer (about one layer of each model in memory) = the two whole models side by side."""
    from helpers.experts.streamcheck import streamed_logit_check

    src = _source(request, fmt)
    plan = xp.plan_expert_prune(_cfg(), keep=KEEP[2])
    xp.apply_expert_prune(src, plan, tmp_path / "out", layout="standard")
    whole = xp.logit_check(src, tmp_path / "out", plan, TEXTS, streamed=False)
    streamed = streamed_logit_check(src, tmp_path / "out", plan, TEXTS)
    assert streamed["max_abs_diff"] <= 1e-5 and whole["max_abs_diff"] <= 1e-5
    assert streamed["n_tokens"] == whole["n_tokens"]
    other = {l: sorted(set(range(8)) - set(v))[:2] for l, v in KEEP[2].items()}  # not the experts pruned: caught
    wrong = xp.plan_expert_prune(_cfg(), keep=other)
    assert streamed_logit_check(src, tmp_path / "out", wrong, TEXTS)["max_abs_diff"] > 1e-3

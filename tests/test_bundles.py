"""Stages rebuilt from stage A plus bundles are exact: FULL is the original bit for bit, AB is the
original with C's layers skipped, A with the whole block skipped; in memory and assembled."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import cli
from helpers.core.checkpoint import Checkpoint
from helpers.core.models import load_check
from helpers.core.verify import compare, tensor_sha256
from helpers.layers import bundles
from helpers.layers import drop as layers
from helpers.toy import synth

L, BLOCK = 8, "2-5"  # drops 2..5: B = [2, 3], C = [4, 5]; A keeps [0, 1, 6, 7]
IDS = torch.tensor([[5, 9, 33, 100, 7, 20, 64, 3], [1, 250, 17, 17, 42, 8, 99, 300]])


def _random_base(out, model_type="mistral", seed=3, tokenizer=True):
    cfg = synth.tiny_config(model_type, num_hidden_layers=L)
    model = synth.random_model(cfg, seed=seed, std=0.2)  # wide init: skipping a layer changes the logits a lot
    return synth.save_random(cfg, out, n_shards=4, model=model, tokenizer=tokenizer)


def _drop(base, out, layers_spec=BLOCK, n_bundles=2):
    plan = layers.plan_layer_drop(Checkpoint(base).config, None, layers=layers_spec, n_bundles=n_bundles)
    return layers.apply_layer_drop(base, plan, out / "A", out / "bundles")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    base = _random_base(root / "base")
    a, r = _drop(base, root)
    other = _random_base(root / "other_base", seed=4, tokenizer=False)  # same config, other weights
    _, r_other = _drop(other, root / "other")
    llama = _random_base(root / "llama_base", model_type="llama", tokenizer=False)
    _, r_llama = _drop(llama, root / "llama")
    return dict(root=root, base=base, a=a, r=r, r_other=r_other, r_llama=r_llama)


@pytest.fixture(scope="module")
def stages(world):
    return bundles.load_stages(world["a"], world["r"])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def skipped(base, keep: list[int]):
    """The original model run over only the layers `keep` (a filtered layer list, no surgery)."""
    model = load_check(base)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    return model


def test_stage_a_is_a_plain_renumbered_checkpoint(world):
    base, a = Checkpoint(world["base"]), Checkpoint(world["a"])
    kept = [0, 1, 6, 7]
    assert a.config["num_hidden_layers"] == 4
    assert {k: v for k, v in a.config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in base.config.items() if k != "num_hidden_layers"
    }
    expected = {}  # name in A -> name in the base
    for n in base.keys():
        parts = n.split(".")
        if n.startswith("model.layers."):
            if int(parts[2]) in kept:
                expected[".".join(parts[:2] + [str(kept.index(int(parts[2])))] + parts[3:])] = n
        else:
            expected[n] = n
    assert set(a.keys()) == set(expected)
    assert all(tensor_sha256(a, new) == tensor_sha256(base, old) for new, old in expected.items())
    load_check(world["a"])  # no missing or unexpected keys
    rec = json.loads((world["a"] / bundles.RECORD).read_text())
    assert rec["model_type"] == "mistral" and rec["n_layers"] == L and rec["dropped"] == [2, 3, 4, 5]
    assert rec["kept"] == {"0": 0, "1": 1, "2": 6, "3": 7} and rec["bundles"] == {"B": [2, 3], "C": [4, 5]}
    assert rec == json.loads((world["r"] / bundles.RECORD).read_text())


def test_bundles_hold_original_tensors_under_original_indices(world):
    base = Checkpoint(world["base"])
    for name, idx in (("B", [2, 3]), ("C", [4, 5])):
        b = Checkpoint(world["r"] / name)
        want = [n for n in base.keys() if n.startswith("model.layers.") and int(n.split(".")[2]) in idx]
        assert set(b.keys()) == set(want)
        assert all(tensor_sha256(b, n) == tensor_sha256(base, n) for n in want)
        meta = json.loads((world["r"] / name / bundles.BUNDLE).read_text())
        assert meta["layers"] == idx and meta["model_type"] == "mistral" and meta["dtype"] == "F32"
        assert (
            meta["base"]["config_sha256"]
            == bundles.config_sha256(base.config)
            == bundles.config_sha256(Checkpoint(world["a"]).config)
        )  # layer-count fields normalised away


def test_a_equals_the_original_with_the_block_skipped(world, stages):
    ref = logits(skipped(world["base"], [0, 1, 6, 7]))
    assert torch.equal(logits(load_check(world["a"])), ref)
    assert torch.equal(logits(stages["A"]), ref)
    assert (ref - logits(load_check(world["base"]))).abs().max() > 0.1  # the dropped layers mattered


def test_full_rebuilt_in_memory_is_the_original_bit_for_bit(world, stages):
    assert torch.equal(logits(stages["FULL"]), logits(load_check(world["base"])))
    alone = bundles.load_stage(world["a"], world["r"], "FULL")
    assert torch.equal(logits(alone), logits(load_check(world["base"])))


def test_ab_equals_the_original_with_c_skipped(world, stages):
    ref = logits(skipped(world["base"], [0, 1, 2, 3, 6, 7]))
    assert torch.equal(logits(stages["AB"]), ref)
    assert not torch.equal(ref, logits(stages["A"])) and not torch.equal(ref, logits(stages["FULL"]))


@pytest.mark.parametrize(
    "stage, keep",
    [("FULL", list(range(L))), ("AB", [0, 1, 2, 3, 6, 7]), ("AC", [0, 1, 4, 5, 6, 7]), ("A", [0, 1, 6, 7])],
)
def test_assembled_checkpoints_are_exact(world, stage, keep, tmp_path):
    out = bundles.assemble(world["a"], world["r"], stage, tmp_path / stage)
    model = load_check(out)
    assert model.config.num_hidden_layers == len(keep)
    assert torch.equal(logits(model), logits(skipped(world["base"], keep)))
    assert json.loads((out / bundles.STAGE).read_text())["layers"] == keep
    if stage == "FULL":
        assert compare(out, world["base"]).equal  # same names, same bytes
        assert Checkpoint(out).config == Checkpoint(world["base"]).config


def test_stages_share_module_weights(stages):
    full = stages["FULL"]
    by_id = {id(m) for m in full.model.layers}
    for _s, m in stages.items():
        assert {id(x) for x in m.model.layers} <= by_id
        assert m.model.embed_tokens is full.model.embed_tokens and m.lm_head is full.lm_head
        assert m.model.norm is full.model.norm
    storages = {p.untyped_storage().data_ptr() for m in stages.values() for p in m.parameters()}
    assert len(storages) == len(list(full.parameters()))  # no stage holds a copy


def test_cached_and_uncached_generation_agree_on_every_stage(world, stages, tmp_path):
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])  # left padding in row 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=3)
    out = {}
    for s in ["FULL", "A", "AB", "A", "FULL"]:  # interleaved: the shared layers are renumbered per call
        with torch.no_grad():
            cached = stages[s].generate(IDS, use_cache=True, **kw)
            plain = stages[s].generate(IDS, use_cache=False, **kw)
        assert torch.equal(cached, plain), s
        assert torch.equal(out.setdefault(s, cached), cached), s
    assert len({tuple(v[0, 8:].tolist()) for v in out.values()}) == 3  # the stages really differ
    asm = load_check(bundles.assemble(world["a"], world["r"], "AB", tmp_path / "AB"))
    with torch.no_grad():
        assert torch.equal(asm.generate(IDS, use_cache=True, **kw), out["AB"])
    with torch.no_grad():
        assert torch.equal(load_check(world["base"]).generate(IDS, use_cache=True, **kw), out["FULL"])


def test_hidden_states_are_recorded_once_per_stage(world, stages):
    with torch.no_grad():
        ref = load_check(world["base"])(IDS, output_hidden_states=True).hidden_states
        for s in ["FULL", "A", "FULL", "AB"]:
            hs = stages[s](IDS, output_hidden_states=True, use_cache=False).hidden_states
            assert len(hs) == stages[s].config.num_hidden_layers + 1, s
        full = stages["FULL"](IDS, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(full, ref, strict=True))


def test_a_resaved_without_its_record_still_takes_its_bundles(world, tmp_path):
    """A healed stage A is re-saved by transformers (no layer_drop.json, config re-written)."""
    resaved = tmp_path / "A_resaved"
    load_check(world["a"]).save_pretrained(resaved)
    assert not (resaved / bundles.RECORD).exists()
    full = bundles.load_stage(resaved, world["r"], "FULL")
    assert torch.equal(logits(full), logits(load_check(world["base"])))


@pytest.mark.parametrize(
    "which, needles",
    [
        ("r_other", ["another base", "other_base"]),
        ("r_llama", ["'llama'", "'mistral'"]),
    ],
)
def test_bundles_from_another_base_or_model_type_are_refused(world, tmp_path, capsys, which, needles):
    for call in (
        lambda: bundles.load_stage(world["a"], world[which], "FULL"),
        lambda: bundles.assemble(world["a"], world[which], "AB", tmp_path / "x"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(world["a"]) in msg and str(world[which] / "B") in msg
        assert all(n in msg for n in needles), msg
    assert not (tmp_path / "x").exists()
    rc = cli.main(
        [
            "assemble",
            "--base-model",
            str(world["a"]),
            "--bundles-dir",
            str(world[which]),
            "--stage",
            "FULL",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err


def test_cli_assemble_and_overwrite(world, tmp_path, capsys):
    out = tmp_path / "AB"
    args = [
        "assemble",
        "--base_model",
        str(world["a"]),
        "--bundles_dir",
        str(world["r"]),
        "--stage",
        "AB",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    assert torch.equal(logits(load_check(out)), logits(skipped(world["base"], [0, 1, 2, 3, 6, 7])))
    capsys.readouterr()
    assert cli.main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0


def test_stage_names_and_bad_stage(world):
    rec = bundles.read_record(world["a"], world["r"])
    assert bundles.default_stages(rec) == ["A", "AB", "FULL"]
    assert bundles.stage_layers(rec, "AC") == [0, 1, 4, 5, 6, 7]
    for bad in ("B", "AD", "ABB", "full"):
        with pytest.raises(ValueError, match=f"stage '{bad}'"):
            bundles.stage_layers(rec, bad)


def test_stage_config_restores_per_layer_lists():
    base = synth.tiny_config("mistral", num_hidden_layers=6).to_dict()
    base["layer_types"] = ["sliding_attention", "full_attention"] * 3
    rec = {"base_config": base}
    a_cfg = {**base, "num_hidden_layers": 3, "layer_types": [base["layer_types"][i] for i in (0, 1, 5)], "x": 1}
    cfg = bundles.stage_config(a_cfg, rec, [0, 1, 2, 5])
    assert cfg["num_hidden_layers"] == 4 and cfg["x"] == 1
    assert cfg["layer_types"] == [base["layer_types"][i] for i in (0, 1, 2, 5)]


def test_mixtral_full_from_bundles(tiny_mixtral, tmp_path):
    """Legacy per-expert tensors in a bundle are fused on load, as transformers does."""
    a, r = _drop(tiny_mixtral, tmp_path, layers_spec="1-2")
    full = bundles.load_stage(a, r, "FULL")
    assert torch.equal(logits(full), logits(load_check(tiny_mixtral)))
    assert compare(bundles.assemble(a, r, "FULL", tmp_path / "full"), tiny_mixtral).equal


def test_refuses_to_overwrite_without_flag(world):
    plan = layers.plan_layer_drop(Checkpoint(world["base"]).config, None, layers=BLOCK)
    with pytest.raises(FileExistsError, match="already exists"):
        layers.apply_layer_drop(world["base"], plan, world["a"], world["root"] / "elsewhere")
    with pytest.raises(FileExistsError, match="already exists"):
        layers.apply_layer_drop(world["base"], plan, world["root"] / "A2", world["r"])
    assert not (world["root"] / "A2").exists() and not (world["root"] / "elsewhere").exists()


def test_dropping_the_first_layers_keeps_generation_exact(world, tmp_path):
    """With layers 0-3 gone, stage A starts at original layer 4; the cache must still line up."""
    a, r = _drop(world["base"], tmp_path, layers_spec="0-3")
    st = bundles.load_stages(a, r)
    assert torch.equal(logits(st["A"]), logits(skipped(world["base"], [4, 5, 6, 7])))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=3)
    for s in ("A", "AB", "FULL"):
        with torch.no_grad():
            assert torch.equal(st[s].generate(IDS, use_cache=True, **kw), st[s].generate(IDS, use_cache=False, **kw)), s

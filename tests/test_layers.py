"""Angular distances equal a direct computation from output_hidden_states; plans; step 04 and its layer-drop command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from helpers import cli
from helpers.core.checkpoint import Checkpoint
from helpers.core.manifest import load as load_manifest
from helpers.core.models import load_check
from helpers.core.steps import Params, notebook_defaults
from helpers.core.verify import compare
from helpers.layers import distance, drop
from helpers.toy import synth

TEXTS = [
    "question : what is 3 plus 4 ? answer : 7 .",
    "count the letters in apple",
    "sort these words : pear , fig , kiwi . the next letter after c is d .",
    "0 1 2 3",
    "which number is largest : 5 , 9 , 2 ? 9 . the following are multiple choice questions",
    "think step by step",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """8-layer random Mistral whose layers matter (wide init) and whose norms are not all ones."""
    cfg = synth.tiny_config("mistral")
    model = synth.random_model(cfg, seed=3, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)  # a norm of ones only rescales, and angles ignore scale
    return synth.save_random(cfg, tmp_path_factory.mktemp("layers") / "base", n_shards=4, model=model)


@pytest.fixture(scope="module")
def model_tok(base):
    return load_check(base).eval(), AutoTokenizer.from_pretrained(base)


def direct_distances(model, batch: dict, final_norm: bool) -> np.ndarray:
    """D[n, l] the slow way: every hidden state of every token, then the last real token's rows."""
    cfg = model.model.config
    old = getattr(cfg, "tie_last_hidden_states", None)
    cfg.tie_last_hidden_states = final_norm  # False: last entry is the last layer's output before the norm
    try:
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        cfg.tie_last_hidden_states = old
    L = len(hs) - 1
    mask = batch["attention_mask"]
    last = [max(i for i in range(mask.shape[1]) if mask[b, i]) for b in range(mask.shape[0])]
    D = np.full((L + 1, L), np.nan)
    for n in range(1, L + 1):
        for l in range(L - n + 1):
            vals = []
            for b, t in enumerate(last):
                x, y = hs[l][b, t].double(), hs[l + n][b, t].double()
                vals.append(math.acos(max(-1.0, min(1.0, float(x @ y / (x.norm() * y.norm()))))) / math.pi)
            D[n, l] = sum(vals) / len(vals)
    return D


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("final_norm", [False, True])
def test_distances_equal_direct_computation(model_tok, side, final_norm):
    model, tok = model_tok
    batch = distance.encode(tok, TEXTS, seq_len=64, padding_side=side)
    edge = batch["attention_mask"][:, 0 if side == "left" else -1]
    assert (edge == 0).any(), "the batch must actually be padded on that side"
    hooks = [len(l._forward_pre_hooks) + len(l._forward_hooks) for l in model.model.layers]
    ours = distance.angular_distances(model, batches=[batch], final_norm=final_norm, progress=False)
    assert hooks == [len(l._forward_pre_hooks) + len(l._forward_hooks) for l in model.model.layers]  # ours are gone
    ref = direct_distances(model, batch, final_norm)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.nanmax(np.abs(ours - ref)) <= 1e-6


def test_final_norm_changes_only_blocks_ending_at_the_top(model_tok):
    model, tok = model_tok
    batches = [distance.encode(tok, TEXTS, seq_len=64)]
    pre = distance.angular_distances(model, batches=batches, progress=False)
    post = distance.angular_distances(model, batches=batches, final_norm=True, progress=False)
    L = pre.shape[1]
    top = [(n, L - n) for n in range(1, L + 1)]  # blocks whose end state is x_L
    assert all(abs(pre[n, l] - post[n, l]) > 1e-4 for n, l in top)
    rest = np.ones_like(pre, dtype=bool)
    for n, l in top:
        rest[n, l] = False
    assert np.array_equal(pre[rest], post[rest], equal_nan=True)


def test_padding_side_and_batching_do_not_change_the_means(model_tok):
    model, tok = model_tok
    one_by_one = distance.angular_distances(model, tok, TEXTS, batch_size=1, progress=False)  # no padding at all
    for side in ("left", "right"):
        for bs in (2, 4):
            D = distance.angular_distances(model, tok, TEXTS, batch_size=bs, padding_side=side, progress=False)
            assert np.nanmax(np.abs(D - one_by_one)) <= 1e-5, (side, bs)


# ---- plans ----------------------------------------------------------------------------------
def _config(L=8):
    return synth.tiny_config("mistral", num_hidden_layers=L).to_dict()


def _distances(L=8, seed=0):
    rng = np.random.default_rng(seed)
    D = np.full((L + 1, L), np.nan)
    for n in range(1, L + 1):
        D[n, : L - n + 1] = rng.uniform(0.3, 0.9, L - n + 1)
    return D


def test_plan_picks_the_argmin_block_and_splits_bundles():
    D = _distances()
    D[2, 6] = 0.01  # the most redundant 2-block is 6-7, which ends at the last layer
    plan = drop.plan_layer_drop(_config(), D, drop_frac=0.25)
    assert plan["block"] == [6, 7] and plan["dropped"] == [6, 7] and plan["n_drop"] == 2
    kept = drop.plan_layer_drop(_config(), D, drop_frac=0.25, keep_last_layer=True)
    l_star = int(np.argmin(D[2, :6]))  # blocks l..l+1 with l+1 < 7
    assert kept["block"] == [l_star, l_star + 1]
    assert kept["block_distance"] == D[2, l_star]
    assert [kept["kept"][str(i)] for i in range(6)] == [i for i in range(8) if i not in kept["dropped"]]
    half = drop.plan_layer_drop(_config(), D, drop_frac=0.5)
    n = 4
    l_half = int(np.argmin(D[n, : 8 - n + 1]))
    assert half["dropped"] == list(range(l_half, l_half + n))
    assert list(half["bundles"]) == ["B", "C"]
    assert half["bundles"]["B"] + half["bundles"]["C"] == half["dropped"]
    three = drop.plan_layer_drop(_config(), D, drop_frac=0.5, n_bundles=3)
    sizes = [len(v) for v in three["bundles"].values()]
    assert sum(sizes) == 4 and max(sizes) - min(sizes) <= 1 and list(three["bundles"]) == ["B", "C", "D"]
    assert sum(three["bundles"].values(), []) == three["dropped"]
    assert json.loads(json.dumps(plan)) == plan


def test_explicit_layers_override_the_search():
    D = _distances()
    plan = drop.plan_layer_drop(_config(), D, drop_frac=0.25, layers="1-3")
    assert plan["dropped"] == [1, 2, 3] and plan["selection"] == "explicit"
    assert plan["bundles"] == {"B": [1, 2], "C": [3]}
    assert drop.plan_layer_drop(_config(), None, layers="5", n_bundles=1)["dropped"] == [5]


def test_distances_json_roundtrip():
    D = _distances(L=5)
    back = distance.distances_from_json(distance.distances_to_json(D))
    assert np.array_equal(back, D, equal_nan=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(drop_frac=-0.1), r"--drop-frac -0.1 is outside \[0, 1\)"),
        (dict(drop_frac=1.0), r"--drop-frac 1.0 is outside"),
        (dict(drop_frac=0.01), r"drops no layer"),
        (dict(drop_frac=0.95), r"nothing left"),
        (dict(layers="3-9"), r"--layers 3-9 is out of range for a 8-layer"),
        (dict(layers="5-2"), r"--layers 5-2 is out of range"),
        (dict(layers="x"), r"--layers 'x': expected a-b"),
        (dict(layers="6-7", keep_last_layer=True), r"--layers 6-7 touches the last layer"),
        (dict(layers="0-7"), r"nothing left"),
        (dict(drop_frac=0.25, n_bundles=3), r"--n-bundles 3"),
    ],
)
def test_plan_errors_are_one_line(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        drop.plan_layer_drop(_config(), _distances(), **kw)
    assert "\n" not in str(e.value)


# ---- step 04 and its command line ----------------------------------------------------------
NOTEBOOK_04 = drop.NOTEBOOK


def _fake_calib(monkeypatch):
    monkeypatch.setattr(drop, "calib_texts", lambda source, n=None, **kw: TEXTS[:n])


def test_cli_layer_drop_with_calibration(base, model_tok, tmp_path, monkeypatch):
    _fake_calib(monkeypatch)
    a, r = tmp_path / "A", tmp_path / "bundles"
    rc = cli.main(
        [
            "layer-drop",
            "--model",
            str(base),
            "--drop_frac",
            "0.5",
            "--keep_last_layer",
            "--n-samples",
            "5",
            "--seq-len",
            "32",
            "--save_dir",
            str(a),
            "--save_removed_dir",
            str(r),
        ]
    )
    assert rc == 0
    plan = json.loads((tmp_path / "plan.json").read_text())  # the run dir: the parent of --save-dir
    model, tok = model_tok
    D = distance.angular_distances(model, tok, TEXTS[:5], seq_len=32, progress=False)
    stored = np.array([np.pad(row, (0, 8 - len(row)), constant_values=np.nan) for row in plan["distances"]])
    assert np.allclose(stored, D[1:], equal_nan=True, atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "distances.json").read_text())["rows"] == plan["distances"]
    l_star = int(np.argmin(D[4, :4]))  # n = 4, blocks must end before layer 7
    assert plan["dropped"] == list(range(l_star, l_star + 4))
    record = json.loads((a / "layer_drop.json").read_text())
    assert record["dropped"] == plan["dropped"] and record["n_layers"] == 8 and record["model_type"] == "mistral"
    assert record["kept"] == plan["kept"] and record["distances"] == plan["distances"]
    assert Checkpoint(a).config["num_hidden_layers"] == 4
    assert sorted(p.name for p in r.iterdir()) == ["B", "C", "layer_drop.json"]
    m = load_manifest(tmp_path)
    assert set(m["outputs"]) == {"stage_a", "bundles", "distances", "plan", "figures"}
    assert m["metrics"]["block"] == plan["block"] and m["metrics"]["n_calibration_texts"] == 5
    assert m["params"]["N_SAMPLES"] == 5 and m["params"]["BATCH_SIZE"] == notebook_defaults(NOTEBOOK_04)["BATCH_SIZE"]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["distance_heatmap.png", "min_distance_by_n.png"]


def test_cli_and_run_write_the_same_files(base, tmp_path, monkeypatch):
    """The command and notebook 04's Run cell are one function: same flags/parameters, same files."""
    _fake_calib(monkeypatch)
    flags = {"MODEL": str(base), "N_SAMPLES": 6, "SEQ_LEN": 32, "N_BUNDLES": 1}
    p = Params(notebook_defaults(NOTEBOOK_04) | flags | {"RUN_DIR": str(tmp_path / "nb"), "SWEEP": False})  # as the CLI
    result = drop.run(p)
    assert (result.stage_a, result.bundles) == (tmp_path / "nb" / "A", tmp_path / "nb" / "bundles")  # notebook paths
    args = ["--model", str(base), "--n-samples", "6", "--seq-len", "32", "--n-bundles", "1"]
    assert cli.main(["layer-drop", *args, "--run-dir", str(tmp_path / "cli")]) == 0
    nb, cl = tmp_path / "nb", tmp_path / "cli"
    for name in ("plan.json", "distances.json", "A/layer_drop.json", "bundles/layer_drop.json"):
        assert (nb / name).read_text() == (cl / name).read_text(), name
    assert compare(nb / "A", cl / "A").equal and compare(nb / "bundles/B", cl / "bundles/B").equal
    m_nb, m_cl = load_manifest(nb), load_manifest(cl)
    assert m_nb["metrics"] == m_cl["metrics"] and set(m_nb["outputs"]) == set(m_cl["outputs"])
    assert set(m_nb["params"]) == set(m_cl["params"]) and "ROOT" not in m_nb["params"]
    assert {k: v for k, v in m_cl["params"].items() if m_nb["params"][k] != v} == {
        "RUN_DIR": str(cl),
        "PRESET": None,
        "OVERWRITE": False,
    }
    assert result.plan == json.loads((nb / "plan.json").read_text()) and list(result.stages["stage"]) == ["A", "FULL"]
    assert list(result.figures) == ["distance_heatmap", "min_distance_by_n"] and result.summary.startswith("dropped")


def test_cli_layer_drop_explicit_and_overwrite(base, tmp_path, capsys):
    a, r = tmp_path / "A", tmp_path / "bundles"
    args = ["layer-drop", "--model", str(base), "--layers", "2-5", "--save-dir", str(a), "--save-removed-dir", str(r)]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(a) in err and "\n" not in err
    assert cli.main(args + ["--layers", "1-2", "--n-bundles", "1", "--overwrite"]) == 0
    assert sorted(p.name for p in r.iterdir()) == ["B", "layer_drop.json"]  # stale C removed
    assert json.loads((a / "layer_drop.json").read_text())["dropped"] == [1, 2]
    # an explicit block without --calib measures nothing: no distances.json, no figures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "bundles", "manifest.json", "plan.json"]
    assert load_manifest(tmp_path)["metrics"]["block_distance"] is None


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--drop-frac", "1.2"], "--drop-frac 1.2"),
        (["--layers", "4-8"], "--layers 4-8"),
        (["--layers", "5-7", "--keep-last-layer"], "touches the last layer"),
        (["--layers", "5-7"], "touches the last layer"),  # the notebook's default: KEEP_LAST_LAYER = True
        (["--n-bundles", "3"], "--n-bundles 3"),
    ],
)
def test_cli_bad_flags_fail_before_any_work(base, tmp_path, capsys, flags, needle):
    a, r = tmp_path / "A", tmp_path / "bundles"
    rc = cli.main(["layer-drop", "--model", str(base), *flags, "--save-dir", str(a), "--save-removed-dir", str(r)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and needle in err and "\n" not in err
    assert not a.exists() and not r.exists() and list(tmp_path.iterdir()) == []


def test_cli_no_keep_last_layer(base, tmp_path):
    flags = ["--layers", "5-7", "--no-keep-last-layer", "--n-bundles", "1", "--run-dir", str(tmp_path)]
    assert cli.main(["layer-drop", "--model", str(base), *flags]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["dropped"] == [5, 6, 7]

"""Entropy routing: entropy identity under padding, calibration (mix, accuracy), thresholds on disk, router, CLI."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from helpers.core.checkpoint import Checkpoint
from helpers.core.verify import fingerprint
from helpers.core.writer import copy_checkpoint
from helpers.eval import mmlu_pro
from helpers.layers import drop as layers
from helpers.layers import routing, serve
from helpers.layers import scoring as stage_scoring
from helpers.layers.routing import STAGES, Thresholds
from helpers.layers.serve import Router
from helpers.toy import synth

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "what is 3 plus 4 ?",
    "count the letters in apple .",
    "9",
    "sort these words : pear , fig , kiwi , and apple",
    "which number is largest : 5 , 9 , 2 ?",
    "the next letter after c is",
]
HEADER = re.compile(
    r"^stage (A|AB|FULL) \| entropy (\d+\.\d+) nats \| (\d+) tokens \| (\d+\.\d) tok/s \| routed in \d+ ms"
    r" \| saved vs FULL ([+-]\d+) ms$",
    re.M,
)


@pytest.fixture(scope="module")
def stages():
    """Stand-in stages of an 8-layer random Mistral: FULL, AB (layer 6 dropped), A (layers 4-6 dropped)."""
    full = synth.random_model(synth.tiny_config("mistral"), seed=3, std=0.1)
    return {
        "A": layers.keep_layers_copy(full, [0, 1, 2, 3, 7]),
        "AB": layers.keep_layers_copy(full, [0, 1, 2, 3, 4, 5, 7]),
        "FULL": full,
    }


@pytest.fixture(scope="module")
def tok():
    return synth.tiny_tokenizer()


def direct_entropy(model, tok, prompt: str) -> float:
    """Unbatched, unpadded: entropy from the full forward's last logits, in float64."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    return float(-(p * torch.log(p)).sum())


@pytest.mark.parametrize("side", ["left", "right"])
def test_entropy_matches_direct_computation_under_padding(stages, tok, side):
    tok.padding_side = side
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()  # the batch really is padded
    batched = routing.last_token_entropy(stages["A"], enc["input_ids"], enc["attention_mask"]).double().numpy()
    via_prompts = routing.prompt_entropy(stages["A"], tok, PROMPTS, batch_size=4)
    direct = np.array([direct_entropy(stages["A"], tok, p) for p in PROMPTS])
    np.testing.assert_allclose(batched, direct, atol=1e-6, rtol=0)
    np.testing.assert_allclose(via_prompts, direct, atol=1e-6, rtol=0)
    assert np.ptp(direct) > 1e-3  # distinct prompts, distinct entropies: the comparison can fail


def test_calibrate_mix_yields_the_mix_on_its_set():
    h = np.random.default_rng(0).gamma(2.0, 1.0, size=50)
    th = routing.calibrate_mix(h, (0.5, 0.3, 0.2), fingerprint="f")
    counts = {st: int((th.stages(h) == st).sum()) for st in STAGES}
    assert counts == {"A": 25, "AB": 15, "FULL": 10}
    assert th.calib["mix"] == {"A": 0.5, "AB": 0.3, "FULL": 0.2}
    assert (th.stages(h) == "A").sum() == (h <= np.sort(h)[24]).sum()  # A takes the 25 lowest entropies
    assert set(routing.calibrate_mix(h, (1, 0, 0), fingerprint="f").stages(h)) == {"A"}
    assert set(routing.calibrate_mix(h, (0, 0, 1), fingerprint="f").stages(h)) == {"FULL"}
    with pytest.raises(ValueError, match="mix"):
        routing.calibrate_mix(h, (0.5, 0.5, 0.5), fingerprint="f")


def _toy_correctness(n: int, seed: int):
    """Entropy-correlated correctness: A fails more often at high entropy, FULL rarely."""
    rng = np.random.default_rng(seed)
    h = rng.uniform(0, 5, n)
    correct = {"A": rng.uniform(0, 5, n) > h, "AB": rng.uniform(0, 7, n) > h, "FULL": rng.uniform(0, 12, n) > h}
    return h, correct


def test_calibrate_accuracy_meets_target_with_fewest_layers():
    h, correct = _toy_correctness(40, seed=1)
    layers = {"A": 5, "AB": 7, "FULL": 8}
    target = 0.8
    th = routing.calibrate_accuracy(h, correct, target, layers, fingerprint="f")
    out = routing.routed_outcome(h, correct, layers, th)
    assert out["accuracy"] >= target
    assert th.calib == out
    # Brute force over every pair of thresholds at midpoints: none meets the target with fewer layers.
    s = np.sort(h)
    cuts = [-1.0] + [(a + b) / 2 for a, b in zip(s[:-1], s[1:])] + [math.inf]
    feasible = [
        routing.routed_outcome(h, correct, layers, Thresholds(a, b, "manual", None, len(h), ""))
        for i, a in enumerate(cuts)
        for b in cuts[i:]
    ]
    feasible = [o for o in feasible if o["accuracy"] >= target]
    assert min(o["avg_layers"] for o in feasible) == pytest.approx(out["avg_layers"])
    assert out["avg_layers"] < layers["FULL"]  # the target leaves room to save layers
    with pytest.raises(ValueError, match="no thresholds reach"):
        routing.calibrate_accuracy(h, correct, 1.01, layers, fingerprint="f")


def test_sweep_spans_pure_stages_and_marks_the_frontier():
    h, correct = _toy_correctness(60, seed=2)
    layers = {"A": 5, "AB": 7, "FULL": 8}
    df = routing.sweep(h, correct, layers, n_grid=11)
    for st in STAGES:
        pure = df[df[f"frac_{st}"] == 1.0]
        assert len(pure) == 1 and pure["accuracy"].item() == pytest.approx(np.mean(correct[st]))
        assert pure["avg_layers"].item() == layers[st]
    front = df[df["pareto"]]
    for _, r in front.iterrows():
        assert not ((df["accuracy"] > r["accuracy"]) & (df["avg_layers"] <= r["avg_layers"])).any()
    assert not df[~df["pareto"]].empty


def test_thresholds_roundtrip_json_and_refuse_another_base(tmp_path, tiny_mistral):
    fp = fingerprint(tiny_mistral)
    same = copy_checkpoint(tiny_mistral, tmp_path / "copy")
    other = synth.save_random(synth.tiny_config("mistral"), tmp_path / "other", n_shards=2, seed=7)
    assert fingerprint(same) == fp
    assert fingerprint(other) != fp
    th = routing.calibrate_mix(np.linspace(0, 3, 10), (0.6, 0.4, 0.0), fingerprint=fp)
    assert math.isinf(th.t_ab)  # nothing goes to FULL: no upper bound, stored as null
    path = th.save(tmp_path / "thresholds.json")
    assert json.loads(path.read_text())["t_ab"] is None
    back = Thresholds.load(path, fingerprint=fingerprint(same))
    assert back == th
    with pytest.raises(ValueError, match="recalibrate"):
        Thresholds.load(path, fingerprint=fingerprint(other))
    with pytest.raises(FileNotFoundError, match="no thresholds file"):
        Thresholds.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format": routing.FORMAT, "t_a": 1.0}))
    with pytest.raises(ValueError, match="malformed"):
        Thresholds.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="t_a <= t_ab"):
        Thresholds(2.0, 1.0, "manual", None, 0, fp)


def _spread_thresholds(stages, tok, prompts) -> tuple[Thresholds, np.ndarray]:
    """Thresholds that put the lowest-entropy prompt in A, the middle ones in AB, the highest in FULL."""
    h = routing.prompt_entropy(stages["A"], tok, prompts)
    s = np.sort(h)
    return Thresholds((s[0] + s[1]) / 2, (s[-2] + s[-1]) / 2, "manual", None, len(h), "fp"), h


def test_router_sends_prompt_to_the_stage_its_entropy_dictates(stages, tok):
    th, h = _spread_thresholds(stages, tok, PROMPTS)
    router = Router(stages, tok, th, fingerprint="fp")
    seen = set()
    for p, hp in zip(PROMPTS, h):
        r = router.generate(p, max_new_tokens=4)
        assert r.stage == th.stage(hp) and r.entropy == pytest.approx(hp, abs=1e-6)
        ids = tok(p, return_tensors="pt")["input_ids"]
        own = stages[r.stage].generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert r.text == tok.decode(own[0, ids.shape[1] :], skip_special_tokens=True)  # generated by that stage
        assert r.new_tokens == own.shape[1] - ids.shape[1] and r.tokens_per_s > 0
        seen.add(r.stage)
    assert seen == set(STAGES)
    stages_many, h_many = router.route(PROMPTS, batch_size=4)
    assert list(stages_many) == [th.stage(x) for x in h] and np.allclose(h_many, h, atol=1e-6)
    with pytest.raises(ValueError, match="recalibrate"):
        Router(stages, tok, th, fingerprint="another")


def test_repl_serves_lines_until_quit(stages, tok):
    th, _ = _spread_thresholds(stages, tok, PROMPTS)
    router = Router(stages, tok, th)
    out = io.StringIO()
    served = serve.repl(router, io.StringIO(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n:q\n{PROMPTS[2]}\n"), out, max_new_tokens=3)
    heads = HEADER.findall(out.getvalue())
    assert served == 2 and len(heads) == 2
    for (stage, ent, _, _, _), p in zip(heads, PROMPTS[:2]):
        assert (stage, float(ent)) == (router.choose(p)[0], pytest.approx(router.choose(p)[1], abs=1e-4))


# ---- scoring stages through helpers.eval ------------------------------------------------------
QUESTIONS = [
    mmlu_pro.Question(i, q, tuple(opts), "ABCDE"[a], a, "toy")
    for i, (q, opts, a) in enumerate(
        [
            ("what is 3 plus 4 ?", ["7", "8", "12", "1"], 0),
            ("which number is largest : 5 , 9 , 2 ?", ["5", "9", "2"], 1),
            ("the next letter after c is", ["d", "e", "b", "apple", "c"], 0),
        ]
    )
]


def test_cloze_on_a_stage_equals_unbatched_option_loglik(stages, tok):
    """Notebook 05's per-question correctness (helpers.eval cloze) against full unbatched rows in float64."""
    model = stages["AB"]
    want = []
    for q in QUESTIONS:
        ctx = tok(mmlu_pro.cloze_context(q))["input_ids"]
        row = []
        for opt in q.options:
            cont = tok(f" {opt}", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            row.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        want.append(row)
    for bs in (1, 3):
        raw, _ = mmlu_pro.score_cloze(model, tok, QUESTIONS, batch_size=bs, progress=False)
        np.testing.assert_allclose(np.concatenate(raw.outputs), np.concatenate(want), atol=1e-4, rtol=0)
    ok = mmlu_pro.cloze_correct(model, tok, QUESTIONS, batch_size=5, progress=False)
    assert ok.dtype == bool and list(ok) == [int(np.argmax(w)) == q.answer_index for w, q in zip(want, QUESTIONS)]


def test_mean_nll_and_stage_table(stages, tok):
    model = stages["FULL"]
    text = PROMPTS[3]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = float(model(ids, labels=ids).loss)
    assert stage_scoring.mean_nll(model, tok, [text]) == pytest.approx(want, abs=1e-5)
    table = stage_scoring.stage_table(stages, tok, PROMPTS, base=stages["FULL"])
    assert table.set_index("stage")["layers"].to_dict() == {"A": 5, "AB": 7, "FULL": 8}
    diffs = table.set_index("stage")["max_abs_logit_diff_vs_base"]
    assert diffs["FULL"] == 0.0 and diffs["A"] > 0 and diffs["AB"] > 0


def test_model_report_is_loss_and_eval_cloze_accuracy(stages, tok):
    report = stage_scoring.model_report(
        {st: stages[st] for st in ("A", "FULL")}, tok, PROMPTS[:3], QUESTIONS, batch_size=2
    ).set_index("model")
    for st in ("A", "FULL"):
        assert report.loc[st, "loss"] == pytest.approx(stage_scoring.mean_nll(stages[st], tok, PROMPTS[:3]), abs=1e-6)
        want = mmlu_pro.score_cloze(stages[st], tok, QUESTIONS, progress=False)[0].summary()["acc"]
        assert report.loc[st, "cloze_acc"] == pytest.approx(want)
    # flags scored earlier (notebook 05's stages) are taken as given, not scored again
    flipped = ~mmlu_pro.cloze_correct(stages["A"], tok, QUESTIONS, progress=False)  # 3 questions: mean != its flip's
    again = stage_scoring.model_report({"A": stages["A"]}, tok, PROMPTS[:3], QUESTIONS, cloze={"A": flipped})
    assert again.set_index("model").loc["A", "cloze_acc"] == pytest.approx(flipped.mean())


# ---- CLI on a real layer drop ------------------------------------------------------------------
@pytest.fixture(scope="module")
def on_disk(stages, tmp_path_factory):
    """The `stages` fixture's FULL saved and cut by `layers.apply_layer_drop` (layers 4-6: B = 4-5, C = 6),
    so `bundles.load_stages` rebuilds the same A / AB / FULL; spread thresholds at the default location."""
    root = tmp_path_factory.mktemp("route")
    full = stages["FULL"]
    src = synth.save_random(full.config, root / "base", n_shards=2, model=full)
    plan = layers.plan_layer_drop(Checkpoint(src).config, None, layers="4-6")
    assert plan["bundles"] == {"B": [4, 5], "C": [6]}
    a_dir, _ = layers.apply_layer_drop(src, plan, root / "A", root / "bundles")
    th, _ = _spread_thresholds(stages, AutoTokenizer.from_pretrained(a_dir), PROMPTS)
    th.fingerprint = fingerprint(a_dir)
    th.save(root / "bundles" / routing.THRESHOLDS_FILE)
    return root


def test_cli_route_one_shot(on_disk, capsys):
    from helpers.cli import main

    base = ["route", "--base-model", str(on_disk / "A"), "--bundles-dir", str(on_disk / "bundles")]
    assert main([*base, "--prompt", PROMPTS[2], "--max_new_tokens", "2"]) == 0  # snake_case alias too
    heads = HEADER.findall(capsys.readouterr().out)
    assert len(heads) == 1 and int(heads[0][2]) <= 2
    assert main([*base, "--prompt", "  "]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_cli_route_refuses_thresholds_of_another_base(on_disk, tmp_path, capsys):
    from helpers.cli import main

    th = Thresholds.load(on_disk / "bundles" / "thresholds.json")
    th.fingerprint = "0123456789abcdef"
    th.save(tmp_path / "other.json")
    base = ["route", "--base-model", str(on_disk / "A"), "--bundles-dir", str(on_disk / "bundles")]
    assert main([*base, "--thresholds", str(tmp_path / "other.json"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "recalibrate" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--thresholds", str(tmp_path / "none.json"), "--prompt", "hi"]) == 2
    assert "no thresholds file" in capsys.readouterr().err


def test_route_cli_end_to_end_on_layer_drop_output(tmp_path):
    """The real pipeline: layer-drop writes A + bundles, bundles.load_stages reads them, route serves stdin
    until ':q' (a subprocess, as a user runs it)."""
    from helpers.cli import main
    from helpers.layers import bundles

    cfg = synth.tiny_config("mistral")
    src = synth.save_random(cfg, tmp_path / "base", n_shards=2, model=synth.random_model(cfg, seed=3, std=0.1))
    a, b = tmp_path / "A", tmp_path / "bundles"
    assert (
        main(["layer-drop", "--model", str(src), "--layers", "4-6", "--save-dir", str(a), "--save-removed-dir", str(b)])
        == 0
    )
    stages = bundles.load_stages(a, b)
    tok = AutoTokenizer.from_pretrained(a)
    h = np.array([routing.prompt_entropy(stages["A"], tok, [p])[0] for p in PROMPTS])  # the router's own path
    s = np.sort(h)
    th = Thresholds((s[0] + s[1]) / 2, (s[-2] + s[-1]) / 2, "manual", None, len(h), fingerprint(a))
    th.save(b / routing.THRESHOLDS_FILE)  # the default location
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    stdin = "\n".join([*PROMPTS, ":q", PROMPTS[0]]) + "\n"  # nothing after ':q' is served
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "helpers",
            "route",
            "--base-model",
            str(a),
            "--bundles-dir",
            str(b),
            "--max-new-tokens",
            "3",
        ],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    heads = HEADER.findall(res.stdout)
    assert [x[0] for x in heads] == [th.stage(v) for v in h]
    assert all(int(x[2]) <= 3 for x in heads)
    assert {x[0] for x in heads} == set(STAGES)
    np.testing.assert_allclose([float(x[1]) for x in heads], h, atol=1e-4)


# ---- step 05 in one call -----------------------------------------------------------------------
def test_stages_run_writes_what_notebook_05_records(on_disk, tiny_mmlu, tmp_path):
    """`stages.run` on a real layer drop, with the notebook's own parameter names (tiny values)."""
    from helpers.core.manifest import Manifest, load, output_path
    from helpers.core.steps import Params, notebook_defaults
    from helpers.layers import stages as step

    m04 = Manifest("04_layer_drop_mistral").output("stage_a", on_disk / "A").output("bundles", on_disk / "bundles")
    m04.save(tmp_path / "04")
    (tmp_path / "heal.txt").write_text("\n".join(PROMPTS * 3))
    run_dir = tmp_path / "05"
    p = Params(notebook_defaults(REPO / "notebooks/05_bundles_and_routing.ipynb")).replace(
        layer_drop_manifest=str(tmp_path / "04/manifest.json"),
        run_dir=str(run_dir),
        mmlu_data=str(tiny_mmlu),
        n_questions=None,
        accuracy_keep=0.5,
        n_grid=5,
        n_check=2,
        n_demo=2,
        max_new_tokens=2,
        heal_data=str(tmp_path / "heal.txt"),
        n_heal=8,
        n_heldout=4,
        heal_presets=["mistral-healing", "ffn-healing"],
        heal_overrides={"steps": 1, "batch_size": 4, "grad_accum": 1, "max_length": 32, "warmup_steps": 0},
        device="cpu",
    )
    r = step.run(p)

    m = load(run_dir)
    assert m == json.loads(json.dumps(r.manifest.data, default=str))  # saved last, as returned
    assert list(m["outputs"]) == ["thresholds", "stage_ab", "stage_full", "healed_a", "router_report", "figures"]
    assert m["inputs"]["base"]["path"] == str(on_disk / "base") and m["params"]["N_GRID"] == 5
    assert m["metrics"]["full_max_abs_logit_diff"] == 0.0 and m["metrics"]["full_equals_base_tensors"] is True
    assert m["metrics"]["layers"] == {"A": 5, "AB": 7, "FULL": 8} and m["metrics"]["n_calib"] == 9
    held = {k for k in m["metrics"] if k.startswith("held_out_")}
    assert held == {f"held_out_only_{st}" for st in STAGES} | {"held_out_mix", "held_out_accuracy"}
    assert set(m["metrics"]["heal_loss"]) == {"A", "A healed (mistral-healing)", "A healed (ffn-healing)", "FULL"}
    th = Thresholds.load(output_path(m, "thresholds"), fingerprint=fingerprint(on_disk / "A"))
    assert th.method == "accuracy" and th.to_dict() == json.loads((run_dir / "thresholds_accuracy.json").read_text())
    assert (run_dir / "healed_a").is_dir() and (run_dir / "healed_a_ffn-healing").is_dir()
    assert (
        set(json.loads(output_path(m, "router_report").read_text()))
        == set(r.report)
        == {
            "stage_checks",
            "layers",
            "thresholds",
            "held_out",
            "auroc_entropy_flags_errors",
            "router_demo",
            "routed_speed",
            "full_vs_base",
            "healing",
            "healing_training",
        }
    )
    assert len(r.scores) == len(pd.read_csv(run_dir / "scores.csv")) == m["metrics"]["n_questions"]
    assert len(pd.read_csv(run_dir / "tradeoff.csv")) == len(r.curve) and len(r.demo) == 2
    sp = r.report["routed_speed"]  # measured on the demo prompts, routing pass included
    assert sp["prompts"] == 2 and sp["summary"].startswith("measured end to end") and sp["tok_s"]["routed"] > 0
    assert m["metrics"]["routed_over_full_measured"] == sp["routed_over_full"]
    assert sorted(sp["mix"]) == sorted(STAGES) and r.demo["saved_seconds"].notna().all()
    assert list(r.by_category.columns) == [f"correct_{st}" for st in STAGES]
    assert (
        {f.name for f in (run_dir / "figures").glob("*.png")}
        == {f.name for f in r.figures.values()}
        == {
            "entropy_by_correctness.png",
            "tradeoff.png",
            "healing.png",
        }
    )

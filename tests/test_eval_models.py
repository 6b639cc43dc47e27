"""Scoring on tiny random models: shared-prefix engine, agreement with LightEval, layouts, routing, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.core.models import load_model
from helpers.core.writer import copy_checkpoint
from helpers.eval import engine, lighteval_run, mmlu_pro, results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mistral(tiny_mistral):
    return load_model(tiny_mistral, "float32", "cpu")


@pytest.fixture(scope="module")
def questions(tiny_mmlu):
    return mmlu_pro.load(tiny_mmlu, limit=9)


def _naive(model, tok, ctx, conts):
    """Reference: every (context, continuation) as its own full row, one at a time."""
    c, ks = engine.encode_pair(tok, ctx, conts)
    out = []
    with torch.no_grad():
        for k in ks:
            lp = F.log_softmax(model(torch.tensor([c + k])).logits[0].float(), -1)
            out.append(float(sum(lp[len(c) - 1 + t, k[t]] for t in range(len(k)))))
    return out


def test_shared_prefix_scoring_equals_full_rows(mistral, questions):
    model, tok = mistral
    qs, _ = questions
    reqs = [(mmlu_pro.cloze_context(q), mmlu_pro.cloze_choices(q)[:4]) for q in qs[:4]]
    reqs += [
        ("Answer: ", ["A", "BB BB", "the answer is (C)"]),
        ("x", [" y"]),  # trailing space; 1-token option
        (mmlu_pro.loglik_prompt(qs[0]), mmlu_pro.loglik_choices(qs[0])),  # letters
        ("So", [" the answer is (C)", " the answer is (D)", " the answer is (C) or"]),
    ]  # long shared start
    split = [engine.split_common(*engine.encode_pair(tok, *r)) for r in reqs]
    assert any(n > 1 for _, n, _ in split) and any(len(k) > 1 for _, _, ks in split for k in ks)  # both paths run
    want = [_naive(model, tok, *r) for r in reqs]
    for bs in (1, 3):
        got = engine.score_choices(model, tok, reqs, batch_size=bs, progress=False)
        assert [len(g) for g in got] == [len(w) for w in want]
        assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-4
        # the ranking of options (what accuracy reads) is the same
        assert [max(range(len(g)), key=g.__getitem__) for g in got] == [
            max(range(len(w)), key=w.__getitem__) for w in want
        ]


def test_cloze_correct_flags_and_option_order(mistral, questions):
    """Per-question flags are the argmax of the raw (or per-character) scores; reversing a question's
    options reverses its scores, and the flags stay."""
    model, tok = mistral
    qs, _ = questions
    raw, norm = mmlu_pro.score_cloze(model, tok, qs, batch_size=4, progress=False)
    for result, normalised in ((raw, False), (norm, True)):
        flags = mmlu_pro.cloze_correct(model, tok, qs, batch_size=3, normalised=normalised, progress=False)
        scores = [
            [x / (len(o) + 1) if normalised else x for x, o in zip(out, q.options)] for out, q in zip(raw.outputs, qs)
        ]
        assert (
            list(flags)
            == result.correct
            == [max(range(len(s)), key=s.__getitem__) == q.answer_index for s, q in zip(scores, qs)]
        )
    rev = [
        mmlu_pro.Question(
            q.question_id,
            q.question,
            q.options[::-1],
            mmlu_pro.LETTERS[len(q.options) - 1 - q.answer_index],
            len(q.options) - 1 - q.answer_index,
            q.category,
        )
        for q in qs
    ]
    back, _ = mmlu_pro.score_cloze(model, tok, rev, batch_size=4, progress=False)
    assert max(abs(a - b) for o, r in zip(raw.outputs, back.outputs) for a, b in zip(o, r[::-1])) < 1e-4
    assert back.correct == raw.correct


def test_loglik_equals_lighteval(mistral, questions, tiny_mistral, tmp_path):
    model, tok = mistral
    qs, shots = questions
    ours = mmlu_pro.score_loglik(model, tok, qs, shots, progress=False)
    (theirs,) = lighteval_run.run_lighteval(
        model, qs, shots, tmp_path, modes=("loglik",), tokenizer=tiny_mistral, batch_size=4, name="tiny"
    )
    assert theirs.preds == ours.preds  # per question
    assert theirs.summary()["acc"] == ours.summary()["acc"] == pytest.approx(theirs.extra["lighteval_acc"])
    flat = lambda r: [x for o in r.outputs for x in o]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(flat(ours), flat(theirs))) < 1e-4
    assert (tmp_path / theirs.extra["lighteval_results"]).is_file()  # lighteval's own output kept
    assert list((tmp_path / "lighteval" / "loglik" / "details").rglob("*.parquet"))


def test_cot_generation_equals_lighteval(mistral, questions, tiny_mistral, tmp_path):
    model, tok = mistral
    qs, shots = questions
    qs = qs[:3]
    (ours,) = mmlu_pro.score_cot(model, tok, qs, shots, max_new_tokens=8, max_model_length=None, progress=False)
    (theirs,) = lighteval_run.run_lighteval(
        model,
        qs,
        shots,
        tmp_path,
        modes=("cot",),
        tokenizer=tiny_mistral,
        batch_size=4,
        max_new_tokens=8,
        max_length=4096,
    )
    assert ours.outputs == theirs.outputs and ours.preds == theirs.preds
    assert all(len(o) > 0 for o in ours.outputs)


def test_sequential_lighteval_runs_keep_each_modes_output(mistral, questions, tiny_mistral, tmp_path):
    """A cot run after a loglik run into the same variant dir leaves the loglik output results.json points at."""
    from helpers.eval.results import config_block, write_results

    model, _ = mistral
    qs, shots = questions
    for mode in ("loglik", "cot", "loglik"):  # the second loglik run replaces only its own output
        (task,) = lighteval_run.run_lighteval(
            model,
            qs[:2],
            shots,
            tmp_path,
            modes=(mode,),
            tokenizer=tiny_mistral,
            batch_size=2,
            max_new_tokens=4,
            name="tiny",
        )
        write_results(tmp_path, config_block(tiny_mistral, "tiny"), [task])
    doc = json.loads((tmp_path / results.RESULTS).read_text())
    pointers = {t: doc["results"][t]["lighteval_results"] for t in ("lighteval_loglik", "lighteval_cot")}
    assert all((tmp_path / p).is_file() for p in pointers.values()), pointers
    assert [p.split("/")[:2] for p in pointers.values()] == [["lighteval", "loglik"], ["lighteval", "cot"]]
    assert len(list((tmp_path / "lighteval" / "loglik").rglob("results_*.json"))) == 1  # only the latest loglik run


def test_layouts_score_identically(tiny_mixtral, tiny_mmlu, tmp_path):
    repacked = copy_checkpoint(tiny_mixtral, tmp_path / "repacked", max_shard_size="20KB")
    from helpers.core.checkpoint import Checkpoint

    assert len(Checkpoint(repacked).shards) != len(Checkpoint(tiny_mixtral).shards)
    qs, shots = mmlu_pro.load(tiny_mmlu, limit=6)
    runs = []
    for path in (tiny_mixtral, repacked):
        model, tok = load_model(path, "float32", "cpu")
        runs.append(
            [
                r.outputs
                for mode in ("loglik", "cloze")
                for r in mmlu_pro.evaluate(model, tok, qs, shots, mode=mode, progress=False)
            ]
        )
    assert runs[0] == runs[1]  # every option's log-likelihood, bit for bit


def test_routed_scores_each_question_with_its_stage(mistral, tiny_mixtral, questions):
    model, tok = mistral
    other, _ = load_model(tiny_mixtral, "float32", "cpu")  # same vocab and tokenizer: a stand-in second stage
    qs, _ = questions
    stage_of = {q.question_id: ("A" if i % 3 else "FULL") for i, q in enumerate(qs)}
    (routed,) = mmlu_pro.route_and_score({"A": model, "FULL": other}, tok, qs, stage_of, mode="loglik", progress=False)
    alone = {s: mmlu_pro.score_loglik(m, tok, qs, progress=False) for s, m in (("A", model), ("FULL", other))}
    for i, q in enumerate(qs):
        assert routed.preds[i] == alone[stage_of[q.question_id]].preds[i]
    assert routed.extra["stage_mix"] == {"A": 6, "FULL": 3}
    assert [s["stage"] for s in routed.samples()] == [stage_of[q.question_id] for q in qs]
    with pytest.raises(KeyError, match="router chose stages"):
        mmlu_pro.route_and_score({"A": model}, tok, qs, stage_of, mode="loglik")


def _cli(*args, cwd):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        HF_HOME=str(Path(cwd) / "hf_home"),
    )
    return subprocess.run(
        [sys.executable, "-m", "helpers", "evaluate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_offline_merges_modes_and_benches(tiny_mistral, tiny_mmlu, tmp_path):
    out = tmp_path / "eval_results" / "toy" / "base_mistral"
    common = ["--model", str(tiny_mistral), "--data", str(tiny_mmlu), "--limit", "3", "--out", str(out)]
    r = _cli(*common, "--bench", "mmlu-pro", "--mode", "cloze", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(*common, "--bench", "lighteval", "--mode", "loglik", "--batch-size", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["results"]) == {"mmlu_pro_cloze", "mmlu_pro_cloze_norm", "lighteval_loglik"}
    assert doc["config"]["variant"] == "base_mistral" and doc["config"]["plan"]["lighteval_limit"] == 3
    assert all(doc["results"][t]["n"] == 3 for t in doc["results"])
    assert {"prefill_tok_s", "decode_tok_s", "peak_memory_bytes"} <= set(doc["speed"])
    assert len(results.read_samples(out, "lighteval_loglik")) == 3
    assert doc["results"]["lighteval_loglik"]["acc"] == doc["results"]["lighteval_loglik"]["lighteval_acc"]


def test_cli_bad_flags_are_one_line_errors(tiny_mistral, tiny_mmlu, tmp_path, capsys):
    from helpers.cli import main

    common = ["evaluate", "--model", str(tiny_mistral), "--data", str(tiny_mmlu), "--out", str(tmp_path / "o")]
    assert main(common + ["--bench", "lighteval", "--mode", "cloze"]) == 2
    assert "use --bench mmlu-pro for cloze" in capsys.readouterr().err
    assert (
        main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(tiny_mmlu), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "not a checkpoint directory" in capsys.readouterr().err


def test_stage_model_keeping_original_layer_indices_scores_like_renumbered(tiny_mistral, questions):
    """Stages that share modules keep their layers' original layer_idx (helpers/bundles.py); our cache
    is built without a config, so scoring and generation work on them and match a renumbered copy."""
    import copy

    qs, shots = questions
    kept, tok = load_model(tiny_mistral)
    keep = [0, 1, 4, 5, 6, 7]
    kept.model.layers = torch.nn.ModuleList([kept.model.layers[i] for i in keep])
    kept.config.num_hidden_layers = len(keep)
    if getattr(kept.config, "layer_types", None):
        kept.config.layer_types = [kept.config.layer_types[i] for i in keep]
    renum = copy.deepcopy(kept)
    for i, layer in enumerate(renum.model.layers):
        layer.self_attn.layer_idx = i
    assert [l.self_attn.layer_idx for l in kept.model.layers] == keep
    reqs = [(mmlu_pro.cloze_context(q), mmlu_pro.cloze_choices(q)) for q in qs[:4]]
    assert engine.score_choices(kept, tok, reqs, progress=False) == engine.score_choices(
        renum, tok, reqs, progress=False
    )
    prompts = [mmlu_pro.cot_prompt(q, shots, 1) for q in qs[:2]]
    assert engine.generate(kept, tok, prompts, max_new_tokens=5, progress=False) == engine.generate(
        renum, tok, prompts, max_new_tokens=5, progress=False
    )


def _strings(path: Path) -> str:
    """All text of a kept results file (parquet details as their rows)."""
    if path.suffix == ".parquet":
        import pandas as pd

        return repr(pd.read_parquet(path).to_dict())
    return path.read_text()


def test_kept_results_carry_no_absolute_or_temp_paths(tiny_mistral, tiny_mmlu, monkeypatch):
    """A model and data under the repo, results written from the repo root: results.json, samples and
    LightEval's kept files (in-memory run, and a run from the checkpoint dir) name paths repo-relative,
    never the absolute root or LightEval's temp dir."""
    import shutil
    import tempfile

    from helpers.core.manifest import Manifest
    from helpers.eval import Plan, evaluate_dir

    monkeypatch.chdir(ROOT)
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs", prefix="pytest-portable-") as d:
        d = Path(d)
        model, data = shutil.copytree(tiny_mistral, d / "mistral"), shutil.copytree(tiny_mmlu, d / "mmlu_pro")
        Manifest("toy").output("mistral", model).save(d)  # the parent manifest evaluate_dir finds
        out = d / "eval" / "mistral_base"
        plan = Plan(modes=("cloze",), limit=3, lighteval_modes=("loglik",), lighteval_limit=3, batch_size=4)
        evaluate_dir(Path(model).resolve(), out.resolve(), plan, data=Path(data).resolve(), progress=False)
        qs, shots = mmlu_pro.load(data, limit=2)
        lighteval_run.run_lighteval(str(Path(model).resolve()), qs, shots, d / "eval" / "by_dir", batch_size=2)

        rel = str(d.relative_to(ROOT))
        cfg = json.loads((out / results.RESULTS).read_text())["config"]
        assert (cfg["model"], cfg["data"]) == (f"{rel}/mistral", f"{rel}/mmlu_pro")
        assert cfg["parent_manifest"] == f"{rel}/manifest.json"
        kept = [p for p in (d / "eval").rglob("*") if p.is_file()]
        assert {p.suffix for p in kept} >= {".json", ".jsonl", ".parquet"}
        assert len([p for p in kept if p.name.startswith("results_")]) == 2  # LightEval's own, both runs
        for p in kept:
            text = _strings(p)
            assert str(ROOT) not in text and "/tmp/" not in text, p
            assert '"/' not in text and "'/" not in text, p  # no string value is an absolute path
        le = json.loads(next((d / "eval" / "by_dir").rglob("results_*.json")).read_text())["config_general"]
        assert le["model_name"] == f"{rel}/mistral" and le["model_config"]["cache_dir"].startswith("<tmp>/")
        assert (d / "eval" / "by_dir" / "lighteval" / "loglik" / "details" / rel / "mistral").is_dir()

"""The toy world: deterministic data and tokenizer, schema on every row, a --quick build that loads
offline, the manifest cache, and accuracies that are helpers.eval's scores of the saved models."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from helpers.core.checkpoint import Checkpoint
from helpers.core.manifest import load as load_manifest
from helpers.core.models import load_check
from helpers.toy import measure
from helpers.toy import tasks as toy_tasks
from helpers.toy import world as toy
from helpers.toy.train import encode_cot, encode_pairs

SPLITS = ("test", "validation", "train")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _data_and_tokenizer(root: Path, seed: int) -> dict[str, bytes]:
    spec = toy.spec_for(quick=True)
    splits = toy.write_data(root, spec, seed)
    toy.train_tokenizer(toy.tokenizer_corpus(splits), spec["tokenizer"]["vocab_size"], root / "tokenizer")
    return _files(root)


def test_same_seed_gives_identical_bytes(tmp_path):
    a = _data_and_tokenizer(tmp_path / "a", seed=0)
    b = _data_and_tokenizer(tmp_path / "b", seed=0)
    c = _data_and_tokenizer(tmp_path / "c", seed=1)
    assert {f"mmlu_pro/data/{s}-00000-of-00001.parquet" for s in SPLITS} <= set(a)
    assert {
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "finetune/train.jsonl",
        "calib/calib.jsonl",
    } <= set(a)
    assert a == b
    assert a["mmlu_pro/data/test-00000-of-00001.parquet"] != c["mmlu_pro/data/test-00000-of-00001.parquet"]


def _read(root: Path, split: str) -> list[dict]:
    t = pq.read_table(root / "mmlu_pro" / "data" / f"{split}-00000-of-00001.parquet")
    assert t.schema.names == toy_tasks.SCHEMA.names
    assert [f.type for f in t.schema] == [f.type for f in toy_tasks.SCHEMA]
    return t.to_pylist()


def test_schema_holds_on_every_row(tmp_path):
    spec = toy.spec_for(quick=False)
    spec["data"].update(train=200)  # full-size test and validation splits, a smaller train split
    toy.write_data(tmp_path, spec, seed=0)
    rows = {s: _read(tmp_path, s) for s in SPLITS}
    for _split, rs in rows.items():
        for r in rs:
            toy_tasks.check_row(r)
            assert r["answer"] == "ABCDEFGHIJ"[r["answer_index"]]
            assert r["options"] and len(set(r["options"])) == len(r["options"]) <= 10
            assert r["cot_content"].endswith(f"The answer is ({r['answer']}).")
        assert len({r["question_id"] for r in rs}) == len(rs)
    cats = sorted(toy_tasks.CATEGORIES)
    assert len(cats) >= 6
    for split, per_cat in (("validation", 5), ("test", spec["data"]["test"])):
        assert sorted({r["category"] for r in rows[split]}) == cats
        assert all(sum(r["category"] == c for r in rows[split]) == per_cat for c in cats)
    assert len({len(r["options"]) for r in rows["test"]}) >= 4  # several option counts, up to 10
    assert max(len(r["options"]) for r in rows["test"]) == 10
    # held out: no test question text reaches train (word classes ask one fixed question per class)
    train_q = {r["question"] for r in rows["train"]}
    leaked = [r["question"] for r in rows["test"] if r["category"] != "word classes" and r["question"] in train_q]
    assert leaked == []


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"options": ["1", "1", "2"]}, "duplicate"),
        ({"answer": "C"}, "does not match"),
        ({"options": ["1", "", "2"]}, "non-empty"),
        ({"cot_content": "A: Let's think step by step. The answer is (C)."}, "official style"),
    ],
)
def test_check_row_rejects_broken_rows(bad, msg):
    row = {
        "question_id": 7,
        "question": "q?",
        "options": ["1", "2", "3"],
        "answer": "B",
        "answer_index": 1,
        "cot_content": toy_tasks.cot("r.", "B"),
        "category": "c",
        "src": "s",
    }
    toy_tasks.check_row(row)
    with pytest.raises(ValueError, match=msg):
        toy_tasks.check_row({**row, **bad})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return toy.build_world(tmp_path_factory.mktemp("toy") / "world", quick=True, seed=0)


def test_quick_world_loads_offline(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = load_manifest(world)
    assert m["step"] == "toy"
    assert {"mixtral", "mistral", "mmlu_pro", "finetune", "calib", "tokenizer"} <= set(m["outputs"])
    for kind in ("mixtral", "mistral"):
        path = Path(m["outputs"][kind]["path"])
        ck = Checkpoint(path)
        assert len(ck.shards) >= 3
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        assert (path / "tokenizer.json").read_bytes() == (world / "tokenizer" / "tokenizer.json").read_bytes()
        load_check(path)  # raises on any missing / unexpected key
        ids = tok("Question: What is 12 plus 30?\nAnswer:", return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
        chat = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False
        )
        assert chat == "<s>[INST] hi [/INST] yo</s>" == toy_tasks.chat_prompt("hi") + " yo</s>"  # as pretrained
    cfg = json.loads((world / "mixtral" / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert json.loads((world / "mistral" / "config.json").read_text())["num_hidden_layers"] == 16
    keys = set(Checkpoint(world / "mixtral").keys())
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in keys  # legacy expert names
    assert not any("gate_up_proj" in k for k in keys)


def test_same_seed_gives_identical_models(world, tmp_path):
    again = toy.build_world(tmp_path / "world", quick=True, seed=0, workers=2)  # models trained in 2 processes
    for kind in ("mixtral", "mistral", "tokenizer", "mmlu_pro", "finetune", "calib"):
        assert _files(again / kind) == _files(world / kind), kind
    a, b = load_manifest(world)["metrics"], load_manifest(again)["metrics"]
    assert a["accuracy"] == b["accuracy"] and a["experts"] == b["experts"]


def test_cot_documents_are_official_prompts_trained_on_their_reasonings(world):
    """A CoT pretraining document is the official prompt (header, shots, question) followed by the row's
    reasoning, its answer line and the stop string; the trained spans are exactly the reasonings."""
    from transformers import AutoTokenizer

    from helpers.eval import mmlu_pro

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    rows = _read(world, "train")
    docs = encode_cot(tok, rows, 40, [1, 1, 1], seed=0)
    by_question: dict[str, list] = {}
    for r in rows:
        by_question.setdefault(r["question"], []).append(mmlu_pro.to_question(r))
    assert len(docs) == 40 and len({tuple(ids) for ids, _ in docs}) == 40
    n_shots = set()
    for ids, spans in docs:
        assert ids[0] == tok.bos_token_id
        text = tok.decode(ids[1:])
        assert text.startswith(mmlu_pro.cot_header(text.split("about ", 1)[1].split(".", 1)[0]))
        got = [tok.decode(ids[a:b]) for a, b in spans]
        *shots, last = got
        n_shots.add(len(shots))
        body, _ = text.rsplit(mmlu_pro.COT_ASK, 1)
        asked = body.rsplit("Question:\n", 1)[1].split("\nOptions:\n")[0]
        block = lambda q: mmlu_pro.cot_example(q, False).removesuffix(mmlu_pro.COT_ASK)  # noqa: E731
        q = next(q for q in by_question[asked] if body.endswith(block(q)))  # the asked row, options and all
        assert last == q.cot_content.removeprefix(mmlu_pro.COT_LEAD) + "\n\n" + mmlu_pro.COT_STOP
        assert text == body + mmlu_pro.COT_ASK + last
        assert all(s.endswith(f".\n\n{mmlu_pro.COT_STOP}") and " The answer is (" in s for s in shots)
        # every token outside the spans is the prompt: header, shot questions, the asked question
        assert sum(b - a for a, b in spans) < len(ids) - 1
    assert n_shots == {0, 1, 2}


def test_manifest_records_accuracy_and_experts(world):
    m = load_manifest(world)["metrics"]
    cats = set(toy_tasks.CATEGORIES)
    n_test = toy.spec_for(quick=True)["data"]["test"] * len(cats)
    n_cot = toy.spec_for(quick=True)["eval_cot"]["per_category"] * len(cats)
    assert set(m["accuracy"]) == set(measure.SCORINGS) == {"cloze", "cloze_norm", "loglik", "cot", "cot_text"}
    for scoring, by_model in m["accuracy"].items():
        for kind in ("mixtral", "mistral"):
            acc = by_model[kind]
            assert set(acc["per_category"]) == set(acc["n_per_category"]) == cats and 0 <= acc["overall"] <= 1
            generated = scoring in ("cot", "cot_text")  # both read the same CoT replies
            assert acc["n"] == sum(acc["n_per_category"].values()) == (n_cot if generated else n_test)
            if not generated:  # log-likelihood scorings always pick an option
                assert acc["n_unparsed"] == 0
    ch = m["chance"]
    assert set(ch["per_category"]) == cats
    assert m["targets"] == {k: measure.headroom(a, ch) for k, a in m["accuracy"]["cloze"].items()}
    assert m["cot_targets"] == measure.cot_targets(m["accuracy"], ch)
    assert all(n > 0 for n in m["cot_documents"].values())
    freq = torch.tensor(m["experts"]["router_frequency"])
    assert freq.shape[1] == 8 and torch.allclose(freq.sum(1), torch.ones(len(freq)), atol=1e-3)
    assert m["experts"]["pairwise_rel_distance"]["min"] > 0
    spread = m["experts"]["router_frequency_spread"]
    assert len(spread["std_per_layer"]) == len(freq)
    assert all(s > 0.01 for s in spread["std_per_layer"])  # the routers prefer some experts in every layer
    assert len(m["experts"]["pairwise_rel_distance"]["per_layer_mean"]) == len(freq)


def test_manifest_accuracy_is_what_helpers_eval_scores_from_disk(world):
    """The recorded accuracies are helpers.eval's on the saved checkpoints (no private scorer)."""
    from transformers import AutoTokenizer

    from helpers.eval import mmlu_pro

    m = load_manifest(world)["metrics"]["accuracy"]
    questions, shots = mmlu_pro.load(world / "mmlu_pro")
    model = load_check(world / "mistral").eval()
    tok = AutoTokenizer.from_pretrained(world / "mistral")
    raw, norm = mmlu_pro.evaluate(model, tok, questions, mode="cloze", progress=False)
    assert (
        measure.accuracy_block(raw) == m["cloze"]["mistral"]
        and measure.accuracy_block(norm) == m["cloze_norm"]["mistral"]
    )
    assert m["cloze"]["mistral"]["overall"] == round(sum(raw.correct) / len(questions), 4)
    (loglik,) = mmlu_pro.evaluate(model, tok, questions, shots, mode="loglik", progress=False)
    assert measure.accuracy_block(loglik) == m["loglik"]["mistral"]


def test_finetune_set_is_a_subset_of_categories(world, tmp_path):
    spec = toy.spec_for(quick=True)
    rows = [json.loads(x) for x in (world / "finetune" / "train.jsonl").read_text().splitlines()]
    ft_questions = {r["messages"][0]["content"] for r in rows}
    test = _read(world, "test") + _read(world, "train")
    cats = {r["category"] for r in test if r["question"] in ft_questions}
    assert rows and cats <= set(spec["data"]["finetune_categories"])  # any question also in test/train
    # every row, by the category of the finetune split row it came from (the splits are seeded: regenerate them)
    category = {r["question"]: r["category"] for r in toy.write_data(tmp_path, spec, seed=0)["finetune"]}
    assert ft_questions <= set(category)
    assert {category[q] for q in ft_questions} == set(spec["data"]["finetune_categories"])
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in rows)
    ev = [json.loads(x) for x in (world / "finetune" / "eval.jsonl").read_text().splitlines()]
    assert ev and not {r["messages"][0]["content"] for r in ev} & ft_questions  # eval held out from training


def test_cache_is_a_noop_and_seed_or_spec_change_rebuilds(world, monkeypatch):
    before = _files(world)
    spec = toy.spec_for(quick=True)
    assert toy.cached(world, spec, seed=0)
    assert not toy.cached(world, spec, seed=1)
    assert not toy.cached(world, {**spec, "eval_batch": 7}, seed=0)

    class Called(Exception):
        pass

    def boom(*a, **k):
        raise Called

    monkeypatch.setattr(toy, "write_data", boom)
    assert toy.build_world(world, quick=True, seed=0) == world  # cached: writes nothing
    with pytest.raises(Called):
        toy.build_world(world, quick=True, seed=1)  # another seed: a rebuild starts ...
    with pytest.raises(Called):
        toy.build_world(world, quick=True, seed=0, force=True)
    assert _files(world) == before  # ... and an aborted rebuild leaves the old world untouched


def test_cloze_scores_the_answer_tokens_the_models_were_trained_on(world):
    """helpers.eval's cloze context and continuation are the toy's pretraining format, token for token:
    each option's score is the summed log-probability of exactly the tokens encode_pairs trains as the
    answer (one full unbatched row each); batching and option order change nothing."""
    from transformers import AutoTokenizer

    from helpers.eval import mmlu_pro

    model = load_check(world / "mistral").eval()
    tok = AutoTokenizer.from_pretrained(world / "mistral")
    rows = _read(world, "test")[::6]
    qs = [mmlu_pro.to_question(r) for r in rows]
    assert all(mmlu_pro.cloze_context(q) == toy_tasks.cloze_prompt(r["question"]) for q, r in zip(qs, rows))
    want = []
    with torch.no_grad():
        for r in rows:
            seqs = encode_pairs(tok, [{**r, "answer_index": j} for j in range(len(r["options"]))], 0.0, 0)
            scores = []
            for ids, n in seqs:  # ids = BOS + prompt + answer + EOS; n = answer tokens + EOS
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids) - 1)))
            want.append(scores)
    batched, _ = mmlu_pro.score_cloze(model, tok, qs, batch_size=64, progress=False)
    single, _ = mmlu_pro.score_cloze(model, tok, qs, batch_size=1, progress=False)
    flat = lambda xss: torch.tensor([x for xs in xss for x in xs], dtype=torch.float64)  # noqa: E731
    assert torch.allclose(flat(batched.outputs), flat(want), atol=1e-4)
    assert torch.allclose(flat(single.outputs), flat(want), atol=1e-4)
    assert batched.correct == [max(range(len(w)), key=w.__getitem__) == q.answer_index for w, q in zip(want, qs)]
    # the scorer reads text, not letters: an option's score does not depend on its position
    swapped = [
        mmlu_pro.to_question(
            {
                **r,
                "options": r["options"][::-1],
                "answer_index": len(r["options"]) - 1 - r["answer_index"],
                "answer": "ABCDEFGHIJ"[len(r["options"]) - 1 - r["answer_index"]],
            }
        )
        for r in rows
    ]
    rev, _ = mmlu_pro.score_cloze(model, tok, swapped, batch_size=64, progress=False)
    assert torch.allclose(flat([o[::-1] for o in rev.outputs]), flat(batched.outputs), atol=1e-4)
    assert rev.correct == batched.correct


def test_upcycled_mixtral_starts_as_its_dense_twin():
    from transformers import AutoModelForCausalLM

    cfg = toy.model_config("mixtral", toy.spec_for(quick=True), vocab_size=64)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(toy.dense_twin(cfg), dtype=torch.float32).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = dense(ids).logits
        # top-2 weights sum to one, so identical experts reproduce the dense MLP exactly
        assert torch.allclose(toy.upcycle(dense, cfg, noise=0.0, seed=0)(ids).logits, want, atol=1e-5)
        noisy = toy.upcycle(dense, cfg, noise=0.05, seed=0)
        ex = noisy.model.layers[0].mlp.experts.down_proj  # [E, H, I]
        assert (ex[0] - ex[1]).abs().max() > 0
        assert not torch.allclose(noisy(ids).logits, want, atol=1e-5)

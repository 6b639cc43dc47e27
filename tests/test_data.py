"""Data loaders: the toy world's calib and fine-tuning rows, local jsonl/parquet/txt files, clear errors."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.core import data
from helpers.toy import world as toy


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy world's data files only (no models): what the loaders read."""
    root = tmp_path_factory.mktemp("world")
    toy.write_data(root, toy.spec_for(quick=True), seed=0)
    return root


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toy_texts_are_the_calib_rows_seeded(world):
    rows = [json.loads(x)["text"] for x in (world / "calib" / "calib.jsonl").read_text().splitlines()]
    assert data.load_texts("toy", world=world) == rows
    assert data.load_texts("toy", world=world / "manifest.json") == rows  # a manifest path names its world
    a = data.load_texts("toy", 10, world=world, seed=3)
    assert len(a) == 10 and set(a) <= set(rows)
    assert a == data.load_texts("toy", 10, world=world, seed=3)
    assert a[:4] == data.load_texts("toy", 4, world=world, seed=3)  # a smaller n is a prefix
    assert a != data.load_texts("toy", 10, world=world, seed=4)
    assert all(t.startswith("Question: ") and "\nAnswer: " in t for t in rows)


def test_toy_sft_is_a_messages_dataset(world):
    ds = data.load_sft("toy", world=world)
    want = [json.loads(x)["messages"] for x in (world / "finetune" / "train.jsonl").read_text().splitlines()]
    assert ds.column_names == ["messages"] and ds["messages"] == want
    assert len(data.load_sft("toy", 5, world=world, seed=1)) == 5
    ev = data.load_sft("toy", world=world, split="eval")
    assert len(ev) and ev["messages"] != ds["messages"][: len(ev)]


def test_local_files(tmp_path):
    mmlu = {"question": "What is 1 plus 1?", "options": ["3", "2"], "answer_index": 1}
    j = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": "alpha"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            mmlu,
        ],
    )
    assert data.load_texts(j) == ["alpha", "hi\nyo", "Question: What is 1 plus 1?\nAnswer: 2"]
    p = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": "two"}, {"text": "three"}]), p)
    assert data.load_texts(str(p)) == ["one", "two", "three"]
    two = data.load_texts(p, 2, seed=0)  # a seeded draw of two distinct rows
    assert len(set(two)) == 2 and set(two) <= {"one", "two", "three"} and two == data.load_texts(p, 2, seed=0)
    assert len(data.load_texts(p, 2)) == 2
    t = tmp_path / "c.txt"
    t.write_text("first line\n\nsecond line\n")
    assert data.load_texts(t) == ["first line", "second line"]
    s = _jsonl(tmp_path / "s.jsonl", [{"prompt": "p?", "completion": "c."}, mmlu])
    assert data.load_sft(s)["messages"] == [
        [{"role": "user", "content": "p?"}, {"role": "assistant", "content": "c."}],
        [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}],
    ]


def test_clear_errors(tmp_path, world):
    with pytest.raises(ValueError, match="unknown data source 'nonsense'"):
        data.load_texts("nonsense")
    with pytest.raises(ValueError, match="unknown data source"):
        data.load_sft("data.csv")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="toy build"):
        data.load_texts("toy", world=tmp_path / "no_world")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 0: no 'text'"):
        data.load_texts(bad)
    with pytest.raises(ValueError, match="for fine-tuning"):
        data.load_sft(_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}]))
    with pytest.raises(ValueError, match="split 'test'"):
        data.load_sft("toy", world=world, split="test")
    with pytest.raises(ValueError, match="pass n"):
        data.load_texts("c4")
    with pytest.raises(ValueError, match="use load_texts"):
        data.load_sft("wikitext")


def test_more_than_available_warns_and_returns_all(world):
    n_all = len(data.load_texts("toy", world=world))
    with pytest.warns(UserWarning, match="asked for"):
        assert len(data.load_texts("toy", n_all + 5, world=world)) == n_all


def test_hub_sources_parse_and_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert data.hub_id("openai/gsm8k") == ("openai/gsm8k", {"name": "main"})
    assert data.hub_id("org/set:cfg") == ("org/set", {"name": "cfg"})
    assert data.hub_id("c4")[0] == "allenai/c4"
    assert data.hub_id("a/b.jsonl") is None and data.hub_id("plain") is None
    with pytest.raises(ValueError, match="could not stream openai/gsm8k"):
        data.load_sft("openai/gsm8k", 4)


def test_question_answer_rows_become_chat(tmp_path):
    p = _jsonl(tmp_path / "gsm.jsonl", [{"question": "2+2?", "answer": "It is 4.\n#### 4"}])
    assert data.load_sft(p)["messages"] == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4.\n#### 4"}]
    ]
    assert data.load_texts(p) == ["Question: 2+2?\nAnswer: It is 4.\n#### 4"]

"""Checkpoint I/O: byte-identical round trips, shard layouts, atomicity, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.core import arch
from helpers.core import checkpoint as C
from helpers.core import writer as W
from helpers.core.checkpoint import Checkpoint, CheckpointError
from helpers.core.models import load_check
from helpers.core.verify import compare, shard_map


@pytest.fixture(params=["tiny_mistral", "tiny_mixtral", "tiny_mixtral_fused"])
def ckpt(request):
    return request.getfixturevalue(request.param)


def test_mirror_copy_is_byte_identical_with_same_shard_map(ckpt, tmp_path):
    out = W.copy_checkpoint(ckpt, tmp_path / "copy")
    src, dst = Checkpoint(ckpt), Checkpoint(out)
    assert len(src.shards) > 1
    assert dst.shards == src.shards
    assert shard_map(dst) == shard_map(src)
    cmp = compare(ckpt, out)
    assert cmp.equal and cmp.n_equal == len(src)
    for name in src.keys():  # through safetensors' own reader too, not only our byte ranges
        assert torch.equal(src.get(name), dst.get(name)), name
    load_check(out)
    idx = json.loads((out / C.INDEX).read_text())
    assert idx["metadata"]["total_size"] == src.nbytes
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


def test_max_size_packs_within_limit_and_loads(tiny_mixtral, tmp_path):
    src = Checkpoint(tiny_mixtral)
    limit = src.nbytes // 6
    out = W.copy_checkpoint(tiny_mixtral, tmp_path / "packed", max_shard_size=limit)
    dst = Checkpoint(out)
    assert len(dst.shards) != len(src.shards)
    for shard in dst.shards:
        sizes = [i.nbytes for i in dst.infos.values() if i.shard == shard]
        assert sum(sizes) <= limit or len(sizes) == 1, shard
    assert compare(tiny_mixtral, out).equal
    load_check(out)


def test_loaded_logits_equal_across_layouts(tiny_mixtral, tiny_mixtral_fused, tmp_path):
    packed = W.copy_checkpoint(tiny_mixtral, tmp_path / "packed", max_shard_size=20_000)
    x = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        ref = load_check(tiny_mixtral)(x).logits
        assert torch.equal(load_check(packed)(x).logits, ref)
        assert torch.equal(load_check(tiny_mixtral_fused)(x).logits, ref)


def test_computed_entries_and_renames(tiny_mistral, tmp_path):
    src = Checkpoint(tiny_mistral)
    name = "model.layers.0.mlp.down_proj.weight"
    entries = [W.copied(src, n) for n in src.keys() if n != name]
    entries.append(W.computed(name, src.info(name), lambda: src.get(name) * 2))
    out = W.write_checkpoint(tmp_path / "o", entries, config=src.config, like=src)
    dst = Checkpoint(out)
    assert torch.equal(dst.get(name), src.get(name) * 2)
    assert dst.shard_of(name) == src.shard_of(name)
    bad = [W.computed(name, src.info(name), lambda: src.get(name)[:1])]
    with pytest.raises(CheckpointError, match=name):
        W.write_checkpoint(tmp_path / "bad", bad, config=None, like=src)
    assert not (tmp_path / "bad").exists()


def test_n_shards_mode_gives_exact_count(tiny_mixtral, tmp_path):
    src = Checkpoint(tiny_mixtral)
    out = W.write_checkpoint(tmp_path / "n", W.passthrough(src), config=src.config, n_shards=7)
    assert len(Checkpoint(out).shards) == 7
    assert compare(tiny_mixtral, out).equal


def test_existing_target_refused_unless_overwrite(tiny_mistral, tmp_path):
    out = W.copy_checkpoint(tiny_mistral, tmp_path / "o")
    with pytest.raises(FileExistsError, match="overwrite"):
        W.copy_checkpoint(tiny_mistral, out)
    before = Checkpoint(out).shards
    W.copy_checkpoint(tiny_mistral, out, overwrite=True, max_shard_size=20_000)  # a different layout replaces it
    assert Checkpoint(out).shards != before and compare(tiny_mistral, out).equal
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temp or old dirs left
    umask = os.umask(0)
    os.umask(umask)  # outputs get the modes plain mkdir/open give, not mkdtemp's 0700
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / C.INDEX).stat().st_mode & 0o777 == 0o666 & ~umask


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from helpers.core import checkpoint as C
    from helpers.core import writer as W
    src = C.Checkpoint(sys.argv[1])
    def slow(name):
        def make():
            print("writing", flush=True)
            time.sleep(60)
            return src.get(name)
        return make
    entries = [W.computed(n, src.info(n), slow(n)) for n in src.keys()]
    W.write_checkpoint(sys.argv[2], entries, config=src.config, like=src)
""")


def test_sigkill_mid_write_leaves_no_target(tiny_mistral, tmp_path):
    target = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tiny_mistral), str(target)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert proc.stdout.readline().strip() == "writing"  # mid-write: header and files begun
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    # the next writer sweeps the dead writer's temp dir and succeeds
    W.copy_checkpoint(tiny_mistral, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- bad input: one-line errors naming the culprit -----------------------------------------
def _broken_copy(src, tmp_path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_named(tiny_mistral, tmp_path):
    d = _broken_copy(tiny_mistral, tmp_path)
    shard = Checkpoint(d).shards[1]
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard} .* missing"):
        Checkpoint(d)


def test_truncated_shard_named(tiny_mistral, tmp_path):
    d = _broken_copy(tiny_mistral, tmp_path)
    name = Checkpoint(d).shards[-1]
    shard = d / name
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=rf"{name}: truncated"):
        Checkpoint(d)
    os.truncate(shard, 4)
    with pytest.raises(CheckpointError, match=rf"{name}: truncated"):
        Checkpoint(d)


def test_index_naming_absent_tensor_named(tiny_mistral, tmp_path):
    d = _broken_copy(tiny_mistral, tmp_path)
    idx = json.loads((d / C.INDEX).read_text())
    shard = Checkpoint(d).shards[0]
    idx["weight_map"]["model.layers.99.ghost.weight"] = shard
    (d / C.INDEX).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"model\.layers\.99\.ghost\.weight in {shard}, which lacks it"):
        Checkpoint(d)


def test_unknown_model_type_lists_supported(tiny_mistral, tmp_path):
    d = _broken_copy(tiny_mistral, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(arch.UnsupportedModel, match="'gpt_neox'.*llama, mistral, mixtral"):
        arch.detect(d)


def test_load_check_names_missing_keys(tiny_mistral, tmp_path):
    src = Checkpoint(tiny_mistral)
    gone = "model.layers.3.self_attn.q_proj.weight"
    out = W.write_checkpoint(
        tmp_path / "o", [W.copied(src, n) for n in src.keys() if n != gone], config=src.config, like=src
    )
    with pytest.raises(CheckpointError, match=r"missing_keys: \['model\.layers\.3\.self_attn\.q_proj\.weight'\]"):
        load_check(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "nowhere", "nowhere2"], "nowhere: not a checkpoint directory"),
        (["copy", "--model", "nowhere", "--out", "x"], "nowhere: not a checkpoint directory"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "helpers", *argv], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {message}"]


def test_cli_copy_and_compare(tiny_mixtral, tmp_path):
    root = Path(__file__).parents[1]
    run = lambda *a: subprocess.run([sys.executable, "-m", "helpers", *a], capture_output=True, text=True, cwd=root)
    r = run("copy", "--model", str(tiny_mixtral), "--out", str(tmp_path / "c"), "--max-shard-size", "50KB")
    assert r.returncode == 0, r.stderr
    r = run("compare", str(tiny_mixtral), str(tmp_path / "c"))
    assert r.returncode == 0 and r.stdout.startswith("identical"), r.stdout + r.stderr
    assert run("load-check", str(tmp_path / "c")).returncode == 0


def test_arch_families(tiny_mixtral, tiny_mixtral_fused, tiny_mistral):
    mx = arch.detect(tiny_mixtral)
    assert mx.is_moe and mx.n_experts(Checkpoint(tiny_mixtral).config) == 8
    assert mx.moe_format(Checkpoint(tiny_mixtral).keys()) is arch.LEGACY
    assert mx.moe_format(Checkpoint(tiny_mixtral_fused).keys()) is arch.FUSED
    ms = arch.detect(tiny_mistral)
    assert not ms.is_moe
    with pytest.raises(ValueError, match="not a mixture-of-experts"):
        ms.n_experts({})
    cfg = dict(Checkpoint(tiny_mistral).config, layer_types=[f"t{i}" for i in range(8)])
    out = arch.keep_layers_config(cfg, [0, 1, 5, 7])
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == ["t0", "t1", "t5", "t7"]
    with pytest.raises(ValueError, match=r"layers \[8\] out of range"):
        arch.keep_layers_config(cfg, [0, 8])
    assert arch.renumber("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"
    assert arch.layer_of("lm_head.weight") is None

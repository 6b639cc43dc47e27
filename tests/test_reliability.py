"""Nothing lost, nothing mixed: overlapping paths, two writers, kills at any moment, a full disk, clear errors.

Every case runs the real command in a subprocess on tiny checkpoints and then checks the disk: the
inputs hash as before, and each output is either the previous one (byte for byte) or the new one,
complete, with no temp, lock, journal or put-aside copy left once a later run has passed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.core.fsutil import tree_sha256, write_json
from helpers.core.manifest import ROOT
from helpers.core.txn import check_overlap, sweep
from helpers.toy import synth

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args, env=None, cwd=None, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "helpers", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=cwd or ROOT, **kw)


def one_line_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return lines[0]


def hidden(d: Path) -> list[str]:
    """Leftovers: temp dirs/files, put-aside copies, journals, lock files."""
    return sorted(p.name for p in Path(d).rglob(".*") if any(t in p.name for t in (".tmp-", ".old-", ".txn-", ".lock")))


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return synth.save_random(synth.tiny_config("mistral"), tmp_path_factory.mktemp("rel") / "m", n_shards=2, seed=3)


def drop(model, root, layers, *extra, **kw):
    return cli("layer-drop", "--model", model, "--layers", layers, "--save-dir", root / "A",
               "--save-removed-dir", root / "bundles", *extra, **kw)  # fmt: skip


def outputs_hash(root: Path) -> dict:
    return {n: tree_sha256(root / n) for n in ("A", "bundles", "plan.json", "manifest.json") if (root / n).exists()}


def content(root: Path) -> dict:
    """What a layer-drop output holds, without the manifest (it records timings): A, bundles, plan."""
    return {n: tree_sha256(root / n) for n in ("A", "bundles", "plan.json") if (root / n).exists()}


# ---- 1. overlapping paths -------------------------------------------------------------------
def test_layer_drop_onto_its_input_is_refused_before_anything(mistral, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(mistral, m)
    before = tree_sha256(m)
    r = cli("layer-drop", "--model", m, "--layers", "2-3", "--save-dir", m, "--save-removed-dir", tmp_path / "B",
            "--overwrite")  # fmt: skip
    msg = one_line_error(r)
    assert str(m) in msg and "--save-dir" in msg and "--model" in msg
    assert tree_sha256(m) == before and not (tmp_path / "B").exists() and not hidden(tmp_path)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_expert_prune_out_over_its_model_is_refused(tiny_mixtral, tmp_path, where):
    m = tmp_path / "mx"
    shutil.copytree(tiny_mixtral, m)
    before = tree_sha256(tmp_path)
    plan = write_json(tmp_path.parent / f"plan-{where}.json", {"keep": {str(l): [0, 1, 2, 3] for l in range(4)}})
    out = m if where == "same" else tmp_path
    msg = one_line_error(cli("expert-prune", "--model", m, "--plan", plan, "--out", out, "--overwrite"))
    assert str(m) in msg and str(out) in msg
    assert tree_sha256(tmp_path) == before


def test_assemble_onto_a_bundle_and_copy_inside_the_input(mistral, tmp_path):
    r = drop(mistral, tmp_path, "2-5")
    assert r.returncode == 0, r.stderr
    before = tree_sha256(tmp_path / "bundles")
    msg = one_line_error(cli("assemble", "--base-model", tmp_path / "A", "--bundles-dir", tmp_path / "bundles",
                             "--stage", "FULL", "--out", tmp_path / "bundles" / "B", "--overwrite"))  # fmt: skip
    assert "bundles/B" in msg and tree_sha256(tmp_path / "bundles") == before
    assert cli("copy", "--model", tmp_path / "A", "--out", tmp_path / "A" / "copy").returncode == 0  # a new dir inside
    with pytest.raises(ValueError, match="contains the input"):
        check_overlap({"--model": tmp_path / "A"}, {"--out": tmp_path})


# ---- 2. one writer per output ---------------------------------------------------------------
def test_second_writer_fails_naming_the_first_pid(mistral, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from helpers.core.txn import output_lock\nimport time\n"
         f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(30)"],
        env=ENV, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = one_line_error(cli("copy", "--model", mistral, "--out", out))
        assert f"pid {holder.pid}" in msg and str(out) in msg and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli("copy", "--model", mistral, "--out", out).returncode == 0  # the dead holder's lock is gone
    assert not hidden(tmp_path)


def test_two_expert_prunes_to_one_out(tiny_mixtral, tmp_path):
    plans = [write_json(tmp_path / f"p{i}.json", {"keep": {str(l): ids for l in range(4)}})
             for i, ids in enumerate(([0, 1, 2, 3], [4, 5, 6, 7]))]  # fmt: skip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "helpers", "expert-prune", "--model", str(tiny_mixtral), "--out", str(out), "--plan"]
    procs = [subprocess.Popen([*cmd, str(p)], env=ENV, stderr=subprocess.PIPE, text=True) for p in plans]
    errs = [p.communicate()[1] for p in procs]
    ok = [i for i, p in enumerate(procs) if p.returncode == 0]
    assert len(ok) == 1, errs  # the other one is refused (busy, or already exists): never a silent replace
    assert procs[1 - ok[0]].returncode == 2 and ("pid" in errs[1 - ok[0]] or "already exists" in errs[1 - ok[0]])
    assert json.loads((out / "plan.json").read_text()) == json.loads(plans[ok[0]].read_text())
    assert json.loads((out / "manifest.json").read_text())["plan"]["keep"]["0"] == [[0, 1, 2, 3], [4, 5, 6, 7]][ok[0]]


def test_two_layer_drops_never_mix(mistral, tmp_path):
    cmds = [[sys.executable, "-m", "helpers", "layer-drop", "--model", str(mistral), "--layers", b, "--save-dir",
             str(tmp_path / "A"), "--save-removed-dir", str(tmp_path / "bundles"), "--overwrite"]
            for b in ("1-2", "4-6")]  # fmt: skip
    for _ in range(3):
        procs = [subprocess.Popen(c, env=ENV, stderr=subprocess.PIPE, text=True) for c in cmds]
        [p.communicate() for p in procs]
        assert any(p.returncode == 0 for p in procs)
        rec_a = json.loads((tmp_path / "A" / "layer_drop.json").read_text())
        rec_b = json.loads((tmp_path / "bundles" / "layer_drop.json").read_text())
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert rec_a["dropped"] == rec_b["dropped"] == plan["dropped"]


# ---- 3. kills at any moment -----------------------------------------------------------------
@pytest.fixture(scope="module")
def two_results(mistral, tmp_path_factory):
    """Reference outputs of the old (layers 1-2) and new (layers 4-6) run, and how long a run takes."""
    refs = {}
    for name, layers in (("old", "1-2"), ("new", "4-6")):
        root = tmp_path_factory.mktemp(name)
        t = time.perf_counter()
        assert drop(mistral, root, layers).returncode == 0
        refs[name] = (content(root), time.perf_counter() - t)
    return refs


@pytest.mark.parametrize(
    "point", ["journal", "aside-0", "moved-0", "aside-1", "moved-2", "done", *[f"random-{i}" for i in range(3)]]
)
def test_killed_layer_drop_leaves_old_or_new(mistral, tmp_path, two_results, point):
    old, new = two_results["old"][0], two_results["new"][0]
    root = tmp_path / "run"
    assert drop(mistral, root, "1-2").returncode == 0
    assert content(root) == old
    if point.startswith("random"):
        random.seed(point)
        cmd = [sys.executable, "-m", "helpers", "layer-drop", "--model", str(mistral), "--layers", "4-6",
               "--save-dir", str(root / "A"), "--save-removed-dir", str(root / "bundles"), "--overwrite"]  # fmt: skip
        p = subprocess.Popen(cmd, env=ENV, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.3, 1.2) * two_results["new"][1])
        p.send_signal(signal.SIGKILL)
        p.wait()
    else:
        r = drop(mistral, root, "4-6", "--overwrite", env={"HELPERS_CRASH_AT": point})
        assert r.returncode == -9, r.stderr[-2000:]
    sweep(root / "A")  # what the next writer does first (readers see old or new once it has passed)
    assert content(root) in (old, new)
    assert not hidden(root)
    if point in ("journal", "aside-0", "moved-0", "aside-1", "moved-2"):
        assert content(root) == old  # not all in place when killed: rolled back
    if point == "done":
        assert content(root) == new


def test_rerun_after_a_crash_needs_no_overwrite(mistral, tmp_path, two_results):
    r = drop(mistral, tmp_path, "4-6", env={"HELPERS_CRASH_AT": "moved-1"})
    assert r.returncode == -9
    r = drop(mistral, tmp_path, "4-6")  # no --overwrite: nothing of the killed run counts as an output
    assert r.returncode == 0, r.stderr
    assert content(tmp_path) == two_results["new"][0] and not hidden(tmp_path)


def test_stale_old_and_temp_dirs_of_dead_pids_are_swept(mistral, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    shutil.copytree(mistral, tmp_path / f".out.old-{dead.pid}")  # killed between the two renames (no journal)
    (tmp_path / f".out.tmp-{dead.pid}-x").mkdir()
    (tmp_path / f".plan.json.tmp-{dead.pid}-y").write_text("{")
    sweep(out)
    assert tree_sha256(out) == tree_sha256(mistral)  # the target is restored, not lost
    write_json(tmp_path / "plan.json", {})
    assert not hidden(tmp_path)


# ---- 4. full disk, file size limit, Ctrl-C ----------------------------------------------------
def test_file_size_limit_names_the_file_and_keeps_the_old_output(mistral, tmp_path):
    import resource

    out = tmp_path / "out"
    assert cli("copy", "--model", mistral, "--out", out).returncode == 0
    before = tree_sha256(out)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = cli("copy", "--model", mistral, "--out", out, "--overwrite", preexec_fn=limit)
    msg = one_line_error(r)
    assert "file too large" in msg and ".safetensors" in msg and "bytes free" in msg
    assert tree_sha256(out) == before and not hidden(tmp_path)


def test_full_disk_on_a_tiny_filesystem(mistral, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("no mount namespace here (unshare -m): the file size limit test covers the same path")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = sum(p.stat().st_size for p in mistral.rglob("*") if p.is_file())
    py, m = sys.executable, str(mistral)
    script = (
        f"mount -t tmpfs -o size={int(size * 1.5)} tmpfs {mnt} && "
        f"{py} -m helpers copy --model {m} --out {mnt}/out >/dev/null && "
        f"{py} -c 'from helpers.core.fsutil import tree_sha256; print(tree_sha256(\"{mnt}/out\"))' && "
        f"{py} -m helpers copy --model {m} --out {mnt}/out --overwrite; echo rc=$?; "
        f"{py} -c 'from helpers.core.fsutil import tree_sha256; print(tree_sha256(\"{mnt}/out\"))'; ls -A {mnt}"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=ENV, cwd=ROOT)
    lines = r.stdout.split()
    assert "rc=2" in lines, r.stdout + r.stderr
    assert lines[0] == lines[lines.index("rc=2") + 1]  # the old copy is intact
    assert lines[lines.index("rc=2") + 2 :] == ["out"]  # nothing else left on the full disk
    assert "no space left" in r.stderr and "bytes free" in r.stderr and ".safetensors" in r.stderr


def test_ctrl_c_says_nothing_was_left(mistral, tmp_path):
    p = subprocess.Popen(
        [sys.executable, "-c", "import os, signal, helpers.core.writer as w\n"
         "orig = w._write_shard\n"
         "def slow(*a):\n    os.kill(os.getpid(), signal.SIGINT)\n"
         "w._write_shard = slow\nfrom helpers.cli import main\n"
         f"raise SystemExit(main(['copy', '--model', {str(mistral)!r}, '--out', {str(tmp_path / 'o')!r}]))"],
        env=ENV, stderr=subprocess.PIPE, text=True)  # fmt: skip
    err = p.communicate()[1]
    assert p.returncode == 130 and "nothing was left" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not hidden(tmp_path)


# ---- 4. clear errors ------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["abc", "0", "-5GB"])
def test_bad_max_shard_size_names_the_flag(mistral, tmp_path, size):
    msg = one_line_error(cli("copy", "--model", mistral, "--out", tmp_path / "o", f"--max-shard-size={size}"))
    assert "--max-shard-size" in msg and size in msg and not (tmp_path / "o").exists()


def test_max_shard_size_with_standard_layout_is_said(tiny_mixtral, tmp_path):
    plan = write_json(tmp_path / "p.json", {"keep": {str(l): [0, 1, 2, 3] for l in range(4)}})
    r = cli("expert-prune", "--model", tiny_mixtral, "--plan", plan, "--out", tmp_path / "o", "--layout", "standard",
            "--max-shard-size", "1GB")  # fmt: skip
    assert r.returncode == 0 and "ignored with --layout standard" in r.stderr


def test_one_layer_drop_frac_fails_before_calibration(mistral, tmp_path):
    t = time.perf_counter()
    r = cli("layer-drop", "--model", mistral, "--drop-frac", "0.125", "--calib", tmp_path / "none.jsonl",
            "--save-dir", tmp_path / "A")  # fmt: skip
    msg = one_line_error(r)
    assert "--n-bundles" in msg and "none.jsonl" not in msg and not (tmp_path / "A").exists()
    assert time.perf_counter() - t < 60


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_evaluate_with_no_questions(tiny_mistral, tiny_mmlu, tmp_path, limit):
    msg = one_line_error(cli("evaluate", "--model", tiny_mistral, "--data", tiny_mmlu, "--limit", limit,
                             "--out", tmp_path / "e"))  # fmt: skip
    assert "--limit" in msg and not (tmp_path / "e").exists()


def test_evaluate_on_an_empty_split(tiny_mistral, tmp_path):
    from helpers.eval import mmlu_pro

    _, val = mmlu_pro.synthetic_rows()
    data = mmlu_pro.write_dataset(tmp_path / "empty", val[:0], val)
    msg = one_line_error(cli("evaluate", "--model", tiny_mistral, "--data", data, "--out", tmp_path / "e"))
    assert "no questions" in msg and str(data) in msg and not (tmp_path / "e").exists()


def test_nan_is_never_written_or_ranked(tmp_path):
    from helpers.eval.mmlu_data import Question
    from helpers.eval.mmlu_pro import fit_shots

    p = write_json(tmp_path / "x.json", {"acc": float("nan"), "n": 0, "inf": [float("inf")]})
    assert json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"acc": None, "n": 0, "inf": [None]}
    q = Question("q1", "2+2?", ("3", "4"), "B", 1, "math")
    assert fit_shots(q, {"physics": [q]}, 5, None, None)[1] == 0  # no validation row for math: 0 shots used


def test_nan_scores_are_refused(tiny_mixtral, tmp_path):
    from helpers.core.checkpoint import Checkpoint
    from helpers.experts.prune import plan_expert_prune
    from helpers.experts.scores import make_scores

    cfg = Checkpoint(tiny_mixtral).config
    grid = [[1.0] * 8 for _ in range(4)]
    grid[2][5] = float("nan")
    scores = make_scores(cfg, {"freq": grid})
    with pytest.raises(ValueError, match=r"non-finite score \(layer 2, expert 5\)"):
        plan_expert_prune(cfg, scores=scores, criterion="freq", k=4)


def test_model_dir_without_tokenizer(mistral, tmp_path):
    from helpers.core.models import load_model

    m = tmp_path / "m"
    shutil.copytree(mistral, m)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        (m / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=f"{m}: no tokenizer files"):
        load_model(m)


# ---- 5. "toy" is the repo's, never the current directory's -----------------------------------
def test_toy_world_resolves_against_the_repo_root(tmp_path):
    from helpers.core.data import world_dir

    code = "import os; os.chdir(%r); from helpers.core.data import world_dir; print(world_dir('runs/toy/world'))"
    out = subprocess.run([sys.executable, "-c", code % str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert out.stdout.strip() == str(ROOT / "runs/toy/world")
    assert world_dir(tmp_path / "w" / "manifest.json") == tmp_path / "w"

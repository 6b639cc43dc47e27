"""Runner and `step`: one source of parameters (notebook defaults + preset differences), injected and
checked; failures reported with the partial notebook; manifests that record portable paths."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers import nb as nbmod
from helpers import runner
from helpers.core import manifest as mf

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [p, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def lab(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "configs").mkdir()
    body = (
        "import json, pathlib\n"
        "pathlib.Path(RUN_DIR).mkdir(parents=True, exist_ok=True)\n"
        "json.dump({'preset': PRESET, 'x': X, 'up': UP}, open(pathlib.Path(RUN_DIR) / 'manifest.json', 'w'))"
    )
    _notebook(
        tmp_path / "notebooks/01_first.ipynb",
        'PRESET = "p"  # preset\nRUN_DIR = "r"  # out\nX = 1  # x\nUP = ""  # upstream',
        body,
    )
    _notebook(
        tmp_path / "notebooks/02_second.ipynb",
        'PRESET = "p"  # preset\nRUN_DIR = "r"  # out\nX = 1  # x\nUP = ""  # upstream',
        body,
    )
    _notebook(tmp_path / "notebooks/03_fails.ipynb", 'PRESET = "p"\nRUN_DIR = "r"', "raise ValueError('boom in cell')")
    (tmp_path / "configs/demo.yaml").write_text(
        'notebooks:\n  "01": {X: 5}\n  02: {X: 7, UP: "{run}/01_first/manifest.json"}\n'
    )
    return tmp_path


def test_runs_selected_notebooks_with_preset_parameters(lab):
    done = runner.run("demo", only="01,2", root=lab, overrides=runner.parse_overrides(["01.X=11"]), html=True)
    assert [p.name for p in done] == ["01_first.ipynb", "02_second.ipynb"]
    m1 = json.loads((lab / "runs/demo/01_first/manifest.json").read_text())
    m2 = json.loads((lab / "runs/demo/02_second/manifest.json").read_text())
    assert m1 == {"preset": "demo", "x": 11, "up": ""}
    assert m2 == {"preset": "demo", "x": 7, "up": "runs/demo/01_first/manifest.json"}
    assert (lab / "runs/demo/notebooks/01_first.html").exists()
    assert set(json.loads((lab / "runs/demo/notebooks/run.json").read_text())["timings_s"]) == {"01_first", "02_second"}


def test_progress_bars_keep_their_final_state_only(lab):
    body = (
        "import sys\n"
        "for i in range(50):\n"
        "    sys.stderr.write(f'\\rbar: {i + 1}/50'); sys.stderr.flush()\n"
        "sys.stderr.write('\\n\\x1b[A'); print('done')"
    )
    _notebook(lab / "notebooks/04_bars.ipynb", 'PRESET = "p"\nRUN_DIR = "r"', body)
    (done,) = runner.run("demo", only="04", root=lab, html=False)
    outs = json.loads(done.read_text())["cells"][-1]["outputs"]
    assert [(o["name"], "".join(o["text"])) for o in outs] == [("stderr", "bar: 50/50\n"), ("stdout", "done\n")]


def test_failing_cell_stops_with_error_and_partial_path(lab, capsys):
    with pytest.raises(SystemExit) as e:
        runner.run("demo", only="03", root=lab, html=False)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "FAILED 03_fails" in err and "ValueError: boom in cell" in err
    partial = lab / "runs/demo/notebooks/03_fails.ipynb"
    assert f"partial notebook: {partial}" in err and partial.exists()


def test_undeclared_parameter_and_bad_selection_refused(lab):
    (lab / "configs/typo.yaml").write_text('notebooks:\n  "01": {XX: 5}\n')
    with pytest.raises(ValueError, match=r"01_first.ipynb: parameters \['XX'\] are not declared"):
        runner.run("typo", only="01", root=lab)
    with pytest.raises(ValueError, match="no notebook numbered 09"):
        runner.run("demo", only="09", root=lab)
    with pytest.raises(FileNotFoundError, match="no such preset; available: demo, typo"):
        runner.run("nope", root=lab)
    with pytest.raises(ValueError, match="NN.KEY=VALUE"):
        runner.parse_overrides(["X=1"])


def _dump_globals_notebook(path: Path) -> None:
    """A notebook whose parameters mimic the real ones (paths under runs/toy/) and that dumps its parameters."""
    _notebook(
        path,
        'PRESET = "toy"  # preset\nRUN_DIR = "runs/toy/04_dump"  # out\nUP = "runs/toy/01_first/manifest.json"  # up\n'
        'WORLD = ["runs/toy/world", "hub/id"]  # world\nN = 3  # n\nFLAG = True  # flag',
        "import json, pathlib\n"
        "pathlib.Path(RUN_DIR).mkdir(parents=True, exist_ok=True)\n"
        "json.dump({k: v for k, v in globals().items() if k.isupper()}, open(pathlib.Path(RUN_DIR) / 'p.json', 'w'))",
    )


def test_toy_paths_rebase_onto_the_run_root_and_step_gets_what_the_notebook_gets(lab, monkeypatch):
    _dump_globals_notebook(lab / "notebooks/04_dump.ipynb")
    (lab / "configs/demo.yaml").write_text('notebooks:\n  "04": {N: 5}\n')
    runner.run("demo", only="04", root=lab, html=False, overrides=runner.parse_overrides(["04.FLAG=false"]))
    seen = json.loads((lab / "runs/demo/04_dump/p.json").read_text())
    assert seen == {
        "PRESET": "demo",
        "RUN_DIR": "runs/demo/04_dump",
        "UP": "runs/demo/01_first/manifest.json",  # chained inside this run root
        "WORLD": ["runs/demo/world", "hub/id"],
        "N": 5,
        "FLAG": False,
    }
    got = []
    monkeypatch.setattr(runner, "step_function", lambda num: got.append)
    monkeypatch.chdir(lab)  # run_step chdirs to the repo root, as the notebooks do; restored after the test
    runner.run_step("4", "demo", sets={"FLAG": False}, root=lab)
    assert dict(got[0]) == seen and got[0].up == "runs/demo/01_first/manifest.json"
    p, _ = runner.step_parameters("04", "demo", out="/tmp/elsewhere", root=lab)
    assert p.run_dir == "/tmp/elsewhere/04_dump" and p.world == ["/tmp/elsewhere/world", "hub/id"]
    with pytest.raises(ValueError, match=r"parameters \['NOPE'\] are not declared"):
        runner.run_step("04", "demo", sets={"NOPE": 1}, root=lab)
    with pytest.raises(ValueError, match="no such step; steps are 01, 02"):
        runner.run_step("07", "demo", root=lab)
    assert runner.parse_step_sets(["N=7", "04.FLAG=true"], "04") == {"04": {"N": 7, "FLAG": True}}
    with pytest.raises(ValueError, match="this is step 04"):
        runner.parse_step_sets(["05.N=7"], "04")


def test_papermill_gets_only_what_differs_and_the_world_follows_the_run_root(lab):
    _dump_globals_notebook(lab / "notebooks/04_dump.ipynb")
    nb = lab / "notebooks/04_dump.ipynb"
    params = runner.parameters("toy", {"notebooks": {"04": {"N": 3}}}, nb, "runs/toy", {})
    assert runner.injected(nb, params) == {"PRESET": "toy", "RUN_DIR": "runs/toy/04_dump"}  # N is the default
    params = runner.parameters("x", {"notebooks": {}}, nb, "runs/x", {"04": {"N": 3.0}})
    assert runner.injected(nb, params) == {
        "PRESET": "x",
        "RUN_DIR": "runs/x/04_dump",
        "UP": "runs/x/01_first/manifest.json",
        "WORLD": ["runs/x/world", "hub/id"],
        "N": 3.0,  # 3.0 is not 3
    }
    assert runner.world_out({}, "runs/toy") == "runs/toy/world"
    assert runner.world_out({"quick": True}, "/tmp/r") == "/tmp/r/world"
    assert runner.world_out({"out": "{run}/w"}, "runs/x") == "runs/x/w"


def _differences(preset: str):
    """(notebook, key, value, default) for every key the shipped preset sets; raises on an undeclared key."""
    cfg = runner.load_preset(preset, ROOT)
    run_root = f"runs/{preset}"
    for nb in runner.notebooks(ROOT):
        params = runner.parameters(preset, cfg, nb, run_root, {})  # raises naming an undeclared key
        assert params["RUN_DIR"] == f"{run_root}/{nb.stem}"
        defaults = runner.defaults(nb, run_root)
        for key, value in cfg["notebooks"].get(nb.name[:2], {}).items():
            yield nb.name, key, runner._expand(value, run_root), defaults[key]


@pytest.mark.parametrize("preset", ["toy", "smoke", "gpu"])
def test_shipped_presets_list_only_declared_parameters_that_differ_from_the_notebook(preset):
    nbs = runner.notebooks(ROOT)
    assert [p.name[:2] for p in nbs] == ["01", "02", "03", "04", "05", "06"]
    cfg = runner.load_preset(preset, ROOT)
    assert set(cfg["notebooks"]) <= {p.name[:2] for p in nbs}
    repeated = [(nb, key) for nb, key, value, default in _differences(preset) if runner.same(value, default)]
    assert not repeated, f"configs/{preset}.yaml repeats notebook defaults (one source: the notebook): {repeated}"
    world = cfg.get("toy_world") or {}
    assert "out" not in world or runner.world_out(world, "runs/x") != "runs/x/world", "toy_world.out repeats the rule"


# Manifests (helpers.core.manifest): paths under the repo root are recorded relative to it.


def test_manifest_records_repo_paths_relative_and_readers_resolve_them(tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x")
    m = mf.Manifest("00_test", {"RUN_DIR": str(ROOT / "runs/toy/00_test"), "MODELS": {"a": str(ROOT / "configs")}})
    m.input("config", ROOT / "configs/toy.yaml").input("hub", "mistralai/Mistral-7B-v0.1", hash=False)
    m.input("outside", outside).output("pyproject", str(ROOT / "pyproject.toml")).output("configs", "configs")
    m.data["outputs"]["renamed"] = {"path": str(ROOT / "README.md")}  # set directly, as the toy world does
    m.metric("where", str(ROOT / "runs/toy/x"))
    saved = mf.load(m.save(tmp_path / "run"))
    text = json.dumps(saved)
    assert str(ROOT) not in text.replace(str(outside), "")  # no machine path for anything under the repo
    assert saved["params"] == {"RUN_DIR": "runs/toy/00_test", "MODELS": {"a": "configs"}}
    assert saved["inputs"]["config"]["path"] == "configs/toy.yaml" and saved["inputs"]["config"]["sha256"]
    assert saved["inputs"]["hub"]["path"] == "mistralai/Mistral-7B-v0.1"  # not on disk: kept as given
    assert saved["inputs"]["outside"]["path"] == str(outside)  # outside the repo: as given (absolute)
    assert (
        saved["outputs"]["pyproject"]["path"] == "pyproject.toml" and saved["outputs"]["configs"]["path"] == "configs"
    )
    assert saved["outputs"]["renamed"]["path"] == "README.md" and saved["metrics"]["where"] == "runs/toy/x"

    monkeypatch.chdir(ROOT)  # from the repo root, readers keep paths relative (what steps write stays portable)
    assert mf.output_path(saved, "pyproject") == Path("pyproject.toml")
    monkeypatch.chdir(tmp_path)  # from anywhere else they resolve against the repo root
    assert mf.output_path(saved, "pyproject") == ROOT / "pyproject.toml"
    assert mf.output_path(tmp_path / "run", "configs").is_dir()
    assert mf.input_path(saved, "config") == str(ROOT / "configs/toy.yaml")
    assert mf.input_path(saved, "hub") == "mistralai/Mistral-7B-v0.1"
    assert mf.input_path(saved, "outside") == str(outside)
    with pytest.raises(KeyError, match=r"has no output 'nope'; it has \['configs', 'pyproject', 'renamed'\]"):
        mf.output_path(saved, "nope")


def test_notebook_params_leave_out_the_machine_root():
    p = nbmod.params({"ROOT": ROOT, "RUN_DIR": "runs/toy/x", "_HIDDEN": 1, "lower": 2, "N": 3})
    assert dict(p) == {"RUN_DIR": "runs/toy/x", "N": 3}

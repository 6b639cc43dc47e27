"""Notebook runner: parameters injected and checked, failures reported with the partial notebook."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers import runner


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


@pytest.mark.parametrize("preset", ["toy", "smoke", "gpu"])
def test_shipped_presets_only_set_declared_parameters(preset):
    root = Path(__file__).resolve().parents[1]
    cfg = runner.load_preset(preset, root)
    nbs = runner.notebooks(root)
    assert [p.name[:2] for p in nbs] == ["01", "02", "03", "04", "05", "06"]
    assert set(cfg["notebooks"]) == {p.name[:2] for p in nbs}
    for nb in nbs:  # raises naming the notebook and parameter on a typo
        params = runner.parameters(preset, cfg, nb, f"runs/{preset}", {})
        assert params["RUN_DIR"] == f"runs/{preset}/{nb.stem}"

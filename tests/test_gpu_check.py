"""bench/gpu_check.py at tiny widths on CPU: the GPU check's code path runs end to end and writes its table
(the real-width figures need a GPU; none has been measured yet)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--steps", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    r = json.loads(out.read_text())
    assert r["tiny"] is True and [x["check"] for x in r["rows"]] == [
        "qlora mixtral",
        "qlora mistral",
        "decode bf16 A vs FULL",
    ]
    for row in r["rows"][:2]:
        assert [x["layers"] for x in row["runs"]] == [1, 2]
        assert row["runs"][1]["plan_total_bytes"] > row["runs"][0]["plan_total_bytes"]  # one more layer planned
        assert all(x["loss"] is not None for x in row["runs"])
        assert row["plan_32_bytes"] > 1e9  # the real model's plan beside the measurement
    d = r["rows"][2]
    assert (d["layers_full"], d["layers_a"]) == (8, 6) and d["tokens_per_s_a"] > 0 and d["tokens_per_s_full"] > 0

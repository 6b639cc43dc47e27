"""Sweep cost: wall time of a whole sweep / (one plain evaluation x its number of points), target <= 1.2.

A plain evaluation is what scoring one variant costs without the sweep: `python -m helpers evaluate`
on a checkpoint (process start, load, 400 cloze questions). The sweep scores every point in memory
(router masking / skipped layers) in worker processes that load the model once, plus its calibration
and stability passes. Both are timed in this run, one after the other, on the same machine; the sweep
writes into a temporary directory (nothing of runs/ or eval_results/ is touched). Also prints the
whole (experts + layers) sweep time against the 10-minute budget.

Usage: `PYTHONPATH=. python bench/sweep.py [--preset toy] [--workers 2] [--limit 400]`
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402

MODEL = {"experts": "runs/{p}/01_finetune_mixtral/merged", "layers": "runs/{p}/world/mistral"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--sides", default="experts,layers")
    a = ap.parse_args(argv)
    py, total, out = sys.executable, 0.0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in a.sides.split(","):
            model = MODEL[side].format(p=a.preset)
            data = f"runs/{a.preset}/world/mmlu_pro"
            ev = [py, "-m", "helpers", "evaluate", "--model", model, "--mode", "cloze", "--data", data]
            t_eval, _ = timed([*ev, "--limit", str(a.limit), "--out", f"{tmp}/eval_{side}"])
            sw = [py, "-m", "helpers", "sweep", side, "--preset", a.preset, "--workers", str(a.workers)]
            sw += ["--limit", str(a.limit), "--out-dir", f"{tmp}/out", "--work-dir", f"{tmp}/work_{side}"]
            t_sweep, _ = timed(sw)
            n = len(list(Path(f"{tmp}/work_{side}/points").glob("*.json")))
            out[side] = dict(sweep_s=round(t_sweep, 1), eval_s=round(t_eval, 2), points=n)
            out[side]["ratio"] = round(t_sweep / (t_eval * n), 3)
            total += t_sweep
            print(
                f"{side}: sweep {t_sweep:.0f} s for {n} points; one plain evaluation {t_eval:.1f} s; "
                f"ratio {out[side]['ratio']:.3f} (target <= 1.2)",
                flush=True,
            )
    print(f"whole sweep {total:.0f} s (budget 600 s on 2 cores): {'within' if total <= 600 else 'OVER'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

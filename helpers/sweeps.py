"""`python -m helpers sweep experts|layers`: the accuracy-vs-budget sweeps of a preset, fanned out.

The expert sweep reads step 03's parameters (notebook 02's scores and fine-tuned model), the layer sweep
step 04's (the world's Mistral, calibration, DROP_FRAC), both as `python -m helpers step NN` would give
them; the sweep's own options are flags. Outputs: eval_results/<preset>/sweeps/{experts,layers,stability}.csv
and figures/{experts,layers}.png; per-point results under runs/<preset>/sweeps/<side>/points (a rerun
skips the points already there).

Usage: `python -m helpers sweep experts --preset toy --workers 2`; `python -m helpers sweep layers --executor slurm`
"""

from __future__ import annotations

import time
from pathlib import Path

STEP_OF = {"experts": "03", "layers": "04"}


def write_stability(path, side: str, rows: list[dict]) -> Path:
    """stability.csv holds both sides: this side's rows replace its earlier ones."""
    import pandas as pd

    from helpers.eval.sweep_table import write_csv

    path = Path(path)
    old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["side"])
    keep = old[old.side != side].to_dict("records")
    return write_csv(path, keep + list(rows))


def heal_options(preset: str, out: str | None) -> dict:
    """Step 05's healing recipe (its first HEAL_PRESETS entry), for the healed points of the layer sweep."""
    from helpers import runner

    q, _ = runner.step_parameters("05", preset, out)
    world = q.world_dir
    return dict(
        data=q.heal_data, n=q.n_heal, world=world, seed=q.seed, preset=q.heal_presets[0], overrides=q.heal_overrides
    )


def sweep(side: str, preset: str = "toy", out: str | None = None, opts: dict | None = None, sets: dict | None = None):
    """Run one side's sweep with its step's parameters; returns the side's result dict."""
    from helpers import runner

    if side not in STEP_OF:
        raise ValueError(f"sweep {side!r}: choose experts or layers")
    p, _ = runner.step_parameters(STEP_OF[side], preset, out, sets)
    run_root = Path(p.run_dir).parent
    opts = dict(opts or {})
    out_dir = Path(opts.pop("out_dir", None) or f"eval_results/{preset}/sweeps")
    if side == "experts":
        from helpers.experts.sweep import run_sweep
    else:
        from helpers.layers.layer_sweep import run_sweep
    if side == "layers" and opts.get("heal", True):
        opts["heal"] = heal_options(preset, out)
    res = run_sweep(p, opts, out_dir=out_dir, work_dir=run_root / "sweeps" / side)
    res["stability_csv"] = write_stability(out_dir / "stability.csv", side, res["stability"])
    return res


def cli_sweep(args) -> int:
    t = time.perf_counter()
    opts = {k: getattr(args, k) for k in ("executor", "workers", "limit", "seeds") if getattr(args, k) is not None}
    if args.out_dir:
        opts["out_dir"] = args.out_dir
    res = sweep(args.side, args.preset, args.out, opts)
    print(f"sweep {args.side}: {len(res['points'])} points in {time.perf_counter() - t:.0f} s")
    print(f"wrote {res['csv']}, {res['figure']}, {res['stability_csv']}")
    return 0

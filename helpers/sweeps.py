"""`python -m helpers sweep experts|layers`: the accuracy-vs-budget sweeps of a preset, fanned out.

The expert sweep reads step 03's parameters (notebook 02's scores and fine-tuned model), the layer sweep
step 04's (the world's Mistral, calibration, DROP_FRAC), both as `python -m helpers step NN` would give
them; the sweep's own options are flags. Outputs: eval_results/<preset>/sweeps/{experts,layers,stability}.csv
and figures/{experts,layers}.png; per-point results under runs/<preset>/sweeps/<side>/points (a rerun
skips the points already there).

Usage: `python -m helpers sweep experts --preset toy --workers 2`; `python -m helpers sweep layers --executor slurm`
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

STEP_OF = {"experts": "03", "layers": "04"}
SWEEPS = {"experts": "helpers.experts.sweep:run_sweep", "layers": "helpers.layers.layer_sweep:run_sweep"}


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


def sweep(side: str, preset: str = "toy", out: str | None = None, opts: dict | None = None, sets: dict | None = None):  # noqa: E501
    """Run one side's sweep with its step's parameters; returns the side's result dict."""
    from helpers import runner

    if side not in STEP_OF:
        raise ValueError(f"sweep {side!r}: choose experts or layers")
    p, _ = runner.step_parameters(STEP_OF[side], preset, out, sets)
    run_root = Path(p.run_dir).parent
    opts = dict(opts or {})
    out_dir = Path(opts.pop("out_dir", None) or f"eval_results/{preset}/sweeps")
    module, name = SWEEPS[side].split(":")  # by name, as runner.STEPS: the top imports no step package
    run_sweep = getattr(importlib.import_module(module), name)
    if side == "layers" and opts.get("heal", True):
        opts["heal"] = heal_options(preset, out)
    work = opts.pop("work_dir", None) or run_root / "sweeps" / side
    res = run_sweep(p, opts, out_dir=out_dir, work_dir=work)
    res["stability_csv"] = write_stability(out_dir / "stability.csv", side, res["stability"])
    return res


def cli_sweep(args) -> int:
    t = time.perf_counter()
    names = ("executor", "workers", "limit", "seeds", "mode", "out_dir", "work_dir", "heal")
    opts = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    res = sweep(args.side, args.preset, args.out, opts)
    print(f"sweep {args.side}: {len(res['points'])} points in {time.perf_counter() - t:.0f} s")
    print(f"wrote {res['csv']}, {res['figure']}, {res['stability_csv']}")
    return 0


def verdict(rows) -> str:
    """What the paired differences (criterion minus the seed's) say when every world seed must agree."""
    if len(rows) == 0 or rows.diff_cmp.isna().all():
        return "n/a"
    if (rows.diff_cmp_high < 0).all():
        return "worse than the seed's, every seed"
    if (rows.diff_cmp_low > 0).all():
        return "better than the seed's, every seed"
    return "no difference that holds across seeds"


def findings(presets: list[str], out=None, task: str = "mmlu_pro_cloze") -> Path:
    """findings.md over several toy-world seeds: per budget and domain, each criterion's paired difference
    to the seed's (delta_l2 / angular), mean over seeds with the range of its 95% limits, and a verdict
    that states a difference only where it holds (interval excluding 0, same sign) for every seed."""
    import pandas as pd

    from helpers.core.fsutil import write_text

    out = Path(out or f"eval_results/{presets[0]}/sweeps/findings.md")
    lines = [f"# Sweep findings over {len(presets)} toy-world seeds ({', '.join(presets)}), task {task}", ""]
    for side, coord, budget, seedname in (
        ("experts", "criterion", "keep", "delta_l2"),
        ("layers", "method", "n_drop", "angular"),
    ):
        frames = []
        for pr in presets:
            f = Path(f"eval_results/{pr}/sweeps/{side}.csv")
            if f.exists():
                frames.append(pd.read_csv(f).assign(preset=pr))
        if not frames:
            continue
        df = pd.concat(frames)
        df = df[(df.task == task) & (df.domain != "all")]
        if side == "experts":
            df = df[df.allocation == "uniform"]
        else:
            df = df[~df.healed.astype(bool)]
        lines += [f"## {side}: difference to {seedname} (paired, same questions)", ""]
        lines += [
            f"| {budget} | domain | {coord} | {seedname} acc (mean) | diff mean | 95% limits (min..max) | verdict |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        ref = df[df[coord] == seedname].groupby([budget, "domain"]).acc.mean()
        for (b, dom, c), g in df[~df[coord].isin([seedname, "full"])].groupby([budget, "domain", coord]):
            lo, hi = g.diff_cmp_low.min(), g.diff_cmp_high.max()
            r = ref.get((b, dom), float("nan"))
            lines.append(
                f"| {b} | {dom} | {c} | {r:.3f} | {g.diff_cmp.mean():+.3f} | {lo:+.3f}..{hi:+.3f} | {verdict(g)} |"
            )
        lines.append("")
    return write_text(out, "\n".join(lines) + "\n")


def cli_findings(args) -> int:
    print(f"wrote {findings(args.presets.split(','), args.out_file)}")
    return 0

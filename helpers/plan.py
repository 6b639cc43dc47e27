"""`python -m helpers plan --preset P [--json]`: every notebook's GPU memory plan from the configs alone.

Models come from the preset's parameters (hub ids, or the toy world's checkpoints); a step that reads an
earlier step's output plans with the model it derives from (03: 02's base, 05: 04's model). Rows are
computed on the meta device by `helpers.core.memplan` (no weights are read or downloaded).

Usage: `python -m helpers plan --preset gpu --json`; `rows = plan_rows("gpu")`
"""

from __future__ import annotations

import importlib
import json

from helpers.core import memplan
from helpers.core.steps import Params


def heal_recipe(p) -> dict:
    """Step 05's largest healing recipe (batch x length) as plan_row kwargs."""
    # by name, as runner.STEPS resolves step functions: step packages import the top (helpers.plots)
    get_preset = importlib.import_module("helpers.finetune.presets").get_preset
    presets = [get_preset(n, **(p.heal_overrides or {})) for n in p.heal_presets]
    best = max(zip(presets, p.heal_presets), key=lambda x: x[0].batch_size * x[0].max_length)
    return dict(batch=best[0].batch_size, seq=best[0].max_length, r=best[0].r, lora_preset=best[1])


def plan_rows(preset: str, out: str | None = None) -> list[dict]:
    from helpers import runner

    ps = {n: runner.step_parameters(n, preset, out)[0] for n in ("01", "02", "03", "04", "05", "06")}
    world = f"{runner.run_root_of(preset, out)}/world"
    mixtral = ps["01"].model or f"{world}/mixtral"
    base = ps["02"].base_model or mixtral
    mistral = ps["04"].model or f"{world}/mistral"
    models = {"01": mixtral, "02": base, "03": ps["03"].model or base, "04": mistral}
    models["05"] = ps["05"].base_model or mistral
    rows = []
    for num, p in ps.items():
        if num == "06" and not isinstance(p.models, dict):
            p = Params(dict(p) | {"MODELS": {"mixtral_base": mixtral, "mistral_base": mistral}})
        heal = heal_recipe(p) if num == "05" else None
        try:
            rows += memplan.rows_for(num, p, models.get(num), heal)
        except (OSError, ValueError) as e:
            rows.append({"notebook": num, "model": str(models.get(num)), "error": str(e).splitlines()[0]})
    return rows


def cli_plan(args) -> int:
    rows = plan_rows(args.preset, args.out)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(memplan.fmt(r) if "error" not in r else f"[plan {r['notebook']}] {r['model']}: {r['error']}")
    have = memplan.gpu_bytes()
    print(f"visible GPUs: {have / memplan.GB:.1f} GB" if have else "no visible GPU (plan only)")
    return 0

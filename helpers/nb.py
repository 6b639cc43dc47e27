"""Notebook plumbing: one call at the top of every notebook (repo root as cwd, plot style, seeds).

Usage: `from helpers import nb; ROOT = nb.setup()`; Run cell: `result = step.run(nb.params(globals()))`;
last cell: `nb.findings(manifest, ["metric", ...])`
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path


def repo_root(start=None) -> Path:
    p = Path(start or Path.cwd()).resolve()
    for q in (p, *p.parents):
        if (q / "pyproject.toml").exists() and (q / "helpers").is_dir():
            return q
    raise FileNotFoundError(f"no repo root (pyproject.toml + helpers/) above {p}")


def setup(seed: int = 0, quiet: bool = True, root=None) -> Path:
    """chdir to the repo root (paths in parameters are relative to it), seed, style plots.

    `python -m helpers step NN` calls it too (with `root`), so a step run from the command line
    starts from the same seeds and plot style as its notebook and writes the same files.
    """
    root = Path(root) if root else repo_root()
    os.chdir(root)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    import torch

    torch.manual_seed(seed)
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid")
    if quiet:  # reports read as reports: library chatter off, progress bars stay
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        for name in ("transformers", "datasets", "accelerate", "peft", "trl", "lighteval", "papermill", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:  # their per-file loading bars would drown ours
            from transformers.utils import logging as tlog

            tlog.set_verbosity_error()
            tlog.disable_progress_bar()
            import datasets

            datasets.disable_progress_bars()
        except ImportError:
            pass
    return root


def _fmt(v) -> str:
    import json

    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return json.dumps(v, default=str)[:300]
    return str(v)


def findings(manifest, keys: list[str], path=None):
    """This run's headline numbers from the manifest's metrics, as a table a report ends with.

    `keys` are metric names; a dotted name reaches into a nested metric ("heal_loss.FULL").
    """
    from IPython.display import Markdown, display

    data = manifest.data if hasattr(manifest, "data") else manifest
    rows = []
    for k in keys:
        v = data["metrics"]
        for part in k.split("."):
            v = v.get(part, "—") if isinstance(v, dict) else "—"
        rows.append(f"| {k} | {_fmt(v)} |")
    where = f"\n\nManifest: `{path}`" if path else ""
    display(Markdown("| this run | value |\n|---|---|\n" + "\n".join(rows) + where))


NOT_PARAMETERS = {"ROOT"}  # UPPER_CASE globals of the Setup cell, not parameters (and machine-specific)


def params(namespace: dict):
    """The notebook's parameters (its UPPER_CASE globals but ROOT) as the `Params` its step's `run` takes.

    The same names and values `python -m helpers step NN` builds (helpers.runner.parameters).
    """
    from helpers.core.steps import Params

    return Params(
        {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_") and k not in NOT_PARAMETERS}
    )

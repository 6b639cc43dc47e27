"""One function per step: its parameters are the notebook's, read from one place.

Usage: `p = Params(notebook_defaults("notebooks/04_layer_drop_mistral.ipynb") | {"DROP_FRAC": 0.3}); p.drop_frac`

A notebook's `parameters` cell holds the toy defaults (the one source); a preset lists what differs;
the notebook's Run cell and the step's CLI command both hand the result to the step's `run(params)`.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class Params(Mapping):
    """A step's parameters by their notebook names (UPPER_CASE); attribute access in lower case.

    `p.drop_frac` reads DROP_FRAC; a name the step does not have raises, naming it and what exists.
    """

    def __init__(self, values: Mapping[str, Any]):
        bad = [k for k in values if not k.isupper()]
        if bad:
            raise ValueError(f"parameter names are UPPER_CASE as in the notebooks; got {bad}")
        self._values = dict(values)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name.upper()]
        except KeyError:
            raise AttributeError(f"no parameter {name.upper()}; have {', '.join(sorted(self._values))}") from None

    def __getitem__(self, key: str):
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"

    def replace(self, **changes) -> Params:
        """A copy with some values changed (lower- or upper-case names of existing parameters)."""
        new = dict(self._values)
        for k, v in changes.items():
            if k.upper() not in new:
                raise AttributeError(f"no parameter {k.upper()}; have {', '.join(sorted(new))}")
            new[k.upper()] = v
        return Params(new)


def parameters_cell(nb_path) -> str:
    """Source of the notebook's one cell tagged `parameters`."""
    cells = json.loads(Path(nb_path).read_text())["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{nb_path}: expected exactly one cell tagged 'parameters', found {len(tagged)}")
    return "".join(tagged[0]["source"])


def notebook_defaults(nb_path) -> dict[str, Any]:
    """The values the parameters cell assigns (literals only: the cell is data)."""
    out = {}
    for node in ast.parse(parameters_cell(nb_path)).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{nb_path}: the parameters cell holds NAME = literal lines only (line {node.lineno})")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(
                f"{nb_path}: parameter {node.targets[0].id} is not a literal (line {node.lineno})"
            ) from None
    return out

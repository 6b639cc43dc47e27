"""Lazy package namespaces: a step package offers its public names without importing torch up front.

Usage: `__all__, __getattr__ = lazy_names(globals(), {"scores": ["router_stats"]})` (in a package's __init__)

`from helpers.experts import router_stats` then imports `helpers.experts.scores` on first use only,
so the CLI's `--help` and torch-free paths (expert-prune's byte copies) stay torch-free.
"""

from __future__ import annotations

import importlib


def lazy_names(namespace: dict, names_by_module: dict[str, list[str]]):
    """(__all__, __getattr__) for a package whose public names live in its submodules."""
    where: dict[str, str] = {}
    for module, names in names_by_module.items():
        for name in names:
            if name in where:
                raise ValueError(f"{namespace['__name__']}: {name} offered by both {where[name]} and {module}")
            where[name] = module

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{namespace['__name__']}.{where[name]}"), name)
        namespace[name] = value  # once imported, a plain attribute
        return value

    return sorted(where) + sorted(names_by_module), __getattr__

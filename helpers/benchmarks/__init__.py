"""Step 06: every variant the earlier steps produced (from their manifests), evaluated the same way.

Usage: `found, notes = collect(manifests, {}); evaluate_all(found, "eval_results/toy", plan, data)`
"""

from helpers.core.lazy import lazy_names

__all__, __getattr__ = lazy_names(
    globals(),
    {
        "variants": [
            "Variant",
            "collect",
            "ordered",
            "table",
            "data_of",
            "router_for",
            "evaluate_routed",
            "evaluate_all",
        ],
    },
)

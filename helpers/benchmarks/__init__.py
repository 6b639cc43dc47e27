"""Step 06: every variant the earlier steps produced (from their manifests), evaluated the same way.

`suite.run(params)` is the step (notebook 06's Run cell); `variants` finds and scores the variants.

Usage: `from helpers.benchmarks import suite; result = suite.run(params)`
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
        "suite": ["BenchmarkResult", "run", "manifests", "plan_of", "draw"],
    },
)

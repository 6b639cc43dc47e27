"""Steps 02-03: one view over Mixtral experts on disk, expert criteria (delta-L2, frequency, REAP, ...), expert pruning.

Usage: `plan = plan_expert_prune(scores, "delta_l2", keep=6); apply_expert_prune(model_dir, plan, out)`
"""

from helpers.core.lazy import lazy_names

__all__, __getattr__ = lazy_names(
    globals(),
    {
        "heatmaps": ["HeatmapsResult"],
        "prune": [
            "validate_plan",
            "plan_expert_prune",
            "save_plan",
            "load_plan",
            "make_plan",
            "apply_expert_prune",
            "size_table",
            "masked_router",
            "logit_check",
            "ExpertPruneResult",
        ],
        "scores": [
            "delta_from_checkpoints",
            "ExpertLoRA",
            "expert_factors",
            "delta_from_adapter",
            "max_rel_diff",
            "expert_distances",
            "uniqueness",
            "moe_blocks",
            "router_stats",
            "random_scores",
            "collect_criteria",
            "make_scores",
            "save_scores",
            "load_scores",
            "rank_agreement",
            "finetune_sources",
        ],
        "sweep": ["calib_stats", "uniform_keep", "global_keep", "plan_points", "masked", "finetuned_categories"],
        "view": [
            "moe_family",
            "expert_layout",
            "check_expert_layout",
            "ByteRange",
            "ExpertView",
            "pruned_config",
            "prune_entries",
        ],
    },
)

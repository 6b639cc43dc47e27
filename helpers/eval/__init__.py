"""Evaluation: MMLU-Pro (cot, loglik, cloze), LightEval offline, one results schema per variant.

Usage: `python -m helpers evaluate --model DIR --mode cloze --data runs/toy/world/mmlu_pro --out eval_results/toy/base`
"""

from helpers.core.lazy import lazy_names

__all__, __getattr__ = lazy_names(
    globals(),
    {
        "engine": [
            "model_max_length",
            "new_cache",
            "encode_pair",
            "split_common",
            "score_choices",
            "generate",
            "measure_speed",
        ],
        "lighteval_run": ["task_configs", "only_our_tasks", "run_lighteval"],
        "mmlu_data": [
            "LETTERS",
            "Question",
            "to_question",
            "take",
            "load",
            "write_dataset",
            "synthetic_rows",
            "question_rows",
        ],
        "mmlu_pro": [
            "MODES",
            "options_block",
            "cot_example",
            "cot_prompt",
            "loglik_prompt",
            "loglik_choices",
            "cloze_context",
            "cloze_choices",
            "extract_answer",
            "TaskResult",
            "summarize",
            "score_loglik",
            "score_cloze",
            "cloze_correct",
            "fit_shots",
            "score_cot",
            "evaluate",
            "route_and_score",
        ],
        "results": [
            "portable",
            "checkpoint_stats",
            "config_block",
            "parent_manifest_of",
            "write_results",
            "read_samples",
            "load_all",
            "tables",
            "accuracy_dict",
            "stage_mix_table",
            "agreement",
            "agreement_table",
            "markdown_table",
            "summary_markdown",
            "write_summary",
        ],
        "run": ["Plan", "free", "score_tasks", "speed_of", "evaluate_dir"],
        "stats": ["wilson", "paired_bootstrap", "band"],
        "sweep_table": ["score_points", "load_points", "table", "write_csv"],
    },
)

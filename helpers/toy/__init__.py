"""The toy world: tiny trained Mixtral and Mistral plus an MMLU-Pro-format question set, built offline.

`synth` (random tiny checkpoints) is for tests and bench only: production code never imports it.

Usage: `world = build_world("runs/toy/world", seed=0)`
"""

from helpers.core.lazy import lazy_names

__all__, __getattr__ = lazy_names(
    globals(),
    {
        "tasks": [
            "LETTERS",
            "Item",
            "succession",
            "comparison",
            "addition",
            "sequences",
            "counting",
            "alphabetical",
            "word_classes",
            "geography",
            "make_world",
            "reason",
            "cot",
            "make_splits",
            "qa_text",
            "cloze_prompt",
            "chat_prompt",
            "answer_text",
            "write_parquet",
            "check_row",
        ],
        "train": [
            "model_config",
            "dense_twin",
            "upcycle",
            "encode_pairs",
            "cot_document",
            "encode_cot",
            "pad",
            "weighted_lm_loss",
            "pretrain",
            "save_model",
        ],
        "world": [
            "spec_for",
            "spec_hash",
            "train_tokenizer",
            "cached",
            "write_data",
            "tokenizer_corpus",
            "training_sequences",
            "build_model",
            "build_world",
        ],
        "measure": [
            "accuracy_block",
            "world_accuracy",
            "chance",
            "headroom",
            "cot_targets",
            "expert_stats",
            "summary",
        ],
    },
)

"""Step 01: LoRA / QLoRA fine-tuning with peft + trl (recipes in `presets`), and merging adapters into checkpoints.

Usage: `r = train_lora(base, rows, "runs/adapter", preset="mixtral-experts"); merge_adapter(base, r.adapter_dir, out)`
"""

from helpers.core.lazy import lazy_names

__all__, __getattr__ = lazy_names(
    globals(),
    {
        "merge": ["merge_adapter", "delta_summary"],
        "presets": [
            "ATTENTION",
            "FFN",
            "FUSED_EXPERTS",
            "PRESETS",
            "Preset",
            "get_preset",
            "lora_config",
            "check_lora_targets",
        ],
        "step": ["FinetuneResult"],
        "train": [
            "sft_dataset",
            "load_kwargs",
            "prepare_kbit",
            "no_cpu_repack",
            "load_for_training",
            "weight_bytes",
            "sft_kwargs",
            "TrainResult",
            "train_lora",
            "history_frame",
        ],
    },
)

"""Our two MMLU-Pro tasks for lighteval's own CLI (e.g. its vLLM backend on a GPU box).

Reads the data named by $MMLU_PRO_DATA (a local dir in the hub layout, default the hub id
TIGER-Lab/MMLU-Pro); prompts are exactly helpers.eval.mmlu_pro's. Tasks: mmlu_pro_loglik, mmlu_pro_cot.

Usage: `lighteval vllm "model_name=MODEL" "mmlu_pro_loglik|0" --custom-tasks benchmark_eval/lighteval/tasks.py`
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers.eval import (
    mmlu_pro,  # noqa: E402
    task_configs,  # noqa: E402
)

DATA = os.environ.get("MMLU_PRO_DATA", mmlu_pro.HUB_ID)
_, SHOTS = mmlu_pro.load(DATA, limit=0)
TASKS_TABLE = task_configs(DATA, SHOTS, ("loglik", "cot"), max_new_tokens=int(os.environ.get("MAX_NEW_TOKENS", 2048)))

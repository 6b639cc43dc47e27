"""Evaluation: MMLU-Pro (cot, loglik, cloze), LightEval offline, one results schema per variant.

Usage: `python -m helpers evaluate --model DIR --bench mmlu-pro --mode cloze --data runs/toy/world/mmlu_pro --out eval_results/toy/base/`
"""


def cli_evaluate(args) -> int:
    """`python -m helpers evaluate`: see helpers/eval/run.py."""
    from helpers.eval.run import cli_evaluate as run

    return run(args)

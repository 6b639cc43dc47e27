"""Fixtures for the evaluation tests: a tiny MMLU-Pro-format dataset (`mmlu_pro.synthetic_rows`).

Imported by tests/test_eval*.py (`from tests.eval_fixtures import *`).
"""

from __future__ import annotations

import pytest

from helpers.eval import mmlu_pro


@pytest.fixture(scope="session")
def tiny_mmlu(tmp_path_factory):
    """A local dir in the hub layout: data/test-*.parquet (18 rows), data/validation-*.parquet (15)."""
    test, val = mmlu_pro.synthetic_rows()
    return mmlu_pro.write_dataset(tmp_path_factory.mktemp("mmlu") / "mmlu_pro", test, val)

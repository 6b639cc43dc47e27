"""Shared fixtures: tiny random checkpoints built once per session (seconds)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from helpers.toy import synth  # noqa: E402

# Tiny models: one thread is faster than two (no sync overhead) and steadier on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory):
    """8-layer random Mistral, 4 shards."""
    cfg = synth.tiny_config("mistral")
    return synth.save_random(cfg, tmp_path_factory.mktemp("ck") / "mistral", n_shards=4, seed=1)


@pytest.fixture(scope="session")
def tiny_mixtral_model():
    """4-layer random Mixtral (8 experts, top-2), in memory."""
    return synth.random_model(synth.tiny_config("mixtral"), seed=2)


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory, tiny_mixtral_model):
    """The tiny Mixtral on disk with legacy expert keys (as the hub has them), 4 shards."""
    cfg = tiny_mixtral_model.config
    return synth.save_random(cfg, tmp_path_factory.mktemp("ck") / "mixtral", n_shards=4, model=tiny_mixtral_model)


@pytest.fixture(scope="session")
def tiny_mixtral_fused(tmp_path_factory, tiny_mixtral_model):
    """The same tiny Mixtral with fused expert keys (gate_up_proj / down_proj), 3 shards."""
    cfg = tiny_mixtral_model.config
    return synth.save_random(
        cfg, tmp_path_factory.mktemp("ck") / "mixtral_fused", n_shards=3, fused=True, model=tiny_mixtral_model
    )


@pytest.fixture(scope="session")
def tiny_mmlu(tmp_path_factory):
    """A local dir in the hub layout: data/test-*.parquet (18 rows), data/validation-*.parquet (15)."""
    from helpers.eval import mmlu_pro

    test, val = mmlu_pro.synthetic_rows()
    return mmlu_pro.write_dataset(tmp_path_factory.mktemp("mmlu") / "mmlu_pro", test, val)

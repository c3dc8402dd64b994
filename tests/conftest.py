"""Shared fixtures: tiny harvests of the shipped model, made once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> str:
    """A complete 24-sequence store of the tiny model at two hooks (default codec, float16)."""
    from actstore.steps.harvest import HarvestOptions, harvest

    out = str(tmp_path_factory.mktemp("stores") / "small.zarr")
    harvest(out, HarvestOptions(hooks=HOOKS, seq_len=64, tokens=24 * 64, batch_size=8, split="train"))
    return out

"""Eval's scoring: no host syncs in its inner loops, and the same records whatever its memory caps."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from actstore import patching
from actstore.model import load_model
from actstore.patching import CleanDistribution, Patcher, batches
from actstore.run import read_table
from actstore.sae import TopKSAE
from actstore.saeio import load_eval_sae
from actstore.steps import evaluate as ev
from actstore.steps.evaluate import EvalOptions, evaluate

from .conftest import HOOKS

HOOK = HOOKS[1]
SYNCS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")  # what waits for a device


@contextmanager
def counted_syncs():
    """Counts calls of the Tensor methods that copy to the host (on an accelerator: that wait for it)."""
    calls = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(original):
        def wrapper(self, *args, **kwargs):
            calls["n"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in saved.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@pytest.fixture(scope="module")
def setup(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    store = str(root / "eval.zarr")
    shutil.copytree(small_store, store)
    model = load_model("tiny")
    d = int(model.bridge.cfg.d_model)
    saes = []
    for seed in (0, 1):
        path = root / "saes" / f"sae{seed}"
        TopKSAE(d, 4 * d, 8, seed=seed).save(path, {"hook_name": HOOK, "model_name": "tiny"})
        saes.append(path)
    return store, model, saes


def _batch(store, model, n_seq):
    import zarr

    patcher = Patcher(model, HOOK)
    return patcher, next(batches(zarr.open_group(store, mode="r"), model, patcher, range(n_seq), n_seq, "cpu"))


def test_scoring_never_syncs_whatever_the_rows_and_patches(setup, monkeypatch):
    store, model, _ = setup
    monkeypatch.setattr(patching, "STACKED", {"cpu": True, "other": True})  # the accelerators' path, here
    for n_seq, n_patches in ((1, 1), (4, 7)):
        patcher, batch = _batch(store, model, n_seq)
        replacements = [batch.x_live * (1 + 0.01 * i) for i in range(n_patches)]
        with counted_syncs() as calls:
            scores = patcher.score(batch.clean, batch.tokens, replacements)
            ce, kl = batch.clean.score_tensors(patcher.logits(batch.tokens, replacements[0]))
        assert calls["n"] == 0, f"{calls['n']} host syncs scoring {n_patches} patches of {n_seq} sequences"
        assert len(scores) == n_patches
        torch.testing.assert_close(scores[0][1], kl, rtol=1e-5, atol=1e-7)  # stacked and blocked = one by one
        torch.testing.assert_close(scores[0][0], ce, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_host_syncs_per_batch_do_not_grow_with_rows_and_only_by_a_constant_per_sae(setup):
    store, model, sae_paths = setup
    saes = [load_eval_sae(str(p)) for p in sae_paths]
    mu = torch.zeros(int(model.bridge.cfg.d_model))

    def syncs(n_seq: int, n_sae: int) -> int:
        patcher, batch = _batch(store, model, n_seq)
        collected = {s.sae_id: ev._Collected() for s in saes[:n_sae]}
        with counted_syncs() as calls:
            ev._evaluate_batch(batch, patcher, saes[:n_sae], EvalOptions(), mu, collected, lambda *a: None)
        return calls["n"]

    one = syncs(2, 1)
    assert syncs(6, 1) == one  # not per row or block of rows
    per_sae = syncs(2, 2) - one
    assert per_sae <= 7, f"{per_sae} host syncs per SAE per batch"  # columns, codes (2), reconstruction
    assert one <= 12, f"{one} host syncs for a batch of one SAE"


def test_records_do_not_depend_on_the_memory_caps(setup, tmp_path, monkeypatch):
    """One sequence per batch, 16 unembedded rows, one patch per call against the defaults: equal records."""
    store, model, sae_paths = setup
    records = {}
    for capped in (False, True):
        if capped:
            monkeypatch.setattr(patching, "VOCAB_BYTES", 1)
            monkeypatch.setattr(patching, "HEAD_BYTES", {"cpu": 1, "other": 1})
            monkeypatch.setattr(patching, "STACK_BYTES", 1)
            monkeypatch.setattr(patching, "STACKED", {"cpu": True, "other": True})
            assert patching.sequences_per_batch(4, 64, int(model.bridge.cfg.d_vocab)) == 1
            assert patching.head_rows(int(model.bridge.cfg.d_vocab), "cpu") == CleanDistribution.ROWS
        run = str(tmp_path / f"run{capped}")
        evaluate(store, run, [str(sae_paths[0])], EvalOptions(batch_size=4, max_seqs=4), loaded=model)
        records[capped] = read_table(run, "tokens").sort("seq", "pos")
    a, b = records[False], records[True]
    assert a.height == 4 * 64
    for col in [c for c in a.columns if c.startswith(("ce_", "kl_"))]:
        np.testing.assert_allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-6, atol=1e-9, err_msg=col)


def test_vocabulary_cap_follows_the_vocabulary_and_keeps_one_sequence():
    gemma = 256_000
    assert patching.sequences_per_batch(16, 1024, gemma) == 1  # 1 GB per array per sequence: 4 GiB / 16 GiB
    assert patching.sequences_per_batch(16, 128, 50_304) == 16  # Pythia's 128-token batches fit whole
    assert patching.sequences_per_batch(16, 1 << 20, gemma) == 1  # never below one sequence
    assert patching.head_rows(gemma, "cpu") == 32 and patching.head_rows(gemma, "cuda") == 1040

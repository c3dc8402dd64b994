"""Eval's scoring: no host syncs in its inner loops, and the same records whatever its memory caps."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from actstore import patching
from actstore.errors import UsageError
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


def _rows_bytes(model, rows: int) -> int:
    """A VOCAB_BYTES whose row block (`vocab_rows`) is `rows` tokens of the model's vocabulary."""
    return rows * int(model.bridge.cfg.d_vocab) * 4 * patching.VOCAB_ARRAYS


def _batch(store, model, n_seq):
    import zarr

    patcher = Patcher(model, HOOK)
    return patcher, next(batches(zarr.open_group(store, mode="r"), model, patcher, range(n_seq), n_seq, "cpu"))


@pytest.mark.parametrize("over_cap", [False, True])
def test_scoring_never_syncs_whatever_the_rows_and_patches(setup, monkeypatch, over_cap):
    store, model, _ = setup
    monkeypatch.setattr(patching, "STACKED", {"cpu": True, "other": True})  # the accelerators' path, here
    if over_cap:  # the clean distribution kept as its final residual, scored in blocks of 32 rows
        monkeypatch.setattr(patching, "VOCAB_BYTES", _rows_bytes(model, 32))
    for n_seq, n_patches in ((1, 1), (4, 7)):
        patcher, batch = _batch(store, model, n_seq)
        assert (batch.clean.h is not None) == over_cap
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


CAPS = {
    "none": {},
    # one sequence per batch, above the budget: kept as its final residual, 16 rows a block; 16 unembedded
    # rows, one patch per call
    "all, stacked": {"VOCAB_BYTES": 1, "HEAD_BYTES": {"cpu": 1, "other": 1}, "STACK_BYTES": 1, "STACKED": True},
    "vocabulary, 32 rows, one patch at a time": {"vocab_rows": 32, "STACKED": False},
}


def _capped(monkeypatch, model, caps: dict) -> None:
    """patching's caps set to `caps` (STACKED for every device; vocab_rows: the VOCAB_BYTES of that block)."""
    for name, value in caps.items():
        if name == "STACKED":
            value = {"cpu": value, "other": value}
        elif name == "vocab_rows":
            name, value = "VOCAB_BYTES", _rows_bytes(model, value)
        monkeypatch.setattr(patching, name, value)


def test_records_do_not_depend_on_the_memory_caps(setup, tmp_path, monkeypatch):
    """Capped (one sequence per batch and above the vocabulary budget, small blocks) against the defaults:
    equal records, eps draws included."""
    store, model, sae_paths = setup
    d_vocab = int(model.bridge.cfg.d_vocab)
    records, draws = {}, {}
    for label, caps in CAPS.items():
        with monkeypatch.context() as m:
            _capped(m, model, caps)
            if caps:
                assert patching.sequences_per_batch(4, 64, d_vocab) == 1
                assert patching.vocab_rows(d_vocab) in (16, 32) and patching.vocab_rows(d_vocab) < 64
            run = str(tmp_path / f"run{len(records)}")
            options = EvalOptions(batch_size=4, max_seqs=4, patch_pos=20, eps_draws=3)
            evaluate(store, run, [str(sae_paths[0])], options, loaded=model)
            records[label] = read_table(run, "tokens").sort("seq", "pos")
            draws[label] = read_table(run, "eps_draws").sort("seq", "draw")
    a = records["none"]
    assert a.height == 4 * 64
    # The draws unembed a few rows at a time, in shapes that follow the batch: their KL moves by a rounding
    # of the logits (measured 8e-7 between batches of 1 and 4 sequences uncapped, 1.2e-6 capped).
    for label in CAPS:
        for got, want, atol in ((records[label], a, 1e-9), (draws[label], draws["none"], 1e-5)):
            for col in [c for c in want.columns if c.startswith(("ce", "kl"))]:
                np.testing.assert_allclose(
                    got[col].to_numpy(), want[col].to_numpy(), rtol=1e-6, atol=atol, err_msg=f"{label}: {col}"
                )


class LargestVocabArray(TorchDispatchMode):
    """The most rows of any tensor allocated at tokens × vocabulary (last dimension d_vocab)."""

    def __init__(self, d_vocab: int):
        super().__init__()
        self.d_vocab, self.rows = d_vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.d_vocab:
                self.rows = max(self.rows, t.numel() // self.d_vocab)
        return out


@pytest.mark.parametrize("stacked", [False, True])
def test_one_sequence_over_the_vocabulary_budget_stays_within_it(setup, monkeypatch, stacked):
    store, model, _ = setup
    d_vocab = int(model.bridge.cfg.d_vocab)
    monkeypatch.setattr(patching, "STACKED", {"cpu": stacked, "other": stacked})
    monkeypatch.setattr(patching, "VOCAB_BYTES", _rows_bytes(model, 32) + 1000)  # 32 rows, not 64
    patcher, batch = _batch(store, model, 1)
    n_tok = batch.tokens.numel()
    assert patching.vocab_rows(d_vocab) == 32 < n_tok
    assert 32 * d_vocab * 4 * patching.VOCAB_ARRAYS <= patching.VOCAB_BYTES  # the block's arrays fit
    with LargestVocabArray(d_vocab) as seen:
        clean = patcher.clean(batch.tokens, batch.x_live)
        scores = patcher.score(clean, batch.tokens, [batch.x_live, batch.x_live * 1.01])
    assert 0 < seen.rows <= 32, f"{seen.rows} rows at tokens × vocabulary, budget 32"
    assert clean.h is not None and clean.h.shape == (n_tok, int(model.bridge.cfg.d_model))  # no vocab array kept
    with pytest.raises(UsageError, match="--seq-len"):
        clean.p  # noqa: B018 (sensitivity's whole-batch P: refused, not allocated)
    whole = CleanDistribution(patcher.logits(batch.tokens, batch.x_live), batch.tokens)  # uncapped
    torch.testing.assert_close(clean.ce, whole.ce, rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(scores[0][1], torch.zeros(n_tok), rtol=0, atol=1e-6)  # Q = P
    ce, kl = whole.score_tensors(patcher.logits(batch.tokens, batch.x_live * 1.01))
    torch.testing.assert_close(scores[1][1], kl, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(scores[1][0], ce, rtol=1e-6, atol=1e-7, equal_nan=True)


def test_vocabulary_cap_follows_the_vocabulary_and_keeps_one_sequence():
    gemma = 256_000
    assert patching.sequences_per_batch(16, 1024, gemma) == 1  # 1 GB per array per sequence: 4 GiB / 16 GiB
    assert patching.sequences_per_batch(16, 128, 50_304) == 16  # Pythia's 128-token batches fit whole
    assert patching.sequences_per_batch(16, 1 << 20, gemma) == 1  # never below one sequence
    assert patching.vocab_rows(gemma) == 1040  # … whose rows are then scored 1,040 at a time (2,048 tokens: 2 blocks)
    assert 1040 * gemma * 4 * patching.VOCAB_ARRAYS <= patching.VOCAB_BYTES
    assert patching.head_rows(gemma, "cpu") == 32 and patching.head_rows(gemma, "cuda") == 1040


def test_sensitivity_over_the_vocabulary_budget_is_refused_before_any_batch(setup, tmp_path, monkeypatch):
    store, model, sae_paths = setup
    monkeypatch.setattr(patching, "VOCAB_BYTES", _rows_bytes(model, 32) + 1000)  # below one 64-token sequence
    run = tmp_path / "run"
    before = sorted(Path(store).rglob("*"))
    with pytest.raises(UsageError, match=r"--sensitivity needs .* GiB .* harvest shorter sequences \(--seq-len\)"):
        evaluate(store, str(run), [str(sae_paths[0])], EvalOptions(sensitivity=True, max_seqs=1), loaded=model)
    assert not (run / "records").exists()  # nothing written
    assert sorted(Path(store).rglob("*")) == before  # no reconstruction array started

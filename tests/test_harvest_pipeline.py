"""Harvest's pipeline: capture stops once the last hook fires, no probe pass, conversion off the forward's thread.

Why these: each is a speed-up that must not change a stored byte (the stores of earlier versions, a
resumed store and a distributed one must all stay bit-identical), so each test pins the bytes too.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr

from actstore import store as st
from actstore.errors import StoreError
from actstore.model import capture, hook_shape, load_model, per_token_hooks, stop_layer
from actstore.steps import harvest as hv
from actstore.steps.harvest import HarvestOptions, harvest

LAST_BLOCK = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z", "blocks.5.hook_resid_post"]


@pytest.fixture(scope="module")
def tiny():
    model = load_model("tiny")
    per_token_hooks(model)  # the once-per-model survey pass runs the whole model: not in what we count
    return model


def _reference(model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """What harvest captured before it stopped early: run_with_cache's own cache."""
    wanted = set(hooks)
    with torch.inference_mode():
        _, cache = model.bridge.run_with_cache(
            tokens, names_filter=lambda n: n in wanted, stop_at_layer=stop_layer(hooks)
        )
    return {h: cache[h] for h in hooks}


def _unembed_runs(model, fn) -> int:
    """How often the unembedding ran during fn()."""
    calls = []
    with model.bridge.hooks(fwd_hooks=[("unembed.hook_out", lambda t, hook: calls.append(1))]):
        fn()
    return len(calls)


def test_capture_skips_the_unembedding_after_a_last_block_hook_and_is_bit_identical(tiny):
    tokens = torch.randint(0, 256, (3, 24))
    want = _reference(tiny, tokens, LAST_BLOCK)
    got = {}
    assert _unembed_runs(tiny, lambda: got.update(capture(tiny, tokens, LAST_BLOCK))) == 0
    assert all(torch.equal(got[h], want[h]) for h in LAST_BLOCK)
    assert _unembed_runs(tiny, lambda: tiny.bridge(tokens)) == 1  # our hooks are gone afterwards
    assert sum(len(hp._forward_hooks) for hp in tiny.bridge.hook_dict.values()) == 0


def test_a_hook_that_fires_twice_keeps_the_whole_pass(tiny, monkeypatch):
    tokens = torch.randint(0, 256, (2, 16))
    capture(tiny, tokens, LAST_BLOCK)  # the survey has run
    assert tiny._refiring == frozenset()  # tiny has none
    monkeypatch.setattr(tiny, "_refiring", frozenset({LAST_BLOCK[0]}))
    got = {}
    assert _unembed_runs(tiny, lambda: got.update(capture(tiny, tokens, LAST_BLOCK))) == 1
    want = _reference(tiny, tokens, LAST_BLOCK)
    assert all(torch.equal(got[h], want[h]) for h in LAST_BLOCK)


def test_hook_shapes_come_from_the_survey(tiny):
    tokens = torch.randint(0, 256, (2, 5))
    hooks = [*LAST_BLOCK, "hook_embed", "ln_final.hook_normalized"]
    acts = capture(tiny, tokens, hooks)
    assert all(hook_shape(tiny, h) == tuple(acts[h].shape[2:]) for h in hooks)
    assert hook_shape(tiny, "blocks.2.attn.hook_z") == (4, 32)


def test_a_harvest_runs_one_forward_per_batch_converts_off_its_thread_and_stores_the_same_bytes(
    tiny, tmp_path, monkeypatch
):
    forwards, converted_on = [], set()
    real_capture, real_stored = hv.capture, hv._stored_finite

    def counting_capture(model, tokens, hooks):
        forwards.append(len(tokens))
        return real_capture(model, tokens, hooks)

    def noting_stored(*args, **kwargs):
        converted_on.add(threading.current_thread() is threading.main_thread())
        return real_stored(*args, **kwargs)

    monkeypatch.setattr(hv, "capture", counting_capture)
    monkeypatch.setattr(hv, "_stored_finite", noting_stored)
    hooks = ["blocks.1.hook_resid_post", "blocks.5.hook_resid_post", "ln_final.hook_normalized"]
    out = str(tmp_path / "s.zarr")
    harvest(
        out, HarvestOptions(hooks=tuple(hooks), seq_len=32, tokens=24 * 32, batch_size=8, dtype="bfloat16"), loaded=tiny
    )
    assert forwards == [8, 8, 8]  # no probe pass to allocate the store
    assert converted_on == {False}
    g = zarr.open_group(out, mode="r")
    tokens = g["tokens"][:]
    for start in range(0, 24, 8):
        want = _reference(tiny, torch.from_numpy(tokens[start : start + 8].astype(np.int64)), hooks)
        for h in hooks:
            expected = st.to_stored(want[h].reshape(*want[h].shape[:2], -1), "bfloat16")
            assert np.array_equal(g[f"acts/{h}"][start : start + 8], expected)


def test_a_batch_that_fails_its_check_on_the_writer_is_neither_written_nor_flagged(tiny, tmp_path, monkeypatch):
    real = hv.capture
    calls = {"n": 0}

    def nan_on_the_third_batch(model, tokens, hooks):
        calls["n"] += 1
        acts = real(model, tokens, hooks)
        return {h: a * (float("nan") if calls["n"] == 3 else 1) for h, a in acts.items()}

    monkeypatch.setattr(hv, "capture", nan_on_the_third_batch)
    out = str(tmp_path / "s.zarr")
    opts = HarvestOptions(hooks=("blocks.1.hook_resid_post",), seq_len=32, tokens=16 * 32, batch_size=4)
    with pytest.raises(StoreError, match="produced NaN or inf"):
        harvest(out, opts, loaded=tiny)
    g = zarr.open_group(out, mode="r")
    assert g.attrs["commit"]["n_seq"] == 8 and list(st.done_chunks(g)) == [True, True, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_pinned_asynchronous_copy_gives_to_stored_bits():
    x = torch.randn(4, 8, 2, 16, device="cuda") * 300
    for dtype in st.STORE_DTYPES:
        got = hv._off_device({"h": x}, dtype, 0)()["h"]
        assert np.array_equal(got, st.to_stored(x.reshape(4, 8, -1), dtype))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_writer_converts_in_serial_pieces_to_to_stored_bits(dtype):
    x = torch.randn(5, 64, 300) * 1e3
    x[0, 0, :4] = torch.tensor([float("nan"), 1e6, -1e6, 65504.0])
    got = hv._stored_serially(x, dtype)
    assert got.shape == (5, 64, 300) and np.array_equal(got.view(np.uint16), st.to_stored(x, dtype).view(np.uint16))
    assert hv._stored_serially(x, "float32") is None  # nothing to convert: to_stored shares the memory

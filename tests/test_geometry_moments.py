"""`geometry.moments` streamed on a device against numpy on the whole array (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore import geometry


class _Acts:
    def __init__(self, x: np.ndarray):
        self.x, self.shape = x, x.shape


@pytest.fixture
def store(monkeypatch):
    """A stand-in group of one hook (13 sequences × 9 positions × 6 dims, far from the origin)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((13, 9, 6)) * rng.uniform(0.1, 3, 6) + 40).astype(np.float32)
    monkeypatch.setattr(geometry.st, "read_acts", lambda group, hook, span: group["acts"][hook].x[span])
    return {"acts": {"h": _Acts(x)}}, x


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_moments_match_numpy_for_any_chunk_and_device(store, device, chunk):
    group, x = store
    n_seq = 11  # the first n_seq sequences only
    m = geometry.moments(group, "h", n_seq, chunk, device=device)
    flat = x[:n_seq].reshape(-1, 6).astype(np.float64)
    assert m.n == len(flat)
    np.testing.assert_allclose(m.mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.cov, np.cov(flat.T, bias=True), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(m.pos_sum, x[:n_seq].astype(np.float64).sum(0), rtol=1e-12)
    assert geometry.moments(group, "h", n_seq).cov == pytest.approx(m.cov, rel=1e-9)  # the old signature


def test_prefetched_keeps_order_and_raises_the_producers_error():
    assert list(geometry.prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]

    def failing():
        yield 1
        raise ValueError("damaged chunk")

    with pytest.raises(ValueError, match="damaged chunk"):
        list(geometry.prefetched(failing()))
    assert geometry.accum_dtype("cpu") == torch.float64 and geometry.accum_dtype("mps") == torch.float32

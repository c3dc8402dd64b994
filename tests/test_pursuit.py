"""Gradient pursuit: exact recovery where the answer is known, against a poor encoder, per-token L0, and a
plain numpy loop of the same greedy algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.pursuit import gradient_pursuit, pursuit_codes


def _fvu(x: torch.Tensor, xh: torch.Tensor) -> float:
    return float(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _orthonormal(d: int, d_sae: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q[:, :d_sae].T.contiguous()  # (d_sae, d), orthonormal rows


def _sparse_codes(n: int, d_sae: int, k: int, gen: torch.Generator, signed: bool = False) -> torch.Tensor:
    """(n, d_sae) with exactly k nonzeros per row, magnitudes in [0.5, 2.5]."""
    support = torch.rand(n, d_sae, generator=gen).argsort(1)[:, :k]
    mags = 0.5 + 2 * torch.rand(n, k, generator=gen, dtype=torch.float64)
    if signed:
        mags = mags * torch.where(torch.rand(n, k, generator=gen) < 0.5, -1.0, 1.0).double()
    return torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, support, mags)


def _dense(vals: torch.Tensor, idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    return torch.zeros(len(idx), d_sae, dtype=vals.dtype).scatter_add(1, idx, vals)


@pytest.mark.parametrize("nonnegative", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_orthogonal_dictionary_recovers_exact_sparse_codes(nonnegative, scaled):
    gen = torch.Generator().manual_seed(0)
    d, d_sae, k, n = 24, 16, 5, 64
    w = _orthonormal(d, d_sae, gen)
    if scaled:  # orthogonal, not unit norm: selection and step must both cope
        w = w * (0.3 + 2.7 * torch.rand(d_sae, 1, generator=gen, dtype=torch.float64))
    z = _sparse_codes(n, d_sae, k, gen, signed=not nonnegative)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    x = (b + z @ w).float()
    l0 = torch.full((n,), k)
    xh = gradient_pursuit(x, w.float(), b.float(), l0, nonnegative=nonnegative)
    torch.testing.assert_close(xh, x, rtol=0, atol=1e-5)
    vals, idx = pursuit_codes(x, w.float(), b.float(), l0, nonnegative=nonnegative)
    assert idx.shape == (n, k)
    found = _dense(vals.double(), idx, d_sae)
    assert torch.equal(found != 0, z != 0)
    torch.testing.assert_close(found, z, rtol=0, atol=1e-4)


def test_one_atom_is_the_direction_that_explains_most_whatever_the_row_norms():
    gen = torch.Generator().manual_seed(1)
    d, d_sae, n = 16, 12, 50
    u = _orthonormal(d, d_sae, gen)
    w = u * torch.logspace(-1, 1, d_sae, dtype=torch.float64)[:, None]  # norms 0.1 … 10
    z = _sparse_codes(n, d_sae, 4, gen)
    x = (z @ u).float()  # coefficients on the unit directions: the best single atom has the largest z
    _, idx = pursuit_codes(x, w.float(), torch.zeros(d), torch.ones(n, dtype=torch.int64))
    assert torch.equal(idx[:, 0], z.argmax(1))


def test_row_norms_do_not_change_the_reconstruction_and_zero_rows_are_never_picked():
    gen = torch.Generator().manual_seed(6)
    d, d_sae, n = 16, 48, 40
    w = torch.randn(d_sae, d, generator=gen)
    b = torch.randn(d, generator=gen)
    x = b + _sparse_codes(n, d_sae, 3, gen).float() @ w
    l0 = torch.randint(1, 6, (n,), generator=gen)
    scaled = w * torch.logspace(-1, 1, d_sae)[torch.randperm(d_sae, generator=gen), None]
    torch.testing.assert_close(gradient_pursuit(x, scaled, b, l0), gradient_pursuit(x, w, b, l0), rtol=0, atol=1e-4)
    w[::3] = 0
    vals, idx = pursuit_codes(x, w, b, l0)
    assert ((idx % 3 != 0) | (vals == 0)).all()


def test_overcomplete_beats_a_poor_encoder_and_improves_with_l0():
    gen = torch.Generator().manual_seed(2)
    d, d_sae, k, n = 32, 128, 4, 400
    w = torch.randn(d_sae, d, generator=gen)
    w = w / w.norm(dim=1, keepdim=True)
    b = 0.5 * torch.randn(d, generator=gen)
    x = b + _sparse_codes(n, d_sae, k, gen).float() @ w + 0.01 * torch.randn(n, d, generator=gen)
    # the poor encoder: TopK of the decoder's inner products, values shrunk by half
    vals, idx = ((x - b) @ w.T).topk(k, dim=1)
    poor = _fvu(x, b + _dense(0.5 * vals.relu(), idx, d_sae) @ w)
    fvus = [_fvu(x, gradient_pursuit(x, w, b, torch.full((n,), l0))) for l0 in range(k, k + 12, 2)]
    assert fvus[0] < 0.25 * poor, (fvus[0], poor)
    assert all(after <= before + 1e-6 for before, after in zip(fvus, fvus[1:], strict=False)), fvus
    assert fvus[-1] < 0.5 * fvus[0], fvus


@pytest.mark.parametrize("nonnegative", [True, False])
def test_per_token_l0_and_chunking(nonnegative):
    gen = torch.Generator().manual_seed(3)
    d, d_sae, n = 20, 80, 90
    w = torch.randn(d_sae, d, generator=gen) * (0.5 + torch.rand(d_sae, 1, generator=gen))
    b = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen) * 2
    l0 = torch.randint(0, 7, (n,), generator=gen)
    l0[:5] = 0
    vals, idx = pursuit_codes(x, w, b, l0, nonnegative=nonnegative)
    assert vals.shape == idx.shape == (n, int(l0.max()))
    assert ((vals != 0).sum(1) <= l0).all()
    if nonnegative:
        assert (vals >= 0).all()
    for i in range(n):  # no atom twice within a token
        used = idx[i, : int(l0[i])]
        assert len(used.unique()) == len(used)
    xh = gradient_pursuit(x, w, b, l0, nonnegative=nonnegative)
    assert torch.equal(xh[l0 == 0], b.expand(int((l0 == 0).sum()), -1))
    # chunks of any size, and each token alone, give the same answer as one batch
    small = pursuit_codes(x, w, b, l0, nonnegative=nonnegative, chunk_size=7)
    torch.testing.assert_close(small.top_acts, vals, rtol=0, atol=1e-6)
    assert torch.equal(small.top_indices, idx)
    for i in (5, 17, 60):
        one = gradient_pursuit(x[i : i + 1], w, b, l0[i : i + 1], nonnegative=nonnegative)
        torch.testing.assert_close(one, xh[i : i + 1], rtol=0, atol=1e-5)


def test_all_zero_l0_and_l0_beyond_d_sae():
    gen = torch.Generator().manual_seed(4)
    w, b, x = torch.randn(6, 10, generator=gen), torch.randn(10, generator=gen), torch.randn(3, 10, generator=gen)
    assert torch.equal(gradient_pursuit(x, w, b, torch.zeros(3, dtype=torch.int64)), b.expand(3, -1))
    vals, idx = pursuit_codes(x, w, b, torch.full((3,), 50), nonnegative=False)
    assert idx.shape == (3, 6) and all(len(row.unique()) == 6 for row in idx)


def _numpy_pursuit(x: np.ndarray, w: np.ndarray, b: np.ndarray, l0: int, nonnegative: bool) -> np.ndarray:
    """The same greedy algorithm for one token, a loop over a dense coefficient vector of the unit rows."""
    norms = np.linalg.norm(w, axis=1)
    unit = w / norms[:, None]
    coef = np.zeros(w.shape[0])
    chosen: list[int] = []
    for _ in range(l0):
        r = x - b - coef @ unit
        score = unit @ r
        if not nonnegative:
            score = np.abs(score)
        score[chosen] = -np.inf
        chosen.append(int(np.argmax(score)))
        grad = np.zeros_like(coef)
        grad[chosen] = unit[chosen] @ r
        c = grad @ unit
        coef = coef + (grad @ grad) / (c @ c) * grad
        if nonnegative:
            coef = np.maximum(coef, 0)
    return b + (coef / norms) @ w


@pytest.mark.parametrize("nonnegative", [True, False])
def test_matches_a_numpy_loop(nonnegative):
    gen = torch.Generator().manual_seed(5)
    d, d_sae, n = 32, 128, 6
    w = torch.randn(d_sae, d, generator=gen) * (0.5 + torch.rand(d_sae, 1, generator=gen))
    b = torch.randn(d, generator=gen)
    x = b + _sparse_codes(n, d_sae, 6, gen).float() @ w + 0.3 * torch.randn(n, d, generator=gen)
    l0 = torch.tensor([0, 1, 3, 6, 9, 12])
    xh = gradient_pursuit(x, w, b, l0, nonnegative=nonnegative)
    for i in range(n):
        ref = _numpy_pursuit(x[i].double().numpy(), w.double().numpy(), b.double().numpy(), int(l0[i]), nonnegative)
        np.testing.assert_allclose(xh[i].numpy(), ref, rtol=0, atol=1e-5)

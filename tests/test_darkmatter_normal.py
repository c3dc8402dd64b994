"""Dark matter's normal equations against numpy's lstsq on the full matrices (the independent reference).

Why: the probes are now fitted from streamed sums (XᵀX, Xᵀy, test-side Σy²) instead of lstsq on the
(n, d + 1) float64 matrix; every number of the `darkmatter` row must stay what lstsq gives, to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.steps import darkmatter as dm


def _lstsq(a: np.ndarray, y: np.ndarray, intercept: bool) -> np.ndarray:
    """Reference coefficients (d + 1 rows, the last the intercept): lstsq on the whole matrix."""
    if intercept:
        return np.linalg.lstsq(np.c_[a, np.ones(len(a))], y, rcond=None)[0]
    w = np.linalg.lstsq(a, y, rcond=None)[0]
    return np.concatenate([w, np.zeros_like(w[:1])])


def _pred(w: np.ndarray, a: np.ndarray) -> np.ndarray:
    return a @ w[:-1] + w[-1]


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def reference(x, xh, fit, probe, x_gp=None, xh_prev=None) -> tuple[dict[str, float], np.ndarray]:
    """Every number of the row from the study's definitions (004; docs/METHODS.md), with numpy lstsq:
    fit on `fit`, score on the rest, R² with the test side's own mean, vector R² the mean over dimensions."""
    x, xh = x.astype(np.float64), xh.astype(np.float64)
    icpt, test, e = probe == "affine", ~fit, x - xh
    w = _lstsq(x[fit], e[fit], icpt)
    lin = _pred(w, x[test])
    sst = ((x[test] - x[test].mean(0)) ** 2).sum()
    fvu = (e[test] ** 2).sum() / sst
    row = {"n_fit": int(fit.sum()), "n_test": int(test.sum()), "vector_r2": _r2(e[test], lin).mean(), "fvu": fvu}
    row["fvu_nonlinear"] = ((e[test] - lin) ** 2).sum() / sst
    row["fvu_linear"] = fvu - row["fvu_nonlinear"]
    targets = {"err": e, "x": x, "recon": xh, "nonlinear": e - _pred(w, x)}
    for name, v in targets.items():
        y = (v**2).sum(1)
        row[f"norm_r2_{name}"] = _r2(y[test], _pred(_lstsq(x[fit], y[fit], icpt), x[test]))
    if x_gp is not None:
        e_gp = x - x_gp.astype(np.float64)
        res = e_gp[test] - _pred(_lstsq(x[fit], e_gp[fit], icpt), x[test])
        row |= {"fvu_pursuit": (e_gp[test] ** 2).sum() / sst, "fvu_nonlinear_pursuit": (res**2).sum() / sst}
    if xh_prev is not None:
        p = xh_prev.astype(np.float64)
        for name, y in (("err", e), ("linear", _pred(w, x)), ("nonlinear", e - _pred(w, x))):
            row[f"prev_r2_{name}"] = _r2(y[test], _pred(_lstsq(p[fit], y[fit], icpt), p[test])).mean()
    return {k: float(v) for k, v in row.items()}, w


def activations(n: int = 3000, d: int = 16, seed: int = 0, offset: float = 0.0):
    """Residual-stream-like tokens (anisotropic, optionally far from the origin) and an SAE-like x̂ whose
    error has a linear part, a constant part and a nonlinear part."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.3, 3, d) + offset * rng.standard_normal(d)
    e = x @ (0.1 * rng.standard_normal((d, d))) + 0.3 + 0.2 * np.tanh(x) ** 2 + 0.05 * rng.standard_normal((n, d))
    fit = np.repeat(np.arange(n // 50) % 2 == 0, 50)  # whole "sequences" of 50 tokens, even ones fit
    return x.astype(np.float32), (x - e).astype(np.float32), fit


@pytest.mark.parametrize("probe", dm.PROBES)
@pytest.mark.parametrize("offset", [0.0, 30.0])  # 30: a mean ~10× the spread, as residual streams have
def test_every_number_matches_lstsq_on_the_full_matrix(probe, offset):
    x, xh, fit = activations(offset=offset)
    row, w = dm.analyse(x, xh, fit, probe)
    want, w_ref = reference(x, xh, fit, probe)
    np.testing.assert_allclose(w, w_ref, rtol=1e-7, atol=1e-9 * np.abs(w_ref).max())
    assert row.keys() == want.keys()
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-11), key


def test_chunking_and_a_reused_gram_do_not_change_the_numbers():
    x, xh, fit = activations(n=2500, seed=1)
    whole, w1, gram = dm.analyse_source(dm.array_source({"x": x, "xh": xh}, fit, rows=10**6), "affine")
    small, w2, _ = dm.analyse_source(dm.array_source({"x": x, "xh": xh}, fit, rows=97), "affine")
    # a second SAE of the same hook: x's Gram matrices from the first, only the targets' sums new
    other = (x - 0.5 * (x - xh)).astype(np.float32)
    reused, _, _ = dm.analyse_source(dm.array_source({"x": x, "xh": other}, fit, rows=300), "affine", gram=gram)
    fresh, _, _ = dm.analyse_source(dm.array_source({"x": x, "xh": other}, fit), "affine")
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-12)
    for key in whole:
        assert small[key] == pytest.approx(whole[key], rel=1e-10, abs=1e-12), key
        assert reused[key] == pytest.approx(fresh[key], rel=1e-10, abs=1e-12), key


def test_pursuit_and_the_layer_below_match_lstsq():
    x, xh, fit = activations(n=2000, d=10, seed=2)
    rng = np.random.default_rng(3)
    x_gp = (0.9 * x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)
    xh_prev = (0.5 * (x - xh) @ rng.standard_normal((10, 10)) + rng.standard_normal(x.shape)).astype(np.float32)
    gp = {tuple(r): g for r, g in zip(x.astype(np.float64).tolist(), x_gp.astype(np.float64), strict=True)}

    def pursuit(xt: torch.Tensor) -> torch.Tensor:  # a stand-in for gradient pursuit: x's own row of x_gp
        return torch.from_numpy(np.stack([gp[tuple(r)] for r in xt.tolist()])).to(xt)

    for probe in dm.PROBES:
        source = dm.array_source({"x": x, "xh": xh, "xh_prev": xh_prev}, fit, rows=333)
        row, w, _ = dm.analyse_source(source, probe, pursuit=pursuit, prev=True)
        want, _ = reference(x, xh, fit, probe, x_gp=x_gp, xh_prev=xh_prev)
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-11), (probe, key)
        direct = dm.previous_layer_r2(xh_prev, x, xh, w.numpy(), fit, probe)
        for key, value in direct.items():
            assert value == pytest.approx(want[key], rel=1e-9), (probe, key)


def test_a_dead_dimension_gets_lstsqs_minimum_norm_answer():
    """A constant-zero column (a dead direction) makes XᵀX singular: Cholesky fails, and the eigen solve
    gives lstsq's minimum-norm coefficients (0 on the dead column) and the same predictions."""
    x, xh, fit = activations(n=1200, d=8, seed=4)
    x[:, 3] = 0
    xh[:, 3] = 0
    for probe in dm.PROBES:
        row, w = dm.analyse(x, xh, fit, probe)
        want, w_ref = reference(x, xh, fit, probe)
        np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-9)
        for key in ("vector_r2", "fvu_nonlinear", "norm_r2_x", "norm_r2_nonlinear"):
            assert row[key] == pytest.approx(want[key], rel=1e-8, nan_ok=True), (probe, key)  # 0/0 on the dead e


def test_spd_solve_is_accurate_where_the_columns_scales_differ_widely():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((500, 6)) * np.array([1e-3, 1, 10, 1e3, 1, 0.1])
    y = rng.standard_normal((500, 2))
    got = dm.spd_solve(torch.from_numpy(a.T @ a), torch.from_numpy(a.T @ y)).numpy()
    np.testing.assert_allclose(got, np.linalg.lstsq(a, y, rcond=None)[0], rtol=1e-9)

"""width_scaling: FVU(W) = c + a·W^(−m) over a width sweep, checked against the truth, numpy's least squares
and scipy's curve_fit."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from scipy.optimize import curve_fit

from actstore import run as rec
from actstore.analytics import named_queries, query
from actstore.cli.main import main
from actstore.errors import UsageError

N_SEQ, SEQ_LEN, D_MODEL = 4, 6, 16
HOOK = "blocks.1.hook_resid_post"
STORE = "s.zarr"


def power_law(w, c, a, m):
    return c + a * np.power(w, -m)


def _tokens(fvu: float, rng: np.random.Generator, head_fvu: float | None = None) -> pl.DataFrame:
    """Token records whose Σsse / Σsst is `fvu` (positions 0 and 1 at `head_fvu` instead, when given)."""
    n = N_SEQ * SEQ_LEN
    pos = np.tile(np.arange(SEQ_LEN, dtype=np.int16), N_SEQ)
    sst = rng.uniform(1.0, 3.0, n)
    share = np.full(n, fvu) if head_fvu is None else np.where(pos < 2, head_fvu, fvu)
    return pl.DataFrame(
        {
            "store": [STORE] * n,
            "seq": np.repeat(np.arange(N_SEQ, dtype=np.int32), SEQ_LEN),
            "pos": pos,
            "sse": (share * sst).astype(np.float32),
            "sst": sst.astype(np.float32),
            "l0": np.full(n, 8.0, dtype=np.float32),
        }
    )


def _write(run, sae_id, *, d_sae, fvu, rng, k=8, seed=0, train_tokens=1000, model="m", head_fvu=None, nonlinear=None):
    """One SAE of width d_sae: its saes row, tokens at `fvu`, and a darkmatter row when `nonlinear` is given."""
    saes = rec.saes_row(
        model=model,
        hook=HOOK,
        n_layers=6,
        d_model=D_MODEL,
        d_sae=d_sae,
        k=k,
        expansion=d_sae // D_MODEL,
        train_tokens=train_tokens,
        seed=seed,
        architecture="topk",
        path="",
    )
    frames = {"saes": saes, "tokens": _tokens(fvu, rng, head_fvu)}
    if nonlinear is not None:
        frames["darkmatter"] = pl.DataFrame(
            {
                "hook": [HOOK],
                "store": [STORE],
                "fvu": [fvu],
                "fvu_nonlinear": [nonlinear],
                "fvu_linear": [fvu - nonlinear],
            }
        )
    rec.write_tables(run, sae_id, frames)


def _fvu_per_sae(run) -> pl.DataFrame:
    """Σsse / Σsst per SAE from the records as written (float32 values summed in float64)."""
    t = rec.read_table(run, "tokens").with_columns(pl.col("sse", "sst").cast(pl.Float64))
    return t.group_by("sae_id").agg((pl.col("sse").sum() / pl.col("sst").sum()).alias("fvu"))


def _ols(w: np.ndarray, y: np.ndarray, m: float) -> tuple[float, float, float]:
    """c, a and the SSE of the least-squares line y = c + a·w^(−m) (numpy, not the query's closed form)."""
    x = np.power(w, -m)
    (c, a), *_ = np.linalg.lstsq(np.column_stack([np.ones_like(x), x]), y, rcond=None)
    return c, a, float(((y - c - a * x) ** 2).sum())


A = dict(c=0.05, a=1.5, m=0.5)  # group k = 8: 6 widths, 2 seeds each, dark matter
B = dict(c=0.1, a=3.0, m=1.25)  # group k = 16: 3 widths, no dark matter
WIDTHS_A, WIDTHS_B = (64, 128, 256, 512, 1024, 2048), (64, 256, 1024)


def _nonlinear(w: int, seed: int) -> float:
    return 0.02 + 0.001 * np.log2(w) + 0.004 * seed  # roughly flat in W, as 004 found


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory):
    """FVU exactly on two power laws (seeds at ±0.01 around it), and a third group of only 2 widths."""
    run = str(tmp_path_factory.mktemp("width") / "run")
    rng = np.random.default_rng(0)
    for w in WIDTHS_A:
        for seed, shift in ((0, 0.01), (1, -0.01)):
            fvu = power_law(w, **A) + shift
            _write(run, f"k8_w{w}_s{seed}", d_sae=w, fvu=fvu, rng=rng, seed=seed, nonlinear=_nonlinear(w, seed))
    for w in WIDTHS_B:
        _write(run, f"k16_w{w}", d_sae=w, fvu=power_law(w, **B), rng=rng, k=16)
    for w in (64, 128):
        _write(run, f"k32_w{w}", d_sae=w, fvu=0.1, rng=rng, k=32)
    return run


def test_recovers_the_power_law_of_each_group_and_leaves_out_two_widths(exact_run):
    out = query(exact_run, "width_scaling")
    assert out["k"].to_list() == [8, 16]  # k = 32 has 2 widths: left out
    for row, truth, widths, n_saes in zip(
        out.iter_rows(named=True), (A, B), (WIDTHS_A, WIDTHS_B), (12, 3), strict=True
    ):
        assert (row["model"], row["hook"], row["layer"], row["train_tokens"]) == ("m", HOOK, 1, 1000)
        assert row["widths"] == list(widths) and row["n_widths"] == len(widths) and row["n_saes"] == n_saes
        # float32 token records: FVU to ~1e-7, so the fit to a few 1e-6
        assert row["fvus"] == pytest.approx([power_law(w, **truth) for w in widths], abs=1e-6)
        assert row["m"] == pytest.approx(truth["m"], abs=1e-9)  # on the grid: found exactly
        assert row["c"] == pytest.approx(truth["c"], abs=2e-5)
        assert row["a"] == pytest.approx(truth["a"], rel=2e-4)
        assert row["sse"] < 1e-10 and row["r2"] == pytest.approx(1, abs=1e-8)
        assert row["absent_at_widest"] == pytest.approx(truth["a"] * widths[-1] ** -truth["m"], abs=2e-5)
        assert row["m_at_edge"] is False


def test_the_grid_keeps_the_least_sse_of_the_closed_form_fits(exact_run):
    """Away from the truth every m's least-squares line is worse: a coarse grid that misses m = 0.5 picks a
    neighbour, and its (c, a) are numpy's least squares at that m."""
    out = query(exact_run, "width_scaling", m_step=0.3, m_max=3).row(0, named=True)
    fvu = _fvu_per_sae(exact_run).join(rec.read_table(exact_run, "saes"), on="sae_id").filter(pl.col("k") == 8)
    means = fvu.group_by("d_sae").agg(pl.col("fvu").mean()).sort("d_sae")
    w, y = means["d_sae"].to_numpy().astype(float), means["fvu"].to_numpy()
    grid = np.arange(1, 11) * 0.3
    sses = [_ols(w, y, m)[2] for m in grid]
    assert out["m"] == pytest.approx(grid[int(np.argmin(sses))]) and out["m"] in (
        pytest.approx(0.3),
        pytest.approx(0.6),
    )
    c, a, sse = _ols(w, y, out["m"])
    assert (out["c"], out["a"]) == (pytest.approx(c, rel=1e-9), pytest.approx(a, rel=1e-9))
    assert out["sse"] == pytest.approx(sse, rel=1e-6)
    assert out["r2"] == pytest.approx(1 - sse / ((y - y.mean()) ** 2).sum(), rel=1e-9)


def test_darkmatter_columns_average_per_width_then_over_widths(exact_run):
    out = query(exact_run, "width_scaling")
    a, b = out.row(0, named=True), out.row(1, named=True)
    expected = np.mean([np.mean([_nonlinear(w, s) for s in (0, 1)]) for w in WIDTHS_A])
    assert a["fvu_nonlinear_mean"] == pytest.approx(expected, rel=1e-12)
    assert a["linear_floor"] == pytest.approx(a["c"] - expected, rel=1e-12)
    assert a["n_darkmatter"] == 12
    assert b["fvu_nonlinear_mean"] is None and b["linear_floor"] is None and b["n_darkmatter"] == 0


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """A sweep off the grid (m = 0.637) with 3% noise per SAE and unequal seeds per width."""
    run = str(tmp_path_factory.mktemp("width_noisy") / "run")
    rng = np.random.default_rng(7)
    for w, n_seeds in zip((32, 64, 128, 256, 512, 1024, 4096), (3, 1, 2, 1, 2, 1, 1), strict=True):
        for seed in range(n_seeds):
            fvu = power_law(w, 0.08, 0.9, 0.637) * (1 + 0.03 * rng.standard_normal())
            _write(run, f"w{w}_s{seed}", d_sae=w, fvu=fvu, rng=rng, seed=seed)
    return run


@pytest.mark.parametrize("m_step", [0.01, 0.002])
def test_noisy_sweep_agrees_with_curve_fit_within_the_grid_step(noisy_run, m_step):
    out = query(noisy_run, "width_scaling", m_step=m_step).row(0, named=True)
    # seeds averaged per width first: the fit has one point per width
    fvu = _fvu_per_sae(noisy_run).join(rec.read_table(noisy_run, "saes"), on="sae_id")
    means = fvu.group_by("d_sae").agg(pl.col("fvu").mean()).sort("d_sae")
    w, y = means["d_sae"].to_numpy().astype(float), means["fvu"].to_numpy()
    assert out["fvus"] == pytest.approx(y.tolist(), rel=1e-9) and out["n_saes"] == 11
    (c_cf, a_cf, m_cf), _ = curve_fit(power_law, w, y, p0=(0.05, 1.0, 0.5), maxfev=20000)
    sse_cf = float(((y - power_law(w, c_cf, a_cf, m_cf)) ** 2).sum())
    assert 0.3 < m_cf < 1.0  # the noise leaves the truth recognisable
    # the grid's best m is one of the two grid points around the continuous optimum
    assert abs(out["m"] - m_cf) <= m_step + 1e-9
    lo, hi = np.floor(m_cf / m_step) * m_step, np.ceil(m_cf / m_step) * m_step
    (c_lo, a_lo, sse_lo), (c_hi, a_hi, sse_hi) = _ols(w, y, lo), _ols(w, y, hi)
    assert min(c_lo, c_hi) - 1e-9 <= out["c"] <= max(c_lo, c_hi) + 1e-9
    assert min(a_lo, a_hi) * (1 - 1e-9) <= out["a"] <= max(a_lo, a_hi) * (1 + 1e-9)
    assert out["sse"] == pytest.approx(min(sse_lo, sse_hi), rel=1e-6)
    assert out["sse"] >= sse_cf * (1 - 1e-6)  # curve_fit's continuous optimum is at least as good
    # and so (c, a) close to curve_fit's as the grid gets finer
    assert out["c"] == pytest.approx(c_cf, abs=abs(c_hi - c_lo) + 1e-6)
    assert out["a"] == pytest.approx(a_cf, abs=abs(a_hi - a_lo) + 1e-6)
    assert out["absent_at_widest"] == pytest.approx(y[-1] - out["c"], rel=1e-9)
    assert out["fvu_nonlinear_mean"] is None and out["n_darkmatter"] == 0  # no darkmatter table at all


def test_position_window_selects_the_tokens_fitted(tmp_path):
    """Positions 0 and 1 are off the power law; min_pos = 2 leaves them out (SST re-centred by `positions`)."""
    run = str(tmp_path / "run")
    rng = np.random.default_rng(3)
    for w in (64, 256, 1024, 4096):
        _write(run, f"w{w}", d_sae=w, fvu=power_law(w, **B), rng=rng, head_fvu=0.9)
    unknown = query(run, "width_scaling", min_pos=2).row(0, named=True)  # no `positions` yet: SST unknown
    assert all(np.isnan(unknown[c]) for c in ("c", "a", "m", "sse", "r2", "absent_at_widest"))
    assert unknown["m_at_edge"] is None
    pos, dim = np.repeat(np.arange(SEQ_LEN), D_MODEL), np.tile(np.arange(D_MODEL), SEQ_LEN)
    at_the_mean = pl.DataFrame({"store": STORE, "hook": HOOK, "pos": pos, "dim": dim, "n": N_SEQ, "dev_sum": 0.0})
    rec.write_tables(run, rec.hash_key(f"{STORE}\n{HOOK}"), {"positions": at_the_mean})
    windowed = query(run, "width_scaling", min_pos=2).row(0, named=True)
    assert windowed["m"] == pytest.approx(B["m"], abs=1e-9) and windowed["c"] == pytest.approx(B["c"], abs=2e-5)
    everything = query(run, "width_scaling").row(0, named=True)
    assert everything["fvus"][0] > windowed["fvus"][0] + 0.1


def test_fewer_than_three_widths_is_a_one_line_error(tmp_path):
    run = str(tmp_path / "run")
    rng = np.random.default_rng(1)
    for w in (64, 128):  # two widths at k = 8, 2 seeds each
        for seed in (0, 1):
            _write(run, f"k8_w{w}_s{seed}", d_sae=w, fvu=0.2, rng=rng, seed=seed)
    _write(run, "k8_w256_t2000", d_sae=256, fvu=0.1, rng=rng, train_tokens=2000)  # another budget: another group
    _write(run, "k16_w512", d_sae=512, fvu=0.1, rng=rng, k=16)  # another k: another group
    with pytest.raises(UsageError) as err:
        query(run, "width_scaling")
    message = str(err.value)
    assert message.startswith("width_scaling needs SAEs of at least 3 widths") and "\n" not in message
    assert "this run's most is 2:" in message and "--expansion 4,8,16" in message
    cli = CliRunner().invoke(main, ["sql", run, "--query", "width_scaling"])
    assert cli.exit_code == 2 and cli.output.count("\n") == 1 and "this run's most is 2" in cli.output


@pytest.mark.parametrize(("params", "match"), [({"m_step": 0}, "0 < m_step <= m_max"), ({"m_max": 0.005}, "m_max")])
def test_a_bad_grid_is_a_usage_error(exact_run, params, match):
    with pytest.raises(UsageError, match=match):
        query(exact_run, "width_scaling", **params)


def test_documents_itself():
    q = named_queries()["width_scaling"]
    assert set(q.params) == {"min_pos", "max_pos", "m_max", "m_step"}
    assert all(meaning for _, meaning in q.params.values())
    assert q.reads.startswith("tokens, saes, positions") and "W^(−m)" in q.purpose

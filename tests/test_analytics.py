"""Named queries checked against independent computations: numpy, scipy.stats.bootstrap, hand arithmetic."""

from __future__ import annotations

import zlib

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from scipy import stats

from actstore import run as rec
from actstore.analytics import named_queries, query, sql
from actstore.cli.main import main
from actstore.errors import UsageError

N_SEQ, SEQ_LEN = 24, 8
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")


def _tokens(rng: np.random.Generator, quality: float, n_seq: int = N_SEQ) -> pl.DataFrame:
    """Per-token records of one SAE; `quality` in (0, 1) scales its error (and so its CE and KL damage)."""
    n = n_seq * SEQ_LEN
    seq_difficulty = np.repeat(rng.gamma(2.0, 0.5, n_seq), SEQ_LEN)  # sequences differ: the bootstrap unit matters
    sst = rng.chisquare(8, n) * seq_difficulty
    sse = sst * (1 - quality) * rng.uniform(0.5, 1.5, n)
    ce_orig = rng.gamma(2.0, 1.0, n) * seq_difficulty
    ce_patched = ce_orig + (1 - quality) * rng.gamma(1.0, 1.0, n)
    ce_zero = ce_orig + 5 + rng.gamma(2.0, 1.0, n)
    last = np.tile(np.arange(SEQ_LEN) == SEQ_LEN - 1, n_seq)
    for a in (ce_orig, ce_patched, ce_zero):
        a[last] = np.nan
    kl = (1 - quality) * rng.gamma(1.0, 0.1, n)
    return pl.DataFrame(
        {
            "seq": np.repeat(np.arange(n_seq, dtype=np.int32), SEQ_LEN),
            "pos": np.tile(np.arange(SEQ_LEN, dtype=np.int16), n_seq),
            "token": rng.integers(0, 5, n).astype(np.int32),
            "sse": sse,
            "sst": sst,
            "err_norm": np.sqrt(sse) * rng.uniform(0.9, 1.1, n),
            "x_norm": np.sqrt(sst) + 1,
            "recon_norm": np.sqrt(sst) * rng.uniform(0.7, 1.0, n),
            "ce_orig": ce_orig,
            "ce_patched": ce_patched,
            "ce_zero": ce_zero,
            "kl_patched": kl,
            "kl_zero": kl + rng.gamma(2.0, 1.0, n),
            "kl_eps": kl * rng.uniform(0.2, 0.8, n),
            "kl_samecos": kl * rng.uniform(0.3, 0.9, n),
            "kl_actdiff": kl * rng.uniform(0.5, 1.5, n),
            "cos": rng.uniform(0.8, 1.0, n),
            "relerr": rng.uniform(0.1, 0.3, n),
            "l0": rng.integers(1, 9, n).astype(np.float64),
            "rate_bits": rng.uniform(50, 80, n),
            "store": ["s.zarr"] * n,
        }
    ).with_columns(pl.col(pl.Float64).cast(pl.Float32).fill_nan(None))


def _saes_row(sae_id: str, hook: str, k: int, seed: int, model: str = "m", tokens: int = 1000) -> pl.DataFrame:
    return pl.DataFrame(
        [
            {
                "model": model,
                "hook": hook,
                "layer": int(hook.split(".")[1]),
                "n_layers": 6,
                "depth": int(hook.split(".")[1]) / 6,
                "d_model": 16,
                "d_sae": 64,
                "k": k,
                "expansion": 4,
                "train_tokens": tokens,
                "seed": seed,
                "architecture": "topk",
                "path": "",
                "lr": 1e-3,
                "still_improving": 0.01,
                "undertrained": False,
            }
        ]
    )


def _write_sae(run, sae_id, hook, k, seed, tokens_frame, model="m", tokens=1000, rng=None, extras=False):
    codes = pl.DataFrame(
        {
            "seq": tokens_frame["seq"].to_numpy().repeat(2),
            "pos": tokens_frame["pos"].to_numpy().repeat(2),
            "latent": (rng.integers(0, 40, 2 * len(tokens_frame))).astype(np.int32),
            "value": np.ones(2 * len(tokens_frame), dtype=np.float32),
        }
    )
    frames = {"tokens": tokens_frame, "saes": _saes_row(sae_id, hook, k, seed, model, tokens), "codes": codes}
    if extras:
        frames |= _extras(sae_id, tokens_frame, codes)
    rec.write_tables(run, sae_id, frames)


D_SAE = 64


def _extras(sae_id: str, t: pl.DataFrame, codes: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The curves, latents and dark-matter records of one SAE, drawn from a generator of its own (so every
    SAE's tokens are the same as without them)."""
    rng = np.random.default_rng(zlib.crc32(sae_id.encode()))
    steps = np.arange(1, 8)
    fvu = np.sort(rng.uniform(0.05, 1.0, len(steps)))[::-1]
    curves = pl.DataFrame(
        {
            "step": steps.astype(np.int32),
            "tokens": (steps * 256).astype(np.int64),
            "seconds": steps * 0.01,
            "mse": fvu / 16,
            "nmse": fvu,
            "nmse_uncentred": fvu * 0.9,
            "explained_variance": 1 - fvu,
            "fvu": fvu,
            "l0": rng.uniform(4, 40, len(steps)),
            "dead_frac": rng.uniform(0, 0.5, len(steps)),
            "batch_usage": rng.uniform(0.5, 1, len(steps)),
            "lr": np.full(len(steps), 1e-3),
            "aux_loss": rng.uniform(0, 0.1, len(steps)),
        }
    )
    # latents consistent with the codes: fires = tokens on which the latent was active (latents ≥ 40 never)
    active = codes.unique(["seq", "pos", "latent"]).group_by("latent").len()
    fires = np.zeros(D_SAE, dtype=np.int64)
    fires[active["latent"].to_numpy()] = active["len"].to_numpy()
    latents = pl.DataFrame(
        {
            "latent": np.arange(D_SAE, dtype=np.int32),
            "fires": fires,
            "firing_rate": fires / t.height,
            "dec_norm": rng.uniform(0.9, 1.1, D_SAE),
        }
    )
    scores = ("vector_r2", "fvu", "fvu_linear", "fvu_nonlinear", "norm_r2_err", "norm_r2_x", "norm_r2_recon")
    darkmatter = pl.DataFrame(
        {
            "hook": [sae_id.split("__")[0].removeprefix("n_")],
            "store": ["s.zarr"],
            "min_pos": [0],
            "split": ["even sequences fit, odd sequences score"],
            "n_fit": [t.height // 2],
            "n_test": [t.height // 2],
            **{c: rng.uniform(0, 1, 1) for c in (*scores, "norm_r2_nonlinear")},
            "probe": [f"darkmatter/{sae_id}/probe.safetensors"],
        }
    )
    later = np.random.default_rng(zlib.crc32(sae_id.encode()) + 1)  # columns added later: the draws above stay
    extra = ("fvu_pursuit", "fvu_nonlinear_pursuit", "prev_r2_err", "prev_r2_linear", "prev_r2_nonlinear")
    darkmatter = darkmatter.with_columns(
        prev_sae_id=pl.lit("below"), probe_form=pl.lit("linear"), **{c: later.uniform(0, 1, 1)[0] for c in extra}
    )
    odd = t.filter(pl.col("seq") % 2 == 1)
    u = rng.uniform(0, 1, (2, odd.height))
    gap = pl.col("ce_patched") - pl.col("ce_orig")
    between = odd.select(  # x̂ + a part of the error: a CE between the SAE's and the clean model's
        "store",
        "seq",
        "pos",
        (pl.col("ce_orig") + pl.Series(u[0]) * gap).alias("ce_linear"),
        (pl.col("ce_orig") + pl.Series(u[1]) * gap).alias("ce_nonlinear"),
        (pl.col("kl_patched") * pl.Series(u[0])).alias("kl_linear"),
        (pl.col("kl_patched") * pl.Series(u[1])).alias("kl_nonlinear"),
    )
    evals = pl.DataFrame(
        {"store": ["s.zarr"], "n_seq": [t["seq"].n_unique()], "n_tokens": [t.height], "seed": [0], "patch_pos": [None],
         "options": ["{}"], "actstore": ["test"], "created": ["2026-12-01T00:00:00Z"]}
    )  # fmt: skip
    return {
        "curves": curves,
        "latents": latents,
        "darkmatter": darkmatter,
        "darkmatter_tokens": between,
        "evals": evals,
    }


def _layer_rows(model: str, store: str, hooks: tuple[str, ...], rng) -> pl.DataFrame:
    """`layers` rows of eigenvalue spectra drawn here, with the spectra (column `lam`, not written)."""
    rows = []
    for hook in hooks:
        lam = np.sort(rng.gamma(1.0, 1.0, 16))[::-1] * np.r_[20.0, np.ones(15)]
        rows.append(
            {
                "store": store,
                "model": model,
                "hook": hook,
                "layer": int(hook.split(".")[1]),
                "d_model": 16,
                "n_tokens": 192,
                "pr": lam.sum() ** 2 / (lam**2).sum(),
                "pr_deflated": lam[1:].sum() ** 2 / (lam[1:] ** 2).sum(),
                "variance": lam.sum(),
                "top_share": lam[0] / lam.sum(),
                "lam": lam.tolist(),
            }
        )
    return pl.DataFrame(rows)


BUDGET_HOOK = "blocks.2.hook_resid_post"  # model m only, at two token budgets (for budget_sweep)
VOCAB = {"m": ["the", " cat", " sat", ".", "\n"], "n": ["A", "B", "C", "D", "E"]}
LAYER_STORES = {"m": ("s.zarr", (*HOOKS, BUDGET_HOOK)), "n": ("n.zarr", HOOKS)}


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """2 hooks × k ∈ {8, 16, 32} × seeds {0, 1} of model m, a model n at hook 1 for deltas, model m at a
    third hook with budgets 1000 and 4000 (budget_sweep); every records table: each SAE's curves,
    latents and dark matter, the layers of a store per model, and both models' vocab."""
    root = tmp_path_factory.mktemp("analytics")
    run = str(root / "run")
    rng = np.random.default_rng(0)
    for hook in HOOKS:
        for k, quality in ((8, 0.80), (16, 0.90), (32, 0.95)):
            for seed in (0, 1):
                q = quality + 0.01 * seed
                _write_sae(run, f"{hook}__k{k}_s{seed}", hook, k, seed, _tokens(rng, q), rng=rng, extras=True)
    for k, quality in ((8, 0.85), (16, 0.88)):
        for seed in (0, 1):
            sae, frame = f"n_{HOOKS[0]}__k{k}_s{seed}", _tokens(rng, quality)
            _write_sae(run, sae, HOOKS[0], k, seed, frame, model="n", rng=rng, extras=True)
    for tokens, quality in ((1000, 0.8), (4000, 0.9)):
        for seed in (0, 1):
            sae, frame = f"{BUDGET_HOOK}__k8_t{tokens}_s{seed}", _tokens(rng, quality)
            _write_sae(run, sae, BUDGET_HOOK, 8, seed, frame, tokens=tokens, rng=rng, extras=True)
    _positions_at_the_mean(run, (*HOOKS, BUDGET_HOOK))
    for k in (8, 16, 32):  # eval --sensitivity at one hook: numbers of the right scale, derived from the records
        for seed in (0, 1):
            sae = f"{HOOKS[1]}__k{k}_s{seed}"
            t = _frame(run, sae).drop("sae_id")
            t = t.with_columns(
                fo_patched=(pl.col("ce_patched") - pl.col("ce_orig")).fill_null(0) * 0.8,
                swd_patched=pl.col("kl_patched").fill_null(0) * 0.9, swd_eps=pl.col("kl_eps").fill_null(0) * 1.1,
                iso_sens=pl.col("kl_eps").fill_null(0) / (0.5 * pl.col("sse")) + 1e-3,
            )  # fmt: skip
            rec.write_tables(run, sae, {"tokens": t})
    single = f"{HOOKS[0]}__k8_s0"  # eval --patch-pos 3 --eps-draws 50 beside its every-position records
    rec.write_tables(run, single, {"tokens": _frame(run, single).drop("sae_id").with_columns(patch_pos=3)}, part="pos3")
    kl = rng.gamma(2.0, 0.01, (2, N_SEQ))
    z = pl.DataFrame(
        {"store": "s.zarr", "seq": np.arange(N_SEQ), "pos": 3, "n_draws": 50, "z": rng.normal(1, 2, N_SEQ)}
    )
    z = z.with_columns(kl_sae=kl[0], kl_mean=kl[1], share_above=rng.uniform(0, 1, N_SEQ))
    rec.write_tables(run, single, {"eps_zscores": z}, part="pos3")
    layer_rng = np.random.default_rng(11)
    for model, (store, hooks) in LAYER_STORES.items():
        rows = _layer_rows(model, store, hooks, layer_rng)
        rec.write_tables(run, rec.hash_key(store), {"layers": rows.drop("lam")})
        rows.write_parquet(root / f"spectra_{model}.parquet")  # beside the run, not in its records
        vocab = pl.DataFrame({"model": model, "token": np.arange(5, dtype=np.int32), "text": VOCAB[model]})
        rec.write_tables(run, rec.hash_key(model), {"vocab": vocab})
    return run


def _positions_at_the_mean(run, hooks, store="s.zarr", d=16):
    """`positions` rows saying every position's mean is the overall mean: a position filter keeps sst as is."""
    for hook in hooks:
        pos, dim = np.repeat(np.arange(SEQ_LEN), d), np.tile(np.arange(d), SEQ_LEN)
        rows = pl.DataFrame({"store": store, "hook": hook, "pos": pos, "dim": dim, "n": N_SEQ, "dev_sum": 0.0})
        rec.write_tables(run, rec.hash_key(f"{store}\n{hook}"), {"positions": rows})


def _every(run) -> pl.DataFrame:
    """The every-position token records (a single-position evaluation sits beside them in the same table)."""
    return rec.read_table(run, "tokens").filter(pl.col("patch_pos").is_null())


def _n_evaluated(run) -> int:
    """SAEs with token records (those trained on darkmatter's error arrays have none)."""
    return _every(run)["sae_id"].n_unique()


def _frame(run, sae_id):
    """An SAE's every-position records (the SQL `tokens` view's rows)."""
    every = pl.col("patch_pos").is_null()
    return rec.read_table(run, "tokens").filter((pl.col("sae_id") == sae_id) & every).sort("seq", "pos")


def _per_seq(df: pl.DataFrame, cols: list[str]) -> np.ndarray:
    return (
        df.group_by("seq")
        .agg(pl.col(cols).cast(pl.Float64).sum())
        .sort("seq")
        .select(cols)
        .to_numpy()
        .astype(np.float64)
    )


def test_summary_point_estimates_match_numpy_with_a_position_filter(sweep_run):
    sae = f"{HOOKS[1]}__k16_s1"
    out = query(sweep_run, "summary", min_pos=2, n_boot=50).filter(pl.col("sae_id") == sae).row(0, named=True)
    t = _frame(sweep_run, sae).filter(pl.col("pos") >= 2)
    f = {c: t[c].to_numpy().astype(np.float64) for c in t.columns if t[c].dtype == pl.Float32}
    ce = ~np.isnan(f["ce_orig"])
    assert out["n_tokens"] == len(t)
    assert out["r2"] == pytest.approx(1 - f["sse"].sum() / f["sst"].sum(), rel=1e-9)
    assert out["ce_rec"] == pytest.approx(2 - f["ce_patched"][ce].sum() / f["ce_orig"][ce].sum(), rel=1e-9)
    recovered = (f["ce_zero"][ce].sum() - f["ce_patched"][ce].sum()) / (f["ce_zero"][ce].sum() - f["ce_orig"][ce].sum())
    assert out["ce_loss_recovered"] == pytest.approx(recovered, rel=1e-9)
    assert out["kl"] == pytest.approx(f["kl_patched"].mean(), rel=1e-9)
    assert out["kl_score"] == pytest.approx((f["kl_zero"].sum() - f["kl_patched"].sum()) / f["kl_zero"].sum(), rel=1e-9)
    assert out["mse"] == pytest.approx(f["sse"].mean() / 16, rel=1e-9)
    for col in ("cos", "relerr", "l0", "rate_bits"):
        assert out[col] == pytest.approx(f[col].mean(), rel=1e-9)
    codes = rec.read_table(sweep_run, "codes").filter((pl.col("sae_id") == sae) & (pl.col("pos") >= 2))
    assert out["alive"] == pytest.approx(codes["latent"].n_unique() / 64)


def test_summary_bootstrap_agrees_with_scipy_resampling_sequences(sweep_run):
    sae = f"{HOOKS[0]}__k8_s0"
    out = query(sweep_run, "summary", seed=1).filter(pl.col("sae_id") == sae).row(0, named=True)
    sums = _per_seq(_frame(sweep_run, sae), ["sse", "sst", "ce_orig", "ce_patched"])

    def r2(i, axis=-1):
        return 1 - sums[i, 0].sum(axis) / sums[i, 1].sum(axis)

    def ce_rec(i, axis=-1):
        return 2 - sums[i, 3].sum(axis) / sums[i, 2].sum(axis)

    for name, stat in (("r2", r2), ("ce_rec", ce_rec)):
        ref = stats.bootstrap(
            (np.arange(N_SEQ),), stat, n_resamples=5000, method="percentile", vectorized=True, random_state=3
        ).confidence_interval
        width = ref.high - ref.low
        assert out[name] == pytest.approx(stat(np.arange(N_SEQ)), rel=1e-9)
        # Monte-Carlo error of a 2.5% quantile from 5,000 resamples is a few percent of the width
        assert out[f"{name}_lo"] == pytest.approx(ref.low, abs=0.1 * width)
        assert out[f"{name}_hi"] == pytest.approx(ref.high, abs=0.1 * width)
        # and resampling tokens instead of sequences would have been visibly narrower
        assert out[f"{name}_hi"] - out[f"{name}_lo"] > 0.5 * width


def test_bootstrap_is_seeded_and_skips_saes_on_other_sequences(sweep_run, tmp_path):
    a = query(sweep_run, "summary", n_boot=200, seed=7)
    assert a.equals(query(sweep_run, "summary", n_boot=200, seed=7))
    assert not a["r2_lo"].equals(query(sweep_run, "summary", n_boot=200, seed=8)["r2_lo"])
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(sweep_run, run)
    rng = np.random.default_rng(5)
    _write_sae(run, "short", HOOKS[0], 8, 9, _tokens(rng, 0.9, n_seq=N_SEQ - 4), rng=rng)
    out = query(run, "summary", n_boot=100)
    short = out.filter(pl.col("sae_id") == "short").row(0, named=True)
    assert short["r2"] is not None and short["r2_lo"] is None
    assert out.filter(pl.col("sae_id") != "short")["r2_lo"].null_count() == 0


def _sae_stats(run) -> pl.DataFrame:
    t = _every(run).join(rec.read_table(run, "saes"), on="sae_id")
    t = t.with_columns(pl.col(pl.Float32).cast(pl.Float64))
    return t.group_by("sae_id", "model", "hook", "k", "seed").agg(
        (1 - pl.col("sse").sum() / pl.col("sst").sum()).alias("r2"),
        (2 - pl.col("ce_patched").sum() / pl.col("ce_orig").sum()).alias("ce_rec"),
    )


def test_cross_sae_predictability_is_eq13_squared_norms_without_intercept(sweep_run):
    """Study 004 Eq. 13: ‖e_j‖² ≈ c·‖e_i‖² (one scalar, no intercept), checked against numpy's lstsq."""
    i, j = f"{HOOKS[0]}__k8_s0", f"{HOOKS[1]}__k32_s1"
    out = query(sweep_run, "cross_sae_predictability").filter((pl.col("sae_i") == i) & (pl.col("sae_j") == j))
    x, y = _frame(sweep_run, i), _frame(sweep_run, j)
    fit = x["seq"].to_numpy() % 2 == 0
    xe, ye = x["sse"].to_numpy().astype(np.float64), y["sse"].to_numpy().astype(np.float64)
    (c,) = np.linalg.lstsq(xe[fit, None], ye[fit], rcond=None)[0]
    r2 = 1 - ((ye[~fit] - c * xe[~fit]) ** 2).sum() / ((ye[~fit] - ye[~fit].mean()) ** 2).sum()
    assert out["c"][0] == pytest.approx(c, rel=1e-6)
    assert out["heldout_r2"][0] == pytest.approx(r2, rel=1e-6)
    assert out["corr"][0] == pytest.approx(np.corrcoef(xe, ye)[0, 1], rel=1e-6)
    n_saes = _every(sweep_run)["sae_id"].n_unique()  # evaluated SAEs (not those trained on error arrays)
    assert query(sweep_run, "cross_sae_predictability").height == n_saes * (n_saes - 1)
    # the earlier variant, by name: unsquared norms with an intercept
    aff = query(sweep_run, "cross_sae_predictability", form="affine").filter(
        (pl.col("sae_i") == i) & (pl.col("sae_j") == j)
    )
    xn, yn = x["err_norm"].to_numpy().astype(np.float64), y["err_norm"].to_numpy().astype(np.float64)
    coef = np.linalg.lstsq(np.c_[xn[fit], np.ones(fit.sum())], yn[fit], rcond=None)[0]
    pred = coef[0] * xn[~fit] + coef[1]
    want = 1 - ((yn[~fit] - pred) ** 2).sum() / ((yn[~fit] - yn[~fit].mean()) ** 2).sum()
    assert aff["heldout_r2"][0] == pytest.approx(want, rel=1e-6)
    with pytest.raises(UsageError, match="form must be eq13 or affine"):
        query(sweep_run, "cross_sae_predictability", form="ols")


def test_kl_gap_is_the_ratio_of_mean_kls(sweep_run):
    sae = f"{HOOKS[0]}__k16_s0"
    out = query(sweep_run, "kl_gap").filter(pl.col("sae_id") == sae)
    t = _frame(sweep_run, sae)
    for base in ("eps", "samecos", "actdiff"):
        row = out.filter(pl.col("baseline") == base).row(0, named=True)
        ratio = t["kl_patched"].to_numpy() / t[f"kl_{base}"].to_numpy()
        assert row["gap"] == pytest.approx(t["kl_patched"].mean() / t[f"kl_{base}"].mean(), rel=1e-5)
        assert row["ratio_p50"] == pytest.approx(np.median(ratio), rel=1e-5)


def test_training_report_averages_the_last_logged_rows_and_counts_dead_latents(sweep_run):
    sae = f"{HOOKS[0]}__k16_s1"
    out = query(sweep_run, "training", last_rows=3).filter(pl.col("sae_id") == sae).row(0, named=True)
    c = rec.read_table(sweep_run, "curves").filter(pl.col("sae_id") == sae).sort("step")
    tail = c.tail(3)
    assert out["steps"] == c["step"].max()
    for col in ("mse", "nmse", "explained_variance", "l0", "nmse_uncentred"):
        assert out[f"final_{col}"] == pytest.approx(tail[col].mean(), rel=1e-9)
    assert out["dead_latents"] == round(c["dead_frac"][-1] * D_SAE)
    lat = rec.read_table(sweep_run, "latents").filter(pl.col("sae_id") == sae)
    assert out["never_fired_eval"] == (lat["fires"] == 0).sum()
    assert out["wall_seconds"] == pytest.approx(c["seconds"].max())  # no train_seconds in the fixture's saes
    assert out["n_eval_tokens"] == N_SEQ * SEQ_LEN


def test_kl_distribution_percentiles_match_numpy(sweep_run):
    """Study 001's tails: per SAE and patch, KL and ΔCE percentiles to 99.9 (numpy's linear interpolation)."""
    sae = f"{HOOKS[1]}__k8_s1"
    out = query(sweep_run, "kl_distribution", min_pos=1).filter(pl.col("sae_id") == sae)
    t = _frame(sweep_run, sae).filter(pl.col("pos") >= 1)
    assert set(out["patch"]) == {"patched", "zero", "eps", "samecos", "actdiff"}  # the patches this fixture has
    q = [50, 90, 99, 99.9]
    row = out.filter(pl.col("patch") == "patched").row(0, named=True)
    kl = t["kl_patched"].drop_nulls().to_numpy().astype(np.float64)
    assert row["n_tokens"] == len(kl)
    want = np.percentile(kl, q)
    got = [row[c] for c in ("kl_p50", "kl_p90", "kl_p99", "kl_p999")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    both = t.drop_nulls("ce_orig")
    d = both["ce_patched"].to_numpy().astype(np.float64) - both["ce_orig"].to_numpy()
    np.testing.assert_allclose(
        [row[c] for c in ("d_ce_p50", "d_ce_p90", "d_ce_p99", "d_ce_p999")], np.percentile(d, q), rtol=1e-4
    )
    assert row["d_ce_mean"] == pytest.approx(d.mean(), rel=1e-5)
    assert row["share_ce_better"] == pytest.approx((d < 0).mean())


def test_kl_gap_correlations_match_numpy_corrcoef(sweep_run):
    """Study 001: the per-token gap (kl_sae − kl_eps) against another layer's, cos, L0 and token frequency."""
    i, j = f"{HOOKS[0]}__k16_s0", f"{HOOKS[1]}__k16_s0"
    out = query(sweep_run, "kl_gap_correlations", min_count=5).filter(pl.col("sae_id") == i)
    a, b = _frame(sweep_run, i), _frame(sweep_run, j)
    gap_a = a["kl_patched"].to_numpy().astype(np.float64) - a["kl_eps"].to_numpy()
    gap_b = b["kl_patched"].to_numpy().astype(np.float64) - b["kl_eps"].to_numpy()
    ok = ~np.isnan(gap_a) & ~np.isnan(gap_b)
    row = out.filter((pl.col("against") == "sae") & (pl.col("other_sae") == j)).row(0, named=True)
    assert row["corr"] == pytest.approx(np.corrcoef(gap_a[ok], gap_b[ok])[0, 1], rel=1e-5)
    assert row["n"] == ok.sum() and row["other_layer"] == 3
    keep = ~np.isnan(gap_a)
    for col in ("cos", "l0"):
        got = out.filter(pl.col("against") == col)["corr"][0]
        assert got == pytest.approx(np.corrcoef(gap_a[keep], a[col].to_numpy()[keep])[0, 1], rel=1e-5)
    tokens = a["token"].to_numpy()[keep]
    ids = [t for t in np.unique(tokens) if (tokens == t).sum() >= 5]
    means = [gap_a[keep][tokens == t].mean() for t in ids]
    freq = [(tokens == t).sum() for t in ids]
    got = out.filter(pl.col("against") == "frequency").row(0, named=True)
    assert got["n"] == len(ids) and got["corr"] == pytest.approx(np.corrcoef(means, freq)[0, 1], rel=1e-5)
    n_saes = _every(sweep_run)["sae_id"].n_unique()
    assert out.filter(pl.col("against") == "sae").height == n_saes - 1


def test_norm_baselines_are_held_out_fits_of_the_error_norm(sweep_run):
    """Study 004 A.3: ‖e‖ from token identity, [l0, 1], [‖x‖, 1], [CE, 1]; fit on even sequences, R² on odd."""
    sae = f"{HOOKS[0]}__k32_s1"
    out = query(sweep_run, "norm_baselines").filter(pl.col("sae_id") == sae)
    t = _frame(sweep_run, sae)
    fit = t["seq"].to_numpy() % 2 == 0
    y = t["err_norm"].to_numpy().astype(np.float64)

    def r2(pred, keep):
        yt = y[keep & ~fit]
        return 1 - ((yt - pred[keep & ~fit]) ** 2).sum() / ((yt - yt.mean()) ** 2).sum()

    for name, col in (("l0", "l0"), ("x_norm", "x_norm"), ("ce", "ce_orig")):
        v = t[col].to_numpy().astype(np.float64)
        keep = ~np.isnan(v)
        a, b = np.polyfit(v[keep & fit], y[keep & fit], 1)
        row = out.filter(pl.col("predictor") == name).row(0, named=True)
        assert row["heldout_r2"] == pytest.approx(r2(a * v + b, keep), rel=1e-5, abs=1e-9), name
        assert row["n_test"] == (keep & ~fit).sum()
    tok = t["token"].to_numpy()
    means = {k: y[fit & (tok == k)].mean() for k in np.unique(tok[fit])}
    pred = np.array([means.get(k, y[fit].mean()) for k in tok])
    ident = out.filter(pl.col("predictor") == "token").row(0, named=True)
    assert ident["heldout_r2"] == pytest.approx(r2(pred, np.ones_like(fit)), rel=1e-5, abs=1e-9)
    assert out["probe_r2_err_sq"].is_not_null().all()  # the darkmatter probe's, beside them


def test_every_named_query_documents_itself_and_runs(sweep_run):
    queries = named_queries()
    assert {"summary", "delta", "corr_r2_ce", "kstar", "rate_distortion", "kl_gap", "cross_sae_predictability"} <= set(
        queries
    )
    assert {"budget_sweep", "kl_gap_by_pos", "kl_gap_tokens", "curves", "latents", "layers"} <= set(queries)
    assert {"darkmatter", "darkmatter_patch"} <= set(queries)
    for q in queries.values():  # the fixture has every table: no query is skipped, none comes back empty
        assert q.purpose and q.reads, q.name
        if q.name == "width_scaling":  # one width per group here: its own tests build width sweeps
            with pytest.raises(UsageError, match="at least 3 widths"):
                query(sweep_run, q.name)
            continue
        if q.name == "error_saes":  # needs SAEs trained on error arrays: tests/test_evaluate.py trains some
            assert query(sweep_run, q.name).height == 0
            continue
        out = query(sweep_run, q.name, **({"n_boot": 20} if "n_boot" in q.params else {}))
        assert out.height > 0, q.name
        # a column that is NULL on every row is a join or a view that matched nothing
        always_null = [c for c in out.columns if out[c].null_count() == out.height]
        assert not always_null, (q.name, always_null)


def _joined(run) -> pl.DataFrame:
    """Every token record with its SAE's row, floats widened to float64 (the reference's precision)."""
    t = _every(run).join(rec.read_table(run, "saes"), on="sae_id")
    return t.with_columns(pl.col(pl.Float32).cast(pl.Float64))


def test_rate_distortion_matches_numpy_with_a_position_window(sweep_run):
    out = query(sweep_run, "rate_distortion", min_pos=1, max_pos=5, coder="sequence")
    t = _joined(sweep_run).filter(pl.col("pos").is_between(1, 5))
    from math import lgamma, log

    as_set = query(sweep_run, "rate_distortion", min_pos=1, max_pos=5)  # the default: the set coder
    for row in as_set.iter_rows(named=True):
        f = t.filter(pl.col("sae_id") == row["sae_id"])
        log2_fact = np.array([lgamma(v + 1) / log(2) for v in f["l0"].to_numpy()])  # log₂(l0!) bits per token
        assert row["coder"] == "set"
        assert row["rate_bits"] == pytest.approx((f["rate_bits"].to_numpy() - log2_fact).mean(), rel=1e-5)
    assert out.height == _n_evaluated(sweep_run)
    for row in out.iter_rows(named=True):
        f = t.filter(pl.col("sae_id") == row["sae_id"])
        sse, sst = f["sse"].to_numpy(), f["sst"].to_numpy()
        ce = f.drop_nulls("ce_orig")
        assert row["rate_bits"] == pytest.approx(f["rate_bits"].to_numpy().mean(), rel=1e-9)
        assert row["l0"] == pytest.approx(f["l0"].to_numpy().mean(), rel=1e-9)
        assert row["fvu"] == pytest.approx(sse.sum() / sst.sum(), rel=1e-9)
        assert row["ce_gap"] == pytest.approx(ce["ce_patched"].sum() / ce["ce_orig"].sum() - 1, rel=1e-9)
        assert (row["k"], row["d_sae"], row["train_tokens"]) == (f["k"][0], 64, f["train_tokens"][0])
    # ordered by rate within each (model, layer, hook)
    for _, g in out.group_by("model", "layer", "hook"):
        assert g["rate_bits"].to_list() == sorted(g["rate_bits"].to_list())
    keys = list(zip(out["model"], out["layer"], strict=True))
    assert keys == sorted(keys)


def test_latents_ranks_by_firing_rate_then_index(sweep_run):
    out = query(sweep_run, "latents")
    raw = rec.read_table(sweep_run, "latents")
    saes = rec.read_table(sweep_run, "saes")
    assert out.height == raw.height == D_SAE * _n_evaluated(sweep_run)
    for sae in (f"{HOOKS[0]}__k8_s0", f"{HOOKS[1]}__k32_s1"):
        r = raw.filter(pl.col("sae_id") == sae).sort("latent")
        o = out.filter(pl.col("sae_id") == sae)
        rate, latent = r["firing_rate"].to_numpy(), r["latent"].to_numpy()
        order = np.lexsort((latent, -rate))  # most frequent first; ties by latent index
        assert o["rank"].to_list() == list(range(1, D_SAE + 1))
        assert o["latent"].to_list() == latent[order].tolist()
        assert np.allclose(o["firing_rate"].to_numpy(), r["fires"].to_numpy()[order] / (N_SEQ * SEQ_LEN))
        assert (o["firing_rate"].to_numpy()[40:] == 0).all()  # latents ≥ 40 never fire: the floor
        s = saes.filter(pl.col("sae_id") == sae).row(0, named=True)
        assert set(zip(o["hook"], o["layer"], o["k"], strict=True)) == {(s["hook"], s["layer"], s["k"])}


def test_alive_over_all_positions_reads_latents_and_agrees_with_the_codes(sweep_run):
    every = query(sweep_run, "summary", n_boot=10)  # all positions: latents.fires > 0
    window = query(sweep_run, "summary", n_boot=10, max_pos=SEQ_LEN)  # a window: distinct latents in codes
    codes = rec.read_table(sweep_run, "codes").group_by("sae_id").agg(pl.col("latent").n_unique())
    fires = rec.read_table(sweep_run, "latents").group_by("sae_id").agg((pl.col("fires") > 0).sum())
    want = dict(codes.iter_rows())
    assert dict(fires.iter_rows()) == want
    for out in (every, window):
        got = dict(out.select("sae_id", "alive").iter_rows())
        assert got == pytest.approx({k: v / D_SAE for k, v in want.items()})


def test_curves_thins_every_nth_step_and_joins_the_sae(sweep_run):
    raw = rec.read_table(sweep_run, "curves")
    assert query(sweep_run, "curves").height == raw.height
    out = query(sweep_run, "curves", every=3)
    saes = rec.read_table(sweep_run, "saes")
    for sae in saes["sae_id"]:
        r = raw.filter(pl.col("sae_id") == sae).sort("step")
        o = out.filter(pl.col("sae_id") == sae)
        assert o["step"].to_list() == r["step"].to_list()[::3] == [1, 4, 7]
        assert o["fvu"].to_list() == r["fvu"].to_list()[::3]
        assert np.allclose(o["explained_variance"].to_numpy(), 1 - o["fvu"].to_numpy())
        s = saes.filter(pl.col("sae_id") == sae).row(0, named=True)
        assert set(zip(o["layer"], o["hook"], o["k"], strict=True)) == {(s["layer"], s["hook"], s["k"])}
    order = list(zip(out["layer"], out["hook"], out["k"], out["sae_id"], out["step"], strict=True))
    assert order == sorted(order)


def test_kl_gap_by_pos_pools_the_hooks_saes_per_bucket(sweep_run):
    out = query(sweep_run, "kl_gap_by_pos", bucket=3, k=16)
    t = _joined(sweep_run).filter((pl.col("k") == 16) & pl.col("kl_patched").is_not_null())
    n_cells = 0
    for (model, hook), g in t.group_by("model", "hook"):
        bucket = g["pos"].to_numpy() // 3
        for base in ("eps", "samecos", "actdiff"):
            for b in np.unique(bucket):
                sel = bucket == b
                kl, kb = g["kl_patched"].to_numpy()[sel], g[f"kl_{base}"].to_numpy()[sel]
                row = out.filter(
                    (pl.col("model") == model)
                    & (pl.col("hook") == hook)
                    & (pl.col("baseline") == base)
                    & (pl.col("pos_from") == 3 * b)
                ).row(0, named=True)
                assert (row["pos_to"], row["n_tokens"]) == (3 * b + 2, sel.sum())
                assert row["gap"] == pytest.approx(kl.sum() / kb.sum(), rel=1e-6)
                assert row["kl_sae"] == pytest.approx(kl.mean(), rel=1e-6)
                n_cells += 1
    assert out.height == n_cells == 3 * 3 * 3  # (m, hook 1), (m, hook 3), (n, hook 1) × baselines × buckets


def test_kl_gap_tokens_is_gurnees_per_token_difference_per_sae(sweep_run):
    """Study 001: gap = KL_sae − KL_baseline per occurrence, averaged per token id of one SAE (≥ min_count)."""
    out = query(sweep_run, "kl_gap_tokens", baseline="samecos", min_count=5, top=3, min_pos=1)
    t = _joined(sweep_run).filter((pl.col("pos") >= 1) & pl.col("kl_patched").is_not_null())
    want = []
    for (sae_id, model), g in t.group_by("sae_id", "model"):
        rows = []
        for token in np.unique(g["token"].to_numpy()):
            sel = g["token"].to_numpy() == token
            d = g["kl_patched"].to_numpy()[sel].astype(np.float64) - g["kl_samecos"].to_numpy()[sel]
            if sel.sum() >= 5:
                rows.append((sae_id, int(token), VOCAB[model][token], int(sel.sum()), d.mean(), d.std(ddof=1)))
        want += sorted(rows, key=lambda r: (-r[4], r[1]))[:3]
    assert out.height == len(want) > 0 and set(out["baseline"]) == {"samecos"}
    got = {(r["sae_id"], r["token"]): r for r in out.iter_rows(named=True)}
    for sae_id, token, text, n, gap, sd in want:
        row = got[(sae_id, token)]
        assert (row["text"], row["n"]) == (text, n)
        assert row["gap"] == pytest.approx(gap, rel=1e-5)
        assert row["gap_sd"] == pytest.approx(sd, rel=1e-5)
        assert row["gap_se"] == pytest.approx(sd / np.sqrt(n), rel=1e-5)
    assert query(sweep_run, "kl_gap_tokens", min_count=10**6).is_empty()  # every token is too rare


def test_layers_lists_every_hook_by_model_store_and_depth(sweep_run):
    from pathlib import Path

    out = query(sweep_run, "layers")
    spectra = pl.concat([pl.read_parquet(Path(sweep_run).parent / f"spectra_{m}.parquet") for m in LAYER_STORES])
    assert out.height == spectra.height == sum(len(h) for _, h in LAYER_STORES.values())
    keys = list(zip(out["model"], out["store"], out["layer"], strict=True))
    assert keys == sorted(keys)
    for row in out.iter_rows(named=True):
        lam = np.array(
            spectra.filter((pl.col("store") == row["store"]) & (pl.col("hook") == row["hook"]))["lam"][0].to_list()
        )
        assert row["layer"] == int(row["hook"].split(".")[1])
        assert row["pr"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-12)
        assert row["pr_deflated"] == pytest.approx(lam[1:].sum() ** 2 / (lam[1:] ** 2).sum(), rel=1e-12)
        assert row["top_share"] == pytest.approx(lam.max() / lam.sum(), rel=1e-12)


def test_darkmatter_tables_join_their_saes_and_the_patch_closes_the_hand_fraction(sweep_run):
    dm = query(sweep_run, "darkmatter")
    raw = rec.read_table(sweep_run, "darkmatter")
    assert dm.height == raw.height == _n_evaluated(sweep_run)
    assert dict(dm.select("sae_id", "vector_r2").iter_rows()) == dict(raw.select("sae_id", "vector_r2").iter_rows())
    assert (dm["hook"] == dm["sae_id"].str.split("__").list.first().str.strip_prefix("n_")).all()

    out = query(sweep_run, "darkmatter_patch", min_pos=2)
    tokens = _joined(sweep_run)
    parts = rec.read_table(sweep_run, "darkmatter_tokens").with_columns(pl.col(pl.Float32).cast(pl.Float64))
    both = parts.join(tokens, on=["sae_id", "store", "seq", "pos"]).filter(
        (pl.col("pos") >= 2) & pl.col("ce_orig").is_not_null()
    )
    assert out.height == _n_evaluated(sweep_run)
    for row in out.iter_rows(named=True):
        f = both.filter(pl.col("sae_id") == row["sae_id"])
        assert (f["seq"] % 2 == 1).all()  # held-out sequences only
        orig, sae = f["ce_orig"].to_numpy().mean(), f["ce_patched"].to_numpy().mean()
        for part in ("linear", "nonlinear"):
            ce = f[f"ce_{part}"].to_numpy().mean()
            assert row[f"ce_{part}"] == pytest.approx(ce, rel=1e-6)
            assert row[f"closed_{part}"] == pytest.approx((sae - ce) / (sae - orig), rel=1e-5)
            assert 0 <= row[f"closed_{part}"] <= 1  # the fixture's parts lie between x̂ and x


def test_unknown_query_parameter_and_bad_sql_are_one_line_usage_errors(sweep_run, tmp_path):
    with pytest.raises(UsageError, match="no named query 'sumary'"):
        query(sweep_run, "sumary")
    with pytest.raises(UsageError, match="has no parameter colour"):
        query(sweep_run, "summary", colour=1)
    with pytest.raises(UsageError, match="SQL failed"):
        sql(sweep_run, "SELECT nope FROM tokens")
    with pytest.raises(UsageError, match="no records"):
        query(str(tmp_path), "summary")


def test_sql_cli_lists_queries_runs_them_and_writes_files(sweep_run, tmp_path):
    runner = CliRunner()
    listed = runner.invoke(main, ["sql", sweep_run, "--list"])
    assert listed.exit_code == 0 and "summary" in listed.output and "--param min_pos" in listed.output
    csv = runner.invoke(main, ["sql", sweep_run, "--query", "kl_gap", "--param", "min_pos=1", "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    assert pl.read_csv(csv.stdout.encode()).height == 3 * _n_evaluated(sweep_run)
    out = tmp_path / "r.parquet"
    adhoc = runner.invoke(
        main, ["sql", sweep_run, "SELECT count(*) AS n FROM tokens", "--format", "parquet", "--out", str(out)]
    )
    assert adhoc.exit_code == 0 and pl.read_parquet(out)["n"][0] == _every(sweep_run).height
    bad = runner.invoke(main, ["sql", sweep_run, "--query", "nope"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "there are:" in bad.output


def test_a_bundle_answers_like_its_run(sweep_run, tmp_path):
    from actstore.steps.bundle import create

    for name in ("b", "b.tar", "b.zip"):
        out = create(sweep_run, str(tmp_path / name))
        assert query(str(out), "summary", n_boot=50).equals(query(sweep_run, "summary", n_boot=50))


def test_bootstrap_draws_are_uniform_multinomial_resamples(sweep_run):
    """Σ w = n per resample, and the draws of structured slot sets (odd slots) vary as a multinomial's."""
    from actstore.analytics import connect

    w = np.array(
        connect(sweep_run).sql("SELECT w FROM boot_counts(200, 5000, 0) ORDER BY b").fetchnumpy()["w"].tolist()
    )
    assert w.shape == (5000, 200) and (w.sum(1) == 200).all()
    for slots in (np.arange(1, 200, 2), np.arange(0, 200, 4), np.arange(100)):
        p = len(slots) / 200
        assert w[:, slots].sum(1).var() == pytest.approx(200 * p * (1 - p), rel=0.15)
    assert w.mean(0) == pytest.approx(np.ones(200), abs=0.1)


def test_budgets_order_as_numbers_and_counts_parse_in_params(tmp_path):
    run = str(tmp_path / "run")
    rng = np.random.default_rng(4)
    for tokens, quality in ((500_000, 0.80), (1_000_000, 0.85), (2_000_000, 0.90)):
        _write_sae(run, f"b{tokens}", HOOKS[0], 8, 0, _tokens(rng, quality), tokens=tokens, rng=rng)
    out = query(run, "delta", compare="train_tokens", n_boot=20).row(0, named=True)
    assert (out["a"], out["b"]) == ("500000", "2000000") and out["d_r2"] > 0  # not text order ("1000000" < "500000")
    picked = query(run, "delta", compare="train_tokens", a="1M", b="2M", n_boot=20).row(0, named=True)
    assert (picked["a"], picked["b"]) == ("1000000", "2000000")
    with pytest.raises(UsageError, match="compare must be model or train_tokens"):
        query(run, "delta", compare="tokens")


def test_records_of_an_older_schema_and_runs_without_tokens_still_answer(sweep_run, tmp_path):
    import shutil

    from actstore.analytics import why_empty

    run = str(tmp_path / "run")
    shutil.copytree(sweep_run, run)
    sae = f"{HOOKS[0]}__k8_s0"
    t = _frame(run, sae).drop("sae_id", "rate_bits")  # a file written before rate_bits existed
    t.write_parquet(rec.part_path(run, "tokens", sae))
    (rec.part_path(run, "tokens", sae).parent / "SHA256SUMS").unlink()  # older versions wrote no sums
    assert sql(run, "SELECT count(rate_bits) AS n FROM tokens")["n"][0] == _every(sweep_run).height - t.height
    assert query(run, "summary", n_boot=10).height == rec.read_table(run, "saes").height
    curves_only = tmp_path / "curves_only"
    rec.write_tables(curves_only, "x", {"curves": pl.DataFrame({"step": [1, 2], "mse": [0.5, 0.4]})})
    assert sql(str(curves_only), "SELECT count(*) AS n FROM curves")["n"][0] == 2
    assert query(str(curves_only), "darkmatter").is_empty()
    assert "actstore darkmatter RUN" in why_empty(str(curves_only), "darkmatter")


def test_lr_sweep_marks_the_rate_with_the_lowest_held_out_fvu(sweep_run, tmp_path):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(sweep_run, run)
    base = rec.read_table(run, "saes").row(0, named=True)
    tokens = _every(run).filter(pl.col("sae_id") == base["sae_id"]).drop("sae_id")
    rates = {3e-3: 0.5, 1e-2: 0.8, 3e-2: 1.2}  # each rate's error scale; the base SAE is lr 1e-3, scale 1
    for lr, scale in rates.items():
        sae_id = f"{base['sae_id']}_lr{lr:g}"
        row = rec.read_table(run, "saes").filter(pl.col("sae_id") == base["sae_id"]).drop("sae_id")
        frames = {"tokens": tokens.with_columns(sse=pl.col("sse") * scale), "saes": row.with_columns(lr=pl.lit(lr))}
        rec.write_tables(run, sae_id, frames)
    cell = {key: base[key] for key in ("model", "hook", "k", "expansion", "seed", "train_tokens")}
    out = query(run, "lr_sweep").filter(*[pl.col(key) == value for key, value in cell.items()])
    assert out["lr"].to_list() == [1e-3, *rates] and (out["n_lr"] == 4).all()
    want = [float(tokens["sse"].sum() * scale / tokens["sst"].sum()) for scale in (1.0, *rates.values())]
    np.testing.assert_allclose(out["fvu"].to_numpy(), want, rtol=1e-5)
    assert out["best"].to_list() == [False, True, False, False] and not out["best_at_edge"].any()


def test_records_written_before_the_patch_pos_key_read_as_every_position(tmp_path):
    run, rng = str(tmp_path / "run"), np.random.default_rng(3)
    _write_sae(run, f"{HOOKS[0]}__k8_s0", HOOKS[0], 8, 0, _tokens(rng, 0.9), rng=rng)
    (part,) = rec.part_files(run, "tokens")
    pl.read_parquet(part).drop("patch_pos").write_parquet(part)  # an older actstore's file
    (part.parent / "SHA256SUMS").unlink()  # (which had no sums)
    assert sql(run, "SELECT count(*) AS n FROM tokens")["n"][0] == pl.read_parquet(part).height
    assert sql(run, "SELECT count(*) AS n FROM tokens_single")["n"][0] == 0


def test_proxy_leaderboard_leave_one_cell_out_matches_numpy(tmp_path):
    run, rng = str(tmp_path / "run"), np.random.default_rng(5)
    for i, q in enumerate((0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.96)):
        t = _tokens(rng, q)
        extra = np.random.default_rng(100 + i)
        n = t.height
        t = t.with_columns(  # sensitivity columns on all but the last cell: the comparison uses the six
            fo_patched=pl.Series(extra.normal(0.01 * (1 - q), 0.01, n), dtype=pl.Float32),
            swd_patched=pl.Series(extra.gamma(2, 0.01 * (1 - q), n), dtype=pl.Float32),
            iso_sens=pl.Series(extra.gamma(2, 0.1, n), dtype=pl.Float32),
        )
        if i == 6:
            t = t.with_columns(pl.lit(None, pl.Float32).alias(c) for c in ("fo_patched", "swd_patched", "iso_sens"))
        _write_sae(run, f"{HOOKS[0]}__k{8 + i}_s0", HOOKS[0], 8 + i, 0, t, rng=rng)
    _positions_at_the_mean(run, (HOOKS[0],))
    out = query(run, "proxy_leaderboard", n_boot=200)
    rows = _every(run).join(rec.read_table(run, "saes").select("sae_id", "d_model"), on="sae_id")
    cells = []
    for _, g in rows.group_by("sae_id"):
        f = {
            c: g[c].cast(pl.Float64).to_numpy()
            for c in (
                "ce_patched",
                "ce_orig",
                "kl_patched",
                "sse",
                "sst",
                "cos",
                "relerr",
                "fo_patched",
                "swd_patched",
                "iso_sens",
            )
        }
        ce = ~np.isnan(f["ce_orig"])
        if np.isnan(f["fo_patched"]).all():
            continue
        cells.append({
            "ce_rec": 2 - f["ce_patched"][ce].sum() / f["ce_orig"][ce].sum(), "kl": np.nanmean(f["kl_patched"]),
            "fvu": f["sse"].sum() / f["sst"].sum(), "mse": f["sse"].sum() / (len(g) * g["d_model"][0]),
            "cos": f["cos"].mean(), "relerr": f["relerr"].mean(), "fo": f["fo_patched"].mean(),
            "swd": f["swd_patched"].mean(), "alignment": f["swd_patched"].sum() / (0.5 * f["sse"] * f["iso_sens"]).sum(),
        })  # fmt: skip
    assert len(cells) == 6
    for target in ("ce_rec", "kl"):
        y = np.array([c[target] for c in cells])
        want = {}
        for proxy in ("fvu", "mse", "cos", "relerr", "fo", "swd", "alignment"):
            x = np.array([c[proxy] for c in cells])
            errs = []
            for i in range(len(x)):  # refit without cell i, predict it
                keep = np.arange(len(x)) != i
                b, a = np.polyfit(x[keep], y[keep], 1)
                errs.append(y[i] - (a + b * x[i]))
            want[proxy] = np.sqrt(np.mean(np.square(errs)))
            got = out.filter(pl.col("target") == target, pl.col("proxy") == proxy).row(0, named=True)
            assert got["n_cells"] == 6
            assert got["loo_rmse"] == pytest.approx(want[proxy], rel=1e-6), (target, proxy)
            assert got["loo_r2"] == pytest.approx(1 - np.sum(np.square(errs)) / np.sum((y - y.mean()) ** 2), rel=1e-6)
        ranked = out.filter(pl.col("target") == target).sort("rank")["proxy"].to_list()
        assert ranked == sorted(want, key=want.get)
        shares = out.filter(pl.col("target") == target)["share_first"].fill_null(0)
        assert shares.sum() == pytest.approx(1.0, abs=0.05)  # ties aside, one proxy ranks first per resample


def test_sql_reads_only_inside_its_run(sweep_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    refused = [
        (f"COPY (SELECT 42) TO '{tmp_path}/x.csv'", "only reads"),
        ("ATTACH 'new.db'", "only reads"),
        ("CREATE TABLE t AS SELECT 1", "only reads"),
        ("INSTALL httpfs", "only reads"),
        ("SET enable_external_access = true", "only reads"),
        ("PRAGMA enable_profiling", "only reads"),
        (f"SELECT * FROM read_csv('{outside}')", "SQL failed"),
        ("SELECT * FROM read_text('/etc/passwd')", "SQL failed"),
        ("SELEC 1", "does not parse"),
    ]
    for text, match in refused:
        with pytest.raises(UsageError, match=match):
            sql(sweep_run, text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]  # nothing written, nothing attached
    assert sql(sweep_run, "SELECT count(*) AS n FROM saes")["n"][0] > 0  # the run itself reads as before
    inside = rec.part_files(sweep_run, "saes")[0]
    assert sql(sweep_run, f"SELECT count(*) AS n FROM read_parquet('{inside}')")["n"][0] == 1


def test_named_query_parameters_are_checked_against_their_type_and_range(sweep_run):
    for params, match in (
        ({"n_boot": -5}, "n_boot=-5 must be a whole number ≥ 0"),
        ({"n_boot": "many"}, "n_boot=many is not a number"),
        ({"min_pos": 1.5}, "min_pos=1.5 must be a whole number ≥ 0"),
    ):
        with pytest.raises(UsageError, match=match):
            query(sweep_run, "summary", **params)
    with pytest.raises(UsageError, match="top=0 must be a whole number ≥ 1"):
        query(sweep_run, "kl_gap_tokens", top=0)


def test_cli_sql_errors_are_one_line(sweep_run):
    from click.testing import CliRunner

    from actstore.cli.main import main

    for args in (["SELEC 1"], ["COPY (SELECT 1) TO 'x.csv'"], ["--query", "summary", "--param", "n_boot=-5"]):
        result = CliRunner().invoke(main, ["sql", sweep_run, *args])
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output

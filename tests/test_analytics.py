"""Named queries checked against independent computations: numpy, scipy.stats.bootstrap, hand arithmetic."""

from __future__ import annotations

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
                "d_model": 16,
                "d_sae": 64,
                "k": k,
                "expansion": 4,
                "train_tokens": tokens,
                "seed": seed,
                "architecture": "topk",
                "path": "",
            }
        ]
    )


def _write_sae(run, sae_id, hook, k, seed, tokens_frame, model="m", tokens=1000, rng=None):
    codes = pl.DataFrame(
        {
            "seq": tokens_frame["seq"].to_numpy().repeat(2),
            "pos": tokens_frame["pos"].to_numpy().repeat(2),
            "latent": (rng.integers(0, 40, 2 * len(tokens_frame))).astype(np.int32),
            "value": np.ones(2 * len(tokens_frame), dtype=np.float32),
        }
    )
    rec.write_tables(
        run,
        sae_id,
        {"tokens": tokens_frame, "saes": _saes_row(sae_id, hook, k, seed, model, tokens), "codes": codes},
    )


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """2 hooks × k ∈ {8, 16, 32} × seeds {0, 1} of model m, and a model n at hook 1 for deltas."""
    run = str(tmp_path_factory.mktemp("analytics") / "run")
    rng = np.random.default_rng(0)
    for hook in HOOKS:
        for k, quality in ((8, 0.80), (16, 0.90), (32, 0.95)):
            for seed in (0, 1):
                q = quality + 0.01 * seed
                _write_sae(run, f"{hook}__k{k}_s{seed}", hook, k, seed, _tokens(rng, q), rng=rng)
    for k, quality in ((8, 0.85), (16, 0.88)):
        for seed in (0, 1):
            _write_sae(run, f"n_{HOOKS[0]}__k{k}_s{seed}", HOOKS[0], k, seed, _tokens(rng, quality), model="n", rng=rng)
    return run


def _frame(run, sae_id):
    return rec.read_table(run, "tokens").filter(pl.col("sae_id") == sae_id).sort("seq", "pos")


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
    t = rec.read_table(run, "tokens").join(rec.read_table(run, "saes"), on="sae_id")
    t = t.with_columns(pl.col(pl.Float32).cast(pl.Float64))
    return t.group_by("sae_id", "model", "hook", "k", "seed").agg(
        (1 - pl.col("sse").sum() / pl.col("sst").sum()).alias("r2"),
        (2 - pl.col("ce_patched").sum() / pl.col("ce_orig").sum()).alias("ce_rec"),
    )


def test_corr_r2_ce_matches_numpy_pooled_and_within_k(sweep_run):
    out = query(sweep_run, "corr_r2_ce").filter(pl.col("model") == "m")
    s = _sae_stats(sweep_run).filter(pl.col("model") == "m")
    for hook in HOOKS:
        h = s.filter(pl.col("hook") == hook)
        r2, ce = h["r2"].to_numpy(), h["ce_rec"].to_numpy()
        k = h["k"].to_numpy()
        r2_c = r2 - np.array([r2[k == v].mean() for v in k])
        ce_c = ce - np.array([ce[k == v].mean() for v in k])
        row = out.filter(pl.col("hook") == hook).row(0, named=True)
        assert row["pooled"] == pytest.approx(np.corrcoef(r2, ce)[0, 1], rel=1e-6)
        assert row["within_k"] == pytest.approx(np.corrcoef(r2_c, ce_c)[0, 1], rel=1e-6)


def test_kstar_interpolates_linearly_between_the_sweeps_k(sweep_run):
    s = _sae_stats(sweep_run).filter((pl.col("model") == "m") & (pl.col("hook") == HOOKS[0]))
    curve = s.group_by("k").agg(pl.col("ce_rec").mean()).sort("k")
    ks, ce = curve["k"].to_numpy(), curve["ce_rec"].to_numpy()
    target = float((ce[0] + ce[1]) / 2) if ce[1] > ce[0] else float((ce[1] + ce[2]) / 2)
    j = int(np.argmax(ce >= target))
    want = ks[j - 1] + (target - ce[j - 1]) * (ks[j] - ks[j - 1]) / (ce[j] - ce[j - 1])
    out = query(sweep_run, "kstar", targets=f"{target},{ce.max() + 1}", ref_model="m")
    row = out.filter((pl.col("model") == "m") & (pl.col("hook") == HOOKS[0]))
    assert row["k_star"][0] == pytest.approx(want, rel=1e-6)
    assert row["k_star"][1] is None  # unreachable target
    assert row["ratio_to_ref"][0] == pytest.approx(1.0)


def test_delta_and_budget_sweep_match_hand_differences(sweep_run):
    out = query(sweep_run, "delta", compare="model", a="m", b="n", n_boot=200)
    s = _sae_stats(sweep_run).filter(pl.col("hook") == HOOKS[0])
    assert len(out) == 4  # k ∈ {8, 16} × seeds {0, 1} exist on both sides
    for row in out.iter_rows(named=True):
        pick = s.filter((pl.col("k") == row["k"]) & (pl.col("seed") == row["seed"]))
        a = pick.filter(pl.col("model") == "m").row(0, named=True)
        b = pick.filter(pl.col("model") == "n").row(0, named=True)
        assert row["d_r2"] == pytest.approx(b["r2"] - a["r2"], rel=1e-6)
        assert row["d_ce_rec"] == pytest.approx(b["ce_rec"] - a["ce_rec"], rel=1e-6)
        assert row["d_r2_lo"] <= row["d_r2"] <= row["d_r2_hi"]
        assert row["mismatch"] == (row["d_r2"] > 0 and row["d_ce_rec"] < 0)
    rates = out.group_by("k").agg(pl.col("mismatch").cast(pl.Float64).mean(), pl.col("mismatch_rate").first())
    assert np.allclose(rates["mismatch"].to_numpy(), rates["mismatch_rate"].to_numpy())


def test_budget_sweep_compares_each_budget_with_the_reference(tmp_path):
    run = str(tmp_path / "run")
    rng = np.random.default_rng(2)
    for tokens, quality in ((1000, 0.8), (4000, 0.9)):
        for seed in (0, 1):
            _write_sae(run, f"b{tokens}_s{seed}", HOOKS[0], 8, seed, _tokens(rng, quality), tokens=tokens, rng=rng)
    out = query(run, "budget_sweep").row(0, named=True)
    s = _sae_stats(run).join(rec.read_table(run, "saes").select("sae_id", "train_tokens"), on="sae_id")
    d = [
        s.filter((pl.col("train_tokens") == 4000) & (pl.col("seed") == seed))["r2"][0]
        - s.filter((pl.col("train_tokens") == 1000) & (pl.col("seed") == seed))["r2"][0]
        for seed in (0, 1)
    ]
    assert (out["ref_tokens"], out["train_tokens"], out["n_seeds"]) == (1000, 4000, 2)
    assert out["d_r2"] == pytest.approx(np.mean(d), rel=1e-6)


def test_cross_sae_predictability_matches_numpy_lstsq(sweep_run):
    i, j = f"{HOOKS[0]}__k8_s0", f"{HOOKS[1]}__k32_s1"
    out = query(sweep_run, "cross_sae_predictability").filter((pl.col("sae_i") == i) & (pl.col("sae_j") == j))
    x, y = _frame(sweep_run, i), _frame(sweep_run, j)
    fit = x["seq"].to_numpy() % 2 == 0
    xe, ye = x["err_norm"].to_numpy().astype(np.float64), y["err_norm"].to_numpy().astype(np.float64)
    coef = np.linalg.lstsq(np.c_[xe[fit], np.ones(fit.sum())], ye[fit], rcond=None)[0]
    pred = coef[0] * xe[~fit] + coef[1]
    r2 = 1 - ((ye[~fit] - pred) ** 2).sum() / ((ye[~fit] - ye[~fit].mean()) ** 2).sum()
    assert out["heldout_r2"][0] == pytest.approx(r2, rel=1e-6)
    assert out["corr"][0] == pytest.approx(np.corrcoef(xe, ye)[0, 1], rel=1e-6)
    n_saes = rec.read_table(sweep_run, "saes").height
    assert query(sweep_run, "cross_sae_predictability").height == n_saes * (n_saes - 1)


def test_kl_gap_is_the_ratio_of_mean_kls(sweep_run):
    sae = f"{HOOKS[0]}__k16_s0"
    out = query(sweep_run, "kl_gap").filter(pl.col("sae_id") == sae)
    t = _frame(sweep_run, sae)
    for base in ("eps", "samecos", "actdiff"):
        row = out.filter(pl.col("baseline") == base).row(0, named=True)
        ratio = t["kl_patched"].to_numpy() / t[f"kl_{base}"].to_numpy()
        assert row["gap"] == pytest.approx(t["kl_patched"].mean() / t[f"kl_{base}"].mean(), rel=1e-5)
        assert row["ratio_p50"] == pytest.approx(np.median(ratio), rel=1e-5)


def test_every_named_query_documents_itself_and_runs(sweep_run):
    queries = named_queries()
    assert {"summary", "delta", "corr_r2_ce", "kstar", "rate_distortion", "kl_gap", "cross_sae_predictability"} <= set(
        queries
    )
    assert {"budget_sweep", "kl_gap_by_pos", "kl_gap_tokens"} <= set(queries)
    for q in queries.values():
        assert q.purpose and q.reads, q.name
        if q.name not in ("curves", "latents", "layers", "darkmatter", "darkmatter_patch", "budget_sweep"):
            assert query(sweep_run, q.name, **({"n_boot": 20} if "n_boot" in q.params else {})).height > 0, q.name


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
    assert pl.read_csv(csv.stdout.encode()).height == 3 * rec.read_table(sweep_run, "saes").height
    out = tmp_path / "r.parquet"
    adhoc = runner.invoke(
        main, ["sql", sweep_run, "SELECT count(*) AS n FROM tokens", "--format", "parquet", "--out", str(out)]
    )
    assert adhoc.exit_code == 0 and pl.read_parquet(out)["n"][0] == rec.read_table(sweep_run, "tokens").height
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
    assert query(run, "budget_sweep", ref_tokens="1M")["train_tokens"].to_list() == [500_000, 2_000_000]
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
    assert (
        sql(run, "SELECT count(rate_bits) AS n FROM tokens")["n"][0]
        == rec.read_table(sweep_run, "tokens").height - t.height
    )
    assert query(run, "summary", n_boot=10).height == rec.read_table(run, "saes").height
    curves_only = tmp_path / "curves_only"
    rec.write_tables(curves_only, "x", {"curves": pl.DataFrame({"step": [1, 2], "mse": [0.5, 0.4]})})
    assert sql(str(curves_only), "SELECT count(*) AS n FROM curves")["n"][0] == 2
    assert query(str(curves_only), "darkmatter").is_empty()
    assert "actstore darkmatter RUN" in why_empty(str(curves_only), "darkmatter")

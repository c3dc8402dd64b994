"""Cross-model queries (delta, kstar, corr_r2_ce, budget_sweep) against numpy on a two-model fixture.

The fixture is built to catch the ways these went wrong before: the models' names sort the wrong way
('m-410' < 'm-70' as text, but m-410 is the larger), their layer counts differ (6 vs 24) and so do the
hooks at a matched depth (m-70 blocks.3 of 6 ↔ m-410 blocks.12 of 24).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from actstore import run as rec
from actstore.analytics import query
from actstore.errors import UsageError

N_SEQ, SEQ_LEN = 16, 8
SMALL, LARGE = "m-70", "m-410"
SHAPES = {SMALL: (16, 6, (1, 3, 5)), LARGE: (32, 24, (4, 12, 20))}  # d_model, n_layers, layers at depths 1/6, 3/6, 5/6
KS = (8, 16, 32)
SEEDS = (0, 1, 2)
BUDGETS = (1000, 4000)  # the larger budget at mid depth only


def _tokens(rng: np.random.Generator, quality: float, ce_damage: float) -> pl.DataFrame:
    """Per-token records of one SAE: `quality` sets its R², `ce_damage` its CE increase."""
    n = N_SEQ * SEQ_LEN
    hard = np.repeat(rng.gamma(2.0, 0.5, N_SEQ), SEQ_LEN)
    sst = rng.chisquare(8, n) * hard
    sse = sst * (1 - quality) * rng.uniform(0.5, 1.5, n)
    ce_orig = rng.gamma(2.0, 1.0, n) * hard
    ce_patched = ce_orig + ce_damage * rng.gamma(1.0, 1.0, n)
    last = np.tile(np.arange(SEQ_LEN) == SEQ_LEN - 1, N_SEQ)
    ce_orig[last], ce_patched[last] = np.nan, np.nan
    x_norm = rng.uniform(5, 10, n)
    return pl.DataFrame(
        {
            "store": "e.zarr",
            "seq": np.repeat(np.arange(N_SEQ, dtype=np.int32), SEQ_LEN),
            "pos": np.tile(np.arange(SEQ_LEN, dtype=np.int16), N_SEQ),
            "token": rng.integers(0, 5, n).astype(np.int32),
            "x_norm": x_norm,
            "recon_norm": x_norm * rng.uniform(0.7, 1.0, n),
            "sse": sse,
            "sst": sst,
            "ce_orig": ce_orig,
            "ce_patched": ce_patched,
        }
    ).with_columns(pl.col(pl.Float64).cast(pl.Float32).fill_nan(None))


def _saes_row(model: str, layer: int, k: int, seed: int, tokens: int, lr: float = 1e-3) -> pl.DataFrame:
    d, n_layers, _ = SHAPES[model]
    row = rec.saes_row(
        model=model, hook=f"blocks.{layer}.hook_resid_post", n_layers=n_layers, d_model=d, d_sae=4 * d, k=k,
        expansion=4, train_tokens=tokens, seed=seed, architecture="topk", path="", lr=lr,
    )  # fmt: skip
    return row


def _write(run: str, model: str, layer: int, k: int, seed: int, tokens: int, rng, lr: float = 1e-3) -> str:
    # The larger model: higher R² and, at low k, worse CE (study 000's mismatch), with noise across seeds.
    big = model == LARGE
    quality = 1 - (0.3 / np.sqrt(k)) * (0.6 if big else 1.0) * (0.8 if tokens > 1000 else 1.0)
    damage = (2.0 / k) * (1.4 if big and tokens == 1000 else 0.9) + 0.02 * rng.standard_normal()
    sae_id = f"{model}_L{layer}_k{k}_t{tokens}_s{seed}" + (f"_lr{lr:g}" if lr != 1e-3 else "")
    rec.write_tables(
        run,
        sae_id,
        {"tokens": _tokens(rng, quality, max(damage, 0.01)), "saes": _saes_row(model, layer, k, seed, tokens, lr)},
    )
    return sae_id


def _positions_at_the_mean(run: str) -> None:
    for model, (d, _, layers) in SHAPES.items():
        for layer in layers:
            hook = f"blocks.{layer}.hook_resid_post"
            pos, dim = np.repeat(np.arange(SEQ_LEN), d), np.tile(np.arange(d), SEQ_LEN)
            rows = pl.DataFrame({"store": "e.zarr", "hook": hook, "pos": pos, "dim": dim, "n": N_SEQ, "dev_sum": 0.0})
            rec.write_tables(run, rec.hash_key(f"{model}\n{hook}"), {"positions": rows})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> str:
    run = str(tmp_path_factory.mktemp("compare") / "run")
    rng = np.random.default_rng(0)
    for model, (_, _, layers) in SHAPES.items():
        for layer in layers:
            for k in KS:
                for seed in SEEDS:
                    _write(run, model, layer, k, seed, BUDGETS[0], rng)
        for k in KS[:2]:
            for seed in SEEDS[:2]:  # two repeats at the larger budget, mid depth
                _write(run, model, layers[1], k, seed, BUDGETS[1], rng)
    _write(run, SMALL, 3, 8, 0, BUDGETS[0], rng, lr=5e-3)  # an lr-sweep twin of one repeat: not a new repeat
    _positions_at_the_mean(run)
    return run


def _stats(run: str) -> pl.DataFrame:
    """Per SAE: R², pooled CE_rec, and per-sequence CE_rec mean and SD, computed here with numpy."""
    t = rec.read_table(run, "tokens").with_columns(pl.col(pl.Float32).cast(pl.Float64))
    rows = []
    for (sae_id,), g in t.group_by("sae_id"):
        per_seq = g.group_by("seq").agg(pl.col("ce_patched").sum(), pl.col("ce_orig").sum()).sort("seq")
        cr = 2 - per_seq["ce_patched"].to_numpy() / per_seq["ce_orig"].to_numpy()
        rows.append(
            {
                "sae_id": sae_id,
                "r2": 1 - g["sse"].sum() / g["sst"].sum(),
                "ce_rec": 2 - g["ce_patched"].sum() / g["ce_orig"].sum(),
                "ce_seq": cr.mean(),
                "ce_seq_sd": cr.std(ddof=1),
            }
        )
    return pl.DataFrame(rows).join(rec.read_table(run, "saes"), on="sae_id")


def _pick(s: pl.DataFrame, model: str, layer: int, k: int, seed: int, tokens: int = BUDGETS[0]) -> dict:
    f = s.filter(
        (pl.col("model") == model) & (pl.col("layer") == layer) & (pl.col("k") == k) & (pl.col("seed") == seed)
        & (pl.col("train_tokens") == tokens) & (pl.col("lr") == 1e-3)
    )  # fmt: skip
    return f.row(0, named=True)


def test_delta_is_larger_minus_smaller_at_matched_depth_whatever_the_names(two_models):
    out = query(two_models, "delta", n_boot=200)
    s = _stats(two_models)
    assert set(out["a"]) == {SMALL} and set(out["b"]) == {LARGE}
    pairs = set(zip(out["layer_a"], out["layer_b"], strict=True))
    assert pairs == {(1, 4), (3, 12), (5, 20)}
    assert set(out["depth"].round(6)) == {round(1 / 6, 6), 0.5, round(5 / 6, 6)}
    n_cells = len(SHAPES[SMALL][2]) * len(KS) * len(SEEDS) + len(KS[:2]) * len(SEEDS[:2])
    assert out.height == n_cells + 1  # the lr twin pairs with m-410's seed too
    for row in out.filter(pl.col("matched") == str(BUDGETS[0])).iter_rows(named=True):
        a = _pick(s, SMALL, row["layer_a"], row["k"], row["seed"])
        b = _pick(s, LARGE, row["layer_b"], row["k"], row["seed"])
        if row["r2_a"] != pytest.approx(a["r2"]):
            continue  # the lr twin's row
        assert row["d_r2"] == pytest.approx(b["r2"] - a["r2"], rel=1e-6)
        assert row["d_ce_rec"] == pytest.approx(b["ce_rec"] - a["ce_rec"], rel=1e-6)
        assert row["mismatch"] == (b["r2"] > a["r2"] and b["ce_rec"] < a["ce_rec"])
        d = (b["ce_seq"] - a["ce_seq"]) / np.sqrt((a["ce_seq_sd"] ** 2 + b["ce_seq_sd"] ** 2) / 2)
        assert row["cohens_d"] == pytest.approx(d, rel=1e-6)
        assert row["d_r2_lo"] <= row["d_r2"] <= row["d_r2_hi"]
    twin = out.filter(pl.col("sae_a").str.contains("_lr"))
    assert twin.height == 1  # the lr twin pairs too, but its seed counts once in the mismatch rate:
    cell = out.filter((pl.col("depth") == 0.5) & (pl.col("k") == 8) & (pl.col("matched") == str(BUDGETS[0])))
    per_seed = cell.group_by("seed").agg(pl.col("mismatch").cast(pl.Float64).mean())
    assert cell["mismatch_rate"][0] == pytest.approx(per_seed["mismatch"].mean())
    low_k = out.filter((pl.col("k") == 8) & (pl.col("matched") == str(BUDGETS[0])))
    assert (low_k["d_r2"] > 0).all() and (low_k["d_ce_rec"] < 0).mean() > 0.5  # the fixture's mismatch, signed right
    swapped = query(two_models, "delta", a=LARGE, b=SMALL, n_boot=20)
    assert np.allclose(swapped.sort("depth", "k", "seed", "matched", "r2_b")["d_r2"].to_numpy().sum(),
                       -out["d_r2"].to_numpy().sum())  # fmt: skip


def test_delta_at_one_depth_by_mapping_and_per_sequence_ce(two_models):
    mid = query(two_models, "delta", depth=0.5, n_boot=20)
    assert set(mid["layer_b"]) == {12}
    mapped = query(two_models, "delta", layers="3:12", n_boot=20)
    assert mapped.columns == mid.columns and mapped.height == mid.height
    for c in mid.columns:  # the same rows; floats to rounding (sums in another order)
        if mid[c].dtype.is_float():
            np.testing.assert_allclose(mapped[c].to_numpy(), mid[c].to_numpy(), rtol=1e-9)
        else:
            assert mapped[c].equals(mid[c]), c
    seq = query(two_models, "delta", depth=0.5, ce_unit="seq", n_boot=20)
    s = _stats(two_models)
    row = seq.filter((pl.col("k") == 16) & (pl.col("seed") == 1) & (pl.col("matched") == str(BUDGETS[0]))).row(
        0, named=True
    )
    assert row["ce_rec_a"] == pytest.approx(_pick(s, SMALL, 3, 16, 1)["ce_seq"], rel=1e-6)
    assert row["ce_rec_b"] == pytest.approx(_pick(s, LARGE, 12, 16, 1)["ce_seq"], rel=1e-6)


def test_kstar_ratio_is_larger_over_smaller_at_matched_depth(two_models):
    s = _stats(two_models).filter(pl.col("train_tokens") == BUDGETS[0])

    def kstar(model: str, layer: int, t: float) -> float | None:
        c = s.filter((pl.col("model") == model) & (pl.col("layer") == layer))
        c = c.group_by("k", "seed").agg(pl.col("ce_rec").mean()).group_by("k").agg(pl.col("ce_rec").mean()).sort("k")
        ks, ce = c["k"].to_numpy(), c["ce_rec"].to_numpy()
        hit = np.nonzero(ce >= t)[0]
        if not len(hit):
            return None
        j = hit[0]
        return float(ks[0]) if j == 0 else ks[j - 1] + (t - ce[j - 1]) * (ks[j] - ks[j - 1]) / (ce[j] - ce[j - 1])

    mid_small = s.filter((pl.col("model") == SMALL) & (pl.col("layer") == 3)).group_by("k").agg(pl.col("ce_rec").mean())
    t = float(mid_small.sort("k")["ce_rec"].to_numpy()[:2].mean())  # between k = 8 and 16 of the smaller model
    out = query(two_models, "kstar", targets=str(t))
    row = out.filter((pl.col("depth") == 0.5) & (pl.col("train_tokens") == BUDGETS[0])).row(0, named=True)
    assert (row["a"], row["b"], row["layer_a"], row["layer_b"]) == (SMALL, LARGE, 3, 12)
    assert row["k_star_a"] == pytest.approx(kstar(SMALL, 3, t), rel=1e-6)
    want_b = kstar(LARGE, 12, t)
    assert row["k_star_b"] == pytest.approx(want_b, rel=1e-6)
    assert row["ratio"] == pytest.approx(want_b / kstar(SMALL, 3, t), rel=1e-6)


def test_corr_pools_models_per_depth_and_demeans_each_k_across_models(two_models):
    out = query(two_models, "corr_r2_ce", train_tokens=BUDGETS[0])
    s = _stats(two_models).filter(pl.col("train_tokens") == BUDGETS[0])
    assert out.height == 3 and (out["n_models"] == 2).all()
    for row in out.iter_rows(named=True):
        layer_small = round(row["depth"] * 6)
        h = s.filter(
            ((pl.col("model") == SMALL) & (pl.col("layer") == layer_small))
            | ((pl.col("model") == LARGE) & (pl.col("layer") == layer_small * 4))
        )
        # one point per (model, k): lr twins merged into their seed, then seeds averaged
        h = h.group_by("model", "k", "seed").agg(pl.col("r2", "ce_rec").mean())
        h = h.group_by("model", "k").agg(pl.col("r2", "ce_rec").mean())
        r2, ce, k = h["r2"].to_numpy(), h["ce_rec"].to_numpy(), h["k"].to_numpy()
        r2_c = r2 - np.array([r2[k == v].mean() for v in k])
        ce_c = ce - np.array([ce[k == v].mean() for v in k])
        assert row["n_points"] == len(h) == 2 * len(KS)
        assert row["pooled"] == pytest.approx(np.corrcoef(r2, ce)[0, 1], rel=1e-6)
        assert row["within_k"] == pytest.approx(np.corrcoef(r2_c, ce_c)[0, 1], rel=1e-6)
    both = query(two_models, "corr_r2_ce")  # every budget: one row per (depth, budget)
    assert both.filter(pl.col("depth") == 0.5)["train_tokens"].to_list() == list(BUDGETS)


def test_budget_sweep_means_and_t_intervals_over_distinct_seeds(two_models):
    out = query(two_models, "budget_sweep", depth=0.5)
    s = _stats(two_models)
    assert set(zip(out["k"], out["train_tokens"], strict=True)) == {(k, t) for k in KS for t in BUDGETS} - {
        (32, BUDGETS[1])
    }
    for row in out.iter_rows(named=True):
        seeds = SEEDS if row["train_tokens"] == BUDGETS[0] else SEEDS[:2]
        assert row["n"] == len(seeds)  # distinct seeds: the lr twin is averaged into its seed, not counted
        d_ce, d_r2 = [], []
        for seed in seeds:
            pick = s.filter(
                (pl.col("k") == row["k"]) & (pl.col("seed") == seed) & (pl.col("train_tokens") == row["train_tokens"])
            )
            a = pick.filter((pl.col("model") == SMALL) & (pl.col("layer") == 3))
            b = pick.filter((pl.col("model") == LARGE) & (pl.col("layer") == 12))
            d_ce.append(b["ce_rec"].mean() - a["ce_rec"].mean())
            d_r2.append(b["r2"].mean() - a["r2"].mean())
        for name, d in (("d_ce_rec", np.array(d_ce)), ("d_r2", np.array(d_r2))):
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            assert row[name] == pytest.approx(d.mean(), rel=1e-6)
            assert row[f"{name}_lo"] == pytest.approx(d.mean() - half, rel=1e-3, abs=1e-9)
            assert row[f"{name}_hi"] == pytest.approx(d.mean() + half, rel=1e-3, abs=1e-9)
        assert row["mismatch_rate"] == pytest.approx(
            np.mean([(r > 0) and (c < 0) for r, c in zip(d_r2, d_ce, strict=True)])
        )


def test_bad_comparisons_are_one_line_errors_naming_what_exists(two_models, tmp_path):
    with pytest.raises(UsageError, match=r"no pair of m-70 and m-410 at depth 0.25.*0.1667, 0.5, 0.8333"):
        query(two_models, "delta", depth=0.25, n_boot=10)
    with pytest.raises(UsageError, match=r"depth_tol 0.4 matches .* of m-410 to one hook of m-70"):
        query(two_models, "delta", depth_tol=0.4, n_boot=10)
    with pytest.raises(UsageError, match=r"model m-1b \(b\) has no SAEs in this run; it has: m-70, m-410"):
        query(two_models, "budget_sweep", b="m-1b")
    with pytest.raises(UsageError, match=r"no hook of m-70 pairs with one of m-410 by layers=1:7"):
        query(two_models, "delta", layers="1:7", n_boot=10)
    with pytest.raises(UsageError, match="a and b are both 1000 tokens"):
        query(two_models, "delta", compare="train_tokens", a=1000, b=1000, n_boot=10)
    with pytest.raises(UsageError, match="ce_unit must be pooled or seq"):
        query(two_models, "kstar", ce_unit="batch")
    one = str(tmp_path / "one")
    _write(one, SMALL, 3, 8, 0, BUDGETS[0], np.random.default_rng(1))
    with pytest.raises(UsageError, match="comparing models needs SAEs of two models; this run has only m-70"):
        query(one, "delta", n_boot=10)
    assert query(one, "kstar", targets="0.5")["b"].is_null().all()  # one model: its k*, no ratio
    _write(one, LARGE, 12, 8, 0, BUDGETS[0], np.random.default_rng(2))  # no `positions` in this run
    filtered = query(one, "delta", min_pos=1, n_boot=10).row(0, named=True)
    assert np.isnan(filtered["d_r2"]) and filtered["mismatch"] is None  # NaN R² is not a mismatch (NaN > 0 in DuckDB)
    assert query(one, "delta", n_boot=10)["mismatch"][0] is not None
    for q in ("delta", "kstar", "budget_sweep"):
        try:
            query(two_models, q, a="nope", **({"n_boot": 10} if q == "delta" else {}))
        except UsageError as exc:
            assert "\n" not in str(exc) and "it has: m-70, m-410" in str(exc)
        else:
            raise AssertionError(f"{q} accepted an unknown model")


def test_sql_cli_delta_needs_no_parameters_and_errors_in_one_line(two_models, tmp_path):
    from click.testing import CliRunner

    from actstore.cli.main import main

    runner = CliRunner()
    out = runner.invoke(main, ["sql", two_models, "--query", "delta", "--param", "n_boot=20", "--format", "csv"])
    assert out.exit_code == 0, out.output
    df = pl.read_csv(out.stdout.encode())
    assert set(df["a"]) == {SMALL} and set(df["b"]) == {LARGE}
    one = str(tmp_path / "one")
    _write(one, SMALL, 3, 8, 0, BUDGETS[0], np.random.default_rng(1))
    bad = runner.invoke(main, ["sql", one, "--query", "delta"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "this run has only m-70" in bad.output

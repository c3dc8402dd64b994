"""The studies' tables in the studies' own layout, each from one named query of `sql/`.

Why: the demo and `examples/` print study 000's Δ, correlation and k* tables, study 002's budget table
and study 003's training summary; a researcher compares them line by line with the write-ups. The
numbers come only from the named queries (`actstore sql RUN --query NAME` gives the same, with every
column); this module picks the rows and columns and puts each CI next to its estimate.
"""

from __future__ import annotations

import polars as pl

from actstore.analytics import query, with_intervals


def _fmt_ci(df: pl.DataFrame, col: str, decimals: int = 3) -> pl.Expr:
    f = f"{{:+.{decimals}f}}".format
    return pl.concat_str(
        pl.col(col).map_elements(f, return_dtype=pl.String),
        pl.lit(" ["),
        pl.col(f"{col}_lo").map_elements(f, return_dtype=pl.String),
        pl.lit(", "),
        pl.col(f"{col}_hi").map_elements(f, return_dtype=pl.String),
        pl.lit("]"),
    ).fill_null(pl.col(col).map_elements(f, return_dtype=pl.String))


def delta_table(run: str, depth: float = 0.5, train_tokens: int | None = None, seed: int | None = 0) -> pl.DataFrame:
    """Study 000's mid-depth table: per k, ΔR² and ΔCE_rec (larger − smaller) with 95% CIs, Cohen's d, mismatch."""
    df = query(run, "delta", depth=depth)
    if train_tokens is not None:
        df = df.filter(pl.col("matched") == str(train_tokens))
    if seed is not None:
        df = df.filter(pl.col("seed") == seed)
    return df.select(
        "k",
        pl.col("layer_a").alias("layer_small"),
        pl.col("layer_b").alias("layer_large"),
        pl.col("r2_a").alias("r2_small"),
        pl.col("r2_b").alias("r2_large"),
        _fmt_ci(df, "d_r2").alias("ΔR² [95% CI]"),
        pl.col("ce_rec_a").alias("ce_rec_small"),
        pl.col("ce_rec_b").alias("ce_rec_large"),
        _fmt_ci(df, "d_ce_rec").alias("ΔCE_rec [95% CI]"),
        "cohens_d",
        "mismatch",
    ).sort("k")


def corr_table(run: str, train_tokens: int | None = None) -> pl.DataFrame:
    """Study 000's correlation table: per depth, corr(R², CE_rec) pooling k and scale, and within fixed k."""
    params = {} if train_tokens is None else {"train_tokens": train_tokens}
    df = query(run, "corr_r2_ce", **params)
    return df.select(
        "depth",
        "train_tokens",
        "hooks",
        "n_points",
        pl.col("pooled").alias("corr pooled"),
        pl.col("within_k").alias("corr within k"),
    )


def kstar_table(run: str, targets: str, train_tokens: int | None = None) -> pl.DataFrame:
    """Study 000's k* table: per depth and CE_rec target t, k*(smaller), k*(larger) and their ratio."""
    df = query(run, "kstar", targets=targets)
    if train_tokens is not None:
        df = df.filter(pl.col("train_tokens") == train_tokens)
    return df.select(
        "depth",
        pl.col("target").alias("t"),
        pl.col("k_star_a").alias("k*(small)"),
        pl.col("k_star_b").alias("k*(large)"),
        "ratio",
        pl.col("below_sweep_a").alias("below_sweep_small"),
        pl.col("below_sweep_b").alias("below_sweep_large"),
    )


def budget_table(run: str, depth: float = 0.5) -> pl.DataFrame:
    """Study 002's table: per (k, tokens), n repeats, mean ΔCE_rec and ΔR² with 95% CIs, mismatch rate."""
    df = query(run, "budget_sweep", depth=depth)
    return df.select(
        "k",
        pl.col("train_tokens").alias("tokens"),
        "n",
        _fmt_ci(df, "d_ce_rec").alias("ΔCE_rec mean (95% CI)"),
        _fmt_ci(df, "d_r2").alias("ΔR² mean (95% CI)"),
        pl.col("mismatch_rate").alias("mismatch rate"),
    )


def training_table(run: str) -> pl.DataFrame:
    """Study 003's summary per SAE: steps, wall time, final MSE, normalised MSE, explained variance, L0, dead."""
    df = query(run, "training")
    return df.select(
        "model",
        "hook",
        "k",
        "train_tokens",
        "seed",
        "steps",
        "wall_seconds",
        "final_mse",
        "final_nmse",
        "final_explained_variance",
        "final_l0",
        "dead_latents",
        "d_sae",
        "never_fired_eval",
    )


def summary_table(run: str, train_tokens: int | None = None, seed: int | None = 0) -> pl.DataFrame:
    """The summary's headline columns (study 000's scale check included) for one budget and seed."""
    df = query(run, "summary")
    if train_tokens is not None:
        df = df.filter(pl.col("train_tokens") == train_tokens)
    if seed is not None:
        df = df.filter(pl.col("seed") == seed)
    keep = ("r2", "ce_rec", "cos", "relerr", "l2_ratio", "alive")
    cols = [c for c in df.columns if c.removesuffix("_lo").removesuffix("_hi") in keep]
    out = with_intervals(df.select("model", "hook", "k", *cols, "sse_per_token", "sst_per_token", "ce_rec_seq_sd"), 3)
    return out.with_columns(pl.col("model").str.slice(0, 12))

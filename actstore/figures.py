"""The report's figures: one function per figure, a named query's rows in, a matplotlib Figure out.

Why: a figure that recomputed anything would show numbers nobody can look up. Each function here only
draws the rows of one named query of `sql/` (the `query` of its FigureSpec), so `actstore sql RUN --query
NAME` prints every number behind a figure; the statistics are defined there and in docs/METHODS.md,
never here. What a figure needs of an SAE (hook, layer, k) comes from the query's columns, i.e. from the
`saes` table: nothing parses an sae_id or a hook name. Figures are plain `Figure` objects (no pyplot
state, no display), so the report can draw them in a test or on a headless machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter

from actstore import plotting as pt
from actstore.tables import BASELINES

# ---- one function per figure: a named query's rows in, a Figure out ------------------------------------


class Metric(NamedTuple):
    column: str
    label: str
    log: bool  # a log axis when every value is positive


CURVE_METRICS = [
    Metric(column="mse", label="MSE", log=True),
    Metric(column="nmse", label="normalised MSE (mean-centred)", log=True),
    Metric(column="nmse_uncentred", label="MSE / ‖x‖² (not centred)", log=True),
    Metric(column="explained_variance", label="explained variance", log=False),
    Metric(column="l0", label="L0", log=False),
    Metric(column="dead_frac", label="dead fraction", log=False),
    Metric(column="batch_usage", label="batch usage", log=False),
]


def plot_curves(df: pl.DataFrame) -> Figure:
    df = df.with_columns(hook=pl.col("hook").fill_null(pl.col("sae_id")))  # no saes row: one panel per SAE
    df = df.sort([*pt.depth(df), "k", "sae_id"], nulls_last=True, maintain_order=True)
    metrics = [m for m in CURVE_METRICS if m.column in df.columns]
    panels, colors = pt.by_panel(df), pt.k_colors(df["k"])
    fig, axes = pt.grid(len(panels) * len(metrics), len(metrics), 3.1, 2.5)
    for i, (title, part) in enumerate(panels):
        for ax, metric in zip(axes[i * len(metrics) :], metrics, strict=False):
            for (_, k), s in part.group_by(["sae_id", "k"], maintain_order=True):
                ax.plot(s["tokens"], s[metric.column], color=colors[k], lw=1.2)
            ax.set_title(f"{title}\n{metric.label}", fontsize=9)
            ax.set_xlabel("training tokens", fontsize=8)
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.tick_params(labelsize=7)
            if metric.log:
                pt.log_if_positive(ax, part[metric.column])
    handles = [Line2D([], [], color=c, label=pt.k_label(k)) for k, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def plot_firing_rates(df: pl.DataFrame) -> Figure:
    floor, colors, panels = pt.floor(df), pt.k_colors(df["k"]), pt.by_panel(df)
    fig, axes = pt.grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (_, k), s in part.group_by(["sae_id", "k"], maintain_order=True):
            dead = int((s["fires"] == 0).sum())
            rate = s["firing_rate"].to_numpy().clip(floor)
            ax.step(s["rank"], rate, where="post", color=colors[k], label=f"{pt.k_label(k)} ({dead} never fired)")
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.annotate(
            "never fired", (0.98, floor), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7
        )
        ax.set(xscale="log", yscale="log", title=title, xlabel="latent rank", ylabel="firing rate (share of tokens)")
        ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_decoder_norms(df: pl.DataFrame) -> Figure:
    floor, colors, panels = pt.floor(df), pt.k_colors(df["k"]), pt.by_panel(df.filter(pl.col("dec_norm").is_not_null()))
    fig, axes = pt.grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (k,), s in part.group_by(["k"], maintain_order=True):
            rate = s["firing_rate"].to_numpy().clip(floor)
            ax.scatter(rate, s["dec_norm"], s=5, alpha=0.6, color=colors[k], label=pt.k_label(k))
        ax.axvline(floor, color="grey", ls=":", lw=1)
        ax.set_ylim(0, 1.1 * float(part["dec_norm"].max()))  # from 0: float noise around 1 is not a finding
        ax.set(xscale="log", title=title, xlabel="firing rate (never fired: dotted floor)", ylabel="decoder row norm")
        ax.legend(fontsize=7, markerscale=2)
    return fig


def plot_k_sweep(df: pl.DataFrame) -> Figure:
    fig, axes = pt.grid(2, 2, 5.0, 3.6)
    ks = df["k"].drop_nulls().unique().sort().to_list()
    for ax, (col, label) in zip(axes, [("r2", "R²"), ("ce_rec", "CE_rec")], strict=True):
        for name, s in pt.series(df):
            ax.errorbar(s["k"], s[col], yerr=pt.err(s, col), marker="o", ms=4, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set(title=f"{label} against k (95% CI)", xlabel="k (active latents per token)", ylabel=label)
        ax.legend(fontsize=7)
    return fig


def plot_r2_vs_ce(df: pl.DataFrame) -> Figure:
    fig, (ax,) = pt.grid(1, 1, 6.5, 4.8)
    colors, markers = pt.hook_k_styles(fig, df)
    for (hook, k), s in df.group_by(["hook", "k"], maintain_order=True):
        xerr, yerr = pt.err(s, "r2"), pt.err(s, "ce_rec")
        ax.errorbar(s["r2"], s["ce_rec"], yerr, xerr, fmt=markers[hook], color=colors[k], ms=6, capsize=2)
    ax.set(title="R² against CE_rec, per SAE (95% CIs)", xlabel="R² (1 − FVU)", ylabel="CE_rec (2 − L_sae / L_orig)")
    return fig


def plot_rate_distortion(df: pl.DataFrame) -> Figure:
    fig, axes = pt.grid(2, 2, 5.0, 3.6)
    for ax, (col, label) in zip(axes, [("fvu", "1 − R² (FVU)"), ("ce_gap", "1 − CE_rec")], strict=True):
        for name, s in pt.series(df):
            ax.plot(s["rate_bits"], s[col], marker="o", ms=4, label=name)
            for x, y, k in s.select("rate_bits", col, "k").iter_rows():
                ax.annotate(pt.k_label(k), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set(title=f"rate against {label}", xlabel="rate proxy (bits per token)", ylabel=label)
        pt.log_if_positive(ax, df["rate_bits"], "x")
        pt.log_if_positive(ax, df[col])
        ax.legend(fontsize=7)
    return fig


def plot_kl_baselines(df: pl.DataFrame) -> Figure:
    present = set(df["baseline"])
    order = [b for b in BASELINES if b in present] + sorted(present - set(BASELINES))
    fig, axes = pt.grid(len(order), 3, 4.3, 3.9)
    colors, markers = pt.hook_k_styles(fig, df)
    for ax, baseline in zip(axes, order, strict=True):
        part = df.filter(pl.col("baseline") == baseline)
        for (hook, k), s in part.group_by(["hook", "k"], maintain_order=True):
            ax.scatter(s["kl_baseline"], s["kl_sae"], marker=markers[hook], color=colors[k], s=30)
        both = pl.concat([part["kl_baseline"], part["kl_sae"]]).drop_nulls()
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey", ls="--", lw=1)
        pt.log_if_positive(ax, both, "x")
        pt.log_if_positive(ax, both, "y")
        ax.set(title=f"{baseline}: {BASELINES.get(baseline, baseline)}", xlabel="mean KL, baseline error patched")
        ax.set_ylabel("mean KL, SAE reconstruction patched")
    return fig


def plot_kl_gap_by_pos(df: pl.DataFrame) -> Figure:
    panels = pt.by_panel(df)
    fig, axes = pt.grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (baseline,), s in part.group_by(["baseline"], maintain_order=True):
            ax.plot((s["pos_from"] + s["pos_to"]) / 2, s["gap"], marker="o", ms=3, label=baseline)
        ax.axhline(1, color="grey", ls="--", lw=1)
        ax.set(title=title, xlabel="position in sequence (bucket centre)", ylabel="KL gap (SAE / baseline)")
        ax.legend(fontsize=7)
    return fig


def plot_layers(df: pl.DataFrame) -> Figure:
    # A line per kind of hook across depth: its name with its `layer` written {L} (blocks.{L}.hook_resid_post).
    kind = pl.col("hook").str.split(pl.format(".{}.", "layer")).list.join(".{L}.").fill_null(pl.col("hook"))
    df = df.with_columns(kind=kind)
    keys = ["model", "kind", *(["store"] if df["store"].n_unique() > df["model"].n_unique() else [])]
    fig, axes = pt.grid(2, 2, 5.0, 3.6)
    panels = [("pr", "participation ratio"), ("pr_deflated", "PR, top direction removed")]
    for ax, (col, label) in zip(axes, panels, strict=True):
        for key, s in df.sort("layer").group_by(keys, maintain_order=True):
            ax.plot(s["layer"], s[col], marker="o", ms=4, label=" ".join(map(str, key)))
        ax.set(title=label, xlabel="layer", ylabel=f"{label} (directions)")
        ax.legend(fontsize=7)
    return fig


def plot_error_predictability(df: pl.DataFrame) -> Figure:
    ids = df["sae_i"].unique(maintain_order=True).to_list()  # the query's order: by layer, then k
    names = df.unique("sae_i", maintain_order=True).select(pl.format("{} k={}", "hook_i", "k_i")).to_series()
    wide = df.pivot(on="sae_j", index="sae_i", values="heldout_r2")
    matrix = wide.join(pl.DataFrame({"sae_i": ids}), on="sae_i", how="right").select([*ids]).to_numpy()
    side = min(14.0, 3.0 + 0.4 * len(ids))
    fig, (ax,) = pt.grid(1, 1, side + 1.5, side)
    image = ax.imshow(matrix.astype(float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(ids)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), names, fontsize=7)
    ax.set(title="held-out R² of ‖e_column‖ from ‖e_row‖", xlabel="predicted SAE", ylabel="predicting SAE")
    fig.colorbar(image, ax=ax, label="held-out R²", shrink=0.8)
    return fig


def plot_eps_zscores(df: pl.DataFrame) -> Figure:
    panels = pt.by_panel(df)
    fig, axes = pt.grid(len(panels), 3)
    colors = pt.k_colors(df["k"])
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (_, k), s in part.group_by(["sae_id", "k"], maintain_order=True):
            label = f"{pt.k_label(k)}: median z {s['z_median'][0]:.1f}"
            edges = s["z_from"].sort().to_numpy()
            width = float(min(np.diff(edges))) if len(edges) > 1 else 0.5  # the query's bin (empty bins are absent)
            ax.bar(s["z_from"], s["share"], width=width, align="edge", color=colors[k], alpha=0.55, label=label)
        ax.axvline(0, color="grey", ls="--", lw=1)
        ax.set(title=title, xlabel="z of the SAE's KL among ε-random draws (SDs)", ylabel="share of tokens")
        ax.legend(fontsize=7)
    return fig


def plot_sensitivity(df: pl.DataFrame) -> Figure:
    fig, axes = pt.grid(3, 3, 4.3, 3.9)
    colors, markers = pt.hook_k_styles(fig, df)
    panels = [
        ("d_ce", "d_ce_first_order", "measured ΔCE per token", "first-order g·δ per token"),
        ("kl", "swd", "measured KL per token", "Fisher ½(Jδ)ᵀF(Jδ) per token"),
    ]
    for ax, (mx, my, xl, yl) in zip(axes[:2], panels, strict=True):
        for (hook, k), s in df.group_by(["hook", "k"], maintain_order=True):
            ax.scatter(s[mx], s[my], marker=markers[hook], color=colors[k], s=30)
        both = pl.concat([df[mx], df[my]]).drop_nulls()
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey", ls="--", lw=1)
        ax.set(xlabel=xl, ylabel=yl, title=f"predicted against measured ({my})")
    ax = axes[2]
    for (hook, k), s in df.group_by(["hook", "k"], maintain_order=True):
        low, high = s["alignment"] - s["alignment_lo"], s["alignment_hi"] - s["alignment"]
        ax.errorbar(s["k"], s["alignment"], yerr=[low.fill_null(0), high.fill_null(0)], fmt=markers[hook],
                    color=colors[k], ms=5, capsize=2)  # fmt: skip
    ax.axhline(1, color="grey", ls="--", lw=1)
    ax.set(xlabel="k", ylabel="alignment (swd / ½‖e‖²·iso_sens)", title="the analytic KL gap, 95% CI")
    return fig


def plot_proxy_leaderboard(df: pl.DataFrame) -> Figure:
    targets = df["target"].unique(maintain_order=True).to_list()
    fig, axes = pt.grid(len(targets), 2, 5.0, 3.6)
    for ax, target in zip(axes, targets, strict=True):
        part = df.filter(pl.col("target") == target).sort("rank", descending=True)
        ax.barh(part["proxy"], part["loo_r2"], color="tab:blue")
        for y, (r2, share) in enumerate(zip(part["loo_r2"], part["share_first"].fill_null(0), strict=True)):
            ax.annotate(f" first in {share:.0%}", (max(r2, 0), y), va="center", fontsize=7)
        ax.axvline(0, color="grey", lw=1)
        ax.set(title=f"predicting {target} across cells", xlabel="held-out R² (leave one cell out)")
    return fig


# ---- the report's figures: which function draws which query, and what healthy looks like ---------------


@dataclass(frozen=True)
class FigureSpec:
    name: str  # figures/NAME.png
    title: str
    query: str  # the named query in sql/ whose rows it draws
    plot: Callable[[pl.DataFrame], Figure]
    what: str  # the caption's first line: what the figure shows
    healthy: str  # its second line: what a healthy run looks like


FIGURES = [
    FigureSpec(
        name="training_curves",
        title="Training curves",
        query="curves",
        plot=plot_curves,
        what="MSE, normalized MSE, explained variance, L0, dead fraction and batch usage against tokens; colour: k.",
        healthy="Healthy: losses fall and level off, L0 stays at k, the dead fraction near 0, batch usage does not collapse.",
    ),
    FigureSpec(
        name="firing_rates",
        title="Latent firing rates",
        query="latents",
        plot=plot_firing_rates,
        what="Each latent's firing rate against its rank, log-log; never-fired latents on the dotted floor (counted).",
        healthy="Healthy: a smooth, gently falling curve, few latents on the floor; a cliff down to it means dead latents.",
    ),
    FigureSpec(
        name="decoder_norms",
        title="Decoder row norms",
        query="latents",
        plot=plot_decoder_norms,
        what="Each latent's decoder row norm against its firing rate (never-fired latents at the dotted floor).",
        healthy="Healthy: ours are unit norm (a flat line at 1); in other SAEs, norms near 0 mark latents given up on.",
    ),
    FigureSpec(
        name="k_sweep",
        title="R² and CE_rec against k",
        query="summary",
        plot=plot_k_sweep,
        what="R² and CE_rec against k with 95% bootstrap CIs over sequences, a line per model and depth.",
        healthy="Healthy: both rise and level off with short CIs; CE_rec lagging R² means errors hurt beyond their size.",
    ),
    FigureSpec(
        name="r2_vs_ce_rec",
        title="R² against CE_rec",
        query="summary",
        plot=plot_r2_vs_ce,
        what="Each SAE's R² against its CE_rec with 95% CIs on both; colour: k, marker: hook.",
        healthy="Healthy: a hook's SAEs lie on one rising band; one below it breaks behaviour beyond its reconstruction.",
    ),
    FigureSpec(
        name="rate_distortion",
        title="Rate–distortion",
        query="rate_distortion",
        plot=plot_rate_distortion,
        what="Rate proxy (bits/token) against the distortions 1 − R² and 1 − CE_rec, a line per hook, labelled by k.",
        healthy="Healthy: distortion falls with diminishing returns; a point above and right of a neighbour is dominated.",
    ),
    FigureSpec(
        name="kl_baselines",
        title="KL under the SAE against each baseline",
        query="kl_gap",
        plot=plot_kl_baselines,
        what="Mean KL with the SAE's reconstruction patched, against a random error of the same size; dashed: y = x.",
        healthy="Healthy: points on or below the diagonal; above it, the SAE's errors point where the model is sensitive.",
    ),
    FigureSpec(
        name="kl_gap_by_pos",
        title="KL gap by position",
        query="kl_gap_by_pos",
        plot=plot_kl_gap_by_pos,
        what="KL gap (Σ KL under the SAE / Σ KL under the baseline) by position, pooling a hook's SAEs, per baseline.",
        healthy="Healthy: flat in position; a jump at the first positions means short contexts drive the headline gap.",
    ),
    FigureSpec(
        name="eps_zscores",
        title="How pathological: z-scores among ε-random draws",
        query="eps_zscore_hist",
        plot=plot_eps_zscores,
        what="Per token at eval's --patch-pos, the SAE's KL in SDs above N ε-random errors of its size (eval --eps-draws N).",
        healthy="Healthy: centred near 0 like one more draw; a long right tail means some reconstructions are very bad.",
    ),
    FigureSpec(
        name="sensitivity",
        title="Sensitivity: predicted against measured damage",
        query="sensitivity",
        plot=plot_sensitivity,
        what="Per SAE (eval --sensitivity): g·δ against measured ΔCE, the Fisher quadratic against measured KL, and the alignment ratio.",
        healthy="Healthy: points near y = x for small errors; alignment above 1 means the error points where the model is sensitive.",
    ),
    FigureSpec(
        name="proxy_leaderboard",
        title="Which proxy predicts behaviour: held-out cells",
        query="proxy_leaderboard",
        plot=plot_proxy_leaderboard,
        what="Leave-one-cell-out R² of CE_rec and KL from each proxy alone; the share of cell resamples in which it ranks first.",
        healthy="Healthy: the best proxy first in most resamples; a sensitivity-weighted one above fvu (1 − R²) is study 002's D2 result.",
    ),
    FigureSpec(
        name="participation_ratio",
        title="Participation ratio by layer",
        query="layers",
        plot=plot_layers,
        what="Participation ratio (Σλ)²/Σλ² of each hook's activations by layer, raw and without the top direction.",
        healthy="Healthy: a smooth profile; a dip in the deflated PR (a 'canyon') is easy in R², not always in behaviour.",
    ),
    FigureSpec(
        name="error_predictability",
        title="Cross-SAE error predictability",
        query="cross_sae_predictability",
        plot=plot_error_predictability,
        what="Held-out R² of one SAE's per-token error norm (column) predicted from another's (row) on the same tokens.",
        healthy="Healthy: high within a hook across k (hard tokens are hard for every k), lower across depths.",
    ),
]

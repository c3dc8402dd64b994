"""Shared plotting helpers of the report's figures: panel grids, colours by k, depth order, log axes.

Why apart from actstore/figures.py: these say how every figure looks; figures.py says what each one shows.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

MARKERS = "osD^v<>pPhX*"
NO_K = (0.5, 0.5, 0.5, 1.0)  # the colour of SAEs without a k (not TopK)


def grid(n: int, ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with n panels, ncols to a row (spare panels hidden)."""
    ncols = max(1, min(ncols, n))
    fig = Figure(figsize=(width * ncols, height * -(-n // ncols)), layout="constrained")
    axes = list(fig.subplots(-(-n // ncols), ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def depth(df: pl.DataFrame) -> list[str]:
    """The columns that put hooks in depth order: the `layer` the query gives, then the hook's name."""
    return ["layer", "hook"] if "layer" in df.columns else ["hook"]


def k_label(k: int | None) -> str:
    return "no k" if k is None else f"k={k}"


def k_colors(ks: pl.Series) -> dict[int | None, tuple]:
    """One viridis colour per k, small k dark (the pale yellow end is left out: unreadable on white)."""
    values = ks.drop_nulls().unique().sort().to_list()
    colors = {k: colormaps["viridis"](0.85 * i / max(1, len(values) - 1)) for i, k in enumerate(values)}
    return colors | ({None: NO_K} if ks.null_count() else {})


def hook_k_styles(fig: Figure, df: pl.DataFrame) -> tuple[dict[int | None, tuple], dict[str, str]]:
    """Colour by k and marker by hook for scatter plots, with the figure's legend of both."""
    hooks = df.sort(depth(df), nulls_last=True)["hook"].unique(maintain_order=True).to_list()
    colors, markers = k_colors(df["k"]), {h: MARKERS[i % len(MARKERS)] for i, h in enumerate(hooks)}
    handles = [Line2D([], [], ls="", marker=m, color="grey", label=h) for h, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="s", color=c, label=k_label(k)) for k, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return colors, markers


def by_panel(df: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The rows of each (model ×) hook in depth order, titled by the hook (and the model, when several)."""
    keys = [c for c in ("model", "hook") if c in df.columns]
    several = "model" in df.columns and df["model"].n_unique() > 1
    ordered = df.sort([*keys[:-1], *depth(df)], nulls_last=True, maintain_order=True)
    groups = ordered.group_by(keys, maintain_order=True)
    return [(" · ".join(map(str, key)) if several else str(key[-1]), part) for key, part in groups]


def series(df: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """One line per model and depth, sorted by k; budgets, sizes or seeds that vary get lines of their own."""
    extra = [c for c in ("d_sae", "train_tokens", "seed") if df[c].n_unique() > 1]
    several = df["model"].n_unique() > 1
    ordered = df.sort(["model", *depth(df)], nulls_last=True, maintain_order=True)
    out = []
    for key, part in ordered.group_by(["model", "hook", *extra], maintain_order=True):
        words = [str(key[0])] * several + [str(key[1])] + [f"{c}={v}" for c, v in zip(extra, key[2:], strict=True)]
        out.append((" ".join(words), part.sort("k")))
    return out


def log_if_positive(ax: Axes, values: pl.Series, axis: str = "y") -> None:
    """A log axis when every value is positive; under two decades, ticks at 1, 2, 5 × 10ⁿ in plain numbers."""
    values = values.drop_nulls()
    if not len(values) or (values <= 0).any():
        return
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    if values.max() / values.min() < 100:
        scale = ax.yaxis if axis == "y" else ax.xaxis
        scale.set_major_locator(LogLocator(subs=(1, 2, 5)))
        scale.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        scale.set_minor_formatter(NullFormatter())


def err(df: pl.DataFrame, col: str) -> np.ndarray:
    """Error bars from col_lo/col_hi, for errorbar(); 0 where an SAE has no CI."""
    x = df[col].to_numpy()
    lo, hi = df[f"{col}_lo"].fill_null(df[col]).to_numpy(), df[f"{col}_hi"].fill_null(df[col]).to_numpy()
    return np.vstack([x - lo, hi - x]).clip(0)


def floor(df: pl.DataFrame) -> float:
    """Where never-fired latents are drawn on a log axis: half of one firing among the eval tokens."""
    fired = df.filter(pl.col("fires") > 0)
    return 0.5 / float((fired["fires"] / fired["firing_rate"]).max()) if len(fired) else 1e-9

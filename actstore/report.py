"""`actstore report`: the first look at a run, as one Markdown file and one self-contained HTML file.

Why: after an eval the same dozen plots get made by hand (training curves, firing-rate ranks, the k
sweep, rate–distortion, the KL gaps, the layer profile). The report draws each from the named query of
`sql/` that `actstore sql RUN --query NAME` runs, never from a second computation, so every number in a
figure can be looked up; each caption says what a healthy run looks like. A query whose table the run
lacks (`layers`, `darkmatter`, …) becomes a one-line note, not a failure. Figures are plain
`matplotlib.figure.Figure` objects (no pyplot state, no display needed); the HTML embeds the PNGs, so it
is one file to mail. The report is built beside OUT and renamed into place: a failed one leaves the old.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from actstore import __version__, analytics
from actstore.errors import ActstoreError, UsageError

MARKERS = "osD^v<>pPhX*"
BASELINES = {"eps": "ε-random, same L2 distance", "samecos": "random, same cosine", "actdiff": "activation difference"}
HOW_TO_GET = {"layers": "actstore layers STORE --run RUN", "darkmatter": "actstore darkmatter RUN"}

# ---- plotting helpers ---------------------------------------------------------------------------------


def _grid(n: int, ncols: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with n panels, ncols to a row (spare panels hidden)."""
    ncols = max(1, min(ncols, n))
    fig = Figure(figsize=(width * ncols, height * -(-n // ncols)), layout="constrained")
    axes = list(fig.subplots(-(-n // ncols), ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _depth() -> pl.Expr:
    """The layer number in a hook name, for sorting blocks.2 before blocks.10."""
    return pl.col("hook").str.extract(r"(\d+)", 1).cast(pl.Int64).fill_null(-1)


def _k_colors(ks: pl.Series) -> dict[int, tuple]:
    """One viridis colour per k, small k dark (the pale yellow end is left out: unreadable on white)."""
    values = sorted(ks.unique().to_list())
    return {k: colormaps["viridis"](0.85 * i / max(1, len(values) - 1)) for i, k in enumerate(values)}


def _hook_k_styles(fig: Figure, df: pl.DataFrame) -> tuple[dict[int, tuple], dict[str, str]]:
    """Colour by k and marker by hook for scatter plots, with the figure's legend of both."""
    hooks = df.sort([_depth(), "hook"])["hook"].unique(maintain_order=True).to_list()
    colors, markers = _k_colors(df["k"]), {h: MARKERS[i % len(MARKERS)] for i, h in enumerate(hooks)}
    handles = [Line2D([], [], ls="", marker=m, color="grey", label=h) for h, m in markers.items()]
    handles += [Line2D([], [], ls="", marker="s", color=c, label=f"k={k}") for k, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return colors, markers


def _by_panel(df: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """The rows of each (model ×) hook in depth order, titled by the hook (and the model, when several)."""
    keys = [c for c in ("model", "hook") if c in df.columns]
    several = "model" in df.columns and df["model"].n_unique() > 1
    groups = df.sort([*keys[:-1], _depth(), "hook"], maintain_order=True).group_by(keys, maintain_order=True)
    return [(" · ".join(map(str, key)) if several else str(key[-1]), part) for key, part in groups]


def _series(df: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    """One line per model and depth, sorted by k; budgets, sizes or seeds that vary get lines of their own."""
    extra = [c for c in ("d_sae", "train_tokens", "seed") if df[c].n_unique() > 1]
    several = df["model"].n_unique() > 1
    groups = df.sort(["model", _depth(), "hook"]).group_by(["model", "hook", *extra], maintain_order=True)
    out = []
    for key, part in groups:
        words = [str(key[0])] * several + [str(key[1])] + [f"{c}={v}" for c, v in zip(extra, key[2:], strict=True)]
        out.append((" ".join(words), part.sort("k")))
    return out


def _log_if_positive(ax: Axes, values: pl.Series, axis: str = "y") -> None:
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


def _err(df: pl.DataFrame, col: str) -> np.ndarray:
    """Error bars from col_lo/col_hi, for errorbar(); 0 where an SAE has no CI."""
    x = df[col].to_numpy()
    lo, hi = df[f"{col}_lo"].fill_null(df[col]).to_numpy(), df[f"{col}_hi"].fill_null(df[col]).to_numpy()
    return np.vstack([x - lo, hi - x]).clip(0)


def _floor(df: pl.DataFrame) -> float:
    """Where never-fired latents are drawn on a log axis: half of one firing among the eval tokens."""
    fired = df.filter(pl.col("fires") > 0)
    return 0.5 / float((fired["fires"] / fired["firing_rate"]).max()) if len(fired) else 1e-9


# ---- one function per figure: a named query's rows in, a Figure out ------------------------------------

CURVE_METRICS = [("mse", "MSE", True), ("nmse", "normalized MSE", True), ("explained_variance", "explained variance", False),
                 ("l0", "L0", False), ("dead_frac", "dead fraction", False), ("batch_usage", "batch usage", False)]  # fmt: skip


def plot_curves(df: pl.DataFrame) -> Figure:
    df = df.with_columns(  # curves come from our trainer, whose sae_ids read HOOK__kK_…
        hook=pl.col("sae_id").str.extract(r"^(.*)__k\d+_", 1).fill_null(pl.col("sae_id")),
        k=pl.col("sae_id").str.extract(r"__k(\d+)_", 1).cast(pl.Int64).fill_null(0),
    ).sort([_depth(), "hook", "k", "sae_id"], maintain_order=True)
    metrics = [m for m in CURVE_METRICS if m[0] in df.columns]
    panels, colors = _by_panel(df), _k_colors(df["k"])
    fig, axes = _grid(len(panels) * len(metrics), len(metrics), 3.1, 2.5)
    for i, (title, part) in enumerate(panels):
        for ax, (col, label, log) in zip(axes[i * len(metrics) :], metrics, strict=False):
            for (_, k), s in part.group_by(["sae_id", "k"], maintain_order=True):
                ax.plot(s["tokens"], s[col], color=colors[k], lw=1.2)
            ax.set_title(f"{title}\n{label}", fontsize=9)
            ax.set_xlabel("training tokens", fontsize=8)
            ax.xaxis.set_major_formatter(EngFormatter())
            ax.tick_params(labelsize=7)
            if log:
                _log_if_positive(ax, part[col])
    handles = [Line2D([], [], color=c, label=f"k={k}") for k, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def plot_firing_rates(df: pl.DataFrame) -> Figure:
    floor, colors, panels = _floor(df), _k_colors(df["k"]), _by_panel(df)
    fig, axes = _grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (_, k), s in part.group_by(["sae_id", "k"], maintain_order=True):
            dead = int((s["fires"] == 0).sum())
            rate = s["firing_rate"].to_numpy().clip(floor)
            ax.step(s["rank"], rate, where="post", color=colors[k], label=f"k={k} ({dead} never fired)")
        ax.axhline(floor, color="grey", ls=":", lw=1)
        ax.annotate(
            "never fired", (0.98, floor), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7
        )
        ax.set(xscale="log", yscale="log", title=title, xlabel="latent rank", ylabel="firing rate (share of tokens)")
        ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_decoder_norms(df: pl.DataFrame) -> Figure:
    floor, colors, panels = _floor(df), _k_colors(df["k"]), _by_panel(df.filter(pl.col("dec_norm").is_not_null()))
    fig, axes = _grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (k,), s in part.group_by(["k"], maintain_order=True):
            ax.scatter(
                s["firing_rate"].to_numpy().clip(floor), s["dec_norm"], s=5, alpha=0.6, color=colors[k], label=f"k={k}"
            )
        ax.axvline(floor, color="grey", ls=":", lw=1)
        ax.set_ylim(0, 1.1 * float(part["dec_norm"].max()))  # from 0: float noise around 1 is not a finding
        ax.set(xscale="log", title=title, xlabel="firing rate (never fired: dotted floor)", ylabel="decoder row norm")
        ax.legend(fontsize=7, markerscale=2)
    return fig


def plot_k_sweep(df: pl.DataFrame) -> Figure:
    fig, axes = _grid(2, 2, 5.0, 3.6)
    ks = sorted(df["k"].unique().to_list())
    for ax, (col, label) in zip(axes, [("r2", "R²"), ("ce_rec", "CE_rec")], strict=True):
        for name, s in _series(df):
            ax.errorbar(s["k"], s[col], yerr=_err(s, col), marker="o", ms=4, capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set(title=f"{label} against k (95% CI)", xlabel="k (active latents per token)", ylabel=label)
        ax.legend(fontsize=7)
    return fig


def plot_r2_vs_ce(df: pl.DataFrame) -> Figure:
    fig, (ax,) = _grid(1, 1, 6.5, 4.8)
    colors, markers = _hook_k_styles(fig, df)
    for (hook, k), s in df.group_by(["hook", "k"], maintain_order=True):
        xerr, yerr = _err(s, "r2"), _err(s, "ce_rec")
        ax.errorbar(s["r2"], s["ce_rec"], yerr, xerr, fmt=markers[hook], color=colors[k], ms=6, capsize=2)
    ax.set(title="R² against CE_rec, per SAE (95% CIs)", xlabel="R² (1 − FVU)", ylabel="CE_rec (2 − L_sae / L_orig)")
    return fig


def plot_rate_distortion(df: pl.DataFrame) -> Figure:
    fig, axes = _grid(2, 2, 5.0, 3.6)
    for ax, (col, label) in zip(axes, [("fvu", "1 − R² (FVU)"), ("ce_gap", "1 − CE_rec")], strict=True):
        for name, s in _series(df):
            ax.plot(s["rate_bits"], s[col], marker="o", ms=4, label=name)
            for x, y, k in s.select("rate_bits", col, "k").iter_rows():
                ax.annotate(f"k={k}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set(title=f"rate against {label}", xlabel="rate proxy (bits per token)", ylabel=label)
        _log_if_positive(ax, df["rate_bits"], "x")
        _log_if_positive(ax, df[col])
        ax.legend(fontsize=7)
    return fig


def plot_kl_baselines(df: pl.DataFrame) -> Figure:
    present = set(df["baseline"])
    order = [b for b in BASELINES if b in present] + sorted(present - set(BASELINES))
    fig, axes = _grid(len(order), 3, 4.3, 3.9)
    colors, markers = _hook_k_styles(fig, df)
    for ax, baseline in zip(axes, order, strict=True):
        part = df.filter(pl.col("baseline") == baseline)
        for (hook, k), s in part.group_by(["hook", "k"], maintain_order=True):
            ax.scatter(s["kl_baseline"], s["kl_sae"], marker=markers[hook], color=colors[k], s=30)
        both = pl.concat([part["kl_baseline"], part["kl_sae"]]).drop_nulls()
        ax.plot([both.min(), both.max()], [both.min(), both.max()], color="grey", ls="--", lw=1)
        _log_if_positive(ax, both, "x")
        _log_if_positive(ax, both, "y")
        ax.set(title=f"{baseline}: {BASELINES.get(baseline, baseline)}", xlabel="mean KL, baseline error patched")
        ax.set_ylabel("mean KL, SAE reconstruction patched")
    return fig


def plot_kl_gap_by_pos(df: pl.DataFrame) -> Figure:
    panels = _by_panel(df)
    fig, axes = _grid(len(panels), 3)
    for ax, (title, part) in zip(axes, panels, strict=True):
        for (baseline,), s in part.group_by(["baseline"], maintain_order=True):
            ax.plot((s["pos_from"] + s["pos_to"]) / 2, s["gap"], marker="o", ms=3, label=baseline)
        ax.axhline(1, color="grey", ls="--", lw=1)
        ax.set(title=title, xlabel="position in sequence (bucket centre)", ylabel="KL gap (SAE / baseline)")
        ax.legend(fontsize=7)
    return fig


def plot_layers(df: pl.DataFrame) -> Figure:
    df = df.with_columns(kind=pl.col("hook").str.replace(r"\.\d+\.", ".{L}."))
    keys = ["model", "kind", *(["store"] if df["store"].n_unique() > df["model"].n_unique() else [])]
    fig, axes = _grid(2, 2, 5.0, 3.6)
    for ax, (col, label) in zip(
        axes, [("pr", "participation ratio"), ("pr_deflated", "PR, top direction removed")], strict=True
    ):
        for key, s in df.sort("layer").group_by(keys, maintain_order=True):
            ax.plot(s["layer"], s[col], marker="o", ms=4, label=" ".join(map(str, key)))
        ax.set(title=label, xlabel="layer", ylabel=f"{label} (directions)")
        ax.legend(fontsize=7)
    return fig


def plot_error_predictability(df: pl.DataFrame) -> Figure:
    ids = df["sae_i"].unique(maintain_order=True).to_list()
    names = df.unique("sae_i", maintain_order=True).select(pl.format("{} k={}", "hook_i", "k_i")).to_series()
    wide = df.pivot(on="sae_j", index="sae_i", values="heldout_r2")
    matrix = wide.join(pl.DataFrame({"sae_i": ids}), on="sae_i", how="right").select([*ids]).to_numpy()
    side = min(14.0, 3.0 + 0.4 * len(ids))
    fig, (ax,) = _grid(1, 1, side + 1.5, side)
    image = ax.imshow(matrix.astype(float), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(ids)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), names, fontsize=7)
    ax.set(title="held-out R² of ‖e_column‖ from ‖e_row‖", xlabel="predicted SAE", ylabel="predicting SAE")
    fig.colorbar(image, ax=ax, label="held-out R²", shrink=0.8)
    return fig


# ---- the report's contents: which figure draws which query, and what healthy looks like ----------------


@dataclass(frozen=True)
class FigureSpec:
    name: str  # figures/NAME.png
    title: str
    query: str  # the named query in sql/ whose rows it draws
    plot: Callable[[pl.DataFrame], Figure]
    what: str  # the caption's first line: what the figure shows
    healthy: str  # its second line: what a healthy run looks like


# fmt: off
FIGURES = [
    FigureSpec("training_curves", "Training curves", "curves", plot_curves,
        "MSE, normalized MSE, explained variance, L0, dead fraction and batch usage against tokens; colour: k.",
        "Healthy: losses fall and level off, L0 stays at k, the dead fraction near 0, batch usage does not collapse."),
    FigureSpec("firing_rates", "Latent firing rates", "latents", plot_firing_rates,
        "Each latent's firing rate against its rank, log-log; never-fired latents on the dotted floor (counted).",
        "Healthy: a smooth, gently falling curve, few latents on the floor; a cliff down to it means dead latents."),
    FigureSpec("decoder_norms", "Decoder row norms", "latents", plot_decoder_norms,
        "Each latent's decoder row norm against its firing rate (never-fired latents at the dotted floor).",
        "Healthy: ours are unit norm (a flat line at 1); in other SAEs, norms near 0 mark latents given up on."),
    FigureSpec("k_sweep", "R² and CE_rec against k", "summary", plot_k_sweep,
        "R² and CE_rec against k with 95% bootstrap CIs over sequences, a line per model and depth.",
        "Healthy: both rise and level off with short CIs; CE_rec lagging R² means errors hurt beyond their size."),
    FigureSpec("r2_vs_ce_rec", "R² against CE_rec", "summary", plot_r2_vs_ce,
        "Each SAE's R² against its CE_rec with 95% CIs on both; colour: k, marker: hook.",
        "Healthy: a hook's SAEs lie on one rising band; one below it breaks behaviour beyond its reconstruction."),
    FigureSpec("rate_distortion", "Rate–distortion", "rate_distortion", plot_rate_distortion,
        "Rate proxy (bits/token) against the distortions 1 − R² and 1 − CE_rec, a line per hook, labelled by k.",
        "Healthy: distortion falls with diminishing returns; a point above and right of a neighbour is dominated."),
    FigureSpec("kl_baselines", "KL under the SAE against each baseline", "kl_gap", plot_kl_baselines,
        "Mean KL with the SAE's reconstruction patched, against a random error of the same size; dashed: y = x.",
        "Healthy: points on or below the diagonal; above it, the SAE's errors point where the model is sensitive."),
    FigureSpec("kl_gap_by_pos", "KL gap by position", "kl_gap_by_pos", plot_kl_gap_by_pos,
        "KL gap (Σ KL under the SAE / Σ KL under the baseline) by position, pooling a hook's SAEs, per baseline.",
        "Healthy: flat in position; a jump at the first positions means short contexts drive the headline gap."),
    FigureSpec("participation_ratio", "Participation ratio by layer", "layers", plot_layers,
        "Participation ratio (Σλ)²/Σλ² of each hook's activations by layer, raw and without the top direction.",
        "Healthy: a smooth profile; a dip in the deflated PR (a 'canyon') is easy in R², not always in behaviour."),
    FigureSpec("error_predictability", "Cross-SAE error predictability", "cross_sae_predictability", plot_error_predictability,
        "Held-out R² of one SAE's per-token error norm (column) predicted from another's (row) on the same tokens.",
        "Healthy: high within a hook across k (hard tokens are hard for every k), lower across depths."),
]
# fmt: on

SUMMARY_COLUMNS = ("r2", "ce_rec", "ce_loss_recovered", "kl", "l0", "rate_bits", "alive")


def _summary_table(df: pl.DataFrame) -> pl.DataFrame:
    keep = [c for c in df.columns if c.removesuffix("_lo").removesuffix("_hi") in SUMMARY_COLUMNS]
    return analytics.with_intervals(df.select("sae_id", *keep))


TABLES: list[tuple[str, str, Callable[[pl.DataFrame], pl.DataFrame]]] = [
    ("Summary, 95% bootstrap CIs over sequences", "summary", _summary_table),
    ("KL gap (SAE / baseline) per SAE", "kl_gap", lambda df: df.pivot(on="baseline", index="sae_id", values="gap")),
    ("Does R² go with CE_rec across the sweep?", "corr_r2_ce", lambda df: df),
    ("k*: the smallest k reaching a CE_rec target", "kstar", lambda df: df),
    ("Dark matter: the share of the SAE error a linear map of x predicts", "darkmatter", lambda df: df.drop("sae_id")),
]  # fmt: skip

# ---- Markdown and HTML, written side by side ----------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#444}
.table{overflow-x:auto}table{border-collapse:collapse;font-size:.8em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}.note{color:#8a5a00}code{background:#f3f3f3}"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_cell, value)) + "]"
    return "" if value is None else str(value)


def _prose(text: str) -> str:
    """Markdown prose as HTML: escaped, with `code` spans kept."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


class _Doc:
    """The report as Markdown lines and HTML elements at once; figures go to FOLDER/figures/NAME.png."""

    def __init__(self, title: str, folder: Path) -> None:
        self.title, self.folder = title, folder
        self.md, self.html = [f"# {title}", ""], [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.md += ["#" * level + " " + text, ""]
        self.html.append(f"<h{level}>{_prose(text)}</h{level}>")

    def text(self, line: str, note: bool = False) -> None:
        self.md += [f"*{line}*" if note else line, ""]
        self.html.append(('<p class="note">' if note else "<p>") + _prose(line) + "</p>")

    def figure(self, spec: FigureSpec, fig: Figure) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        (self.folder / "figures" / f"{spec.name}.png").write_bytes(buffer.getvalue())
        what = f"{spec.what} (query `{spec.query}`)"
        self.md += [f"![{spec.title}](figures/{spec.name}.png)", "", what + "  ", spec.healthy, ""]
        data = base64.b64encode(buffer.getvalue()).decode()
        self.html.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(spec.title)}">'
            f"<figcaption>{_prose(what)}<br>{_prose(spec.healthy)}</figcaption></figure>"
        )

    def table(self, df: pl.DataFrame) -> None:
        rows = [[_cell(v) for v in row] for row in df.iter_rows()]
        self.md += ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
        self.md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows] + [""]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
        self.html.append(f'<div class="table"><table><tr>{head}</tr>\n{body}</table></div>')

    def write(self) -> None:
        (self.folder / "report.md").write_text("\n".join(self.md))
        head = f'<meta charset="utf-8"><title>{html.escape(self.title)}</title><style>{CSS}</style>'
        body = "\n".join(self.html)
        (self.folder / "report.html").write_text(
            f"<!doctype html>\n<html><head>{head}</head><body>\n{body}\n</body></html>\n"
        )


# ---- the entry point -----------------------------------------------------------------------------------


def _target(run: str, out: str | None) -> Path:
    """OUT, or RUN/report (NAME_report beside a .tar/.zip bundle); never a directory that holds anything else."""
    if out:
        target = Path(out)
    elif Path(run).is_dir():
        target = Path(run) / "report"
    else:
        target = Path(run).with_name(Path(run).stem + "_report")
    target = target.resolve()
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / "report.md").exists()):
        raise UsageError(f"{target} exists and holds no report; give --out a new or empty directory")
    return target


def report(run: str, out: str | None = None, progress: bool = False) -> Path:
    """Write OUT/report.md, OUT/figures/*.png and a self-contained OUT/report.html for RUN; returns OUT.

    RUN may be a run, a bundle directory or a .tar/.zip bundle; OUT defaults to RUN/report.
    """
    analytics.resolve(run)  # no records: a UsageError before anything is written
    target = _target(run, out)
    stage, old = target.with_name(target.name + ".partial"), target.with_name(target.name + ".old")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "figures").mkdir(parents=True)
    doc = _Doc(f"actstore report: {run}", stage)
    results: dict[str, pl.DataFrame | str] = {}

    def rows(name: str) -> pl.DataFrame | None:
        """A named query's rows (each query runs once), or None after a note saying why there are none."""
        if name not in results:
            if progress:
                print(f"report: query {name}", file=sys.stderr)
            try:
                results[name] = analytics.query(run, name)
            except ActstoreError as exc:  # a missing table: say which command writes it
                hint = f"this run has no `{name}` table (`{HOW_TO_GET.get(name)}` writes it)"
                results[name] = hint if name in HOW_TO_GET and "does not exist" in str(exc) else str(exc)
        df = results[name]
        if isinstance(df, str) or df.is_empty():
            doc.text(f"Skipped: {df if isinstance(df, str) else f'query `{name}` returned no rows'}.", note=True)
            return None
        return df

    try:
        stamp = time.strftime("%Y-%m-%d %H:%M")
        doc.text(f"Written by actstore {__version__} on {stamp}. Every figure and table comes from a named query: "
                 "`actstore sql RUN --query NAME` prints its numbers.")  # fmt: skip
        for title, name, shape in TABLES[:1]:  # the summary first: the numbers a reader looks for
            doc.heading(f"{title} (query `{name}`)")
            if (df := rows(name)) is not None:
                doc.table(shape(df))
        for spec in FIGURES:
            doc.heading(spec.title)
            if (df := rows(spec.query)) is not None:
                doc.figure(spec, spec.plot(df))
                if progress:
                    print(f"report: figure {spec.name}", file=sys.stderr)
        doc.heading("More tables")
        for title, name, shape in TABLES[1:]:
            doc.heading(f"{title} (query `{name}`)", level=3)
            if (df := rows(name)) is not None:
                doc.table(shape(df))
        doc.write()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(stage, target)
    shutil.rmtree(old, ignore_errors=True)
    return target

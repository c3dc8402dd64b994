"""`actstore report`: the first look at a run, as one Markdown file and one self-contained HTML file.

Why: after an eval the same dozen plots and tables get made by hand. The report draws each from a named
query of `sql/` (the figures in `actstore/figures.py`, the tables in TABLES below), never from a second
computation, so `actstore sql RUN --query NAME` prints every number it shows; the definitions are in
docs/METHODS.md. A query whose table the run lacks (`layers`, `darkmatter`, …) becomes a one-line note
saying which command writes it, not a failure. The HTML embeds the PNGs, so it is one file to mail. The
report is built aside and swapped in whole (`actstore.atomic`): a failed one leaves the old one as it was.
"""

from __future__ import annotations

import base64
import html
import io
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from actstore import __version__, analytics, atomic, objstore
from actstore import run as rundir
from actstore.errors import ActstoreError, UsageError
from actstore.figures import FIGURES, FigureSpec

# The command that writes a table a run may lack; a skipped figure or table names it.
# ---- the report's tables: which query, shaped how ------------------------------------------------------

SUMMARY_COLUMNS = ("r2", "ce_rec", "ce_loss_recovered", "kl", "l0", "rate_bits", "alive")


def _summary_table(df: pl.DataFrame) -> pl.DataFrame:
    keep = [c for c in df.columns if c.removesuffix("_lo").removesuffix("_hi") in SUMMARY_COLUMNS]
    return analytics.with_intervals(df.select("sae_id", "lr", *keep))


@dataclass(frozen=True)
class TableSpec:
    title: str
    query: str  # the named query in sql/ whose rows it lists
    shape: Callable[[pl.DataFrame], pl.DataFrame] = lambda df: df  # the columns shown, pivoted or trimmed


TABLES = [  # the first comes before the figures: the numbers a reader looks for; the rest after them
    TableSpec(title="Summary, 95% bootstrap CIs over sequences", query="summary", shape=_summary_table),
    TableSpec(
        title="KL gap (SAE / baseline) per SAE",
        query="kl_gap",
        shape=lambda df: df.pivot(on="baseline", index="sae_id", values="gap"),
    ),
    TableSpec(
        title="Learning rate and convergence: which rate won each cell; undertrained = still falling at the decay",
        query="lr_sweep",
        shape=lambda df: df.drop("sae_id", "model"),
    ),
    TableSpec(
        title="Training (study 003's report): steps, wall time, final MSE, normalised MSE (mean-centred and not), L0, dead",
        query="training",
        shape=lambda df: df.drop("model", "d_model", "d_sae", "expansion", "seed", "hook"),
    ),
    TableSpec(
        title="Δ = larger − smaller model at matched relative depth (study 000), 95% CIs over sequences",
        query="delta",
        shape=lambda df: analytics.with_intervals(
            df.select(
                "depth",
                "layer_a",
                "layer_b",
                "k",
                "matched",
                "seed",
                "d_r2",
                "d_r2_lo",
                "d_r2_hi",
                "d_ce_rec",
                "d_ce_rec_lo",
                "d_ce_rec_hi",
                "cohens_d",
                "mismatch",
                "mismatch_rate",
            )
        ),
    ),  # fmt: skip
    TableSpec(title="Does R² go with CE_rec across the sweep and across models, per depth?", query="corr_r2_ce"),
    TableSpec(title="k*: the smallest k reaching a CE_rec target, larger model over smaller", query="kstar"),
    TableSpec(
        title="Token budgets (study 002): Δ between models over repeats, 95% t-intervals, mismatch rate",
        query="budget_sweep",
    ),
    TableSpec(
        title="Dark matter: the share of the SAE error a linear map of x predicts",
        query="darkmatter",
        shape=lambda df: df.drop("sae_id"),
    ),
    TableSpec(
        title="Dark matter: the CE gap each part of the error closes",
        query="darkmatter_patch",
        shape=lambda df: df.drop("sae_id"),
    ),
]

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
        target = rundir.report_dir(run)
    else:
        target = Path(run).with_name(Path(run).stem + "_report")
    target = target.resolve()
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / "report.md").exists()):
        raise UsageError(f"{target} exists and holds no report; give --out a new or empty directory")
    return target


def report(run: str, out: str | None = None, progress: bool = False) -> Path:
    """Write OUT/report.md, OUT/figures/*.png and a self-contained OUT/report.html for RUN; returns OUT.

    RUN may be a run, a bundle directory or a .tar/.zip bundle; OUT defaults to RUN/report.
    A run URL's report goes into its local copy and is committed to the run (actstore/objstore.py).
    """
    if objstore.is_url(out):
        raise UsageError(f"report --out {out}: give a local directory (report.html is read from disk)")
    if objstore.is_url(run):
        if out is None and not objstore.fetch(run).is_file():
            with objstore.run_copy(run, "actstore report") as local:
                return report(str(local), None, progress)
        if out is None:
            raise UsageError(f"give --out DIR for the report of the bundle {run}")
        return report(str(objstore.fetch(run)), out, progress)
    analytics.resolve(run)  # no records: a UsageError before anything is written
    target = _target(run, out)
    results: dict[str, pl.DataFrame | str] = {}

    def rows(doc: _Doc, name: str) -> pl.DataFrame | None:
        """A named query's rows (each query runs once), or None after a note saying why there are none."""
        if name not in results:
            if progress:
                print(f"report: query {name}", file=sys.stderr)
            try:
                results[name] = analytics.query(run, name)
            except ActstoreError as exc:
                results[name] = str(exc)
            if isinstance(results[name], pl.DataFrame) and results[name].is_empty():
                results[name] = analytics.why_empty(run, name)
        if isinstance(results[name], str):
            doc.text(f"Skipped: {results[name]}.", note=True)
            return None
        return results[name]

    with atomic.replacing(target) as (stage,):
        (stage / "figures").mkdir(parents=True)
        doc = _Doc(f"actstore report: {run}", stage)
        stamp = time.strftime("%Y-%m-%d %H:%M")
        doc.text(
            f"Written by actstore {__version__} on {stamp}. Every figure and table comes from a named query: "
            "`actstore sql RUN --query NAME` prints its numbers."
        )
        first, *more = TABLES
        doc.heading(f"{first.title} (query `{first.query}`)")
        if (df := rows(doc, first.query)) is not None:
            doc.table(first.shape(df))
        for spec in FIGURES:
            doc.heading(spec.title)
            if (df := rows(doc, spec.query)) is not None:
                doc.figure(spec, spec.plot(df))
                if progress:
                    print(f"report: figure {spec.name}", file=sys.stderr)
        doc.heading("More tables")
        for table in more:
            doc.heading(f"{table.title} (query `{table.query}`)", level=3)
            if (df := rows(doc, table.query)) is not None:
                doc.table(table.shape(df))
        doc.write()
    return target

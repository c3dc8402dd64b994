"""`actstore report RUN`: a run's figures and tables, as report.md and a self-contained report.html."""

from __future__ import annotations

import click


@click.command(short_help="Plot a run's records into report.md and a self-contained report.html (PNG figures).")
@click.argument("run")
@click.option("--out", default=None, help="Directory for report.md, report.html and figures/ (default: RUN/report).")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def report(run: str, out: str | None, quiet: bool) -> None:
    """Draw RUN's records (a run, or a bundle directory, .tar or .zip) from the named queries of `actstore sql`:
    training curves, firing-rate ranks, decoder norms, R² and CE_rec against k, R² against CE_rec,
    rate–distortion, KL against the random baselines, the KL gap by position, participation ratio by layer,
    cross-SAE error predictability; and the tables: summary, KL gap, R²–CE_rec correlation, k*, dark matter
    (the probe's share of the error and the CE gap each part closes). A figure or table whose records the run
    lacks is skipped with a note naming the command that writes them. OUT is replaced only once the new report
    is complete."""
    from actstore.steps.report import report as write

    path = write(run, out, progress=not quiet)
    click.echo(str(path / "report.md"))
    click.echo(str(path / "report.html"))

"""`actstore bundle create|verify`: pack a run's records for a collaborator, and check a bundle received.

Why a command line of its own: the sender creates and the receiver verifies against the same manifest, and
neither should need Python to do it. The work is in actstore/steps/bundle.py; this is only its options.
"""

from __future__ import annotations

import click


@click.group(short_help="Pack a run's records (Parquet, SQL, README, checksummed manifest) into a bundle; verify one.")
def bundle() -> None:
    """Bundles: a run's records in a directory, .tar or .zip that bare DuckDB reads, with the named queries and
    a checksummed manifest."""


@bundle.command(short_help="Pack RUN's records and the SQL queries into OUT (a directory, or a .tar/.zip file).")
@click.argument("run")
@click.argument("out")
@click.option("--with-saes", is_flag=True, help="Include the SAE weights (RUN/saes/<sae_id>/).")
@click.option(
    "--with-recon", is_flag=True, help="Include the reconstructions and tokens of the eval store (recon.zarr)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
def create(run: str, out: str, with_saes: bool, with_recon: bool, overwrite: bool) -> None:
    """Pack RUN's Parquet records (same layout: `SELECT … FROM 'OUT/records/tokens/*/*.parquet'` works in bare
    DuckDB), the named queries (sql/) with views.sql (`cd OUT && duckdb -init views.sql`, then
    `.read sql/summary.sql`), a README of the tables, and manifest.json (sha256 of every file, provenance)
    into OUT. An OUT ending in .tar or .zip becomes a single archive of the same files."""
    from actstore.objstore import is_url
    from actstore.steps.bundle import create as make
    from actstore.steps.bundle import listing

    path = make(run, out, with_saes=with_saes, with_recon=with_recon, overwrite=overwrite)
    sizes = listing(str(path))
    total = path.stat().st_size if path.is_file() else sum(sizes.values())
    click.echo(out if is_url(out) else str(path))  # a URL: uploaded from the local archive `path`
    click.echo(f"{len(sizes)} files, {total / 1e6:.1f} MB", err=True)


@bundle.command(short_help="Check every file of a bundle against its manifest (exit 1 on any difference).")
@click.argument("out")
def verify(out: str) -> None:
    """Check OUT (a directory, .tar or .zip bundle) against its manifest.json: changed, missing and extra files."""
    from actstore.errors import StoreError
    from actstore.steps.bundle import listing
    from actstore.steps.bundle import verify as check

    problems = check(out)
    if problems:
        for problem in problems:
            click.echo(problem)
        raise StoreError(f"{out}: {len(problems)} problem(s); re-create it with `actstore bundle create RUN OUT`")
    click.echo(f"ok: {len(listing(out)) - 1} files verified")

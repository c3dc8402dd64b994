"""`actstore layers`: the participation ratio of every hook of a store, into a run's `layers` table.

Why a step of its own: eval does it for its eval store, but the profile across depth wants every layer's
`hook_resid_post`, harvested into one store that no SAE reads.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from actstore import run as rundir
from actstore.geometry import layer_rows


def write_layers(store: str, run: str, max_seqs: int | None = None, known: dict | None = None) -> pl.DataFrame:
    """Compute `layer_rows` and write them under RUN/records/layers, one partition per store."""
    if "://" not in store:  # one partition per store, however its path is spelled
        store = str(Path(store).resolve())
    rows = layer_rows(store, max_seqs, known)
    rundir.write_tables(run, rundir.hash_key(store), {"layers": rows})
    return rows

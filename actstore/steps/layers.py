"""`actstore layers`: the participation ratio of every hook of a store, into a run's `layers` table.

Why a step of its own: eval does it for its eval store, but the profile across depth wants every layer's
`hook_resid_post`, harvested into one store that no SAE reads.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from actstore import objstore
from actstore import run as rundir
from actstore.geometry import layer_rows


def write_layers(store: str, run: str, max_seqs: int | None = None, known: dict | None = None) -> pl.DataFrame:
    """Compute `layer_rows` and write them under RUN/records/layers, one partition per store."""
    if objstore.is_url(run):  # a run on object storage: worked on in a local copy, committed through its log
        with objstore.run_copy(run, "actstore layers") as local:
            return write_layers(store, str(local), max_seqs, known)
    if "://" not in store:  # one partition per store, however its path is spelled
        store = str(Path(store).resolve())
    rows = layer_rows(store, max_seqs, known)
    rundir.write_tables(run, rundir.hash_key(store), {"layers": rows})
    return rows

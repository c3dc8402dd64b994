"""The Parquet records every query reads: where they live, their schema version, atomic replacement.

Why: records are the contract between the GPU side and every later question (DuckDB SQL, polars, a
collaborator's own tools). Each table is a directory of Parquet files, one file per SAE, named
`sae_id=<id>/part-0.parquet` (Hive partitioning: DuckDB and polars read `sae_id` back as a column).
Re-evaluating an SAE writes its files aside and swaps them in, so a killed eval leaves the old
records intact.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl

SCHEMA_VERSION = "1"
TABLES = ("saes", "tokens", "codes", "evals", "curves")


def table_dir(run: str | Path, table: str) -> Path:
    return Path(run) / "records" / table


def part_path(run: str | Path, table: str, sae_id: str) -> Path:
    return table_dir(run, table) / f"sae_id={sae_id}" / "part-0.parquet"


def write_parts(run: str | Path, sae_id: str, frames: dict[str, pl.DataFrame]) -> None:
    """Replace `sae_id`'s partition of each table: all written aside first, then renamed into place."""
    staged: list[tuple[Path, Path]] = []
    for table, frame in frames.items():
        final = part_path(run, table, sae_id).parent
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        frame.drop("sae_id", strict=False).write_parquet(
            tmp / "part-0.parquet", compression="zstd", metadata={"actstore_schema": SCHEMA_VERSION}
        )
        staged.append((tmp, final))
    for tmp, final in staged:  # only now does anything old go away
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def read_table(run: str | Path, table: str) -> pl.DataFrame:
    files = sorted(table_dir(run, table).glob("sae_id=*/part-0.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.read_parquet(files, hive_partitioning=True)

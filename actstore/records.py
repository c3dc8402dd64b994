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
TABLES = ("saes", "tokens", "codes", "latents", "evals", "curves", "darkmatter", "layers", "vocab")


def table_dir(run: str | Path, table: str) -> Path:
    return Path(run) / "records" / table


def part_path(run: str | Path, table: str, sae_id: str, partition: str = "sae_id") -> Path:
    return table_dir(run, table) / f"{partition}={sae_id}" / "part-0.parquet"


def part_files(run: str | Path, table: str) -> list[Path]:
    """A table's committed files (never a `.partial` or `.old` directory left by a killed write)."""
    return sorted(
        p for p in table_dir(run, table).glob("*=*/part-0.parquet") if p.parent.suffix not in (".partial", ".old")
    )


def write_parts(run: str | Path, key: str, frames: dict[str, pl.DataFrame], partition: str = "sae_id") -> None:
    """Replace partition `key` of each table: all written aside first, then renamed into place.

    Tables are partitioned by `sae_id`, except `layers` (by store, `store_key`) and `vocab` (`model_key`).
    """
    staged: list[tuple[Path, Path]] = []
    for table, frame in frames.items():
        final = part_path(run, table, key, partition).parent
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        frame.drop(partition, strict=False).write_parquet(
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
    files = part_files(run, table)
    if not files:
        return pl.DataFrame()
    return pl.read_parquet(files, hive_partitioning=True)

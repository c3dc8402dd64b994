"""DuckDB over the records: read-only views and the named queries shipped in `sql/`.

Why DuckDB: the records are Parquet and the questions are aggregations over millions of per-token
rows; an embedded SQL engine answers them without loading everything, and the same `.sql` files run
unchanged in a collaborator's bare `duckdb` shell.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import polars as pl

from actstore import records as rec
from actstore.errors import UsageError


def connect(run: str):
    """An in-memory DuckDB connection with one view per records table present under RUN/records."""
    import duckdb

    con = duckdb.connect()
    for table in rec.TABLES:
        if any(rec.table_dir(run, table).glob("sae_id=*/part-0.parquet")):
            pattern = str(rec.table_dir(run, table) / "sae_id=*" / "part-0.parquet")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)")
    return con


def query_text(name: str) -> str:
    path = files("actstore.sql") / f"{name}.sql"
    if not path.is_file():
        names = sorted(Path(str(p)).stem for p in files("actstore.sql").iterdir() if str(p).endswith(".sql"))
        raise UsageError(f"no named query {name!r}; there are: {', '.join(names)}")
    return path.read_text()


def query(run: str, name: str) -> pl.DataFrame:
    """Run the named query `sql/<name>.sql` over RUN's records; a polars DataFrame back."""
    if not (Path(run) / "records").is_dir():
        raise UsageError(f"{run} has no records/; run `actstore eval` first")
    return connect(run).sql(query_text(name)).pl()


def format_table(df: pl.DataFrame) -> str:
    """A terminal-width table of a query result (every row, 4 decimals, no wrapping)."""
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        fmt_str_lengths=80,
        tbl_hide_dataframe_shape=True,
        float_precision=4,
        tbl_width_chars=250,
        tbl_hide_column_data_types=True,
    ):
        return str(df)

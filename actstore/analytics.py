"""DuckDB over the records: read-only views and the named queries shipped in `sql/`.

Why DuckDB: the records are Parquet and the questions are aggregations over millions of per-token
rows; an embedded SQL engine answers them while streaming, and the same `.sql` files run unchanged in
a collaborator's bare `duckdb` shell (`.read _macros.sql`, then the query). A named query's parameters
are DuckDB variables: each file starts with `SET VARIABLE p = coalesce(getvariable('p'), default);`,
so a value set beforehand (`--param p=v`, or `SET VARIABLE` in the shell) wins over the default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import polars as pl

from actstore import records as rec
from actstore.errors import UsageError
from actstore.units import parse_count

# Tables a named query may reference without needing rows: absent ones become empty views of this shape.
_EMPTY = {
    "tokens": ", ".join(
        ["NULL::VARCHAR AS sae_id", "NULL::VARCHAR AS store", "NULL::INTEGER AS seq", "NULL::SMALLINT AS pos"]
        + [f"NULL::FLOAT AS {c}" for c in ("sse", "sst", "cos", "relerr", "l0", "rate_bits", "err_norm")]
        + [f"NULL::FLOAT AS {p}_{c}" for p in ("ce", "kl") for c in ("orig", "patched", "zero")]
    ),
    "latents": "NULL::VARCHAR AS sae_id, NULL::INTEGER AS latent, NULL::BIGINT AS fires, NULL::DOUBLE AS firing_rate",
    "codes": "NULL::VARCHAR AS sae_id, NULL::INTEGER AS seq, NULL::SMALLINT AS pos, NULL::INTEGER AS latent",
    "vocab": "NULL::VARCHAR AS model, NULL::INTEGER AS token, NULL::VARCHAR AS text",
}
_PARAM = re.compile(r"^SET VARIABLE (\w+) = coalesce\(getvariable\('(\w+)'\), (.+)\);\s*(?:--\s*(.*))?$", re.M)


@dataclass(frozen=True)
class NamedQuery:
    name: str
    purpose: str  # the header's first line
    reads: str  # the views it reads
    params: dict[str, tuple[str, str]]  # name -> (default SQL, meaning)
    text: str


def resolve(run_or_bundle: str) -> Path:
    """The directory holding `records/`: a run, a bundle directory, or an unpacked .tar/.zip bundle."""
    path = Path(run_or_bundle)
    if path.suffix in (".tar", ".zip") and path.is_file():
        from actstore.bundle import open_bundle

        path = Path(open_bundle(str(path)))
    if not (path / "records").is_dir():
        raise UsageError(f"{run_or_bundle} has no records/; run `actstore eval` on it first (or give a bundle)")
    return path


def setup_statements(root: Path) -> list[str]:
    """The SQL that opens a run: a view per records table present (absent ones that queries may reference
    become empty typed views), then the shared macros. `connect` and the duckdb shell both run it."""
    statements = []
    for table in rec.TABLES:
        parts = rec.part_files(root, table)
        if parts:
            listed = ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in parts)
            statements.append(  # union_by_name: SAEs evaluated with --darkmatter have four more columns
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true, "
                "union_by_name = true);"
            )
        elif table in _EMPTY:  # queries may read it in a branch that a parameter switches off
            statements.append(f"CREATE VIEW {table} AS SELECT {_EMPTY[table]} WHERE false;")
    statements.append((files("actstore.sql") / "_macros.sql").read_text())
    return statements


def connect(run_or_bundle: str):
    """An in-memory DuckDB connection with the views and macros of `setup_statements`."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # DuckDB draws one on stdout for queries over ~2 s
    for statement in setup_statements(resolve(run_or_bundle)):
        con.execute(statement)
    return con


def named_queries() -> dict[str, NamedQuery]:
    """Every `sql/<name>.sql` (files starting with `_` are shared definitions, not queries)."""
    out = {}
    for path in sorted(files("actstore.sql").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".sql") and not path.name.startswith("_"):
            out[path.name[:-4]] = _parse(path.name[:-4], path.read_text())
    return out


def _parse(name: str, text: str) -> NamedQuery:
    header = [line[2:].strip() for line in text.splitlines() if line.startswith("--")]
    purpose = header[0].split(":", 1)[-1].strip() if header else ""
    reads = next((h.split(":", 1)[1].strip() for h in header if h.lower().startswith("reads:")), "")
    params = {m.group(1): (m.group(3).strip(), (m.group(4) or "").strip()) for m in _PARAM.finditer(text)}
    return NamedQuery(name, purpose, reads, params, text)


def get_query(name: str) -> NamedQuery:
    queries = named_queries()
    if name not in queries:
        raise UsageError(f"no named query {name!r}; there are: {', '.join(queries)} (`actstore sql RUN --list`)")
    return queries[name]


def query_text(name: str) -> str:
    return get_query(name).text


def sql_literal(value: Any) -> str:
    """A Python value (or a CLI string) as a DuckDB literal.

    Numbers stay numbers (a whole float becomes an integer, so `1e6` matches a budget of 1000000), token
    counts are read as counts (`500k`, `2M`), lists become comma-separated text; the rest is a string.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "'" + ",".join(str(v) for v in value) + "'"
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if re.fullmatch(r"-?\d+(\.\d+)?[kKmMbB]", text):
        return str(parse_count(text))
    try:
        return sql_literal(float(text)) if re.fullmatch(r"[-+.\deE]+", text) else _quoted(text)
    except ValueError:
        return _quoted(text)


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_sql(con, text: str, params: dict[str, Any] | None = None) -> pl.DataFrame:
    """Set `params` as DuckDB variables, run every statement of `text`, return the last one's rows."""
    import duckdb

    for key, value in (params or {}).items():
        if not re.fullmatch(r"\w+", key):
            raise UsageError(f"parameter name {key!r} is not an identifier; use --param name=value")
        con.execute(f"SET VARIABLE {key} = {sql_literal(value)}")
    statements = duckdb.extract_statements(text)
    if not statements:
        raise UsageError("the SQL text is empty; give a SELECT or --query NAME")
    try:
        for statement in statements[:-1]:
            con.execute(statement.query).fetchall()  # a check may be a SELECT: finish it
        return con.sql(statements[-1].query).pl()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        hint = next((h for needle, h in _HINTS.items() if needle in first), f"views: {', '.join(_views(con))}")
        raise UsageError(f"SQL failed: {first} ({hint})") from None


# What to run when a query needs records the run lacks (matched against DuckDB's error message).
_HINTS = {
    "ce_linear": "patch the dark-matter probes first: `actstore eval EVAL_STORE --run RUN --darkmatter`",
    "ce_nonlinear": "patch the dark-matter probes first: `actstore eval EVAL_STORE --run RUN --darkmatter`",
    "name darkmatter": "fit the probes first: `actstore darkmatter RUN`",
    "name layers": "write the table first: `actstore layers STORE --run RUN` (eval also does it)",
    "name curves": "training curves come from `actstore train`",
    "name saes": "evaluate some SAEs first: `actstore eval EVAL_STORE --run RUN`",
}


def _views(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]


def query(run: str, name: str, **params: Any) -> pl.DataFrame:
    """Run the named query `sql/<name>.sql` over a run's (or bundle's) records; a polars DataFrame back."""
    q = get_query(name)
    unknown = sorted(set(params) - set(q.params))
    if unknown:
        raise UsageError(f"{name} has no parameter {', '.join(unknown)}; it takes: {', '.join(q.params) or 'none'}")
    return run_sql(connect(run), q.text, params)


def sql(run: str, text: str, **params: Any) -> pl.DataFrame:
    """Run ad-hoc SQL over a run's (or bundle's) records."""
    return run_sql(connect(run), text, params)


def format_table(df: pl.DataFrame, decimals: int = 4) -> str:
    """A terminal-width table of a query result (every row, no wrapping)."""
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        fmt_str_lengths=80,
        tbl_hide_dataframe_shape=True,
        float_precision=decimals,
        tbl_width_chars=250,
        tbl_hide_column_data_types=True,
    ):
        return str(df)


def with_intervals(df: pl.DataFrame, decimals: int = 4) -> pl.DataFrame:
    """Fold each `x`, `x_lo`, `x_hi` column triple into one "x [lo, hi]" text column, for reading."""

    def fmt(c: str) -> pl.Expr:
        return pl.col(c).map_elements(f"{{:.{decimals}f}}".format, return_dtype=pl.String)

    out = df
    for col in df.columns:
        if f"{col}_lo" in df.columns and f"{col}_hi" in df.columns:
            text = pl.concat_str(fmt(col), pl.lit(" ["), fmt(f"{col}_lo"), pl.lit(", "), fmt(f"{col}_hi"), pl.lit("]"))
            out = out.with_columns(pl.coalesce(text, fmt(col)).alias(col)).drop(f"{col}_lo", f"{col}_hi")
    return out


def headline(run: str) -> pl.DataFrame:
    """The per-SAE table the CLI and demo print: summary's main numbers with CIs, and the KL gaps."""
    df = query(run, "summary")
    gaps = query(run, "kl_gap").pivot(on="baseline", index="sae_id", values="gap")
    gaps = gaps.rename({c: f"kl_gap_{c}" for c in gaps.columns if c != "sae_id"})
    keep = ["sae_id", "r2", "ce_rec", "ce_loss_recovered", "kl", "alive"]
    cols = [c for c in df.columns if c in keep or any(c == f"{k}_{e}" for k in keep for e in ("lo", "hi"))]
    return (
        with_intervals(df.select(cols))
        .join(gaps, on="sae_id", how="left")
        .sort(pl.col("sae_id").str.extract(r"^(.*)__"), pl.col("sae_id").str.extract(r"__k(\d+)_").cast(pl.Int64))
    )


def open_shell(run_or_bundle: str) -> None:
    """Replace this process with the duckdb CLI, the views and macros loaded by an init file."""
    import os
    import shutil
    import tempfile

    exe = shutil.which("duckdb")
    if exe is None:
        raise UsageError(
            'no `duckdb` CLI on PATH; install it (https://duckdb.org) or use `actstore sql RUN "SELECT …"`'
        )
    lines = setup_statements(resolve(run_or_bundle))
    init = tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False)
    init.write("\n".join(lines))
    init.close()
    os.execv(exe, [exe, "-init", init.name])

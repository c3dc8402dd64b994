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

from actstore import objstore
from actstore import run as rundir
from actstore.errors import UsageError
from actstore.tables import TABLES, empty_view_sql, views
from actstore.units import parse_count

_PARAM = re.compile(r"^SET VARIABLE (\w+) = coalesce\(getvariable\('(\w+)'\), (.+)\);\s*(?:--\s*(.*))?$", re.M)


@dataclass(frozen=True)
class NamedQuery:
    name: str
    purpose: str  # the header's first line
    reads: str  # the views it reads
    params: dict[str, tuple[str, str]]  # name -> (default SQL, meaning)
    text: str


def resolve(run_or_bundle: str) -> Path:
    """The directory holding `records/`: a run, a bundle directory, or an unpacked .tar/.zip bundle; a bundle
    (untrusted: it came from someone else) is screened and verified against its manifest first. A URL is read
    from its verified local copy (actstore/objstore.py)."""
    path = Path(run_or_bundle)
    if objstore.is_url(run_or_bundle):
        path = objstore.fetch(run_or_bundle)
    if (path.suffix in (".tar", ".zip") and path.is_file()) or path.is_dir():
        from actstore.steps.bundle import open_bundle

        path = Path(open_bundle(str(path)))
    if not (path / "records").is_dir():
        raise UsageError(f"{run_or_bundle} has no records/; run `actstore eval` on it first (or give a bundle)")
    return path


def setup_statements(root: Path, needed_by: str | None = None) -> list[str]:
    """The SQL that opens a run: a view per records table (an empty typed view for a table the run lacks,
    so a query reads it in a branch a parameter switches off), then the shared macros (those `needed_by`
    uses, where given, and only the views they read). `connect` and the duckdb shell both run it."""
    shared = macros(needed_by)
    statements, used = [], None if needed_by is None else needed_by + shared
    for view, table, where in views():  # partition keys stay text: a hash or an sae_id of digits is not a number
        if used is not None and not re.search(rf"\b{view}\b", used):
            continue  # binding a view reads every file's footer: a named query opens only what it reads
        parts = rundir.part_files(root, table)
        if parts and where and not _has_column(parts, where.split()[0]):  # records older than the filter's column
            if "NOT NULL" in where:
                parts = []  # such records hold no single-position evaluation
            else:
                where = None
        if parts:
            listed = ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in parts)
            statements.append(  # union_by_name: files written by an older schema may lack newer columns
                f"CREATE VIEW {view} AS SELECT * FROM read_parquet([{listed}], hive_partitioning = true, "
                f"hive_types = {{'{TABLES[table].partition}': VARCHAR}}, union_by_name = true)"
                + (f" WHERE {where};" if where else ";")
            )
        else:
            statements.append(f"CREATE VIEW {view} AS {empty_view_sql(table)};")
    statements += [shared] if shared else []  # a query that calls no macro needs none
    return statements


def _has_column(parts: list[Path], column: str) -> bool:
    return any(column in pl.read_parquet_schema(p) for p in parts)


_MACRO = re.compile(r"CREATE OR REPLACE MACRO (\w+)\(")


def macros(needed_by: str | None = None) -> str:
    """The shared macros of the named queries (`sql/_macros.sql`); with `needed_by` (a query's text) only
    those it calls, directly or through another macro, in the file's order.

    Why the subset: DuckDB binds each macro as it is created, about 0.15 s of CPU for the whole file, paid
    on every `query` call; a named query uses a few of them.
    """
    text = (files("actstore.sql") / "_macros.sql").read_text()
    if needed_by is None:
        return text
    import duckdb

    defined = {_MACRO.search(st.query).group(1): st.query for st in duckdb.extract_statements(text)}
    want, todo = set(), [needed_by]
    while todo:
        body = todo.pop()
        for name in defined.keys() - want:
            if re.search(rf"\b{name}\s*\(", body):
                want.add(name)
                todo.append(defined[name])
    return "\n".join(f"{q.strip()};" for name, q in defined.items() if name in want)


def connect(run_or_bundle: str, needed_by: str | None = None):
    """An in-memory DuckDB connection with the views and macros of `setup_statements`, confined to the run.

    Once the views exist DuckDB's own switches lock it down: files are readable only inside the run (or
    the extracted bundle), extensions are neither installed nor loaded, and the configuration is locked,
    so SQL cannot turn any of it back on. Writing (COPY, ATTACH, CREATE …) is refused by `run_sql`.
    """
    import duckdb

    root = resolve(run_or_bundle).resolve()
    rundir.check_records(root)  # a flipped byte in a Parquet page would read as data
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # DuckDB draws one on stdout for queries over ~2 s
    for statement in setup_statements(root, needed_by):
        con.execute(statement)
    con.execute(f"SET allowed_directories = [{_quoted(str(root) + '/')}]")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


# What a query may run: reading (SELECT, and EXPLAIN of one) and the named queries' own SET VARIABLE lines.
# Everything else — COPY, ATTACH, CREATE, INSERT, INSTALL, LOAD, PRAGMA, SET of a setting — is refused.
_READING = {"SELECT", "EXPLAIN"}


def _check_statement(statement: Any) -> None:
    kind = str(statement.type).rsplit(".", 1)[-1].upper()
    text = re.sub(r"^(\s*--[^\n]*(\n|$))*", "", statement.query).strip()  # the header comments go with it
    if kind in _READING or (kind in ("SET", "VARIABLE_SET") and re.match(r"(?i)SET\s+VARIABLE\b", text)):
        return
    head = " ".join(text.split()[:2])
    raise UsageError(
        f"actstore sql only reads: {head!r} … is not allowed (a {kind} statement); write results with --out FILE"
    )


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
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise UsageError(f"SQL does not parse: {str(exc).strip().splitlines()[0]}") from None
    if not statements:
        raise UsageError("the SQL text is empty; give a SELECT or --query NAME")
    for statement in statements:
        _check_statement(statement)
    try:
        for statement in statements[:-1]:
            con.execute(statement.query).fetchall()  # a check may be a SELECT: finish it
        return con.sql(statements[-1].query).pl()
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        if isinstance(exc, duckdb.InvalidInputException) and first.startswith("Invalid Input Error: "):
            raise UsageError(first.removeprefix("Invalid Input Error: ")) from None  # a query's own error()
        raise UsageError(f"SQL failed: {first} (views: {', '.join(_views(con))})") from None


def _views(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]


def missing_tables(run_or_bundle: str, name: str) -> list[str]:
    """The records tables named query `name` reads (its header's `Reads:` line) that the run lacks."""
    root = resolve(run_or_bundle)
    reads = get_query(name).reads.split("(", 1)[0]  # "tokens, saes, vocab (what vocab holds)."
    return [t for t in (r.strip(" .") for r in reads.split(",")) if t in TABLES and not rundir.part_files(root, t)]


def why_empty(run_or_bundle: str, name: str) -> str:
    """Why a named query returned no rows: the tables the run lacks and the commands that write them."""
    missing = missing_tables(run_or_bundle, name)
    if not missing:
        return f"query `{name}` returned no rows"
    return "; ".join(f"this run has no `{t}` table ({TABLES[t].writer} writes it)" for t in missing)


def query(run: str, name: str, **params: Any) -> pl.DataFrame:
    """Run the named query `sql/<name>.sql` over a run's (or bundle's) records; a polars DataFrame back."""
    q = get_query(name)
    unknown = sorted(set(params) - set(q.params))
    if unknown:
        raise UsageError(f"{name} has no parameter {', '.join(unknown)}; it takes: {', '.join(q.params) or 'none'}")
    for key, value in params.items():
        check_param(name, key, value, q.params[key][0])
    return run_sql(connect(run, q.text), q.text, params)


# Parameters that count something: (smallest allowed value, integer?). The rest are typed by their default.
_COUNTS = {
    "n_boot": (0, True), "top": (1, True), "min_count": (1, True), "bucket": (1, True), "after": (0, True),
    "last_rows": (1, True), "min_pos": (0, True), "max_pos": (0, True), "boot_n": (1, True), "seed": (0, True),
}  # fmt: skip


def check_param(query_name: str, key: str, value: Any, default: str) -> None:
    """A one-line UsageError unless `value` has the type of the parameter's default (a number for a numeric
    default) and, for a count, is a whole number at least its minimum."""
    literal = sql_literal(value)
    numeric_default = re.fullmatch(r"-?[\d.]+(e-?\d+)?", default.strip()) is not None
    is_number = re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", literal) is not None
    if (numeric_default or key in _COUNTS) and not is_number:
        raise UsageError(f"{query_name}: {key}={value} is not a number (default {default})")
    if key in _COUNTS:
        low, whole = _COUNTS[key]
        number = float(literal)
        if number < low or (whole and not number.is_integer()):
            kind = "a whole number" if whole else "a number"
            raise UsageError(f"{query_name}: {key}={value} must be {kind} ≥ {low}")


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


FORMATS = ("table", "csv", "json", "parquet")


def render(df: pl.DataFrame, fmt: str) -> str:
    """A result as text in `fmt` (table, csv or json); parquet is binary: see `write_result`."""
    if fmt == "table":
        return format_table(df)
    if fmt == "csv":  # CSV has no lists: nested values are written as their text
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        return df.with_columns(pl.col(nested).map_elements(str, return_dtype=pl.String)).write_csv()
    if fmt == "json":
        return df.write_json()
    raise UsageError(f"--format {fmt} has no text form; use one of table, csv, json, or parquet with --out FILE")


def write_result(df: pl.DataFrame, fmt: str, out: str) -> None:
    """A result written to the file `out` in `fmt`."""
    if fmt == "parquet":
        df.write_parquet(out)
    else:
        Path(out).write_text(render(df, fmt))


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
    order = df.select("sae_id", "layer", "hook", "k")
    return (
        with_intervals(df.select(cols))
        .join(gaps, on="sae_id", how="left")
        .join(order, on="sae_id")
        .sort("layer", "hook", "k", "sae_id", nulls_last=True)
        .drop("layer", "hook", "k")
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

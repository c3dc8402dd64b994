"""The two files of a bundle a collaborator reads first: README.md (what each table holds, how to query
it) and views.sql (the records as DuckDB views, for a bare `duckdb` shell).

Why neither states a formula: every column's type and meaning comes from actstore/tables.py and every
number from the named queries the bundle ships in `sql/` (their definitions are in docs/METHODS.md), so a
bundle cannot disagree with the code that computed its numbers. The README's one query over the bare
Parquet counts rows, which needs no definition.
"""

from __future__ import annotations

from typing import Any

from actstore import __version__
from actstore.tables import SCHEMA_VERSION, TABLES, empty_view_sql, views

INTRO = """# actstore bundle of `{name}`

Evaluation records of sparse autoencoders, written by actstore {version} (records schema {schema}). Every
table is Parquet with Hive partitioning: a directory named `key=value` (e.g. `sae_id=<id>`) is a column of
its rows, so DuckDB (`hive_partitioning = true`) and polars (`hive_partitioning=True`) read it back. Nothing
here needs actstore.

`{manifest}` lists the sha256 and size of every other file (check them with `actstore bundle verify` or
`sha256sum`) and the provenance: `run.json`, the eval stores' attributes (model, corpus, split, seq_len,
dtype …) and the rows of the saes table.
"""
QUERYING = """## Querying

`{views}` creates one DuckDB view per records table (an empty one with the same columns for a table this
bundle lacks) and the macros of `sql/_macros.sql`; `sql/<name>.sql` are actstore's named queries, the
files `actstore sql RUN --query NAME` runs, so they give the same numbers. The views' paths are relative
to this directory: start DuckDB here.

```sh
cd BUNDLE
duckdb -init {views}
```

then, at DuckDB's prompt, `.read sql/summary.sql` (or any query below). A query's parameters are DuckDB
variables: `SET VARIABLE n_boot = 1000;` before the `.read` replaces the default its file states. From
Python: `con = duckdb.connect(); con.execute(open("{views}").read()); con.sql(open("sql/summary.sql").read())`.
What each number means is said in the query's header and defined in actstore's docs/METHODS.md.

| query | what it answers |
|---|---|
"""
PLAIN = """The Parquet files read without the views too; for example, the rows of {table} per {key}:

```sql
SELECT {key}, count(*) AS n_rows
FROM read_parquet('{glob}', hive_partitioning = true)
GROUP BY {key} ORDER BY {key};
```
"""


def render(
    name: str, tables: dict[str, dict[str, Any]], *, manifest: str, views: str, with_saes: bool, with_recon: bool
) -> str:
    """The README of a bundle of run `name` holding `tables` (per table: glob, partition keys, files, rows)."""
    from actstore.analytics import named_queries

    text = [INTRO.format(name=name, version=__version__, schema=SCHEMA_VERSION, manifest=manifest)]
    if with_saes:
        text.append("`saes/<sae_id>/`: the SAEs' `cfg.json` and `sae_weights.safetensors`, in SAELens's layout.\n")
    if with_recon:
        text.append("`recon.zarr`: a Zarr v3 group with the eval `tokens` and `recon/<sae_id>/<hook>` arrays.\n")
    text.append("## Tables\n")
    text += [_table(table, info) for table, info in tables.items()]
    text.append(
        QUERYING.format(views=views)
        + "".join(f"| `sql/{q.name}.sql` | {q.purpose} |\n" for q in named_queries().values())
    )
    example = next((t for t in ("tokens", *tables) if t in tables and tables[t]["keys"]), None)
    if example is not None:
        info = tables[example]
        text.append(PLAIN.format(table=example, key=info["keys"][0], glob=info["glob"]))
    return "\n".join(text)


def _table(table: str, info: dict[str, Any]) -> str:
    head = f"### {table}\n\n"
    where = f"`{info['glob']}` ({info['files']} files, {info['rows']:,} rows)"
    if table not in TABLES:
        return f"{head}Not a table of records schema {SCHEMA_VERSION}; its columns are as stored. {where}.\n"
    t = TABLES[table]
    keys = f", partitioned by {', '.join(info['keys'])}" if info["keys"] else ""
    rows = [f"| {key} | VARCHAR | partition key: the directory name `{key}=<value>` |\n" for key in info["keys"]]
    rows += [f"| {c.name} | {c.type} | {c.meaning} |\n" for c in t.columns]
    about = f"{t.about[0].upper()}{t.about[1:]}; written by {t.writer}."
    return f"{head}{about} {where}{keys}.\n\n| column | type | meaning |\n|---|---|---|\n" + "".join(rows)


def read_options(keys: list[str]) -> str:
    """read_parquet's options for a records table: Hive keys read as text (an all-digit key would otherwise
    become a number), files of an older schema with fewer columns read alongside newer ones."""
    types = ", ".join(f"'{k}': VARCHAR" for k in keys)
    return "hive_partitioning = true, union_by_name = true" + (f", hive_types = {{{types}}}" if keys else "")


def views_sql(tables: dict[str, dict[str, Any]], macros: str) -> str:
    """views.sql: a view per records table over the bundle's files (paths relative to the bundle), an empty
    typed view per table of the schema it lacks, then the macros of the named queries."""
    lines = [
        "-- The records of this bundle as DuckDB views, for bare DuckDB: in this directory run",
        "-- `duckdb -init views.sql`, then `.read sql/<name>.sql` (README.md lists the queries).",
        "-- Paths are relative to this directory; a table the bundle lacks is an empty view with its columns.",
    ]
    for view, table, where in [*views(), *((t, t, None) for t in tables if t not in TABLES)]:
        if table in tables:
            body = f"SELECT * FROM read_parquet('{tables[table]['glob']}', {read_options(tables[table]['keys'])})"
            body += f" WHERE {where}" if where else ""
        else:
            body = empty_view_sql(table)
        lines.append(f'CREATE OR REPLACE VIEW "{view}" AS {body};')
    lines += ["", "-- The shared macros of the named queries (sql/_macros.sql, included here).", macros]
    return "\n".join(lines)

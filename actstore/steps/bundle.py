"""`actstore bundle`: a run's records packed for someone without actstore, with checksums.

Why: the records are the result a collaborator wants, and they should need nothing of ours to read them. A
bundle keeps the Parquet layout (`records/<table>/<key>=<value>/*.parquet`, so bare DuckDB and polars read
the partition keys back as columns), a README that says what each table holds (from actstore/tables.py),
the SQL library (`sql/`, with `views.sql` opening the records as views in a bare `duckdb` shell) so the
collaborator's numbers come from the same named queries as ours rather than from formulas retyped in a
README (their definitions: docs/METHODS.md), and `manifest.json`: the sha256 and size of every other file
plus the provenance (run.json, the eval stores' attributes, the saes table), so a bundle that changed in
transit is caught by `verify`, not by a wrong plot. A `.tar` or `.zip` OUT holds the same files at its top
level.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

from actstore import __version__, atomic, bundle_readme
from actstore import run as rundir
from actstore.errors import StoreError, UsageError
from actstore.tables import SCHEMA_VERSION

MANIFEST = "manifest.json"
VIEWS = "views.sql"
ARCHIVES = (".tar", ".zip")


def create(run: str, out: str, *, with_saes: bool = False, with_recon: bool = False, overwrite: bool = False) -> Path:
    """Pack RUN's records (and optionally its SAE weights and reconstructions) into OUT: a directory, a .tar or
    a .zip. Built aside and renamed into place, so a failed create leaves any old OUT as it was."""
    run_dir, dest = Path(run), Path(out)
    if not run_dir.is_dir():
        raise UsageError(f"no run directory {run}; give the directory `actstore train --out` wrote")
    parts = _record_files(run_dir)
    if not parts:
        raise UsageError(f"{run} has no Parquet records; run `actstore eval` first")
    if dest.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if dest.resolve() == run_dir.resolve() or dest.resolve() in run_dir.resolve().parents:
        raise UsageError(f"OUT {out} would replace the run itself; choose a path outside {run}")
    with atomic.replacing(dest) as (stage,):
        # an archive's files are gathered in a staging directory of their own, next to OUT, then packed
        tree = stage if dest.suffix not in ARCHIVES else atomic.staged(dest.with_name(dest.name + ".d"))
        try:
            atomic.remove(tree)
            _fill(tree, run_dir, parts, with_saes, with_recon)
            if tree != stage:
                _pack(tree, stage, dest.suffix)
        finally:
            if tree != stage:
                atomic.remove(tree)
    return dest


def verify(out: str) -> list[str]:
    """What differs between the bundle at OUT (directory, .tar or .zip) and its manifest; empty when intact."""
    found: dict[str, tuple[str, int] | str] = {}
    manifest_bytes = None
    try:
        for name, _, opener in _members(out):
            with opener() as f:
                if name == MANIFEST:
                    manifest_bytes = f.read()
                    continue
                try:
                    found[name] = _digest(f)
                except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
                    found[name] = str(exc)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        return [f"{out} cannot be read ({exc}); re-create it with `actstore bundle create`"]
    if manifest_bytes is None:
        return [f"{out} has no {MANIFEST}; it is not a bundle, or re-create it with `actstore bundle create`"]
    try:
        listed = {name: (meta["sha256"], meta["size"]) for name, meta in json.loads(manifest_bytes)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} of {out} is unreadable; re-create the bundle with `actstore bundle create`"]
    problems = []
    for name, (sha, size) in sorted(listed.items()):
        got = found.get(name)
        if got is None:
            problems.append(f"missing: {name}")
        elif isinstance(got, str):
            problems.append(f"damaged: {name} ({got})")
        elif got[1] != size:
            problems.append(f"changed: {name} ({got[1]} bytes, the manifest says {size})")
        elif got[0] != sha:
            problems.append(f"changed: {name} (sha256 differs from the manifest)")
    problems += [f"extra: {name} (not in the manifest)" for name in sorted(found.keys() - listed.keys())]
    return problems


def open_bundle(path: str) -> Path:
    """The directory holding a bundle's `records/`: PATH itself, or a .tar/.zip extracted once into a cache
    keyed by the archive's path, mtime and size (so a replaced archive is extracted afresh)."""
    src = Path(path)
    if src.is_dir():
        return src
    if not src.is_file() or src.suffix not in ARCHIVES:
        raise UsageError(
            f"{path} is not a run, a bundle directory, .tar or .zip; make one with `actstore bundle create`"
        )
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_mtime_ns}|{stat.st_size}".encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "actstore-bundles" / f"{src.stem}-{key}"
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + "."))
        try:
            if src.suffix == ".tar":
                with tarfile.open(src) as tf:
                    tf.extractall(tmp, filter="data")
            else:
                with zipfile.ZipFile(src) as zf:
                    zf.extractall(tmp)
            os.replace(tmp, cache)  # not atomic.swap_in: a cache a concurrent opener put there first stays
        except (tarfile.TarError, zipfile.BadZipFile) as exc:
            raise StoreError(f"{path} cannot be extracted ({exc}); check it with `actstore bundle verify`") from None
        except OSError as exc:
            if not cache.is_dir():  # else a concurrent opener got there first, and its copy serves
                raise StoreError(
                    f"cannot extract {path} into {cache.parent} ({exc}); free space or set TMPDIR"
                ) from None
        finally:
            atomic.remove(tmp)
    return cache


def listing(out: str) -> dict[str, int]:
    """Name and size of every file of a bundle (directory, .tar or .zip), the manifest included."""
    return {name: size for name, size, _ in _members(out)}


def _record_files(run: Path) -> list[Path]:
    """Every committed Parquet file of the records, never one inside a staging directory a killed write left."""
    root = rundir.records_dir(run)
    found = sorted(root.rglob("*.parquet")) if root.is_dir() else []
    return [f for f in found if not any(atomic.is_staging(p) for p in f.relative_to(root).parts)]


def _fill(stage: Path, run: Path, parts: list[Path], with_saes: bool, with_recon: bool) -> None:
    for f in parts:
        target = stage / f.relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    tables = _describe(stage)
    _add_sql(stage, tables)
    evals = _rows(tables, "evals")
    stores = sorted({row["store"] for row in evals if row.get("store")})
    if with_saes:
        if not rundir.saes_dir(run).is_dir():
            raise UsageError(f"{run} has no saes/ directory; drop --with-saes or train with `actstore train`")
        unfinished = lambda _, names: [n for n in names if atomic.is_staging(n)]  # noqa: E731
        shutil.copytree(rundir.saes_dir(run), rundir.saes_dir(stage), ignore=unfinished)
    if with_recon:
        _copy_recon(run, stores, [row["sae_id"] for row in evals if row.get("sae_id")], stage / "recon.zarr")
    run_json = rundir.run_json(run)
    provenance = {
        "run": json.loads(run_json.read_text()) if run_json.is_file() else None,
        "stores": {s: _store_attrs(run, s) for s in stores},
        "saes": _rows(tables, "saes"),
    }
    readme = bundle_readme.render(
        run.name, tables, manifest=MANIFEST, views=VIEWS, with_saes=with_saes, with_recon=with_recon
    )
    (stage / "README.md").write_text(readme)
    manifest = {
        "format": "actstore-bundle",
        "schema_version": SCHEMA_VERSION,
        "actstore": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tables": {t: {"files": d["files"], "rows": d["rows"]} for t, d in tables.items()},
        "provenance": provenance,
        "files": {},
    }
    for p in sorted(p for p in stage.rglob("*") if p.is_file()):
        with open(p, "rb") as f:
            sha, size = _digest(f)
        manifest["files"][p.relative_to(stage).as_posix()] = {"sha256": sha, "size": size}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n")


def _rows(tables: dict[str, dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """A table's rows as dicts; DuckDB's union_by_name also reads partitions written with fewer columns."""
    import duckdb

    if table not in tables:
        return []
    rel = duckdb.connect().sql(f"SELECT * FROM {tables[table]['source']}")
    return [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]


def _resolve_store(run: Path, store: str) -> Path | None:
    """Eval writes the store path as given on its command line: relative to where it ran, or to the run."""
    return next((p for p in (Path(store), run / store) if p.is_dir()), None)


def _store_attrs(run: Path, store: str) -> dict[str, Any] | None:
    import zarr

    path = _resolve_store(run, store)
    try:
        attrs = zarr.open_group(str(path) if path else store, mode="r").attrs.asdict()
    except Exception:  # a store that moved or an unreachable URL: the records still stand on their own
        return None
    return json.loads(json.dumps(attrs, default=str))


def _copy_recon(run: Path, stores: list[str], sae_ids: list[str], dest: Path) -> None:
    import zarr

    if len(stores) != 1:
        raise UsageError(f"--with-recon packs one eval store, and the records name {len(stores)}; drop --with-recon")
    src = _resolve_store(run, stores[0])
    if src is None:
        raise StoreError(f"eval store {stores[0]} not found; run from the directory eval ran in, or drop --with-recon")
    found = [i for i in sorted(sae_ids) if (src / "recon" / i).is_dir()]
    if not found:
        raise StoreError(
            f"{stores[0]} holds no reconstructions of these SAEs; re-run `actstore eval` or drop --with-recon"
        )
    group = zarr.open_group(str(dest), mode="w", zarr_format=3)
    note = f"tokens and recon/ of {stores[0]} for this bundle's SAEs; acts/ left out"
    group.attrs.update({**zarr.open_group(str(src), mode="r").attrs.asdict(), "actstore_bundle": note})
    shutil.copytree(src / "tokens", dest / "tokens")
    (dest / "recon").mkdir()
    shutil.copy2(src / "recon" / "zarr.json", dest / "recon" / "zarr.json")
    for sae_id in found:
        shutil.copytree(src / "recon" / sae_id, dest / "recon" / sae_id)


def _describe(stage: Path) -> dict[str, dict[str, Any]]:
    """Per table: its glob (relative to the bundle), partition keys, file and row counts, and a DuckDB source."""
    import duckdb

    con, tables = duckdb.connect(), {}
    for table_dir in sorted(p for p in rundir.records_dir(stage).iterdir() if p.is_dir()):
        parts = sorted(table_dir.rglob("*.parquet"))
        dirs = parts[0].relative_to(table_dir).parts[:-1]
        glob = "/".join(["records", table_dir.name, *["*"] * len(dirs), "*.parquet"])
        keys = [d.split("=")[0] for d in dirs if "=" in d]
        where = str(stage.resolve() / glob).replace("'", "''")
        source = f"read_parquet('{where}', {bundle_readme.read_options(keys)})"
        tables[table_dir.name] = {
            "glob": glob,
            "source": source,
            "keys": keys,
            "files": len(parts),
            "rows": con.execute(f"SELECT count(*) FROM {source}").fetchone()[0],
        }
    return tables


def _add_sql(stage: Path, tables: dict[str, dict[str, Any]]) -> None:
    """`sql/`: the named queries and their macros as shipped; `views.sql`: the records as views, then the macros."""
    (stage / "sql").mkdir()
    for src in sorted(files("actstore.sql").iterdir(), key=lambda p: p.name):
        if src.name.endswith(".sql"):
            (stage / "sql" / src.name).write_bytes(src.read_bytes())
    (stage / VIEWS).write_text(bundle_readme.views_sql(tables, (stage / "sql" / "_macros.sql").read_text()))


def _pack(stage: Path, archive: Path, kind: str) -> None:
    names = sorted((p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file()),
                   key=lambda n: (n not in (MANIFEST, "README.md", VIEWS), n))  # fmt: skip
    if kind == ".tar":
        with tarfile.open(archive, "w") as tf:
            for name in names:
                tf.add(stage / name, arcname=name)
    else:  # stored, not deflated: Parquet and Zarr chunks are compressed already
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for name in names:
                zf.write(stage / name, arcname=name)


def _members(out: str) -> Iterator[tuple[str, int, Callable[[], IO[bytes]]]]:
    """(name, size, opener) of every file of a bundle, whatever holds it."""
    path = Path(out)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield p.relative_to(path).as_posix(), p.stat().st_size, lambda p=p: open(p, "rb")
    elif path.suffix == ".tar":
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile():
                    yield m.name.removeprefix("./"), m.size, lambda m=m: tf.extractfile(m)
    elif path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, lambda info=info: zf.open(info)
    else:
        raise OSError(f"not a directory, .tar or .zip: {out}")


def _digest(f: IO[bytes]) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    while chunk := f.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size

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

Bundles travel between people, so a bundle received is untrusted input. Before anything is extracted, every
member of an archive is screened (a name that climbs out or is absolute, a link, a device or fifo, a member
count or declared size that would fill the disk, a zip member compressed past any real data's ratio) and one
bad member refuses the whole archive; members are then stream-copied, each held to its declared size, into a
temporary directory that is verified against the manifest before it is renamed into the cache. A bundle
directory is refused if it holds a symlink or a special file, and is verified before it is queried. Queries
always come from the installed package: a bundle's `sql/` and `views.sql` are for bare-DuckDB users only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path
from typing import IO, Any

from actstore import __version__, atomic, bundle_readme, diskspace, objstore
from actstore import run as rundir
from actstore.errors import StoreError, UsageError
from actstore.tables import SCHEMA_VERSION

MANIFEST = "manifest.json"
VIEWS = "views.sql"
ARCHIVES = (".tar", ".zip")
MAX_BYTES_ENV = "ACTSTORE_BUNDLE_MAX_BYTES"  # the most an archive may unpack to (also capped by free space)
MAX_MEMBERS_ENV = "ACTSTORE_BUNDLE_MAX_MEMBERS"
DEFAULT_MAX_BYTES = 32 << 30  # a bundle with SAE weights and reconstructions fits many times over
DEFAULT_MAX_MEMBERS = 200_000  # a Zarr store of reconstructions is the only thing with many files
FREE_MARGIN = 256 << 20  # an extraction leaves at least this much of its disk free
MAX_RATIO, RATIO_FLOOR = 1000, 1 << 20  # a zip member over 1 MiB compressed past 1000:1 is a bomb, not data
_ASK = "ask its sender to re-create it with `actstore bundle create`"
_REFUSED = "a bundle holds only plain files inside itself; " + _ASK
_verified: dict[Path, tuple] = {}  # a bundle directory -> the stat signature it had when it last verified


def create(run: str, out: str, *, with_saes: bool = False, with_recon: bool = False, overwrite: bool = False) -> Path:
    """Pack RUN's records (and optionally its SAE weights and reconstructions) into OUT: a directory, a .tar or
    a .zip. Built aside and renamed into place, so a failed create leaves any old OUT as it was.

    RUN may be a run URL (its verified local copy is packed); an OUT URL must name a .tar or .zip, built in
    the cache and uploaded as one object (a single PUT: the old object, if any, stays until it completes);
    the local archive is returned."""
    if objstore.is_url(run):
        run = str(objstore.run_view(run))
    if objstore.is_url(out):
        if Path(out).suffix not in ARCHIVES:
            raise UsageError(f"{out}: a bundle on object storage is one object; give OUT ending in .tar or .zip")
        objstore.check(out, write=True)
        if not overwrite and objstore.exists(out):
            raise UsageError(f"{out} already exists; pass --overwrite to replace it")
        local = objstore.cache_root() / "outgoing" / objstore.url_key(out) / Path(out).name
        made = create(run, str(local), with_saes=with_saes, with_recon=with_recon, overwrite=True)
        objstore.upload(made, out, overwrite=True)
        return made
    with diskspace.guard(out, lambda: _bundle_bytes(Path(run), Path(out), with_saes)):
        return _create(run, out, with_saes=with_saes, with_recon=with_recon, overwrite=overwrite)


def _bundle_bytes(run: Path, out: Path, with_saes: bool) -> int:
    """The records (and SAE weights) a bundle copies; twice that for an archive, packed from a staged copy."""
    files = _record_files(run) + (list(rundir.saes_dir(run).rglob("*")) if with_saes else [])
    size = sum(f.stat().st_size for f in files if f.is_file())
    return size * (2 if out.suffix in ARCHIVES else 1)


def _create(run: str, out: str, *, with_saes: bool, with_recon: bool, overwrite: bool) -> Path:
    run_dir, dest = Path(run), Path(out)
    if not run_dir.is_dir():
        raise UsageError(f"no run directory {run}; give the directory `actstore train --out` wrote")
    parts = _record_files(run_dir)
    rundir.check_records(run_dir)  # a manifest must never bless a file that was damaged in the run
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
    """What differs between the bundle at OUT (directory, .tar or .zip) and its manifest; empty when intact.

    A member `open_bundle` would refuse (a link, a name outside the bundle, …) is reported first, alone.
    A URL is downloaded into the cache first and checked there."""
    if objstore.is_url(out):
        local = str(objstore.download(out))
        return [p.replace(local, out) for p in verify(local)]
    path = Path(out)
    try:
        if path.is_dir():
            _scan(path, out)
        elif path.is_file() and path.suffix in ARCHIVES:
            _screen(path)
    except StoreError as exc:
        return [str(exc)]
    except (OSError, zipfile.BadZipFile, tarfile.TarError):
        pass  # reported below as unreadable
    return _compare(out)


def _compare(out: str, label: str | None = None) -> list[str]:
    """verify's comparison, naming the bundle LABEL (the archive an extraction came from) in its messages."""
    label = label or out
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
        return [f"{label} cannot be read ({exc}); re-create it with `actstore bundle create`"]
    if manifest_bytes is None:
        return [f"{label} has no {MANIFEST}; it is not a bundle, or re-create it with `actstore bundle create`"]
    try:
        listed = {name: (meta["sha256"], meta["size"]) for name, meta in json.loads(manifest_bytes)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST} of {label} is unreadable; re-create the bundle with `actstore bundle create`"]
    problems = []
    for name, (sha, size) in sorted(listed.items()):
        got = found.get(name)
        name = _shown(name)
        if got is None:
            problems.append(f"missing: {name}")
        elif isinstance(got, str):
            problems.append(f"damaged: {name} ({got})")
        elif got[1] != size:
            problems.append(f"changed: {name} ({got[1]} bytes, the manifest says {size})")
        elif got[0] != sha:
            problems.append(f"changed: {name} (sha256 differs from the manifest)")
    problems += [f"extra: {_shown(name)} (not in the manifest)" for name in sorted(found.keys() - listed.keys())]
    return problems


def _shown(name: str) -> str:
    """A file name as printed in a problem: quoted when it holds a newline or other control character (the
    manifest's names are the sender's), so every problem stays one line."""
    return name if name.isprintable() else repr(name)


def open_bundle(path: str) -> Path:
    """The directory holding a bundle's `records/`: PATH itself, or a .tar/.zip extracted once into a cache
    keyed by the archive's path, inode, times and size (so a replaced archive is extracted afresh).

    A bundle (directory, or the cache of an archive) is verified against its manifest on every open, so what is
    queried is what its sender packed; a directory without manifest.json or views.sql is a run, taken as is."""
    if objstore.is_url(path):
        path = str(objstore.fetch(path))
    src = Path(path)
    if src.is_dir():
        if os.path.lexists(src / MANIFEST) or os.path.lexists(src / VIEWS):
            _check_tree(src, path)
        return src
    if not src.is_file() or src.suffix not in ARCHIVES:
        raise UsageError(
            f"{path} is not a run, a bundle directory, .tar or .zip; make one with `actstore bundle create`"
        )
    st = src.stat()
    signature = f"{src.resolve()}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_size}"
    cache = _cache_root() / f"{src.stem}-{hashlib.sha256(signature.encode()).hexdigest()[:16]}"
    if cache.is_dir():
        try:
            _check_tree(cache, path)
            return cache
        except StoreError:  # changed since it was extracted (a /tmp cleaner, say): extract it afresh
            _discard(cache)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=cache.name + ".")).resolve()
    try:
        _extract(src, tmp)
        _check_tree(tmp, path)  # before the rename: a damaged archive leaves no cache behind
        os.replace(tmp, cache)  # not atomic.swap_in: a cache a concurrent opener put there first stays
        _verified[cache.resolve()] = _verified.pop(tmp)  # a rename changes no file's inode or times
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise StoreError(f"{path} cannot be extracted ({exc}); check it with `actstore bundle verify`") from None
    except OSError as exc:
        if not cache.is_dir():  # else a concurrent opener got there first, and its copy serves
            raise StoreError(f"cannot extract {path} into {cache.parent} ({exc}); free space or set TMPDIR") from None
        _check_tree(cache, path)
    finally:
        atomic.remove(tmp)
    return cache


def _check_tree(root: Path, label: str) -> None:
    """A one-line StoreError unless the bundle directory ROOT holds only plain files and matches its manifest.

    Hashing costs about 3-5 s per GB (200 MB: 0.6-0.9 s on a busy 2-core box), so a tree whose every file has
    the inode, size and times it had when it last verified in this process (a report opens its bundle once per
    query) is not hashed again: the stat walk alone takes 0.1 s for 2,000 files."""
    key, signature = root.resolve(), _scan(root, label)
    if _verified.get(key) == signature:
        return
    problems = _compare(str(root), label)
    if problems:
        _verified.pop(key, None)
        if not problems[0].startswith(("missing:", "damaged:", "changed:", "extra:")):
            raise StoreError(problems[0])  # no manifest, or one that does not parse
        more = f", and {len(problems) - 1} more" if problems[1:] else ""
        raise StoreError(
            f"{label} does not match its manifest ({problems[0]}{more}); see `actstore bundle verify {label}`, "
            "and ask for it again or re-create it with `actstore bundle create`"
        )
    _verified[key] = signature


def _scan(root: Path, label: str) -> tuple:
    """The stat signature of every file under ROOT; a StoreError on a symlink (it could point anywhere), a
    fifo or device (a reader would hang or read a disk), or a name with a control character."""
    signature = []
    for here, dirs, names in os.walk(root):
        for name in dirs + names:
            p = Path(here) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            why = (
                "has a control character in its name" if not name.isprintable()
                else f"is a symlink (to {os.readlink(p)!r})" if stat.S_ISLNK(st.st_mode)
                else None if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)
                else "is a device, fifo or socket, not a plain file"
            )  # fmt: skip
            if why:
                raise StoreError(f"refusing {label}: {rel!r} {why}; {_REFUSED}")
            if stat.S_ISREG(st.st_mode):
                signature.append((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(signature))


def _cache_root() -> Path:
    """Where archives are extracted: a directory only this user can write, so no one else can plant or change
    an extraction between its verification and its query."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    root = Path(tempfile.gettempdir()) / ("actstore-bundles" if uid is None else f"actstore-bundles-{uid}")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or (uid is not None and (st.st_uid != uid or st.st_mode & 0o022)):
        raise StoreError(f"{root} is not a private directory of this user; remove it, or set TMPDIR elsewhere")
    return root


def _discard(path: Path) -> None:
    """Move a stale cache aside first, so that a concurrent opener never sees it half deleted."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".stale."))
    try:
        os.replace(path, aside / "tree")
    except OSError:
        pass  # a concurrent opener moved it already
    atomic.remove(aside)
    _verified.pop(path.resolve(), None)


def _limit(env: str, default: int) -> int:
    text = os.environ.get(env, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) <= 0:
        raise UsageError(f"{env}={text!r} is not a positive whole number; unset it or give one")
    return int(text)


def _entries(archive: tarfile.TarFile | zipfile.ZipFile) -> Iterator[tuple[str, str, int, int, Any]]:
    """(name, kind, declared size, compressed size, entry) of every member, kind one of file, dir, symlink,
    hardlink, special (device, fifo, …) or encrypted."""
    if isinstance(archive, tarfile.TarFile):
        for m in archive:
            kind = (
                "symlink" if m.issym() else "hardlink" if m.islnk() else "dir" if m.isdir()
                else "file" if m.isfile() else "special"
            )  # fmt: skip
            yield m.name, kind, m.size, m.size, m
        return
    for info in archive.infolist():
        mode = stat.S_IFMT(info.external_attr >> 16)
        kind = (
            "symlink" if mode == stat.S_IFLNK else "dir" if info.is_dir() or mode == stat.S_IFDIR
            else "encrypted" if info.flag_bits & 0x1 else "file" if mode in (0, stat.S_IFREG) else "special"
        )  # fmt: skip
        yield info.filename, kind, info.file_size, info.compress_size, info


_KINDS = {
    "symlink": "is a symlink",
    "hardlink": "is a hard link",
    "special": "is a device, fifo or other special file",
    "encrypted": "is encrypted",
}


@contextmanager
def _opened(src: Path) -> Iterator[tuple[Iterator[tuple[str, str, int, int, Any]], Callable[[Any], Any]]]:
    """The members of the archive SRC (see `_entries`) and the function that opens one for reading."""
    if src.suffix == ".tar":
        with tarfile.open(src) as tf:
            yield _entries(tf), tf.extractfile
    else:
        with zipfile.ZipFile(src) as zf:
            yield _entries(zf), zf.open


def _screen(src: Path) -> None:
    """verify's look at an archive's members: what `_check_members` refuses, but no size cap (nothing is written)."""
    with _opened(src) as (entries, _):
        _check_members(src, entries, None)


def _check_members(
    src: Path, entries: Iterator[tuple[str, str, int, int, Any]], room: tuple[int, int, Path] | None
) -> list[tuple[str, int, Any]]:
    """Every file member as (safe relative name, declared size, entry), after checking them all: a one-line
    StoreError naming the first member that is not a plain file or directory inside the bundle, or that takes
    the member count or (given ROOM: the cap, the free bytes and where) the declared size past its limit."""
    max_members = _limit(MAX_MEMBERS_ENV, DEFAULT_MAX_MEMBERS)
    files: list[tuple[str, int, Any]] = []
    seen: set[str] = set()
    total = 0

    def refuse(member: str, why: str, advice: str = _REFUSED) -> StoreError:
        return StoreError(f"refusing {src}: member {member!r} {why}; {advice}")

    for count, (raw, kind, size, packed, entry) in enumerate(entries, start=1):
        if count > max_members:
            raise refuse(raw, f"is past {max_members} members (raise {MAX_MEMBERS_ENV} if you trust the archive)", _ASK)
        name = _safe_name(raw)
        if not isinstance(name, tuple):
            raise refuse(raw, name)
        if kind in _KINDS:
            link = f" (to {entry.linkname!r})" if isinstance(entry, tarfile.TarInfo) and entry.linkname else ""
            raise refuse(raw, _KINDS[kind] + link)
        joined = "/".join(name)
        if kind == "dir":
            continue
        if joined in seen:
            raise refuse(raw, "appears twice")
        seen.add(joined)
        if size > RATIO_FLOOR and size > MAX_RATIO * max(packed, 1):
            raise refuse(raw, f"unpacks {packed} bytes to {size} (over {MAX_RATIO}:1): a zip bomb", _ASK)
        total += size
        if room is not None:
            cap, free, where = room
            if total > cap:
                raise refuse(
                    raw, f"takes the archive past {cap} bytes unpacked (raise {MAX_BYTES_ENV} if you trust it)", _ASK
                )
            if total > free:
                raise StoreError(
                    f"cannot extract {src}: member {raw!r} takes it past the {free} bytes free in {where}; "
                    "free space or set TMPDIR"
                )
        files.append((joined, size, entry))
    parents = {"/".join(n.split("/")[:i]) for n, _, _ in files for i in range(1, n.count("/") + 1)}
    for name, _, _ in files:
        if name in parents:
            raise refuse(name, "is both a file and a directory")
    return files


def _safe_name(raw: str) -> tuple[str, ...] | str:
    """The path components of a member name that stays inside the extraction, or why it would not."""
    if not raw or not raw.isprintable():
        return "has an empty name or a control character in it"
    if "\\" in raw:
        return "has a backslash in its name (a Windows path)"
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        return "is an absolute path"
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        return "climbs out of the bundle with '..'"
    if not parts:
        return "names the bundle itself, not a file in it"
    return parts


def _extract(src: Path, dest: Path) -> None:
    """Copy every member of the screened archive SRC into DEST, each held to its declared size (the sizes
    summed within the cap, so the copy does too, whatever the headers claimed)."""
    room = (_limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES), max(shutil.disk_usage(dest).free - FREE_MARGIN, 0), dest.parent)
    with _opened(src) as (entries, opener):
        members = _check_members(src, entries, room)  # every member, before the first byte is written
        _copy(src, members, opener, dest)


def _copy(src: Path, members: list[tuple[str, int, Any]], opener: Callable[[Any], Any], dest: Path) -> None:
    for name, size, entry in members:
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL and O_NOFOLLOW: never write through anything already there; 0o644: nothing extracted runs
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        written = 0
        with open(fd, "wb") as out, opener(entry) as f:
            while chunk := f.read(min(1 << 20, size - written + 1)):
                written += len(chunk)
                if written > size:
                    raise StoreError(
                        f"refusing {src}: member {name!r} holds more than the {size} bytes its header declares; " + _ASK
                    )
                out.write(chunk)
        if written < size:
            raise StoreError(
                f"{src} cannot be extracted: member {name!r} ends before its {size} bytes; "
                "check it with `actstore bundle verify`"
            )


def listing(out: str) -> dict[str, int]:
    """Name and size of every file of a bundle (directory, .tar or .zip), the manifest included."""
    if objstore.is_url(out):
        out = str(objstore.download(out))
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
    if src is None and objstore.is_url(stores[0]):  # a store on object storage: the parts packed, fetched first
        src = objstore.download_tree(
            stores[0], ["zarr.json", "tokens", "recon/zarr.json", *(f"recon/{i}" for i in sae_ids)]
        )
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

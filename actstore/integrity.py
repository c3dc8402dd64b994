"""Checksums of what we write, so a flipped byte is an error naming the file rather than a wrong number.

Why: Parquet pages, safetensors and torch checkpoints carry no checksum that their readers check (a byte
flipped in a checkpoint's tensor loads silently; measured), and Zarr chunks have crc32c only because the
store asks for it. Every directory we write whole — a records partition, an SAE directory, a checkpoint
— gets a `SHA256SUMS` file in `sha256sum`'s format (so `sha256sum -c SHA256SUMS` checks it by hand too),
written inside the staging directory before the rename: the sums and the files appear together. Readers
call `check` first. A directory without sums (written by an older version) is read as it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from actstore.errors import StoreError

SUMS = "SHA256SUMS"
_verified: dict[tuple[str, int, int, int], str] = {}  # (path, inode, size, mtime_ns) -> digest seen intact


def digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_sums(directory: Path) -> dict[str, str] | None:
    """name -> sha256 listed in DIRECTORY/SHA256SUMS; None when there is none."""
    path = directory / SUMS
    if not path.is_file():
        return None
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        hexdigest, _, name = line.partition("  ")
        if len(hexdigest) != 64 or not name:
            raise StoreError(f"{path} is damaged (a line is not '<sha256>  <name>'); {_fix(directory)}")
        sums[name] = hexdigest
    return sums


def seal(directory: Path, known: dict[str, str] | None = None) -> None:
    """Write DIRECTORY/SHA256SUMS for every regular file in it. `known` gives digests already checked
    (files carried over from a previous version), so they are not re-hashed and a damaged one is not
    blessed."""
    known = known or {}
    lines = []
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != SUMS):
        lines.append(f"{known.get(path.name) or digest(path)}  {path.name}\n")
    (directory / SUMS).write_text("".join(lines))


def check(directory: Path, names: list[str] | None = None, fix: str | None = None) -> dict[str, str]:
    """Raise a one-line StoreError naming the first listed file (or of `names`) that is missing or
    differs from DIRECTORY/SHA256SUMS; return the sums (empty when the directory has none).

    A file seen intact before in this process (same inode, size and mtime) is not hashed again."""
    sums = read_sums(directory)
    if sums is None:
        return {}
    for name in sorted(sums if names is None else set(names) & set(sums)):
        path = directory / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StoreError(f"{path} is missing (listed in {SUMS}); {fix or _fix(directory)}") from None
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        if _verified.get(key) == sums[name]:
            continue
        if digest(path) != sums[name]:
            raise StoreError(f"{path} is damaged (its sha256 differs from {SUMS}); {fix or _fix(directory)}")
        _verified[key] = sums[name]
    return sums


def _fix(directory: Path) -> str:
    """What to do about a damaged file, by where it lives in a run."""
    parts = directory.parts
    if "records" in parts:
        return "delete that partition directory and re-run the command that wrote it (eval, train or darkmatter)"
    if "saes" in parts:
        return f"delete {directory} and re-run `actstore train` to retrain that SAE"
    return f"delete {directory} and re-run the command that wrote it"

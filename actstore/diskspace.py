"""A full disk is a one-line error naming where and about how much more is needed, never a traceback.

Why: a harvest or sweep left overnight on a shared node meets a full scratch disk sooner or later. Every
writer already writes aside and renames (actstore/atomic.py) and commits a store's batches only once
written, so nothing committed is damaged and the same command resumes once space is freed; what was
missing is telling the user so. `guard` turns ENOSPC/EDQUOT, from wherever it was raised (a zarr write in
the harvest's writer thread, a torch.save, a Parquet write), into that error, with the command's own
estimate of the space it still needs.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from actstore.errors import StoreError

FULL = (errno.ENOSPC, errno.EDQUOT)
# Libraries with their own I/O (polars' Parquet writer, DuckDB) report a full disk in their own exception
# types; the OS's message is what they keep.
FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), f"os error {errno.ENOSPC}")


def full_error(exc: BaseException | None) -> OSError | None:
    """The 'no space left' or 'quota exceeded' error EXC is, or was raised from; None when neither."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return exc
        if not isinstance(exc, OSError) and any(text in str(exc) for text in FULL_TEXT):
            return OSError(errno.ENOSPC, str(exc))
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds PATH (or its nearest existing parent); None for URLs."""
    if "://" in str(path):
        return None
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _inside(path: str | Path, *names: object) -> str | Path:
    """The file the failed write named when it lies under PATH (a copy names its source, not where it
    was writing), else PATH."""
    root = Path(str(path)).absolute()
    for name in names:
        if isinstance(name, str) and (Path(name).absolute() == root or root in Path(name).absolute().parents):
            return name
    return path


@contextmanager
def guard(path: str | Path, needed: Callable[[], int | None] | None = None) -> Iterator[None]:
    """Run the block; a full disk under it becomes a one-line StoreError naming PATH, the free space and
    `needed()` (an estimate of the bytes the command still has to write, when it can tell)."""
    try:
        yield
    except BaseException as exc:
        full = full_error(exc)
        if full is None:
            raise
        try:
            more = needed() if needed else None
        except Exception:  # an estimate must never hide the real error
            more = None
        where = _inside(path, full.filename, full.filename2)
        free = free_bytes(where)
        room = f"{human(free)} free" if free is not None else "the device is full"
        want = f", about {human(more)} more needed" if more else ""
        raise StoreError(
            f"no space left writing {where} ({room}{want}); free space or choose another path, then re-run the "
            "same command (what was committed is kept)"
        ) from None

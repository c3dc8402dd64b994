"""One writer at a time per store and per run: an advisory lock the operating system releases on death.

Why: two harvests into one store, or a train and an eval into one run, would interleave commits and
records. Each writing command takes an exclusive `flock` on a small file beside what it writes (a store:
`.<name>.writer.lock` in its parent directory, so replacing the store whole never moves the lock; a run:
`RUN/.writer.lock`). The kernel drops the lock when the holder exits or is killed, so a lock left by a
killed process is simply free again; the file records the holder's pid for the refusal message. Local
filesystems only: a store URL (object storage) is not locked, and a run URL never reaches here (its commands
work in a local copy, actstore/objstore.py, which is locked like any run).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from actstore.errors import UsageError


def lock_path(target: str | Path, kind: str) -> Path | None:
    """Where the lock of a store or run lives; None for a URL."""
    text = str(target)
    if "://" in text:
        return None
    p = Path(text).absolute()
    return p / ".writer.lock" if kind == "run" else p.parent / f".{p.name}.writer.lock"


@contextmanager
def exclusive(target: str | Path, kind: str, command: str) -> Iterator[None]:
    """Hold the writer lock of `target` (a "store" or a "run") for the block, or a one-line UsageError
    naming the process that holds it."""
    path = lock_path(target, kind)
    if path is None and kind == "run":  # a run URL is worked on in a local copy (objstore.run_copy), never here
        raise UsageError(f"{target}: `{command}` cannot write a run on object storage; give a local directory")
    if path is None:
        yield
        return
    refusal = f"{target} is being written by {{holder}}; wait for it to finish (or stop it) before `{command}`"
    with flocked(path, command, refusal, what=f"cannot write {target}"):
        yield


@contextmanager
def flocked(path: Path, command: str, refusal: str, *, wait: bool = False, what: str = "") -> Iterator[None]:
    """An exclusive `flock` on the file `path` for the block, with this process written in it as the holder.

    Held by another process: with `wait` block until it is free, else raise UsageError(`refusal` with
    {holder} filled in). Unopenable: UsageError("`what`: the reason at the directory; choose another path").
    The one owner of the lock files' protocol: the writer locks here and a run copy's lock (actstore/objstore.py).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(
            f"{what or f'cannot lock {path}'}: {exc.strerror or exc} at {path.parent}; choose another path"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(refusal.replace("{holder}", holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({command})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def exclusive_all(command: str, *targets: tuple[str | Path, str]) -> Iterator[None]:
    """Several writer locks at once (eval writes a run and its store's reconstructions)."""
    with ExitStack() as stack:
        for target, kind in targets:
            stack.enter_context(exclusive(target, kind, command))
        yield

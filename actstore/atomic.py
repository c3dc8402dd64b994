"""Write aside, then rename into place: the one way anything durable is replaced.

Why: a killed or failed write must leave the old file or directory as it was. Every writer (records,
SAE directories, checkpoints, reports, bundles, a store replaced with --overwrite) builds its output at
`NAME.partial` and swaps it in with `swap_in`; readers skip the `.partial` and `.old` names. A rename is
atomic on one POSIX filesystem; for a directory replacing a directory the old one is moved to `.old`
first, so at every moment either the old or the new one is at NAME (a kill in between leaves `.old`,
which the next writer removes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAGE = ".partial"
OLD = ".old"
# Called with the final paths after every `replacing` block swapped them in: a run on object storage commits
# them there (actstore/objstore.py). Empty for local runs.
after_replace: list[Callable[[list[Path]], None]] = []


def staged(path: Path) -> Path:
    """Where `path` is built before it is swapped in."""
    return path.with_name(path.name + STAGE)


def remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def swap_in(stage: Path, final: Path) -> None:
    """Move the finished `stage` to `final`, replacing whatever was there only now."""
    old = final.with_name(final.name + OLD)
    remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    remove(old)


@contextmanager
def replacing(*finals: Path) -> Iterator[list[Path]]:
    """Staging paths for `finals`; when the block ends without error all are swapped in together.

    On an error the staged paths are removed and every final path keeps its old content.
    """
    stages = [staged(f) for f in finals]
    for stage in stages:
        remove(stage)
        stage.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield stages
    except BaseException:
        for stage in stages:
            remove(stage)
        raise
    for stage, final in zip(stages, finals, strict=True):
        swap_in(stage, final)
    for hook in list(after_replace):
        hook(list(finals))


def write_bytes(path: Path, data: bytes) -> None:
    """A small file (JSON, a manifest) replaced whole."""
    with replacing(path) as (stage,):
        stage.write_bytes(data)


def recover(root: Path) -> None:
    """Tidy what killed writers left under ROOT: a `.partial` is removed (it was never complete); an `.old`
    whose final is missing (killed between swap_in's two renames) is renamed back, else removed. Only a
    writer holding ROOT's lock may call it: a live writer's staging looks the same."""
    if not root.is_dir():
        return
    for path in sorted(root.rglob(f"*{OLD}"), key=lambda p: len(p.parts)):
        final = path.with_name(path.name[: -len(OLD)])
        if path.exists() and not final.exists():
            os.replace(path, final)
        else:
            remove(path)
    for path in sorted(root.rglob(f"*{STAGE}"), key=lambda p: len(p.parts)):
        remove(path)


def is_staging(name: str) -> bool:
    """True for names a writer leaves behind when it is killed: never read them as results."""
    return name.endswith((STAGE, OLD))

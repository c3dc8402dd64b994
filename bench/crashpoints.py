"""Crash-point sweep: stop each command just before its Nth change to the filesystem, for many N, re-run it,
and compare with an uninterrupted run.

    python bench/crashpoints.py                          # up to 30 points for each of the six commands
    python bench/crashpoints.py --commands harvest --points 0   # every point of one command

Why: bench/chaos.py kills at random moments, so a window a few microseconds wide (a kill inside the store's
first `zarr.json` write) turns up once in many runs, on some machine, as a flaky failure. This sweep stops
the command at every place it changes the files, deterministically: a Python audit hook counts the changes
made under the working directory (opening a file to write, rename/replace, remove, mkdir, rmdir, rmtree)
and at the Nth one ends the process with `os._exit` before that change happens, which no `finally`, atexit
handler or flush survives, as with SIGKILL. Threads' changes count too (their order may vary from run to
run, which only moves the points). Writes made by native code (Parquet, DuckDB, torch.save on a path) fire
no audit event: they are covered by the renames that publish them.

The re-run must exit 0 and give what an uninterrupted run gives, by bench/chaos.py's fingerprints. Prints
one line per point and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CRASHED = 97  # the child's exit status when it stopped itself at its point
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# audit event -> positions of its path arguments
_CHANGES = {
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.truncate": (0,),
    "os.link": (0, 1),
    "os.symlink": (0, 1),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.move": (0, 1),
}


def _under(arg: Any, prefix: str) -> bool:
    if isinstance(arg, int) or arg is None:
        return False
    try:
        return os.path.abspath(os.fsdecode(arg)).startswith(prefix)
    except TypeError:
        return False


def _is_change(event: str, args: tuple[Any, ...], prefix: str) -> bool:
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        return writes and _under(path, prefix)
    positions = _CHANGES.get(event)
    return positions is not None and any(_under(args[i], prefix) for i in positions if i < len(args))


def child(stop_at: int, live: str, count_file: str, argv: list[str]) -> None:
    """Run `actstore ARGV` in this process, counting its changes under LIVE; stop before change STOP_AT
    (0: never, and write the count to COUNT_FILE at exit)."""
    import atexit
    import threading

    prefix = os.path.abspath(live) + os.sep
    seen = [0]
    lock = threading.Lock()
    trace = bool(os.environ.get("CRASHPOINTS_TRACE"))  # list the changes as they come, to place a point

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event != "open" and event not in _CHANGES:
            return
        if not _is_change(event, args, prefix):
            return
        with lock:
            seen[0] += 1
            if trace:
                print(f"change {seen[0]}: {event} {args[:2]}", file=sys.stderr, flush=True)
            if seen[0] == stop_at:
                os._exit(CRASHED)

    if count_file:
        atexit.register(lambda: Path(count_file).write_text(str(seen[0])))
    sys.argv = ["actstore", *argv]
    sys.addaudithook(hook)
    runpy.run_module("actstore.cli.main", run_name="__main__", alter_sys=True)


def _child_argv(case_argv: list[str], stop_at: int, live: Path, count_file: str = "") -> list[str]:
    args = case_argv[3:]  # [python, -m, actstore.cli.main, ...]
    return [sys.executable, __file__, "--child", str(stop_at), str(live), count_file, "--", *args]


def points_to_try(total: int, budget: int) -> list[int]:
    """Which changes to stop before: all of them within BUDGET (0: no limit), else the first and last third
    of the budget (where stores and runs are laid out and published) and the rest spread evenly between."""
    if budget <= 0 or total <= budget:
        return list(range(1, total + 1))
    edge = budget // 3
    head, tail = list(range(1, edge + 1)), list(range(total - edge + 1, total + 1))
    inner = budget - 2 * edge
    lo, hi = edge + 1, total - edge
    middle = [lo + round(i * (hi - lo) / max(inner - 1, 1)) for i in range(inner)]
    return sorted(set(head + middle + tail))


def sweep(name: str, budget: int, root: Path, log: Any = print, only: list[int] | None = None) -> dict[str, Any]:
    """One command's sweep: its changes counted in an uninterrupted run, then a stop before each chosen one
    (ONLY: these points, those past the count dropped)."""
    import chaos

    case, fx, live = chaos.CASES[name], chaos.build_fixtures(root), root / "live"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    chaos._reset(case, fx, live)
    count_file = str(root / "count")
    t0 = time.perf_counter()
    subprocess.run(_child_argv(case.argv(live), 0, live, count_file), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    total_s = time.perf_counter() - t0
    total = int(Path(count_file).read_text())
    want = case.fingerprint(live)
    points = [n for n in only if n <= total] if only is not None else points_to_try(total, budget)
    failures, stopped = [], 0
    for n in points:
        chaos._reset(case, fx, live)
        run = subprocess.run(_child_argv(case.argv(live), n, live), cwd=REPO, env=env, capture_output=True, text=True)
        if run.returncode not in (0, CRASHED):
            failures.append({"point": n, "problem": f"the stopped run exited {run.returncode}: {run.stderr[-300:]}"})
            continue
        stopped += run.returncode == CRASHED
        problem = chaos.rerun_and_compare(case, live, want, env)
        if problem is not None:
            failures.append({"point": n, "problem": problem})
        log(f"  {name} stop before change {n}/{total}: {'ok' if problem is None else 'FAILED: ' + problem}")
    shutil.rmtree(live, ignore_errors=True)
    return {
        "command": name, "changes": total, "points": len(points), "stopped": stopped,
        "survived": len(points) - len(failures), "uninterrupted_s": round(total_s, 2), "failures": failures,
    }  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        stop_at, live, count_file, sep, *argv = sys.argv[2:]
        assert sep == "--"
        child(int(stop_at), live, count_file, argv)
        return
    import chaos

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=30, help="Stop points per command (0: every change).")
    ap.add_argument(
        "--commands", default=",".join(chaos.CASES), help="Comma-separated subset of " + ", ".join(chaos.CASES)
    )
    ap.add_argument("--workdir", default=None, help="Where to work (default: a temporary directory, removed).")
    ap.add_argument("--size", choices=list(chaos.SIZES), default="small", help="The work each command does.")
    args = ap.parse_args()
    chaos.SIZE.update(chaos.SIZES[args.size])
    names = [n for n in args.commands.split(",") if n]
    unknown = sorted(set(names) - set(chaos.CASES))
    if unknown:
        raise SystemExit(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(chaos.CASES)}")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="actstore-crashpoints-"))
    t0 = time.perf_counter()
    results = []
    try:
        for name in names:
            print(f"{name}: counting its changes, then up to {args.points or 'all'} stop points", flush=True)
            results.append(sweep(name, args.points, root, log=lambda s: print(s, flush=True)))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'command':<11} {'survived':>9} {'changes':>8}")
    for r in results:
        print(f"{r['command']:<11} {r['survived']:>4}/{r['points']:<4} {r['changes']:>8}")
    summary = {
        "crashpoints": {r["command"]: f"{r['survived']}/{r['points']}" for r in results},
        "failures": {r["command"]: r["failures"] for r in results if r["failures"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()

"""Kill campaigns: SIGKILL each command at random moments, re-run it, and compare with an uninterrupted run.

    python bench/chaos.py                         # 20 kills of each of the six commands (≈ 20–30 min, 2 cores)
    python bench/chaos.py --kills 3 --commands harvest,train

Why: "re-run the same command after an interruption" is the storage promise, and one kill point per command
in the tests does not show it holds at every moment. Each command runs first uninterrupted, in a fixed
directory (so the paths written into the records are the same), and its outputs are fingerprinted. Then,
per trial, the directory is reset to the command's inputs, the command is started and SIGKILLed at a moment
drawn uniformly (seeded) between its first write and the end of the uninterrupted run, in half the trials
killed once more while it resumes, and finally re-run to completion. The trial survives when the re-run
exits 0 and its outputs match the uninterrupted run's:

- harvest: the store bit-identical (every chunk file byte for byte; `zarr.json` less its timestamps);
- train: weights and fire counts byte-identical on CPU, cfg.json and the records equal but for wall times;
- eval, darkmatter: records equal but for wall times, reconstructions in the store bit-identical;
- report: the same files as the uninterrupted report, none empty, no staging leftovers;
- bundle: verifies against its manifest and holds the same files (its re-run passes --overwrite: a kill
  after the archive was renamed into place leaves a complete bundle, which a plain re-run refuses to replace).

Every directory's SHA256SUMS must also check. Prints survived/total per command and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOOKS = "blocks.1.hook_resid_post,blocks.3.hook_resid_post"
# Wall times are the only fields two identical runs are allowed to differ in.
VOLATILE_COLUMNS = {"train_seconds", "seconds", "created"}
VOLATILE_KEYS = {"created", "updated", "seconds"}
# The work each command does: the campaign's sizes, and a quarter of them for the tests' fast subset.
SIZES = {"full": {"harvest": "16k", "eval_store": "2k", "train": "40k", "eval_seqs": "32"},
         "small": {"harvest": "6k", "eval_store": "1k", "train": "12k", "eval_seqs": "8"}}  # fmt: skip
SIZE = dict(SIZES["full"])


def actstore(*args: str) -> list[str]:
    return [sys.executable, "-m", "actstore.cli.main", *args]


@dataclass
class Case:
    """One command of the campaign: how to lay out its inputs in LIVE, its argv, and what to compare."""

    name: str
    prepare: Callable[[Path, Path], None]  # (fixtures, live)
    argv: Callable[[Path], list[str]]
    fingerprint: Callable[[Path], Any]


def _harvest_args(out: Path, split: str, tokens: str) -> list[str]:
    return actstore(
        "harvest", str(out), "--hooks", HOOKS, "--seq-len", "64", "--tokens", tokens,
        "--batch-size", "8", "--split", split, "--quiet",
    )  # fmt: skip


def _train_args(live: Path) -> list[str]:
    return actstore(
        "train", str(live / "train.zarr"), "--out", str(live / "run"), "--hooks", HOOKS, "--k", "4,8",
        "--expansion", "4", "--tokens", SIZE["train"], "--batch-size", "256", "--checkpoint-seconds", "0.3", "--quiet",
    )  # fmt: skip


def _eval_args(live: Path) -> list[str]:
    return actstore(
        "eval", str(live / "eval.zarr"), "--run", str(live / "run"), "--batch-size", "4",
        "--max-seqs", SIZE["eval_seqs"], "--quiet",
    )  # fmt: skip


def _darkmatter_args(live: Path) -> list[str]:
    return actstore("darkmatter", str(live / "run"), "--min-pos", "8", "--quiet")


def build_fixtures(root: Path) -> Path:
    """The inputs every case starts from, made once: two stores, a trained run, an evaluated one."""
    fx = root / "fixtures"
    if (fx / "done").exists():
        return fx
    shutil.rmtree(fx, ignore_errors=True)
    fx.mkdir(parents=True)
    live = root / "live"
    shutil.rmtree(live, ignore_errors=True)
    live.mkdir()
    steps = [
        _harvest_args(live / "train.zarr", "train", SIZE["harvest"]),
        _harvest_args(live / "eval.zarr", "eval", SIZE["eval_store"]),
        _train_args(live),
    ]
    for argv in [*steps, None, _eval_args(live)]:
        if argv is None:
            shutil.copytree(live, fx / "trained")
            continue
        subprocess.run(argv, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    shutil.copytree(live, fx / "evaluated")
    (fx / "done").touch()
    shutil.rmtree(live)
    return fx


def _copy_from(name: str, parts: tuple[str, ...]) -> Callable[[Path, Path], None]:
    def prepare(fx: Path, live: Path) -> None:
        for part in parts:
            shutil.copytree(fx / name / part, live / part, symlinks=True)

    return prepare


# -- fingerprints --------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _drop(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [_drop(v) for v in obj]
    return obj


def _tree(root: Path) -> dict[str, Any]:
    """Every file under ROOT by content: Parquet as its rows less wall times, JSON less timestamps,
    anything else byte for byte. Each SHA256SUMS must check (it differs with the wall times, so it is
    checked rather than compared)."""
    import polars as pl

    from actstore import integrity

    out: dict[str, Any] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.name.endswith(".lock"):
            continue
        if path.name == integrity.SUMS:
            integrity.check(path.parent)
            out[rel] = sorted(integrity.read_sums(path.parent) or {})
        elif path.suffix == ".parquet":
            df = pl.read_parquet(path)
            df = df.drop([c for c in df.columns if c in VOLATILE_COLUMNS])
            out[rel] = hashlib.sha256(pickle.dumps(df.to_dict(as_series=False))).hexdigest()
        elif path.suffix == ".json":
            out[rel] = _drop(json.loads(path.read_text()))
        else:
            out[rel] = _sha(path)
    return out


def _leftovers(root: Path) -> list[str]:
    from actstore.atomic import is_staging

    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if is_staging(p.name))


def fp_harvest(live: Path) -> Any:
    return _tree(live / "out.zarr"), _leftovers(live)


def fp_run(live: Path) -> Any:
    return _tree(live), _leftovers(live)


def fp_report(live: Path) -> Any:
    report = live / "run" / "report"
    files = sorted(p.relative_to(report).as_posix() for p in report.rglob("*") if p.is_file())
    empty = [f for f in files if (report / f).stat().st_size == 0]
    return files, empty, _leftovers(live)


def fp_bundle(live: Path) -> Any:
    from actstore.steps.bundle import listing, verify

    out = live / "bundle.tar"
    return verify(str(out)), sorted(listing(str(out))), _leftovers(live)


CASES = {
    "harvest": Case(
        "harvest",
        lambda fx, live: None,
        lambda live: _harvest_args(live / "out.zarr", "train", SIZE["harvest"]),
        fp_harvest,
    ),
    "train": Case("train", _copy_from("trained", ("train.zarr",)), _train_args, fp_run),
    "eval": Case("eval", _copy_from("trained", ("train.zarr", "eval.zarr", "run")), _eval_args, fp_run),
    "darkmatter": Case(
        "darkmatter", _copy_from("evaluated", ("train.zarr", "eval.zarr", "run")), _darkmatter_args, fp_run
    ),
    "report": Case(
        "report",
        _copy_from("evaluated", ("run",)),
        lambda live: actstore("report", str(live / "run"), "--quiet"),
        fp_report,
    ),
    "bundle": Case(
        "bundle",
        _copy_from("evaluated", ("run",)),
        lambda live: actstore("bundle", "create", str(live / "run"), str(live / "bundle.tar"), "--overwrite"),
        fp_bundle,
    ),
}


# -- the campaign --------------------------------------------------------------------------------------


def _snapshot(root: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def _reset(case: Case, fx: Path, live: Path) -> None:
    shutil.rmtree(live, ignore_errors=True)
    live.mkdir(parents=True)
    case.prepare(fx, live)


def _timed_run(argv: list[str], live: Path) -> tuple[float, float]:
    """Wall time of an uninterrupted run and of its first write into LIVE (polled every 10 ms)."""
    before = _snapshot(live)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    while proc.poll() is None:
        if first is None and _snapshot(live) != before:
            first = time.perf_counter() - t0
        time.sleep(0.01)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"uninterrupted {argv[3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return total, first if first is not None else 0.0


def _kill_at(argv: list[str], at: float) -> bool:
    """Start ARGV, SIGKILL it AT seconds in; True when it was still running (a real kill)."""
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=at)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def campaign(name: str, kills: int, seed: int, root: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one command's campaign; returns survived, total, kills landed and the failures' descriptions."""
    case, fx, live = CASES[name], build_fixtures(root), root / "live"
    rng = random.Random(f"{seed}-{name}")
    _reset(case, fx, live)
    total_s, first_s = _timed_run(case.argv(live), live)
    want = case.fingerprint(live)
    survived, landed, failures = 0, 0, []
    for trial in range(kills):
        _reset(case, fx, live)
        moments = [rng.uniform(first_s, total_s * 0.95)]
        for _ in range(4):  # this run was faster than the uninterrupted one: kill it earlier, afresh
            if _kill_at(case.argv(live), moments[0]):
                landed += 1
                break
            _reset(case, fx, live)
            moments[0] = rng.uniform(min(first_s, moments[0]) * 0.5, moments[0])
        if rng.random() < 0.5:  # killed again while resuming
            moments.append(rng.uniform(0.0, total_s * 0.95))
            landed += _kill_at(case.argv(live), moments[1])
        problem = rerun_and_compare(case, live, want)
        if problem is None:
            survived += 1
        else:
            failures.append({"trial": trial, "kills_at_s": [round(m, 3) for m in moments], "problem": problem})
        status = "ok" if problem is None else f"FAILED: {problem}"
        log(f"  {name} trial {trial + 1}/{kills}: kill at {', '.join(f'{m:.2f}s' for m in moments)} {status}")
    shutil.rmtree(live, ignore_errors=True)
    return {
        "command": name, "survived": survived, "total": kills, "kills_landed": landed,
        "uninterrupted_s": round(total_s, 2), "first_write_s": round(first_s, 2), "failures": failures,
    }  # fmt: skip


def rerun_and_compare(case: Case, live: Path, want: Any, env: dict[str, str] | None = None) -> str | None:
    """Re-run the interrupted command to completion; what is wrong with the result, None if it matches WANT."""
    done = subprocess.run(case.argv(live), cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return f"re-run exited {done.returncode}: {done.stderr.strip()[-300:]}"
    try:
        got = case.fingerprint(live)
    except Exception as exc:  # a damaged file found by its sums, an unreadable Parquet …
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None if got == want else _difference(want, got)


def _difference(want: Any, got: Any) -> str:
    if isinstance(want, tuple):
        for w, g in zip(want, got, strict=True):
            if w != g:
                return _difference(w, g)
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                return f"{key} differs" if key in want and key in got else f"{key} only in one run"
    return f"outputs differ: {str(want)[:120]} vs {str(got)[:120]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="Kill trials per command.")
    ap.add_argument("--kills-for", default="", help="Per-command counts overriding --kills: report=5,bundle=5")
    ap.add_argument("--commands", default=",".join(CASES), help="Comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="Where to work (default: a temporary directory, removed).")
    ap.add_argument("--size", choices=list(SIZES), default="full", help="The work each command does.")
    args = ap.parse_args()
    SIZE.update(SIZES[args.size])
    names = [n for n in args.commands.split(",") if n]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown command(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    try:
        counts = {n: args.kills for n in names} | {
            k: int(v) for k, v in (item.split("=") for item in args.kills_for.split(",") if item)
        }
    except ValueError:
        raise SystemExit(f"--kills-for {args.kills_for!r}: give name=count pairs, e.g. report=5,bundle=5") from None
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="actstore-chaos-"))
    t0 = time.perf_counter()
    results = []
    try:
        for name in names:
            print(f"{name}: uninterrupted run, then {counts[name]} kill trials", flush=True)
            results.append(campaign(name, counts[name], args.seed, root, log=lambda s: print(s, flush=True)))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'command':<11} {'survived':>9} {'kills':>6} {'uninterrupted':>14}")
    for r in results:
        print(
            f"{r['command']:<11} {r['survived']:>4}/{r['total']:<4} {r['kills_landed']:>6} {r['uninterrupted_s']:>13.1f}s"
        )
    summary = {
        "chaos": {r["command"]: f"{r['survived']}/{r['total']}" for r in results},
        "kills_landed": sum(r["kills_landed"] for r in results),
        "seed": args.seed,
        "seconds": round(time.perf_counter() - t0, 1),
        "failures": {r["command"]: r["failures"] for r in results if r["failures"]},
    }
    print(json.dumps(summary))
    sys.exit(0 if all(r["survived"] == r["total"] for r in results) else 1)


if __name__ == "__main__":
    main()

"""One writer at a time: a live holder is named in a one-line refusal; a killed holder leaves no lock."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from actstore.errors import UsageError
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.writer_lock import exclusive, lock_path

HOLD = """
import sys, time
from actstore.writer_lock import exclusive
with exclusive(sys.argv[1], sys.argv[2], "actstore harvest"):
    print("held", flush=True)
    time.sleep(60)
"""

HOLD_FILE = """
import sys, time
from pathlib import Path
from actstore.writer_lock import flocked
with flocked(Path(sys.argv[1]), "actstore train", "held by {holder}"):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(target, kind):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_harvest_is_refused_while_the_first_lives_and_runs_once_it_is_killed(tmp_path):
    store = tmp_path / "s.zarr"
    proc = _holder(store, "store")
    try:
        opts = HarvestOptions(hooks=("blocks.1.hook_resid_post",), seq_len=16, tokens=4 * 16, batch_size=4)
        with pytest.raises(UsageError, match=rf"is being written by pid {proc.pid} \(actstore harvest\)"):
            harvest(str(store), opts)
        assert not store.exists()  # refused before touching anything
    finally:
        proc.kill()
        proc.wait()
    harvest(str(store), opts)  # the kernel released the killed holder's lock
    assert (store / "zarr.json").exists() and lock_path(store, "store").exists()


def test_run_locks_are_per_run_and_reentrant_across_calls(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    proc = _holder(a, "run")
    try:
        with exclusive(b, "run", "actstore train"):  # another run: free
            pass
        with pytest.raises(UsageError, match="being written by pid"):
            with exclusive(a, "run", "actstore eval"):
                pass
    finally:
        proc.kill()
        proc.wait()
    start = time.monotonic()
    with exclusive(a, "run", "actstore eval"):
        pass
    with exclusive(a, "run", "actstore eval"):  # released on exit: the same process takes it again
        pass
    assert time.monotonic() - start < 5
    assert lock_path("s3://bucket/store.zarr", "store") is None  # object storage is not locked here


def test_a_run_copys_lock_refuses_a_second_writer_and_lets_a_reader_wait(tmp_path, monkeypatch):
    """objstore's local copy of a run URL takes its lock through the same `flocked` as the writer locks."""
    import threading

    from actstore.objstore import RunSync

    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "cache"))
    sync = RunSync("memory://bucket/run{x}", "work")  # braces in a URL stay as they are in the message
    proc = subprocess.Popen([sys.executable, "-c", HOLD_FILE, str(sync.lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=rf"run\{{x\}} is being worked on from this machine by pid {proc.pid}"):
            with sync.locked("actstore eval", wait=False):
                pass
        entered = threading.Event()

        def reader() -> None:
            with sync.locked("reading", wait=True):
                entered.set()

        t = threading.Thread(target=reader)
        t.start()
        assert not entered.wait(0.5)  # waits its turn …
        proc.kill()
        proc.wait()
        t.join(30)
        assert entered.is_set()  # … and runs once the holder is gone
    finally:
        proc.kill()
        proc.wait()

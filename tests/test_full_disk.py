"""A disk that fills up: harvest, train, eval and bundle fail in one line naming the path and the space
needed, damage nothing committed, and the same command finishes once space is freed.

The full disk is a small tmpfs mounted by the test (skipped, with the reason, where mounting is not allowed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from actstore import store as st
from actstore.errors import StoreError
from actstore.run import SAESpec, read_table, trained_sae_dirs
from actstore.steps import bundle
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.steps.train import TrainOptions, train

from .conftest import HOOKS


class SmallDisk:
    """A tmpfs of a given size at `path`, which `resize` grows (space freed) or shrinks to what it holds."""

    def __init__(self, path: Path, size: int):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.decode().strip()}")

    def used(self) -> int:
        return shutil.disk_usage(self.path).used

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    made: list[SmallDisk] = []

    def make(size: int) -> SmallDisk:
        made.append(SmallDisk(tmp_path / f"disk{len(made)}", size))
        return made[-1]

    yield make
    for d in made:
        d.unmount()


def _one_line_full(err: pytest.ExceptionInfo, where: Path) -> None:
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no space left writing {where}"), msg
    assert "more needed" in msg and "re-run the same command" in msg


HARVEST = dict(hooks=(HOOKS[0],), seq_len=64, tokens=160 * 64, batch_size=8, split="train")


def test_harvest_onto_a_full_disk_stops_in_one_line_and_resumes_bit_identical(disk, tmp_path):
    d = disk(512 * 1024)
    out = d.path / "s.zarr"
    with pytest.raises(StoreError) as err:
        harvest(str(out), HarvestOptions(**HARVEST))
    _one_line_full(err, out)
    group = st.open_store(str(out))
    committed = st.committed(group)
    assert 0 < committed < group["tokens"].shape[0]  # a real partial store, not a refusal up front
    d.resize(64 * 1024 * 1024)  # space freed
    harvest(str(out), HarvestOptions(**HARVEST))
    whole = str(tmp_path / "whole.zarr")
    harvest(whole, HarvestOptions(**HARVEST))
    a, b = zarr.open_group(str(out), mode="r"), zarr.open_group(whole, mode="r")
    assert st.committed(a) == a["tokens"].shape[0]
    np.testing.assert_array_equal(a["tokens"][:], b["tokens"][:])
    np.testing.assert_array_equal(a["acts"][HOOKS[0]][:], b["acts"][HOOKS[0]][:])


def test_the_cli_prints_the_full_disk_as_one_line_and_exits_1(disk):
    d = disk(256 * 1024)
    out = d.path / "s.zarr"
    args = ["--hooks", HOOKS[0], "--seq-len", "64", "--tokens", "10k", "--batch-size", "8", "--quiet"]
    done = subprocess.run(
        [sys.executable, "-m", "actstore.cli.main", "harvest", str(out), *args], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith(f"error: no space left writing {out}")


def test_train_checkpoint_onto_a_full_disk_is_one_line_and_the_same_command_finishes(small_store, disk, tmp_path):
    d = disk(256 * 1024)
    run = d.path / "run"
    specs = [SAESpec(HOOKS[0], 4, 8, 2048, 0)]  # 1024 latents of 128: ≈ 1 MB of weights, 4 MB checkpointed
    options = TrainOptions(batch_size=256, checkpoint_seconds=0)
    with pytest.raises(StoreError) as err:
        train(small_store, str(run), specs, options)
    _one_line_full(err, run)
    assert not trained_sae_dirs(run) and not list(run.rglob("*.partial"))  # the staged write was cleared
    d.resize(64 * 1024 * 1024)
    train(small_store, str(run), specs, options)
    train(small_store, str(tmp_path / "whole"), specs, options)
    a = load_file(str(trained_sae_dirs(run)[0] / "sae_weights.safetensors"))
    b = load_file(str(trained_sae_dirs(tmp_path / "whole")[0] / "sae_weights.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    store, run = root / "eval.zarr", root / "run"
    shutil.copytree(small_store, store)
    train(str(store), str(run), [SAESpec(HOOKS[0], 4, 2, 1024, 0)], TrainOptions(batch_size=256))
    return store, run


def test_eval_onto_a_full_disk_keeps_the_run_and_finishes_once_space_is_freed(trained, disk, tmp_path):
    store, src = trained
    d = disk(8 * 1024 * 1024)
    run = d.path / "run"
    shutil.copytree(src, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".writer.lock"}
    d.resize(d.used() + 16 * 1024)  # what the run holds and a little: no room for the records
    local = tmp_path / "eval.zarr"
    shutil.copytree(store, local)
    with pytest.raises(StoreError) as err:
        evaluate(str(local), str(run), options=EvalOptions(batch_size=8))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"no space left writing {run}")
    assert before == {p: p.read_bytes() for p in before}  # the SAEs and their records as they were
    d.resize(64 * 1024 * 1024)
    evaluate(str(local), str(run), options=EvalOptions(batch_size=8))
    assert read_table(run, "tokens").height == 24 * 64


def test_bundle_overwrite_onto_a_full_disk_leaves_the_old_bundle_verifying(trained, disk, tmp_path):
    store, src = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    evaluate(str(store), str(run), options=EvalOptions(batch_size=8))
    d = disk(64 * 1024 * 1024)
    out = d.path / "b.tar"
    bundle.create(str(run), str(out))
    d.resize(d.used() + 64 * 1024)  # room for the bundle, not for a second copy built beside it
    with pytest.raises(StoreError) as err:
        bundle.create(str(run), str(out), overwrite=True)
    _one_line_full(err, out)
    assert bundle.verify(str(out)) == [] and not list(d.path.glob("*.partial*"))
    d.resize(64 * 1024 * 1024)
    bundle.create(str(run), str(out), overwrite=True)
    assert bundle.verify(str(out)) == []

"""Corruption is detected: a flipped byte in records Parquet, SAE weights or a probe is a one-line error
naming the file, never numbers read from damaged bytes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from actstore import integrity
from actstore import run as rundir
from actstore.errors import StoreError
from actstore.run import SAESpec, read_table
from actstore.sae import TopKSAE
from actstore.saeio import load_eval_sae
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.train import TrainOptions, train

from .conftest import HOOKS


@pytest.fixture(scope="module")
def sealed(small_store, tmp_path_factory):
    """One SAE trained briefly and evaluated: a run whose every directory carries SHA256SUMS."""
    root = tmp_path_factory.mktemp("sealed")
    store, run = str(root / "eval.zarr"), str(root / "run")
    shutil.copytree(small_store, store)  # eval writes reconstructions into its store: not the shared one
    train(store, run, [SAESpec(HOOKS[0], 4, 2, 1024, 0)], TrainOptions(batch_size=256))
    evaluate(store, run, options=EvalOptions(batch_size=8))
    return store, run


def _flip(path: Path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0x04
    path.write_bytes(bytes(raw))


def _copy(run: str, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def test_every_directory_written_whole_carries_sums_that_sha256sum_accepts(sealed):
    _, run = sealed
    dirs = [p.parent for p in Path(run).rglob("*.parquet")] + rundir.trained_sae_dirs(run)
    assert len(dirs) > 5
    for d in set(dirs):
        listed = integrity.read_sums(d)
        assert listed is not None and set(listed) == {p.name for p in d.iterdir() if p.name != integrity.SUMS}
        check = subprocess.run(["sha256sum", "--check", "--quiet", integrity.SUMS], cwd=d, capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_a_flipped_byte_in_records_is_refused_by_readers_sql_and_writers(sealed, tmp_path):
    store, run = sealed
    run = _copy(run, tmp_path)
    part = rundir.part_files(run, "tokens")[0]
    before = read_table(run, "tokens")
    _flip(part)
    with pytest.raises(StoreError, match=f"{part} is damaged .*delete that partition directory") as err:
        read_table(run, "tokens")
    assert "\n" not in str(err.value)
    cli = subprocess.run(
        [sys.executable, "-m", "actstore.cli.main", "sql", str(run), "SELECT count(*) FROM tokens"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 1 and cli.stderr.strip().count("\n") == 0 and "is damaged" in cli.stderr
    assert "Traceback" not in cli.stderr
    # A single-position write into the same partition must not carry (and re-seal) the damaged file.
    frame = before.head(1).drop("sae_id")
    with pytest.raises(StoreError, match="is damaged"):
        rundir.write_tables(run, part.parent.name.split("=", 1)[1], {"tokens": frame}, part="pos3")
    assert not any(p.name.endswith(".partial") for p in part.parent.parent.iterdir())


def test_a_flipped_byte_in_sae_weights_is_refused_by_both_loaders(sealed, tmp_path):
    _, run = sealed
    run = _copy(run, tmp_path)
    sae_dir = rundir.trained_sae_dirs(run)[0]
    TopKSAE.load(sae_dir)  # intact: loads
    _flip(sae_dir / "sae_weights.safetensors", at=0.9)  # in the tensors, past the header
    for load in (TopKSAE.load, load_eval_sae):
        with pytest.raises(StoreError, match=r"sae_weights.safetensors is damaged .*re-run `actstore train`"):
            load(sae_dir)


def test_eval_refuses_damaged_weights_and_leaves_the_records_as_they_were(sealed, tmp_path):
    store, run = sealed
    run = _copy(run, tmp_path)
    before = {p: p.read_bytes() for p in Path(run, "records").rglob("*") if p.is_file()}
    _flip(rundir.trained_sae_dirs(run)[0] / "sae_weights.safetensors", at=0.9)
    with pytest.raises(StoreError, match="is damaged"):
        evaluate(store, str(run), options=EvalOptions(batch_size=8))
    assert before == {p: p.read_bytes() for p in Path(run, "records").rglob("*") if p.is_file()}


def test_a_missing_listed_file_and_a_garbled_sums_file_are_errors_and_unsealed_dirs_read_as_before(tmp_path):
    d = tmp_path / "part"
    d.mkdir()
    pl.DataFrame({"a": [1, 2]}).write_parquet(d / "part-0.parquet")
    assert integrity.check(d) == {}  # written before sums existed: read as it is
    integrity.seal(d)
    assert set(integrity.check(d)) == {"part-0.parquet"}
    (d / "part-0.parquet").unlink()
    with pytest.raises(StoreError, match="part-0.parquet is missing"):
        integrity.check(d)
    (d / integrity.SUMS).write_text("not a sum\n")
    with pytest.raises(StoreError, match="SHA256SUMS is damaged"):
        integrity.check(d)

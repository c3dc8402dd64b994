"""Checkpoints written in the background: training goes on during a write, a write sees its own step's
state, a failed or interrupted write leaves the previous checkpoint, and a resumed sweep is byte-identical."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actstore.errors import StoreError
from actstore.run import checkpoint_path
from actstore.steps import train as train_step
from actstore.steps.train import TrainOptions, sweep, train
from actstore.trainee import Trainee

from .synthetic import sparse_dictionary_data, write_store

HOOK = "blocks.0.hook_resid_post"
SPECS = sweep([HOOK], [2, 4], [2], [4_096, 8_192], [0])
OPTIONS = TrainOptions(batch_size=512, checkpoint_seconds=0, log_every=3)  # a checkpoint after every batch


class Stop(Exception):
    """A crash at a chosen step."""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    x, _ = sparse_dictionary_data(64 * 64, d=16, n_atoms=32, k=3, noise=0.01)
    return write_store(str(tmp_path_factory.mktemp("ckpt") / "s.zarr"), x.reshape(64, 64, 16))


@pytest.fixture(scope="module")
def whole(store, tmp_path_factory) -> Path:
    """The sweep trained without a break (and without checkpoints)."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(store, str(run), SPECS, TrainOptions(batch_size=512, checkpoint_seconds=1e9, log_every=3))
    return run


def _same_saes(a: Path, b: Path) -> None:
    for spec in SPECS:
        for name in ("sae_weights.safetensors", "fire_counts.safetensors"):
            x, y = (load_file(str(r / "saes" / spec.sae_id / name)) for r in (a, b))
            assert x.keys() == y.keys()
            for key in x:
                assert torch.equal(x[key], y[key]), (spec.sae_id, key)


def _crash_after(monkeypatch, steps: int) -> None:
    """Every Trainee step past the first `steps` (counted over the sweep's SAEs) raises Stop."""
    done = [0]
    real = Trainee.train_step

    def step(self, *args, **kwargs):
        done[0] += 1
        if done[0] > steps:
            raise Stop
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainee, "train_step", step)


def test_training_goes_on_while_a_checkpoint_is_written(store, whole, tmp_path, monkeypatch):
    """The first write is held until an SAE has taken its next step: with a blocking write this would
    hang (and fail on the timeout). The held write still holds its own step's state although the live
    weights have moved on, and the sweep ends with the weights of a sweep without checkpoints."""
    stepped, real_write, real_step = threading.Event(), train_step._write_checkpoint, Trainee.train_step
    first: list[dict] = []
    live: list[Trainee] = []

    def held_write(path, state):
        if not first:
            first.append(state)
            before = state["trainees"][0]["sae"]["W_enc"].clone()
            assert stepped.wait(timeout=60), "training did not go on while the checkpoint was being written"
            assert torch.equal(state["trainees"][0]["sae"]["W_enc"], before)  # a snapshot, not the live weights
            assert not torch.equal(live[0].sae.W_enc, before)
        real_write(path, state)

    def step(self, *args, **kwargs):
        live.append(self)
        out = real_step(self, *args, **kwargs)
        if first and self.step == 2:
            stepped.set()  # an SAE stepped after the write began: release the write
        return out

    monkeypatch.setattr(train_step, "_write_checkpoint", held_write)
    monkeypatch.setattr(Trainee, "train_step", step)
    run = tmp_path / "run"
    train(store, str(run), SPECS, OPTIONS)
    assert first[0]["position"] == 512  # the state after the first batch
    assert [t["seen"] for t in first[0]["trainees"]] == [512] * len(SPECS)
    assert [t["step"] for t in first[0]["trainees"]] == [1] * len(SPECS)
    _same_saes(run, whole)
    assert not checkpoint_path(run, HOOK, store).exists()  # removed once the sweep is done


def test_a_crashed_sweep_resumes_to_the_same_bytes(store, whole, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _crash_after(monkeypatch, 4 * 5 + 2)  # in the sixth batch (four SAEs step in each)
    with pytest.raises(Stop):
        train(store, str(run), SPECS, OPTIONS)
    ckpt = checkpoint_path(run, HOOK, store)
    state = torch.load(ckpt / train_step.CHECKPOINT_STATE, weights_only=True)
    assert state["position"] == 5 * 512  # the last batch completed before the crash
    monkeypatch.undo()
    train(store, str(run), SPECS, OPTIONS)
    _same_saes(run, whole)


def test_a_write_that_fails_leaves_the_previous_checkpoint_and_is_reported(store, whole, tmp_path, monkeypatch):
    """A full disk during the second write: the error reaches the command (one line, as before), the first
    checkpoint is still in place and readable, and the same command then finishes to the same bytes."""
    from actstore import integrity

    calls, real_seal = [0], integrity.seal

    def seal(path):
        calls[0] += 1
        if calls[0] == 2 and path.name.endswith(".partial"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_seal(path)

    monkeypatch.setattr(integrity, "seal", seal)
    run = tmp_path / "run"
    with pytest.raises(StoreError, match="no space left writing") as err:
        train(store, str(run), SPECS, OPTIONS)
    assert "\n" not in str(err.value)
    ckpt = checkpoint_path(run, HOOK, store)
    integrity.check(ckpt)
    assert torch.load(ckpt / train_step.CHECKPOINT_STATE, weights_only=True)["position"] == 512
    assert not list(run.rglob("*.partial"))
    monkeypatch.undo()
    train(store, str(run), SPECS, OPTIONS)
    _same_saes(run, whole)


def test_an_error_in_training_waits_for_the_write_in_flight(store, tmp_path, monkeypatch):
    """The command's own error is reported, after the write in flight has finished (never a half-written
    checkpoint left by a live thread when the writer lock is released)."""
    finished = threading.Event()
    real_write = train_step._write_checkpoint

    def slow_write(path, state):
        real_write(path, state)
        finished.set()

    monkeypatch.setattr(train_step, "_write_checkpoint", slow_write)
    _crash_after(monkeypatch, 4 + 1)
    with pytest.raises(Stop):
        train(store, str(tmp_path / "run"), SPECS, OPTIONS)
    assert finished.is_set()
    assert not any(t.name == "actstore-checkpoint" for t in threading.enumerate())

"""The loader's batches equal the documented stream, computed here independently with numpy.

Why: the loader reads, shuffles and converts concurrently for speed, but resumes, sweeps ("a member
equals a separate run") and ranks all rely on its stream being one fixed function of (store, hook,
seed, batch size, drop_first_positions, group_chunks, start_token), byte for byte.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from actstore.errors import StoreError
from actstore.loader import ActivationLoader, LoaderOptions

from .synthetic import write_store

HOOK = "blocks.0.hook_resid_post"
N_SEQ, SEQ_LEN, D, CHUNK = 23, 6, 4, 4  # six chunks, the last one short


def _store(path: Path, dtype: str) -> str:
    """A complete store of `dtype` activations with a fractional, signed range (every bit pattern matters)."""
    acts = np.random.default_rng(5).standard_normal((N_SEQ, SEQ_LEN, D)).astype(np.float32) * 3
    return write_store(str(path), acts, HOOK, chunk_seqs=CHUNK, dtype=dtype)


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def store(request, tmp_path_factory) -> str:
    return _store(tmp_path_factory.mktemp("loader") / f"{request.param}.zarr", request.param)


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def reference(path: str, total: int, opts: LoaderOptions, start: int) -> list[np.ndarray]:
    """The stream by its definition: per epoch a seeded chunk order, groups of `group_chunks` chunks whose
    rows are concatenated and permuted, groups concatenated, rows [start, total) cut into batches."""
    arr = zarr.open_group(path, mode="r")["acts"][HOOK]
    rows = _widen(arr[:], str(arr.attrs["actstore_dtype"]))[:, opts.drop_first_positions :]
    n_chunks, g = -(-N_SEQ // CHUNK), opts.group_chunks
    stream, n, epoch = [], 0, 0
    while n < total:
        order = np.random.default_rng([opts.seed, epoch]).permutation(n_chunks)
        for index, first in enumerate(range(0, n_chunks, g)):
            group = np.concatenate([rows[c * CHUNK : (c + 1) * CHUNK].reshape(-1, D) for c in order[first : first + g]])
            stream.append(group[np.random.default_rng([opts.seed, epoch, index, 1]).permutation(len(group))])
            n += len(group)
        epoch += 1
    flat = np.concatenate(stream)[start:total]
    return [flat[i : i + opts.batch_size] for i in range(0, len(flat), opts.batch_size)]


def _batches(path: str, total: int, opts: LoaderOptions, start: int = 0, **kw) -> list[np.ndarray]:
    out = []
    for b in ActivationLoader(path, HOOK, total, opts, start_token=start, **kw):
        assert b.dtype == torch.float32 and b.is_contiguous()
        out.append(b.numpy())
    return out


def _same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [b.shape for b in got] == [b.shape for b in want]
    for g, w in zip(got, want, strict=True):
        assert g.tobytes() == w.tobytes()  # byte for byte, not approximately


EPOCH = N_SEQ * SEQ_LEN  # 138 rows


@pytest.mark.parametrize(
    ("batch", "start", "drop", "group", "total"),
    [
        (32, 0, 0, 8, EPOCH),  # one epoch, one group
        (7, 0, 0, 2, EPOCH),  # batches straddling groups
        (50, 13, 1, 2, 3 * EPOCH - 5),  # a resume, a dropped position, three epochs
        (1, 40, 2, 3, 90),  # one-row batches from mid-group
        (4096, 0, 0, 1, 2 * EPOCH + 1),  # the batch outsizes the stream; a group per chunk
        (16, 200, 0, 4, 201),  # a single row, in the second epoch
    ],
)
def test_batches_equal_the_reference_stream(store, batch, start, drop, group, total):
    opts = LoaderOptions(batch_size=batch, seed=11, drop_first_positions=drop, group_chunks=group)
    want = reference(store, total, opts, start)
    _same(_batches(store, total, opts, start), want)


def test_thread_counts_and_widening_on_the_device_change_nothing(store):
    opts = LoaderOptions(batch_size=24, seed=3, group_chunks=2)
    want = reference(store, 2 * EPOCH, opts, 5)
    for kw in ({"threads": 1}, {"threads": 3}, {"convert_on_device": True}):  # as for CUDA, minus the GPU
        _same(_batches(store, 2 * EPOCH, opts, 5, **kw), want)


def test_nothing_left_to_read_gives_no_batches(store):
    assert _batches(store, 10, LoaderOptions(batch_size=4), start=10) == []


def _loader_threads_left() -> list[threading.Thread]:
    """The loader's reader and fill threads still alive after a short grace period."""
    deadline = time.monotonic() + 10
    while (
        left := [t for t in threading.enumerate() if t.name.startswith("actstore-")]
    ) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def test_stopping_early_stops_every_thread(store):
    it = iter(ActivationLoader(store, HOOK, 10 * EPOCH, LoaderOptions(batch_size=8, group_chunks=2)))
    next(it)
    it.close()
    assert not _loader_threads_left()


def test_a_damaged_chunk_is_a_store_error(tmp_path):
    path = _store(tmp_path / "s.zarr", "float16")
    chunk = sorted(p for p in (Path(path) / "acts" / HOOK).rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="damaged chunk"):
        _batches(path, EPOCH, LoaderOptions(batch_size=16))
    assert not _loader_threads_left()

"""Training batches from a store: shuffled, prefetched, exact, deterministic and resumable.

Why this design: SAE training wants i.i.d.-looking token batches, but a store is read fastest chunk by
chunk. The stream here is a fixed function of (store, hook, seed): each epoch visits the chunks in a
seeded random order; consecutive `group_chunks` chunks are read together and their token rows shuffled
(a shuffle buffer across chunks); the groups' rows concatenated form the stream, and batch b is rows
[b·B, (b+1)·B). Because any row's place is computable from chunk shapes alone, a resumed run starts at
any row without replaying the stream, and every SAE sharing a hook sees the same batches (read once,
train many). A background thread reads and decompresses ahead of the trainer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from actstore import store as st
from actstore.errors import StoreError, UsageError


@dataclass(frozen=True)
class LoaderOptions:
    """What decides the stream of batches; recorded in every SAE's config."""

    batch_size: int = 4096
    seed: int = 0
    drop_first_positions: int = 0  # 1 drops position 0 (BOS-like outliers) from training
    group_chunks: int = 8


class ActivationLoader:
    """Iterates (n, d) float32 batches of one hook's activations, `total_tokens` rows in all."""

    def __init__(
        self,
        store_path: str,
        hook: str,
        total_tokens: int,
        options: LoaderOptions = LoaderOptions(),
        start_token: int = 0,
        device: str = "cpu",
        prefetch: int = 4,
    ):
        self.group = st.open_store(store_path)
        arr = st.acts_array(self.group, hook, store_path)
        n_seq, seq_len, self.d = arr.shape
        if st.committed(self.group) < n_seq:
            raise StoreError(
                f"{store_path} is incomplete ({st.committed(self.group)} of {n_seq} sequences committed); "
                "finish it by re-running its harvest command"
            )
        if not 0 <= options.drop_first_positions < seq_len:
            raise UsageError(f"cannot drop {options.drop_first_positions} positions of {seq_len}-token sequences")
        self.arr, self.hook, self.opts, self.device = arr, hook, options, device
        self.stored_dtype = st.stored_dtype(arr)
        self.chunk_seqs = arr.chunks[0]
        self.n_chunks = -(-n_seq // self.chunk_seqs)
        self.rows_per_seq = seq_len - options.drop_first_positions
        self.epoch_tokens = n_seq * self.rows_per_seq
        self.total_tokens, self.start_token, self.prefetch = total_tokens, start_token, prefetch

    def _chunk_rows(self, c: int) -> int:
        return min(self.chunk_seqs, self.arr.shape[0] - c * self.chunk_seqs) * self.rows_per_seq

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.opts.seed, epoch]).permutation(self.n_chunks)
        g = self.opts.group_chunks
        return [order[i : i + g] for i in range(0, self.n_chunks, g)]

    def _read_group(self, epoch: int, index: int, chunks: np.ndarray) -> np.ndarray:
        parts = []
        for c in chunks:
            s = slice(c * self.chunk_seqs, min((c + 1) * self.chunk_seqs, self.arr.shape[0]))
            try:
                block = self.arr[s]
            except Exception as exc:
                raise StoreError(f"damaged chunk {c} of acts/{self.hook} ({exc}); re-harvest the store") from exc
            block = block[:, self.opts.drop_first_positions :]
            parts.append(block.reshape(-1, self.d))
        rows = np.concatenate(parts)
        perm = np.random.default_rng([self.opts.seed, epoch, index, 1]).permutation(len(rows))
        return st.to_float32(rows[perm], self.stored_dtype)

    def _rows(self) -> Iterator[np.ndarray]:
        """The stream from `start_token` on, as consecutive row blocks, until `total_tokens`."""
        position, remaining = 0, self.total_tokens - self.start_token
        epoch = 0
        while remaining > 0:
            for index, chunks in enumerate(self._epoch_groups(epoch)):
                size = sum(self._chunk_rows(int(c)) for c in chunks)
                if position + size <= self.start_token:  # wholly before the resume point: not even read
                    position += size
                    continue
                rows = self._read_group(epoch, index, chunks)
                skip = max(0, self.start_token - position)
                position += size
                rows = rows[skip : skip + remaining]
                remaining -= len(rows)
                yield rows
                if remaining <= 0:
                    return
            epoch += 1

    def _batches(self) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        n_pending, B = 0, self.opts.batch_size
        for rows in self._rows():
            pending.append(rows)
            n_pending += len(rows)
            if n_pending >= B:
                flat = np.concatenate(pending)
                cut = (len(flat) // B) * B
                yield from np.split(flat[:cut], cut // B)
                pending, n_pending = [flat[cut:]], len(flat) - cut
        if n_pending:
            yield np.concatenate(pending)

    def __iter__(self) -> Iterator[torch.Tensor]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for batch in self._batches():
                    if stop.is_set():
                        return
                    q.put(torch.from_numpy(np.ascontiguousarray(batch)))
                q.put(None)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device, non_blocking=True)
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

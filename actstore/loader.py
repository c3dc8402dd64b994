"""Training batches from a store: shuffled, prefetched, exact, deterministic and resumable.

Why this design: SAE training wants i.i.d.-looking token batches, but a store is read fastest chunk by
chunk. The stream here is a fixed function of (store, hook, seed): each epoch visits the chunks in a
seeded random order; consecutive `group_chunks` chunks are read together and their token rows shuffled
(a shuffle buffer across chunks); the groups' rows concatenated form the stream, and batch b is rows
[b·B, (b+1)·B). Because any row's place is computable from chunk shapes alone, a resumed run starts at
any row without replaying the stream, and every SAE sharing a hook sees the same batches (read once,
train many).

How it is fast (none of it changes a byte of the stream): reader threads decompress the next group's
chunks, each straight into its rows of one of two reused group buffers, each thread through its own
zarr event loop (zarr's shared one checksums and copies every chunk on a single thread). Fill threads
gather the current group's rows in shuffled order directly into each batch, widening the stored 16-bit
values to float32 on the way with torch (numpy's conversion is several times slower), in pieces small
enough that torch never starts a thread team of its own. For a CUDA device a batch stays in the stored
dtype, in pinned memory: the copy to the GPU is asynchronous and half the bytes, and the GPU widens it
(exactly, as the CPU would). A producer thread hands finished batches to the trainer through a short
queue.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import zarr
import zarr.api.asynchronous
from zarr.core.buffer.cpu import NDBuffer

from actstore import store as st
from actstore.errors import StoreError, UsageError

SERIAL_ELEMENTS = 32767  # torch runs ops on fewer elements than its grain (32,768) on the calling thread
FILL_ROWS = 2048  # rows per fill task: enough tasks per group to keep every fill thread busy
MAX_THREADS = 8  # per pool: a group has 8 chunks by default, and a few threads outrun a GPU's appetite


def _cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class LoaderOptions:
    """What decides the stream of batches; recorded in every SAE's config."""

    batch_size: int = 4096
    seed: int = 0
    drop_first_positions: int = 0  # 1 drops position 0 (BOS-like outliers) from training
    group_chunks: int = 8


@dataclass(frozen=True)
class _Span:
    """One group's part of the stream: rows [skip, skip + take) of its shuffled order."""

    epoch: int
    index: int
    chunks: np.ndarray
    size: int
    skip: int
    take: int


@dataclass
class _Group:
    """A group's rows in a reused buffer, its read tasks, and the fill tasks that read from it."""

    span: _Span
    buffer: np.ndarray
    reads: list[tuple[int, Future]]
    users: list[Future] = field(default_factory=list)


class _ChunkReaders:
    """A pool of threads that decompress chunks of one array, each into a given buffer.

    Why each thread runs its own zarr event loop (local stores): zarr's synchronous API sends every read
    through one shared event-loop thread, which also checksums each chunk and copies it into place —
    measured here: more CPU than the decompression itself, and serial however many threads ask. A remote store
    keeps the shared loop: its client sessions belong to the loop that opened them.
    """

    def __init__(self, arr: zarr.Array, store_path: str, threads: int):
        self.arr, self.store_path = arr, store_path
        self.own_loops = "://" not in str(store_path)  # a local directory
        self.local = threading.local()
        self.loops: list[asyncio.AbstractEventLoop] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(threads, "actstore-read")

    def submit(self, selection: tuple[slice, ...], out: np.ndarray) -> Future:
        return self.pool.submit(self._read, selection, NDBuffer.from_numpy_array(out))

    def _read(self, selection: tuple[slice, ...], out: NDBuffer) -> None:
        if not self.own_loops:
            self.arr.get_basic_selection(selection, out=out)
            return
        if not hasattr(self.local, "loop"):
            loop = asyncio.new_event_loop()
            with self.lock:
                self.loops.append(loop)
            self.local.array = loop.run_until_complete(
                zarr.api.asynchronous.open_array(store=self.store_path, path=self.arr.path, mode="r")
            )
            self.local.loop = loop
        self.local.loop.run_until_complete(self.local.array.get_orthogonal_selection(selection, out=out))

    def close(self) -> None:
        """Stop the threads (a read still running finishes first: its buffer may be reused) and their loops."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for loop in self.loops:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()


class ActivationLoader:
    """Iterates (n, d) float32 batches of one hook's activations, `total_tokens` rows in all.

    `threads` sizes each of the two pools, chunk reads and batch fills (default: one per core, at most
    8); `convert_on_device` ships batches in the stored dtype and widens them on `device` (default: for
    CUDA devices). Neither changes a single byte of the batches.
    """

    def __init__(
        self,
        store_path: str,
        hook: str,
        total_tokens: int,
        options: LoaderOptions = LoaderOptions(),
        start_token: int = 0,
        device: str = "cpu",
        prefetch: int = 4,
        threads: int | None = None,
        convert_on_device: bool | None = None,
    ):
        self.group, self.store_path = st.open_store(store_path), store_path
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
        self.threads = threads or min(MAX_THREADS, _cores())
        on_cuda = torch.device(device).type == "cuda"
        self.convert_on_device = on_cuda if convert_on_device is None else convert_on_device
        self.pin = on_cuda and torch.cuda.is_available()

    def _chunk_rows(self, c: int) -> int:
        return min(self.chunk_seqs, self.arr.shape[0] - c * self.chunk_seqs) * self.rows_per_seq

    def _epoch_groups(self, epoch: int) -> list[np.ndarray]:
        order = np.random.default_rng([self.opts.seed, epoch]).permutation(self.n_chunks)
        g = self.opts.group_chunks
        return [order[i : i + g] for i in range(0, self.n_chunks, g)]

    def _spans(self) -> Iterator[_Span]:
        """The groups the stream uses from `start_token` on, until `total_tokens` (earlier ones are not read)."""
        position, remaining = 0, self.total_tokens - self.start_token
        epoch = 0
        while remaining > 0:
            for index, chunks in enumerate(self._epoch_groups(epoch)):
                size = sum(self._chunk_rows(int(c)) for c in chunks)
                if position + size <= self.start_token:  # wholly before the resume point: not even read
                    position += size
                    continue
                skip = max(0, self.start_token - position)
                take = min(size - skip, remaining)
                position += size
                remaining -= take
                yield _Span(epoch, index, chunks, size, skip, take)
                if remaining <= 0:
                    return
            epoch += 1

    def _selection(self, c: int) -> tuple[slice, ...]:
        """The selection of chunk `c`'s rows (whole sequences, less the dropped first positions)."""
        first = c * self.chunk_seqs
        seqs = slice(first, min(first + self.chunk_seqs, self.arr.shape[0]))
        return seqs, slice(self.opts.drop_first_positions, None)

    def _start_reads(self, readers: _ChunkReaders, span: _Span, buffer: np.ndarray) -> list[tuple[int, Future]]:
        """Read a group's chunks concurrently, each into its place: the chunks' rows concatenated in group order."""
        reads, at = [], 0
        for c in map(int, span.chunks):
            rows = self._chunk_rows(c)
            out = buffer[at : at + rows].reshape(rows // self.rows_per_seq, self.rows_per_seq, self.d)
            reads.append((c, readers.submit(self._selection(c), out)))
            at += rows
        return reads

    def _wait_reads(self, reads: list[tuple[int, Future]]) -> None:
        """Wait for a group's reads; a chunk that fails its checksum or decompression is a StoreError."""
        for c, read in reads:
            try:
                read.result()
            except Exception as exc:
                raise StoreError(f"damaged chunk {c} of acts/{self.hook} ({exc}); re-harvest the store") from exc

    def _groups(self, readers: _ChunkReaders) -> Iterator[_Group]:
        """Each group of the stream with its rows read, the next group's reads already running.

        Two buffers are reused in turn; one is overwritten only once every fill task reading it is done.
        """
        group_rows = min(self.opts.group_chunks, self.n_chunks) * self.chunk_seqs * self.rows_per_seq
        free: list[np.ndarray] = []
        spans = self._spans()
        ahead: deque[_Group] = deque()

        def start_next() -> None:
            span = next(spans, None)
            if span is not None:
                buffer = free.pop() if free else np.empty((group_rows, self.d), self.arr.dtype)
                ahead.append(_Group(span, buffer, self._start_reads(readers, span, buffer)))

        start_next()
        start_next()
        while ahead:
            group = ahead.popleft()
            self._wait_reads(group.reads)
            yield group
            for f in group.users:
                f.result()
            free.append(group.buffer)
            start_next()

    def _stored_tensor(self, rows: np.ndarray) -> torch.Tensor:
        """A torch view of stored rows (bfloat16 from its uint16 bit patterns), no copy."""
        t = torch.from_numpy(rows)
        return t.view(torch.bfloat16) if self.stored_dtype == "bfloat16" else t

    def _batch_dtype(self) -> torch.dtype:
        if not self.convert_on_device:
            return torch.float32
        return torch.bfloat16 if self.stored_dtype == "bfloat16" else getattr(torch, self.stored_dtype)

    def _gather(self, src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
        """out = src[index], widened to out's dtype on the way.

        Why in slices of under 32,768 values: torch runs an op that small on the calling thread. A larger
        one starts an OpenMP team per calling thread, and on a busy machine such teams spin waiting for
        each other (measured here: 10–80× slower); a small slice also keeps the 16-bit rows in cache.
        """
        rows = max(1, SERIAL_ELEMENTS // self.d)
        if src.dtype == out.dtype:
            for ix, o in zip(index.split(rows), out.split(rows), strict=True):
                torch.index_select(src, 0, ix, out=o)
            return
        scratch = torch.empty((rows, self.d), dtype=src.dtype)
        for ix, o in zip(index.split(rows), out.split(rows), strict=True):
            part = scratch if len(ix) == rows else scratch[: len(ix)]
            torch.index_select(src, 0, ix, out=part)
            o.copy_(part)

    def _batches(self, readers: _ChunkReaders, fills: ThreadPoolExecutor) -> Iterator[torch.Tensor]:
        """Batches of the stream in order, each a fresh tensor filled by `fills` from one or two groups."""
        B, dtype = self.opts.batch_size, self._batch_dtype()
        left = max(0, self.total_tokens - self.start_token)
        batch, filled, tasks = None, 0, []
        for group in self._groups(readers):
            span, ready = group.span, []
            perm = np.random.default_rng([self.opts.seed, span.epoch, span.index, 1]).permutation(span.size)
            index = torch.from_numpy(perm[span.skip : span.skip + span.take])
            src, done = self._stored_tensor(group.buffer[: span.size]), 0
            while done < span.take:
                if batch is None:
                    batch, filled, tasks = torch.empty((min(B, left), self.d), dtype=dtype, pin_memory=self.pin), 0, []
                n = min(len(batch) - filled, span.take - done, FILL_ROWS)
                task = fills.submit(self._gather, src, index[done : done + n], batch[filled : filled + n])
                tasks.append(task)
                group.users.append(task)
                filled, done, left = filled + n, done + n, left - n
                if filled == len(batch):
                    ready.append((batch, tasks))
                    batch = None
            for full, its_tasks in ready:
                for task in its_tasks:
                    task.result()
                yield full

    def __iter__(self) -> Iterator[torch.Tensor]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                readers = _ChunkReaders(self.arr, self.store_path, min(self.threads, self.opts.group_chunks))
                fills = ThreadPoolExecutor(self.threads, "actstore-fill")
                try:
                    for batch in self._batches(readers, fills):
                        if stop.is_set():
                            return
                        q.put(batch)
                finally:  # nothing left running on a buffer about to be dropped
                    fills.shutdown(wait=True, cancel_futures=True)
                    readers.close()
                q.put(None)
            except BaseException as exc:  # surfaced in the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item.to(self.device, non_blocking=True).float()
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

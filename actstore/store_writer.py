"""The harvest's background writer: compresses and writes batches while the model computes the next.

Why a thread: the forward pass and zarr's compression both release the GIL, so writing the previous
batch overlaps the next forward pass. A batch's activations may come as a function that makes them
(the dtype conversion, the finiteness check, waiting for a device copy): it runs here, in order, so the
forward's thread never waits for it, and a batch that fails it is never written nor flagged.

Each batch is written as whole chunks, activations before tokens, and only then are its chunks flagged
done (`store.mark_done`): one small object per chunk, so ranks of a distributed harvest writing
disjoint chunks never rewrite a shared object, and a resume — with any number of processes — redoes
exactly the chunks not flagged. A single writer also advances the commit
record (the prefix readers trust) after each batch; with several, rank 0 records it once all are done.
For a lossy codec it also measures the relative error the codec introduced, which the store records.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from actstore import store as st
from actstore.metrics import EPS


class StoreWriter(threading.Thread):
    """Writes batches to the store in the background and marks their chunks done after each."""

    def __init__(self, group: Any, hooks: list[str], codec: str, lossy: dict[str, Any], record_commit: bool = True):
        super().__init__(daemon=True)
        self.group, self.hooks, self.codec = group, hooks, codec
        self.tokens, self.acts = group["tokens"], {h: group["acts"][h] for h in hooks}
        self.inbox: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.lossy = lossy  # per hook: sums for the RMS relative error and the max per-token error
        self.record_commit = record_commit
        self.done = st.done_chunks(group)  # kept up to date here: the commit record is its done prefix
        self.chunk = st.chunk_seqs(group)

    def run(self) -> None:
        try:
            while (item := self.inbox.get()) is not None:
                self._write(*item)
        except BaseException as exc:  # surfaced by the main thread at its next put/close
            self.error = exc
            while self.inbox.get() is not None:  # drain so the producer never blocks forever
                pass

    def _write(
        self, start: int, tokens: np.ndarray, acts: dict[str, np.ndarray] | Callable[[], dict[str, np.ndarray]]
    ) -> None:
        if callable(acts):
            acts = acts()
        stop = start + len(tokens)
        for hook in self.hooks:
            self.acts[hook][start:stop] = acts[hook]
            if st.is_lossy(self.codec):
                self._measure(hook, acts[hook])
        self.tokens[start:stop] = tokens
        st.mark_done(self.group, start, stop)
        self.done[st.full_chunks(self.group, start, stop)] = True
        if self.record_commit:
            todo = np.flatnonzero(~self.done)
            prefix = min(int(self.tokens.shape[0]), (int(todo[0]) if len(todo) else len(self.done)) * self.chunk)
            if prefix == stop - stop % self.chunk:  # a last, partial batch (the corpus ran out) right after it
                prefix = max(prefix, stop)
            st.commit(self.group, prefix, {"lossy_error": lossy_summary(self.lossy)} if self.lossy else None)

    def _measure(self, hook: str, x: np.ndarray) -> None:
        x32 = x.astype(np.float32)
        err = st.apply_lossy(self.codec, x).astype(np.float32) - x32
        err_sq, x_sq = (err**2).sum(-1), (x32**2).sum(-1)
        acc = self.lossy.setdefault(hook, {"err_sq": 0.0, "x_sq": 0.0, "max_rel": 0.0})
        acc["err_sq"] += float(err_sq.sum())
        acc["x_sq"] += float(x_sq.sum())
        acc["max_rel"] = max(acc["max_rel"], float(np.sqrt(err_sq / np.maximum(x_sq, EPS)).max()))

    def put(self, item: tuple) -> None:
        if self.error:
            raise self.error
        self.inbox.put(item)

    def close(self) -> None:
        self.inbox.put(None)
        self.join()
        if self.error:
            raise self.error


def lossy_summary(acc: dict[str, Any]) -> dict[str, Any]:
    """The recorded form of the per-hook sums: the RMS relative error and the largest per-token one."""
    return {
        h: {"rms_rel": float(np.sqrt(a["err_sq"] / max(a["x_sq"], EPS))), "max_rel": a["max_rel"], **a}
        for h, a in acc.items()
    }

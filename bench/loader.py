"""Loader throughput against plain chunk reads of the same store, and against the loader it replaced.

    python bench/loader.py [--d 768] [--dtype float16|bfloat16] [--chunks 64] [--chunk-seqs 32]
                           [--seq-len 128] [--batch-size 4096] [--repeats 5] [--no-old]

Builds a store locally (d-dimensional activations, Gaussian with a per-dimension scale and a few
outlier dimensions, stored as float16 or bfloat16 with the default lz4 codec; it compresses about as
little as real activations do), then measures, in one process, interleaved (A B C A B C …, medians):
  (a) plain chunk reads: every chunk in order through zarr, decompressed to numpy, nothing else;
  (b) `actstore.loader.ActivationLoader` over one epoch (batch 4096, default options);
  (c) the loader as it was before (kept inline below: one reader thread, one chunk per call,
      concatenate, permute, widen with numpy, re-concatenate into batches), unless --no-old.
Goal: (b) ≥ 0.8 × (a) in tokens/s. Also CPU time per token (all threads), which a shared machine
disturbs less than wall time, and what (b)/(a) would be if the loader had every core to itself.
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import zarr

from actstore import store as st
from actstore.loader import ActivationLoader, LoaderOptions

HOOK = "blocks.0.hook_resid_post"
GOAL = 0.8


def build_store(path: str, d: int, dtype: str, n_chunks: int, chunk_seqs: int, seq_len: int) -> int:
    """A complete store of synthetic activations; returns its token count."""
    n_seq = n_chunks * chunk_seqs
    g = st.create_store(
        path,
        n_seq=n_seq,
        seq_len=seq_len,
        hook_dims={HOOK: d},
        dtype=dtype,
        codec=st.DEFAULT_CODEC,
        chunk_seqs=chunk_seqs,
        shard_seqs=None,
        attrs={"settings": {"model": "synthetic", "seq_len": seq_len, "dtype": dtype}, "model": {"name": "synthetic"}},
    )
    g["tokens"][:] = np.zeros((n_seq, seq_len), dtype=np.int32)
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.2, 2.0, d).astype(np.float32)
    scale[rng.choice(d, 4, replace=False)] = 40.0  # residual streams have a few huge dimensions
    for c in range(n_chunks):
        x = rng.standard_normal((chunk_seqs, seq_len, d), dtype=np.float32) * scale
        g["acts"][HOOK][c * chunk_seqs : (c + 1) * chunk_seqs] = st.to_stored(torch.from_numpy(x), dtype)
    st.commit(g, n_seq)
    return n_seq * seq_len


def chunk_reads(path: str) -> Callable[[], None]:
    arr = zarr.open_group(path, mode="r")["acts"][HOOK]
    step = arr.chunks[0]

    def run() -> None:
        for s in range(0, arr.shape[0], step):
            arr[s : s + step]

    return run


def loader(path: str, tokens: int, opts: LoaderOptions) -> Callable[[], None]:
    def run() -> None:
        for _ in ActivationLoader(path, HOOK, tokens, opts):
            pass

    return run


def old_batches(path: str, tokens: int, opts: LoaderOptions) -> Iterator[torch.Tensor]:
    """The loader before issue 17 (one epoch from token 0): the baseline, and a check that the stream is unchanged."""
    arr = zarr.open_group(path, mode="r")["acts"][HOOK]
    dtype, cs, n_seq, d = st.stored_dtype(arr), arr.chunks[0], arr.shape[0], arr.shape[2]
    n_chunks = -(-n_seq // cs)

    def rows() -> Iterator[np.ndarray]:
        order = np.random.default_rng([opts.seed, 0]).permutation(n_chunks)
        for index, first in enumerate(range(0, n_chunks, opts.group_chunks)):
            parts = [
                arr[c * cs : (c + 1) * cs][:, opts.drop_first_positions :].reshape(-1, d)
                for c in order[first : first + opts.group_chunks]
            ]
            group = np.concatenate(parts)
            perm = np.random.default_rng([opts.seed, 0, index, 1]).permutation(len(group))
            yield st.to_float32(group[perm], dtype)

    def batches() -> Iterator[np.ndarray]:
        pending, n, B = [], 0, opts.batch_size
        for r in rows():
            pending.append(r)
            n += len(r)
            if n >= B:
                flat = np.concatenate(pending)
                cut = (len(flat) // B) * B
                yield from np.split(flat[:cut], cut // B)
                pending, n = [flat[cut:]], len(flat) - cut
        if n:
            yield np.concatenate(pending)

    q: queue.Queue = queue.Queue(maxsize=4)

    def produce() -> None:
        for b in batches():
            q.put(torch.from_numpy(np.ascontiguousarray(b)))
        q.put(None)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not None:
        yield item


def old_loader(path: str, tokens: int, opts: LoaderOptions) -> Callable[[], None]:
    def run() -> None:
        for _ in old_batches(path, tokens, opts):
            pass

    return run


def same_stream(path: str, tokens: int, opts: LoaderOptions) -> bool:
    """The new loader's batches equal the old one's, byte for byte (the first epoch)."""
    new = ActivationLoader(path, HOOK, tokens, opts)
    return all(
        a.numpy().tobytes() == b.numpy().tobytes() for a, b in zip(new, old_batches(path, tokens, opts), strict=True)
    )


def measure(runs: dict[str, Callable[[], None]], tokens: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Interleaved repeats: wall tokens/s and CPU ns per token (all threads) of each run."""
    out: dict[str, dict[str, list[float]]] = {k: {"tps": [], "cpu": []} for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out[name]["tps"].append(tokens / wall)
            out[name]["cpu"].append(cpu / tokens * 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--chunk-seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-old", action="store_true", help="skip the old loader (the slowest run)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="actstore-bench-loader-"))
    try:
        path = str(tmp / "acts.zarr")
        tokens = build_store(path, args.d, args.dtype, args.chunks, args.chunk_seqs, args.seq_len)
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        opts = LoaderOptions(batch_size=args.batch_size)
        runs = {"chunk reads": chunk_reads(path), "loader": loader(path, tokens, opts)}
        if not args.no_old:
            runs["old loader"] = old_loader(path, tokens, opts)
        runs["chunk reads"]()  # into the page cache: every run reads from memory
        identical = None if args.no_old else same_stream(path, tokens, opts)
        load_before = os.getloadavg()
        res = measure(runs, tokens, args.repeats)
        load_after = os.getloadavg()
        cores = len(os.sched_getaffinity(0))
        med = {k: {m: float(np.median(v)) for m, v in r.items()} for k, r in res.items()}
        print(
            f"store: {tokens:,} tokens × d {args.d}, {args.dtype}, {size / tokens / args.d:.3f} B/value stored; "
            f"{cores} cores; load average {load_before[0]:.1f} → {load_after[0]:.1f}"
        )
        print(f"{'run':<14}{'M tok/s (median)':>18}{'min':>8}{'max':>8}{'CPU ns/token':>14}{'cores busy':>12}")
        for k, r in res.items():
            busy = med[k]["tps"] * med[k]["cpu"] / 1e9
            print(
                f"{k:<14}{med[k]['tps'] / 1e6:>18.3f}{min(r['tps']) / 1e6:>8.3f}{max(r['tps']) / 1e6:>8.3f}"
                f"{med[k]['cpu']:>14.0f}{busy:>12.2f}"
            )
        plain, new = med["chunk reads"], med["loader"]
        plain_busy = plain["tps"] * plain["cpu"] / 1e9
        ratio = new["tps"] / plain["tps"]
        # On an idle machine: plain reads are one serial chain (≤ 1 core), the loader may use every core.
        bound = cores * plain["cpu"] / new["cpu"]
        print(
            f"loader / chunk reads: {ratio:.2f} (goal {GOAL}); idle-machine bound "
            f"{cores} cores × {plain['cpu']:.0f} / {new['cpu']:.0f} ns/token = {bound:.2f}"
        )
        headline = {
            "loader_vs_chunk_reads": round(ratio, 3),
            "goal": GOAL,
            "loader_vs_chunk_reads_idle_bound": round(bound, 3),
            "loader_tokens_per_s": round(new["tps"]),
            "chunk_read_tokens_per_s": round(plain["tps"]),
            "loader_cpu_ns_per_token": round(new["cpu"]),
            "chunk_read_cpu_ns_per_token": round(plain["cpu"]),
            "chunk_read_cores_busy": round(plain_busy, 2),
            "cores": cores,
            "load_average": round(load_after[0], 1),
        }
        if not args.no_old:
            headline["loader_vs_old_loader"] = round(new["tps"] / med["old loader"]["tps"], 2)
            headline["old_loader_tokens_per_s"] = round(med["old loader"]["tps"])
            headline["identical_to_old_loader"] = identical
        print(json.dumps(headline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

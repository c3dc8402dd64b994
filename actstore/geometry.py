"""Participation ratio of each harvested hook: how many directions the activations really use.

Why: a residual stream whose variance sits in a few directions (a "canyon" in the layer profile) is
easy for an SAE in R² and can still be hard in behaviour; the `layers` table makes that profile a query.
PR = (Σλ)²/Σλ² over the eigenvalues of the mean-centred covariance (docs/METHODS.md); "deflated" drops the
top eigen-direction first, since one outlier direction (common in residual streams) dominates the raw PR.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import polars as pl
import torch

from actstore import store as st
from actstore.model import hook_layer


def participation_ratio(eigenvalues: np.ndarray) -> float:
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    return float(lam.sum() ** 2 / (lam**2).sum()) if lam.any() else float("nan")


@dataclass(frozen=True)
class Moments:
    """A hook's first and second moments over the evaluated tokens, float64."""

    mean: np.ndarray  # μ over every position (the tokens table's sst is ‖x − μ‖²)
    cov: np.ndarray  # mean-centred covariance divided by n
    n: int
    pos_sum: np.ndarray  # (seq_len, d): Σ x over the tokens at each position, for μ of a position selection


def accum_dtype(device: str | torch.device) -> torch.dtype:
    """float64 wherever the device has it (CPU, CUDA); Apple's MPS has no float64, so float32 there."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


T = TypeVar("T")


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """`items`, each produced in a background thread while the caller works on the previous one.

    Why: reading and decoding a chunk of the store (zarr codecs release the GIL) overlaps the device's
    work on the one before, so streaming costs about max(read, compute) rather than their sum.
    """
    it = iter(items)
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(next, it, None)
        while (item := ahead.result()) is not None:
            ahead = pool.submit(next, it, None)
            yield item


def moments(group: Any, hook: str, n_seq: int, chunk: int = 64, *, device: str = "cpu") -> Moments:
    """The moments of a hook's first n_seq sequences, streamed chunk by chunk, summed on `device`.

    Eval takes its eval-set mean μ (for sst) and the per-position sums (the `positions` table, so a
    position filter can re-centre SST on its own mean) from here too, so the store is read once for all.
    Sums are float64 (`accum_dtype`): products of float32 values are exact in it, so a GPU gives the
    CPU's numbers to rounding of the sums' order.
    """
    d, seq_len = int(group["acts"][hook].shape[2]), int(group["acts"][hook].shape[1])
    dtype = accum_dtype(device)
    xtx = torch.zeros((d, d), dtype=dtype, device=device)
    pos_sum = torch.zeros((seq_len, d), dtype=dtype, device=device)
    n = 0
    spans = (slice(s, min(s + chunk, n_seq)) for s in range(0, n_seq, chunk))
    for part in prefetched(st.read_acts(group, hook, span) for span in spans):
        x = torch.from_numpy(part).to(device=device, dtype=dtype)
        pos_sum += x.sum(0)
        x = x.reshape(-1, d)
        xtx.addmm_(x.T, x)
        n += len(x)
    mean = pos_sum.sum(0) / n
    cov = xtx / n - torch.outer(mean, mean)
    return Moments(mean.cpu().numpy(), cov.cpu().numpy(), n, pos_sum.cpu().numpy())


def position_rows(store: str, hook: str, m: Moments, n_seq: int) -> pl.DataFrame:
    """The `positions` rows of one hook: per position and dimension, Σ (x − μ) over the evaluated tokens."""
    seq_len, d = m.pos_sum.shape
    dev = m.pos_sum - n_seq * m.mean
    return pl.DataFrame(
        {
            "store": [store] * (seq_len * d),
            "hook": [hook] * (seq_len * d),
            "pos": np.repeat(np.arange(seq_len), d),
            "dim": np.tile(np.arange(d), seq_len),
            "n": np.full(seq_len * d, n_seq),
            "dev_sum": dev.reshape(-1),
        }
    )


def layer_rows(store: str, max_seqs: int | None = None, known: dict | None = None) -> pl.DataFrame:
    """One `layers` row per hook of `store`: PR raw and deflated, total variance, top eigenvalue share.

    `known` maps hooks to `moments` already computed over the same sequences.
    """
    group = st.open_store(store)
    n_seq = min(st.committed(group), max_seqs or st.committed(group))
    rows = []
    for hook in st.hooks_of(group):
        m = (known or {}).get(hook) or moments(group, hook, n_seq)
        cov, n = m.cov, m.n
        lam = np.linalg.eigvalsh(cov)[::-1]
        rows.append(
            {
                "store": str(store),
                "model": group.attrs.get("model", {}).get("name"),
                "hook": hook,
                "layer": hook_layer(hook),
                "d_model": int(cov.shape[0]),
                "n_tokens": n,
                "pr": participation_ratio(lam),
                "pr_deflated": participation_ratio(lam[1:]),
                "variance": float(lam.sum()),
                "top_share": float(lam[0] / lam.sum()),
            }
        )
    return pl.DataFrame(rows)

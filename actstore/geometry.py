"""Participation ratio of each harvested hook: how many directions the activations really use.

Why: a residual stream whose variance sits in a few directions (a "canyon" in the layer profile) is
easy for an SAE in R² and can still be hard in behaviour; the `layers` table makes that profile a query.
PR = (Σλ)²/Σλ² over the eigenvalues of the mean-centred covariance (docs/METHODS.md); "deflated" drops the
top eigen-direction first, since one outlier direction (common in residual streams) dominates the raw PR.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from actstore import store as st
from actstore.model import hook_layer


def participation_ratio(eigenvalues: np.ndarray) -> float:
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0, None)
    return float(lam.sum() ** 2 / (lam**2).sum()) if lam.any() else float("nan")


def moments(group: Any, hook: str, n_seq: int, chunk: int = 64) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, mean-centred covariance divided by n, n) of a hook's first n_seq sequences, float64, streamed.

    Eval takes its eval-set mean μ (for sst) from here too, so the store is read once for both.
    """
    d = int(group["acts"][hook].shape[2])
    xtx, total, n = np.zeros((d, d)), np.zeros(d), 0
    for s in range(0, n_seq, chunk):
        x = st.read_acts(group, hook, slice(s, min(s + chunk, n_seq))).reshape(-1, d).astype(np.float64)
        xtx += x.T @ x
        total += x.sum(0)
        n += len(x)
    mean = total / n
    return mean, xtx / n - np.outer(mean, mean), n


def layer_rows(store: str, max_seqs: int | None = None, known: dict | None = None) -> pl.DataFrame:
    """One `layers` row per hook of `store`: PR raw and deflated, total variance, top eigenvalue share.

    `known` maps hooks to `moments` already computed over the same sequences.
    """
    group = st.open_store(store)
    n_seq = min(st.committed(group), max_seqs or st.committed(group))
    rows = []
    for hook in st.hooks_of(group):
        _, cov, n = (known or {}).get(hook) or moments(group, hook, n_seq)
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

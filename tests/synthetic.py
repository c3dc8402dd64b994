"""Stores of synthetic activations with a known answer: sparse codes over a known dictionary."""

from __future__ import annotations

import numpy as np
import torch

from actstore import store as st


def sparse_dictionary_data(n_tokens: int, d: int, n_atoms: int, k: int, noise: float = 0.01, seed: int = 0):
    """x = Σ_j c_j D[i_j] + noise, with k atoms per token and positive magnitudes; returns (x, D)."""
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_atoms, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = np.argsort(rng.random((n_tokens, n_atoms)), axis=1)[:, :k]
    mags = rng.uniform(1.0, 3.0, (n_tokens, k))
    x = np.einsum("nk,nkd->nd", mags, D[idx]) + noise * rng.standard_normal((n_tokens, d))
    return x.astype(np.float32), D.astype(np.float32)


def write_store(
    path: str,
    acts: np.ndarray,
    hook: str = "blocks.0.hook_resid_post",
    model: str = "synthetic",
    chunk_seqs: int = 16,
    dtype: str = "float32",
) -> str:
    """A complete store holding `acts` (n_seq, seq_len, d) at `hook`, as harvest would leave it (any stored
    dtype, bfloat16 included, rounded as harvest rounds)."""
    n_seq, seq_len, d = acts.shape
    settings = {"model": model, "seq_len": seq_len, "dtype": dtype}
    g = st.create_store(
        path,
        n_seq=n_seq,
        seq_len=seq_len,
        hook_dims={hook: d},
        dtype=dtype,
        codec="lz4",
        chunk_seqs=chunk_seqs,
        shard_seqs=None,
        attrs={"settings": settings, "model": {"name": model}, "seq_len": seq_len, "n_seq": n_seq},
    )
    g["tokens"][:] = np.zeros((n_seq, seq_len), dtype=np.int32)
    g["acts"][hook][:] = st.to_stored(torch.from_numpy(np.ascontiguousarray(acts, dtype=np.float32)), dtype)
    st.commit(g, n_seq)
    return path

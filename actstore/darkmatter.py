"""`actstore darkmatter`: how much of an SAE's error is a linear function of the input.

Why (Engels, Smith & Tegmark, "Decomposing the dark matter of sparse autoencoders"): if a linear map of
x predicts the error e = x − x̂, that part of the "dark matter" is structure the SAE missed, not noise.
From the eval store's activations and the reconstructions eval wrote, this fits on even sequences and
scores on odd ones (METHODS.md):
- the linear error probe x → e (LinearError; NonlinearError = e − LinearError): vector R² and the FVU
  split into linear and nonlinear parts;
- the norm prediction test: x → ‖e‖², ‖x‖², ‖x̂‖², ‖NonlinearError‖², held-out R² each.
Rows go to the `darkmatter` table; the probe is saved so `actstore eval --darkmatter` can patch
x̂ + LinearError and x̂ + NonlinearError.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from actstore import records as rec
from actstore import store as st
from actstore.errors import StoreError, UsageError


def fit_affine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares y ≈ [x, 1] @ W (float64); W has d_x + 1 rows, the last the intercept."""
    a = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    return np.linalg.lstsq(a, y.astype(np.float64), rcond=None)[0]


def apply_affine(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w[:-1] + w[-1]


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-column 1 − SS_res/SS_tot (a 1-D y gives a scalar)."""
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def probe_path(run: str | Path, sae_id: str) -> Path:
    return Path(run) / "darkmatter" / sae_id / "probe.safetensors"


def load_probe(run: str | Path, sae_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W, b) of the linear error probe, LinearError(x) = x @ W + b; None if none was fitted."""
    path = probe_path(run, sae_id)
    if not path.is_file():
        return None
    t = load_file(str(path))
    return t["W"], t["b"]


def analyse(x: np.ndarray, xh: np.ndarray, fit: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Dark-matter numbers of one SAE on (n, d) tokens; `fit` marks the fit split. Returns (row, W)."""
    e = x - xh
    test = ~fit
    w = fit_affine(x[fit], e[fit])
    lin = apply_affine(w, x[test])
    nonlin = e[test] - lin
    sst = ((x[test] - x[test].mean(0)) ** 2).sum()
    targets = {
        "err": (e**2).sum(1),
        "x": (x.astype(np.float64) ** 2).sum(1),
        "recon": (xh.astype(np.float64) ** 2).sum(1),
    }
    nonlin_all = e - apply_affine(w, x)
    targets["nonlinear"] = (nonlin_all**2).sum(1)
    row = {
        "n_fit": int(fit.sum()),
        "n_test": int(test.sum()),
        "vector_r2": float(np.mean(r2_score(e[test].astype(np.float64), lin))),
        "fvu": float((e[test].astype(np.float64) ** 2).sum() / sst),
        "fvu_linear": float((lin**2).sum() / sst),
        "fvu_nonlinear": float((nonlin**2).sum() / sst),
    }
    for name, y in targets.items():
        wn = fit_affine(x[fit], y[fit])
        row[f"norm_r2_{name}"] = float(r2_score(y[test], apply_affine(wn, x[test])))
    return row, w


def darkmatter(run: str, *, max_seqs: int | None = None, progress: bool = False) -> pl.DataFrame:
    """Fit the probes of every evaluated SAE of RUN; writes the `darkmatter` table and the probe weights."""
    saes, evals = rec.read_table(run, "saes"), rec.read_table(run, "evals")
    if saes.is_empty() or evals.is_empty():
        raise UsageError(f"{run} has no eval records; run `actstore eval EVAL_STORE --run {run}` first")
    rows = []
    for sae in saes.iter_rows(named=True):
        sae_id, hook = sae["sae_id"], sae["hook"]
        ev = evals.filter(pl.col("sae_id") == sae_id).row(0, named=True)
        group = st.open_store(ev["store"])
        try:
            arr = group[f"recon/{sae_id}/{hook}"]
        except KeyError:
            raise StoreError(f"{ev['store']} has no recon/{sae_id}/{hook}; re-run `actstore eval` for it") from None
        n_seq = min(int(ev["n_seq"]), max_seqs or int(ev["n_seq"]))
        if n_seq < 2:
            raise UsageError(f"{sae_id} was evaluated on {n_seq} sequence; dark matter needs at least 2 (fit/test)")
        x = st.read_acts(group, hook, slice(0, n_seq))
        xh = st.to_float32(arr[:n_seq], arr.attrs.get("actstore_dtype", "float32"))
        seq_len, d = x.shape[1], x.shape[2]
        fit = np.repeat(np.arange(n_seq) % 2 == 0, seq_len)  # even sequences fit, odd ones score
        row, w = analyse(x.reshape(-1, d), xh.reshape(-1, d), fit)
        path = probe_path(run, sae_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({"W": torch.from_numpy(w[:-1]).float(), "b": torch.from_numpy(w[-1]).float()}, str(tmp))
        tmp.replace(path)
        frame = pl.DataFrame([{"hook": hook, "store": ev["store"], **row, "probe": str(path)}])
        rec.write_parts(run, sae_id, {"darkmatter": frame})
        rows.append({"sae_id": sae_id, **frame.row(0, named=True)})
        if progress:
            print(f"darkmatter {sae_id}: vector R² {row['vector_r2']:.3f}", file=sys.stderr)
    return pl.DataFrame(rows)

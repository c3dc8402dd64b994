"""`actstore darkmatter`: how much of an SAE's error is a linear function of the input.

Why (Engels, Smith & Tegmark, "Decomposing the dark matter of sparse autoencoders"): if a linear map of
x predicts the error e = x − x̂, that part of the "dark matter" is structure the SAE missed, not noise.
From the eval store's activations and the reconstructions eval wrote, this fits on even sequences and
scores on odd ones (docs/METHODS.md):
- the linear error probe x → e (LinearError; NonlinearError = e − LinearError): vector R² and the FVU
  split into linear and nonlinear parts;
- the norm prediction test: x → ‖e‖², ‖x‖², ‖x̂‖², ‖NonlinearError‖², held-out R² each;
- on the held-out sequences, the model with x̂ + LinearError and with x̂ + NonlinearError patched in
  (through actstore/patching.py, as eval patches): how much of the SAE's CE gap each part closes.
It reads eval's records and reconstructions and writes its own tables (`darkmatter`,
`darkmatter_tokens`) and the probe's weights: eval and dark matter meet only through files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file

from actstore import atomic, diskspace, distributed, integrity, objstore
from actstore import run as rundir
from actstore import store as st
from actstore.errors import UsageError
from actstore.geometry import accum_dtype, prefetched
from actstore.model import COMPUTE_DTYPES, LoadedModel, check_runtime, load_model
from actstore.options import option, positive
from actstore.patching import Patcher, batches, place
from actstore.progress import token_bar
from actstore.pursuit import gradient_pursuit
from actstore.recon import read_recon
from actstore.saeio import EvalSAE, load_eval_sae
from actstore.writer_lock import exclusive

PROBES = ("linear", "affine")  # 004 Eq. 10/11: y ≈ b·x (linear); affine adds an intercept (our earlier choice)


CHUNK_TOKENS = 1 << 13  # tokens per chunk of the fits: a few (8k × d) float64 tensors, ~150 MB each at d = 2304

Chunk = dict[str, torch.Tensor]  # "x", "xh" (n, d) and "fit" (n,) bool; "xh_prev" (n, d) with --prev-layer
Source = Callable[[], Iterator[Chunk]]  # a fresh pass over the tokens on each call


def _z(x: torch.Tensor) -> torch.Tensor:
    """[x, 1]: the regressors and the intercept's column."""
    return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def _plus(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(1)


def _centred(gram: torch.Tensor, cross: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(n, μ, ȳ, Σ(x−μ)(x−μ)ᵀ, Σ(x−μ)(y−ȳ)ᵀ) from the sums of z = [x, 1]: z's last column counts and sums."""
    n = gram[-1, -1]
    mu, ybar = gram[:-1, -1] / n, cross[-1] / n
    return n, mu, ybar, gram[:-1, :-1] - n * torch.outer(mu, mu), cross[:-1] - n * torch.outer(mu, ybar)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹b for a symmetric positive semi-definite a (a Gram matrix), accurately and stably.

    Cholesky of the Jacobi-scaled a (unit diagonal: columns of very different scales do not spoil the
    pivots), then one step of iterative refinement on the unscaled system. Where a is numerically singular
    (a dead dimension, collinear regressors) the minimum-norm solution through its eigenvalues, as lstsq
    gives: an eigenvalue below d·ε of the largest counts as zero.
    """
    diag = a.diagonal().clamp_min(0).sqrt()
    s = torch.where(diag > 0, 1 / diag, torch.ones_like(diag))[:, None]
    chol, info = torch.linalg.cholesky_ex(a * s * s.T)
    pivots = chol.diagonal() ** 2
    eps = torch.finfo(a.dtype).eps
    if int(info) == 0 and bool(pivots.min() > len(a) * eps * pivots.max()):
        x = s * torch.cholesky_solve(b * s, chol)
        return x + s * torch.cholesky_solve((b - a @ x) * s, chol)
    lam, v = torch.linalg.eigh(a)
    keep = lam > len(a) * eps * lam.max().clamp_min(torch.finfo(a.dtype).tiny)
    return v[:, keep] @ ((v[:, keep].T @ b) / lam[keep, None])


def solve(gram: torch.Tensor, cross: torch.Tensor, intercept: bool) -> torch.Tensor:
    """Least-squares W of y ≈ [x, 1] @ W from the fit side's sums (d + 1 rows, the last the intercept, 0
    without one). With an intercept the system is solved centred: the mean's direction, often far larger
    than the spread in a residual stream, would otherwise dominate the Gram matrix's conditioning."""
    if not intercept:
        w = spd_solve(gram[:-1, :-1], cross[:-1])
        return torch.cat([w, torch.zeros_like(w[:1])])
    _, mu, ybar, sxx, sxy = _centred(gram, cross)
    w = spd_solve(sxx, sxy)
    return torch.cat([w, (ybar - mu @ w)[None]])


class Sums:
    """Normal-equation sums of one regressor x and named targets y, the fit and the test sides apart.

    Why: ZᵀZ and Zᵀy (z = [x, 1]) are all a least-squares fit needs, and with the test side's Σy² all its
    held-out R² needs too, in O(d²) memory; lstsq on the (n, d + 1) float64 matrix took O(n·d) (18 GB for
    1M tokens at d = 2304). The Gram matrices depend on x alone, so one is shared by every fit on x, and
    across the SAEs of a hook (`gram`).
    """

    def __init__(self, gram: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.gram: list[torch.Tensor | None] = list(gram) if gram is not None else [None, None]  # fit, test
        self.known = gram is not None
        self.cross: dict[str, list[torch.Tensor | None]] = {}
        self.sq: dict[str, torch.Tensor] = {}  # the test side's Σy² per column

    def add(self, x: torch.Tensor, fit: torch.Tensor, targets: dict[str, torch.Tensor], gram: bool = True) -> None:
        z = _z(x)
        sides = (z[fit], z[~fit])
        if gram and not self.known:
            for k, zk in enumerate(sides):
                self.gram[k] = _plus(self.gram[k], zk.T @ zk)
        for name, y in targets.items():
            y = y.reshape(len(z), -1)
            ys = (y[fit], y[~fit])
            cross = self.cross.setdefault(name, [None, None])
            for k, zk in enumerate(sides):
                cross[k] = _plus(cross[k], zk.T @ ys[k])
            self.sq[name] = _plus(self.sq.get(name), (ys[1] * ys[1]).sum(0))

    def n(self, side: int) -> int:
        return int(self.gram[side][-1, -1])

    def coef(self, name: str, intercept: bool) -> torch.Tensor:
        return solve(self.gram[0], self.cross[name][0], intercept)

    def residual(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Per column, Σ (y − [x, 1] @ W)² over the test side, from its sums, in centred form: the terms
        cancel down to the residual from the size of the spread, not of the raw values."""
        n, mu, ybar, sxx, sxy = _centred(self.gram[1], self.cross[name][1])
        b, off = w[:-1], mu @ w[:-1] + w[-1] - ybar
        return self.total(name) - 2 * (b * sxy).sum(0) + ((sxx @ b) * b).sum(0) + n * off * off

    def total(self, name: str) -> torch.Tensor:
        """Per column, Σ (y − ȳ)² over the test side (ȳ: the test side's mean, as R² takes it)."""
        c = self.cross[name][1]
        return self.sq[name] - c[-1] * c[-1] / self.gram[1][-1, -1]

    def r2(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return 1 - self.residual(name, w) / self.total(name)

    def sst(self) -> torch.Tensor:
        """Σ ‖x − x̄‖² over the test side: the FVU's denominator."""
        g = self.gram[1]
        mu = g[:-1, -1] / g[-1, -1]
        return g.diagonal()[:-1].sum() - g[-1, -1] * (mu * mu).sum()


def _float(v: torch.Tensor) -> float:
    return float(v.mean())


def array_source(
    arrays: dict[str, np.ndarray], fit: np.ndarray, device: str = "cpu", rows: int = CHUNK_TOKENS
) -> Source:
    """Chunks of in-memory (n, d) token arrays, on `device` in its accumulation dtype."""
    dtype = accum_dtype(device)

    def chunks() -> Iterator[Chunk]:
        for s in range(0, len(fit), rows):
            part = slice(s, s + rows)
            out = {k: torch.from_numpy(np.ascontiguousarray(v[part])).to(device, dtype) for k, v in arrays.items()}
            yield out | {"fit": torch.from_numpy(np.asarray(fit[part], dtype=bool)).to(device)}

    return chunks


def store_source(
    group: Any, hook: str, sae_id: str, n_seq: int, min_pos: int, device: str, prev: tuple[str, str] | None = None
) -> Source:
    """Chunks of whole sequences of the eval store, positions ≥ min_pos: x, eval's x̂ (and the x̂ of the SAE
    `prev` = (hook, sae_id) one layer below), read one chunk ahead; even sequences fit, odd ones score."""
    seq_len = int(group["tokens"].shape[1]) - min_pos
    per, dtype = max(1, CHUNK_TOKENS // seq_len), accum_dtype(device)

    def read(span: slice) -> dict[str, np.ndarray]:
        out = {"x": st.read_acts(group, hook, span), "xh": read_recon(group, hook, sae_id, span)}
        if prev is not None:
            out["xh_prev"] = read_recon(group, prev[0], prev[1], span)
        out = {k: v[:, min_pos:].reshape(-1, v.shape[2]) for k, v in out.items()}
        return out | {"fit": np.repeat(np.arange(span.start, span.stop) % 2 == 0, seq_len)}

    def chunks() -> Iterator[Chunk]:
        spans = (slice(s, min(n_seq, s + per)) for s in range(0, n_seq, per))
        for part in prefetched(read(span) for span in spans):
            yield {k: torch.from_numpy(v).to(device, torch.bool if k == "fit" else dtype) for k, v in part.items()}

    return chunks


def probe_row(s: Sums, w: torch.Tensor, intercept: bool) -> dict[str, float]:
    """The first pass's numbers: the error probe's vector R² and FVU split, and three norm predictions."""
    sst = s.sst()
    row = {
        "n_fit": s.n(0),
        "n_test": s.n(1),
        "vector_r2": _float(s.r2("e", w)),
        "fvu": float(s.sq["e"].sum() / sst),
        "fvu_nonlinear": float(s.residual("e", w).sum() / sst),
    }
    # 004 (Fig. 1): the linear part is what the nonlinear error leaves of the FVU. ‖LinearError‖²/SST would not
    # add up on held-out data (the cross term 2Σ⟨lin, nonlin⟩ is zero only on the fit split).
    row["fvu_linear"] = row["fvu"] - row["fvu_nonlinear"]
    for name in ("err", "x", "recon"):
        row[f"norm_r2_{name}"] = float(s.r2(name, s.coef(name, intercept))[0])
    return row


def _prev_targets(c: Chunk, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the x̂ of the SAE below predicts: this SAE's error, its LinearError and its NonlinearError."""
    e = c["x"] - c["xh"]
    linear = _z(c["x"]) @ w
    return {"err": e, "linear": linear, "nonlinear": e - linear}


def _prev_row(p: Sums, intercept: bool) -> dict[str, float]:
    return {f"prev_r2_{name}": _float(p.r2(name, p.coef(name, intercept))) for name in ("err", "linear", "nonlinear")}


def analyse_source(
    source: Source,
    probe: str = "linear",
    *,
    pursuit: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prev: bool = False,
    gram: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[dict[str, float], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Dark-matter numbers of one SAE in two streamed passes; returns (row, W, x's Gram matrices).

    Pass 1 sums the fits of e, ‖e‖², ‖x‖², ‖x̂‖² (and pursuit's error: `pursuit` maps x to its
    reconstruction); pass 2, given the probe W, those of ‖NonlinearError‖² (and, with `prev`, the fits from
    the x̂ of the SAE below). `gram`: x's Gram matrices from an earlier SAE on the same tokens.
    """
    intercept = probe == "affine"
    s = Sums(gram)
    for c in source():
        x, xh = c["x"], c["xh"]
        e = x - xh
        targets = {"e": e, "err": _sq(e), "x": _sq(x), "recon": _sq(xh)}
        if pursuit is not None:
            targets["pursuit"] = x - pursuit(x)
        s.add(x, c["fit"], targets)
    w = s.coef("e", intercept)
    row = probe_row(s, w, intercept)
    below = Sums()
    for c in source():
        nonlinear = c["x"] - c["xh"] - _z(c["x"]) @ w
        s.add(c["x"], c["fit"], {"nonlinear": _sq(nonlinear)}, gram=False)
        if prev:
            below.add(c["xh_prev"], c["fit"], _prev_targets(c, w))
    row["norm_r2_nonlinear"] = float(s.r2("nonlinear", s.coef("nonlinear", intercept))[0])
    if pursuit is not None:
        sst = s.sst()
        row["fvu_pursuit"] = float(s.sq["pursuit"].sum() / sst)
        row["fvu_nonlinear_pursuit"] = float(s.residual("pursuit", s.coef("pursuit", intercept)).sum() / sst)
    if prev:
        row |= _prev_row(below, intercept)
    return row, w, (s.gram[0], s.gram[1])


def analyse(
    x: np.ndarray, xh: np.ndarray, fit: np.ndarray, probe: str = "linear", device: str = "cpu"
) -> tuple[dict[str, float], np.ndarray]:
    """Dark-matter numbers of one SAE on in-memory (n, d) tokens; `fit` marks the fit split; `probe` is one
    of PROBES. Returns (row, W)."""
    row, w, _ = analyse_source(array_source({"x": x, "xh": xh}, fit, device), probe)
    return row, w.cpu().numpy()


def pursuer(sae: EvalSAE) -> Callable[[torch.Tensor], torch.Tensor]:
    """x → gradient pursuit's reconstruction at each token's own L0 (004 §6.1), on the CPU in float32 as
    the SAE runs; the probe is then refitted on it and scored on the same held-out tokens as the SAE's own."""
    cpu_sae = sae.to("cpu")
    w_dec, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()

    def run(x: torch.Tensor) -> torch.Tensor:
        xt = x.float().cpu()
        l0 = torch.cat([(cpu_sae.encode(part).top_acts != 0).sum(-1) for part in xt.split(4096)])
        return gradient_pursuit(xt, w_dec, b_dec, l0).to(x.device, x.dtype)

    return run


def previous_sae(evaluated: pl.DataFrame, sae: dict[str, Any]) -> dict[str, Any]:
    """The evaluated SAE one layer below `sae` on the same store and hook kind, the closest match in k,
    expansion, budget and seed; a one-line error when there is none (004 §6.2 needs one)."""
    layer = sae["layer"]
    prev_hook = (
        None if layer is None or layer < 1 else sae["hook"].replace(f"blocks.{layer}.", f"blocks.{layer - 1}.", 1)
    )
    found = evaluated.filter(
        (pl.col("hook") == prev_hook) & (pl.col("store") == sae["store"]) & (pl.col("hook") != sae["hook"])
    )
    if prev_hook is None or found.is_empty():
        raise UsageError(
            f"--prev-layer: {sae['sae_id']} has no evaluated SAE one layer below ({prev_hook or 'no layer below'}) "
            f"on {sae['store']}; train and evaluate one at that hook, or drop --prev-layer"
        )
    same = [pl.col(c).eq(sae[c]).fill_null(False).cast(pl.Int8) for c in ("k", "expansion", "train_tokens", "seed")]
    return (
        found.with_columns(match=pl.sum_horizontal(same))
        .sort("match", "sae_id", descending=[True, False])
        .row(0, named=True)
    )


def previous_layer_r2(
    xh_prev: np.ndarray, x: np.ndarray, xh: np.ndarray, w: np.ndarray, fit: np.ndarray, probe: str = "linear"
) -> dict:
    """Held-out R² (mean over dimensions, like vector_r2) of maps (of the `probe` form) from the previous
    layer's SAE output to this SAE's error, its LinearError and its NonlinearError."""
    below = Sums()
    wt = torch.from_numpy(np.asarray(w, dtype=np.float64))
    for c in array_source({"x": x, "xh": xh, "xh_prev": xh_prev}, fit)():
        below.add(c["xh_prev"], c["fit"], _prev_targets(c, wt.to(c["x"].dtype)))
    return _prev_row(below, probe == "affine")


ERROR_PARTS = ("sae_error", "linear_error", "nonlinear_error")


def write_errors(
    group: Any, store: str, hook: str, sae_id: str, w: np.ndarray, n_evaluated: int, batch: int
) -> list[str]:
    """e, LinearError (the probe's x·W + b) and NonlinearError of every sequence of the eval store, as
    `acts/<sae_id>.<part>` arrays beside the hooks (the hook's shape, chunks, dtype and codec), recorded in
    the store's `derived` attribute: `actstore train STORE --hooks <sae_id>.linear_error` trains on them."""
    n_store = st.committed(group)
    if n_evaluated < n_store:  # eval wrote reconstructions of its sequences only
        raise UsageError(
            f"--write-errors needs {sae_id} evaluated on every sequence of {store} ({n_evaluated} of {n_store}); "
            "re-run `actstore eval` without --max-seqs"
        )
    acts = group["acts"][hook]
    codec = group.attrs.get("codec", {}).get("name", st.DEFAULT_CODEC)
    dtype = st.stored_dtype(acts)
    names = {part: f"{sae_id}.{part}" for part in ERROR_PARTS}
    arrays = {
        part: st.activation_array(
            group["acts"],
            name,
            acts.shape,
            acts.chunks,
            acts.shards,
            dtype,
            codec,
            {"hook": hook, "sae_id": sae_id, "part": part},
        )  # fmt: skip
        for part, name in names.items()
    }
    wt, bt = torch.from_numpy(w[:-1]).float(), torch.from_numpy(w[-1]).float()
    for start in range(0, n_store, batch):
        span = slice(start, min(n_store, start + batch))
        x = torch.from_numpy(st.read_acts(group, hook, span))
        e = x - torch.from_numpy(read_recon(group, hook, sae_id, span))
        linear = x @ wt + bt
        for part, value in (("sae_error", e), ("linear_error", linear), ("nonlinear_error", e - linear)):
            arrays[part][span] = st.to_stored(value, dtype)
    derived = st.derived_of(group) | {name: {"hook": hook, "sae_id": sae_id, "part": p} for p, name in names.items()}
    group.attrs["derived"] = derived
    return list(names.values())


@dataclass(frozen=True)
class DarkmatterOptions:
    """Which evaluated sequences the probes use, and how the patches run."""

    max_seqs: int | None = option(None, "Use only the first N evaluated sequences (at least 2: even fit, odd score).")
    min_pos: int = option(
        0,
        "Fit and score the probes on positions ≥ this only (study 004: > 200 of 1,024, past the early-position outliers).",
    )
    pursuit: bool = option(
        True,
        "Also re-encode with gradient pursuit at each token's own L0 (004 §6.1): fvu_pursuit, fvu_nonlinear_pursuit.",
        flag="--pursuit/--no-pursuit",
    )
    prev_layer: bool = option(
        False,
        "Predict e, LinearError and NonlinearError from the reconstructions of the SAE one layer below (004 §6.2).",
    )
    write_errors: bool = option(
        False,
        "Write e, LinearError and NonlinearError into the eval store as acts/<sae_id>.<part>, for `actstore train` (004 §5.2).",
    )
    probe: str = option(
        "linear",
        "The probes' form: linear (004 Eq. 10/11: b·x, no intercept) or affine (b·x + c).",
        choices=PROBES,
    )
    batch_size: int = option(16, "Sequences per forward pass of the patches.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    compute_dtype: str = option("float32", "Dtype the model runs in.", choices=tuple(COMPUTE_DTYPES))

    def __post_init__(self) -> None:
        positive("max_seqs", self.max_seqs, allow_none=True, minimum=2)
        positive("batch_size", self.batch_size)
        positive("min_pos", self.min_pos, minimum=0)
        check_runtime(self.device, self.compute_dtype)


def darkmatter(
    run: str,
    options: DarkmatterOptions = DarkmatterOptions(),
    *,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    only: set[str] | None = None,
) -> pl.DataFrame:
    """Fit the probes of every evaluated SAE of RUN (or of the sae_ids in `only`) and patch their parts;
    returns the `darkmatter` rows.

    Holds the writer lock of what it writes (actstore/writer_lock.py): a second writer is refused.
    """
    w = distributed.init(options.device)
    if options.write_errors and not w.single:
        raise UsageError(
            "--write-errors adds arrays to the eval store and must run in one process; drop torchrun for it"
        )
    distributed.same_everywhere(
        {"run": str(run), "only": sorted(only or []), **asdict(options)}, w, "actstore darkmatter"
    )
    if objstore.is_url(run):  # a run on object storage: worked on in a local copy, committed through its log
        with objstore.run_copy(run, "actstore darkmatter") as local:
            return _darkmatter_locked(str(local), options, progress, loaded, only, w)
    return _darkmatter_locked(run, options, progress, loaded, only, w)


def _darkmatter_locked(
    run: str,
    options: DarkmatterOptions,
    progress: bool,
    loaded: LoadedModel | None,
    only: set[str] | None,
    w: distributed.World,
) -> pl.DataFrame:
    """`darkmatter` on a run directory, under its writer lock."""
    with ExitStack() as held:
        distributed.agreed(lambda: held.enter_context(exclusive(run, "run", "actstore darkmatter")), w, True)
        with diskspace.guard(run):
            distributed.agreed(lambda: rundir.recover(run), w, leader_only=True)
            rows = _darkmatter(run, options, progress=progress, loaded=loaded, only=only, world=w)
    distributed.finish(w)
    return rows


def _darkmatter(
    run: str,
    options: DarkmatterOptions = DarkmatterOptions(),
    *,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    only: set[str] | None = None,
    world: distributed.World | None = None,
) -> pl.DataFrame:
    """The work of `darkmatter`, under its writer lock. Under torchrun the SAEs are divided among the ranks,
    each analysed exactly as in one process; every rank returns all the rows."""
    world = world or distributed.World()
    progress = progress and world.leader
    saes, evals = rundir.read_table(run, "saes"), rundir.read_table(run, "evals")
    if saes.is_empty() or evals.is_empty():
        raise UsageError(f"{run} has no eval records; run `actstore eval EVAL_STORE --run {run}` first")
    # one evaluation per SAE: the every-position one where the run has both modes (004 patches every position)
    evals = evals.sort("sae_id", "patch_pos", nulls_last=False).unique("sae_id", keep="first")
    every = saes.join(evals.select("sae_id", "store", "n_seq", "patch_pos"), on="sae_id").sort("sae_id")
    evaluated = every if only is None else every.filter(pl.col("sae_id").is_in(sorted(only)))
    below = {r["sae_id"]: previous_sae(every, r) for r in evaluated.iter_rows(named=True)} if options.prev_layer else {}
    models: dict[str, LoadedModel] = {}
    grams: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    everyone = list(evaluated.iter_rows(named=True))
    distributed.agreed(lambda: distributed.check_world_fits(len(everyone), world, "evaluated SAEs to analyse"), world)
    device = distributed.rank_device(options.device, world)
    options = replace(options, device=device)
    for sae in world.mine(everyone):
        sae_id, hook = sae["sae_id"], sae["hook"]
        group = st.open_store(sae["store"], mode="r+" if options.write_errors else "r")
        n_seq = min(int(sae["n_seq"]), options.max_seqs or int(sae["n_seq"]))
        if n_seq < 2:
            raise UsageError(f"{sae_id} was evaluated on {n_seq} sequence; dark matter needs at least 2 (fit/test)")
        if options.min_pos >= int(group["tokens"].shape[1]):
            raise UsageError(
                f"--min-pos {options.min_pos} leaves no position of {sae['store']} (sequences of {group['tokens'].shape[1]})"
            )
        here = rundir.sae_dir(run, sae_id)  # the run's own copy (a run on object storage records its cache's path)
        eval_sae = load_eval_sae(sae["path"] if Path(sae["path"]).is_dir() or not here.is_dir() else here, sae_id)
        prev = below.get(sae_id)
        source = store_source(
            group, hook, sae_id, n_seq, options.min_pos, device, prev and (prev["hook"], prev["sae_id"])
        )
        key = (sae["store"], hook, n_seq, options.min_pos)  # x's Gram matrices: the same for every SAE of a hook
        row, wt, grams[key] = analyse_source(
            source,
            options.probe,
            pursuit=pursuer(eval_sae) if options.pursuit else None,
            prev=prev is not None,
            gram=grams.get(key),
        )
        w = wt.cpu().numpy()
        if prev is not None:
            row["prev_sae_id"] = prev["sae_id"]
        if options.write_errors:
            write_errors(group, sae["store"], hook, sae_id, w, int(sae["n_seq"]), options.batch_size)
        probe = rundir.probe_path(run, sae_id)
        probe_w, probe_b = torch.from_numpy(w[:-1]).float(), torch.from_numpy(w[-1]).float()
        with atomic.replacing(probe.parent) as (stage,):
            stage.mkdir()
            save_file({"W": probe_w, "b": probe_b}, str(stage / probe.name))
            integrity.seal(stage)
        name = group.attrs.get("model", {}).get("name")
        if loaded is not None and loaded.name == name:
            models[name] = loaded
        if name not in models:
            models[name] = load_model(name, options.device, options.compute_dtype)
        patched = patch_parts(
            group, models[name], eval_sae.to(options.device), (probe_w, probe_b),
            range(1, n_seq, 2), sae["patch_pos"], options, progress,
        )  # fmt: skip
        split = {
            "min_pos": options.min_pos,
            "split": "even sequences fit, odd sequences score",
            "probe_form": options.probe,
        }
        frame = pl.DataFrame([{"hook": hook, "store": sae["store"], **split, **row, "probe": str(probe)}])
        rundir.write_tables(
            run, sae_id, {"darkmatter": frame, "darkmatter_tokens": patched.with_columns(store=pl.lit(sae["store"]))}
        )
        rows.append({"sae_id": sae_id, **rundir.conform("darkmatter", frame).row(0, named=True)})
        if progress:
            print(f"darkmatter {sae_id}: vector R² {row['vector_r2']:.3f}", file=sys.stderr)
    if not world.single:
        rows = sorted((r for part in distributed.gather(rows, world) for r in part), key=lambda r: r["sae_id"])
    return pl.DataFrame(rows)


def patch_parts(
    group: Any,
    model: LoadedModel,
    sae: EvalSAE,
    probe: tuple[torch.Tensor, torch.Tensor],
    seqs: range,
    patch_pos: int | None,
    o: DarkmatterOptions,
    progress: bool,
) -> pl.DataFrame:
    """CE and KL with x̂ + LinearError and with x̂ + NonlinearError (= x − LinearError) patched in."""
    w, b = (t.to(o.device) for t in probe)
    patcher = Patcher(model, sae.hook)
    cols: dict[str, list[np.ndarray]] = {}
    bar = token_bar(progress, len(seqs) * int(group["tokens"].shape[1]), f"darkmatter {sae.sae_id}")
    for batch in batches(group, model, patcher, seqs, o.batch_size, o.device):
        xf = batch.x.reshape(-1, batch.x.shape[2])
        xh = sae.decode(*sae.encode(xf))
        linear = xf @ w + b
        row = {k: v for k, v in batch.token_key().items() if k in ("seq", "pos")}
        e = xf - xh
        row |= {
            "err_norm": e.norm(dim=-1),
            "linear_norm": linear.norm(dim=-1),
            "nonlinear_norm": (e - linear).norm(dim=-1),
        }
        row = {k: v.cpu().numpy().astype(np.float32) if isinstance(v, torch.Tensor) else v for k, v in row.items()}
        placed = {
            name: place(batch.x_live, candidate.reshape(batch.x.shape), patch_pos)
            for name, candidate in {"linear": xh + linear, "nonlinear": xf - linear}.items()
        }
        scored = patcher.score(batch.clean, batch.tokens, list(placed.values()))  # eval's scoring, memory caps too
        host = torch.stack([column for pair in scored for column in pair]).cpu().numpy()
        for i, name in enumerate(placed):
            row[f"ce_{name}"], row[f"kl_{name}"] = host[2 * i], host[2 * i + 1]
        for key, value in row.items():
            cols.setdefault(key, []).append(value)
        if bar is not None:
            bar.update(batch.tokens.numel())
    if bar is not None:
        bar.close()
    return pl.DataFrame({k: np.concatenate(v) for k, v in cols.items()}).with_columns(pl.col(pl.Float32).fill_nan(None))

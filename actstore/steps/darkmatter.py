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
from actstore.model import COMPUTE_DTYPES, LoadedModel, check_runtime, load_model
from actstore.options import option, positive
from actstore.patching import Patcher, batches, place
from actstore.progress import token_bar
from actstore.pursuit import gradient_pursuit
from actstore.recon import read_recon
from actstore.saeio import EvalSAE, load_eval_sae
from actstore.writer_lock import exclusive

PROBES = ("linear", "affine")  # 004 Eq. 10/11: y ≈ b·x (linear); affine adds an intercept (our earlier choice)


def fit_affine(x: np.ndarray, y: np.ndarray, intercept: bool = True) -> np.ndarray:
    """Least squares y ≈ [x, 1] @ W (float64); W has d_x + 1 rows, the last the intercept (0 without one)."""
    x = x.astype(np.float64)
    if not intercept:
        w = np.linalg.lstsq(x, y.astype(np.float64), rcond=None)[0]
        return np.concatenate([w, np.zeros_like(w[:1])])
    a = np.hstack([x, np.ones((len(x), 1))])
    return np.linalg.lstsq(a, y.astype(np.float64), rcond=None)[0]


def apply_affine(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) @ w[:-1] + w[-1]


def r2_score(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Per-column 1 − SS_res/SS_tot (a 1-D y gives a scalar)."""
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def analyse(
    x: np.ndarray, xh: np.ndarray, fit: np.ndarray, probe: str = "linear"
) -> tuple[dict[str, float], np.ndarray]:
    """Dark-matter numbers of one SAE on (n, d) tokens; `fit` marks the fit split; `probe` is one of PROBES.
    Returns (row, W)."""
    e = x - xh
    test = ~fit
    intercept = probe == "affine"
    w = fit_affine(x[fit], e[fit], intercept)
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
        "fvu_nonlinear": float((nonlin**2).sum() / sst),
    }
    # 004 (Fig. 1): the linear part is what the nonlinear error leaves of the FVU. ‖LinearError‖²/SST would not
    # add up on held-out data (the cross term 2Σ⟨lin, nonlin⟩ is zero only on the fit split).
    row["fvu_linear"] = row["fvu"] - row["fvu_nonlinear"]
    for name, y in targets.items():
        wn = fit_affine(x[fit], y[fit], intercept)
        row[f"norm_r2_{name}"] = float(r2_score(y[test], apply_affine(wn, x[test])))
    return row, w


def pursuit_row(sae: EvalSAE, x: np.ndarray, fit: np.ndarray, probe: str = "linear") -> dict[str, float]:
    """FVU and nonlinear FVU of gradient pursuit's reconstructions at each token's own L0 (004 §6.1): the
    probe refitted on them, scored on the same held-out tokens as the SAE's own numbers."""
    xt = torch.from_numpy(x).float()
    w_dec, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    cpu_sae = sae.to("cpu")
    l0 = torch.cat([(cpu_sae.encode(part).top_acts != 0).sum(-1) for part in xt.split(4096)])
    x_gp = gradient_pursuit(xt, w_dec, b_dec, l0).numpy()
    gp, _ = analyse(x, x_gp, fit, probe)
    return {"fvu_pursuit": gp["fvu"], "fvu_nonlinear_pursuit": gp["fvu_nonlinear"]}


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
    e = (x - xh).astype(np.float64)
    linear = apply_affine(w, x)
    out = {}
    for name, y in (("err", e), ("linear", linear), ("nonlinear", e - linear)):
        wp = fit_affine(xh_prev[fit], y[fit], probe == "affine")
        out[f"prev_r2_{name}"] = float(np.mean(r2_score(y[~fit], apply_affine(wp, xh_prev[~fit]))))
    return out


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
        x = st.read_acts(group, hook, slice(0, n_seq))[:, options.min_pos :]
        xh = read_recon(group, hook, sae_id, slice(0, n_seq))[:, options.min_pos :]
        seq_len, d = x.shape[1], x.shape[2]
        fit = np.repeat(np.arange(n_seq) % 2 == 0, seq_len)  # even sequences fit, odd ones score
        x, xh = x.reshape(-1, d), xh.reshape(-1, d)
        row, w = analyse(x, xh, fit, options.probe)
        here = rundir.sae_dir(run, sae_id)  # the run's own copy (a run on object storage records its cache's path)
        eval_sae = load_eval_sae(sae["path"] if Path(sae["path"]).is_dir() or not here.is_dir() else here, sae_id)
        if options.pursuit:
            row |= pursuit_row(eval_sae, x, fit, options.probe)
        if options.prev_layer:
            prev = below[sae_id]
            xh_prev = read_recon(group, prev["hook"], prev["sae_id"], slice(0, n_seq))[:, options.min_pos :]
            row |= {
                "prev_sae_id": prev["sae_id"],
                **previous_layer_r2(xh_prev.reshape(-1, d), x, xh, w, fit, options.probe),
            }
        del x, xh
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
        for name, candidate in {"linear": xh + linear, "nonlinear": xf - linear}.items():
            replacement = place(batch.x_live, candidate.reshape(batch.x.shape), patch_pos)
            row[f"ce_{name}"], row[f"kl_{name}"] = batch.clean.score(patcher.logits(batch.tokens, replacement))
        for key, value in row.items():
            cols.setdefault(key, []).append(value)
        if bar is not None:
            bar.update(batch.tokens.numel())
    if bar is not None:
        bar.close()
    return pl.DataFrame({k: np.concatenate(v) for k, v in cols.items()}).with_columns(pl.col(pl.Float32).fill_nan(None))

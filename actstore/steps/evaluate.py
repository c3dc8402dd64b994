"""`actstore eval`: per-token records of SAEs on an eval store, running the model once.

Why this shape: every later question (R² vs CE, KL gaps, error predictability, bootstrap CIs) needs many
numbers per token, so they are all computed here, in one pass, and written as Parquet (the tables of
actstore/tables.py). Per batch the clean prefix runs once (actstore/patching.py); per SAE the patches
are its x̂, zero ablation and the baselines of its error's size (actstore/metrics.py), each scored
against the clean distribution. Reconstructions go into the eval store as `recon/<sae_id>/<hook>`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from actstore import __version__, diskspace, distributed
from actstore import run as rundir
from actstore import store as st
from actstore.draws import check_draws, draw_batch
from actstore.errors import StoreError, UsageError
from actstore.geometry import moments, position_rows
from actstore.metrics import activation_columns, baselines, rate_and_latents, sequence_generators, to_host
from actstore.model import COMPUTE_DTYPES, LoadedModel, check_runtime, load_model
from actstore.options import option, positive
from actstore.patching import Batch, Patcher, batches, check_whole_fits, place
from actstore.progress import plural_saes, token_bar
from actstore.recon import recon_array
from actstore.saeio import EvalSAE, load_eval_sae
from actstore.sensitivity import BatchSensitivity, check_differentiable
from actstore.steps.layers import write_layers
from actstore.writer_lock import exclusive_all


@dataclass(frozen=True)
class EvalOptions:
    """How SAEs are evaluated; stored as JSON with every evaluation."""

    batch_size: int = option(16, "Sequences per forward pass.")
    seed: int = option(0, "Seed of the random baselines (stored with the records).")
    patch_pos: int | None = option(
        None,
        "Single-position mode: patch only this position, record every position (kept beside the every-position records).",
    )
    eps_draws: int | None = option(
        None,
        "With --patch-pos P: N ε-random draws at P per sequence, the SAE's KL as a z-score among them (study 001).",
    )
    sensitivity: bool = option(
        False,
        "Also the gradient at the hook and the pullback Fisher of every patch: grad_norm, iso_sens, fo_*, swd_*.",
        flag="--sensitivity/--no-sensitivity",
    )
    probes: int = option(8, "Hutchinson probes per batch for iso_sens (with --sensitivity).")
    max_seqs: int | None = option(None, "Evaluate only the first N sequences of the store.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    compute_dtype: str = option("float32", "Dtype the model runs in.", choices=tuple(COMPUTE_DTYPES))

    def __post_init__(self) -> None:
        positive("batch_size", self.batch_size)
        positive("max_seqs", self.max_seqs, allow_none=True)
        positive("patch_pos", self.patch_pos, allow_none=True, minimum=0)
        positive("eps_draws", self.eps_draws, allow_none=True, minimum=2)
        positive("probes", self.probes)
        if self.eps_draws is not None and self.patch_pos is None:
            raise UsageError("--eps-draws needs --patch-pos P: the draws replace one position (study 001 used 48)")
        check_runtime(self.device, self.compute_dtype)


def evaluate(
    eval_store: str,
    run: str,
    sae_paths: list[str] | None = None,
    options: EvalOptions = EvalOptions(),
    *,
    progress: bool = False,
    loaded: LoadedModel | None = None,
) -> list[str]:
    """Evaluate SAEs (all of RUN/saes, or `sae_paths`) on `eval_store`; returns the evaluated sae_ids.

    `loaded` reuses a model already booted for the store's model (benchmarks, notebooks).

    Holds the writer lock of what it writes (actstore/writer_lock.py): a second writer is refused.
    """
    from actstore import objstore

    w = distributed.init(options.device)
    distributed.same_everywhere(
        {"store": str(eval_store), "run": str(run), "saes": list(sae_paths or []), **asdict(options)},
        w,
        "actstore eval",
    )
    if objstore.is_url(run):  # a run on object storage: worked on in a local copy, committed through its log
        with objstore.run_copy(run, "actstore eval") as local:
            return _evaluate_locked(eval_store, str(local), sae_paths, options, progress, loaded, w, one_writer=True)
    return _evaluate_locked(eval_store, run, sae_paths, options, progress, loaded, w, one_writer=False)


def _evaluate_locked(
    eval_store: str,
    run: str,
    sae_paths: list[str] | None,
    options: EvalOptions,
    progress: bool,
    loaded: LoadedModel | None,
    w: distributed.World,
    one_writer: bool,
) -> list[str]:
    """`evaluate` on a run directory, under the writer locks. `one_writer`: rank 0 writes every record
    (each rank's copy of a run on object storage is its own, so the ranks' shares cannot meet in one)."""
    needed = lambda: eval_bytes(eval_store, run, sae_paths, options)  # noqa: E731
    with ExitStack() as held:
        locks = exclusive_all("actstore eval", (run, "run"), (eval_store, "store"))
        distributed.agreed(lambda: held.enter_context(locks), w, leader_only=True)
        with diskspace.guard(run, needed):
            distributed.agreed(lambda: rundir.recover(run), w, leader_only=True)
            done = _evaluate(
                eval_store, run, sae_paths, options, progress=progress, loaded=loaded, w=w, one_writer=one_writer
            )
    distributed.finish(w)
    return done


def eval_bytes(eval_store: str, run: str, sae_paths: list[str] | None, o: EvalOptions) -> int:
    """About what an evaluation writes: per SAE its reconstruction in the store's dtype and its records
    (≈ 100 bytes a token, the measured size of a row with its codes)."""
    group = st.open_store(eval_store)
    n_seq, seq_len = group["tokens"].shape
    tokens = min(n_seq, o.max_seqs or n_seq) * seq_len
    itemsize, total = 4 if group.attrs.get("dtype") == "float32" else 2, 0
    for path in sae_paths or rundir.trained_sae_dirs(run):
        cfg = json.loads((Path(path) / "cfg.json").read_text())
        total += tokens * (int(cfg["d_in"]) * itemsize + 100)
    return total


def _evaluate(
    eval_store: str,
    run: str,
    sae_paths: list[str] | None = None,
    options: EvalOptions = EvalOptions(),
    *,
    progress: bool = False,
    loaded: LoadedModel | None = None,
    w: distributed.World | None = None,
    one_writer: bool = False,
) -> list[str]:
    """The work of `evaluate`, under its writer lock. Under torchrun each rank evaluates whole units of
    sequences (chunk-aligned batches, so no two ranks write one reconstruction chunk; draws are per sequence) and
    writes its share of the per-token tables; rank 0 writes what is about all of them."""
    w = w or distributed.World()
    group = st.open_store(eval_store, mode="r+")
    if w.leader:
        st.clear_leftovers(eval_store)  # a killed eval's half-written reconstruction chunks (we hold the lock)
    n_store = int(group["tokens"].shape[0])
    if st.committed(group) < n_store:
        raise StoreError(
            f"{eval_store} is incomplete ({st.committed(group)} of {n_store} sequences); finish its harvest first"
        )
    model_name = group.attrs.get("model", {}).get("name")
    saes = load_saes(run, sae_paths, model_name)
    derived = st.derived_of(group)  # SAEs trained on darkmatter's error arrays: nothing to patch into the model
    if sae_paths and any(s.hook in derived for s in saes):
        raise UsageError(f"{eval_store}'s {next(s.hook for s in saes if s.hook in derived)} is not a model hook: "
                         "SAEs trained on darkmatter's error arrays have no place in the model to patch; "
                         "compare them with `actstore sql RUN --query error_saes`")  # fmt: skip
    saes = [s for s in saes if s.hook not in derived]
    if not saes:
        raise UsageError(f"{run}'s SAEs are all trained on error arrays; there is nothing to evaluate in the model")
    hooks = st.hooks_of(group)
    for s in saes:
        d = int(st.acts_array(group, s.hook, eval_store, who=f"SAE {s.sae_id}").shape[2])
        if s.d_in != d:
            raise UsageError(f"SAE {s.sae_id} has d_in {s.d_in} but {s.hook} in {eval_store} is {d} wide")
    seq_len = int(group["tokens"].shape[1])
    if options.patch_pos is not None and options.patch_pos >= seq_len:
        raise UsageError(f"--patch-pos {options.patch_pos} is outside the sequence (0…{seq_len - 1})")
    n_seq = min(n_store, options.max_seqs or n_store)
    if options.eps_draws is not None:
        check_draws(options.eps_draws, n_seq)
    unit = options.batch_size if w.single else math.lcm(options.batch_size, _write_unit(group))
    n_units = -(-n_seq // unit)
    distributed.agreed(
        lambda: distributed.check_world_fits(n_units, w, f"work units (chunk-aligned batches of {unit} sequences)"),
        w,
    )
    seqs = [q for u in w.mine(range(n_units)) for q in range(u * unit, min((u + 1) * unit, n_seq))]
    model = loaded or load_model(model_name, distributed.rank_device(options.device, w), options.compute_dtype)
    device = model.device
    # μ for sst, and the layers table's covariance: one pass over the store, on rank 0, shared
    stats = distributed.broadcast({h: moments(group, h, n_seq) for h in hooks} if w.leader else None, w)
    known = rundir.read_table(run, "saes")
    known_ids = set(known["sae_id"]) if known.height else set()
    done = []
    part = "0" if options.patch_pos is None else f"pos{options.patch_pos}"
    share = None if w.single else (w.rank, w.size)
    for hook in dict.fromkeys(s.hook for s in saes):
        hook_saes = [s.to(device) for s in saes if s.hook == hook]
        mu = torch.from_numpy(stats[hook].mean).float().to(device)
        frames = _evaluate_hook(group, eval_store, model, hook, hook_saes, seqs, n_seq, options, progress, mu, w)
        # decided before anyone writes: the SAE's codes do not depend on where eval patched
        skip_codes = {s.sae_id: part != "0" and rundir.has_part(run, "codes", s.sae_id) for s in hook_saes}
        skip_codes = distributed.broadcast(skip_codes, w)
        gathered = one_writer and not w.single
        if gathered:  # the ranks' rows meet on rank 0, which writes them as one process
            for s in hook_saes:
                mine = frames[s.sae_id]
                shares = distributed.gather({t: f for t, f in mine.items() if t not in _ABOUT_ALL}, w)
                if w.leader:
                    whole = {t: pl.concat([share_[t] for share_ in shares]) for t in shares[0]}
                    whole |= {t: mine[t] for t in _ABOUT_ALL}
                    _write_sae(run, s, group, whole, part, None, skip_codes[s.sae_id], s.sae_id not in known_ids)
        for turn in range(0 if gathered else w.size):  # ranks write their shares in turn, rank 0 first
            if turn == w.rank:
                for s in hook_saes:
                    _write_sae(
                        run,
                        s,
                        group,
                        frames[s.sae_id],
                        part,
                        share,
                        skip_codes[s.sae_id],
                        w.leader and s.sae_id not in known_ids,
                    )
            distributed.barrier(w)
        done += [s.sae_id for s in hook_saes]
        if w.leader:
            positions = position_rows(str(eval_store), hook, stats[hook], n_seq)
            rundir.write_tables(run, rundir.hash_key(f"{eval_store}\n{hook}"), {"positions": positions})
    if w.leader:
        write_layers(eval_store, run, max_seqs=n_seq, known=stats)  # the geometry of every hook of the eval store
        _write_vocab(run, model, model_name, st.read_tokens(group, slice(0, n_seq)))
    distributed.barrier(w)
    return done


_ABOUT_ALL = ("latents", "evals")  # tables about the whole evaluation: rank 0 writes them whole


def _write_sae(
    run: str,
    s: EvalSAE,
    group: Any,
    mine: dict[str, pl.DataFrame],
    part: str,
    share: tuple[int, int] | None,
    skip_codes: bool,
    external: bool,
) -> None:
    """One SAE's records: its share of the per-token tables (all of them in one process), and on rank 0
    (`share` None or rank 0) the tables about the whole evaluation."""
    if external:  # an external SAE: train wrote no row for it
        rundir.write_tables(run, s.sae_id, {"saes": _saes_row(s, group)})
    if share is None:  # one process: the tables of a part together, then the codes with their latents
        rundir.write_tables(run, s.sae_id, {t: f for t, f in mine.items() if t not in ("codes", "latents")}, part)
        if not skip_codes:
            rundir.write_tables(run, s.sae_id, {"codes": mine["codes"], "latents": mine["latents"]})
        return
    leader = share[0] == 0
    per_token = {t: f for t, f in mine.items() if t not in ("codes", *_ABOUT_ALL)}
    rundir.write_tables(run, s.sae_id, per_token, part, share)
    if leader:
        rundir.write_tables(run, s.sae_id, {"evals": mine["evals"]}, part)
    if not skip_codes:
        rundir.write_tables(run, s.sae_id, {"codes": mine["codes"]}, "0", share)
        if leader:
            rundir.write_tables(run, s.sae_id, {"latents": mine["latents"]})


def _write_unit(group: Any) -> int:
    """Sequences of the store's smallest independently written object: a shard, else a chunk."""
    arr = group["tokens"]
    return int((arr.shards or arr.chunks)[0])


def load_saes(run: str, sae_paths: list[str] | None, model: str | None = None) -> list[EvalSAE]:
    """The SAEs to evaluate: those given, else every trained SAE of the run of the eval store's model
    (a run may hold several models' SAEs; each is evaluated on its own model's store)."""
    paths = sae_paths or [str(p) for p in rundir.trained_sae_dirs(run)]
    if not paths:
        raise UsageError(f"no SAEs in {run}/saes and none given with --sae; train some with `actstore train`")
    saes = [load_eval_sae(p) for p in paths]
    if sae_paths or model is None:
        return saes
    mine = [s for s in saes if s.cfg.get("model_name") in (None, model)]
    if not mine:
        others = sorted({str(s.cfg.get("model_name")) for s in saes})
        raise UsageError(
            f"{run} has no SAEs of model {model!r} (the eval store's); it has SAEs of: {', '.join(others)}"
        )
    return mine


def _saes_row(s: EvalSAE, group: Any) -> pl.DataFrame:
    meta = s.cfg.get("actstore", {})
    model = group.attrs.get("model", {})
    return rundir.saes_row(
        model=model.get("name"),
        hook=s.hook,
        n_layers=model.get("config", {}).get("n_layers"),
        d_model=s.d_in,
        d_sae=s.d_sae,
        k=s.k,
        expansion=meta.get("expansion", s.d_sae // s.d_in),
        train_tokens=meta.get("train_tokens"),
        seed=meta.get("seed"),
        architecture=s.architecture,
        path=s.path,
    )


def _write_vocab(run: str, model: LoadedModel, model_name: str, tokens: np.ndarray) -> None:
    """The text of every token id seen, so queries can show tokens, not ids (`vocab`, one partition per model)."""
    ids = np.unique(tokens).tolist()
    frame = pl.DataFrame(
        {"model": [model_name] * len(ids), "token": ids, "text": [model.tokenizer.decode([i]) for i in ids]}
    )
    key = rundir.hash_key(str(model_name))
    old = rundir.part_path(run, "vocab", key)
    if old.is_file():  # other eval stores of this model saw other tokens: keep theirs too
        frame = pl.concat([pl.read_parquet(old).select(frame.columns), rundir.conform("vocab", frame)])
        frame = frame.unique("token", keep="last")
    rundir.write_tables(run, key, {"vocab": frame.sort("token")})


class _Collected:
    """One SAE's per-token columns and codes, gathered batch by batch."""

    def __init__(self) -> None:
        self.cols: dict[str, list[np.ndarray]] = {}
        self.codes: list[dict[str, np.ndarray]] = []
        self.code_rows: list[np.ndarray] = []
        self.n_tokens = 0
        self.zscores: list[dict[str, np.ndarray]] = []
        self.draws: list[dict[str, np.ndarray]] = []

    def add_draws(self, zscores: dict[str, np.ndarray], draws: dict[str, np.ndarray]) -> None:
        self.zscores.append(zscores)
        self.draws.append(draws)

    def add(self, row: dict[str, np.ndarray], codes: dict[str, np.ndarray], rows: np.ndarray) -> None:
        for key, value in row.items():
            self.cols.setdefault(key, []).append(value)
        self.codes.append(codes)
        self.code_rows.append(rows + self.n_tokens)
        self.n_tokens += len(row["seq"])


def sparse_codes(
    batch: Batch, top_acts: torch.Tensor, top_indices: torch.Tensor
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The `codes` rows of a batch (active latents only, by latent within a token) and each one's token row.
    Sorted and filtered on the host: two copies of the (tokens, k) codes, no sync per step."""
    idx, vals = top_indices.cpu().numpy(), top_acts.float().cpu().numpy()
    order = np.argsort(idx, axis=-1)  # a token's latents are distinct: any sort gives this order
    idx, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
    token_row, slot = np.nonzero(vals)
    seq_len = batch.tokens.shape[1]
    return {
        "seq": batch.seqs[token_row // seq_len],
        "pos": (token_row % seq_len).astype(np.int16),
        "latent": idx[token_row, slot].astype(np.int32),
        "value": vals[token_row, slot].astype(np.float32),
    }, token_row


def _evaluate_hook(
    group: Any,
    store_path: str,
    model: LoadedModel,
    hook: str,
    saes: list[EvalSAE],
    seqs: list[int],
    n_seq: int,
    o: EvalOptions,
    progress: bool,
    mu: torch.Tensor,
    w: distributed.World,
) -> dict[str, dict[str, pl.DataFrame]]:
    """This rank's sequences `seqs` (all n_seq in one process) through every SAE of `hook`."""
    seq_len = int(group["tokens"].shape[1])
    device = model.device
    patcher = Patcher(model, hook)
    if o.sensitivity:
        check_differentiable(patcher)
        check_whole_fits(seq_len, int(model.bridge.cfg.d_vocab), "--sensitivity")
    if w.leader:  # created once, whole; every rank then writes its own chunks of it
        for s in saes:
            recon_array(group, hook, s.sae_id)
    distributed.barrier(w)
    recon = {s.sae_id: group[f"recon/{s.sae_id}/{hook}"] for s in saes}
    collected = {s.sae_id: _Collected() for s in saes}
    who = "" if w.single else f", rank 0 of {w.size}"
    bar = token_bar(progress and w.leader, len(seqs) * seq_len, f"eval {hook} ({plural_saes(len(saes))}{who})")
    with ThreadPoolExecutor(1, thread_name_prefix="actstore-recon") as writer:
        pending: list[Future] = []
        for batch in batches(group, model, patcher, seqs, o.batch_size, device):
            write = lambda sae_id, span, xh: pending.append(writer.submit(_write_recon, recon[sae_id], span, xh))  # noqa: E731
            _evaluate_batch(batch, patcher, saes, o, mu, collected, write)
            if bar is not None:
                bar.update(batch.x.shape[0] * seq_len)
        for done in pending:  # a failed write raises here
            done.result()
    if bar is not None:
        bar.close()
    return {s.sae_id: _frames(s, store_path, collected[s.sae_id], n_seq, o, w, patcher.path) for s in saes}


def _evaluate_batch(
    batch: Batch,
    patcher: Patcher,
    saes: list[EvalSAE],
    o: EvalOptions,
    mu: torch.Tensor,
    collected: dict[str, _Collected],
    write: Callable[[str, slice, torch.Tensor], None],
) -> None:
    """One batch through every SAE of the hook. Everything per token stays on the device until one copy
    per SAE (`to_host`); the reconstruction is copied once and handed to `write` (the writer thread)."""
    x, x_live, clean = batch.x, batch.x_live, batch.clean
    d = x.shape[2]
    zero = place(x_live, torch.zeros_like(x_live), o.patch_pos)
    ((ce_zero, kl_zero),) = patcher.score(clean, batch.tokens, [zero])
    shared = {"ce_orig": clean.ce, "ce_zero": ce_zero, "kl_zero": kl_zero}
    key, sens_base, sens = batch.token_key(), {}, None
    if o.sensitivity:  # shared by every SAE of the hook: the gradient and iso_sens's probes
        probe_gen = sequence_generators(o.seed, batch.seqs, "probes")  # per sequence: any batching
        sens = BatchSensitivity(patcher, batch, o.probes, probe_gen, o.patch_pos)
        sens_base = sens.shared() | sens.columns({"zero": zero})
    for s in saes:
        xf = x.reshape(-1, d)
        codes = s.encode(xf)
        xh = s.decode(*codes)
        cols = shared | activation_columns(xf, xh, (codes.top_acts != 0).sum(-1), mu)
        gen = sequence_generators(o.seed, batch.seqs, "baselines")  # per sequence: any batching
        patches = {"patched": xh, **baselines(xf, xh, gen)}
        placed = {name: place(x_live, c.reshape(x.shape), o.patch_pos) for name, c in patches.items()}
        for name, (ce, kl) in zip(placed, patcher.score(clean, batch.tokens, list(placed.values())), strict=True):
            cols[f"ce_{name}"], cols[f"kl_{name}"] = ce, kl
        host = to_host(cols)
        row = key | {k: host.pop(k) for k in shared} | sens_base | host  # the columns' order as always
        if sens is not None:
            row |= sens.columns(placed)
        collected[s.sae_id].add(row, *sparse_codes(batch, *codes))
        if o.eps_draws is not None:
            collected[s.sae_id].add_draws(*draw_batch(patcher, batch, xh, o.patch_pos, o.eps_draws, o.seed))
        span = slice(int(batch.seqs[0]), int(batch.seqs[-1]) + 1)
        write(s.sae_id, span, xh.reshape(x.shape).cpu())


def _write_recon(arr: Any, span: slice, xh: torch.Tensor) -> None:
    """The reconstructions of a batch into `recon/<sae_id>/<hook>` (on the writer thread: one at a time,
    in batch order, so two batches sharing a chunk never race)."""
    arr[span] = st.to_stored(xh, st.stored_dtype(arr))


def _frames(
    s: EvalSAE,
    store_path: str,
    c: _Collected,
    n_seq: int,
    o: EvalOptions,
    w: distributed.World,
    patch_path: str | None = None,  # Patcher.path: "suffix" or "full_forward"
) -> dict[str, pl.DataFrame]:
    codes = pl.DataFrame({k: np.concatenate([part[k] for part in c.codes]) for k in ("seq", "pos", "latent", "value")})
    dec_norm = s.W_dec.float().norm(dim=-1).cpu().numpy()
    everywhere = None
    if not w.single:  # the rate's p_i and the latents table are about every rank's tokens
        counts = torch.from_numpy(np.bincount(codes["latent"].to_numpy(), minlength=s.d_sae).astype(np.int64))
        counts = distributed.all_sum(torch.cat([counts, torch.tensor([c.n_tokens])]), w).numpy()
        everywhere = (counts[:-1], int(counts[-1]))
    rate, latents = rate_and_latents(codes, np.concatenate(c.code_rows), c.n_tokens, s.d_sae, dec_norm, everywhere)
    tokens = pl.DataFrame({k: np.concatenate(v) for k, v in c.cols.items()}).with_columns(
        pl.Series("rate_bits", rate),
        pl.lit(str(store_path)).alias("store"),
        pl.lit(o.patch_pos).alias("patch_pos"),
        pl.col(pl.Float32).fill_nan(None),
    )
    evals = pl.DataFrame(
        [
            {
                "store": str(store_path),
                "n_seq": n_seq,
                "n_tokens": c.n_tokens if everywhere is None else everywhere[1],
                "seed": o.seed,
                "patch_pos": o.patch_pos,
                "options": json.dumps({**asdict(o), "patch_path": patch_path}, sort_keys=True),
                "actstore": __version__,
                "created": st.now(),
            }
        ]
    )
    frames = {"tokens": tokens, "codes": codes, "latents": latents, "evals": evals}
    if c.draws:
        for table, parts in (("eps_zscores", c.zscores), ("eps_draws", c.draws)):
            frame = pl.DataFrame({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
            frames[table] = frame.with_columns(
                pl.lit(str(store_path)).alias("store"), pl.selectors.float().fill_nan(None)
            )
    return frames

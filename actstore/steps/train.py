"""`actstore train`: TopK SAE sweeps from a store, every SAE of a hook fed by one pass over the data.

The loop, per hook: read a batch once; for each SAE still within its token budget, one Adam step on
it. Token budgets share the stream's prefix and each SAE's learning-rate schedule is laid over its own
budget, so the 1M-token SAE of a {1M, 5M} sweep is exactly the SAE a separate 1M run would give, at
no extra read. Seeds change the initialisation only and the data order belongs to the run (`data_seed`), unless
`seed_data` gives every seed its own order (real repeats; one pass per seed).
A checkpoint (all SAEs, optimisers, dead-latent counters, curves and the stream position) is copied to
host memory every `checkpoint_seconds` and written aside and renamed into place on a background thread
while training goes on; the same command resumes from it.
"""

from __future__ import annotations

import io
import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from actstore import __version__, atomic, devicemem, diskspace, distributed, integrity
from actstore import run as rundir
from actstore import store as st
from actstore.errors import StoreError, UsageError
from actstore.loader import ActivationLoader, LoaderOptions
from actstore.model import hook_layer, resolve_device
from actstore.options import csv, option, positive
from actstore.progress import plural_saes, token_bar
from actstore.run import SAESpec
from actstore.sae import AUXK_COEF
from actstore.trainee import UNDERTRAINED, Trainee, count_dead, geometric_median
from actstore.units import parse_count
from actstore.writer_lock import exclusive

CHECKPOINT_STATE = "state.pt"  # inside the checkpoint directory, beside its SHA256SUMS


def _ints(name: str) -> Any:
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in csv(text))
        except ValueError:
            raise UsageError(f"--{name} takes comma-separated whole numbers, got {text!r}") from None

    return parse


def _floats(text: str) -> tuple[float, ...]:
    if text.strip() == "auto":
        return ()
    try:
        values = tuple(float(v) for v in csv(text))
    except ValueError:
        raise UsageError(f"--lr takes comma-separated positive numbers (or auto), got {text!r}") from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--lr {text} must be positive numbers")
    return values


@dataclass(frozen=True)
class Sweep:
    """The axes of a sweep: every combination is one SAE (a value given twice is trained once)."""

    hooks: tuple[str, ...] = option(None, "Comma-separated hooks of the store.", parse=csv, required=True)
    k: tuple[int, ...] = option(
        (32,), "Comma-separated k values (active latents per token).", parse=_ints("k"), shown="32"
    )
    expansion: tuple[int, ...] = option(
        (8,), "Comma-separated expansion factors (d_sae = expansion × d_in).", parse=_ints("expansion"), shown="8"
    )
    tokens: tuple[int, ...] = option(
        (1_000_000,), "Comma-separated token budgets (1M, 500k, …); budgets share the stream.",
        parse=lambda text: tuple(parse_count(t) for t in csv(text)), shown="1M",
    )  # fmt: skip
    seeds: tuple[int, ...] = option((0,), "Comma-separated initialisation seeds.", parse=_ints("seeds"), shown="0")
    lr: tuple[float, ...] = option(
        (),
        "Comma-separated peak learning rates (default: the recipe's, from width, batch and steps; see docs/METHODS.md).",
        parse=_floats,
        shown="auto",
    )

    def specs(self) -> list[SAESpec]:
        hooks, lrs = self.hooks or (), self.lr or (None,)
        specs = [
            SAESpec(h, k, e, t, s, lr)
            for h in hooks
            for k in self.k
            for e in self.expansion
            for t in self.tokens
            for lr in lrs
            for s in self.seeds
        ]
        return list(dict.fromkeys(specs))


@dataclass(frozen=True)
class TrainOptions:
    """How every SAE of a run is trained (small and grouped: optimiser, schedule, data, hardware)."""

    batch_size: int = option(4096, "Tokens per step.")
    warmup_frac: float = option(0.05, "Linear warm-up over this share of each SAE's budget.", cli=False)
    decay_frac: float = option(0.2, "Linear decay to zero over the last share of each SAE's budget.", cli=False)
    grad_clip: float = option(1.0, "Gradient norm clip.", cli=False)
    auxk_coef: float = option(
        AUXK_COEF, "Weight of the AuxK loss on dead latents (it trains only them; docs/METHODS.md, training recipe)."
    )
    dead_tokens: int | None = option(
        None,
        "A latent is dead after this many tokens without firing (default: min(10M, budget/50)).",
        parse=parse_count,
    )
    low_precision: bool = option(False, "Run the encoder matmul in bfloat16.", flag="--bf16/--no-bf16")
    drop_bos: bool = option(False, "Leave position 0 of every sequence out of training.", flag="--drop-bos/--keep-bos")
    data_seed: int = option(0, "Seed of the data order (shared by every SAE of the run unless --seed-data).")
    seed_data: bool = option(
        False,
        "Each seed also draws its own data order (data seed = --data-seed + seed): repeats that vary both, as "
        "study 002's do. Costs one data pass per seed instead of one per hook.",
        flag="--seed-data/--shared-data",
    )
    log_every: int = option(10, "Steps between two rows of the training curves.", cli=False)
    checkpoint_seconds: float = option(120.0, "Write a resumable checkpoint this often.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    data_parallel: bool = option(
        False,
        "Under torchrun: every rank trains every SAE on its share of each batch, gradients all-reduced (for an SAE "
        "too large or slow for one device). Default: the sweep's SAEs are divided among the ranks, each trained "
        "exactly as in one process.",
        flag="--data-parallel/--split-saes",
    )

    def __post_init__(self) -> None:
        positive("batch_size", self.batch_size)
        positive("dead_tokens", self.dead_tokens, allow_none=True)
        positive("data_seed", self.data_seed, minimum=0)
        positive("log_every", self.log_every)
        if not (math.isfinite(self.auxk_coef) and self.auxk_coef >= 0):
            raise UsageError(f"--auxk-coef {self.auxk_coef} must be a non-negative number")
        if not (math.isfinite(self.checkpoint_seconds) and self.checkpoint_seconds >= 0):
            raise UsageError(f"--checkpoint-seconds {self.checkpoint_seconds} must be a non-negative number of seconds")
        resolve_device(self.device)

    def loader(self) -> LoaderOptions:
        return LoaderOptions(batch_size=self.batch_size, seed=self.data_seed, drop_first_positions=int(self.drop_bos))


def sweep(
    hooks: list[str],
    ks: list[int],
    expansions: list[int],
    tokens: list[int],
    seeds: list[int],
    lrs: list[float] | None = None,
) -> list[SAESpec]:
    """Every combination of the axes, as SAE specs (`lrs` None: the recipe's learning rate)."""
    return Sweep(tuple(hooks), tuple(ks), tuple(expansions), tuple(tokens), tuple(seeds), tuple(lrs or ())).specs()


def settings(store: str, o: TrainOptions) -> dict[str, Any]:
    """What, besides its spec, decides an SAE's weights: a finished SAE is reused, and a checkpoint
    resumed, only when these match (bookkeeping — logging, checkpoint timing, device — is left out)."""
    opts = {
        k: v for k, v in asdict(o).items() if k not in ("checkpoint_seconds", "log_every", "device", "data_parallel")
    }
    ranks = distributed.world().size if o.data_parallel else 1
    if ranks > 1:  # each rank's share of a batch (and so the weights) depends on how many share it
        opts["data_parallel_ranks"] = ranks
    return json.loads(json.dumps({"store": str(store), "options": opts, "loader": asdict(o.loader())}))


def train(
    store: str, out: str, specs: list[SAESpec], options: TrainOptions = TrainOptions(), *, progress: bool = False
) -> list[str]:
    """Train every SAE in `specs` on `store` into the run directory `out`; returns their directories.

    Under torchrun (WORLD_SIZE > 1) the SAEs are divided among the ranks (each reads the store itself and
    trains its SAEs exactly as one process would), or with `data_parallel` every rank trains every SAE on
    its share of each batch. Holds the writer lock of what it writes (actstore/writer_lock.py, on rank 0):
    a second writer is refused.
    """
    from actstore import objstore

    w = distributed.init(options.device)
    distributed.same_everywhere(
        {"store": str(store), "out": str(out), "specs": [asdict(s) for s in specs], **asdict(options)},
        w,
        "actstore train",
    )
    if objstore.is_url(out):  # a run on object storage: worked on in a local copy, committed through its log
        with objstore.run_copy(out, "actstore train") as local:
            return _train_locked(store, str(local), specs, options, progress, w)
    return _train_locked(store, out, specs, options, progress, w)


def _train_locked(
    store: str, out: str, specs: list[SAESpec], options: TrainOptions, progress: bool, w: distributed.World
) -> list[str]:
    """`train` into a run directory, under its writer lock."""
    with ExitStack() as held:
        distributed.agreed(lambda: held.enter_context(exclusive(out, "run", "actstore train")), w, True)
        with diskspace.guard(out, lambda: sweep_bytes(store, out, specs)):
            distributed.agreed(lambda: rundir.recover(out), w, leader_only=True)
            done = _train(store, out, specs, options, progress=progress, w=w)
    distributed.finish(w)
    return done


def sweep_bytes(store: str, run: str, specs: list[SAESpec]) -> int:
    """Bytes the unfinished SAEs of `specs` still need in RUN: each SAE's float32 weights and fire counts,
    plus its share of the checkpoint (the weights and Adam's two moments)."""
    group, total = st.open_store(store), 0
    for spec in specs:
        if not rundir.is_trained(run, spec.sae_id):
            d = int(group["acts"][spec.hook].shape[2])
            params = 2 * d * spec.expansion * d + spec.expansion * d + d
            total += 4 * params + 8 * spec.expansion * d + 3 * 4 * params
    return total


def _train(
    store: str,
    out: str,
    specs: list[SAESpec],
    options: TrainOptions = TrainOptions(),
    *,
    progress: bool = False,
    w: distributed.World | None = None,
) -> list[str]:
    """The work of `train`, under its writer lock."""
    w = w or distributed.World()
    if not specs:
        raise UsageError("nothing to train: give at least one --hooks, --k, --expansion, --tokens and --seeds value")
    for spec in specs:
        if spec.seed < 0 or spec.expansion < 1:
            raise UsageError(f"{spec.sae_id}: seeds must be ≥ 0 and expansions ≥ 1")
        if spec.tokens <= 0:
            raise UsageError(f"token budget {spec.tokens} for {spec.sae_id} is not positive; give --tokens like 1M")
    group = st.open_store(store)
    run = Path(out)
    for spec in specs:
        d_in = st.acts_array(group, spec.hook, store).shape[2]
        if not 0 < spec.k < d_in * spec.expansion:
            raise UsageError(
                f"k = {spec.k} must be between 1 and d_sae - 1 = {d_in * spec.expansion - 1} "
                f"(d_in {d_in} × expansion {spec.expansion}); lower --k or raise --expansion"
            )
    distributed.agreed(lambda: _check_run(run, store, group, specs), w, leader_only=True)
    options = replace(options, device=distributed.rank_device(options.device, w))
    mine = specs if options.data_parallel else _share(specs, group, w)
    for hook in dict.fromkeys(s.hook for s in specs):
        members = [s for s in mine if s.hook == hook]
        first_batch = min(max(s.tokens for s in specs if s.hook == hook), options.batch_size)
        if not members:
            continue
        if not options.seed_data:
            _train_hook(store, group, run, members, options, progress, w, first_batch)
            continue
        for seed in dict.fromkeys(s.seed for s in members):  # one data pass per seed, each in its own order
            o = replace(options, data_seed=options.data_seed + seed)
            _train_hook(store, group, run, [s for s in members if s.seed == seed], o, progress, w, first_batch)
    distributed.barrier(w)
    return [str(rundir.sae_dir(run, s.sae_id)) for s in specs]


def _share(specs: list[SAESpec], group: Any, w: distributed.World) -> list[SAESpec]:
    """This rank's SAEs of the sweep: the largest first, each to the rank with the least work so far (the
    work of an SAE ≈ its width × its tokens); every rank computes the same deal."""
    if w.single:
        return specs
    distributed.agreed(
        lambda: distributed.check_world_fits(len(specs), w, "SAEs in the sweep (use --data-parallel to share one SAE)"),
        w,
    )
    load = [0] * w.size
    owner: dict[SAESpec, int] = {}
    cost = {s: int(group["acts"][s.hook].shape[2]) * s.expansion * s.tokens for s in specs}
    for spec in sorted(specs, key=lambda s: (-cost[s], s.sae_id)):
        rank = min(range(w.size), key=lambda r: (load[r], r))
        owner[spec], load[rank] = rank, load[rank] + cost[spec]
    return [s for s in specs if owner[s] == w.rank]


def _check_run(run: Path, store: str, group: Any, specs: list[SAESpec]) -> None:
    """A run may hold SAEs of several models (what cross-model queries compare), each SAE of one model:
    refuse an SAE whose id already names another model's SAE here. run.json lists the run's stores."""
    manifest = rundir.run_json(run)
    model = group.attrs.get("model", {}).get("name")
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {run} exists and is a file; give a directory for the run")
    prior: dict[str, Any] = {}
    if manifest.exists():
        try:
            prior = json.loads(manifest.read_text())
        except ValueError:
            raise UsageError(f"{manifest} is damaged (not JSON); repair it or use another --out") from None
    for spec in specs:
        cfg = rundir.sae_dir(run, spec.sae_id) / "cfg.json"
        if cfg.is_file():
            had = json.loads(cfg.read_text()).get("model_name")
            if had != model:
                raise UsageError(
                    f"{spec.sae_id} in {run} is an SAE of model {had!r}, but {store} was harvested from {model!r}; "
                    "SAE ids name the hook, not the model, so train this model into another --out"
                )
    stores = prior.get("stores") or ([{"store": prior["store"], "model": prior.get("model")}] if prior else [])
    entry = {"store": str(store), "model": model}
    if entry in stores:
        return
    run.mkdir(parents=True, exist_ok=True)
    first = stores[0] if stores else entry
    record = {"store": first["store"], "model": first["model"], "stores": [*stores, entry], "actstore": __version__}
    atomic.write_bytes(manifest, json.dumps(record, indent=2).encode())


def _train_hook(
    store: str,
    group: Any,
    run: Path,
    specs: list[SAESpec],
    o: TrainOptions,
    progress: bool,
    w: distributed.World,
    first_batch: int,
) -> None:
    """Train `specs` (SAEs of one hook) in one pass over the stream; `first_batch` rows of its start give
    every SAE of the hook its initial b_dec (the same for every member, however the sweep is divided)."""
    hook = specs[0].hook
    writes = w.leader or not o.data_parallel  # data parallel: every rank holds the same SAEs; rank 0 writes
    wanted = settings(store, o)
    for spec in specs:
        cfg_file = rundir.sae_dir(run, spec.sae_id) / "cfg.json"
        if cfg_file.exists() and rundir.is_trained(run, spec.sae_id):
            had = json.loads(cfg_file.read_text()).get("actstore", {}).get("settings")
            if had != wanted:
                diff = sorted(
                    k for k in (had or {}).get("options", {}) if had["options"][k] != wanted["options"].get(k)
                )
                raise UsageError(
                    f"{rundir.sae_dir(run, spec.sae_id)} was trained with other settings "
                    f"({', '.join(diff) or 'store or loader'}); use another --out"
                )
    todo = [s for s in specs if not rundir.is_trained(run, s.sae_id)]
    if not todo:
        return
    d_in = int(group["acts"][hook].shape[2])
    devicemem.check_fits(
        sweep_memory(todo, d_in, o.batch_size),
        o.device,
        f"training {plural_saes(len(todo))} of {hook} together",
        "train fewer at once (fewer --k/--expansion/--seeds values per run), or divide them among GPUs with torchrun",
    )
    share = None if w.single or o.data_parallel else f"{w.rank}of{w.size}"
    ckpt_path = rundir.checkpoint_path(run, hook, store, share)
    ckpt = _load_checkpoint(ckpt_path, o.device) if ckpt_path.exists() else None
    # A checkpoint written before some SAEs of this sweep finished still covers the rest of it.
    members = next((m for m in (specs, todo) if ckpt is not None and ckpt["key"] == _key(m, wanted)), None)
    if members is None:
        ckpt = None  # another sweep was started here: begin afresh (its finished SAEs are kept)
        members = todo
    ckpt_key = _key(members, wanted)
    total = max(s.tokens for s in members)

    if ckpt is None:
        first = next(iter(ActivationLoader(store, hook, first_batch, o.loader(), device=o.device)))
        b_dec = geometric_median(first.float())
    else:
        b_dec = torch.zeros(d_in, device=o.device)
    trainees = [Trainee(s, d_in, o, b_dec, w if o.data_parallel else None) for s in members]
    position = 0
    if ckpt is not None:
        for t, state in zip(trainees, ckpt["trainees"], strict=True):
            t.load_state(state)
        position = ckpt["position"]

    loader = ActivationLoader(store, hook, total, o.loader(), start_token=position, device=o.device)
    who = "" if w.single else (f", rank {w.rank} of {w.size}" if not o.data_parallel else f", {w.size} ranks")
    bar = token_bar(progress and writes, total, f"train {hook} ({plural_saes(len(todo))}{who})", initial=position)
    last_ckpt = time.monotonic()
    saved = {s.sae_id for s in members if rundir.is_trained(run, s.sae_id)}
    with _background_checkpoints(ckpt_path) as checkpoints:
        for n_batch, batch in enumerate(loader, 1):
            active = [t for t in trainees if not t.done]
            for t, n_dead in zip(active, count_dead(active), strict=True):  # one read for the whole sweep
                t.train_step(batch, n_dead)
            position += len(batch)
            for t in trainees:
                if t.done and t.spec.sae_id not in saved:
                    if writes:
                        checkpoints.wait()  # one writer at a time (a run on object storage commits each write)
                        _save(t, run, store, group, o, loader.epoch_tokens)
                    saved.add(t.spec.sae_id)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(fvu=_logged_fvu(active), refresh=False)
            if _checkpoint_due(last_ckpt, o, w, n_batch) and position < total and writes:
                checkpoints.write({"key": ckpt_key, "position": position, "trainees": [t.state() for t in trainees]})
                last_ckpt = time.monotonic()
    if bar is not None:
        bar.close()
    for t in trainees:  # (budgets beyond the store's size loop over it: the loader starts a new epoch)
        if t.spec.sae_id not in saved and writes:
            _save(t, run, store, group, o, loader.epoch_tokens)
    for t in trainees:
        if writes and _undertrained(t):
            print(
                f"warning: {t.spec.sae_id} was still improving when its learning rate decayed (batch FVU fell "
                f"{t.still_improving():.1%} over the last tenth of its steps before the decay); give it more "
                "--tokens or try larger --lr values",
                file=sys.stderr,
            )
    if writes:
        atomic.remove(ckpt_path)


def _logged_fvu(trainees: list[Trainee]) -> str:
    """The progress bar's FVU: the mean of the SAEs' last logged batch FVUs (already on the host; reading
    the current step's would wait for the device every step)."""
    logged = [t.curves[-1]["fvu"] for t in trainees if t.curves]
    return f"{float(np.mean(logged)):.3f}" if logged else "-"


class _CheckpointWriter:
    """Writes a sweep's checkpoints on a background thread while training goes on, one at a time.

    Why: serialising, hashing and writing a large sweep's checkpoint (≈ 7 GB at d = 768 × 32 × 16) takes
    seconds to minutes. Only the copy of the state into host memory blocks training (the write then sees
    exactly that step's state); the write goes aside and is renamed into place (atomic.replacing), so a
    crash mid-write leaves the previous checkpoint as it was.
    """

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, state: dict[str, Any]) -> None:
        """Snapshot `state` to host memory now and write it in the background (after the previous write)."""
        self.wait()
        snapshot = _to_host(state)
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name="actstore-checkpoint")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is in place; a failed write's error (a full disk) is raised here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, state: dict[str, Any]) -> None:
        try:
            _write_checkpoint(self.path, state)
        except BaseException as exc:  # raised in the training thread by `wait`
            self._error = exc


@contextmanager
def _background_checkpoints(path: Path) -> Iterator[_CheckpointWriter]:
    """A checkpoint writer whose last write is waited for however the block ends (an error in the block
    wins over one of the write: the block's is the one to report)."""
    writer = _CheckpointWriter(path)
    try:
        yield writer
    except BaseException:
        with suppress(BaseException):
            writer.wait()
        raise
    writer.wait()


def _to_host(state: Any) -> Any:
    """A copy of `state` in host memory that later training steps cannot change: tensors copied (one
    device-to-host copy each), lists and dicts rebuilt (curves and FVUs grow in place)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_host(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_host(v) for v in state)
    return state


def _write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """The checkpoint directory: the state and its sums, written aside and renamed into place."""
    with atomic.replacing(path) as (stage,):
        stage.mkdir()
        buffer = io.BytesIO()  # torch's own file writer reports a full disk as a bare RuntimeError
        torch.save(state, buffer)
        (stage / CHECKPOINT_STATE).write_bytes(buffer.getbuffer())
        integrity.seal(stage)


def sweep_memory(specs: list[SAESpec], d_in: int, batch_size: int) -> int:
    """Bytes a pass training `specs` together holds on its device: every SAE's float32 weights, gradients
    and Adam's two moments (16 bytes a parameter; gradients are freed between steps but reach their
    peak together in one step), plus the largest single step's activations: the batch, the encoder's dense
    pre-activations (batch × d_sae, and their top-k bookkeeping) and the reconstruction."""
    if not specs:
        return 0
    held = sum(16 * (2 * d_in * s.expansion * d_in + s.expansion * d_in + d_in) for s in specs)
    step = max(4 * batch_size * (2 * s.expansion * d_in + 3 * d_in) for s in specs)
    return held + step


def _checkpoint_due(last: float, o: TrainOptions, w: distributed.World, n_batch: int) -> bool:
    """Time for a checkpoint. With data parallelism the ranks step together, so rank 0's clock decides for
    all; it is asked only every `log_every` batches, when the steps' FVUs are read from the device anyway,
    so the broadcast (a host sync) costs no other step anything and a checkpoint comes at most
    `log_every` batches late."""
    if o.data_parallel and not w.single:
        if n_batch % o.log_every:
            return False
        return bool(distributed.broadcast(time.monotonic() - last >= o.checkpoint_seconds, w))
    return time.monotonic() - last >= o.checkpoint_seconds


def _undertrained(t: Trainee) -> bool | None:
    drop = t.still_improving()
    return None if drop is None else drop > UNDERTRAINED


def _key(members: list[SAESpec], wanted: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's identity: which SAEs it trains, under which settings."""
    return {"specs": [asdict(s) for s in members], **wanted}


def _load_checkpoint(path: Path, device: str) -> dict[str, Any]:
    """A sweep's checkpoint, checked against its SHA256SUMS (torch.load does not notice a flipped byte in
    a tensor) and read with `weights_only=True` (tensors and plain containers only: a file that would run
    code on loading is refused), or a one-line error naming it."""
    fix = f"delete {path} to restart that sweep from its start"
    integrity.check(path, fix=fix)
    try:
        return torch.load(path / CHECKPOINT_STATE, weights_only=True, map_location=device)
    except Exception as exc:  # a damaged or foreign file: never half-resume from it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"checkpoint {path} cannot be read ({first[:160]}); {fix}") from None


def _save(t: Trainee, run: Path, store: str, group: Any, o: TrainOptions, epoch_tokens: int) -> None:
    """The SAE's records (curves and its `saes` row), then its directory, each written aside and renamed.

    The weights directory appearing is what marks an SAE done, so it comes last.
    """
    from safetensors.torch import save_file

    spec, attrs = t.spec, group.attrs
    model = attrs.get("model", {})
    final = rundir.sae_dir(run, spec.sae_id)
    row = rundir.saes_row(
        model=model.get("name"),
        hook=spec.hook,
        n_layers=model.get("config", {}).get("n_layers"),
        d_model=t.sae.d_in,
        d_sae=t.sae.d_sae,
        k=spec.k,
        expansion=spec.expansion,
        train_tokens=t.seen,
        seed=spec.seed,
        architecture="topk",
        path=str(final),
        lr=t.peak_lr,
        still_improving=t.still_improving(),
        undertrained=_undertrained(t),
        data_seed=o.data_seed,
        train_seconds=t.seconds,
    )
    if spec.hook in st.derived_of(group):  # an SAE of darkmatter's error arrays: no depth for the studies to match
        row = row.with_columns(layer=pl.lit(None, pl.Int32), depth=pl.lit(None, pl.Float64))
    rundir.write_tables(run, spec.sae_id, {"curves": pl.DataFrame(t.curves), "saes": row})
    context = int(attrs.get("seq_len", 0))
    seqpos = [int(o.drop_bos), None]
    where = {"model_name": model.get("name"), "hook_name": spec.hook, "hook_layer": hook_layer(spec.hook)}
    cfg = {
        **where,
        "context_size": context,
        "prepend_bos": bool(attrs.get("settings", {}).get("prepend_bos", False)),
        "dataset_path": str(store),
        "seqpos_slice": seqpos,
        "metadata": {**where, "context_size": context, "seqpos_slice": seqpos},
        "actstore": {
            "version": __version__,
            "sae_id": spec.sae_id,
            "expansion": spec.expansion,
            "train_tokens": t.seen,
            "token_budget": spec.tokens,
            "epochs": round(t.seen / max(1, epoch_tokens), 3),
            "seed": spec.seed,
            "store": str(store),
            "store_model": model,
            "loader": asdict(o.loader()),
            "lr": t.peak_lr,
            "dead_tokens": t.dead_tokens,
            "auxk_coef": o.auxk_coef,
            "low_precision": o.low_precision,
            "batch_size": o.batch_size,
            "steps": t.step,
            "data_seed": o.data_seed,
            "seconds": round(t.seconds, 3),
            "settings": settings(store, o),
        },
    }
    with atomic.replacing(final) as (stage,):
        t.sae.save(stage, cfg)
        save_file(
            {"fire_counts": t.fire_counts.cpu(), "tokens": torch.tensor([t.seen])},
            str(stage / "fire_counts.safetensors"),
        )
        integrity.seal(stage)


def summary(run: str) -> list[dict[str, Any]]:
    """Each trained SAE's last logged FVU and dead fraction, read from the curves, by hook depth and k."""
    from actstore.objstore import local_run

    run = local_run(run)  # a run URL: its verified local copy
    curves, saes = rundir.read_table(run, "curves"), rundir.read_table(run, "saes")
    if curves.is_empty() or saes.is_empty():
        return []
    last = curves.sort("step").group_by("sae_id").last().join(saes.select("sae_id", "hook", "layer", "k"), on="sae_id")
    last = last.drop("lr").join(saes.select("sae_id", "lr", "still_improving"), on="sae_id")  # the peak rate
    last = last.sort("layer", "hook", "k", "sae_id", nulls_last=True)
    return last.select("sae_id", "hook", "k", "lr", "tokens", "fvu", "dead_frac", "l0", "still_improving").to_dicts()

"""`actstore train`: TopK SAE sweeps from a store, every SAE of a hook fed by one pass over the data.

The loop, per hook: read a batch once; for each SAE still within its token budget, one Adam step on
it. Token budgets share the stream's prefix and each SAE's learning-rate schedule is laid over its own
budget, so the 1M-token SAE of a {1M, 5M} sweep is exactly the SAE a separate 1M run would give, at
no extra read. Seeds change the initialisation only; the data order belongs to the run (`data_seed`).
A checkpoint (all SAEs, optimisers, dead-latent counters, curves and the stream position) is written
aside and renamed into place every `checkpoint_seconds`; the same command resumes from it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore import __version__
from actstore import store as st
from actstore.errors import UsageError
from actstore.loader import ActivationLoader, LoaderOptions
from actstore.progress import plural_saes, token_bar
from actstore.sae import AUXK_COEF, TopKSAE, default_lr


@dataclass(frozen=True)
class SAESpec:
    hook: str
    k: int
    expansion: int
    tokens: int
    seed: int

    @property
    def sae_id(self) -> str:
        return f"{self.hook}__k{self.k}_x{self.expansion}_{format_tokens(self.tokens)}_s{self.seed}"


@dataclass(frozen=True)
class TrainOptions:
    """How every SAE of a run is trained (small and grouped: optimiser, schedule, data, hardware)."""

    batch_size: int = 4096
    lr: float | None = None  # None: Gao et al.'s 2e-4 / sqrt(d_sae / 2^14)
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # linear decay to zero over the last fifth of each SAE's budget
    grad_clip: float = 1.0
    auxk_coef: float = AUXK_COEF
    dead_tokens: int | None = None  # None: min(10M, budget / 10) — Gao et al. use 10M
    low_precision: bool = False  # encoder matmul in bf16
    dense_decoder: bool = False  # the reference decode, for benchmarks
    data_seed: int = 0
    drop_first_positions: int = 0
    log_every: int = 10
    checkpoint_seconds: float = 120.0
    device: str = "cpu"


def format_tokens(n: int) -> str:
    """1_000_000 → '1M', 1_500_000 → '1.5M', 250_000 → '250k': stable, readable, never rounded."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
        if n >= scale and (n * 10) % scale == 0:
            return f"{n // scale}.{(n * 10 // scale) % 10}{unit}"
    return str(n)


def sweep(hooks: list[str], ks: list[int], expansions: list[int], tokens: list[int], seeds: list[int]) -> list[SAESpec]:
    specs = [SAESpec(h, k, e, t, s) for h in hooks for k in ks for e in expansions for t in tokens for s in seeds]
    return list(dict.fromkeys(specs))  # a value given twice is trained once


def lr_at(tokens_seen: int, budget: int, peak: float, o: TrainOptions) -> float:
    """Linear warm-up over the first `warmup_frac` of the budget, flat, linear decay to 0 at the end."""
    frac = tokens_seen / budget
    warm = min(1.0, (tokens_seen + o.batch_size) / max(1.0, o.warmup_frac * budget))
    decay = min(1.0, (1 - frac) / o.decay_frac) if o.decay_frac > 0 else 1.0
    return peak * warm * max(0.0, decay)


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's iterations: b_dec starts at the point minimising the summed distance to the data."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - y).norm(dim=1).clamp_min(1e-8)
        y = (w[:, None] * x).sum(0) / w.sum()
    return y


class _Trainee:
    """One SAE with its optimiser and bookkeeping (dead-latent counters, fire counts, curve rows)."""

    def __init__(self, spec: SAESpec, d_in: int, o: TrainOptions, b_dec: torch.Tensor):
        self.spec, self.o = spec, o
        d_sae = d_in * spec.expansion
        self.sae = TopKSAE(
            d_in,
            d_sae,
            spec.k,
            seed=spec.seed,
            device=o.device,
            low_precision=o.low_precision,
            dense_decoder=o.dense_decoder,
        )
        with torch.no_grad():
            self.sae.b_dec.copy_(b_dec)
        self.peak_lr = o.lr if o.lr is not None else default_lr(d_sae)
        fused = {"fused": True} if _fused_adam_ok(o.device) else {}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.peak_lr, betas=(0.9, 0.999), eps=6.25e-10, **fused)
        self.dead_tokens = o.dead_tokens or min(10_000_000, max(o.batch_size, spec.tokens // 10))
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=o.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=o.device)
        self.seen, self.step, self.curves = 0, 0, []
        self.var_per_token: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.seen >= self.spec.tokens

    def train_step(self, batch: torch.Tensor) -> float:
        x = batch[: self.spec.tokens - self.seen]
        lr = lr_at(self.seen, self.spec.tokens, self.peak_lr, self.o)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.since_fired >= self.dead_tokens
        # A budget's last slice of the shared batch can be a handful of rows, too few for a variance of
        # its own: normalise it by the running per-token variance instead.
        total_var = None
        if len(x) < 64 and self.var_per_token is not None:
            total_var = self.var_per_token * len(x)
        elif len(x) >= 64:
            self.var_per_token = (x - x.mean(0)).pow(2).sum().detach() / len(x)
        out = self.sae(x, dead, total_var)
        loss = out.fvu + self.o.auxk_coef * out.auxk_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_gradient_parallel_to_decoder()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.o.grad_clip)
        self.opt.step()
        self.sae.set_decoder_norm_to_unit()

        with torch.no_grad():
            active = out.top_indices[out.top_acts > 0]
            fired = torch.bincount(active, minlength=self.sae.d_sae)
            self.fire_counts += fired
            self.since_fired += len(x)
            self.since_fired[fired > 0] = 0
            self.seen += len(x)
            self.step += 1
            if self.step % self.o.log_every == 0 or self.done:
                err = (x - out.recon).pow(2).sum(1)
                self.curves.append(
                    {
                        "sae_id": self.spec.sae_id,
                        "step": self.step,
                        "tokens": self.seen,
                        "mse": float(err.mean() / x.shape[1]),
                        "nmse": float((err / x.pow(2).sum(1).clamp_min(1e-10)).mean()),
                        "explained_variance": float(1 - out.fvu),
                        "fvu": float(out.fvu),
                        "l0": float((out.top_acts > 0).sum(1).float().mean()),
                        "dead_frac": float(dead.float().mean()),
                        "batch_usage": float((fired > 0).float().mean()),
                        "lr": lr,
                        "aux_loss": float(out.auxk_loss),
                    }
                )
        return float(out.fvu.detach())

    def state(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "fire_counts": self.fire_counts,
            "seen": self.seen,
            "step": self.step,
            "curves": self.curves,
            "var_per_token": self.var_per_token,
        }

    def load_state(self, s: dict[str, Any]) -> None:
        self.sae.load_state_dict(s["sae"])
        self.opt.load_state_dict(s["opt"])
        self.since_fired.copy_(s["since_fired"])
        self.fire_counts.copy_(s["fire_counts"])
        self.seen, self.step, self.curves = s["seen"], s["step"], s["curves"]
        self.var_per_token = s.get("var_per_token")


def _fused_adam_ok(device: str) -> bool:
    return device.startswith("cuda") or tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def train(
    store: str, out: str, specs: list[SAESpec], options: TrainOptions = TrainOptions(), *, progress: bool = False
) -> list[str]:
    """Train every SAE in `specs` on `store` into the run directory `out`; returns their directories."""
    if not specs:
        raise UsageError("nothing to train: give at least one --hooks, --k, --expansion, --tokens and --seeds value")
    for spec in specs:
        if spec.seed < 0 or spec.expansion < 1:
            raise UsageError(f"{spec.sae_id}: seeds must be ≥ 0 and expansions ≥ 1")
        if spec.tokens <= 0:
            raise UsageError(f"token budget {spec.tokens} for {spec.sae_id} is not positive; give --tokens like 1M")
    _validate_options(options)
    group = st.open_store(store)
    run = Path(out)
    hooks_in_store = st.hooks_of(group)
    for spec in specs:
        if spec.hook not in hooks_in_store:
            raise UsageError(f"hook {spec.hook!r} is not in {store}; it has {', '.join(hooks_in_store)}")
        d_in = group["acts"][spec.hook].shape[2]
        if not 0 < spec.k < d_in * spec.expansion:
            raise UsageError(
                f"k = {spec.k} must be between 1 and d_sae - 1 = {d_in * spec.expansion - 1} "
                f"(d_in {d_in} × expansion {spec.expansion}); lower --k or raise --expansion"
            )
    _check_run(run, store, group)
    done = []
    for hook in dict.fromkeys(s.hook for s in specs):
        done += _train_hook(store, group, run, [s for s in specs if s.hook == hook], options, progress)
    return done


def _validate_options(o: TrainOptions) -> None:
    import math

    if o.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if o.lr is not None and not (math.isfinite(o.lr) and o.lr > 0):
        raise UsageError(f"--lr {o.lr} must be a positive number")
    if not (math.isfinite(o.auxk_coef) and o.auxk_coef >= 0):
        raise UsageError(f"--auxk-coef {o.auxk_coef} must be a non-negative number")
    if o.dead_tokens is not None and o.dead_tokens < 1:
        raise UsageError(f"--dead-tokens {o.dead_tokens} must be at least 1")
    if o.data_seed < 0:
        raise UsageError(f"--data-seed {o.data_seed} must be 0 or more")


def _check_run(run: Path, store: str, group: Any) -> None:
    """A run directory belongs to one store's model; refuse to resume it on another model's store."""
    manifest = run / "run.json"
    model = group.attrs.get("model", {}).get("name")
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {run} exists and is a file; give a directory for the run")
    if manifest.exists():
        try:
            prior = json.loads(manifest.read_text())
        except ValueError:
            raise UsageError(f"{manifest} is damaged (not JSON); repair it or use another --out") from None
        if prior.get("model") != model:
            raise UsageError(
                f"{run} holds SAEs of model {prior.get('model')!r} but {store} was harvested from {model!r}; "
                "use another --out"
            )
        return
    run.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        manifest, json.dumps({"store": str(store), "model": model, "actstore": __version__}, indent=2).encode()
    )


def _train_hook(store: str, group: Any, run: Path, specs: list[SAESpec], o: TrainOptions, progress: bool) -> list[str]:
    hook = specs[0].hook
    loader_opts = LoaderOptions(batch_size=o.batch_size, seed=o.data_seed, drop_first_positions=o.drop_first_positions)
    wanted = run_settings(store, o, loader_opts)
    for spec in specs:
        cfg_file = run / "saes" / spec.sae_id / "cfg.json"
        if cfg_file.exists() and (run / "saes" / spec.sae_id / "sae_weights.safetensors").exists():
            had = json.loads(cfg_file.read_text()).get("actstore", {}).get("settings")
            if had != wanted:
                diff = sorted(
                    k for k in (had or {}).get("options", {}) if had["options"][k] != wanted["options"].get(k)
                )
                raise UsageError(
                    f"{run}/saes/{spec.sae_id} was trained with other settings ({', '.join(diff) or 'store or loader'}); "
                    "use another --out"
                )
    todo = [s for s in specs if not (run / "saes" / s.sae_id / "sae_weights.safetensors").exists()]
    if not todo:
        return [str(run / "saes" / s.sae_id) for s in specs]
    ckpt_path = run / "checkpoints" / f"{hook}.pt"

    def key(of: list[SAESpec]) -> dict[str, Any]:
        opts = {k: v for k, v in asdict(o).items() if k not in ("checkpoint_seconds", "log_every")}
        return {"specs": [asdict(s) for s in of], "options": opts, "loader": asdict(loader_opts), "store": str(store)}

    ckpt = torch.load(ckpt_path, weights_only=False, map_location=o.device) if ckpt_path.exists() else None
    # A checkpoint written before some SAEs of this sweep finished still covers the rest of it.
    members = next((m for m in (specs, todo) if ckpt is not None and ckpt["key"] == key(m)), None)
    if members is None:
        ckpt = None  # another sweep was started here: begin afresh (its finished SAEs are kept)
        members = todo
    ckpt_key = key(members)
    total = max(s.tokens for s in members)

    d_in = group["acts"][hook].shape[2]
    if ckpt is None:
        first = next(iter(ActivationLoader(store, hook, min(total, o.batch_size), loader_opts, device=o.device)))
        b_dec = geometric_median(first.float())
    else:
        b_dec = torch.zeros(d_in, device=o.device)
    trainees = [_Trainee(s, d_in, o, b_dec) for s in members]
    position = 0
    if ckpt is not None:
        for t, state in zip(trainees, ckpt["trainees"], strict=True):
            t.load_state(state)
        position = ckpt["position"]

    loader = ActivationLoader(store, hook, total, loader_opts, start_token=position, device=o.device)
    bar = token_bar(progress, total, f"train {hook} ({plural_saes(len(todo))})", initial=position)
    last_ckpt = time.monotonic()
    for batch in loader:
        fvus = [t.train_step(batch) for t in trainees if not t.done]
        position += len(batch)
        for t in trainees:
            if t.done and not (run / "saes" / t.spec.sae_id / "sae_weights.safetensors").exists():
                _save_trainee(t, run, store, group, o, loader_opts, loader.epoch_tokens)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(fvu=f"{float(np.mean(fvus)):.3f}" if fvus else "-", refresh=False)
        if time.monotonic() - last_ckpt >= o.checkpoint_seconds and position < total:
            _write_checkpoint(ckpt_path, ckpt_key, trainees, position)
            last_ckpt = time.monotonic()
    if bar is not None:
        bar.close()
    for t in trainees:  # (budgets beyond the store's size loop over it: the loader starts a new epoch)
        if not (run / "saes" / t.spec.sae_id / "sae_weights.safetensors").exists():
            _save_trainee(t, run, store, group, o, loader_opts, loader.epoch_tokens)
    ckpt_path.unlink(missing_ok=True)
    return [str(run / "saes" / s.sae_id) for s in specs]


def run_settings(store: str, o: TrainOptions, lo: LoaderOptions) -> dict[str, Any]:
    """What, beyond the sae_id, decides an SAE's weights: a finished SAE is reused only if these match."""
    opts = {k: v for k, v in asdict(o).items() if k not in ("checkpoint_seconds", "log_every", "device")}
    return json.loads(json.dumps({"store": str(store), "options": opts, "loader": asdict(lo)}))


def _save_trainee(
    t: _Trainee, run: Path, store: str, group: Any, o: TrainOptions, lo: LoaderOptions, epoch_tokens: int
) -> None:
    """Curves first, then weights, config and fire counts written aside and renamed into place.

    The weights directory appearing is what marks an SAE done, so it comes last.
    """
    import polars as pl
    from safetensors.torch import save_file

    spec = t.spec
    attrs = group.attrs
    curves = run / "records" / "curves" / f"sae_id={spec.sae_id}"
    curves.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(t.curves).drop("sae_id").write_parquet(curves / "part-0.parquet.partial")
    os.replace(curves / "part-0.parquet.partial", curves / "part-0.parquet")

    final = run / "saes" / spec.sae_id
    tmp = final.with_name(final.name + ".partial")
    model_name = attrs.get("model", {}).get("name")
    context = int(attrs.get("seq_len", 0))
    cfg = {
        "hook_name": spec.hook,
        "hook_layer": _layer(spec.hook),
        "model_name": model_name,
        "context_size": context,
        "prepend_bos": bool(attrs.get("settings", {}).get("prepend_bos", False)),
        "dataset_path": str(store),
        "seqpos_slice": [lo.drop_first_positions, None],
        "metadata": {
            "model_name": model_name,
            "hook_name": spec.hook,
            "hook_layer": _layer(spec.hook),
            "context_size": context,
            "seqpos_slice": [lo.drop_first_positions, None],
        },
        "actstore": {
            "version": __version__,
            "sae_id": spec.sae_id,
            "expansion": spec.expansion,
            "train_tokens": t.seen,
            "token_budget": spec.tokens,
            "epochs": round(t.seen / max(1, epoch_tokens), 3),
            "seed": spec.seed,
            "store": str(store),
            "store_model": attrs.get("model", {}),
            "loader": asdict(lo),
            "lr": t.peak_lr,
            "dead_tokens": t.dead_tokens,
            "auxk_coef": o.auxk_coef,
            "low_precision": o.low_precision,
            "batch_size": o.batch_size,
            "steps": t.step,
            "settings": run_settings(store, o, lo),
        },
    }
    t.sae.save(tmp, cfg)
    save_file(
        {"fire_counts": t.fire_counts.cpu(), "tokens": torch.tensor([t.seen])}, str(tmp / "fire_counts.safetensors")
    )
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)


def _layer(hook: str) -> int | None:
    from actstore.model import hook_layer

    return hook_layer(hook)


def _write_checkpoint(path: Path, key: dict[str, Any], trainees: list[_Trainee], position: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save({"key": key, "position": position, "trainees": [t.state() for t in trainees]}, tmp)
    os.replace(tmp, path)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary(run: str) -> list[dict[str, Any]]:
    """Each trained SAE's last logged FVU and dead fraction, read from the curves."""

    from actstore.records import read_table

    df = read_table(run, "curves")
    if df.is_empty():
        return []
    last = df.sort("step").group_by("sae_id").last().sort("sae_id")
    return last.select("sae_id", "tokens", "fvu", "dead_frac", "l0").to_dicts()

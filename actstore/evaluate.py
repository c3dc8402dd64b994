"""`actstore eval`: per-token records of SAEs on an eval store, running the model once.

Why this shape: every later question (R² vs CE, KL gaps, error predictability, bootstrap CIs) needs many
numbers per token, so they are all computed here, in one pass, and written as Parquet. Definitions
follow METHODS.md exactly. For a residual-stream hook the layers below it run once per batch (the clean
prefix) and only the layers above it run again for each patch: the SAE's x̂, zero ablation, and three
perturbations of the SAE error's size (isotropic ε-random, same-cosine, activation-difference).
Other hooks, and architectures where that direct suffix does not reproduce the model, patch through a hook.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from actstore import __version__
from actstore import records as rec
from actstore import store as st
from actstore.darkmatter import load_probe
from actstore.errors import StoreError, UsageError
from actstore.geometry import moments, write_layers
from actstore.model import LoadedModel, capture, hook_layer, load_model
from actstore.progress import plural_saes, token_bar
from actstore.saeio import EvalSAE, load_eval_sae

EPS = 1e-10  # METHODS.md: relerr = ‖e‖/(‖x‖ + 1e-10)


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 16  # sequences per forward pass
    seed: int = 0  # random draws of the baselines; stored with the records
    patch_pos: int | None = None  # single-position mode: patch only this position
    max_seqs: int | None = None  # evaluate the first N sequences of the store
    device: str = "cpu"
    compute_dtype: str = "float32"
    darkmatter: bool = False  # also patch x̂ + LinearError and x̂ + NonlinearError (needs `actstore darkmatter`)


class Patcher:
    """Runs the model above a hook from a replacement activation, sharing the clean prefix.

    For `blocks.L.hook_resid_post` / `resid_pre` it runs only the bridge's blocks above the hook, then
    the final norm and unembedding (TransformerLens 4.3's `start_at_layer` was measured to still
    execute every block). That direct path is checked once against a full forward on a probe batch;
    any mismatch or error (other architectures, TransformerLens 3.x) falls back to patching through a
    hook in a full forward, which is always right and only slower.
    """

    def __init__(self, model: LoadedModel, hook: str):
        self.model, self.hook = model, hook
        m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook)
        self.start = None if m is None else int(m.group(1)) + (1 if m.group(2) == "post" else 0)
        if self.start is not None and not self._direct_suffix_agrees():
            self.start = None

    @torch.inference_mode()
    def logits(self, tokens: Tensor, replacement: Tensor) -> Tensor:
        """The logits (compute dtype) with `replacement` in place of the hook's activation."""
        if self.start is not None:
            return self._suffix(replacement)
        act = replacement

        def swap(a: Tensor, hook: Any) -> Tensor:
            return act.to(a.dtype).reshape(a.shape)

        return self.model.bridge.run_with_hooks(tokens, fwd_hooks=[(self.hook, swap)])

    def _suffix(self, resid: Tensor) -> Tensor:
        bridge = self.model.bridge
        h = resid.to(next(bridge.parameters()).dtype)
        n, t = h.shape[:2]
        pos = torch.arange(t, device=h.device)[None].expand(n, -1)
        rotary = bridge.rotary_emb(h, pos) if hasattr(bridge, "rotary_emb") else None
        mask = torch.full((t, t), float("-inf"), dtype=h.dtype, device=h.device).triu(1)[None, None]
        for block in bridge.blocks[self.start :]:
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
        return bridge.unembed(bridge.ln_final(h))

    @torch.inference_mode()
    def _direct_suffix_agrees(self) -> bool:
        try:
            tokens = (torch.arange(22).reshape(2, 11) % int(self.model.bridge.cfg.d_vocab)).to(self.model.device)
            resid = capture(self.model, tokens, [self.hook])[self.hook]
            want = self.model.bridge(tokens).float()
            got = self._suffix(resid).float()
            return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())))
        except Exception:  # an architecture whose blocks take other arguments: use the hook path
            return False


class CleanDistribution:
    """P at every token of a batch, kept to score many patched Q against: CE of Q and KL(P ‖ Q).

    log P and P are computed once per batch. Each Q is scored in blocks of ROWS tokens — log-softmax,
    the CE gather and Σ_v P (log P − log Q) — so every pass over the vocabulary stays in cache (with a
    50k vocabulary, one full-size pass per step cost as much as the layers above a mid-depth hook;
    blocked, the scoring is 4–5× cheaper). The difference is taken before the product, so small KLs
    keep their precision, and Q = P gives exactly 0.
    """

    ROWS = 16

    def __init__(self, logits: Tensor, tokens: Tensor):
        logits = logits.reshape(-1, logits.shape[-1])
        self.logp = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        self.p = torch.empty_like(self.logp)
        for start in range(0, len(logits), self.ROWS):  # blocked, like `score`
            rows = slice(start, start + self.ROWS)
            self.logp[rows] = torch.log_softmax(logits[rows].float(), dim=-1)
            self.p[rows] = self.logp[rows].exp()
        nxt = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1).reshape(-1).long()
        self.has_next = nxt >= 0
        self.target = nxt.clamp_min(0)[:, None]
        self.ce = self._ce(self.logp, slice(None))

    def _ce(self, logq: Tensor, rows: slice) -> Tensor:
        ce = -logq.gather(-1, self.target[rows]).squeeze(-1)
        return torch.where(self.has_next[rows], ce, torch.nan)

    def score(self, logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(ce, kl) per token of Q given by `logits`, as float32 arrays (ce NaN at the last position)."""
        logits = logits.reshape(-1, logits.shape[-1])
        ce, kl = torch.empty(len(logits)), torch.empty(len(logits))
        for start in range(0, len(logits), self.ROWS):
            rows = slice(start, start + self.ROWS)
            logq = torch.log_softmax(logits[rows].float(), dim=-1)
            ce[rows] = self._ce(logq, rows).cpu()
            kl[rows] = (self.p[rows] * (self.logp[rows] - logq)).sum(-1).cpu()
        return ce.numpy(), kl.numpy()


def perturbations(x: Tensor, xh: Tensor, gen: torch.Generator) -> dict[str, Tensor]:
    """The SAE's x̂ and the three baselines of the same error size (METHODS.md), for (n, d) tokens."""
    e_norm = (x - xh).norm(dim=-1, keepdim=True)
    g = torch.randn(x.shape, generator=gen)
    eps = x + e_norm * g / g.norm(dim=-1, keepdim=True)
    x_unit = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    u = g - (g * x_unit).sum(-1, keepdim=True) * x_unit
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(EPS)
    c = (x * xh).sum(-1, keepdim=True) / (x.norm(dim=-1, keepdim=True) * xh.norm(dim=-1, keepdim=True)).clamp_min(EPS)
    samecos = (c * x_unit + (1 - c**2).clamp_min(0).sqrt() * u) * xh.norm(dim=-1, keepdim=True)
    # π: a random cyclic shift of a random order, so no token is paired with itself; identical
    # activations (the same token at position 0, say) fall back to the isotropic direction.
    order = torch.randperm(len(x), generator=gen)
    partner = torch.empty_like(order)
    partner[order] = order.roll(1)
    diff = x - x[partner]
    diff = torch.where(diff.norm(dim=-1, keepdim=True) > EPS, diff, g)
    actdiff = x + e_norm * diff / diff.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return {"patched": xh, "eps": eps, "samecos": samecos, "actdiff": actdiff}


def activation_metrics(x: Tensor, xh: Tensor, z: Tensor, mu: Tensor) -> dict[str, np.ndarray]:
    """Per-token activation-space numbers of METHODS.md for (n, d) tokens."""
    e = x - xh
    x_norm, xh_norm, e_norm = x.norm(dim=-1), xh.norm(dim=-1), e.norm(dim=-1)
    dot = (x * xh).sum(-1)
    out = {
        "x_norm": x_norm,
        "recon_norm": xh_norm,
        "err_norm": e_norm,
        "sse": e.pow(2).sum(-1),
        "sst": (x - mu).pow(2).sum(-1),
        "dot": dot,
        "cos": dot / (x_norm * xh_norm).clamp_min(EPS),
        "relerr": e_norm / (x_norm + EPS),
        "l0": (z != 0).sum(-1).float(),
    }
    return {k: v.cpu().numpy().astype(np.float32) for k, v in out.items()}


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
    """
    group = st.open_store(eval_store, mode="r+")
    n_store = int(group["tokens"].shape[0])
    if st.committed(group) < n_store:
        raise StoreError(
            f"{eval_store} is incomplete ({st.committed(group)} of {n_store} sequences); finish its harvest first"
        )
    saes = _load_saes(run, sae_paths)
    hooks = st.hooks_of(group)
    for s in saes:
        if s.hook not in hooks:
            raise UsageError(f"SAE {s.sae_id} reads {s.hook}, which {eval_store} lacks; it has {', '.join(hooks)}")
        d = int(group["acts"][s.hook].shape[2])
        if s.d_in != d:
            raise UsageError(f"SAE {s.sae_id} has d_in {s.d_in} but {s.hook} in {eval_store} is {d} wide")
    if options.patch_pos is not None and not 0 <= options.patch_pos < group["tokens"].shape[1]:
        raise UsageError(f"--patch-pos {options.patch_pos} is outside the sequence (0…{group['tokens'].shape[1] - 1})")
    probes = {s.sae_id: _probe(run, s.sae_id) for s in saes} if options.darkmatter else {}
    model_name = group.attrs.get("model", {}).get("name")
    model = loaded or load_model(model_name, options.device, options.compute_dtype)
    n_seq = min(n_store, options.max_seqs or n_store)
    stats = {h: moments(group, h, n_seq) for h in hooks}  # μ for sst, and the layers table's covariance
    done = []
    for hook in dict.fromkeys(s.hook for s in saes):
        batch_saes = [s.to(options.device) for s in saes if s.hook == hook]
        mu = torch.from_numpy(stats[hook][0]).float().to(options.device)
        frames = _evaluate_hook(group, eval_store, model, hook, batch_saes, n_seq, options, progress, probes, mu)
        for s in batch_saes:
            rec.write_parts(run, s.sae_id, frames[s.sae_id])
            done.append(s.sae_id)
    write_layers(eval_store, run, max_seqs=n_seq, known=stats)  # the geometry of every hook of the eval store
    _write_vocab(run, model, model_name, st.read_tokens(group, slice(0, n_seq)))
    return done


def _write_vocab(run: str, model: LoadedModel, model_name: str, tokens: np.ndarray) -> None:
    """The text of every token id seen, so queries can show tokens, not ids (`vocab`, one partition per model)."""
    ids = np.unique(tokens).tolist()
    frame = pl.DataFrame(
        {"model": [model_name] * len(ids), "token": ids, "text": [model.tokenizer.decode([i]) for i in ids]},
        schema={"model": pl.String, "token": pl.Int32, "text": pl.String},
    )
    key = hashlib.sha256(str(model_name).encode()).hexdigest()[:12]
    old = rec.part_path(run, "vocab", key, "model_key")
    if old.is_file():  # other eval stores of this model saw other tokens: keep theirs too
        frame = pl.concat([pl.read_parquet(old).select(frame.columns), frame]).unique("token", keep="last")
    rec.write_parts(run, key, {"vocab": frame.sort("token")}, partition="model_key")


def _probe(run: str, sae_id: str) -> tuple[Tensor, Tensor]:
    probe = load_probe(run, sae_id)
    if probe is None:
        raise UsageError(f"--darkmatter needs a probe for {sae_id}; run `actstore darkmatter {run}` first")
    return probe


def _load_saes(run: str, sae_paths: list[str] | None) -> list[EvalSAE]:
    paths = sae_paths or [str(p.parent) for p in sorted((Path(run) / "saes").glob("*/cfg.json"))]
    if not paths:
        raise UsageError(f"no SAEs in {run}/saes and none given with --sae; train some with `actstore train`")
    return [load_eval_sae(p) for p in paths]


def _evaluate_hook(
    group: Any,
    store_path: str,
    model: LoadedModel,
    hook: str,
    saes: list[EvalSAE],
    n_seq: int,
    o: EvalOptions,
    progress: bool,
    probes: dict[str, tuple[Tensor, Tensor]],
    mu: Tensor,
) -> dict[str, dict[str, pl.DataFrame]]:
    seq_len = int(group["tokens"].shape[1])
    patcher = Patcher(model, hook)
    recon = {s.sae_id: _recon_array(group, hook, s.sae_id) for s in saes}
    cols: dict[str, dict[str, list]] = {s.sae_id: {} for s in saes}
    codes: dict[str, list] = {s.sae_id: [] for s in saes}
    bar = token_bar(progress, n_seq * seq_len, f"eval {hook} ({plural_saes(len(saes))})")
    for b, start in enumerate(range(0, n_seq, o.batch_size)):
        stop = min(start + o.batch_size, n_seq)
        tokens = torch.from_numpy(st.read_tokens(group, slice(start, stop)).astype(np.int64)).to(o.device)
        x = torch.from_numpy(st.read_acts(group, hook, slice(start, stop))).to(o.device)
        n_b, d = x.shape[0], x.shape[2]
        x_live = capture(model, tokens, [hook])[hook].float().reshape(x.shape)
        clean = CleanDistribution(patcher.logits(tokens, x_live), tokens)
        base = {
            "seq": np.repeat(np.arange(start, stop, dtype=np.int32), seq_len),
            "pos": np.tile(np.arange(seq_len, dtype=np.int16), n_b),
            "token": tokens.reshape(-1).cpu().numpy().astype(np.int32),
            "next_token": np.concatenate([tokens[:, 1:].cpu().numpy(), np.full((n_b, 1), -1)], 1)
            .reshape(-1)
            .astype(np.int32),
            "ce_orig": clean.ce.cpu().numpy(),
        }
        base["ce_zero"], base["kl_zero"] = clean.score(
            patcher.logits(tokens, _place(x_live, torch.zeros_like(x_live), o.patch_pos))
        )
        for s in saes:
            xf = x.reshape(-1, d)
            z = s.latents(xf)
            xh = s.decode(z)
            row = {**base, **activation_metrics(xf, xh, z, mu)}
            gen = torch.Generator().manual_seed(o.seed * 1_000_003 + b)
            candidates = perturbations(xf.cpu(), xh.cpu(), gen)
            if s.sae_id in probes:  # Engels et al.: x̂ + LinearError, and x̂ + NonlinearError = x − LinearError
                w, bias = probes[s.sae_id]
                linear = xf.cpu() @ w + bias
                candidates |= {"linear": xh.cpu() + linear, "nonlinear": xf.cpu() - linear}
            for name, candidate in candidates.items():
                logits = patcher.logits(tokens, _place(x_live, candidate.to(o.device).reshape(x.shape), o.patch_pos))
                row[f"ce_{name}"], row[f"kl_{name}"] = clean.score(logits)
            for key, value in row.items():
                cols[s.sae_id].setdefault(key, []).append(value)
            nz = z.nonzero()
            codes[s.sae_id].append(
                (
                    (start + nz[:, 0] // seq_len).cpu().numpy().astype(np.int32),
                    (nz[:, 0] % seq_len).cpu().numpy().astype(np.int16),
                    nz[:, 1].cpu().numpy().astype(np.int32),
                    z[nz[:, 0], nz[:, 1]].cpu().numpy().astype(np.float32),
                )
            )
            recon[s.sae_id][start:stop] = st.to_stored(xh.reshape(x.shape), recon[s.sae_id].attrs["actstore_dtype"])
        if bar is not None:
            bar.update(n_b * seq_len)
    if bar is not None:
        bar.close()
    return {s.sae_id: _frames(s, store_path, group, cols[s.sae_id], codes[s.sae_id], n_seq, o) for s in saes}


def _place(x_live: Tensor, candidate: Tensor, pos: int | None) -> Tensor:
    """All positions patched, or only `pos` (single-position mode: the rest stay clean)."""
    if pos is None:
        return candidate
    out = x_live.clone()
    out[:, pos] = candidate[:, pos]
    return out


def _recon_array(group: Any, hook: str, sae_id: str) -> Any:
    """`recon/<sae_id>/<hook>`, with the activations' shape, chunks, dtype and codecs."""
    acts = group["acts"][hook]
    dtype = acts.attrs.get("actstore_dtype", str(acts.dtype))
    filters, compressors = st.codec_chain(
        group.attrs.get("codec", {}).get("name", st.DEFAULT_CODEC), dtype, acts.dtype.itemsize
    )
    arr = (
        group.require_group("recon")
        .require_group(sae_id)
        .create_array(
            hook,
            shape=acts.shape,
            chunks=acts.chunks,
            dtype=acts.dtype,
            filters=filters,
            compressors=compressors,
            dimension_names=st.DIMS,
            fill_value=0,
            overwrite=True,
        )
    )
    arr.attrs.update({"actstore_dtype": dtype, "hook": hook, "sae_id": sae_id})
    return arr


def _frames(
    s: EvalSAE, store_path: str, group: Any, cols: dict[str, list], codes: list, n_seq: int, o: EvalOptions
) -> dict[str, pl.DataFrame]:
    names = ("seq", "pos", "latent", "value")
    code_frame = pl.DataFrame({name: np.concatenate([c[i] for c in codes]) for i, name in enumerate(names)})
    rate, latents = _rate_and_latents(
        s, code_frame, n_seq * int(group["tokens"].shape[1]), int(group["tokens"].shape[1])
    )
    tokens = pl.DataFrame({k: np.concatenate(v) for k, v in cols.items()}).with_columns(
        pl.Series("rate_bits", rate), pl.lit(str(store_path)).alias("store"), pl.col(pl.Float32).fill_nan(None)
    )
    meta = s.cfg.get("actstore", {})
    saes = pl.DataFrame(
        [
            {
                "model": group.attrs.get("model", {}).get("name"),
                "hook": s.hook,
                "layer": hook_layer(s.hook),
                "d_model": s.d_in,
                "d_sae": s.d_sae,
                "k": s.k,
                "expansion": meta.get("expansion", s.d_sae // s.d_in),
                "train_tokens": meta.get("train_tokens"),
                "seed": meta.get("seed"),
                "architecture": s.architecture,
                "path": s.path,
            }
        ]
    )
    evals = pl.DataFrame(
        [
            {
                "store": str(store_path),
                "n_seq": n_seq,
                "n_tokens": n_seq * int(group["tokens"].shape[1]),
                "seed": o.seed,
                "patch_pos": o.patch_pos,
                "options": str(asdict(o)),
                "actstore": __version__,
                "created": st.now(),
            }
        ]
    )
    return {"tokens": tokens, "codes": code_frame, "latents": latents, "saes": saes, "evals": evals}


def _rate_and_latents(s: EvalSAE, codes: pl.DataFrame, n_tokens: int, seq_len: int) -> tuple[np.ndarray, pl.DataFrame]:
    """Per-token rate proxy (METHODS.md) and per-latent firing counts and decoder norms.

    Rate: Σ over a token's active latents of −log₂ p_i, p_i = latent i's share of all firings on the
    evaluated tokens, plus 8 bits per active value. Rows of `tokens` are seq-major from seq 0, so a
    code's token row is seq · seq_len + pos.
    """
    latent = codes["latent"].to_numpy()
    fires = np.bincount(latent, minlength=s.d_sae)
    bits = -np.log2(np.maximum(fires, 1) / max(len(latent), 1))[latent] + 8.0
    row = codes["seq"].to_numpy().astype(np.int64) * seq_len + codes["pos"].to_numpy()
    rate = np.bincount(row, weights=bits, minlength=n_tokens).astype(np.float32)
    latents = pl.DataFrame(
        {
            "latent": np.arange(s.d_sae, dtype=np.int32),
            "fires": fires.astype(np.int64),
            "firing_rate": (fires / n_tokens).astype(np.float64),
            "dec_norm": s.W_dec.float().norm(dim=-1).cpu().numpy().astype(np.float32),
        }
    )
    return rate, latents

"""How sensitive the model's loss is to the directions an SAE's error takes: gradient and pullback Fisher.

Why (studies 000 and 002 end on it; 001's KL gap asks it from the other side): R² weights an error by the
activations' covariance, the loss by the model's sensitivity. Per batch, from the clean activations at
the hook and the layers above it (actstore/patching.py), this computes
- g = ∂(Σ_t CE_t)/∂x_s at every position (one backward, shared by every SAE and baseline): g·δ is the
  first-order change of the summed CE under a displacement δ;
- for a displacement δ (every position, or one), u_t = ∂logits_t/∂x · δ by a forward-mode JVP, and
  swd_t = ½ u_tᵀ F_t u_t with F_t = diag(p_t) − p_t p_tᵀ: the second-order expansion of KL(P_t ‖ Q_t) under
  that same patch;
- iso_sens by Hutchinson's estimator: the mean over m Gaussian probes v (at the patched positions) of
  (Jv)_tᵀ F_t (Jv)_t / d, so that an isotropic error of norm r has expected swd ½ r² iso_sens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from actstore.errors import UsageError
from actstore.patching import Batch, Patcher

ROWS = 16  # tokens per block when contracting with P (as CleanDistribution.score: cache-sized passes)


def check_differentiable(patcher: Patcher) -> None:
    """A one-line error unless the hook runs through the direct suffix (forward-mode JVPs need it)."""
    if patcher.start is None:
        raise UsageError(
            f"--sensitivity needs a residual-stream hook whose layers above run directly "
            f"(blocks.L.hook_resid_pre/post); {patcher.hook} is patched inside a full forward, where the "
            "JVPs are not supported: evaluate it without --sensitivity"
        )


def _frozen(patcher: Patcher) -> None:
    for p in patcher.model.bridge.parameters():  # eval never trains: no graph through the weights
        p.requires_grad_(False)


def hook_gradient(patcher: Patcher, batch: Batch) -> Tensor:
    """g = ∂(Σ over tokens with a next token of CE)/∂x at the hook, (n, seq_len, d) float32."""
    _frozen(patcher)
    with torch.enable_grad():
        x = batch.x_live.detach().clone().requires_grad_(True)
        logits = patcher._suffix(x).float()
        target = batch.tokens[:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        (g,) = torch.autograd.grad(ce, x)
    return g.float()


def jvp_logits(patcher: Patcher, batch: Batch, tangent: Tensor) -> Tensor:
    """u = ∂logits/∂x · tangent at the clean activations, (n, seq_len, d_vocab) float32."""
    return jvp_many(patcher, batch, tangent[None])[0]


JVP_BYTES = 1 << 29  # the tangent logits of one vmapped chunk of tangents


def jvp_many(patcher: Patcher, batch: Batch, tangents: Tensor) -> Tensor:
    """u for a stack of m tangents, (m, n, seq_len, d_vocab): vmapped, so the primal pass is shared (measured
    on the tiny model: 8 JVPs cost 3.7 forward passes each vmapped, 6.5 each one by one)."""
    _frozen(patcher)
    x = batch.x_live.detach()
    n, seq_len = x.shape[:2]
    chunk = max(1, JVP_BYTES // (n * seq_len * int(patcher.model.bridge.cfg.d_vocab) * 4))

    def one(tangent: Tensor) -> Tensor:
        return torch.func.jvp(patcher._suffix, (x,), (tangent,))[1]

    return torch.func.vmap(one, chunk_size=chunk)(tangents.to(x.dtype)).float()


def fisher_quadratic(batch: Batch, u: Tensor) -> Tensor:
    """uᵀ F u per token with F = diag(p) − p pᵀ of the clean distribution: Σ p u² − (Σ p u)², (n·seq_len,)."""
    u = u.reshape(-1, u.shape[-1])
    p = batch.clean.p
    out = torch.empty(len(u), device=u.device)
    for start in range(0, len(u), ROWS):
        rows = slice(start, start + ROWS)
        pu = p[rows] * u[rows]
        out[rows] = (pu * u[rows]).sum(-1) - pu.sum(-1) ** 2
    return out.clamp_min(0)  # F is positive semi-definite: a negative value is rounding


def iso_sens(
    patcher: Patcher, batch: Batch, probes: int, gen: torch.Generator | Sequence[torch.Generator], pos: int | None
) -> Tensor:
    """Hutchinson's estimate of tr(Jᵀ F J)/d per token, Gaussian probes at every position (or at `pos` only).

    `gen`: one generator per sequence of the batch (its probes, whatever the batching), or one for all."""
    n, seq_len, d = batch.x_live.shape
    if isinstance(gen, torch.Generator):
        v = torch.randn((probes, n, seq_len, d), generator=gen)
    else:
        v = torch.empty((probes, n, seq_len, d))
        for i, gi in enumerate(gen):
            v[:, i] = torch.randn((probes, seq_len, d), generator=gi)
    v = v.to(batch.x_live.device)
    if pos is not None:
        keep = torch.zeros(seq_len, 1, device=v.device)
        keep[pos] = 1
        v = v * keep
    u = jvp_many(patcher, batch, v)
    return sum(fisher_quadratic(batch, u[i]) for i in range(probes)) / (probes * d)


class BatchSensitivity:
    """The gradient and the probes of one batch, then the first-order and Fisher numbers of any patch."""

    def __init__(
        self,
        patcher: Patcher,
        batch: Batch,
        probes: int,
        gen: torch.Generator | Sequence[torch.Generator],
        pos: int | None,
    ):
        self.patcher, self.batch = patcher, batch
        self.g = hook_gradient(patcher, batch)
        self.iso = iso_sens(patcher, batch, probes, gen, pos)

    def columns(self, replacements: dict[str, Tensor]) -> dict[str, np.ndarray]:
        """fo_<name> = g·δ and swd_<name> = ½ uᵀFu per token for each patch, δ = replacement − the clean
        activation; the JVPs of all patches in one vmapped call."""
        live = self.batch.x_live.float()
        deltas = torch.stack([(r.float() - live).reshape(live.shape) for r in replacements.values()])
        u = jvp_many(self.patcher, self.batch, deltas)
        out = {}
        for i, name in enumerate(replacements):
            out[f"fo_{name}"] = (self.g * deltas[i]).sum(-1).reshape(-1).cpu().numpy()
            out[f"swd_{name}"] = (0.5 * fisher_quadratic(self.batch, u[i])).cpu().numpy()
        return out

    def shared(self) -> dict[str, np.ndarray]:
        return {"grad_norm": self.g.norm(dim=-1).reshape(-1).cpu().numpy(), "iso_sens": self.iso.cpu().numpy()}

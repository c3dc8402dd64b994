"""Inference-time gradient pursuit on a frozen SAE decoder (L. Smith 2024, "Replacing SAE encoders with
inference-time optimisation"; used by Engels et al. 2024, "Decomposing the dark matter of SAEs", §6.1).

Why: it splits an SAE's error into what a better encoder could remove and what it could not. Pursuit
re-encodes each token on the frozen decoder with exactly the SAE's own L0 for that token: the error it
removes was the encoder's doing; what is left bounds from above what the dictionary cannot represent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from actstore.metrics import EPS
from actstore.sae import EncoderOutput

# Elements of one chunk's (tokens × d_sae) score matrix: 2^25 float32 is 128 MiB (2048 tokens at d_sae 16k).
CHUNK_ELEMENTS = 1 << 25


def pursuit_codes(
    x: Tensor,
    w_dec: Tensor,
    b_dec: Tensor,
    l0: Tensor,
    *,
    nonnegative: bool = True,
    chunk_size: int | None = None,
) -> EncoderOutput:
    """Gradient-pursuit codes of (n, d) tokens: token i uses at most l0[i] rows of w_dec (d_sae, d).

    Returns (values, indices), each (n, max(l0)), in selection order; a token's slots past its l0 hold
    value 0 at index 0, so `F.embedding_bag(indices, w_dec, per_sample_weights=values) + b_dec` is its
    reconstruction. Values are ≥ 0 when `nonnegative`, of either sign otherwise.

    Row norms: the pursuit runs on the unit rows u_j = w_j/‖w_j‖ and the coefficients are divided by
    ‖w_j‖ at the end, so the result depends only on the rows' directions. (Gradient steps on raw rows of
    unequal norms are ill-conditioned: in fp32 a step for a short new row overshoots a long old one's
    coefficient by (‖w_old‖/‖w_new‖)², so at a 7x norm ratio rounding errors grew 20–50x per iteration.)
    Zero rows are never picked; l0 is capped at the number of nonzero rows.

    Per iteration, each token still short of its l0 adds the unselected unit row with the largest inner
    product with its residual (largest |.| when signed), then takes one exact line-search step along the
    gradient of ½‖r‖² restricted to the support (g = U_S r, α = ⟨g,g⟩/‖U_Sᵀg‖²), then clamps at 0 when
    nonnegative. That clamp follows Smith's algorithm; it is not a projected line search, so a step can in
    rare cases raise a token's error slightly. Chunks of `chunk_size` tokens (default: about 128 MiB of
    scores per chunk) bound memory at O(chunk · (d_sae + max(l0) · d)).
    """
    if x.ndim != 2 or w_dec.ndim != 2 or x.shape[1] != w_dec.shape[1]:
        raise ValueError(f"x must be (n, d) and w_dec (d_sae, d); got {tuple(x.shape)} and {tuple(w_dec.shape)}")
    if b_dec.shape != (x.shape[1],):
        raise ValueError(f"b_dec must be ({x.shape[1]},); got {tuple(b_dec.shape)}")
    if l0.shape != (x.shape[0],):
        raise ValueError(f"l0 must be ({x.shape[0]},); got {tuple(l0.shape)}")
    if torch.is_floating_point(l0) and not torch.equal(l0, l0.round()):
        raise ValueError("l0 must hold whole numbers")
    l0 = l0.to(device=x.device, dtype=torch.int64)
    if (l0 < 0).any():
        raise ValueError("l0 must be ≥ 0")
    d_sae = w_dec.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 inputs are fitted in fp32
    x, w, b = x.to(dtype), w_dec.to(device=x.device, dtype=dtype), b_dec.to(device=x.device, dtype=dtype)
    norms = w.norm(dim=1)
    dead = norms <= EPS
    inv_norm = torch.where(dead, torch.zeros_like(norms), 1 / norms.clamp_min(EPS))
    unit = w * inv_norm[:, None]
    l0 = l0.clamp_max(d_sae - int(dead.sum()))
    width = int(l0.max()) if len(l0) else 0
    values = torch.zeros(len(x), width, dtype=dtype, device=x.device)
    indices = torch.zeros(len(x), width, dtype=torch.int64, device=x.device)
    step = chunk_size or max(1, CHUNK_ELEMENTS // max(d_sae, 1))
    order = torch.argsort(l0, descending=True, stable=True)  # chunks of like l0 waste no work on finished tokens
    with torch.no_grad():
        for s in range(0, len(x), step):
            rows = order[s : s + step]
            vals, idx = _pursue(x[rows] - b, unit, dead, l0[rows], nonnegative)
            values[rows, : vals.shape[1]] = vals * inv_norm[idx]  # back onto the raw rows
            indices[rows, : idx.shape[1]] = idx
    return EncoderOutput(values, indices)


def gradient_pursuit(x: Tensor, w_dec: Tensor, b_dec: Tensor, l0: Tensor, *, nonnegative: bool = True) -> Tensor:
    """The (n, d) reconstruction b_dec + coeffs @ w_dec of `pursuit_codes`: l0[i] atoms for token i.

    In fp32 for bf16/fp16 inputs (fp64 stays fp64); a token with l0 = 0 gets b_dec exactly.
    """
    vals, idx = pursuit_codes(x, w_dec, b_dec, l0, nonnegative=nonnegative)
    w = w_dec.to(device=vals.device, dtype=vals.dtype)
    b = b_dec.to(device=vals.device, dtype=vals.dtype)
    if idx.shape[1] == 0:
        return b.expand(len(x), -1).clone()
    return F.embedding_bag(idx, w, per_sample_weights=vals, mode="sum") + b


def _pursue(xc: Tensor, u: Tensor, dead: Tensor, l0: Tensor, nonnegative: bool) -> tuple[Tensor, Tensor]:
    """One chunk of centred tokens xc (m, d) on unit rows u, l0 sorted descending: greedy selection plus
    one gradient step per iteration. The tokens still short of their l0 are always a prefix, the only rows
    touched."""
    m, width = len(xc), int(l0[0]) if len(l0) else 0
    vals = torch.zeros(m, width, dtype=xc.dtype, device=xc.device)
    idx = torch.zeros(m, width, dtype=torch.int64, device=xc.device)
    taken = dead.expand(m, -1).clone()
    recon = torch.zeros_like(xc)
    for t in range(width):
        a = int((l0 > t).sum())  # rows [0, a) are still pursuing
        r = xc[:a] - recon[:a]
        raw = r @ u.T  # ⟨u_j, r⟩ for every atom: the one dense product per iteration
        score = raw if nonnegative else raw.abs()
        pick = score.masked_fill(taken[:a], float("-inf")).argmax(dim=1)
        idx[:a, t] = pick
        taken[torch.arange(a, device=xc.device), pick] = True
        sup = idx[:a, : t + 1]
        g = raw.gather(1, sup)  # ∇ of ½‖r‖² with respect to the support's coefficients: U_S r
        c = F.embedding_bag(sup, u, per_sample_weights=g, mode="sum")  # U_Sᵀ g
        gg, cc = (g * g).sum(1), (c * c).sum(1)
        alpha = torch.where(cc > 0, gg / cc.clamp_min(torch.finfo(cc.dtype).tiny), torch.zeros_like(cc))
        v = vals[:a, : t + 1] + alpha[:, None] * g
        if nonnegative:
            v = v.clamp_min(0)
        vals[:a, : t + 1] = v
        recon[:a] = F.embedding_bag(sup, u, per_sample_weights=v, mode="sum")
    return vals, idx

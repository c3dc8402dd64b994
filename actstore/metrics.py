"""Per-token numbers of an SAE on eval tokens, and the random baselines of the SAE error's size.

Why: these are the definitions of docs/METHODS.md ("Activation space", the baselines) in code, kept apart
from the model runs (actstore/patching.py) and the records driver (actstore/steps/evaluate.py) so each
reads like the formula it implements and tests can check it against numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor

EPS = 1e-10  # docs/METHODS.md: relerr = ‖e‖/(‖x‖ + 1e-10); also the floor of every norm we divide by


# Every random draw of eval is per sequence: a generator seeded by (eval --seed, the sequence's index) and
# the stream it feeds, so the batch size and the torchrun split never change what a sequence draws.
# The seeds of the streams are disjoint: ε draws odd, baselines 0 and probes 2 modulo 4.
STREAMS = {"baselines": (4, 0), "eps": (2, 1), "probes": (4, 2)}


def sequence_generators(seed: int, seqs: Sequence[int] | np.ndarray, stream: str) -> list[torch.Generator]:
    """One CPU generator per sequence of `seqs` for the draws of `stream` (a key of STREAMS)."""
    times, plus = STREAMS[stream]
    return [torch.Generator().manual_seed((seed * 1_000_003 + int(q)) * times + plus) for q in seqs]


def baselines(x: Tensor, xh: Tensor, gen: torch.Generator | Sequence[torch.Generator]) -> dict[str, Tensor]:
    """The baselines of actstore.tables.BASELINES for (n, d) tokens: random errors of ‖x − x̂‖'s size.

    `gen`: one generator per sequence (x holds the sequences' tokens in order, each as many), each
    drawing that sequence's directions and actdiff's partners; a single generator treats x as one sequence.
    The draws come from CPU generators (the same on every device); everything else runs where x is."""
    gens = [gen] if isinstance(gen, torch.Generator) else list(gen)
    per = len(x) // len(gens)
    if per * len(gens) != len(x):
        raise ValueError(f"{len(x)} tokens do not split into {len(gens)} sequences of equal length")
    g = torch.empty(x.shape)
    a, b = torch.empty(len(x), dtype=torch.long), torch.empty(len(x), dtype=torch.long)
    for i, gi in enumerate(gens):  # per sequence: its Gaussian draws, then its partners (CPU generators)
        rows = slice(i * per, (i + 1) * per)
        torch.randn((per, x.shape[-1]), generator=gi, out=g[rows])
        if per >= 3:
            a[rows], b[rows] = (j + i * per for j in partners(per, gi))
    g, a, b = (t.to(x.device, non_blocking=True) for t in (g, a, b))  # the rest on x's device: one copy up
    e_norm = (x - xh).norm(dim=-1, keepdim=True)
    eps = x + e_norm * g / g.norm(dim=-1, keepdim=True)
    x_unit = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    u = g - (g * x_unit).sum(-1, keepdim=True) * x_unit
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(EPS)
    c = (x * xh).sum(-1, keepdim=True) / (x.norm(dim=-1, keepdim=True) * xh.norm(dim=-1, keepdim=True)).clamp_min(EPS)
    samecos = (c * x_unit + (1 - c**2).clamp_min(0).sqrt() * u) * xh.norm(dim=-1, keepdim=True)
    # Lee & Heimersheim's direction: the difference of two *other* real activations of the same sequence,
    # never built from the token's own x; identical partners (or a sequence of < 3 tokens) fall back to g.
    diff = x[a] - x[b] if per >= 3 else g
    diff = torch.where(diff.norm(dim=-1, keepdim=True) > EPS, diff, g)
    actdiff = x + e_norm * diff / diff.norm(dim=-1, keepdim=True).clamp_min(EPS)
    # Gurnee's shrinkage test (001): the clean direction at the SAE's norm, and the SAE's direction at the
    # clean norm. If the SAE's damage were its norm change, sae_norm would match it and norm_corrected fix it.
    x_norm, xh_norm = x.norm(dim=-1, keepdim=True), xh.norm(dim=-1, keepdim=True)
    sae_norm = x * xh_norm / x_norm.clamp_min(EPS)
    norm_corrected = xh * x_norm / xh_norm.clamp_min(EPS)
    return {"eps": eps, "samecos": samecos, "actdiff": actdiff, "sae_norm": sae_norm, "norm_corrected": norm_corrected}


def partners(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two partner tokens a_i ≠ b_i for each of n tokens, both other than i (n ≥ 3): the next two in a
    random cyclic order of the sequence."""
    order = torch.randperm(n, generator=gen)
    place = torch.empty_like(order)
    place[order] = torch.arange(n)
    return order[(place + 1) % n], order[(place + 2) % n]


def activation_metrics(x: Tensor, xh: Tensor, l0: Tensor, mu: Tensor) -> dict[str, np.ndarray]:
    """Per-token activation-space numbers of docs/METHODS.md for (n, d) tokens, as float32 arrays."""
    return to_host(activation_columns(x, xh, l0, mu))


def activation_columns(x: Tensor, xh: Tensor, l0: Tensor, mu: Tensor) -> dict[str, Tensor]:
    """`activation_metrics` left on x's device, to be copied to the host with the other columns at once."""
    e = x - xh
    x_norm, xh_norm, e_norm = x.norm(dim=-1), xh.norm(dim=-1), e.norm(dim=-1)
    dot = (x * xh).sum(-1)
    return {
        "x_norm": x_norm,
        "recon_norm": xh_norm,
        "err_norm": e_norm,
        "sse": e.pow(2).sum(-1),
        "sst": (x - mu).pow(2).sum(-1),
        "dot": dot,
        "cos": dot / (x_norm * xh_norm).clamp_min(EPS),
        "relerr": e_norm / (x_norm + EPS),
        "l0": l0.float(),
    }


def to_host(columns: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Per-token columns of equal length as float32 arrays, in one device-to-host copy (one sync, not one
    per column)."""
    if not columns:
        return {}
    both = torch.stack([c.reshape(-1).float() for c in columns.values()]).cpu().numpy()
    return dict(zip(columns, both, strict=True))


def rate_and_latents(
    codes: pl.DataFrame,
    token_rows: np.ndarray,
    n_tokens: int,
    d_sae: int,
    dec_norm: np.ndarray,
    everywhere: tuple[np.ndarray, int] | None = None,
) -> tuple[np.ndarray, pl.DataFrame]:
    """Per-token rate proxy (docs/METHODS.md) and per-latent firing counts, from the codes of n_tokens tokens.

    Rate: Σ over a token's active latents of −log₂ p_i, p_i = latent i's share of all firings on the
    evaluated tokens, plus 8 bits per active value. `token_rows` gives each code's row in the tokens table.
    `everywhere`: (firings per latent, tokens) over all evaluated tokens when these codes are one rank's
    share of them (torchrun): p_i and the latents table then describe the whole evaluation.
    """
    latent = codes["latent"].to_numpy()
    fires = np.bincount(latent, minlength=d_sae)
    rows = n_tokens
    if everywhere is not None:
        fires, n_tokens = everywhere
    bits = -np.log2(np.maximum(fires, 1) / max(int(fires.sum()), 1))[latent] + 8.0
    rate = np.bincount(token_rows, weights=bits, minlength=rows).astype(np.float32)
    latents = pl.DataFrame(
        {
            "latent": np.arange(d_sae, dtype=np.int32),
            "fires": fires.astype(np.int64),
            "firing_rate": (fires / n_tokens).astype(np.float64),
            "dec_norm": dec_norm.astype(np.float32),
        }
    )
    return rate, latents

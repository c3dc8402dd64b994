"""Many ε-random draws for the same token: how far the SAE's own error lands outside random errors of its size.

Why (study 001, "How pathological are the errors?"): one ε-random draw per token says the SAE is worse on
average; N draws at one position P say, per token, how many standard deviations the SAE's KL sits above
the KL of random errors of the same norm: z = (KL_SAE − mean) / SD over the draws. Only P is replaced
(every other position keeps the clean activation) and KL(P ‖ Q) is read at P. Causal attention means no
position after P can change the distribution at P, so the draws run on the prefix 0…P only, the layers
below the hook run once per sequence (eval's clean pass), and only position P is unembedded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from actstore.errors import UsageError
from actstore.metrics import sequence_generators
from actstore.patching import Batch, Patcher

MAX_DRAW_BYTES = 4 << 30  # the draws' records held in memory: refuse a request above this, with the number
DRAW_RECORD_BYTES = 16  # seq, draw (int32) and kl, ce (float32) per draw
CHUNK_BYTES = 1 << 28  # activations and logits of one chunk of draws


def check_draws(n_draws: int, n_seq: int) -> None:
    """A one-line UsageError when N draws on n_seq sequences would not fit in memory (the estimate is in it)."""
    need = n_draws * n_seq * DRAW_RECORD_BYTES
    if need > MAX_DRAW_BYTES:
        raise UsageError(
            f"--eps-draws {n_draws} on {n_seq} sequences would hold {need / 1e9:.1f} GB of draw records "
            f"({n_seq} × {n_draws} draws × {DRAW_RECORD_BYTES} bytes; the limit is {MAX_DRAW_BYTES / 1e9:.1f} GB): "
            "lower --eps-draws (study 001 used 500) or --max-seqs"
        )


def draw_generator(seed: int, seq: int) -> torch.Generator:
    """The draws of sequence `seq`: the same directions whatever the batching, and for every SAE (paired)."""
    return sequence_generators(seed, [seq], "eps")[0]  # (seed · 1,000,003 + seq) · 2 + 1, as before


def eps_at(x: Tensor, err_norm: Tensor, n_draws: int, gen: torch.Generator) -> Tensor:
    """(n_draws, d) ε-random replacements of one token: x + ‖e‖·g/‖g‖ with g standard normal (float32, CPU)."""
    g = torch.randn((n_draws, x.shape[-1]), generator=gen)
    return x.float().cpu() + err_norm.float().cpu() * g / g.norm(dim=-1, keepdim=True)


def _chunk_rows(pos: int, d: int, d_vocab: int) -> int:
    """Draws per forward: the prefix's activations (≈16 d-wide tensors per token in a block) and one row of logits."""
    return max(1, CHUNK_BYTES // ((pos + 1) * 16 * d * 4 + d_vocab * 8))


def _score(batch: Batch, rows: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(kl, ce) of the Q given by `logits` (one row per draw) against the clean P at token row `rows`, on the
    host; blocked and computed as eval's records are (CleanDistribution.score_block)."""
    clean = batch.clean
    kl, ce = torch.empty(len(rows), device=logits.device), torch.empty(len(rows), device=logits.device)
    for start in range(0, len(rows), clean.ROWS):
        part = slice(start, start + clean.ROWS)
        ce[part], kl[part] = clean.score_block(logits[part], rows[part])
    both = torch.stack([kl, ce]).cpu()
    return both[0], both[1]


def draw_batch(
    patcher: Patcher, batch: Batch, xh: Tensor, pos: int, n_draws: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """For every sequence of `batch`: the SAE substitution and `n_draws` ε-random ones at `pos` alone.

    Returns (per-token summary columns, per-draw columns). `xh` is the SAE's reconstruction of batch.x.
    """
    n, seq_len, d = batch.x.shape
    device = batch.x_live.device
    tokens, live = batch.tokens[:, : pos + 1], batch.x_live[:, : pos + 1]
    token_rows = torch.arange(n, device=device) * seq_len + pos
    x_p, xh_p = batch.x[:, pos].float(), xh.reshape(batch.x.shape)[:, pos].float()
    err_norm = (x_p - xh_p).norm(dim=-1, keepdim=True)
    sae = live.clone()
    sae[:, pos] = xh_p
    kl_sae, ce_sae = _score(batch, token_rows, patcher.logits_at(tokens, sae, pos))
    candidates = torch.cat(
        [eps_at(x_p[i], err_norm[i], n_draws, draw_generator(seed, int(batch.seqs[i]))) for i in range(n)]
    )
    owner = torch.arange(n).repeat_interleave(n_draws)  # the sequence of each draw
    step = _chunk_rows(pos, d, int(patcher.model.bridge.cfg.d_vocab))
    kl, ce = torch.empty(len(owner)), torch.empty(len(owner))
    for start in range(0, len(owner), step):
        part = slice(start, start + step)
        who = owner[part].to(device)
        replacement = live[who].clone()
        replacement[:, pos] = candidates[part].to(device)
        kl[part], ce[part] = _score(batch, token_rows[who], patcher.logits_at(tokens[who], replacement, pos))
    kl_draws = kl.reshape(n, n_draws).double().numpy()
    mean, sd = kl_draws.mean(1), kl_draws.std(1, ddof=1)  # n_draws ≥ 2 (EvalOptions)
    kl_sae_np = kl_sae.double().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (kl_sae_np - mean) / sd
    summary = {
        "seq": batch.seqs,
        "pos": np.full(n, pos, dtype=np.int16),
        "n_draws": np.full(n, n_draws, dtype=np.int32),
        "err_norm": err_norm.squeeze(-1).cpu().numpy(),
        "kl_sae": kl_sae.numpy(),
        "ce_sae": ce_sae.numpy(),
        "kl_mean": mean,
        "kl_sd": sd,
        "z": z,
        "share_above": (kl_draws >= kl_sae_np[:, None]).mean(1),
        "ce_mean": ce.reshape(n, n_draws).double().numpy().mean(1),
    }
    draws = {
        "seq": np.repeat(batch.seqs, n_draws),
        "pos": np.full(n * n_draws, pos, dtype=np.int16),
        "draw": np.tile(np.arange(n_draws, dtype=np.int32), n),
        "kl": kl.numpy(),
        "ce": ce.numpy(),
    }
    return summary, draws

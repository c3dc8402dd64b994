"""Patching: the model above a hook, run from replacement activations, scored against the clean pass.

Why its own module: eval (the SAE's x̂, zero ablation, the baselines) and darkmatter (x̂ + LinearError,
x̂ + NonlinearError) ask the same thing — what does the model predict when the hook's activation is
replaced? — and must answer it the same way. The layers below the hook run once per batch (the clean
prefix); each patch runs only the layers above it; each patched distribution Q is scored against the
clean P once (CE of the true next token, KL(P ‖ Q)).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from actstore import store as st
from actstore.model import LoadedModel, blocks_after, capture


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
        self.start = blocks_after(hook)
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

    @torch.inference_mode()
    def logits_at(self, tokens: Tensor, replacement: Tensor, pos: int) -> Tensor:
        """The logits at position `pos` only, (n, d_vocab): causal attention makes later positions
        irrelevant, so callers pass the tokens and replacement cut after `pos`; the direct path then
        unembeds that one position."""
        if self.start is not None:
            return self._suffix(replacement, pos)[:, 0]
        return self.logits(tokens, replacement)[:, pos]

    def _suffix(self, resid: Tensor, only_pos: int | None = None) -> Tensor:
        bridge = self.model.bridge
        h = resid.to(next(bridge.parameters()).dtype)
        n, t = h.shape[:2]
        pos = torch.arange(t, device=h.device)[None].expand(n, -1)
        rotary = bridge.rotary_emb(h, pos) if hasattr(bridge, "rotary_emb") else None
        mask = torch.full((t, t), float("-inf"), dtype=h.dtype, device=h.device).triu(1)[None, None]
        for block in bridge.blocks[self.start :]:
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
        if only_pos is not None:
            h = h[:, only_pos : only_pos + 1]
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


def place(x_live: Tensor, candidate: Tensor, pos: int | None) -> Tensor:
    """All positions patched, or only `pos` (single-position mode: the rest stay clean)."""
    if pos is None:
        return candidate
    out = x_live.clone()
    out[:, pos] = candidate[:, pos]
    return out


@dataclass
class Batch:
    """One batch of eval sequences with what every patch of it shares."""

    seqs: np.ndarray  # the sequences' indices in the store (int32)
    tokens: Tensor  # (n, seq_len) int64
    x: Tensor  # stored activations, (n, seq_len, d) float32
    x_live: Tensor  # the model's own activations at the hook (the clean pass), same shape
    clean: CleanDistribution

    def token_key(self) -> dict[str, np.ndarray]:
        """seq, pos, token and next_token of every token of the batch, seq-major (the records' row order)."""
        n, seq_len = self.tokens.shape
        tokens = self.tokens.cpu().numpy().astype(np.int32)
        following = np.concatenate([tokens[:, 1:], np.full((n, 1), -1, dtype=np.int32)], 1)
        return {
            "seq": np.repeat(self.seqs, seq_len),
            "pos": np.tile(np.arange(seq_len, dtype=np.int16), n),
            "token": tokens.reshape(-1),
            "next_token": following.reshape(-1),
        }


def batches(
    group: Any, model: LoadedModel, patcher: Patcher, seqs: list[int] | range, batch_size: int, device: str
) -> Iterator[Batch]:
    """The store's sequences `seqs` (ascending) in batches of `batch_size`, each with its clean pass."""
    seqs = list(seqs)
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        span = slice(chunk[0], chunk[-1] + 1)
        rows = np.asarray(chunk) - chunk[0]  # a whole span is read; every other sequence, say, is kept
        tokens = torch.from_numpy(st.read_tokens(group, span)[rows].astype(np.int64)).to(device)
        x = torch.from_numpy(st.read_acts(group, patcher.hook, span)[rows]).to(device)
        x_live = capture(model, tokens, [patcher.hook])[patcher.hook].float().reshape(x.shape)
        yield Batch(
            np.asarray(chunk, dtype=np.int32),
            tokens,
            x,
            x_live,
            CleanDistribution(patcher.logits(tokens, x_live), tokens),
        )

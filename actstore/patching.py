"""Patching: the model above a hook, run from replacement activations, scored against the clean pass.

Why its own module: eval (the SAE's x̂, zero ablation, the baselines) and darkmatter (x̂ + LinearError,
x̂ + NonlinearError) ask the same thing — what does the model predict when the hook's activation is
replaced? — and must answer it the same way. The layers below the hook run once per batch (the clean
prefix); each patch runs only the layers above it; each patched distribution Q is scored against the
clean P once (CE of the true next token, KL(P ‖ Q)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from actstore import store as st
from actstore.errors import UsageError
from actstore.model import LoadedModel, blocks_after, capture

# Memory budgets of eval's scoring (docs/DESIGN.md, "The GPU path", the paragraph "Eval scores on the device"):
STACK_BYTES = 1 << 30  # activations inside a block of the patches stacked in one call above the hook
VOCAB_BYTES = 1 << 32  # a batch's (or row block's) arrays at tokens × vocabulary: clean z_P, P, a patch's logits, log P
VOCAB_ARRAYS = 4  # … of 4 bytes each per token and vocabulary entry
HEAD_BYTES = {"cpu": 1 << 25, "other": 1 << 30}  # logits of one block of unembedded rows: cache-sized on a CPU
# Stack the patches and block the unembedding (`Patcher.score`) on accelerators only: on a 2-core CPU it
# measured slower than one patch at a time (6 patches of 8 × 128 tokens, 50k vocabulary: 15.7–17.7 s vs 12.2 s).
STACKED = {"cpu": False, "other": True}


def _kind(device: torch.device | str) -> str:
    return "cpu" if torch.device(device).type == "cpu" else "other"


def head_rows(d_vocab: int, device: torch.device | str) -> int:
    """Tokens unembedded at once when scoring: a multiple of CleanDistribution.ROWS whose float32 logits fit
    HEAD_BYTES (on a CPU they stay in the last-level cache; on an accelerator they keep the matmul large)."""
    budget = HEAD_BYTES[_kind(device)]
    rows = budget // (4 * d_vocab) // CleanDistribution.ROWS * CleanDistribution.ROWS
    return max(CleanDistribution.ROWS, rows)


def sequences_per_batch(batch_size: int, seq_len: int, d_vocab: int) -> int:
    """`batch_size`, lowered so that a batch's tokens × vocabulary arrays fit VOCAB_BYTES (never below one
    sequence): with a 256k vocabulary, 16 sequences of 1,024 tokens would hold 16 GB per array. One sequence
    over the budget (256k × 2,048 tokens: 8 GiB) is scored in blocks of `vocab_rows` tokens on the direct
    path (`Patcher.clean`). The records do not depend on it (every draw is per sequence; every layer and the
    scoring act per sequence or token)."""
    return max(1, min(batch_size, VOCAB_BYTES // _vocab_bytes(seq_len, d_vocab)))


def vocab_rows(d_vocab: int) -> int:
    """Tokens whose VOCAB_ARRAYS arrays at tokens × vocabulary fit VOCAB_BYTES: the row block of a clean
    distribution kept as its final residual (a multiple of CleanDistribution.ROWS, at least one)."""
    rows = VOCAB_BYTES // _vocab_bytes(1, d_vocab) // CleanDistribution.ROWS * CleanDistribution.ROWS
    return max(CleanDistribution.ROWS, rows)


def _vocab_bytes(n_tokens: int, d_vocab: int) -> int:
    return n_tokens * d_vocab * 4 * VOCAB_ARRAYS


def check_whole_fits(n_tokens: int, d_vocab: int, what: str) -> None:
    """Refuse, in one line, what needs a sequence's clean arrays at tokens × vocabulary whole (--sensitivity's
    P) when they exceed VOCAB_BYTES; eval itself scores such a sequence per block of rows."""
    if _vocab_bytes(n_tokens, d_vocab) > VOCAB_BYTES:
        gib = _vocab_bytes(n_tokens, d_vocab) / 2**30
        raise UsageError(
            f"{what} needs {gib:.1f} GiB at tokens × vocabulary for one sequence, over eval's "
            f"{VOCAB_BYTES / 2**30:g} GiB (patching.VOCAB_BYTES): eval scores such a sequence per block of "
            "rows, but --sensitivity needs it whole; harvest shorter sequences (--seq-len)"
        )


class Patcher:
    """Runs the model above a hook from a replacement activation, sharing the clean prefix.

    For `blocks.L.hook_resid_post` / `resid_pre` it runs only the bridge's blocks above the hook, then
    the final norm, the unembedding and the model's own transform of the logits after it (Gemma-2's
    softcap `cap · tanh(logits / cap)`, Granite's or Cohere's scaling: the architecture adapter's
    `apply_output_logits_transform`, the step TransformerLens declares for each architecture).
    TransformerLens 4.3's `start_at_layer` was measured to still execute every block. That direct
    path is checked once against a full forward on a probe batch, at the model's own logits and with
    the logits before the final transform blown up to where a softcap saturates; any mismatch or
    error (other architectures, TransformerLens 3.x) falls back to patching through a hook in a full
    forward, which is always right and only slower. `path` says which one runs ("suffix" or
    "full_forward"); eval records it in the `evals` row's options.
    """

    # The probe's scale for the logits before the final transform: far above any softcap in use
    # (Gemma-2's is 30), so a missing or wrong cap changes the largest logit many-fold, and small
    # enough for float16 (max 65504).
    PROBE_LOGIT_SCALE = 1000.0

    def __init__(self, model: LoadedModel, hook: str):
        self.model, self.hook = model, hook
        self.start = blocks_after(hook)
        if self.start is not None and not self._direct_suffix_agrees():
            self.start = None
        self.path = "full_forward" if self.start is None else "suffix"

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

    @torch.inference_mode()
    def clean(self, tokens: Tensor, x_live: Tensor) -> CleanDistribution:
        """The clean distribution of a batch from its activations at the hook: whole when its arrays at
        tokens × vocabulary fit VOCAB_BYTES; otherwise (one sequence over it) kept as the final residual
        and unembedded per block of `vocab_rows` tokens when scored. The full-forward path has no final
        residual to keep: there the whole logits stay, over the budget or not."""
        d_vocab = int(self.model.bridge.cfg.d_vocab)
        if self.start is None or _vocab_bytes(tokens.numel(), d_vocab) <= VOCAB_BYTES:
            return CleanDistribution(self.logits(tokens, x_live), tokens)
        return CleanDistribution.from_residual(self._blocks(x_live), self.head_of, tokens, d_vocab)

    @torch.inference_mode()
    def head_of(self, h: Tensor) -> Tensor:
        """The logits (rows, d_vocab) of final residuals `h` (rows, d_model): a kept clean distribution's rows."""
        return self._head(h[None])[0]

    @torch.inference_mode()
    def score(
        self, clean: CleanDistribution, tokens: Tensor, replacements: Sequence[Tensor]
    ) -> list[tuple[Tensor, Tensor]]:
        """(ce, kl) per token, on the device, of each replacement in place of the hook's activation.

        On the direct path the patches run the layers above the hook stacked, as many per call as
        STACK_BYTES allows (one call instead of one per patch), and the unembedding runs on blocks of
        `head_rows` tokens each scored at once, so no patch's logits exist at batch × vocabulary and a
        block is scored while it is still in cache. A clean distribution kept as its final residual is
        unembedded once per block of its rows, every patch scored against that block before the next (on
        a CPU too, one patch per call there). Per token the numbers do not depend on how the patches are
        stacked or the rows blocked: every layer acts on a sequence or a token alone."""
        stacked = STACKED[_kind(tokens.device)]
        if self.start is None or (clean.h is None and not stacked):
            return [clean.score_tensors(self.logits(tokens, r)) for r in replacements]
        finals = self._finals(tokens.shape, replacements, self._patches_per_call(tokens.shape) if stacked else 1)
        if clean.h is None:
            return [self._score_rows(clean, h) for h in finals]  # a group's residuals live while scored
        return self._score_blocks(clean, list(finals))

    def _finals(self, shape: torch.Size, replacements: Sequence[Tensor], per_call: int) -> Iterator[Tensor]:
        """The residual after the last block of each replacement, (1, tokens, d_model), `per_call` per call."""
        for first in range(0, len(replacements), per_call):
            group = replacements[first : first + per_call]
            h = self._blocks(torch.cat([r.reshape(*shape, -1) for r in group]))
            yield from (part.reshape(1, -1, part.shape[-1]) for part in h.chunk(len(group)))

    def _score_blocks(self, clean: CleanDistribution, finals: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(ce, kl) of each final residual against a kept clean distribution, its row blocks outermost."""
        n_tok = len(clean.ce)
        out = [(torch.empty(n_tok, device=h.device), torch.empty(n_tok, device=h.device)) for h in finals]
        for start in range(0, n_tok, clean.span):
            rows, part = slice(start, start + clean.span), clean.block(start)
            for h, (ce, kl) in zip(finals, out, strict=True):
                ce[rows], kl[rows] = self._score_rows(part, h[:, rows])
        return out

    def _score_rows(self, clean: CleanDistribution, h: Tensor) -> tuple[Tensor, Tensor]:
        """(ce, kl) of the tokens whose residual after the last block is `h` (1, tokens, d_model)."""
        n_tok = h.shape[1]
        ce = torch.empty(n_tok, device=h.device)
        kl = torch.empty_like(ce)
        step = head_rows(int(self.model.bridge.cfg.d_vocab), h.device)
        for start in range(0, n_tok, step):
            logits = self._head(h[:, start : start + step])[0]
            for sub in range(0, len(logits), clean.ROWS):
                rows = slice(start + sub, start + min(sub + clean.ROWS, len(logits)))
                ce[rows], kl[rows] = clean.score_block(logits[sub : sub + clean.ROWS], rows)
        return ce, kl

    def _patches_per_call(self, shape: torch.Size) -> int:
        """How many patches of a batch run the layers above the hook in one call (≥ 1): their
        activations inside a block, ≈ 16 d_model-wide tensors and the attention scores, within STACK_BYTES."""
        cfg = self.model.bridge.cfg
        n, t = shape
        per_patch = n * t * (16 * int(cfg.d_model) + int(getattr(cfg, "n_heads", 1)) * t) * 4
        return max(1, STACK_BYTES // per_patch)

    def _suffix(self, resid: Tensor, only_pos: int | None = None) -> Tensor:
        h = self._blocks(resid)
        if only_pos is not None:
            h = h[:, only_pos : only_pos + 1]
        return self._head(h)

    def _blocks(self, resid: Tensor) -> Tensor:
        """The residual stream after the last block, from `resid` at the hook (n, t, d_model)."""
        bridge = self.model.bridge
        h = resid.to(next(bridge.parameters()).dtype)
        n, t = h.shape[:2]
        pos = torch.arange(t, device=h.device)[None].expand(n, -1)
        rotary = bridge.rotary_emb(h, pos) if hasattr(bridge, "rotary_emb") else None
        causal = torch.full((t, t), float("-inf"), dtype=h.dtype, device=h.device).triu(1)
        for block in bridge.blocks[self.start :]:
            mask = _attention_mask(block, causal)
            out = block(h, attention_mask=mask, position_ids=pos, position_embeddings=rotary)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _head(self, h: Tensor) -> Tensor:
        """Final norm, unembedding and the model's own logits transform, row by row of `h`."""
        bridge = self.model.bridge
        return self._final_transform(bridge.unembed(bridge.ln_final(h)))

    def _final_transform(self, logits: Tensor) -> Tensor:
        """What the model does to the logits after the unembedding, by its own adapter's definition
        (softcap, output scaling); without one (older TransformerLens), a softcap the config declares."""
        bridge = self.model.bridge
        transform = getattr(getattr(bridge, "adapter", None), "apply_output_logits_transform", None)
        if callable(transform):
            return transform(logits)
        cap = getattr(bridge.cfg, "output_logits_soft_cap", None)
        if cap is not None and cap > 0:  # -1 / 0 / None: no cap
            return cap * torch.tanh(logits / cap)
        return logits

    @torch.inference_mode()
    def _direct_suffix_agrees(self) -> bool:
        """The direct path's logits against a full forward's on a probe batch, twice: as the model
        computes them, which checks the blocks, norm and unembedding; and with the unembedding's output
        scaled in both to a largest value of PROBE_LOGIT_SCALE, which checks the final transform where
        it is not ~identity (with small logits, cap · tanh(x / cap) ≈ x hid a missing softcap)."""
        bridge = self.model.bridge
        try:
            tokens = (torch.arange(22).reshape(2, 11) % int(bridge.cfg.d_vocab)).to(self.model.device)
            resid = capture(self.model, tokens, [self.hook])[self.hook]
            tol = agreement_tolerance(next(bridge.parameters()).dtype, self.model.device)
            if not _close(self._suffix(resid), bridge(tokens), tol):
                return False

            def blow_up(logits: Tensor, hook: Any) -> Tensor:
                return logits * (self.PROBE_LOGIT_SCALE / logits.abs().amax().clamp_min(1e-6))

            with bridge.hooks(fwd_hooks=[("unembed.hook_out", blow_up)]):
                want = bridge(tokens)
                got = self._suffix(resid)
            return _close(got, want, tol)
        except Exception:  # an architecture whose blocks take other arguments: use the hook path
            return False


def agreement_tolerance(dtype: torch.dtype, device: str = "cpu") -> float:
    """How far (relative to the largest logit) the direct path may be from the full forward.

    Both run the same modules in the same dtype; they differ only where the kernels do (the mask, the
    matmuls' shapes and reduction order), so the gap is rounding, amplified a little by the layers
    above the hook. A structural mistake (a missing softcap or scale, a wrong mask) moves the logits
    by far more than any of these bounds.
    - float32: 1e-4. The unit roundoff is 6e-8, but a different reduction order over d_model or
      d_vocab terms moves a sum by up to n · 6e-8 (≈ 2.5e-4 worst case at n = 4096, ~1e-6 typical).
    - bfloat16: 2^-5 ≈ 0.031, i.e. 8 units of its roundoff 2^-8: one rounding of an activation
      differently in the two paths is already 0.4 %, and it compounds through the layers above the
      hook (the old 1e-3 was below a single bf16 rounding, so every bf16 run fell back).
    - float16: 2^-8 ≈ 0.0039, the same 8 units of its roundoff 2^-11.
    - float32 matmuls in TF32 on CUDA (10-bit mantissa, as float16): float16's bound.
    """
    if dtype == torch.bfloat16:
        return 2.0**-5
    tf32 = str(device).startswith("cuda") and torch.backends.cuda.matmul.allow_tf32
    if dtype == torch.float16 or (dtype == torch.float32 and tf32):
        return 2.0**-8
    return 1e-4


def _close(got: Tensor, want: Tensor, tol: float) -> bool:
    got, want = got.float(), want.float()
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))


def _attention_mask(block: Any, causal: Tensor) -> Tensor:
    """The additive mask a block's attention gets in the full forward: causal, and for a
    sliding-window layer (Gemma-2's every other layer, Mistral) also blind to keys `window` or more
    positions back (Hugging Face's rule: key j is seen from query i when i - window < j ≤ i)."""
    attn = getattr(getattr(block, "attn", None), "original_component", None)
    window = getattr(attn, "sliding_window", None)
    t = causal.shape[-1]
    if isinstance(window, int) and 0 < window < t:
        causal = causal.masked_fill(torch.ones_like(causal, dtype=torch.bool).tril(-window), float("-inf"))
    return causal[None, None]


class CleanDistribution:
    """P at every token of a batch, kept to score many patched Q against: CE of Q and KL(P ‖ Q).

    The clean logits z_P (float32), P and lse_P = log Σ exp z_P are computed once per batch. Each Q is scored
    in blocks of ROWS tokens, so every pass over the vocabulary stays in cache (with a 50k vocabulary, one
    full-size pass per step cost as much as the layers above a mid-depth hook). Per token
    KL = Σ_v P_v ((z_P,v − z_Q,v) − (lse_P − lse_Q)): the logits' difference is taken first (exact where
    they are close), then the normalisers', then the product, so small KLs keep their precision and Q = P
    gives exactly 0; a block costs one logsumexp, two elementwise passes and one dot product over the
    vocabulary, and no log Q is written. Results stay on the device: `score_tensors` never syncs.

    When those arrays would not fit VOCAB_BYTES (`from_residual`), only the final residual h is kept and
    z_P, P, lse_P exist for one block of `span` rows at a time (`block`); `z`, `p` and `logp` of the whole
    batch then refuse.
    """

    ROWS = 16

    def __init__(self, logits: Tensor, tokens: Tensor):
        self._fill(logits.reshape(-1, logits.shape[-1]), *_next_tokens(tokens))

    def _fill(self, logits: Tensor, target: Tensor, has_next: Tensor) -> None:
        """z_P, P, lse_P and the clean CE of every row of `logits` (a batch, or a block of a kept one)."""
        self.target, self.has_next = target, has_next
        self.h: Tensor | None = None
        self.head: Callable[[Tensor], Tensor] | None = None
        self.span, self.d_vocab = len(logits), logits.shape[-1]
        self._z = logits.float() if logits.dtype != torch.float32 else logits
        self._p = torch.empty_like(self._z)
        self.lse = torch.empty(len(logits), device=logits.device)
        for start in range(0, len(logits), self.ROWS):  # blocked, like `score_tensors`
            rows = slice(start, start + self.ROWS)
            self.lse[rows] = torch.logsumexp(self._z[rows], -1)
            torch.exp(self._z[rows] - self.lse[rows, None], out=self._p[rows])
        self.ce = self._ce(self.lse, self._z.gather(-1, self.target).squeeze(-1), slice(None))
        self._logp: Tensor | None = None

    @classmethod
    def from_residual(
        cls, h: Tensor, head: Callable[[Tensor], Tensor], tokens: Tensor, d_vocab: int
    ) -> CleanDistribution:
        """The clean distribution kept as its final residual `h` (…, d_model): `head` maps rows of it
        (rows, d_model) to logits (rows, d_vocab), `vocab_rows` at a time, so its arrays at tokens ×
        vocabulary stay within VOCAB_BYTES (one sequence whose whole arrays would not)."""
        clean = cls.__new__(cls)
        clean.target, clean.has_next = _next_tokens(tokens)
        clean.h, clean.head = h.reshape(-1, h.shape[-1]), head
        clean.span, clean.d_vocab, clean._logp = vocab_rows(d_vocab), d_vocab, None
        starts = range(0, len(clean.h), clean.span)
        clean.ce = torch.cat([clean.block(start).ce for start in starts])  # each block dropped once read
        return clean

    def block(self, start: int) -> CleanDistribution:
        """The clean distribution of rows start … start + span: itself when it holds the whole batch."""
        if self.h is None:
            return self
        return self._rows(slice(start, start + self.span))

    def _rows(self, rows: slice | Tensor) -> CleanDistribution:
        """The clean distribution of token rows `rows`, unembedded from the kept final residual."""
        assert self.h is not None and self.head is not None
        part = CleanDistribution.__new__(CleanDistribution)
        part._fill(self.head(self.h[rows]), self.target[rows], self.has_next[rows])
        return part

    def _whole(self, what: str) -> None:
        """Refuse, in one line, an array of the whole batch that this distribution does not hold."""
        if self.h is not None:
            check_whole_fits(len(self.h), self.d_vocab, what)

    @property
    def z(self) -> Tensor:
        """z_P, (tokens, d_vocab) float32."""
        self._whole("the clean logits")
        return self._z

    @property
    def p(self) -> Tensor:
        """P, (tokens, d_vocab) float32 (sensitivity's Fisher products)."""
        self._whole("P")
        return self._p

    @property
    def logp(self) -> Tensor:
        """log P, (tokens, d_vocab) float32: built on first use (draws, sensitivity tests), not by eval's scoring."""
        self._whole("log P")
        if self._logp is None:
            self._logp = self._z - self.lse[:, None]
        return self._logp

    def _ce(self, lse: Tensor, target_logit: Tensor, rows: slice | Tensor) -> Tensor:
        return torch.where(self.has_next[rows], lse - target_logit, torch.nan)

    def score_block(self, logits: Tensor, rows: slice | Tensor) -> tuple[Tensor, Tensor]:
        """(ce, kl) of the Q given by `logits`, one row per token `rows` of the batch (at most ROWS of them)."""
        if self.h is not None:  # kept as the final residual: these rows' P, unembedded now
            return self._rows(rows).score_block(logits, slice(None))
        zq = logits.float()
        lse = torch.logsumexp(zq, -1)
        d = self._z[rows] - zq  # z_P − z_Q: exact where the logits are close …
        d -= (self.lse[rows] - lse)[:, None]  # … then log P − log Q, before any product
        kl = torch.linalg.vecdot(self._p[rows], d)
        return self._ce(lse, zq.gather(-1, self.target[rows]).squeeze(-1), rows), kl

    def score_tensors(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(ce, kl) per token of Q given by `logits`, float32 on the device (ce NaN at the last position)."""
        logits = logits.reshape(-1, logits.shape[-1])
        if self.h is not None:  # kept as the final residual: block by block of `span` rows
            parts = [self.block(s).score_tensors(logits[s : s + self.span]) for s in range(0, len(logits), self.span)]
            return torch.cat([ce for ce, _ in parts]), torch.cat([kl for _, kl in parts])
        ce = torch.empty(len(logits), device=logits.device)
        kl = torch.empty_like(ce)
        for start in range(0, len(logits), self.ROWS):
            rows = slice(start, start + self.ROWS)
            ce[rows], kl[rows] = self.score_block(logits[rows], rows)
        return ce, kl

    def score(self, logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(ce, kl) per token of Q given by `logits`, as float32 arrays (ce NaN at the last position)."""
        ce, kl = self.score_tensors(logits)
        both = torch.stack([ce, kl]).cpu().numpy()
        return both[0], both[1]


def _next_tokens(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """Per token row: the next token (0 at a sequence's last position), (tokens, 1), and whether there is one."""
    nxt = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -1)], 1).reshape(-1).long()
    return nxt.clamp_min(0)[:, None], nxt >= 0


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
    """The store's sequences `seqs` (ascending) in batches of `batch_size` (at most `sequences_per_batch`),
    each with its clean pass."""
    seqs = list(seqs)
    batch_size = sequences_per_batch(batch_size, int(group["tokens"].shape[1]), int(model.bridge.cfg.d_vocab))
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
            patcher.clean(tokens, x_live),
        )

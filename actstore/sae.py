"""The TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = TopK(W_enc (x − b_dec) + b_enc),   x̂ = W_dec z + b_dec,   rows of W_dec unit norm.

Why the custom autograd functions: with k of d_sae latents active, the dense latent matrix wastes
d_sae/k of the work in the decoder and in every backward product. Encoding is one dense matmul (the
unavoidable cost); everything after it works on the k active (index, value) pairs: the decode gathers k
rows of W_dec per token (`embedding_bag`), and the backward passes use sparse products. Tests compare
values and gradients with the dense computation.

Weights are kept in SAELens's layout (W_enc: d_in × d_sae, W_dec: d_sae × d_in) so saving is a copy.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from actstore import integrity
from actstore.metrics import EPS

# AuxK's weight. Gao et al. (A.2) use 1/32 for runs of billions of tokens; at the 1M–100M budgets this
# tool targets, 1/4 (with a dead window of a fiftieth of the budget) keeps 1M-token runs' dead latents at
# 1–2% instead of 10–18% at the same FVU (docs/METHODS.md). Its gradient reaches only the dead latents (and
# b_dec through their pre-activations): the live ones are not pulled off their optimum.
AUXK_COEF = 1 / 4
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Autocast and the custom autograd functions below: they run in fp32 whatever a caller's autocast region
# asks (cast_inputs, which also turns autocast off inside them), and custom_bwd runs their backward with
# autocast off as well. Why not let autocast lower them: their one big matmul already has its own switch
# (`low_precision`: bf16 inputs, fp32 result) and the top-k choice after it is what rounding would change;
# the rest is k gathers per token, bound by memory rather than arithmetic; and an autocast forward would
# hand bf16 gradients to a backward holding fp32 saved tensors (embedding_bag refuses the mix). Each
# decorator looks only at its own device type's autocast state and tensors, hence one per device type.
_AMP_DEVICE_TYPES = ("cuda", "cpu")


def _amp_fwd(fwd):
    if not hasattr(torch.amp, "custom_fwd"):  # torch < 2.4: CUDA autocast only
        return torch.cuda.amp.custom_fwd(cast_inputs=torch.float32)(fwd)
    for device_type in _AMP_DEVICE_TYPES:
        fwd = torch.amp.custom_fwd(fwd, device_type=device_type, cast_inputs=torch.float32)
    return fwd


def _amp_bwd(bwd):
    if not hasattr(torch.amp, "custom_bwd"):
        return torch.cuda.amp.custom_bwd(bwd)
    for device_type in _AMP_DEVICE_TYPES:
        bwd = torch.amp.custom_bwd(bwd, device_type=device_type)
    return bwd


class EncoderOutput(NamedTuple):
    top_acts: Tensor
    """Values of the k active latents per token, ≥ 0 (n, k)."""

    top_indices: Tensor
    """Indices of the k active latents per token (n, k)."""


class ForwardOutput(NamedTuple):
    recon: Tensor
    """Reconstruction x̂ (n, d_in)."""

    top_acts: Tensor
    """Values of the active latents (n, k)."""

    top_indices: Tensor
    """Indices of the active latents (n, k)."""

    fvu: Tensor
    """Fraction of variance unexplained on this batch: Σ‖x − x̂‖² / Σ‖x − mean(x)‖²."""

    auxk_loss: Tensor
    """AuxK loss: FVU of the top-k_aux dead latents' reconstruction of the error (0 when none is dead)."""


def _sparse_rows(indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """The (n, n_cols) CSR matrix with `values` at (row, indices[row]): k entries per row."""
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device, dtype=torch.int64)
    return torch.sparse_csr_tensor(
        crow, indices.reshape(-1).to(torch.int64), values.reshape(-1), (n, n_cols), check_invariants=False
    )


def _by_latent(indices: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, latent) entries of `indices` grouped by latent, tokens ascending within a group:
    (each sorted entry's token, the sort's permutation of the flat entries, each latent's first entry).

    The offsets come from a binary search of the sorted latents, not a bincount: on CUDA bincount reads
    its input's max and min back to the host (a sync per call, two calls per step).
    """
    k = indices.shape[1]
    ordered, order = torch.sort(indices.reshape(-1), stable=True)
    return order // k, order, first_at_or_above(ordered, n_rows)


def first_at_or_above(ordered: Tensor, n: int) -> Tensor:
    """For each j < n, where the first entry ≥ j sits in the ascending `ordered` (a sync-free bincount's
    cumulative sum: the entries below j)."""
    return torch.searchsorted(ordered, torch.arange(n, device=ordered.device, dtype=ordered.dtype))


def count_fired(top_acts: Tensor, top_indices: Tensor, n: int) -> Tensor:
    """How many of the rows fired each of the n latents (activation > 0), without a host sync: the ReLU'd
    picks are moved to an (n+1)th count that is dropped. Integer adds, so the order of scatter_add_'s
    atomic adds cannot change a count (and a 1-D scatter_add_ is allowed under deterministic algorithms)."""
    fired = torch.where(top_acts > 0, top_indices, n).reshape(-1)
    counts = torch.zeros(n + 1, dtype=torch.int64, device=fired.device)
    return counts.scatter_add_(0, fired, torch.ones_like(fired))[:n]


def _scatter_rows_t(
    indices: Tensor, values: Tensor, dense: Tensor, n_rows: int, groups: tuple[Tensor, Tensor, Tensor] | None = None
) -> Tensor:
    """Sᵀ @ dense for S = `_sparse_rows(indices, values)`: (n_rows, d) in k·n·d work.

    Each output row j sums the token rows where latent j fired: an `embedding_bag` over tokens grouped
    by latent (measured 2x faster than a COO sparse.mm and 5x faster than index_add on CPU). Deterministic
    on CUDA too: each bag is one sequential sum in token order (index_add's atomics add in any order).
    `groups`: `_by_latent(indices, n_rows)` when the caller already has it.
    """
    tokens, order, offsets = groups if groups is not None else _by_latent(indices, n_rows)
    return F.embedding_bag(tokens, dense, offsets, per_sample_weights=values.reshape(-1)[order], mode="sum")


def _gathered_dot(indices: Tensor, weight: Tensor, grad: Tensor) -> Tensor:
    """(weight[indices] · grad[:, None]).sum(-1): grad @ weightᵀ sampled at the k active latents."""
    if grad.is_cuda:  # cuSPARSE assumes sorted column indices; a blocked gather needs no such promise
        out = torch.empty(indices.shape, dtype=grad.dtype, device=grad.device)
        for s in range(0, len(indices), 1024):
            out[s : s + 1024] = torch.bmm(weight[indices[s : s + 1024]], grad[s : s + 1024, :, None]).squeeze(-1)
        return out
    pattern = _sparse_rows(indices, torch.zeros(indices.shape, dtype=grad.dtype, device=grad.device), weight.shape[0])
    return torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0).values().reshape(indices.shape)


class _TopKEncode(torch.autograd.Function):
    """Dense pre-activations, top-k, ReLU; backward touches only the k selected latents per token."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, x: Tensor, b_dec: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, low_precision: bool):  # type: ignore[override]
        x_c = x - b_dec
        if low_precision:  # the one big matmul in bf16 (faster on CPUs with bf16 units and on GPUs)
            pre = (x_c.to(torch.bfloat16) @ W_enc.to(torch.bfloat16)).float() + b_enc
        else:
            pre = torch.addmm(b_enc, x_c, W_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        vals = vals.relu()
        ctx.save_for_backward(x_c, W_enc, idx, vals)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    @_amp_bwd
    def backward(ctx, g_vals: Tensor, _g_idx: Tensor):  # type: ignore[override]
        x_c, W_enc, idx, vals = ctx.saved_tensors
        g = g_vals * (vals > 0)
        d_sae = W_enc.shape[1]
        groups = _by_latent(idx, d_sae)
        # Σ over the tokens where latent j fired of g: the same by-latent sums as W_enc's gradient, over a
        # column of ones (n·k work; index_add_ would be atomic adds in no fixed order on CUDA)
        grad_b = _scatter_rows_t(idx, g, g.new_ones(len(g), 1), d_sae, groups).squeeze(1)
        grad_x = grad_b_dec = grad_W = None
        if ctx.needs_input_grad[0]:  # Σ_j g_j W_enc[:, idx_j]: a gather of k encoder columns per token
            grad_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:  # summed over tokens, that gather is just W_enc @ grad_b_enc
            grad_b_dec = -(W_enc @ grad_b)
        if ctx.needs_input_grad[2]:
            grad_W = _scatter_rows_t(idx, g, x_c, d_sae, groups).t()
        return grad_x, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None


class _SparseDecode(torch.autograd.Function):
    """x̂ − b_dec = Σ_j vals_j W_dec[idx_j]: gathers k decoder rows per token."""

    @staticmethod
    @_amp_fwd
    def forward(ctx, vals: Tensor, idx: Tensor, W_dec: Tensor):  # type: ignore[override]
        ctx.save_for_backward(vals, idx, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    @_amp_bwd
    def backward(ctx, g_out: Tensor):  # type: ignore[override]
        vals, idx, W_dec = ctx.saved_tensors
        g_vals = _gathered_dot(idx, W_dec, g_out) if ctx.needs_input_grad[0] else None
        g_W = _scatter_rows_t(idx, vals, g_out, W_dec.shape[0]) if ctx.needs_input_grad[2] else None
        return g_vals, None, g_W


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    return _SparseDecode.apply(vals, idx, W_dec)


def dense_decode(vals: Tensor, idx: Tensor, W_dec: Tensor) -> Tensor:
    """The reference: scatter into a dense (n, d_sae) latent matrix, then a full matmul."""
    z = torch.zeros(len(idx), W_dec.shape[0], dtype=vals.dtype, device=vals.device).scatter(1, idx, vals)
    return z @ W_dec


class TopKSAE(nn.Module):
    """A TopK SAE with a pre-encoder bias and unit-norm decoder rows."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        low_precision: bool = False,
    ):
        super().__init__()
        if not 0 < k < d_sae:
            raise ValueError(f"k must be between 1 and d_sae - 1 = {d_sae - 1}, got {k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.low_precision = low_precision
        self.decode_rows = sparse_decode  # benchmarks swap in `dense_decode`, the reference
        gen = torch.Generator().manual_seed(seed)
        # Gao et al.: decoder rows are random unit directions and the encoder starts as their transpose.
        w = torch.randn(d_sae, d_in, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.to(device))
        self.W_enc = nn.Parameter(w.t().contiguous().to(device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device))

    def encode(self, x: Tensor) -> EncoderOutput:
        vals, idx = _TopKEncode.apply(x, self.b_dec, self.W_enc, self.b_enc, self.k, self.low_precision)
        return EncoderOutput(vals, idx)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        return self.decode_rows(top_acts, top_indices, self.W_dec) + self.b_dec

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        total_var: Tensor | None = None,
        *,
        dead_latents: Tensor | None = None,
    ) -> ForwardOutput:
        """`total_var` overrides the batch's own Σ‖x − mean‖² (needed when a batch is too small to have one).

        The AuxK loss trains the dead latents: `dead_latents` (their indices, ascending) or `dead_mask`
        (a boolean mask: finding its indices reads the device, which a training step avoids).
        """
        top_acts, top_indices = self.encode(x)
        recon = self.decode(top_acts, top_indices)
        err = x - recon
        if total_var is None:
            total_var = (x - x.mean(0)).pow(2).sum()
        total_var = total_var.clamp_min(EPS)
        fvu = err.pow(2).sum() / total_var
        if dead_latents is None and dead_mask is not None:
            dead_latents = dead_mask.nonzero().squeeze(1)
        auxk = x.new_zeros(())
        if dead_latents is not None and len(dead_latents) > 0:
            auxk = self._auxk_loss(x, err, dead_latents, total_var)
        return ForwardOutput(recon, top_acts, top_indices, fvu, auxk)

    def _auxk_loss(self, x: Tensor, err: Tensor, dead: Tensor, total_var: Tensor) -> Tensor:
        """How well the top-k_aux dead latents reconstruct the live ones' error (Gao et al., A.2)."""
        k_aux = min(self.d_in // 2, len(dead))
        pre = (x - self.b_dec) @ self.W_enc[:, dead] + self.b_enc[dead]
        vals, local = pre.topk(k_aux, dim=-1, sorted=False)
        W = self.W_dec[dead]  # under autocast `pre` is bf16; embedding_bag wants one dtype
        e_hat = F.embedding_bag(local, W, per_sample_weights=vals.relu().to(W.dtype), mode="sum")
        target = err.detach()
        # Normalised by the data's variance, like the FVU (sparsify normalises the same way)
        return (e_hat - target).pow(2).sum() / total_var

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(EPS)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder(self) -> None:
        """Project out of each row's gradient its component along the (unit) row: the step keeps norms."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    # -- saving in SAELens's layout ---------------------------------------------------------------

    def save(self, path: str | Path, cfg_extra: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path / "sae_weights.safetensors"))
        cfg = {
            "architecture": "topk",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            **cfg_extra,
        }
        (path / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TopKSAE:
        from safetensors.torch import load_file

        path = Path(path)
        integrity.check(path)  # a flipped weight byte loads silently otherwise
        cfg = json.loads((path / "cfg.json").read_text())
        sae = cls(cfg["d_in"], cfg["d_sae"], cfg["k"], device=device)
        state = load_file(str(path / "sae_weights.safetensors"), device=device)
        sae.load_state_dict({k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
        return sae


def default_lr(d_sae: int) -> float:
    """Gao et al.'s width scaling: 2e-4 at 2^14 latents, ∝ 1/√d_sae."""
    return 2e-4 / (d_sae / 2**14) ** 0.5

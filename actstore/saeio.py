"""Loading SAEs for evaluation from SAELens-layout directories: our TopK ones and published ones.

Why a separate loader from `sae.TopKSAE`: evaluation must also read dictionaries we did not train
(Gemma Scope's JumpReLU, classic ReLU SAEs) from `cfg.json` + `sae_weights.safetensors`. Each is
reduced to the same two operations — the active latents of a batch as (values, indices), and their
decode — so the metrics code does not care which architecture it measures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from actstore import integrity
from actstore.errors import UsageError
from actstore.sae import EncoderOutput

ARCHITECTURES = ("topk", "standard", "relu", "jumprelu")


@dataclass
class EvalSAE:
    sae_id: str
    path: str
    hook: str
    architecture: str
    W_enc: Tensor  # (d_in, d_sae)
    b_enc: Tensor
    W_dec: Tensor  # (d_sae, d_in)
    b_dec: Tensor
    k: int | None
    threshold: Tensor | None
    apply_b_dec_to_input: bool
    cfg: dict[str, Any]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Tensor) -> EncoderOutput:
        """The active latents of (n, d_in) tokens as (values, indices), never a dense (n, d_sae) matrix.

        TopK gives k per token. ReLU and JumpReLU give as many columns as the busiest token of the batch
        has active latents; tokens with fewer are padded with zero values (which decode to nothing).
        """
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = x_in @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return EncoderOutput(vals.relu(), idx)
        active = pre.relu() * (pre > self.threshold) if self.architecture == "jumprelu" else pre.relu()
        width = max(1, int((active > 0).sum(-1).max()))
        vals, idx = active.topk(width, dim=-1)
        return EncoderOutput(vals, idx)

    def decode(self, top_acts: Tensor, top_indices: Tensor) -> Tensor:
        """x̂ = Σ_j value_j · W_dec[index_j] + b_dec: k decoder rows gathered per token."""
        return F.embedding_bag(top_indices, self.W_dec, per_sample_weights=top_acts, mode="sum") + self.b_dec

    def to(self, device: str) -> EvalSAE:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


def load_eval_sae(path: str | Path, sae_id: str | None = None) -> EvalSAE:
    """An SAE directory in SAELens's layout (cfg.json + sae_weights.safetensors), as an EvalSAE."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise UsageError(
            f"{path} has no cfg.json and sae_weights.safetensors; give an SAE directory in SAELens's layout"
        )
    integrity.check(path)  # ours carry SHA256SUMS; a published SAE without one is read as it is
    cfg = json.loads(cfg_file.read_text())
    arch = str(cfg.get("architecture", "standard")).lower()
    if arch not in ARCHITECTURES:
        raise UsageError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    w = {k: v.float() for k, v in load_file(str(weights)).items()}
    hook = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    if not hook:
        raise UsageError(f"{path}/cfg.json names no hook_name; add the hook the SAE was trained on")
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if arch == "topk" and not k:
        raise UsageError(f"{path}/cfg.json is a TopK SAE without k")
    threshold = w.get("threshold")
    if threshold is None and "log_threshold" in w:
        threshold = w["log_threshold"].exp()
    if arch == "jumprelu" and threshold is None:
        raise UsageError(f"{path}: a JumpReLU SAE needs a threshold tensor in its weights")
    return EvalSAE(
        sae_id=sae_id or cfg.get("actstore", {}).get("sae_id") or path.name,
        path=str(path),
        hook=hook,
        architecture="relu" if arch == "standard" else arch,
        W_enc=w["W_enc"],
        b_enc=w["b_enc"],
        W_dec=w["W_dec"],
        b_dec=w["b_dec"],
        k=int(k) if k else None,
        threshold=threshold,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", arch == "topk")),
        cfg=cfg,
    )

"""One SAE's optimisation: its Adam state, schedule, dead-latent bookkeeping and curve rows.

Why apart from the sweep driver (actstore/steps/train.py): this is the part a researcher changes — the
step itself reads top to bottom in `Trainee.train_step` — and the part benchmarks and tests time and
drive directly, one step at a time, exactly as `train` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from actstore.metrics import EPS
from actstore.run import SAESpec
from actstore.sae import TopKSAE, default_lr

if TYPE_CHECKING:
    from actstore.steps.train import TrainOptions


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


class Trainee:
    """One SAE with its optimiser and bookkeeping (dead-latent counters, fire counts, curve rows).

    Public so benchmarks and tests can time or drive single steps of exactly what `train` runs.
    """

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
                        "step": self.step,
                        "tokens": self.seen,
                        "mse": float(err.mean() / x.shape[1]),
                        "nmse": float((err / x.pow(2).sum(1).clamp_min(EPS)).mean()),
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

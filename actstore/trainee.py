"""One SAE's optimisation: its Adam state, schedule, dead-latent bookkeeping and curve rows.

Why apart from the sweep driver (actstore/steps/train.py): this is the part a researcher changes — the
step itself reads top to bottom in `Trainee.train_step` — and the part benchmarks and tests time and
drive directly, one step at a time, exactly as `train` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from actstore.distributed import World, all_sum
from actstore.metrics import EPS
from actstore.run import SAESpec
from actstore.sae import ForwardOutput, TopKSAE, count_fired, default_lr

if TYPE_CHECKING:
    from actstore.steps.train import TrainOptions


# The default learning rate (docs/METHODS.md, "Training recipe"): Gao et al.'s width scaling, 2e-4 at 2^14
# latents ∝ 1/√d_sae, was tuned for runs of hundreds of thousands of steps. Adam moves a weight by about
# the rate each step, so a shorter run at that rate ends far from its optimum. Measured: 16× that rate was
# the best of ×1…×32 at 244 steps and beat ×4 and ×8 at 976 steps (×32 killed 38% of the latents at k = 8).
# So the rate is MAX_BOOST× up to ~1,000 steps and falls as 1/√steps beyond, reaching Gao et al.'s at
# REFERENCE_STEPS (an extrapolation past the measured range, stated as such in docs/METHODS.md).
REFERENCE_STEPS = 256_000
STEPS_POWER = 0.5
MAX_BOOST = 16.0


def recipe_lr(d_sae: int, batch_size: int, tokens: int) -> float:
    """The default peak learning rate of an SAE of `d_sae` latents trained on `tokens` in batches of `batch_size`."""
    steps = max(1, -(-tokens // batch_size))
    return default_lr(d_sae) * min(MAX_BOOST, max(1.0, REFERENCE_STEPS / steps) ** STEPS_POWER)


def dead_window(batch_size: int, tokens: int) -> int:
    """Tokens without firing after which a latent counts as dead and AuxK trains it: a fiftieth of the
    budget (docs/METHODS.md: a tenth let 10–20% of the latents of 1M-token runs die), at most Gao et al.'s 10M."""
    return min(10_000_000, max(batch_size, tokens // 50))


UNDERTRAINED = 0.05  # still_improving above this: the flat-lr phase ended with FVU still falling > 5% per tenth


def still_improving(fvu_steps: list[float], decay_frac: float) -> float | None:
    """How steeply the batch FVU was still falling when the learning rate began to decay.

    The relative drop of the mean batch FVU from one tenth of the steps to the next, over the last two
    tenths before the decay: (mean over [0.6, 0.7) − mean over [0.7, 0.8)) / mean over [0.7, 0.8) of the
    steps when the decay takes the last fifth. Near 0: converged at this learning rate; large: the
    budget (or the rate) was too small. None for runs of under 20 steps.
    """
    n = len(fvu_steps)
    end, w = int(n * (1 - decay_frac)), n // 10
    if n < 20 or end - 2 * w < 0:
        return None
    before = sum(fvu_steps[end - 2 * w : end - w]) / w
    last = sum(fvu_steps[end - w : end]) / w
    return (before - last) / last if last > 0 else None


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

    def __init__(self, spec: SAESpec, d_in: int, o: TrainOptions, b_dec: torch.Tensor, world: World | None = None):
        self.spec, self.o = spec, o
        self.world = world  # data parallel: this rank trains on its share of each batch, gradients all-reduced
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
        self.peak_lr = spec.lr if spec.lr is not None else recipe_lr(d_sae, o.batch_size, spec.tokens)
        fused = {"fused": True} if _fused_adam_ok(o.device) else {}
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.peak_lr, betas=(0.9, 0.999), eps=6.25e-10, **fused)
        self.dead_tokens = o.dead_tokens or dead_window(o.batch_size, spec.tokens)
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=o.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=o.device)
        self.seen, self.step, self.curves = 0, 0, []
        # Wall time spent in this SAE's own steps (a sweep's shared reads excluded). On a GPU, where a step
        # reads nothing back, it is the host's time issuing the step plus any wait for the device (at a
        # logging step, a dead-latent count, or a full launch queue): over a sweep it still adds up to the
        # time the steps took, though one SAE may be billed for the work of the one before it.
        self.seconds = 0.0
        self._fvu_steps: list[float] = []  # every step's batch FVU, read from the device …
        self._pending_fvu: list[torch.Tensor] = []  # … at logging steps: these are the steps since
        self.var_per_token: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.seen >= self.spec.tokens

    @property
    def may_have_dead(self) -> bool:
        """Whether any latent can be dead yet: `since_fired` grows by at most the tokens seen (known here,
        so the device is asked for the dead latents only once they can exist)."""
        return self.seen >= self.dead_tokens

    @property
    def fvu_steps(self) -> list[float]:
        """Every step's batch FVU (the convergence measure reads it); reading it waits for the steps."""
        self._flush_fvu()
        return self._fvu_steps

    def train_step(self, batch: torch.Tensor, n_dead: int | None = None) -> torch.Tensor:
        """One Adam step on `batch`; returns its FVU as a device tensor (reading it waits for the step).

        Nothing in a step reads the device back except a logging step (its curve row, in one read) and,
        when `n_dead` is not given and latents can be dead, the count of dead latents (the AuxK loss's
        shapes follow it): a sweep reads every SAE's count at once (`count_dead`) and passes it in.
        """
        start = time.perf_counter()
        if n_dead is None:
            (n_dead,) = count_dead([self])
        x = batch[: self.spec.tokens - self.seen]
        n_global = len(x)
        if self.world is not None:  # this rank's contiguous share of the batch's rows
            r, size = self.world.rank, self.world.size
            x = x[r * n_global // size : (r + 1) * n_global // size]
        lr = lr_at(self.seen, self.spec.tokens, self.peak_lr, self.o)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dead = self.dead_mask()
        out = self.sae(x, total_var=self._total_var(x, n_global), dead_latents=_first_true(dead, n_dead))
        loss = out.fvu + self.o.auxk_coef * out.auxk_loss
        loss.backward()  # into no gradients: the previous step freed them
        if self.world is not None:
            self._sum_gradients()
        self.sae.remove_gradient_parallel_to_decoder()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.o.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # frees their memory until the next backward
        self.sae.set_decoder_norm_to_unit()

        fvu = out.fvu.detach()
        if self.world is not None:
            fvu = all_sum(fvu.clone(), self.world)
        self._pending_fvu.append(fvu)
        with torch.no_grad():
            fired = count_fired(out.top_acts, out.top_indices, self.sae.d_sae)
            if self.world is not None:  # every rank keeps the same dead-latent bookkeeping
                all_sum(fired, self.world)
            self.fire_counts += fired
            self.since_fired += n_global
            self.since_fired.masked_fill_(fired > 0, 0)
            self.seen += n_global
            self.step += 1
            self.seconds += time.perf_counter() - start
            if self.step % self.o.log_every == 0 or self.done:
                self._log(x, out, dead, fired, lr)
        return fvu

    def dead_mask(self) -> torch.Tensor:
        """The latents that have not fired for `dead_tokens` tokens (on the device)."""
        return self.since_fired >= self.dead_tokens

    def _total_var(self, x: torch.Tensor, n_global: int) -> torch.Tensor | None:
        """The FVU's denominator when the batch's own Σ‖x − mean‖² will not do (None: it will), and the
        running per-token variance kept for such batches."""
        # A budget's last slice of the shared batch can be a handful of rows, too few for a variance of
        # its own: normalise it by the running per-token variance instead.
        if n_global < 64 and self.var_per_token is not None:
            return self.var_per_token * n_global
        if self.world is not None:  # the whole batch's variance: the ranks' losses then sum to its FVU
            total_var = self._global_variance(x, n_global)
            self.var_per_token = total_var / n_global
            return total_var
        if len(x) >= 64:
            self.var_per_token = (x - x.mean(0)).pow(2).sum().detach() / len(x)
        return None

    def _log(self, x: torch.Tensor, out: ForwardOutput, dead: torch.Tensor, fired: torch.Tensor, lr: float) -> None:
        """A curve row, its values and the FVUs since the last row read from the device in one go (in
        float64, which holds every float32 exactly: the same numbers as reading each on its own)."""
        err = (x - out.recon).pow(2).sum(1)
        centred = (x - x.mean(0)).pow(2).sum()
        values = {
            "mse": err.mean() / x.shape[1],
            "nmse": err.sum() / centred.clamp_min(EPS),
            "nmse_uncentred": (err / x.pow(2).sum(1).clamp_min(EPS)).mean(),
            "l0": (out.top_acts > 0).sum(1).float().mean(),
            "dead_frac": dead.float().mean(),
            "batch_usage": (fired > 0).float().mean(),
            "aux_loss": out.auxk_loss,
        }
        read = dict(zip(values, self._flush_fvu(list(values.values())), strict=True))
        fvu = self._fvu_steps[-1]
        self.curves.append(
            {
                "step": self.step,
                "tokens": self.seen,
                "seconds": self.seconds,
                "mse": read["mse"],
                "nmse": read["nmse"],
                "nmse_uncentred": read["nmse_uncentred"],
                "explained_variance": 1 - fvu,
                "fvu": fvu,
                "l0": read["l0"],
                "dead_frac": read["dead_frac"],
                "batch_usage": read["batch_usage"],
                "lr": lr,
                "aux_loss": read["aux_loss"],
            }
        )

    def _flush_fvu(self, more: Sequence[torch.Tensor] = ()) -> list[float]:
        """Read the steps' pending FVUs, and the values of `more` (returned), from the device in one sync."""
        pending, self._pending_fvu = self._pending_fvu, []
        if not pending and not more:
            return []
        values = torch.stack([v.detach().reshape(()).double() for v in (*pending, *more)]).tolist()
        self._fvu_steps.extend(values[: len(pending)])
        return values[len(pending) :]

    def _global_variance(self, x: torch.Tensor, n_global: int) -> torch.Tensor:
        """Σ‖x − mean‖² over the whole batch, from the ranks' shares (sums in float64: the mean is large)."""
        stats = torch.cat([x.double().sum(0), x.double().pow(2).sum().reshape(1)])
        all_sum(stats, self.world)
        mean = stats[:-1] / n_global
        return (stats[-1] - n_global * mean.pow(2).sum()).clamp_min(0).to(x.dtype)

    def _sum_gradients(self) -> None:
        """The whole batch's gradient: each rank's loss is its rows' share of the batch's FVU, so the
        ranks' gradients add up to it (one flat all-reduce); then every rank takes the same Adam step."""
        params = [p for p in self.sae.parameters() if p.grad is not None]
        flat = all_sum(torch.cat([p.grad.reshape(-1) for p in params]), self.world)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def still_improving(self) -> float | None:
        """This SAE's `still_improving` (see the function of that name)."""
        return still_improving(self.fvu_steps, self.o.decay_frac)

    def state(self) -> dict[str, Any]:
        return {
            "sae": self.sae.state_dict(),
            "opt": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "fire_counts": self.fire_counts,
            "seen": self.seen,
            "step": self.step,
            "curves": self.curves,
            "fvu_steps": list(self.fvu_steps),
            "var_per_token": self.var_per_token,
            "seconds": self.seconds,
        }

    def load_state(self, s: dict[str, Any]) -> None:
        self.sae.load_state_dict(s["sae"])
        self.opt.load_state_dict(s["opt"])
        self.since_fired.copy_(s["since_fired"])
        self.fire_counts.copy_(s["fire_counts"])
        self.seen, self.step, self.curves = s["seen"], s["step"], s["curves"]
        self._fvu_steps, self._pending_fvu = list(s["fvu_steps"]), []
        self.var_per_token = s.get("var_per_token")
        self.seconds = s.get("seconds", 0.0)


def _fused_adam_ok(device: str) -> bool:
    return device.startswith("cuda") or tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def count_dead(trainees: list[Trainee]) -> list[int]:
    """Each trainee's number of dead latents, read from the device in one sync for all of them (none when
    no latent of any can be dead yet): what a sweep asks once per batch instead of once per SAE and step."""
    asked = [t for t in trainees if t.may_have_dead]
    if not asked:
        return [0] * len(trainees)
    counts = iter(torch.stack([t.dead_mask().sum() for t in asked]).tolist())
    return [next(counts) if t.may_have_dead else 0 for t in trainees]


def _first_true(mask: torch.Tensor, n: int) -> torch.Tensor | None:
    """The indices of the `n` True entries of `mask`, ascending: `mask.nonzero()` without its sync (its
    length is known), as a stable sort puts the True entries first in index order. None when n is 0."""
    if n == 0:
        return None
    return torch.argsort(mask.logical_not().to(torch.uint8), stable=True)[:n]

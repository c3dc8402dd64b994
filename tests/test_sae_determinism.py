"""The SAE's custom backward against plain autograd on a dense forward; deterministic algorithms; autocast;
the training step freeing its gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch

from actstore.run import SAESpec
from actstore.sae import AUXK_COEF, TopKSAE
from actstore.steps.train import TrainOptions
from actstore.trainee import Trainee

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@contextlib.contextmanager
def _deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _sae(device: str = "cpu", dtype: torch.dtype = torch.float32) -> TopKSAE:
    sae = TopKSAE(24, 96, 6, seed=3, device=device).to(dtype)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # some strongly negative biases: some selected pre-activations are ≤ 0 (ReLU'd off)
        sae.b_enc.copy_(torch.randn(96, generator=gen) * 0.5 - 2.0)
        sae.b_dec.copy_(torch.randn(24, generator=gen) * 0.3)
    return sae


def _data(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 24, generator=gen).to(device, dtype)
    dead = torch.zeros(96, dtype=torch.bool, device=device)
    dead[::4] = True
    return x, dead


def _dense_loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The training loss (FVU + AuxK) written densely, differentiated by plain autograd."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    z = torch.zeros(len(x), sae.d_sae, dtype=x.dtype).scatter(1, idx, vals.relu())
    recon = z @ sae.W_dec + sae.b_dec
    err = x - recon
    total_var = (x - x.mean(0)).pow(2).sum()
    d = dead.nonzero().squeeze(1)
    aux_vals, aux_idx = pre[:, d].topk(min(sae.d_in // 2, len(d)), dim=-1)
    z_aux = torch.zeros(len(x), len(d), dtype=x.dtype).scatter(1, aux_idx, aux_vals.relu())
    auxk = (z_aux @ sae.W_dec[d] - err.detach()).pow(2).sum() / total_var
    return err.pow(2).sum() / total_var + AUXK_COEF * auxk


def _loss(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    out = sae(x, dead)
    return out.fvu + AUXK_COEF * out.auxk_loss


def _grads(sae: TopKSAE) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name).grad.clone() for name in NAMES}


def test_gradients_equal_dense_autograd_reference():
    """In float64, so the tolerance can be tight: only summation order differs."""
    fast, x, dead = _sae(dtype=torch.float64), *_data(dtype=torch.float64)
    slow = _sae(dtype=torch.float64)
    out = fast(x, dead)
    assert (out.top_acts == 0).any() and (out.top_acts > 0).any()  # the ReLU mask is exercised
    (out.fvu + AUXK_COEF * out.auxk_loss).backward()
    _dense_loss(slow, x, dead).backward()
    for name in NAMES:
        torch.testing.assert_close(getattr(fast, name).grad, getattr(slow, name).grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_are_bitwise_reproducible_under_deterministic_algorithms(device):
    x, dead = _data(device)
    with _deterministic():
        runs = []
        for _ in range(2):
            sae = _sae(device)
            _loss(sae, x, dead).backward()
            runs.append(_grads(sae))
    for name in NAMES:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_run_and_repeat_bitwise_under_deterministic_algorithms(device):
    x, _ = _data(device)
    o = TrainOptions(batch_size=100, dead_tokens=100, device=device)  # latents die fast: AuxK runs too
    spec = SAESpec("h", 4, 4, 600, 0)
    with _deterministic():
        trainees = [Trainee(spec, 24, o, x.mean(0)) for _ in range(2)]
        for t in trainees:
            for s in range(0, 600, 100):
                t.train_step(x[s % 300 : s % 300 + 100])
    assert trainees[0].done and trainees[0].curves[-1]["dead_frac"] > 0  # AuxK ran: latents were dead
    assert trainees[0].fvu_steps == trainees[1].fvu_steps
    for a, b in zip(trainees[0].sae.parameters(), trainees[1].sae.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_step_frees_gradients():
    x, _ = _data()
    t = Trainee(SAESpec("h", 4, 4, 300, 0), 24, TrainOptions(batch_size=100), x.mean(0))
    before = [p.detach().clone() for p in t.sae.parameters()]
    t.train_step(x[:100])
    assert all(p.grad is None for p in t.sae.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, t.sae.parameters(), strict=True))  # it did step


def test_autocast_bf16_step_runs_with_parameter_dtype_gradients():
    sae, x, dead = _sae(), *_data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead)
        loss = out.fvu + AUXK_COEF * out.auxk_loss
    loss.backward()
    for name in NAMES:
        p = getattr(sae, name)
        assert p.grad.dtype == p.dtype == torch.float32 and bool(p.grad.isfinite().all()), name
    # The custom functions run in fp32 inside autocast (cast_inputs): without AuxK's (autocast) matmul,
    # the gradients are those of the fp32 step.
    ref = _sae()
    ref(x).fvu.backward()
    sae.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fvu = sae(x).fvu
    fvu.backward()
    for name in NAMES:
        torch.testing.assert_close(getattr(sae, name).grad, getattr(ref, name).grad, rtol=1e-6, atol=1e-7)
    # and a whole training step under autocast
    t = Trainee(SAESpec("h", 4, 4, 300, 0), 24, TrainOptions(batch_size=100, dead_tokens=100), x.mean(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for s in range(0, 300, 100):
            assert 0 < t.train_step(x[s : s + 100]) < 10
    assert all(p.dtype == torch.float32 and bool(p.isfinite().all()) for p in t.sae.parameters())

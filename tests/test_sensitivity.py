"""Sensitivity: the gradient at the hook, first-order and Fisher predictions, Hutchinson, checked against
independent computations (a plain `transformers` forward with autograd, measured CE and KL, the exact trace)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore import store as st
from actstore.errors import UsageError
from actstore.model import load_model
from actstore.patching import Patcher, batches
from actstore.sensitivity import (
    BatchSensitivity,
    check_differentiable,
    fisher_quadratic,
    hook_gradient,
    iso_sens,
    jvp_logits,
)
from actstore.tiny import MODELS_DIR

from .conftest import HOOKS


@pytest.fixture(scope="module")
def setup(small_store):
    model = load_model("tiny")
    patcher = Patcher(model, HOOKS[1])
    batch = next(batches(st.open_store(small_store), model, patcher, range(2), 2, "cpu"))
    return model, patcher, batch


def test_gradient_matches_autograd_through_a_plain_transformers_forward(setup):
    from transformers import GPTNeoXForCausalLM

    _, patcher, batch = setup
    hf = GPTNeoXForCausalLM.from_pretrained(MODELS_DIR / "tiny").float().eval()
    layer = int(HOOKS[1].split(".")[1])
    x = batch.x_live.detach().clone().requires_grad_(True)

    def replace(module, args, out):  # the block's output residual stream is the hook's activation
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = hf.gpt_neox.layers[layer].register_forward_hook(replace)
    try:
        logits = hf(batch.tokens).logits.float()
    finally:
        handle.remove()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1), reduction="sum"
    )
    (want,) = torch.autograd.grad(ce, x)
    got = hook_gradient(patcher, batch)
    scale = want.abs().max().item()
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=2e-4 * scale, rtol=1e-3)


def _ce_sum(patcher, batch, replacement):
    logits = patcher.logits(batch.tokens, replacement).double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return -logp.gather(-1, batch.tokens[:, 1:, None]).sum().item()


def test_first_order_change_tends_to_the_measured_ce_change(setup):
    _, patcher, batch = setup
    g = hook_gradient(patcher, batch)
    v = torch.randn(batch.x_live.shape, generator=torch.Generator().manual_seed(0))
    v = v / v.norm(dim=-1, keepdim=True) * batch.x_live.norm(dim=-1, keepdim=True)  # a direction per token, ‖x‖ long
    base = _ce_sum(patcher, batch, batch.x_live)
    errors = []
    for s in (0.02, 0.005):
        predicted = (g * s * v).sum().item()
        measured = _ce_sum(patcher, batch, batch.x_live + s * v) - base
        errors.append(abs(predicted / measured - 1))
    assert errors[1] < 0.05 and errors[1] < errors[0]  # first order: the error shrinks with the step


def test_fisher_quadratic_tends_to_the_measured_single_position_kl(setup):
    _, patcher, batch = setup
    pos, n, seq_len = 20, *batch.x_live.shape[:2]
    rows = torch.arange(n) * seq_len + pos
    v = torch.zeros_like(batch.x_live)
    v[:, pos] = torch.randn((n, v.shape[-1]), generator=torch.Generator().manual_seed(1))
    v[:, pos] *= batch.x_live[:, pos].norm(dim=-1, keepdim=True) / v[:, pos].norm(dim=-1, keepdim=True)
    errors = []
    for s in (0.1, 0.025):
        swd = 0.5 * fisher_quadratic(batch, jvp_logits(patcher, batch, s * v))[rows]
        logq = torch.log_softmax(patcher.logits(batch.tokens, batch.x_live + s * v).double(), -1).reshape(
            n * seq_len, -1
        )[rows]
        logp = batch.clean.logp[rows].double()
        kl = (logp.exp() * (logp - logq)).sum(-1)
        errors.append((swd.double() / kl - 1).abs().max().item())
    assert (
        errors[1] < 0.15 and errors[1] < errors[0] / 2
    )  # the third-order rest shrinks with the step (0.43 → 0.10 here)


def test_hutchinson_matches_the_exact_trace_within_its_standard_error(setup):
    _, patcher, batch = setup
    pos, d = 20, batch.x_live.shape[-1]
    seq_len = batch.x_live.shape[1]
    row = pos  # sequence 0
    exact = 0.0
    for i in range(d):  # tr(JᵀFJ) = Σ_i e_iᵀ JᵀFJ e_i: one JVP per basis vector at pos
        e = torch.zeros_like(batch.x_live)
        e[:, pos, i] = 1.0
        exact += fisher_quadratic(batch, jvp_logits(patcher, batch, e))[row].item()
    exact /= d
    gen = torch.Generator().manual_seed(2)
    draws = np.array([iso_sens(patcher, batch, 1, gen, pos)[row].item() for _ in range(48)])
    est, se = draws.mean(), draws.std(ddof=1) / np.sqrt(len(draws))
    assert abs(est - exact) < 4 * se, (est, exact, se)
    # at a position the probes did not touch, nothing
    assert iso_sens(patcher, batch, 2, gen, pos)[pos - 1].item() == 0.0
    assert seq_len > pos


def test_batch_columns_and_the_fallback_path_refused(setup):
    model, patcher, batch = setup
    sens = BatchSensitivity(patcher, batch, 2, torch.Generator().manual_seed(0), None)
    cols = sens.columns({"patched": batch.x_live})  # no displacement: nothing to first and second order
    assert np.abs(cols["fo_patched"]).max() == 0 and np.abs(cols["swd_patched"]).max() == 0
    grad_norm = sens.shared()["grad_norm"].reshape(batch.x_live.shape[:2])
    assert (grad_norm[:, :-1] > 0).all() and (grad_norm[:, -1] == 0).all()  # the last position predicts nothing
    assert (sens.shared()["iso_sens"] > 0).all()
    other = Patcher(model, HOOKS[0])
    other.start = None  # as for a hook inside a block, patched through a full forward
    with pytest.raises(UsageError, match="--sensitivity needs a residual-stream hook"):
        check_differentiable(other)

"""The TopK SAE: the sparse decode and sparse backward against the dense computation, norms, saving."""

from __future__ import annotations

import pytest
import torch

from actstore.sae import TopKSAE, default_lr, dense_decode


def _dense_reference(sae: TopKSAE, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    if bf16:  # the same rounding of the encoder matmul, then everything dense in fp32
        pre = ((x - sae.b_dec).bfloat16() @ sae.W_enc.bfloat16()).float() + sae.b_enc
    else:
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.k, dim=-1)
    z = torch.zeros(len(x), sae.d_sae).scatter(1, idx, vals.relu())
    return z @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("low_precision", [False, True])
def test_sparse_path_matches_dense_values_and_gradients(low_precision):
    torch.manual_seed(0)
    x = torch.randn(300, 24)
    fast = TopKSAE(24, 96, 6, seed=3, low_precision=low_precision)
    with torch.no_grad():
        fast.b_enc.normal_(0, 0.3)
        fast.b_dec.normal_()
    slow = TopKSAE(24, 96, 6, seed=3)
    slow.load_state_dict(fast.state_dict())
    recon = fast(x).recon
    ref = _dense_reference(slow, x, bf16=low_precision)
    torch.testing.assert_close(recon, ref, rtol=1e-5, atol=1e-5)
    if low_precision:
        return  # the backward runs in fp32 by design; the reference's autograd would round it to bf16
    g = torch.randn_like(recon)
    (recon * g).sum().backward()
    (ref * g).sum().backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(slow, name).grad, rtol=1e-4, atol=1e-5)


def test_dense_reference_decoder_is_the_same_function():
    torch.manual_seed(1)
    x = torch.randn(50, 16)
    a = TopKSAE(16, 64, 4, seed=0)
    b = TopKSAE(16, 64, 4, seed=0)
    b.decode_rows = dense_decode
    torch.testing.assert_close(a(x).recon, b(x).recon)


def test_decoder_starts_as_encoder_transpose_with_unit_rows():
    sae = TopKSAE(16, 64, 4, seed=0)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())


def test_parallel_gradient_removal_keeps_rows_unit_norm_to_first_order():
    sae = TopKSAE(16, 64, 4, seed=0)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_gradient_parallel_to_decoder()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_fvu_is_sse_over_centred_sst():
    torch.manual_seed(2)
    x = torch.randn(40, 8) + 3
    sae = TopKSAE(8, 32, 2, seed=0)
    out = sae(x)
    sse = ((x - out.recon) ** 2).sum()
    sst = ((x - x.mean(0)) ** 2).sum()
    assert float(out.fvu) == pytest.approx(float(sse / sst), rel=1e-5)


def test_save_and_load_round_trip_in_saelens_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    sae = TopKSAE(8, 32, 2, seed=5)
    sae.save(tmp_path / "s", {"hook_name": "blocks.0.hook_resid_post", "model_name": "m"})
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 8 and cfg["d_sae"] == 32 and cfg["k"] == 2
    w = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (8, 32) and w["W_dec"].shape == (32, 8)
    back = TopKSAE.load(tmp_path / "s")
    x = torch.randn(5, 8)
    torch.testing.assert_close(back(x).recon, sae(x).recon)


def test_default_lr_follows_gao_width_scaling():
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)

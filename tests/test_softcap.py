"""The shared-suffix patch path applies the model's own final logit transform (Gemma-2's softcap).

A tiny random Gemma-2 (2 layers, d_model 32, the shipped byte tokenizer) is saved as a local Hugging
Face directory and loaded through `load_model`. Its logits are blown up (the unembedding scaled) so
they sit far beyond the softcap of 5: a suffix path that skipped `cap · tanh(x / cap)` would be off
by many-fold, not by the 0.2 % that hid it behind the old probe's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from actstore.model import capture, load_model
from actstore.patching import Patcher, agreement_tolerance
from actstore.tiny import VOCAB_SIZE, random_gemma2

CAP = 5.0
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    """2 layers, d_model 32, softcap 5, window 4: below the 11-token probe and the 16-token batches."""
    directory = tmp_path_factory.mktemp("gemma2")
    return directory, random_gemma2(directory, layers=2, width=32, window=4, softcap=CAP)


def _tokens(n: int = 3, t: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", HOOK])  # from layer 0 (sliding window) or 1 (full)
def test_suffix_path_applies_the_softcap_and_matches_the_full_forward(gemma2_dir, hook):
    directory, hf = gemma2_dir
    model = load_model(str(directory), "cpu", "float32")
    assert model.bridge.cfg.output_logits_soft_cap == CAP
    assert hf.model.layers[0].self_attn.sliding_window == 4 and hf.model.layers[1].self_attn.sliding_window is None
    patcher = Patcher(model, hook)
    assert patcher.start == (0 if hook.endswith("pre") else 1) and patcher.path == "suffix"
    tokens = _tokens()
    x = capture(model, tokens, [hook])[hook]
    with torch.inference_mode():
        got = patcher.logits(tokens, x)
        full = model.bridge(tokens)
        reference = hf(tokens).logits  # plain transformers: an independent reference
    assert reference.abs().max() <= CAP and reference.abs().max() > 0.95 * CAP  # capped, and the cap binds
    tol = agreement_tolerance(torch.float32)
    torch.testing.assert_close(got, full, rtol=tol, atol=tol * CAP)
    torch.testing.assert_close(got, reference, rtol=tol, atol=tol * CAP)
    # one position only (the eps-draw path) agrees too
    with torch.inference_mode():
        at = patcher.logits_at(tokens[:, :9], x[:, :9], 8)
    torch.testing.assert_close(at, reference[:, 8], rtol=tol, atol=tol * CAP)


def test_the_probe_rejects_a_suffix_without_the_softcap(gemma2_dir, monkeypatch):
    directory, _ = gemma2_dir
    model = load_model(str(directory), "cpu", "float32")
    monkeypatch.setattr(Patcher, "_final_transform", lambda self, logits: logits)
    patcher = Patcher(model, HOOK)
    assert patcher.start is None and patcher.path == "full_forward"
    # the fallback is still right: a full forward with the hook swapped
    tokens = _tokens()
    x = capture(model, tokens, [HOOK])[HOOK]
    with torch.inference_mode():
        assert torch.equal(patcher.logits(tokens, x), model.bridge(tokens))


def test_the_probe_catches_a_missing_softcap_even_with_small_logits(gemma2_dir, monkeypatch):
    """With logits ≪ cap, tanh is ~identity (the old probe's blind spot); the probe's blown-up pass is not."""
    directory, _ = gemma2_dir
    model = load_model(str(directory), "cpu", "float32")
    with torch.no_grad():
        model.bridge.original_model.model.embed_tokens.weight.div_(400.0)  # logits ~0.15, cap 5
    with torch.inference_mode():
        assert model.bridge(_tokens()).abs().max() < 0.05 * CAP
    assert Patcher(model, HOOK).path == "suffix"
    monkeypatch.setattr(Patcher, "_final_transform", lambda self, logits: logits)
    assert Patcher(model, HOOK).path == "full_forward"


def test_bfloat16_takes_the_suffix_path_within_bf16_tolerance(gemma2_dir):
    directory, hf = gemma2_dir
    model = load_model(str(directory), "cpu", "bfloat16")
    patcher = Patcher(model, HOOK)
    assert patcher.path == "suffix"
    tokens = _tokens()
    x = capture(model, tokens, [HOOK])[HOOK]
    with torch.inference_mode():
        got = patcher.logits(tokens, x)
        full = model.bridge(tokens)
        reference = hf(tokens).logits  # float32
    assert got.dtype == torch.bfloat16
    tol = agreement_tolerance(torch.bfloat16)
    torch.testing.assert_close(got.float(), full.float(), rtol=tol, atol=tol * CAP)
    # against float32 transformers: bf16 rounding through two layers, still well inside a cap's width
    assert (got.float() - reference).abs().max() < 0.1 * CAP


def test_tolerance_follows_the_compute_dtype():
    f32, bf16, f16 = (agreement_tolerance(d) for d in (torch.float32, torch.bfloat16, torch.float16))
    assert f32 <= 1e-4 < f16 < bf16
    assert bf16 >= 4 * torch.finfo(torch.bfloat16).eps  # above bf16 rounding: no spurious fallback
    assert f16 >= 4 * torch.finfo(torch.float16).eps


def test_the_shipped_neox_model_still_takes_the_suffix_path_exactly():
    model = load_model("tiny")
    patcher = Patcher(model, "blocks.2.hook_resid_post")
    assert patcher.path == "suffix"
    tokens = _tokens(2, 20)
    x = capture(model, tokens, [patcher.hook])[patcher.hook]
    with torch.inference_mode():
        assert torch.equal(patcher.logits(tokens, x), model.bridge(tokens))
    assert Patcher(model, "ln_final.hook_normalized").path == "full_forward"  # not a residual hook


def test_eval_records_the_patch_path_in_the_evals_options(tmp_path):
    """A residual hook runs the suffix; an MLP output can only be patched in a full forward."""
    import json

    from safetensors.torch import save_file

    from actstore.analytics import sql as query_sql
    from actstore.steps.evaluate import EvalOptions, evaluate
    from actstore.steps.harvest import HarvestOptions, harvest

    hooks = ("blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")
    store = str(tmp_path / "s.zarr")
    harvest(store, HarvestOptions(hooks=hooks, seq_len=32, tokens=4 * 32, batch_size=4, split="train"))
    torch.manual_seed(0)
    saes = []
    for hook in hooks:
        path = tmp_path / hook.replace(".", "_")
        path.mkdir()
        w = {"W_enc": torch.randn(128, 32) * 0.1, "b_enc": torch.zeros(32), "W_dec": torch.randn(32, 128) * 0.1}
        save_file(w | {"b_dec": torch.zeros(128)}, str(path / "sae_weights.safetensors"))
        cfg = {"architecture": "standard", "d_in": 128, "d_sae": 32, "hook_name": hook, "model_name": "tiny"}
        (path / "cfg.json").write_text(json.dumps(cfg))
        saes.append(str(path))
    run = str(tmp_path / "run")
    evaluate(store, run, saes, EvalOptions(batch_size=4))
    rows = query_sql(run, "SELECT sae_id, options FROM evals ORDER BY sae_id")
    paths = {sae_id: json.loads(o)["patch_path"] for sae_id, o in rows.iter_rows()}
    assert sorted(paths.values()) == ["full_forward", "suffix"]
    assert all(("resid_post" in k) == (v == "suffix") for k, v in paths.items()), paths

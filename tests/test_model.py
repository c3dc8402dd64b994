"""The shipped tiny model and model loading through TransformerBridge."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from actstore.corpus import CorpusOptions, token_sequences
from actstore.errors import UsageError
from actstore.model import check_hooks, hook_layer, load_model, stop_layer
from actstore.tiny import SHIPPED_MODELS, TINY_DIR, VOCAB_SIZE


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def test_tiny_is_a_pythia_shaped_gpt_neox_with_early_mid_and_late_layers(tiny):
    cfg = tiny.bridge.cfg
    assert cfg.n_layers >= 4 and cfg.d_vocab == VOCAB_SIZE
    hf = tiny.bridge.original_model.config
    assert hf.model_type == "gpt_neox" and hf.use_parallel_residual
    assert (TINY_DIR / "model.safetensors").stat().st_size < 8 * 2**20


def test_tiny_predicts_held_out_text_far_better_than_byte_frequencies(tiny):
    opts = CorpusOptions(corpus="builtin", split="eval", seq_len=128)
    tokens = next(token_sequences(opts, tiny.tokenizer, batch_seqs=16))
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        logits = tiny.bridge(x).float()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    counts = np.bincount(tokens.reshape(-1), minlength=VOCAB_SIZE)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert ce < 0.35 * unigram, (ce / math.log(2), unigram / math.log(2))


def _heldout_ce(loaded, n_seqs: int = 16) -> float:
    opts = CorpusOptions(corpus="builtin", split="eval", seq_len=128)
    tokens = next(token_sequences(opts, loaded.tokenizer, batch_seqs=n_seqs))
    x = torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        logits = loaded.bridge(x).float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()


def test_tiny_192_is_deeper_wider_within_12_mb_and_predicts_better_than_tiny(tiny):
    """The second shipped model: 12 layers (tiny's depths 1/6, 3/6, 5/6 are its layers 2, 6, 10), wider,
    fp16 weights under 12 MB, and a lower held-out CE than tiny's on the same text."""
    import json

    big = load_model("tiny-192")
    assert big.source == "shipped" and big.n_layers == 2 * tiny.n_layers
    assert big.bridge.cfg.d_model > tiny.bridge.cfg.d_model
    directory = SHIPPED_MODELS["tiny-192"][1]
    assert (directory / "model.safetensors").stat().st_size <= 12 * 2**20
    assert _heldout_ce(big) < _heldout_ce(tiny)
    trained = json.loads((directory / "training.json").read_text())
    assert trained["heldout_ce_nats"] < json.loads((TINY_DIR / "training.json").read_text())["heldout_ce_nats"]


def test_a_local_hf_directory_loads_like_tiny(tiny):
    local = load_model(str(TINY_DIR))
    assert local.source == "local"
    x = torch.arange(20).reshape(1, 20)
    with torch.inference_mode():
        assert torch.equal(local.bridge(x), tiny.bridge(x))


def test_unknown_hook_error_lists_the_valid_ones(tiny):
    with pytest.raises(UsageError) as err:
        check_hooks(tiny, ["blocks.9.hook_resid_post"])
    assert "blocks.{L}.hook_resid_post" in str(err.value) and "L = 0…5" in str(err.value)


def test_stop_layer_is_one_past_the_deepest_hook():
    assert hook_layer("blocks.3.attn.hook_z") == 3
    assert stop_layer(["blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"]) == 4
    assert stop_layer(["hook_embed"]) == 0
    assert stop_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_the_install_adds_no_generic_top_level_cli_or_sql_module(tmp_path):
    # Run outside the repo: pytest puts the repo root on sys.path, where cli/ and sql/ live as folders.
    probe = (
        "import importlib.util as u, importlib.resources as r\n"
        "assert u.find_spec('cli') is None and u.find_spec('sql') is None\n"
        "import actstore.cli.main\n"
        "assert (r.files('actstore.sql') / 'README.md').is_file()\n"
        "assert (r.files('actstore.models') / 'tiny' / 'config.json').is_file()\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": ""})


def test_a_hub_name_that_is_not_cached_fails_in_one_line_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UsageError,
        match="could not load model someorg/nonexistent-model: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it .*hf download someorg/nonexistent-model.*, or give 'tiny'",
    ):
        load_model("someorg/nonexistent-model")
    with pytest.raises(
        UsageError,
        match="could not load model './no/such/model-dir': it is neither a shipped model .* an existing directory nor a hub name",
    ):
        load_model("./no/such/model-dir")


def test_an_unreachable_hub_fails_fast_for_an_uncached_name_and_a_cached_one_loads_offline(tmp_path):
    """The hub unreachable (nothing listens on port 9), offline mode not set: an uncached name is the one-line
    error at once, not after transformers' retries; a cached one (tiny, copied into a fake HF cache) loads."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(TINY_DIR, repo / "snapshots" / commit)
    probe = (
        "import json, time\n"
        "from actstore.model import load_model\n"
        "t = time.time(); m = load_model('someorg/tiny'); cached_s = time.time() - t\n"
        "t = time.time()\n"
        "try:\n"
        "    load_model('someorg/nonexistent-model'); err = None\n"
        "except Exception as exc:\n"
        "    err = str(exc)\n"
        "print(json.dumps({'source': m.source, 'layers': m.n_layers, 'err': err, 'err_s': time.time() - t, 'cached_s': cached_s}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["source"] == "hub" and got["layers"] == 6
    assert got["err"].startswith(
        "could not load model someorg/nonexistent-model: not in the local Hugging Face cache and the hub is unreachable"
    )
    assert "hf download someorg/nonexistent-model" in got["err"] and "\n" not in got["err"]

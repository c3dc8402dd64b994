"""Eval: per-token records checked against independent computations, baselines, external SAEs, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from safetensors.torch import save_file

from actstore import store as st
from actstore.analytics import query
from actstore.analytics import sql as query_sql
from actstore.errors import StoreError, UsageError
from actstore.metrics import baselines, partners
from actstore.model import capture, load_model
from actstore.patching import CleanDistribution, Patcher
from actstore.run import SAESpec, read_table
from actstore.saeio import load_eval_sae
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.train import TrainOptions, train

from .conftest import HOOKS


@pytest.fixture(scope="module")
def evaluated(small_store, tmp_path_factory):
    """Two SAEs trained briefly on the small store, evaluated on a copy of it."""
    root = tmp_path_factory.mktemp("eval")
    store = str(root / "eval.zarr")
    shutil.copytree(small_store, store)
    run = str(root / "run")
    train(
        store, run, [SAESpec(HOOKS[0], 8, 2, 1536, 0), SAESpec(HOOKS[1], 4, 2, 1536, 0)], TrainOptions(batch_size=256)
    )
    evaluate(store, run, options=EvalOptions(batch_size=8))
    return store, run


def test_records_hold_every_token_of_every_sae(evaluated):
    store, run = evaluated
    tokens = read_table(run, "tokens")
    assert tokens.group_by("sae_id").len()["len"].to_list() == [24 * 64, 24 * 64]
    assert tokens.filter(pl.col("pos") == 63)["ce_orig"].null_count() == 2 * 24  # no next token at the end
    codes = read_table(run, "codes")
    per_token = codes.group_by("sae_id", "seq", "pos").len()
    assert per_token["len"].max() <= 8
    assert set(read_table(run, "saes")["architecture"]) == {"topk"}


def test_ce_orig_is_the_models_own_per_token_loss(evaluated):
    store, run = evaluated
    model = load_model("tiny")
    tokens = torch.from_numpy(st.read_tokens(st.open_store(store)).astype(np.int64))
    with torch.inference_mode():
        logits = model.bridge(tokens).float()
    own = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    rec = read_table(run, "tokens").filter(pl.col("sae_id").str.starts_with(HOOKS[0])).sort("seq", "pos")
    ce = rec["ce_orig"].to_numpy().reshape(24, 64)[:, :-1]
    np.testing.assert_allclose(ce, own.numpy(), rtol=1e-5, atol=1e-5)


def test_patching_the_clean_activation_changes_nothing(evaluated):
    store, _ = evaluated
    model = load_model("tiny")
    tokens = torch.from_numpy(st.read_tokens(st.open_store(store), slice(0, 4)).astype(np.int64))
    for hook in HOOKS:
        patcher = Patcher(model, hook)
        assert patcher.start is not None  # the shared-prefix path, not a full re-run
        x = capture(model, tokens, [hook])[hook]
        with torch.inference_mode():
            full = model.bridge(tokens)
        patched = patcher.logits(tokens, x)
        assert torch.equal(patched, full)
        clean = CleanDistribution(full, tokens)
        ce, kl = clean.score(patched)
        assert np.abs(kl).max() == 0.0
        np.testing.assert_array_equal(ce, clean.ce.numpy())


def test_r2_from_the_records_matches_numpy_on_the_stored_arrays(evaluated):
    store, run = evaluated
    g = zarr.open_group(store, mode="r")
    overview = query(run, "summary", n_boot=10)
    for row in overview.iter_rows(named=True):
        x = g[f"acts/{row['hook']}"][:].astype(np.float64).reshape(-1, 128)
        xh = g[f"recon/{row['sae_id']}/{row['hook']}"][:].astype(np.float64).reshape(-1, 128)
        r2 = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        assert row["r2"] == pytest.approx(r2, abs=2e-3)  # recon is stored in float16


def test_a_position_filter_centres_sst_on_the_selected_positions_mean(evaluated):
    """min_pos = 1 drops position 0: SST is Σ‖x − μ_sel‖² over the rest, μ_sel their own mean (numpy)."""
    store, run = evaluated
    g = zarr.open_group(store, mode="r")
    for row in query(run, "summary", n_boot=10, min_pos=1).iter_rows(named=True):
        x = g[f"acts/{row['hook']}"][:, 1:].astype(np.float64).reshape(-1, 128)
        xh = g[f"recon/{row['sae_id']}/{row['hook']}"][:, 1:].astype(np.float64).reshape(-1, 128)
        sst = ((x - x.mean(0)) ** 2).sum()
        assert row["r2"] == pytest.approx(1 - ((x - xh) ** 2).sum() / sst, abs=2e-3)  # recon is stored in float16
        everywhere = g[f"acts/{row['hook']}"][:].astype(np.float64).reshape(-1, 128)
        uncorrected = ((x - everywhere.mean(0)) ** 2).sum()  # = sst + n‖μ_sel − μ‖²
        ours = row["sst_per_token"] * len(x)
        assert abs(ours - sst) < 0.05 * (uncorrected - sst)  # the correction itself, not only a rounding of it


def test_baselines_have_the_saes_error_norm_and_cosine():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16) * 3
    xh = x + torch.randn(500, 16)
    p = baselines(x, xh, gen)
    err = (x - xh).norm(dim=-1)
    torch.testing.assert_close((p["eps"] - x).norm(dim=-1), err)
    torch.testing.assert_close((p["actdiff"] - x).norm(dim=-1), err)
    cos = torch.nn.functional.cosine_similarity(x, xh, dim=-1)
    torch.testing.assert_close(
        torch.nn.functional.cosine_similarity(x, p["samecos"], dim=-1), cos, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(p["samecos"].norm(dim=-1), xh.norm(dim=-1))
    # the shrinkage test's substitutions (001): x at the SAE's norm, and x̂ at x's norm, directions kept
    torch.testing.assert_close(p["sae_norm"].norm(dim=-1), xh.norm(dim=-1))
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(p["sae_norm"], x, dim=-1), torch.ones(500))
    torch.testing.assert_close(p["norm_corrected"].norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(torch.nn.functional.cosine_similarity(p["norm_corrected"], xh, dim=-1), torch.ones(500))
    # actdiff's direction is x_a − x_b of two other tokens (Lee & Heimersheim), never built from x itself
    again = torch.Generator().manual_seed(0)
    torch.randn(x.shape, generator=again)  # the isotropic draws come first
    a, b = partners(len(x), again)
    i = torch.arange(len(x))
    assert (a != i).all() and (b != i).all() and (a != b).all()
    want = (x[a] - x[b]) / (x[a] - x[b]).norm(dim=-1, keepdim=True)
    got = (p["actdiff"] - x) / err[:, None]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_kl_and_ce_match_a_hand_computation_on_a_tiny_vocabulary():
    p = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]])
    q = torch.tensor([[[0.25, 0.25, 0.5], [0.3, 0.3, 0.4]]])
    tokens = torch.tensor([[0, 2]])  # the true next token after position 0 is 2
    clean = CleanDistribution(p.log() + 3.0, tokens)  # logits: any shift of log p
    ce, kl = clean.score(q.log() - 1.0)
    pn, qn = p[0].double().numpy(), q[0].double().numpy()
    hand = [sum(a * np.log(a / b) for a, b in zip(pp, qq, strict=True)) for pp, qq in zip(pn, qn, strict=True)]
    np.testing.assert_allclose(kl, hand, rtol=1e-5)
    assert ce[0] == pytest.approx(-np.log(0.5), rel=1e-6) and np.isnan(ce[1])  # no next token at the end
    assert float(clean.ce[0]) == pytest.approx(-np.log(0.25), rel=1e-6)


def test_reevaluating_replaces_the_records(evaluated):
    store, run = evaluated
    before = read_table(run, "tokens").height
    evaluate(store, run, options=EvalOptions(batch_size=8, max_seqs=8, seed=1))
    tokens = read_table(run, "tokens")
    assert tokens.height == 2 * 8 * 64 < before
    assert set(read_table(run, "evals")["seed"]) == {1}
    evaluate(store, run, options=EvalOptions(batch_size=8))


def _external(tmp_path, arch: str, d: int = 128, m: int = 64):
    torch.manual_seed(0)
    w = {
        "W_enc": torch.randn(d, m) * 0.1,
        "b_enc": torch.zeros(m),
        "W_dec": torch.randn(m, d) * 0.1,
        "b_dec": torch.zeros(d),
    }
    if arch == "jumprelu":
        w["threshold"] = torch.full((m,), 0.5)
    path = tmp_path / arch
    path.mkdir()
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d, "d_sae": m, "hook_name": HOOKS[0], "model_name": "tiny"}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_external_relu_and_jumprelu_saes_are_evaluated(evaluated, tmp_path, arch):
    store, _ = evaluated
    path = _external(tmp_path, arch)
    sae = load_eval_sae(path)
    x = torch.randn(10, 128)
    codes = sae.encode(x)
    z = torch.zeros(10, sae.d_sae).scatter(1, codes.top_indices, codes.top_acts)
    pre = x @ sae.W_enc + sae.b_enc
    expected = pre.relu() if arch == "standard" else pre * (pre > 0.5)
    torch.testing.assert_close(z, expected)
    run = str(tmp_path / "ext-run")
    evaluate(store, run, [str(path)], EvalOptions(batch_size=8, max_seqs=4))
    assert read_table(run, "saes")["architecture"].to_list() == ["relu" if arch == "standard" else "jumprelu"]


def test_mismatched_sae_incomplete_store_and_missing_files_are_clear_errors(evaluated, tmp_path):
    store, run = evaluated
    wide = _external(tmp_path, "standard", d=64)
    with pytest.raises(UsageError, match="d_in 64"):
        evaluate(store, str(tmp_path / "r"), [str(wide)])
    with pytest.raises(UsageError, match="sae_weights.safetensors"):
        evaluate(store, str(tmp_path / "r"), [str(tmp_path / "nothing")])
    broken = str(tmp_path / "broken.zarr")
    shutil.copytree(store, broken)
    g = zarr.open_group(broken, mode="r+")
    g.attrs["commit"] = {"n_seq": 3}
    with pytest.raises(StoreError, match="incomplete"):
        evaluate(broken, run)


def test_eval_cli_without_saes_is_a_one_line_error(evaluated, tmp_path):
    import subprocess
    import sys

    store, _ = evaluated
    result = subprocess.run(
        [sys.executable, "-m", "actstore.cli.main", "eval", store, "--run", str(tmp_path / "none"), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no SAEs" in lines[0]


def test_single_position_patch_leaves_earlier_positions_untouched(evaluated, tmp_path):
    store, run = evaluated
    sae_dir = sorted((__import__("pathlib").Path(run) / "saes").iterdir())[0]
    out = str(tmp_path / "pos-run")
    evaluate(store, out, [str(sae_dir)], EvalOptions(batch_size=8, max_seqs=8, patch_pos=20))
    t = read_table(out, "tokens")
    before, at_and_after = t.filter(pl.col("pos") < 20), t.filter(pl.col("pos") >= 20)
    assert before["kl_patched"].abs().max() < 1e-6 and before["kl_zero"].abs().max() < 1e-6  # causal
    assert at_and_after["kl_zero"].max() > 1e-3


def test_eval_writes_the_participation_ratio_of_every_hook_of_its_store(evaluated):
    store, run = evaluated
    layers = read_table(run, "layers")
    assert sorted(layers["hook"]) == sorted(HOOKS)
    g = zarr.open_group(store, mode="r")
    for row in layers.iter_rows(named=True):
        x = g[f"acts/{row['hook']}"][:].astype(np.float64).reshape(-1, 128)
        lam = np.sort(np.linalg.eigvalsh(np.cov(x.T, bias=True)))[::-1]
        assert row["pr"] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-6)
        assert row["pr_deflated"] == pytest.approx(lam[1:].sum() ** 2 / (lam[1:] ** 2).sum(), rel=1e-6)
        assert row["variance"] == pytest.approx(lam.sum(), rel=1e-6)


def test_darkmatter_fits_probes_and_patches_the_held_out_sequences(evaluated, tmp_path):
    from actstore.run import probe_path
    from actstore.steps.darkmatter import DarkmatterOptions, darkmatter

    store, run0 = evaluated
    run = str(tmp_path / "run")
    shutil.copytree(run0, run)
    table = darkmatter(run, DarkmatterOptions(batch_size=4))
    assert table.height == 2 and table["vector_r2"].is_between(-1, 1).all()
    assert all(probe_path(run, sae_id).is_file() for sae_id in table["sae_id"])
    patched = read_table(run, "darkmatter_tokens")
    n_seq = read_table(run, "evals")["n_seq"][0]
    assert set(patched["seq"].unique()) == set(range(1, n_seq, 2))  # held out: the probes fit the even ones
    tokens = read_table(run, "tokens")
    joined = patched.join(tokens, on=["sae_id", "store", "seq", "pos"]).drop_nulls("ce_orig")
    # x̂ + NonlinearError = x − LinearError: a better patch than x̂ alone when the probe explains anything
    assert joined["ce_linear"].mean() < joined["ce_patched"].mean() + 1e-3
    dm = query(run, "darkmatter_patch")
    assert dm.height == 2 and dm["closed_linear"].is_not_null().all()
    # a position filter (004 fits past position 200): fewer tokens, recorded with the split
    late = darkmatter(run, DarkmatterOptions(batch_size=4, min_pos=8))
    seq_len = int(zarr.open_group(store, mode="r")["tokens"].shape[1])
    assert (late["n_fit"] + late["n_test"] == n_seq * (seq_len - 8)).all()
    assert (late["min_pos"] == 8).all() and query(run, "darkmatter")["min_pos"].to_list() == [8, 8]
    with pytest.raises(UsageError, match="leaves no position"):
        darkmatter(run, DarkmatterOptions(min_pos=seq_len))


def test_a_zero_probe_patches_exactly_the_saes_reconstruction(evaluated):
    from actstore.model import load_model
    from actstore.steps.darkmatter import DarkmatterOptions, patch_parts

    store, run = evaluated
    sae_dir = sorted(__import__("pathlib").Path(run, "saes").iterdir())[0]
    sae = load_eval_sae(sae_dir)
    group = st.open_store(store)
    zero = (torch.zeros(sae.d_in, sae.d_in), torch.zeros(sae.d_in))
    t = patch_parts(group, load_model("tiny"), sae, zero, range(1, 4, 2), None, DarkmatterOptions(), False)
    ref = read_table(run, "tokens").filter((pl.col("sae_id") == sae.sae_id) & (pl.col("seq") % 2 == 1))
    joined = t.join(ref, on=["seq", "pos"]).drop_nulls("ce_orig")
    assert joined.height == 2 * 64 - 2
    np.testing.assert_allclose(joined["ce_linear"], joined["ce_patched"], rtol=1e-5, atol=1e-6)  # x̂ + 0
    np.testing.assert_allclose(joined["ce_nonlinear"], joined["ce_orig"], atol=5e-3)  # x as stored in float16


def test_linear_probe_agrees_with_numpy_lstsq_and_splits_the_fvu():
    from actstore.steps.darkmatter import analyse

    rng = np.random.default_rng(0)
    n, d = 2000, 12
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 2, d)
    a = rng.standard_normal((d, d)) * 0.1
    e = x @ a + 0.3 + 0.2 * np.tanh(x) ** 2 + 0.05 * rng.standard_normal((n, d))
    fit = np.arange(n) % 2 == 0
    linear, _ = analyse(x.astype(np.float32), (x - e).astype(np.float32), fit)  # the default: 004's b·x
    ref0 = np.linalg.lstsq(x[fit], e[fit], rcond=None)[0]
    res0 = e[~fit] - x[~fit] @ ref0
    r2_0 = 1 - (res0**2).sum(0) / ((e[~fit] - e[~fit].mean(0)) ** 2).sum(0)
    assert linear["vector_r2"] == pytest.approx(r2_0.mean(), rel=1e-3)
    row, w = analyse(x.astype(np.float32), (x - e).astype(np.float32), fit, "affine")
    ref = np.linalg.lstsq(np.c_[x[fit], np.ones(fit.sum())], e[fit], rcond=None)[0]
    assert row["vector_r2"] > linear["vector_r2"]  # e has a constant part (+0.3) that only the intercept fits
    np.testing.assert_allclose(w, ref, rtol=1e-3, atol=1e-4)
    lin = np.c_[x[~fit], np.ones((~fit).sum())] @ ref
    res = e[~fit] - lin
    r2_dims = 1 - (res**2).sum(0) / ((e[~fit] - e[~fit].mean(0)) ** 2).sum(0)
    sst = ((x[~fit] - x[~fit].mean(0)) ** 2).sum()
    assert row["vector_r2"] == pytest.approx(r2_dims.mean(), rel=1e-3)
    assert row["fvu_nonlinear"] == pytest.approx((res**2).sum() / sst, rel=1e-3)
    fvu = (e[~fit] ** 2).sum() / sst
    assert row["fvu_linear"] + row["fvu_nonlinear"] == pytest.approx(fvu, rel=1e-6)  # adds up on held-out data
    assert row["fvu_linear"] == pytest.approx(fvu - (res**2).sum() / sst, rel=1e-3)  # 004: FVU − FVU_nonlinear
    assert abs(row["fvu_linear"] - (lin**2).sum() / sst) > 1e-4  # the old ‖LinearError‖²/SST would not add up
    # ‖x‖² is quadratic in x: a linear probe explains part of it, never all
    y = (x**2).sum(1)
    cy = np.linalg.lstsq(np.c_[x[fit], np.ones(fit.sum())], y[fit], rcond=None)[0]
    pred = np.c_[x[~fit], np.ones((~fit).sum())] @ cy
    want = 1 - ((y[~fit] - pred) ** 2).sum() / ((y[~fit] - y[~fit].mean()) ** 2).sum()
    assert row["norm_r2_x"] == pytest.approx(want, rel=1e-3, abs=1e-4)


def test_eval_writes_the_text_of_every_token_it_saw(evaluated):
    store, run = evaluated
    vocab = read_table(run, "vocab")
    seen = np.unique(st.read_tokens(st.open_store(store)))
    assert sorted(vocab["token"].to_list()) == seen.tolist()
    tok = load_model("tiny").tokenizer
    assert all(row["text"] == tok.decode([row["token"]]) for row in vocab.iter_rows(named=True))
    top = query(run, "kl_gap_tokens", min_count=1)
    assert top.height > 0 and top["text"].null_count() == 0


@pytest.fixture(scope="module")
def drawn(evaluated, tmp_path_factory):
    """The every-position run, plus a single-position evaluation with 6 ε-random draws at position 20."""
    store, run0 = evaluated
    run = str(tmp_path_factory.mktemp("draws") / "run")
    shutil.copytree(run0, run)
    sae_dir = sorted((__import__("pathlib").Path(run) / "saes").iterdir())[0]
    evaluate(store, run, [str(sae_dir)], EvalOptions(batch_size=3, max_seqs=4, patch_pos=20, eps_draws=6, seed=3))
    return store, run, sae_dir


def test_eps_draws_match_a_full_forward_and_numpy_z_scores(drawn):
    from actstore.draws import draw_generator, eps_at

    store, run, sae_dir = drawn
    sae = load_eval_sae(str(sae_dir))
    model = load_model("tiny")
    group = st.open_store(store)
    draws = read_table(run, "eps_draws").sort("seq", "draw")
    z = read_table(run, "eps_zscores").sort("seq")
    assert z.height == 4 and draws.height == 4 * 6 and set(z["pos"]) == {20}
    for seq in (0, 3):
        tokens = torch.from_numpy(st.read_tokens(group, slice(seq, seq + 1)).astype(np.int64))
        x = torch.from_numpy(st.read_acts(group, sae.hook, slice(seq, seq + 1)))[0]
        xh = sae.decode(*sae.encode(x))
        err = (x[20] - xh[20]).norm()
        candidates = eps_at(x[20], err, 6, draw_generator(3, seq))
        np.testing.assert_allclose((candidates - x[20]).norm(dim=-1).numpy(), err.item(), rtol=1e-5)

        def kl_at_20(vec, tokens=tokens):  # an independent path: the full model with a hook, numpy for the KL
            def swap(a, hook):
                a = a.clone()
                a[0, 20] = vec
                return a

            with torch.inference_mode():
                clean = model.bridge(tokens)[0, 20].double().numpy()
                patched = model.bridge.run_with_hooks(tokens, fwd_hooks=[(sae.hook, swap)])[0, 20].double().numpy()
            logp = clean - np.log(np.exp(clean - clean.max()).sum()) - clean.max()
            logq = patched - np.log(np.exp(patched - patched.max()).sum()) - patched.max()
            return float((np.exp(logp) * (logp - logq)).sum())

        want = np.array([kl_at_20(c) for c in candidates])
        got = draws.filter(pl.col("seq") == seq)["kl"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6)
        row = z.filter(pl.col("seq") == seq).row(0, named=True)
        assert row["kl_sae"] == pytest.approx(kl_at_20(xh[20]), rel=2e-3, abs=1e-6)
        assert row["kl_mean"] == pytest.approx(got.mean(), rel=1e-6)
        assert row["kl_sd"] == pytest.approx(np.std(got, ddof=1), rel=1e-5)
        assert row["z"] == pytest.approx((row["kl_sae"] - got.mean()) / np.std(got, ddof=1), rel=1e-4)
        assert row["share_above"] == pytest.approx(np.mean(got >= row["kl_sae"]))


def test_single_and_every_position_evaluations_sit_side_by_side(drawn):
    store, run, sae_dir = drawn
    sae_id = sae_dir.name
    n_all = read_table(run, "tokens").filter((pl.col("sae_id") == sae_id) & pl.col("patch_pos").is_null()).height
    assert n_all == 24 * 64  # the every-position records survived the single-position eval
    evals = query_sql(run, f"SELECT patch_pos FROM evals WHERE sae_id = '{sae_id}' ORDER BY patch_pos NULLS FIRST")
    assert evals["patch_pos"].to_list() == [None, 20]
    single = query_sql(run, f"SELECT count(*) AS n, min(patch_pos) AS p FROM tokens_single WHERE sae_id = '{sae_id}'")
    assert single.row(0) == (4 * 64, 20)
    every = query_sql(run, f"SELECT count(*) AS n FROM tokens WHERE sae_id = '{sae_id}'")
    assert every["n"][0] == 24 * 64
    codes = query_sql(run, f"SELECT count(*) AS n FROM codes WHERE sae_id = '{sae_id}'")
    assert codes["n"][0] == read_table(run, "codes").filter(pl.col("sae_id") == sae_id).height  # not duplicated
    # the SAE's KL at P in the draws' truncated pass is the single-position record's KL at P
    at_p = query_sql(
        run, f"SELECT seq, kl_patched FROM tokens_single WHERE sae_id = '{sae_id}' AND pos = 20 ORDER BY seq"
    )
    z = read_table(run, "eps_zscores").sort("seq")
    np.testing.assert_allclose(z["kl_sae"].to_numpy(), at_p["kl_patched"].to_numpy(), rtol=1e-4, atol=1e-7)
    sp = query(run, "single_position", after=3)
    assert set(sp["offset"]) == {0, 1, 2, 3} and sp["gap_all"].null_count() == 0
    assert query(run, "eps_zscores")["n_tokens"].to_list() == [4]


def test_eps_draws_refuse_bad_requests(evaluated, tmp_path):
    from actstore.draws import check_draws

    with pytest.raises(UsageError, match="--eps-draws needs --patch-pos"):
        EvalOptions(eps_draws=500)
    with pytest.raises(UsageError, match="--eps-draws 1 must be at least 2"):
        EvalOptions(eps_draws=1, patch_pos=4)
    with pytest.raises(UsageError, match=r"--eps-draws 100000000 on 96 sequences would hold 153\.6 GB"):
        check_draws(100_000_000, 96)
    store, run = evaluated
    with pytest.raises(UsageError, match="would hold"):
        evaluate(store, run, None, EvalOptions(patch_pos=3, eps_draws=10**9))


def test_darkmatter_pursuit_norms_and_error_arrays_for_training(evaluated, tmp_path):
    from safetensors.numpy import load_file

    from actstore.run import probe_path
    from actstore.steps.darkmatter import DarkmatterOptions, darkmatter

    src_store, run0 = evaluated
    store, run = str(tmp_path / "eval.zarr"), str(tmp_path / "run")
    shutil.copytree(src_store, store)  # --write-errors adds arrays to the store: not the shared fixture's
    saes = [str(p) for p in sorted(__import__("pathlib").Path(run0, "saes").iterdir())]
    evaluate(store, run, saes, EvalOptions(batch_size=8))
    table = darkmatter(run, DarkmatterOptions(batch_size=8, write_errors=True))
    assert (table["fvu_pursuit"] > 0).all() and (table["fvu_pursuit"] < 1.5 * table["fvu"]).all()
    assert table["fvu_nonlinear_pursuit"].is_not_null().all() and table["prev_sae_id"].is_null().all()
    sae_id, hook = table["sae_id"][0], table["hook"][0]
    group = st.open_store(store)
    x = st.read_acts(group, hook).astype(np.float64)
    e = x - read_recon_np(group, hook, sae_id)
    probe = load_file(str(probe_path(run, sae_id)))
    linear = x @ probe["W"].astype(np.float64) + probe["b"]
    # the per-token norms of 004 Fig. 12, on the held-out sequences
    dmt = read_table(run, "darkmatter_tokens").filter(pl.col("sae_id") == sae_id).sort("seq", "pos")
    odd = np.arange(x.shape[0]) % 2 == 1
    np.testing.assert_allclose(dmt["err_norm"], np.linalg.norm(e[odd], axis=-1).ravel(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dmt["linear_norm"], np.linalg.norm(linear[odd], axis=-1).ravel(), rtol=1e-3, atol=1e-4)
    nonlinear = np.linalg.norm((e - linear)[odd], axis=-1).ravel()
    np.testing.assert_allclose(dmt["nonlinear_norm"], nonlinear, rtol=1e-3, atol=1e-4)
    # the error arrays: beside the hooks, not among them; each part as defined, in the store's dtype
    assert st.hooks_of(group) == sorted(HOOKS)
    assert set(st.derived_of(group)) == {
        f"{s}.{p}" for s in table["sae_id"] for p in ("sae_error", "linear_error", "nonlinear_error")
    }
    scale = np.abs(x).max()
    for part, want in (("sae_error", e), ("linear_error", linear), ("nonlinear_error", e - linear)):
        got = st.read_acts(group, f"{sae_id}.{part}").astype(np.float64)
        np.testing.assert_allclose(got, want, atol=2e-3 * scale)
    # SAEs trained on the two parts, compared at matched k (004 §5.2)
    parts = [f"{sae_id}.linear_error", f"{sae_id}.nonlinear_error"]
    train(store, run, [SAESpec(h, 4, 2, 1024, 0) for h in parts], TrainOptions(batch_size=128))
    out = query(run, "error_saes")
    assert out.height == 1 and out["source_sae"][0] == sae_id and out["hook"][0] == hook
    assert out["fvu_linear_error"].is_not_null().all() and out["fvu_nonlinear_error"].is_not_null().all()
    with pytest.raises(UsageError, match="not a model hook"):
        evaluate(store, run, [str(__import__("pathlib").Path(run, "saes", f"{parts[0]}__k4_x2_1024_s0"))])
    with pytest.raises(UsageError, match="no evaluated SAE one layer below"):
        darkmatter(run, DarkmatterOptions(prev_layer=True, pursuit=False))


def read_recon_np(group, hook, sae_id):
    from actstore.recon import read_recon

    return read_recon(group, hook, sae_id).astype(np.float64)


def test_previous_layer_r2_and_the_matching_sae_below():
    from actstore.steps.darkmatter import analyse, previous_layer_r2, previous_sae

    rng = np.random.default_rng(0)
    n, d = 600, 6
    x = rng.normal(size=(n, d))
    xh = 0.8 * x + 0.1 * rng.normal(size=(n, d))
    xh_prev = rng.normal(size=(n, d))
    xh = xh - 0.3 * xh_prev @ rng.normal(size=(d, d))  # part of e is a linear map of the layer below's x̂
    fit = np.arange(n) % 2 == 0
    _, w = analyse(x.astype(np.float32), xh.astype(np.float32), fit, "affine")
    got = previous_layer_r2(xh_prev, x, xh, w, fit, "affine")
    e = x - xh
    linear = np.hstack([x, np.ones((n, 1))]) @ w
    for name, y in (("err", e), ("linear", linear), ("nonlinear", e - linear)):
        a = np.hstack([xh_prev, np.ones((n, 1))])
        coef = np.linalg.lstsq(a[fit], y[fit], rcond=None)[0]
        res = y[~fit] - a[~fit] @ coef
        want = np.mean(1 - (res**2).sum(0) / ((y[~fit] - y[~fit].mean(0)) ** 2).sum(0))
        assert got[f"prev_r2_{name}"] == pytest.approx(want, rel=1e-6)
    assert got["prev_r2_err"] > 0.5
    rows = pl.DataFrame(
        {
            "sae_id": ["a2", "b2", "c3"],
            "hook": ["blocks.2.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"],
            "layer": [2, 2, 3],
            "store": "s",
            "k": [8, 16, 16],
            "expansion": 4,
            "train_tokens": 100,
            "seed": 0,
        }
    )
    assert previous_sae(rows, rows.row(2, named=True))["sae_id"] == "b2"  # the same k one layer below
    with pytest.raises(UsageError, match="one layer below"):
        previous_sae(rows, rows.row(0, named=True))


def test_eval_sensitivity_columns_and_the_sensitivity_query(evaluated, tmp_path):
    store, run0 = evaluated
    run = str(tmp_path / "run")
    sae_dir = sorted(__import__("pathlib").Path(run0, "saes").iterdir())[1]  # the hook at layer 3
    evaluate(store, run, [str(sae_dir)], EvalOptions(batch_size=4, max_seqs=8, sensitivity=True, probes=2))
    t = read_table(run, "tokens")
    for col in ("grad_norm", "iso_sens", "fo_patched", "swd_patched", "fo_eps", "swd_eps", "fo_zero", "swd_zero"):
        assert t[col].null_count() == 0, col
    assert (t["swd_patched"] >= 0).all() and (t["iso_sens"] > 0).all()
    out = query(run, "sensitivity", n_boot=50).row(0, named=True)
    f = {
        c: t[c].to_numpy().astype(np.float64)
        for c in ("swd_patched", "sse", "iso_sens", "swd_eps", "kl_patched", "kl_eps", "fo_patched")
    }
    assert out["alignment"] == pytest.approx(f["swd_patched"].sum() / (0.5 * f["sse"] * f["iso_sens"]).sum(), rel=1e-5)
    assert out["analytic_gap"] == pytest.approx(f["swd_patched"].sum() / f["swd_eps"].sum(), rel=1e-5)
    assert out["measured_gap"] == pytest.approx(f["kl_patched"].sum() / f["kl_eps"].sum(), rel=1e-5)
    d_ce = (t["ce_patched"] - t["ce_orig"]).drop_nulls().cast(pl.Float64)
    assert out["fo_ratio"] == pytest.approx(f["fo_patched"].sum() / d_ce.sum(), rel=1e-4)
    assert out["alignment_lo"] <= out["alignment"] <= out["alignment_hi"]
    assert 0.3 < out["eps_alignment"] < 3  # an isotropic error is about as sensitive as iso_sens says


def test_the_batch_size_changes_no_random_baseline_nor_sensitivity_column(evaluated, tmp_path):
    """Every draw (baselines, actdiff's partners, iso_sens's probes) is seeded per sequence, not per batch."""
    from actstore.tables import BASELINES

    store, run0 = evaluated
    sae_dir = sorted(__import__("pathlib").Path(run0, "saes").iterdir())[1]  # the hook at layer 3
    records = {}
    for size in (2, 4):
        run = str(tmp_path / f"run{size}")
        evaluate(store, run, [str(sae_dir)], EvalOptions(batch_size=size, max_seqs=8, sensitivity=True, probes=2))
        records[size] = read_table(run, "tokens").sort("seq", "pos")
    a, b = records[2], records[4]
    assert a["seq"].to_list() == b["seq"].to_list() and a.height == 8 * 64
    random = [f"{m}_{name}" for name in BASELINES for m in ("ce", "kl", "fo", "swd")] + ["iso_sens"]
    assert set(random) <= set(a.columns)
    for col in random:
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy(), err_msg=col)

"""Training: the loader's stream, sweeps in one pass, resume, known-answer recovery, AuxK, outputs, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from actstore import integrity
from actstore.errors import StoreError, UsageError
from actstore.loader import ActivationLoader, LoaderOptions
from actstore.run import SAESpec, read_table
from actstore.steps.train import TrainOptions, sweep, train
from actstore.trainee import UNDERTRAINED, Trainee

from .synthetic import sparse_dictionary_data, write_store

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def dict_store(tmp_path_factory):
    """25,600 tokens of 3-sparse codes over a known 64-atom dictionary in 32 dimensions."""
    x, D = sparse_dictionary_data(400 * 64, d=32, n_atoms=64, k=3, noise=0.01)
    path = write_store(str(tmp_path_factory.mktemp("syn") / "dict.zarr"), x.reshape(400, 64, 32))
    return path, D


def _all(loader) -> np.ndarray:
    return torch.cat(list(loader)).numpy()


def test_loader_is_an_exact_deterministic_shuffle_of_the_store(dict_store):
    path, _ = dict_store
    import zarr

    rows = zarr.open_group(path, mode="r")[f"acts/{HOOK}"][:].reshape(-1, 32)
    opts = LoaderOptions(batch_size=1000, seed=7, group_chunks=4)
    a = _all(ActivationLoader(path, HOOK, len(rows), opts))
    assert a.shape == rows.shape
    assert not np.array_equal(a, rows)  # shuffled …
    assert np.array_equal(np.sort(a, axis=0), np.sort(rows, axis=0))  # … a permutation: every row once
    assert np.array_equal(a, _all(ActivationLoader(path, HOOK, len(rows), opts)))  # same seed, same stream
    assert not np.array_equal(a, _all(ActivationLoader(path, HOOK, len(rows), LoaderOptions(1000, seed=8))))


def test_loader_budgets_are_exact_and_resume_anywhere(dict_store):
    path, _ = dict_store
    opts = LoaderOptions(batch_size=1000, seed=1)
    whole = _all(ActivationLoader(path, HOOK, 60_000, opts))  # beyond one epoch: a second, reshuffled pass
    assert len(whole) == 60_000
    sizes = [len(b) for b in ActivationLoader(path, HOOK, 60_000, opts)]
    assert sizes[:-1] == [1000] * (len(sizes) - 1)
    tail = _all(ActivationLoader(path, HOOK, 60_000, opts, start_token=12_345))
    assert np.array_equal(tail, whole[12_345:])


def test_loader_drops_first_positions(tmp_path):
    acts = np.zeros((8, 16, 4), dtype=np.float32)
    acts[:, 0] = 100.0  # a BOS-like outlier at position 0
    path = write_store(str(tmp_path / "s.zarr"), acts, chunk_seqs=4)
    rows = _all(ActivationLoader(path, HOOK, 8 * 15, LoaderOptions(batch_size=32, drop_first_positions=1)))
    assert len(rows) == 8 * 15 and rows.max() == 0.0


def test_incomplete_store_is_refused(tmp_path):
    import zarr

    path = write_store(str(tmp_path / "s.zarr"), np.zeros((8, 4, 4), dtype=np.float32), chunk_seqs=4)
    g = zarr.open_group(path, mode="r+")
    g.attrs["commit"] = {"n_seq": 4}
    with pytest.raises(StoreError, match="incomplete"):
        ActivationLoader(path, HOOK, 10)


def _max_cos(learned: np.ndarray, true: np.ndarray) -> float:
    learned = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((true @ learned.T).max(axis=1).mean())


def _weights(sae_dir: str) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in load_file(f"{sae_dir}/sae_weights.safetensors").items()}


def _np_recon(w: dict[str, np.ndarray], x: np.ndarray, k: int) -> np.ndarray:
    """x̂ of a TopK SAE in plain numpy: the k largest pre-activations, ReLU'd, decoded (docs/METHODS.md)."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    idx = np.argpartition(-pre, k - 1, axis=1)[:, :k]
    vals = np.maximum(np.take_along_axis(pre, idx, axis=1), 0)
    return np.einsum("nk,nkd->nd", vals, w["W_dec"][idx]) + w["b_dec"]


def _np_fvu(w: dict[str, np.ndarray], x: np.ndarray, k: int) -> float:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖²: 1.0 is the mean predictor."""
    return float(((x - _np_recon(w, x, k)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _store_rows(path: str) -> np.ndarray:
    import zarr

    acts = zarr.open_group(path, mode="r")[f"acts/{HOOK}"][:]
    return acts.reshape(-1, acts.shape[-1]).astype(np.float64)


def test_sae_recovers_a_known_dictionary(dict_store, tmp_path):
    path, D = dict_store
    specs = [SAESpec(HOOK, k=3, expansion=4, tokens=400_000, seed=0)]
    (out,) = train(path, str(tmp_path / "run"), specs, TrainOptions(batch_size=512))  # the default recipe
    W_dec = load_file(f"{out}/sae_weights.safetensors")["W_dec"].numpy()
    recovered = _max_cos(W_dec, D)
    # Chance level: the best match among 128 random directions in 32 dimensions (~0.6). A learned
    # atom within ~25° of every true one (cos > 0.9) is recovery, not luck.
    chance = _max_cos(np.random.default_rng(12345).standard_normal((128, 32)), D)
    assert chance < 0.7
    assert recovered > 0.9, recovered


def test_auxk_revives_latents_that_would_stay_dead(dict_store):
    path, _ = dict_store
    spec = SAESpec(HOOK, k=3, expansion=4, tokens=240_000, seed=0, lr=3e-3)
    dead_after = {}
    for coef in (0.0, 1 / 32):
        o = TrainOptions(batch_size=512, dead_tokens=2_000, auxk_coef=coef)
        t = Trainee(spec, 32, o, torch.zeros(32))
        with torch.no_grad():
            t.sae.b_enc[32:] = -2.0  # 3/4 of the latents start too far down to win the top-k
        for batch in ActivationLoader(path, HOOK, spec.tokens, LoaderOptions(batch_size=512)):
            t.train_step(batch)
        dead_after[coef] = float((t.since_fired >= o.dead_tokens).float().mean())
    # Measured: 0.70 dead without AuxK, 0.45 with it. The 32 live latents cannot cover 64 atoms, so the
    # error is large, and AuxK trains the dead latents on exactly that error until they win slots.
    assert dead_after[0.0] >= 0.6, dead_after
    assert dead_after[1 / 32] <= dead_after[0.0] - 0.15, dead_after


def test_budget_sweep_in_one_pass_equals_a_separate_run(dict_store, tmp_path):
    path, _ = dict_store
    o = TrainOptions(batch_size=1000)
    train(path, str(tmp_path / "sweep"), sweep([HOOK], [4], [2], [10_000, 30_000], [0, 1]), o)
    train(path, str(tmp_path / "alone"), sweep([HOOK], [4], [2], [10_000], [1]), o)
    a = load_file(str(tmp_path / "sweep/saes" / f"{HOOK}__k4_x2_10k_s1" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "alone/saes" / f"{HOOK}__k4_x2_10k_s1" / "sae_weights.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    seeds = [
        load_file(str(tmp_path / "sweep/saes" / f"{HOOK}__k4_x2_30k_s{s}" / "sae_weights.safetensors"))["W_dec"]
        for s in (0, 1)
    ]
    assert not torch.equal(*seeds)


def test_outputs_config_curves_and_fire_counts(dict_store, tmp_path):
    path, _ = dict_store
    (out,) = train(
        path,
        str(tmp_path / "run"),
        [SAESpec(HOOK, 4, 2, 8_000, 0, lr=2e-3)],
        TrainOptions(batch_size=1000, log_every=2),
    )
    cfg = json.loads(Path(out, "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["hook_name"] == HOOK and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["model_name"] == "synthetic" and cfg["actstore"]["train_tokens"] == 8_000
    assert cfg["actstore"]["loader"]["seed"] == 0
    curves = pl.read_parquet(tmp_path / "run" / "records" / "curves" / f"sae_id={Path(out).name}" / "part-0.parquet")
    for col in (
        "step",
        "tokens",
        "mse",
        "seconds",
        "nmse",
        "nmse_uncentred",
        "explained_variance",
        "l0",
        "dead_frac",
        "batch_usage",
        "lr",
        "aux_loss",
    ):
        assert col in curves.columns
    assert curves["tokens"].max() == 8_000 and (curves["l0"] <= 4).all()
    assert sorted(curves["step"].to_list()) == [2, 4, 6, 8]  # every log_every steps, and the last
    fires = load_file(str(Path(out) / "fire_counts.safetensors"))
    assert int(fires["fire_counts"].sum()) <= 4 * 8_000 and int(fires["tokens"]) == 8_000
    # The logged FVU is the real one: well below the mean predictor's 1.0, and what numpy gets from the saved
    # weights, on the last batch (its weights moved by one more step since) and on the whole store.
    last = curves.sort("step").row(-1, named=True)
    w = _weights(out)
    batches = list(ActivationLoader(path, HOOK, 8_000, TrainOptions(batch_size=1000).loader()))
    assert last["fvu"] < 0.8, last
    assert last["fvu"] == pytest.approx(_np_fvu(w, batches[-1].double().numpy(), 4), rel=0.02)
    assert last["fvu"] == pytest.approx(_np_fvu(w, _store_rows(path), 4), abs=0.05)
    assert last["explained_variance"] == pytest.approx(1 - last["fvu"], abs=1e-6)
    assert curves.sort("step")["fvu"][0] > last["fvu"]  # it learned
    # normalised MSE (study 003): mean-centred, so a mean predictor scores 1; the ‖x‖² one kept beside it
    x = batches[-1].double().numpy()
    err = ((x - _np_recon(w, x, 4)) ** 2).sum(1)
    assert last["nmse"] == pytest.approx(err.sum() / ((x - x.mean(0)) ** 2).sum(), rel=0.02)
    assert last["nmse_uncentred"] == pytest.approx((err / (x**2).sum(1)).mean(), rel=0.05)
    assert last["nmse"] > last["nmse_uncentred"]  # x is far from 0 here: centring matters
    assert (curves.sort("step")["seconds"].diff().drop_nulls() > 0).all()
    row = read_table(tmp_path / "run", "saes").row(0, named=True)
    assert row["train_seconds"] == pytest.approx(last["seconds"]) and row["data_seed"] == 0


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "actstore.cli.main", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--k", "64", "--expansion", "2"], "must be between 1 and d_sae - 1 = 63"),
        (["--tokens", "0"], "not positive"),
        (["--hooks", "blocks.9.hook_resid_post"], "is not in"),
    ],
)
def test_bad_train_input_is_one_line(dict_store, tmp_path, args, needle):
    path, _ = dict_store
    base = {"--hooks": HOOK, "--k": "4", "--expansion": "2", "--tokens": "1k"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    flat = [item for pair in base.items() for item in pair]
    result = run_cli("train", path, "--out", str(tmp_path / "run"), *flat, "--quiet")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert not (tmp_path / "run" / "saes").exists()


def test_a_finished_sae_trained_with_other_settings_is_not_silently_reused(dict_store, tmp_path):
    path, _ = dict_store
    run = str(tmp_path / "run")
    train(path, run, [SAESpec(HOOK, 4, 2, 2_000, 0)], TrainOptions(batch_size=1000))
    with pytest.raises(UsageError, match="other settings .*auxk_coef"):
        train(path, run, [SAESpec(HOOK, 4, 2, 2_000, 0)], TrainOptions(batch_size=1000, auxk_coef=0.5))


def test_a_one_row_tail_does_not_blow_up_the_fvu(dict_store, tmp_path):
    from actstore.steps.train import summary

    path, _ = dict_store
    run = str(tmp_path / "run")
    (out,) = train(path, run, [SAESpec(HOOK, 4, 2, 20_001, 0)], TrainOptions(batch_size=1000, log_every=1))
    (row,) = summary(run)
    assert row["tokens"] == 20_001
    # The last step saw one row: its FVU is that row's error over the previous batch's variance per token,
    # not over the one row's own (zero) spread. Its learning rate was ~0 (the budget's last token), so the
    # saved weights are the ones it used.
    batches = [b.double().numpy() for b in ActivationLoader(path, HOOK, 20_001, TrainOptions(batch_size=1000).loader())]
    assert [len(b) for b in batches[-2:]] == [1000, 1]
    prev, tail = batches[-2], batches[-1]
    w = _weights(out)
    var_per_token = ((prev - prev.mean(0)) ** 2).sum() / len(prev)
    want = float(((tail - _np_recon(w, tail, 4)) ** 2).sum() / var_per_token)
    assert row["fvu"] == pytest.approx(want, rel=1e-3)
    assert _np_fvu(w, _store_rows(path), 4) < 0.8  # and the SAE itself beats the mean predictor


def test_seed_data_gives_each_seed_its_own_data_order_and_records_it(dict_store, tmp_path):
    """--seed-data: seed s reads the stream of data seed data_seed + s (so repeats vary data and init);
    its SAE equals a shared-order run with --data-seed data_seed + s, and saes.data_seed says which."""
    path, _ = dict_store
    o = TrainOptions(batch_size=1000, seed_data=True, data_seed=3)
    train(path, str(tmp_path / "rep"), sweep([HOOK], [4], [2], [6_000], [0, 1]), o)
    train(
        path, str(tmp_path / "alone"), sweep([HOOK], [4], [2], [6_000], [1]), TrainOptions(batch_size=1000, data_seed=4)
    )
    name = f"{HOOK}__k4_x2_6k_s1"
    a = load_file(str(tmp_path / "rep/saes" / name / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "alone/saes" / name / "sae_weights.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    saes = read_table(tmp_path / "rep", "saes").sort("seed")
    assert saes["data_seed"].to_list() == [3, 4]
    shared = TrainOptions(batch_size=1000, data_seed=3)
    train(path, str(tmp_path / "shared"), sweep([HOOK], [4], [2], [6_000], [1]), shared)
    c = load_file(str(tmp_path / "shared/saes" / name / "sae_weights.safetensors"))
    assert not torch.equal(a["W_dec"], c["W_dec"])  # same seed, other data order


def test_the_saes_rows_describe_every_sae_of_a_sweep(small_store, tmp_path):
    import zarr

    from actstore.run import read_table

    from .conftest import HOOKS

    config = json.loads((Path(__file__).parents[1] / "actstore" / "models" / "tiny" / "config.json").read_text())
    d_model = zarr.open_group(small_store, mode="r")[f"acts/{HOOKS[0]}"].shape[2]
    assert d_model == config["hidden_size"]
    run = tmp_path / "run"
    specs = sweep(list(HOOKS), [4, 8], [2], [1000, 1500], [0])
    dirs = train(small_store, str(run), specs, TrainOptions(batch_size=500))
    saes = read_table(run, "saes")
    assert sorted(saes["sae_id"]) == sorted(s.sae_id for s in specs) == sorted(Path(d).name for d in dirs)
    assert len(specs) == 8 and "blocks.3.hook_resid_post__k8_x2_1.5k_s0" in set(saes["sae_id"])
    curves = read_table(run, "curves")
    for spec in specs:
        row = saes.filter(pl.col("sae_id") == spec.sae_id).row(0, named=True)
        assert row["model"] == "tiny" and row["architecture"] == "topk", row
        assert row["hook"] == spec.hook and row["layer"] == int(spec.hook.split(".")[1]), row
        assert row["n_layers"] == config["num_hidden_layers"], row
        assert row["depth"] == pytest.approx(row["layer"] / row["n_layers"]), row
        assert (row["k"], row["expansion"], row["seed"]) == (spec.k, spec.expansion, spec.seed), row
        assert (row["d_model"], row["d_sae"]) == (d_model, spec.expansion * d_model), row
        assert row["train_tokens"] == spec.tokens, row
        assert Path(row["path"]) == run / "saes" / spec.sae_id and Path(row["path"], "cfg.json").is_file()
        assert curves.filter(pl.col("sae_id") == spec.sae_id)["tokens"].max() == spec.tokens


def test_a_second_model_joins_a_run_but_never_under_another_models_sae_id(dict_store, tmp_path):
    path, _ = dict_store
    run = str(tmp_path / "run")
    train(path, run, [SAESpec(HOOK, 4, 2, 2_000, 0)], TrainOptions(batch_size=1000))
    x, _ = sparse_dictionary_data(8 * 64, d=32, n_atoms=64, k=3)
    other = write_store(str(tmp_path / "other.zarr"), x.reshape(8, 64, 32), model="another-model")
    with pytest.raises(UsageError, match="is an SAE of model 'synthetic'.*another --out"):
        train(other, run, [SAESpec(HOOK, 4, 2, 2_000, 0)], TrainOptions(batch_size=1000))
    train(other, run, [SAESpec(HOOK, 4, 2, 2_000, 1)], TrainOptions(batch_size=1000))
    assert sorted(read_table(run, "saes")["model"]) == ["another-model", "synthetic"]
    stores = json.loads((Path(run) / "run.json").read_text())["stores"]
    assert [s["model"] for s in stores] == ["synthetic", "another-model"]


def test_an_lr_sweep_trains_every_rate_in_one_pass_and_each_equals_a_separate_run(dict_store, tmp_path):
    path, _ = dict_store
    o = TrainOptions(batch_size=1000)
    specs = sweep([HOOK], [4], [2], [10_000], [0], lrs=[1e-3, 4e-3])
    assert [s.sae_id for s in specs] == [f"{HOOK}__k4_x2_10k_lr0.001_s0", f"{HOOK}__k4_x2_10k_lr0.004_s0"]
    train(path, str(tmp_path / "sweep"), specs, o)
    train(path, str(tmp_path / "alone"), sweep([HOOK], [4], [2], [10_000], [0], lrs=[4e-3]), o)
    weights = {
        run: load_file(str(tmp_path / run / "saes" / specs[1].sae_id / "sae_weights.safetensors"))
        for run in ("sweep", "alone")
    }
    for name in weights["sweep"]:
        assert torch.equal(weights["sweep"][name], weights["alone"][name]), name
    rows = read_table(str(tmp_path / "sweep"), "saes").sort("lr")
    assert rows["lr"].to_list() == [1e-3, 4e-3]
    from actstore.steps.train import summary

    assert sorted(r["lr"] for r in summary(str(tmp_path / "sweep"))) == [1e-3, 4e-3]  # the peak, not the last step's
    other = load_file(str(tmp_path / "sweep" / "saes" / specs[0].sae_id / "sae_weights.safetensors"))
    assert not torch.equal(other["W_dec"], weights["sweep"]["W_dec"])
    assert SAESpec.parse(specs[0].sae_id) == specs[0]


def test_still_improving_is_the_drop_over_the_last_tenth_before_the_decay():
    from actstore.trainee import still_improving

    flat = [1.0] * 100
    assert still_improving(flat, 0.2) == 0.0
    falling = [2.0 - i / 100 for i in range(100)]  # steps 60–69 average 1.355, steps 70–79 average 1.255
    assert still_improving(falling, 0.2) == pytest.approx((1.355 - 1.255) / 1.255)
    assert still_improving(falling[:19], 0.2) is None  # too short to say


def test_the_convergence_flag_marks_an_undertrained_run_and_not_a_converged_one(dict_store, tmp_path):
    path, _ = dict_store
    run = str(tmp_path / "run")
    slow = SAESpec(HOOK, 3, 4, 100_000, 0, lr=2e-3)  # 18x below the recipe: still falling after 200 steps
    fast = SAESpec(HOOK, 3, 4, 100_000, 0)  # the recipe's rate
    train(path, run, [slow, fast], TrainOptions(batch_size=500))
    rows = {r["sae_id"]: r for r in read_table(run, "saes").iter_rows(named=True)}
    assert rows[slow.sae_id]["undertrained"] and rows[slow.sae_id]["still_improving"] > UNDERTRAINED
    assert not rows[fast.sae_id]["undertrained"] and abs(rows[fast.sae_id]["still_improving"]) < UNDERTRAINED


def test_fvu_falls_with_k_under_the_default_recipe(tmp_path):
    x, _ = sparse_dictionary_data(400 * 64, d=32, n_atoms=128, k=8, noise=0.01, seed=3)
    path = write_store(str(tmp_path / "k8.zarr"), x.reshape(400, 64, 32))
    run = str(tmp_path / "run")
    specs = sweep([HOOK], [2, 4, 8], [4], [200_000], [0])
    train(path, run, specs, TrainOptions(batch_size=1024))
    fvu = [_np_fvu(_weights(f"{run}/saes/{s.sae_id}"), x.astype(np.float64), s.k) for s in specs]
    assert fvu[0] > fvu[1] > fvu[2], fvu


def test_a_damaged_or_code_carrying_checkpoint_is_refused_in_one_line(small_store, tmp_path):
    import pickle

    from actstore.errors import StoreError
    from actstore.run import SAESpec, checkpoint_path
    from actstore.steps.train import TrainOptions, train

    from .conftest import HOOKS

    run = tmp_path / "run"
    ckpt = checkpoint_path(run, HOOKS[0], small_store)
    ckpt.mkdir(parents=True)

    class Payload:  # unpickling it would call print: weights_only must refuse it
        def __reduce__(self):
            return (print, ("code ran",))

    specs, options = [SAESpec(HOOKS[0], 4, 2, 512, 0)], TrainOptions(batch_size=128)
    for content in (b"\x00garbage", pickle.dumps({"key": Payload()})):
        (ckpt / "state.pt").write_bytes(content)
        integrity.seal(ckpt)  # the sums match: what is refused is the content itself
        with pytest.raises(StoreError, match=f"checkpoint {ckpt} cannot be read.*delete") as err:
            train(small_store, str(run), specs, options)
        assert "\n" not in str(err.value)


def test_a_flipped_byte_in_a_checkpoint_is_caught_by_its_sums(small_store, tmp_path):
    """torch.load reads a checkpoint with a flipped tensor byte without complaint; the sums do not."""
    from actstore.errors import StoreError
    from actstore.run import SAESpec, checkpoint_path
    from actstore.steps.train import TrainOptions, train

    from .conftest import HOOKS

    run = tmp_path / "run"
    ckpt = checkpoint_path(run, HOOKS[0], small_store)
    ckpt.mkdir(parents=True)
    torch.save({"key": {}, "position": 0, "trainees": [{"w": torch.arange(4096.0)}]}, ckpt / "state.pt")
    integrity.seal(ckpt)
    raw = bytearray((ckpt / "state.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside the tensor's bytes
    (ckpt / "state.pt").write_bytes(bytes(raw))
    assert torch.load(ckpt / "state.pt", weights_only=True)["position"] == 0  # torch itself does not notice
    with pytest.raises(StoreError, match=r"state.pt is damaged .*delete .* to restart that sweep"):
        train(small_store, str(run), [SAESpec(HOOKS[0], 4, 2, 512, 0)], TrainOptions(batch_size=128))


def test_a_sweep_that_would_not_fit_in_memory_is_refused_with_the_numbers(dict_store, tmp_path, monkeypatch):
    from actstore import devicemem
    from actstore.steps.train import sweep_memory

    # the Gemma-size figure, by hand: d = 2,304 at 32× is 2·2,304·73,728 + 73,728 + 2,304 parameters,
    # 16 bytes each (weights, gradients, Adam's two moments) ≈ 5.44 GB; sixteen of them ≈ 87 GB
    gemma = SAESpec("h", 32, 32, 1, 0)
    params = 2 * 2304 * 73_728 + 73_728 + 2304
    assert sweep_memory([gemma], 2304, 1) - 16 * params == 4 * (2 * 73_728 + 3 * 2304)
    assert 5.4e9 < 16 * params < 5.5e9 and 86e9 < sweep_memory([gemma] * 16, 2304, 4096) < 90e9

    monkeypatch.setattr(devicemem, "free_bytes", lambda device: 10_000)
    run = tmp_path / "run"
    with pytest.raises(UsageError) as err:
        train(dict_store[0], str(run), sweep([HOOK], [4, 8], [2], [2048], [0]), TrainOptions(batch_size=256))
    msg = str(err.value)
    assert "\n" not in msg and "2 SAEs" in msg and "10.0 KB is free" in msg and "torchrun" in msg
    assert not (run / "saes").exists()  # refused before anything was trained

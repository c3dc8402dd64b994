"""Two processes under torchrun (gloo, this machine's CPU) against one process: harvest, train and eval.

Each claim is a comparison with a single-process run of the same command: the store's chunk files are
byte-identical, the SAEs' weights are byte-identical (data parallelism: equal to rounding), the records
equal row for row. Threads are one per process throughout (torchrun's default), so BLAS cannot differ.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from actstore import run as rundir
from actstore import store as st

BIN = Path(sys.executable).parent
HOOKS = "blocks.0.hook_resid_post,blocks.1.hook_resid_post"
HARVEST = ["--model", "tiny", "--hooks", HOOKS, "--seq-len", "32", "--batch-size", "4", "--quiet"]
TRAIN = ["--hooks", HOOKS, "--k", "4,8", "--expansion", "2", "--tokens", "6k", "--batch-size", "128", "--quiet"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def actstore(*args: str, ranks: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`actstore ARGS` in one process, or under `torchrun --nproc-per-node RANKS`."""
    cmd = [str(BIN / "actstore"), *args]
    if ranks > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}", "--no-python", "--", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store by relative path; zarr.json without its wall-clock fields."""
    out = {}
    for f in sorted(store.rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "zarr.json":
                meta = json.loads(data)
                attrs = meta.get("attributes", {})
                attrs.pop("created", None)
                attrs.get("commit", {}).pop("updated", None)
                data = json.dumps(meta, sort_keys=True).encode()
            out[str(f.relative_to(store))] = data
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    """The same harvest by one process and by two."""
    root = tmp_path_factory.mktemp("dist")
    one, two = root / "one.zarr", root / "two.zarr"
    actstore("harvest", str(one), "--tokens", str(24 * 32), *HARVEST)
    actstore("harvest", str(two), "--tokens", str(24 * 32), *HARVEST, ranks=2)
    return {"one": one, "two": two, "root": root}


def test_two_ranks_harvest_the_same_bytes_as_one_process(stores):
    one, two = _files(stores["one"]), _files(stores["two"])
    assert one.keys() == two.keys() and len(one) > 20
    assert [k for k in one if one[k] != two[k]] == []
    assert st.committed(st.open_store(str(stores["two"]))) == 24


def test_a_harvest_killed_under_two_ranks_is_finished_by_one_process(tmp_path):
    # 24 units of 4 × 128 tokens: long enough that a kill at the first flagged chunk lands mid-harvest
    args = ["--tokens", str(96 * 128), *HARVEST]
    args[args.index("--seq-len") + 1] = "128"
    out, ref = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", "--", str(BIN / "actstore")]
    proc = subprocess.Popen(
        [*cmd, "harvest", str(out), *args], env=_env(), start_new_session=True, stdout=subprocess.DEVNULL
    )
    flags = out / st.COMMITS / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if flags.is_dir() and any(flags.iterdir()):
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, mid-harvest
    proc.wait()
    group = zarr.open_group(str(out), mode="r")
    # killed part-way: some chunk not yet flagged, or all flagged but the commit record not yet written
    assert st.committed(group) < 96 or proc.returncode == 0, "the harvest finished before the kill"
    actstore("harvest", str(out), *args)  # one process finishes what two started
    actstore("harvest", str(ref), *args)  # and one process uninterrupted
    assert _files(out) == _files(ref)


def test_more_ranks_than_work_units_is_refused_on_every_rank(tmp_path):
    out = tmp_path / "tiny.zarr"
    done = actstore("harvest", str(out), "--tokens", str(4 * 32), *HARVEST, ranks=2, check=False)
    assert done.returncode != 0
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and all("2 processes but only 1 work units" in ln for ln in lines), done.stderr[-2000:]
    assert not out.exists()  # refused before anything was written


def test_ranks_given_different_options_fail_with_one_line_each(tmp_path):
    out = tmp_path / "mixed.zarr"
    script = f"exec {BIN / 'actstore'} harvest {out} --tokens $((256 * (RANK + 1))) " + " ".join(HARVEST)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", "--", "sh", "-c", script]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert done.returncode != 0 and len(lines) == 2, done.stderr[-2000:]
    assert all("different options on rank 0 and rank 1 (tokens)" in ln for ln in lines)


@pytest.fixture(scope="module")
def runs(stores) -> dict[str, Path]:
    """One sweep of 4 SAEs trained by one process and by two (divided among them)."""
    root = stores["root"]
    one, two = root / "run1", root / "run2"
    actstore("train", str(stores["one"]), "--out", str(one), *TRAIN)
    actstore("train", str(stores["one"]), "--out", str(two), *TRAIN, ranks=2)
    return {"one": one, "two": two}


def test_two_ranks_train_the_same_weights_as_one_process(runs):
    ones = sorted(p.name for p in rundir.trained_sae_dirs(runs["one"]))
    assert ones == sorted(p.name for p in rundir.trained_sae_dirs(runs["two"])) and len(ones) == 4
    for name in ones:
        for f in ("sae_weights.safetensors", "fire_counts.safetensors"):
            assert (runs["one"] / "saes" / name / f).read_bytes() == (runs["two"] / "saes" / name / f).read_bytes()
    curves = [rundir.read_table(r, "curves").drop("seconds").sort("sae_id", "step") for r in runs.values()]
    assert curves[0].equals(curves[1])


def test_a_sweep_killed_under_two_ranks_resumes_each_ranks_checkpoint(stores, runs, tmp_path):
    out = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", "--", str(BIN / "actstore")]
    cmd += ["train", str(stores["one"]), "--out", str(out), *TRAIN, "--checkpoint-seconds", "0"]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "checkpoints").glob("*.rank*of2.ckpt"))) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p.name.split(".rank")[1] for p in (out / "checkpoints").glob("*.ckpt"))
    assert set(ckpts) <= {"0of2.ckpt", "1of2.ckpt"} and (ckpts or proc.returncode == 0)
    actstore("train", str(stores["one"]), "--out", str(out), *TRAIN, ranks=2)  # each rank resumes its own
    for sae in rundir.trained_sae_dirs(runs["one"]):
        f = "sae_weights.safetensors"
        assert (out / "saes" / sae.name / f).read_bytes() == (sae / f).read_bytes(), sae.name


def test_data_parallel_training_matches_one_process_to_rounding(stores, tmp_path):
    from safetensors.numpy import load_file

    sweep = ["--hooks", "blocks.1.hook_resid_post", "--k", "8", "--expansion", "2", "--tokens", "2k"]
    sweep += ["--batch-size", "128", "--quiet"]
    actstore("train", str(stores["one"]), "--out", str(tmp_path / "a"), *sweep)
    actstore("train", str(stores["one"]), "--out", str(tmp_path / "b"), *sweep, "--data-parallel", ranks=2)
    name = "blocks.1.hook_resid_post__k8_x2_2k_s0"
    a = load_file(str(tmp_path / "a" / "saes" / name / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "saes" / name / "sae_weights.safetensors"))
    for key in a:  # 16 steps of Adam on gradients summed in another order
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-5 * max(1.0, float(np.abs(a[key]).max())))
    cfg = json.loads((tmp_path / "b" / "saes" / name / "cfg.json").read_text())
    assert cfg["actstore"]["settings"]["options"]["data_parallel_ranks"] == 2


def _records(run: Path, table: str) -> pl.DataFrame:
    frame = rundir.read_table(run, table)
    frame = frame.drop([c for c in frame.columns if c in ("created", "store", "store_key")])
    keys = [c for c in ("sae_id", "seq", "pos", "latent", "token", "model_key") if c in frame.columns]
    return frame.sort(keys) if keys else frame


def test_two_ranks_evaluate_the_same_records_as_one_process(stores, runs, tmp_path):
    ev = tmp_path / "eval.zarr"
    actstore("harvest", str(ev), "--tokens", str(16 * 32), "--split", "eval", *HARVEST)
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        (out / "saes").mkdir(parents=True)
        for sae in rundir.trained_sae_dirs(runs["one"]):
            subprocess.run(["cp", "-r", str(sae), str(out / "saes")], check=True)
    actstore("eval", str(ev), "--run", str(one), "--batch-size", "4", "--quiet")
    recon_one = {k: zarr.open_group(str(ev))[f"recon/{k}"] for k in zarr.open_group(str(ev))["recon"].group_keys()}
    recon_one = {k: {h: g[h][:] for h in g.array_keys()} for k, g in recon_one.items()}
    actstore("eval", str(ev), "--run", str(two), "--batch-size", "4", "--quiet", ranks=2)
    assert any("~r1of2" in p.name for p in (two / "records" / "tokens").rglob("*.parquet"))
    for table in ("tokens", "codes", "latents", "evals", "layers", "vocab", "positions"):
        a, b = _records(one, table), _records(two, table)
        assert a.height > 0 and a.equals(b), table
    group = zarr.open_group(str(ev))
    for sae, arrays in recon_one.items():
        for hook, values in arrays.items():
            assert np.array_equal(group[f"recon/{sae}/{hook}"][:], values)
    # darkmatter divides the evaluated SAEs among the ranks
    actstore("darkmatter", str(one), "--quiet")
    actstore("darkmatter", str(two), "--quiet", ranks=2)
    for table in ("darkmatter", "darkmatter_tokens"):
        a, b = (_records(r, table).drop("probe", strict=False) for r in (one, two))
        assert a.height > 0 and a.equals(b), table


def test_rank_shares_of_a_part_replace_earlier_files_of_that_part_only(tmp_path):
    """Rank 0 replaces every earlier file of the part; later ranks keep the shares before theirs; one
    process replaces all shares; other parts (another patching position) are always kept."""
    frame = lambda seq: pl.DataFrame({"seq": [seq], "pos": [0]})  # noqa: E731
    names = lambda: sorted(p.name for p in (tmp_path / "records" / "codes").rglob("*.parquet"))  # noqa: E731
    rundir.write_tables(tmp_path, "s", {"codes": frame(9)}, "pos3")
    rundir.write_tables(tmp_path, "s", {"codes": frame(0)})
    for rank in (0, 1, 2):
        rundir.write_tables(tmp_path, "s", {"codes": frame(rank)}, "0", (rank, 3))
    assert names() == ["part-0~r0of3.parquet", "part-0~r1of3.parquet", "part-0~r2of3.parquet", "part-pos3.parquet"]
    rundir.write_tables(tmp_path, "s", {"codes": frame(5)}, "0", (0, 2))  # a new evaluation on 2 ranks
    assert names() == ["part-0~r0of2.parquet", "part-pos3.parquet"]
    assert rundir.has_part(tmp_path, "codes", "s", "0") and not rundir.has_part(tmp_path, "codes", "s", "pos1")
    rundir.write_tables(tmp_path, "s", {"codes": frame(7)})
    assert names() == ["part-0.parquet", "part-pos3.parquet"]
    assert sorted(rundir.read_table(tmp_path, "codes")["seq"].to_list()) == [7, 9]

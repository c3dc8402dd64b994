"""Object storage: stores, runs and bundles on an S3-compatible server (moto's, started here on 127.0.0.1).

The pipeline runs twice, once on S3 and once on local disk, and the results must agree: the stores chunk by
chunk, the SAE weights byte for byte, the records row for row. Then: a harvest SIGKILLed while writing to S3
resumes to the uninterrupted store's exact chunks; a run on S3 resumes on a fresh machine (an empty cache)
from what was committed; damaged objects are one-line errors naming them; two writers with their own caches
commit into one run; and bad URLs fail in seconds, in one line naming the URL.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import zarr
from click.testing import CliRunner

pytest.importorskip("s3fs", reason="object-storage tests need s3fs (pip install 'actstore[s3]')")
pytest.importorskip("moto.server", reason="object-storage tests need moto's server (pip install 'moto[server]')")

from actstore import objstore  # noqa: E402
from actstore import run as rundir  # noqa: E402
from actstore.cli.main import main  # noqa: E402
from actstore.errors import StoreError  # noqa: E402
from actstore.model import load_model  # noqa: E402
from actstore.run import SAESpec  # noqa: E402
from actstore.steps import bundle  # noqa: E402
from actstore.steps.evaluate import EvalOptions, evaluate  # noqa: E402
from actstore.steps.harvest import HarvestOptions, harvest  # noqa: E402
from actstore.steps.train import TrainOptions, train  # noqa: E402

BUCKET = "actstore-test"
HOOK = "blocks.1.hook_resid_post"
TRAIN = HarvestOptions(hooks=(HOOK,), seq_len=32, tokens=24 * 32, batch_size=8, split="train")
EVAL = HarvestOptions(hooks=(HOOK,), seq_len=32, tokens=8 * 32, batch_size=8, split="eval")
SPECS = [SAESpec(HOOK, 4, 2, 1_500, 0)]
TRAIN_OPTS = TrainOptions(batch_size=250)
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, the AWS environment pointing at it, one bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    try:
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    except OSError as exc:
        pytest.skip(f"cannot open a port on 127.0.0.1 for moto's S3 server ({exc})")
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "ACTSTORE_CACHE": str(tmp_path_factory.mktemp("cache")),
    }
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield SimpleNamespace(endpoint=endpoint, env=env, client=client, url=f"s3://{BUCKET}")
    mp.undo()
    server.stop()


@pytest.fixture(scope="module")
def both(s3, tmp_path_factory):
    """harvest → train → eval on S3 and on local disk, same options."""
    local = tmp_path_factory.mktemp("local")
    out = {"model": load_model("tiny", "cpu", "float32")}
    for where, base in (("s3", f"{s3.url}/pipe"), ("local", str(local))):
        harvest(f"{base}/train.zarr", TRAIN, loaded=out["model"])
        harvest(f"{base}/eval.zarr", EVAL, loaded=out["model"])
        train(f"{base}/train.zarr", f"{base}/run", SPECS, TRAIN_OPTS)
        evaluate(f"{base}/eval.zarr", f"{base}/run", options=EvalOptions(batch_size=8), loaded=out["model"])
        out[where] = base
    return SimpleNamespace(**out)


def _objects(s3, prefix: str) -> dict[str, bytes]:
    keys = []
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return {k[len(prefix) :].lstrip("/"): s3.client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def _chunks_equal(s3, url: str, local: str) -> int:
    """Every chunk object of the store at URL equals the local store's file of the same key; how many."""
    prefix = url[len(f"s3://{BUCKET}/") :]
    remote = {k: v for k, v in _objects(s3, prefix).items() if "/c/" in k or k.startswith("c/")}
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in Path(local).rglob("*") if p.is_file()}
    files = {k: v for k, v in files.items() if "/c/" in k or k.startswith("c/")}
    assert remote.keys() == files.keys()
    for key in remote:
        assert remote[key] == files[key], key
    return len(remote)


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output  # stdout and stderr, as a terminal shows them


def test_stores_on_s3_are_the_local_stores_chunk_by_chunk(s3, both):
    assert _chunks_equal(s3, f"{both.s3}/train.zarr", f"{both.local}/train.zarr") >= 6
    g = zarr.open_group(f"{both.s3}/eval.zarr", mode="r")
    assert f"recon/{SPECS[0].sae_id}/{HOOK}" in g  # eval's reconstructions went into the eval store on S3
    assert _chunks_equal(s3, f"{both.s3}/eval.zarr", f"{both.local}/eval.zarr") >= 3


def test_a_run_on_s3_is_committed_through_the_log_and_equals_the_local_run(s3, both):
    prefix = f"pipe/run/{objstore.COMMITS}/"
    commits = sorted(k for k in _objects(s3, prefix))
    assert commits and all(len(c) == len("00000000000000000001.json") for c in commits)
    view = objstore.run_view(f"{both.s3}/run")
    sae = rundir.sae_dir(view, SPECS[0].sae_id) / "sae_weights.safetensors"
    assert sae.read_bytes() == (rundir.sae_dir(both.local + "/run", SPECS[0].sae_id) / sae.name).read_bytes()
    drop = ["store", "path", "train_seconds"]  # where the stores are, and timing, differ by design
    for table in ("tokens", "saes", "latents", "codes"):
        a = rundir.read_table(view, table).drop(drop, strict=False).sort(pl.all())
        b = rundir.read_table(both.local + "/run", table).drop(drop, strict=False).sort(pl.all())
        assert a.height > 0 and a.equals(b), table
    # no checkpoint, lock or staging name was committed
    state = objstore.RunSync(f"{both.s3}/run", "view").state["remote"]
    assert not [p for p in state if p.startswith("checkpoints/") or p.endswith((".partial", ".old", ".writer.lock"))]


def test_sql_report_and_bundle_round_trip_on_s3(s3, both, tmp_path):
    code, out = _cli("sql", f"{both.s3}/run", "SELECT count(*) AS n FROM tokens", "--format", "csv")
    assert code == 0, out
    code_l, out_l = _cli("sql", f"{both.local}/run", "SELECT count(*) AS n FROM tokens", "--format", "csv")
    assert out.split() == out_l.split() and int(out.split()[-1]) == 8 * 32
    code, out = _cli("sql", f"{both.s3}/run", "--query", "summary", "--format", "csv")
    assert code == 0, out
    code, out = _cli("bundle", "create", f"{both.s3}/run", f"{s3.url}/pipe/b.tar", "--with-saes", "--with-recon")
    assert code == 0 and f"{s3.url}/pipe/b.tar" in out, out
    names = bundle.listing(f"{s3.url}/pipe/b.tar")
    assert f"saes/{SPECS[0].sae_id}/sae_weights.safetensors" in names
    assert any(n.startswith(f"recon.zarr/recon/{SPECS[0].sae_id}/") for n in names), sorted(names)
    code, out = _cli("bundle", "verify", f"{s3.url}/pipe/b.tar")
    assert code == 0 and out.startswith("ok:"), out
    code, out = _cli("sql", f"{s3.url}/pipe/b.tar", "SELECT count(*) AS n FROM tokens", "--format", "csv")
    assert code == 0 and int(out.split()[-1]) == 8 * 32, out
    code, out = _cli("bundle", "create", f"{both.s3}/run", f"{s3.url}/pipe/b.tar")
    assert code == 2 and "already exists" in out
    code, out = _cli("report", f"{both.s3}/run", "--out", str(tmp_path / "rep"), "--quiet")
    assert code == 0 and (tmp_path / "rep" / "report.html").is_file(), out


def _fresh_cache(monkeypatch, tmp_path) -> None:
    """A machine that never saw the run: its own empty cache."""
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "fresh-cache"))


def _flip(s3, key: str) -> None:
    body = bytearray(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))


def test_a_damaged_records_object_is_a_one_line_error_naming_it(s3, both, monkeypatch, tmp_path):
    # a copy of the run, so the other tests keep an intact one
    sync = objstore.RunSync(f"{both.s3}/run", "view")
    sync.replay()
    part = next(p for p in sync.state["remote"] if p.startswith("records/tokens/"))
    sha = sync.state["remote"][part][0]
    key = f"pipe/run/{objstore.OBJECTS}/{sha[:2]}/{sha}"
    original = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    _flip(s3, key)
    try:
        _fresh_cache(monkeypatch, tmp_path)
        code, out = _cli("sql", f"{both.s3}/run", "SELECT count(*) FROM tokens")
        assert code == 1, out
        line = out.strip()
        assert "\n" not in line and sha in line and part in line and "damaged" in line, line
        with pytest.raises(StoreError, match="damaged"):
            objstore.run_view(f"{both.s3}/run")
    finally:
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=original)


def test_a_damaged_bundle_object_fails_verify(s3, both, tmp_path, monkeypatch):
    code, out = _cli("bundle", "create", f"{both.s3}/run", f"{s3.url}/pipe/dmg.zip")
    assert code == 0, out
    _flip(s3, "pipe/dmg.zip")
    code, out = _cli("bundle", "verify", f"{s3.url}/pipe/dmg.zip")
    assert code == 1 and f"{s3.url}/pipe/dmg.zip" in out, out


def test_a_damaged_sae_weights_object_is_caught_on_a_fresh_machine(s3, both, monkeypatch, tmp_path):
    sync = objstore.RunSync(f"{both.s3}/run", "view")
    sync.replay()
    rel = f"saes/{SPECS[0].sae_id}/sae_weights.safetensors"
    sha = sync.state["remote"][rel][0]
    key = f"pipe/run/{objstore.OBJECTS}/{sha[:2]}/{sha}"
    original = s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    _flip(s3, key)
    try:
        _fresh_cache(monkeypatch, tmp_path)
        with pytest.raises(StoreError) as err:
            evaluate(f"{both.s3}/eval.zarr", f"{both.s3}/run", options=EvalOptions(batch_size=8))
        assert rel in str(err.value) and "\n" not in str(err.value)
    finally:
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=original)


_HARVEST = """
import sys
from actstore.steps.harvest import HarvestOptions, harvest
harvest(sys.argv[1], HarvestOptions(hooks=("blocks.1.hook_resid_post",), seq_len=32, tokens=48 * 32, batch_size=4, split="train"))
"""
KILLED = HarvestOptions(hooks=(HOOK,), seq_len=32, tokens=48 * 32, batch_size=4, split="train")


def test_a_harvest_killed_while_writing_to_s3_resumes_to_the_same_chunks(s3, both, tmp_path):
    url = f"{s3.url}/kill/store.zarr"
    env = {**os.environ, **s3.env}
    proc = subprocess.Popen([sys.executable, "-c", _HARVEST, url], env=env, cwd=ROOT)
    killed_at = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            attrs = objstore.store_settings(url) or {}
            n = attrs.get("commit", {}).get("n_seq", 0)
            if n >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = n
                break
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert killed_at is not None and killed_at < 48, "the harvest finished before the kill: nothing was shown"
    harvest(url, KILLED, loaded=both.model)  # the same command again resumes
    local = str(tmp_path / "whole.zarr")
    harvest(local, KILLED, loaded=both.model)
    assert objstore.store_settings(url)["commit"]["n_seq"] == 48
    assert _chunks_equal(s3, url, local) >= 2 * 48 // 4  # tokens and acts (and any per-chunk flags)


def test_a_run_on_s3_resumes_on_a_fresh_machine_from_what_was_committed(s3, both, monkeypatch, tmp_path):
    """Train two SAEs, lose the second and the cache (a machine gone): a new machine trains only what
    the log lacks, and its SAE equals the uninterrupted one."""
    url = f"{s3.url}/resume/run"
    specs = [*SPECS, SAESpec(HOOK, 8, 2, 1_500, 0)]
    train(f"{both.s3}/train.zarr", url, specs[:1], TRAIN_OPTS)  # "killed" after the first SAE was committed
    _fresh_cache(monkeypatch, tmp_path)
    (done, more) = train(f"{both.s3}/train.zarr", url, specs, TRAIN_OPTS)
    view = objstore.run_view(url)
    whole = tmp_path / "whole"
    train(f"{both.local}/train.zarr", str(whole), specs, TRAIN_OPTS)
    for spec in specs:
        got = rundir.sae_dir(view, spec.sae_id) / "sae_weights.safetensors"
        assert got.read_bytes() == (rundir.sae_dir(whole, spec.sae_id) / got.name).read_bytes()


def test_two_writers_with_their_own_caches_commit_into_one_run(s3, monkeypatch, tmp_path):
    url = f"{s3.url}/writers/run"
    for name in ("a", "b"):
        monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / name))
        with objstore.run_copy(url, f"writer {name}") as local:
            (local / "records" / "x").mkdir(parents=True, exist_ok=True)
            (local / "records" / "x" / f"{name}.txt").write_text(name)
    monkeypatch.setenv("ACTSTORE_CACHE", str(tmp_path / "reader"))
    view = objstore.run_view(url)
    assert sorted(p.name for p in (view / "records" / "x").iterdir()) == ["a.txt", "b.txt"]
    commits = json.loads(
        s3.client.get_object(Bucket=BUCKET, Key=f"writers/run/{objstore.COMMITS}/{2:020d}.json")["Body"].read()
    )
    assert list(commits["add"]) == ["records/x/b.txt"]
    # the server refuses a second claim of a taken name (conditional PUT), so a lost race retries
    s3.client.put_object(Bucket=BUCKET, Key="writers/taken.json", Body=b"first")
    sync = objstore.RunSync(url, "work")
    assert not objstore._put_if_absent(sync.fs, f"{BUCKET}/writers/taken.json", b"second")
    assert s3.client.get_object(Bucket=BUCKET, Key="writers/taken.json")["Body"].read() == b"first"


def _bad(env: dict, *args: str) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "actstore.cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stderr.strip(), time.perf_counter() - t0


def test_no_credentials_fails_fast_naming_the_url(s3, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3.endpoint, AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))  # fmt: skip
    url = f"{s3.url}/nocreds.zarr"
    code, err, seconds = _bad(env, "harvest", url, "--tokens", "256", "--seq-len", "32", "--quiet")
    assert code == 2 and err.count("\n") == 0 and url in err and "credentials" in err, err
    assert seconds < 30


def test_an_unreachable_endpoint_fails_in_seconds_naming_the_url(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    url = f"{s3.url}/any.zarr"
    t0 = time.perf_counter()
    code, out = _cli("info", url)
    seconds = time.perf_counter() - t0
    assert code == 1 and out.strip().count("\n") == 0 and url in out and "127.0.0.1:9" in out, out
    assert seconds < 20, seconds


def test_a_bucket_that_does_not_exist_is_one_line(s3):
    for args in (["info", "s3://no-such-bucket/x.zarr"], ["sql", "s3://no-such-bucket/run", "SELECT 1"]):
        code, out = _cli(*args)
        assert code == 2 and "no-such-bucket" in out and "does not exist" in out and out.strip().count("\n") == 0, out


def test_overwrite_onto_a_store_url_is_refused(s3, both):
    code, out = _cli("harvest", f"{both.s3}/train.zarr", "--tokens", "512", "--overwrite", "--quiet")
    assert code == 2 and "--overwrite" in out and "rename" in out, out


def _torchrun(s3, *args: str) -> None:
    """`actstore ARGS` under torchrun with 2 gloo ranks, one thread each, against the test's S3 server."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python", "--"]
    done = subprocess.run(
        [*cmd, str(bin_dir / "actstore"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_harvest_train_and_eval_on_s3_as_one_process_does(s3, both, tmp_path):
    """Under torchrun each rank works on its own copy of a run URL: SAEs dealt to ranks commit into one run
    through the log, and eval's rows meet on rank 0 (no shared directory): equal to one process on disk."""
    base = f"{s3.url}/dist"
    harvest_args = ["--hooks", HOOK, "--seq-len", "32", "--tokens", str(24 * 32), "--batch-size", "8"]
    _torchrun(s3, "harvest", f"{base}/train.zarr", *harvest_args, "--split", "train", "--quiet")
    assert _chunks_equal(s3, f"{base}/train.zarr", f"{both.local}/train.zarr") > 0
    sweep = ["--hooks", HOOK, "--k", "4,8", "--expansion", "2", "--tokens", "1500", "--batch-size", "250"]
    _torchrun(s3, "train", f"{base}/train.zarr", "--out", f"{base}/run", *sweep, "--quiet")
    local = tmp_path / "run"
    specs = [SAESpec(HOOK, k, 2, 1_500, 0) for k in (4, 8)]
    train(f"{both.local}/train.zarr", str(local), specs, TRAIN_OPTS)
    eval_args = ["--hooks", HOOK, "--seq-len", "32", "--tokens", str(8 * 32), "--batch-size", "4", "--split", "eval"]
    _torchrun(s3, "harvest", f"{base}/eval.zarr", *eval_args, "--quiet")  # chunks of 4: 2 units for 2 ranks
    _torchrun(s3, "eval", f"{base}/eval.zarr", "--run", f"{base}/run", "--batch-size", "4", "--quiet")
    local_eval = str(tmp_path / "eval.zarr")
    harvest(local_eval, HarvestOptions(hooks=(HOOK,), seq_len=32, tokens=8 * 32, batch_size=4, split="eval"))
    evaluate(local_eval, str(local), options=EvalOptions(batch_size=4), loaded=both.model)
    view = objstore.run_view(f"{base}/run")
    for spec in specs:
        name = "sae_weights.safetensors"
        assert (rundir.sae_dir(view, spec.sae_id) / name).read_bytes() == (
            local / "saes" / spec.sae_id / name
        ).read_bytes()
    assert not any("~r" in p.name for p in Path(view).rglob("*.parquet"))  # rank 0 wrote whole parts
    drop = ["store", "path", "train_seconds", "created"]
    for table in ("tokens", "codes", "latents", "evals"):
        a = rundir.read_table(view, table).drop(drop, strict=False).sort(pl.all())
        b = rundir.read_table(local, table).drop(drop, strict=False).sort(pl.all())
        assert a.height > 0 and a.equals(b), table

"""Past one process: harvest, train and eval under torchrun against one process; stores on S3 against disk.

    python bench/scale.py [--quick] [--skip-torchrun] [--skip-s3]

Everything goes through the `actstore` CLI in subprocesses, launched as a user launches it, on the shipped
tiny model (6 layers, d = 128):
  1. processes. Each step in three layouts, torch's threads set through OMP_NUM_THREADS (harvest's writer
     thread and train's loader thread run beside them in every layout, so even 1p×1t uses a second core):
       1p×1t  one process, one thread (the baseline the 2-process layout is compared with),
       1p×2t  one process, two threads (the second baseline: what one process makes of both cores),
       2p×1t  `torchrun --standalone --nproc-per-node 2`, one thread per process.
     harvest: 3 hooks, batches of 32 × 128 tokens (ranks write whole batches of one store);
     train:   4 SAEs at blocks.3 (k = 32, 8× expansion, seeds 0-3: equal cost, so they split evenly over 2
              ranks); throughput is SAE-tokens/s (4 × the budget over the wall time);
     eval:    those 4 SAEs on the harvested store's first sequences (sequences split across ranks).
     Each layout runs every step twice, small and large; the rate is (large − small tokens) / (large − small
     seconds): the steady rate, with startup (imports, loading the model, torchrun's rendezvous) taken out.
     The end-to-end rate of the large run is printed beside it.
  2. object storage. A local S3 server (moto's ThreadedMotoServer on 127.0.0.1, in a process of its own,
     keeping objects in memory) against local disk (the page cache): harvest into s3://bench/… in the same
     layout and sizes as a local harvest of part 1 (MB/s of float16 activations before the codec); then
     both stores read back: every chunk with plain zarr, and one hook through train's loader (MB/s decoded).
     Moto is a protocol stand-in, not a model of S3's bandwidth: the ratios are the cost of the object
     path (HTTP requests, a Python server) on one machine.
  3. codecs. Bytes per token per hook of the tiny model's real activations for each stored dtype (float32,
     bfloat16, float16) × lossless codec (none, lz4, zstd): harvested once in float32, cast as harvest casts,
     written with the store's own codec chain, chunk after chunk in one thread as harvest's writer writes
     them (MB/s of that thread): the inputs of the README's cost model.
`--quick` (a smoke test, about 2 minutes: 11 commands of about 10 s of startup each): small sizes, no 1p×2t
layout, one run per step (end-to-end rates, startup included). Other processes running meanwhile skew
every rate; the script prints how many cores they kept busy. The last line is one JSON object of the
headline figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zarr

from actstore import store as st
from actstore.loader import ActivationLoader, LoaderOptions

BIN = Path(sys.executable).parent
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post")
SAE_HOOK = "blocks.3.hook_resid_post"
D_MODEL = 128  # the tiny model's width
SEQ_LEN = 128
N_SAES = 4
LAYOUTS = {"1p1t": (1, 1), "1p2t": (1, 2), "2p1t": (2, 1)}  # name: (processes, torch threads per process)
DTYPES = ("float32", "bfloat16", "float16")
CODECS = ("none", "lz4", "zstd")
BUCKET = "bench"


class Run(NamedTuple):
    """One CLI command: wall seconds, CPU seconds of all its processes, CPU seconds other processes of the
    machine took meanwhile (None off Linux), and its error (None if it worked)."""

    seconds: float
    cpu: float
    others: float | None
    error: str | None


def launch(args: list[str], procs: int, threads: int, env: dict[str, str] | None = None) -> Run:
    """One CLI command in `procs` processes of `threads` torch threads each."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(env or {})}
    cmd = [str(BIN / "actstore"), *args, "--quiet"]
    if procs > 1:
        # `--` ends torchrun's own options: its parser takes eval's `--run` for an abbreviation of `--run-path`.
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={procs}", "--no-python", "--", *cmd]
    before, busy = own_cpu_seconds(), busy_seconds()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=1200)
    dt = time.perf_counter() - t0
    cpu, busy_after = own_cpu_seconds() - before, busy_seconds()
    others = None if busy is None or busy_after is None else max(0.0, busy_after - busy - cpu)
    if p.returncode == 0:
        return Run(dt, cpu, others, None)
    lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.lower().startswith(("error:", "usage:", "torchrun: error"))]  # one-line errors
    return Run(dt, cpu, others, (ours[:1] or lines[-1:] or ["(no output)"])[0][:300] + f" (exit {p.returncode})")


def harvest_args(out: str, tokens: int) -> list[str]:
    return ["harvest", out, "--model", "tiny", "--hooks", ",".join(HOOKS), "--split", "train"] + [
        "--seq-len", str(SEQ_LEN), "--tokens", str(tokens), "--batch-size", "32"
    ]  # fmt: skip


def train_args(store: str, run: str, budget: int) -> list[str]:
    return ["train", store, "--out", run, "--hooks", SAE_HOOK, "--k", "32", "--expansion", "8"] + [
        "--seeds", ",".join(map(str, range(N_SAES))), "--tokens", str(budget), "--checkpoint-seconds", "1e9"
    ]  # fmt: skip


def eval_args(store: str, run: str, seqs: int) -> list[str]:
    return ["eval", store, "--run", run, "--max-seqs", str(seqs), "--batch-size", "16"]


def measure(
    layouts: list[str], sizes: list[int], units: int, command: Callable[[str, int], list[str]], env=None
) -> dict[str, dict]:
    """One step in every layout, {layout: figures}: the steady rate (large − small run: startup cancels) and
    the large run's end-to-end rate, in tokens/s (`units` tokens per size unit); cores = CPU seconds per
    wall second of the steady part; others = cores other processes of the machine kept busy meanwhile.
    The layouts take turns at each size, so a slow spell of the machine hits them alike."""
    runs: dict[str, list[Run]] = {layout: [] for layout in layouts}
    for n in sizes:
        for layout in layouts:
            if not runs[layout] or not runs[layout][-1].error:
                runs[layout].append(launch(command(layout, n), *LAYOUTS[layout], env))
    out = {}
    tokens = [n * units for n in sizes]
    for layout, rs in runs.items():
        seconds = [round(r.seconds, 1) for r in rs]
        others = None if any(r.others is None for r in rs) else sum(r.others for r in rs) / sum(seconds)
        fig = {"rate": None, "e2e": None, "cores": None, "others": others, "seconds": seconds, "error": rs[-1].error}
        out[layout] = fig
        if fig["error"]:
            continue
        fig["e2e"] = tokens[-1] / rs[-1].seconds
        if len(rs) == 1:
            fig["rate"], fig["cores"] = fig["e2e"], rs[0].cpu / rs[0].seconds
        elif rs[1].seconds - rs[0].seconds < 0.25 * rs[1].seconds:  # the difference is startup noise
            fig["error"] = f"the large run ({seconds[1]} s) barely outlasted the small one ({seconds[0]} s)"
        else:
            dt = rs[1].seconds - rs[0].seconds
            fig["rate"], fig["cores"] = (tokens[1] - tokens[0]) / dt, (rs[1].cpu - rs[0].cpu) / dt
    return out


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of every command it has run."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (Linux /proc/stat), to tell how much others ran meanwhile."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # serve until the parent closes our stdin
server.stop()
"""


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    """A moto S3 server in its own process (its own interpreter lock), with a bucket; the env that reaches it."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", MOTO, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its request log
        text=True,
    )
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("moto's server did not start")
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    return server, env


def s3_options(env: dict[str, str]) -> dict[str, object]:
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "endpoint_url": env["AWS_ENDPOINT_URL"],
    }


def read_all(store: str, storage_options: dict | None = None) -> tuple[float, int]:
    """Seconds to read and decode every chunk of every array of a store with plain zarr, and the bytes decoded."""
    t0 = time.perf_counter()
    group = zarr.open_group(store, mode="r", storage_options=storage_options)
    n = 0
    for _, arr in group.arrays():
        n += arr[:].nbytes
    for _, sub in group.groups():
        for _, arr in sub.arrays():
            n += arr[:].nbytes
    return time.perf_counter() - t0, n


def loader_seconds(store: str, tokens: int) -> float:
    """Seconds for train's loader to deliver every token of one hook in batches of 4,096 (shuffled, float32)."""
    t0 = time.perf_counter()
    for _ in ActivationLoader(store, SAE_HOOK, tokens, LoaderOptions(batch_size=4096)):
        pass
    return time.perf_counter() - t0


@contextlib.contextmanager
def environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def processes(tmp: Path, layouts: list[str], sizes: dict[str, list[int]]) -> dict[str, dict[str, dict]]:
    """Part 1: every step in every layout, {step: {layout: rates}}."""
    out = {
        "harvest": measure(layouts, sizes["harvest"], 1, lambda lay, n: harvest_args(str(tmp / f"h-{lay}-{n}.zarr"), n))
    }
    # Train and eval read the first layout's store (the same bytes whichever layout harvested them); eval a
    # copy, as it writes its reconstructions into the store it evaluates.
    store = str(tmp / f"h-{layouts[0]}-{sizes['harvest'][-1]}.zarr")
    out["train"] = measure(
        layouts, sizes["train"], N_SAES, lambda lay, n: train_args(store, str(tmp / f"r-{lay}-{n}"), n)
    )
    trained = tmp / f"r-{layouts[0]}-{sizes['train'][-1]}"
    out["eval"] = {}
    if trained.exists():
        shutil.copytree(store, tmp / "eval.zarr")

        def evaluation(layout: str, n: int) -> list[str]:  # each eval on its own copy of the trained run
            run = tmp / f"e-{layout}-{n}"
            shutil.copytree(trained, run, ignore=shutil.ignore_patterns(".writer.lock"))
            return eval_args(str(tmp / "eval.zarr"), str(run), n)

        out["eval"] = measure(layouts, sizes["eval"], SEQ_LEN, evaluation)
    return out


def object_storage(tmp: Path, layout: str, sizes: list[int], local: dict) -> dict:
    """Part 2: harvest into moto's S3 in the layout and sizes of a local harvest of part 1; read both back."""
    import s3fs

    server, env = start_moto()
    try:
        fs = s3fs.S3FileSystem(**s3_options(env))
        fs.mkdir(BUCKET)
        remote = measure([layout], sizes, 1, lambda _, n: harvest_args(f"s3://{BUCKET}/h-{n}.zarr", n), env)[layout]
        if remote["error"]:
            return {"error": remote["error"]}
        mb_per_token = len(HOOKS) * D_MODEL * 2 / 1e6  # float16 activations, before the codec
        stores = {"local": str(tmp / f"h-{layout}-{sizes[-1]}.zarr"), "s3": f"s3://{BUCKET}/h-{sizes[-1]}.zarr"}
        options = {"local": None, "s3": s3_options(env)}
        reads: dict[str, list] = {"local": [], "s3": []}
        for _ in range(2):  # interleaved, best of two
            for where in reads:
                reads[where].append(read_all(stores[where], options[where]))
        best = {k: min(v) for k, v in reads.items()}
        loads: dict[str, list[float]] = {"local": [], "s3": []}
        with environment(env):  # the loader opens URLs with the AWS variables of this process
            for _ in range(2):
                for where in loads:
                    loads[where].append(loader_seconds(stores[where], sizes[-1]))
        loader_mb = sizes[-1] * D_MODEL * 2 / 1e6  # one hook's float16 activations
        return {
            "harvest_MBps_local": local["rate"] * mb_per_token if local.get("rate") else None,
            "harvest_MBps_s3": remote["rate"] * mb_per_token,
            "read_MBps_local": best["local"][1] / best["local"][0] / 1e6,
            "read_MBps_s3": best["s3"][1] / best["s3"][0] / 1e6,
            "stored_MB_local": st.bytes_on_disk(Path(stores["local"])) / 1e6,
            "stored_MB_s3": fs.du(stores["s3"].removeprefix("s3://")) / 1e6,
            "loader_MBps_local": loader_mb / min(loads["local"]),
            "loader_MBps_s3": loader_mb / min(loads["s3"]),
            "decoded_MB": best["local"][1] / 1e6,
            "error": None,
        }
    finally:
        server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def codecs(tmp: Path, tokens: int) -> dict[str, dict[str, float]]:
    """Part 3: bytes per token per hook for every stored dtype × lossless codec, on real activations, and
    the write speed of one writer thread (chunk after chunk, as harvest's writer writes them)."""
    src = str(tmp / "codecs-f32.zarr")
    run = launch(harvest_args(src, tokens) + ["--dtype", "float32", "--codec", "none"], 1, 2)
    if run.error:
        raise RuntimeError(f"the float32 harvest for the codec table failed: {run.error}")
    group = zarr.open_group(src, mode="r")
    acts = {h: group["acts"][h][:] for h in HOOKS}
    n_tokens = next(iter(acts.values())).shape[0] * SEQ_LEN
    out: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        # Cast as harvest casts (torch's round-to-nearest; bfloat16 kept as its uint16 bits).
        cast = {h: st.to_stored(torch.from_numpy(a), dtype) for h, a in acts.items()}
        itemsize = np.dtype(st.numpy_dtype(dtype)).itemsize
        raw = sum(a.nbytes for a in cast.values())
        for codec in CODECS:
            path = tmp / f"codec-{dtype}-{codec}.zarr"
            g = zarr.open_group(str(path), mode="w")
            filters, compressors = st.codec_chain(codec, dtype, itemsize)
            arrays = {
                h: g.create_array(
                    h, shape=a.shape, chunks=(32, *a.shape[1:]), dtype=a.dtype, filters=filters, compressors=compressors
                )
                for h, a in cast.items()
            }
            t0 = time.perf_counter()
            for s in range(0, len(acts[HOOKS[0]]), 32):
                for h, a in cast.items():
                    arrays[h][s : s + 32] = a[s : s + 32]
            dt = time.perf_counter() - t0
            size = st.bytes_on_disk(path)
            out[f"{dtype}_{codec}"] = {
                "bytes_per_token_per_hook": size / (n_tokens * len(HOOKS)),
                "bytes_per_value": size / (n_tokens * len(HOOKS) * D_MODEL),
                "ratio": raw / size,
                "write_MBps": raw / dt / 1e6,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about a minute: small sizes, one run per step")
    ap.add_argument("--skip-torchrun", action="store_true", help="no 2-process layout")
    ap.add_argument("--skip-s3", action="store_true", help="no object-storage part")
    args = ap.parse_args()
    t_start, busy_start = time.perf_counter(), busy_seconds()
    ours_start = own_cpu_seconds()
    if args.quick:
        layouts = ["1p1t", "2p1t"]
        sizes = {"harvest": [8192], "train": [8192], "eval": [64]}
        codec_tokens = 4096
    else:
        layouts = list(LAYOUTS)
        sizes = {"harvest": [8192, 262144], "train": [8192, 262144], "eval": [64, 256]}
        codec_tokens = 32768
    if args.skip_torchrun:
        layouts.remove("2p1t")
    s3_layout = "1p2t" if "1p2t" in layouts else "1p1t"

    tmp = Path(tempfile.mkdtemp(prefix="actstore-bench-scale-"))
    try:
        steps = processes(tmp, layouts, sizes)
        s3: dict = {}
        if not args.skip_s3:
            try:
                import moto.server  # noqa: F401
                import s3fs  # noqa: F401
            except ImportError as exc:
                s3 = {"error": f"{exc.name} is not installed (pip install s3fs 'moto[server]')"}
            else:
                s3 = object_storage(tmp, s3_layout, sizes["harvest"], steps["harvest"][s3_layout])
        table = codecs(tmp, codec_tokens)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t_start
    busy_end, ours = busy_seconds(), own_cpu_seconds() - ours_start
    others = None if busy_start is None or busy_end is None else (busy_end - busy_start - ours) / wall

    kind = "end-to-end, startup included" if args.quick else "steady: (large − small tokens) / (large − small seconds)"
    print(
        f"tiny model (d = {D_MODEL}), {os.cpu_count()} CPUs, sizes {sizes}\nrate = {kind}; cores = our CPU s per "
        "wall s (steady part); others = cores other processes kept busy meanwhile (0 on an idle machine)\n"
        f"harvest: tokens/s, {len(HOOKS)} hooks; train: SAE-tokens/s, {N_SAES} SAEs (k = 32, 8x, 4 seeds); "
        f"eval: tokens/s, the {N_SAES} SAEs"
    )
    print(
        f"{'step':<9}{'layout':<7}{'seconds':>13}{'rate':>9}{'end-to-end':>12}{'cores':>7}{'others':>8}"
        f"{'vs 1p1t':>9}{'vs 1p2t':>9}"
    )
    ratios: dict[str, float | None] = {}
    headline: dict[str, object] = {}
    errors: dict[str, str] = {}
    for step, by in steps.items():
        for layout, r in by.items():
            secs = " / ".join(f"{t:.1f}" for t in r["seconds"])
            busy = f"{r['others']:>8.2f}" if r["others"] is not None else f"{'-':>8}"
            if r["error"]:
                errors[f"{step}_{layout}"] = r["error"]
                print(f"{step:<9}{layout:<7}{secs:>13}{'':>28}{busy}  failed: {r['error']}")
                continue
            vs = [r["rate"] / by[b]["rate"] if by.get(b, {}).get("rate") else float("nan") for b in ("1p1t", "1p2t")]
            print(
                f"{step:<9}{layout:<7}{secs:>13}{r['rate']:>9,.0f}{r['e2e']:>12,.0f}{r['cores']:>7.2f}{busy}"
                f"{vs[0]:>8.2f}x{vs[1]:>8.2f}x"
            )
            headline[f"{step}_tokens_per_s_{layout}"] = round(r["rate"])
            headline[f"{step}_cores_{layout}"] = round(r["cores"], 2)
            if r["others"] is not None:
                headline[f"{step}_others_{layout}"] = round(r["others"], 2)
        for base, key in (("1p1t", f"{step}_2proc_vs_1proc"), ("1p2t", f"{step}_2proc_vs_1proc_2threads")):
            two, one = by.get("2p1t", {}).get("rate"), by.get(base, {}).get("rate")
            ratios[key] = round(two / one, 2) if two and one else None
    if s3.get("error"):
        errors["s3"] = s3["error"]
        print(f"\nobject storage: failed: {s3['error']}")
    elif s3:
        print(
            f"\nobject storage ({s3_layout} harvest of {sizes['harvest'][-1]:,} tokens; moto on 127.0.0.1 vs local disk; "
            "MB/s of float16 activations before the codec):\n"
            f"  harvest {s3['harvest_MBps_local'] or float('nan'):>8.1f} MB/s local {s3['harvest_MBps_s3']:>8.1f} MB/s s3\n"
            f"  read    {s3['read_MBps_local']:>8.1f} MB/s local {s3['read_MBps_s3']:>8.1f} MB/s s3 "
            f"(zarr, every chunk: {s3['decoded_MB']:.0f} MB decoded from {s3['stored_MB_s3']:.0f} MB stored)\n"
            f"  loader  {s3['loader_MBps_local']:>8.1f} MB/s local {s3['loader_MBps_s3']:>8.1f} MB/s s3 "
            f"(train's loader, {SAE_HOOK}, batches of 4,096)"
        )
        if s3["harvest_MBps_local"]:
            ratios["s3_vs_local_harvest"] = round(s3["harvest_MBps_s3"] / s3["harvest_MBps_local"], 2)
        ratios["s3_vs_local_read"] = round(s3["read_MBps_s3"] / s3["read_MBps_local"], 2)
        ratios["s3_vs_local_loader"] = round(s3["loader_MBps_s3"] / s3["loader_MBps_local"], 2)
        headline |= {k: round(v, 1) for k, v in s3.items() if isinstance(v, float)}
    print(f"\ncodecs on the tiny model's activations ({codec_tokens:,} tokens × {len(HOOKS)} hooks, d = {D_MODEL}):")
    print(f"{'dtype':<10}{'codec':<7}{'B/token/hook':>14}{'B/value':>9}{'ratio':>8}{'write MB/s (1 thread)':>23}")
    for key, r in table.items():
        dtype, codec = key.split("_")
        print(
            f"{dtype:<10}{codec:<7}{r['bytes_per_token_per_hook']:>14.1f}{r['bytes_per_value']:>9.3f}"
            f"{r['ratio']:>7.2f}x{r['write_MBps']:>23.0f}"
        )
        headline[f"ratio_{key}"] = round(r["ratio"], 3)
        headline[f"write_MBps_{key}"] = round(r["write_MBps"])
    if others is not None:
        print(f"\nother processes kept {others:.2f} of {os.cpu_count()} cores busy meanwhile (0 on an idle machine)")
    others = round(others, 2) if others is not None else None
    print(json.dumps({**ratios, **headline, "errors": errors, "other_cores_busy": others, "seconds": round(wall)}))


if __name__ == "__main__":
    main()

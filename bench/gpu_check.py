"""One script that proves the CUDA path: equal to the CPU, repeatable, fast, and within memory; one JSON line.

    python bench/gpu_check.py [--device cuda] [--quick] [--keep DIR]

Run it on a GPU machine from a fresh clone after `make setup`: every input is shipped (the tiny model) or
generated here (random-weight models of Pythia-410M's and a tiny Gemma-2's shape), so it needs no network.
Each check compares the device with a reference computed in the same process:
  harvest   the tiny model's store harvested on the device equals the CPU's to float16 rounding, and two
            device runs are byte-identical (every chunk file);
  sae       FVU, AuxK and the gradients of W_enc, b_enc, W_dec and b_dec of the sparse kernels against a
            dense float64 autograd reference on the same selection, fp32 and bf16 encoder, d up to 2,304 × 16;
  eval      the per-token records on the device against the CPU's: CE and KL of the SAE's patch and of
            every baseline within 1e-4 relative (baselines are drawn per sequence, so draw for draw);
  patching  the path eval takes per architecture (GPT-NeoX: the shared suffix; Gemma-2 with its softcap:
            the shared suffix) and its largest gap to a full forward, relative to the largest logit.
Then throughput, each with the device's peak memory: harvest vs the bare forward stopped at the same
layer (Pythia-410M's shape, bf16), train tokens/s at d = 512 × 32 and 2,304 × 16 with k = 32 against
EleutherAI's sparsify on the same device (when installed: `make bench` installs it), the loader's tokens/s
against plain chunk reads, and eval against naive one-forward-per-patch.
`--device cpu --quick` runs every section at tiny shapes (the test suite does, so the script cannot rot);
on the CPU the device and the reference are the same machine, so only the float64 checks say much there.
Exit status 1 when a check fails; the last line is the JSON object either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore import store as st
from actstore.loader import ActivationLoader, LoaderOptions
from actstore.model import LoadedModel, capture, load_model, stop_layer
from actstore.patching import Patcher, agreement_tolerance
from actstore.run import SAESpec, read_table, trained_sae_dirs
from actstore.sae import AUXK_COEF, TopKSAE
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.steps.train import TrainOptions, train
from actstore.tables import PATCHES
from actstore.tiny import VOCAB_SIZE, random_gemma2, random_pythia
from actstore.trainee import Trainee

TINY_HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
GRADS = ("W_enc", "b_enc", "W_dec", "b_dec")
EVAL_REL_TOL = 1e-4  # the bound for CE and KL, device vs CPU
KL_FLOOR = 1e-5  # nats: below it a KL is rounding, and a relative bound means nothing
# float16 keeps 11 bits: an fp32 difference of 1e-6 can flip the last one (≤ 9.8e-4 relative); 4 of those
HARVEST_TOL = 4e-3
REPEATS = 2  # timings are the best of this many (1 with --quick: there they only show the code runs)
SAE_TOL = {"float32": 1e-4, "bfloat16": 3e-2}  # relative Frobenius error vs float64 (bf16: 2^-8 roundoff, compounded)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_mb(device: str) -> float | None:
    """The device's peak allocation since the last reset (None on the CPU, where torch keeps no such count)."""
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64: one number per tensor that rounding keeps small and a bug does not."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------- harvest


def _chunk_files(store: Path) -> dict[str, bytes]:
    """Every data file of a store (the zarr.json metadata holds timestamps, so it is left out)."""
    return {
        str(p.relative_to(store)): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    }


def _acts(store: Path, hook: str) -> np.ndarray:
    return st.acts_array(st.open_store(str(store)), hook, str(store))[:].astype(np.float32)


def check_harvest(tmp: Path, device: str, quick: bool) -> dict:
    opts = dict(
        model="tiny", hooks=TINY_HOOKS, seq_len=64, tokens=(16 if quick else 256) * 64, batch_size=8, split="train"
    )
    paths = {name: tmp / f"harvest-{name}.zarr" for name in ("cpu", "dev1", "dev2")}
    harvest(str(paths["cpu"]), HarvestOptions(**opts, device="cpu"))
    for name in ("dev1", "dev2"):
        harvest(str(paths[name]), HarvestOptions(**opts, device=device))
    identical = _chunk_files(paths["dev1"]) == _chunk_files(paths["dev2"])
    worst = 0.0
    for hook in TINY_HOOKS:
        ref, got = _acts(paths["cpu"], hook), _acts(paths["dev1"], hook)
        worst = max(worst, harvest_gap(got, ref, float(np.sqrt((ref**2).mean()))))
    return {"ok": identical and worst <= HARVEST_TOL, "device_runs_bit_identical": identical, "max_rel_vs_cpu": worst}


def harvest_gap(got: np.ndarray, ref: np.ndarray, rms: float) -> float:
    """The largest difference relative to the value (floored at 1e-3 of the RMS, for values near zero)."""
    return float((np.abs(got - ref) / (np.abs(ref) + 1e-3 * rms)).max())


# -------------------------------------------------------------------------------------------------- sae


def _sae_batch(sae: TopKSAE, n: int, seed: int) -> torch.Tensor:
    """Tokens built from k decoder directions each with weights in [2, 3]: the top k stand clear of the
    rest, so the fp32, bf16 and float64 selections agree and the comparison is of arithmetic, not ties."""
    gen = torch.Generator().manual_seed(seed)
    W = sae.W_dec.detach().float().cpu()
    idx = torch.stack([torch.randperm(sae.d_sae, generator=gen)[: sae.k] for _ in range(n)])
    coef = 2 + torch.rand(n, sae.k, generator=gen)
    x = torch.einsum("nk,nkd->nd", coef, W[idx]) + 0.05 * torch.randn(n, sae.d_in, generator=gen)
    return x.to(sae.W_dec.device)


def _reference_loss(params: dict[str, torch.Tensor], x: torch.Tensor, idx: torch.Tensor, dead: torch.Tensor):
    """FVU + AuxK written densely in float64 on the sparse path's selection; every dead latent is in AuxK's
    top k_aux (there are fewer dead latents than k_aux), so AuxK has no selection to disagree on."""
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in GRADS)
    pre = (x - b_dec) @ W_enc + b_enc
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    err = x - (z @ W_dec + b_dec)
    total_var = (x - x.mean(0)).pow(2).sum()
    d = dead.nonzero().squeeze(1)
    auxk = (pre[:, d].relu() @ W_dec[d] - err.detach()).pow(2).sum() / total_var
    fvu = err.pow(2).sum() / total_var
    return fvu, auxk


def _sae_case(d_in: int, expansion: int, k: int, n: int, low_precision: bool, device: str) -> dict:
    sae = TopKSAE(d_in, d_in * expansion, k, seed=1, device=device, low_precision=low_precision)
    with torch.no_grad():
        sae.b_dec.copy_(0.01 * torch.randn(d_in, generator=torch.Generator().manual_seed(2)).to(device))
    x = _sae_batch(sae, n, seed=3)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    dead[:: max(4, sae.d_sae // max(1, d_in // 4))] = True  # fewer than k_aux = d_in / 2 dead latents
    out = sae(x, dead)
    (out.fvu + AUXK_COEF * out.auxk_loss).backward()
    sync(device)
    params = {n_: getattr(sae, n_).detach().double().requires_grad_(True) for n_ in GRADS}
    xd = x.double()
    fvu, auxk = _reference_loss(params, xd, out.top_indices, dead)
    (fvu + AUXK_COEF * auxk).backward()
    pre64 = (xd - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    same_selection = float(
        (pre64.topk(k, dim=-1).indices.sort(-1).values == out.top_indices.sort(-1).values).all(-1).double().mean()
    )
    errs = {
        "fvu": abs(float(out.fvu.detach()) - float(fvu.detach())) / float(fvu.detach()),
        "auxk": abs(float(out.auxk_loss.detach()) - float(auxk.detach())) / float(auxk.detach()),
    }
    errs |= {f"grad_{n_}": rel(getattr(sae, n_).grad, params[n_].grad) for n_ in GRADS}
    tol = SAE_TOL["bfloat16" if low_precision else "float32"]
    worst = max(errs.values())
    # fp32 and float64 differ only in rounding, so their top k agree unless two latents tie; bf16's encoder
    # matmul moves pre-activations by ~2^-8 and may swap near the k-th (reported; the reference follows it)
    return {
        "ok": worst <= tol and (low_precision or same_selection >= 0.999),
        "max_rel": worst,
        "tol": tol,
        "same_selection": same_selection,
        **errs,
    }


def check_sae(device: str, quick: bool) -> dict:
    sizes = [(64, 4, 8, 256)] if quick else [(512, 32, 32, 2048), (2304, 16, 32, 1024)]
    cases = {}
    for d_in, expansion, k, n in sizes:
        for name, low in (("fp32", False), ("bf16", True)):
            cases[f"d{d_in}x{expansion}_{name}"] = _sae_case(d_in, expansion, k, n, low, device)
    return {"ok": all(c["ok"] for c in cases.values()), **cases}


# ------------------------------------------------------------------------------------------------- eval


def check_eval(tmp: Path, device: str, quick: bool) -> dict:
    store = tmp / "harvest-cpu.zarr"
    run = tmp / "eval-run"
    train(
        str(store), str(run), [SAESpec(TINY_HOOKS[1], 8, 2, 2048 if quick else 16384, 0)], TrainOptions(batch_size=256)
    )
    frames = {}
    for where in ("cpu", device):
        copy_run, copy_store = tmp / f"eval-run-{where}", tmp / f"eval-{where}.zarr"
        shutil.copytree(run, copy_run, dirs_exist_ok=True)
        shutil.copytree(store, copy_store, dirs_exist_ok=True)
        evaluate(str(copy_store), str(copy_run), options=EvalOptions(batch_size=8, device=where))
        frames[where] = read_table(copy_run, "tokens").sort(["sae_id", "seq", "pos"])
    ref, got = frames["cpu"], frames[device]
    worst: dict[str, float] = {}
    for patch in ("orig", *PATCHES):
        for metric in ("ce", "kl"):
            col = f"{metric}_{patch}"
            if col not in ref.columns:
                continue
            a, b = got[col].to_numpy().astype(np.float64), ref[col].to_numpy().astype(np.float64)
            keep = ~np.isnan(b)
            worst[col] = float((np.abs(a[keep] - b[keep]) / np.maximum(np.abs(b[keep]), KL_FLOOR)).max())
    same_rows = ref.select(["seq", "pos", "token"]).equals(got.select(["seq", "pos", "token"]))
    return {
        "ok": same_rows and max(worst.values()) <= EVAL_REL_TOL,
        "rows": len(ref),
        "max_rel": max(worst.values()),
        **worst,
    }


# --------------------------------------------------------------------------------------------- patching


def _patch_path(model: LoadedModel, hook: str, device: str) -> dict:
    patcher = Patcher(model, hook)
    tokens = torch.randint(0, VOCAB_SIZE, (4, 32), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.inference_mode():
        x = capture(model, tokens, [hook])[hook]
        gap = float((patcher.logits(tokens, x).float() - model.bridge(tokens).float()).abs().max())
        scale = float(model.bridge(tokens).float().abs().max())
    tol = agreement_tolerance(next(model.bridge.parameters()).dtype)
    return {"path": patcher.path, "max_gap_rel": gap / scale, "tol": tol}


def check_patching(tmp: Path, device: str) -> dict:
    neox = _patch_path(load_model("tiny", device, "float32"), "blocks.3.hook_resid_post", device)
    random_gemma2(tmp / "gemma2", layers=4, width=64, window=8)  # softcap 5, logits far beyond it
    gemma = load_model(str(tmp / "gemma2"), device, "float32")
    gemma2 = _patch_path(gemma, "blocks.1.hook_resid_post", device)
    gemma2["softcap"] = gemma.bridge.cfg.output_logits_soft_cap
    ok = all(c["path"] == "suffix" and c["max_gap_rel"] <= c["tol"] for c in (neox, gemma2))
    return {"ok": ok, "neox": neox, "gemma2": gemma2}


# ------------------------------------------------------------------------------------------- throughput


def bench_harvest(tmp: Path, device: str, quick: bool) -> dict:
    """Harvest vs the bare forward stopped after the hooked layer, same model, batches and dtype."""
    name = "tiny" if quick else random_pythia(tmp / "pythia-410m", "pythia-410m")
    hook = "blocks.3.hook_resid_post" if quick else "blocks.12.hook_resid_post"
    dtype = "float32" if device == "cpu" else "bfloat16"
    seqs, seq_len, batch = (32, 64, 8) if quick else (512, 256, 64)
    model = load_model(name, device, dtype)
    out = tmp / "bench-harvest.zarr"

    def run_harvest() -> None:
        shutil.rmtree(out, ignore_errors=True)
        harvest(
            str(out),
            HarvestOptions(
                model=name,
                hooks=(hook,),
                seq_len=seq_len,
                tokens=seqs * seq_len,
                batch_size=batch,
                split="train",
                compute_dtype=dtype,
                device=device,
            ),
            loaded=model,
        )

    run_harvest()  # warm-up, and the batches for the bare forward
    tokens = torch.from_numpy(np.asarray(st.open_store(str(out))["tokens"][:]).astype(np.int64)).to(device)
    stop = stop_layer([hook])

    @torch.inference_mode()
    def bare() -> None:
        for i in range(0, len(tokens), batch):
            model.bridge(tokens[i : i + batch], stop_at_layer=stop)

    reset_peak(device)
    t_bare = min(timed(bare, device) for _ in range(REPEATS))
    bare_peak = peak_mb(device)
    reset_peak(device)
    t_harvest = min(timed(run_harvest, device) for _ in range(REPEATS))
    n = seqs * seq_len
    return {
        "model": "tiny" if quick else "pythia-410m shape",
        "tokens": n,
        "harvest_tokens_per_s": round(n / t_harvest),
        "bare_tokens_per_s": round(n / t_bare),
        "harvest_vs_bare": round(t_bare / t_harvest, 3),
        "peak_MB": peak_mb(device),
        "bare_peak_MB": bare_peak,
        "store": str(out),
        "hook": hook,
    }


def _sparsify_step(d: int, expansion: int, k: int, device: str) -> Callable[[torch.Tensor], None] | None:
    """bench/train.py's sparsify step (the same one its CPU comparison times), or None without sparsify."""
    try:
        import sparsify  # noqa: F401
    except ImportError:
        return None
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("train.py"))
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    return bench_train.sparsify_step(d, expansion, k, device)


def _steps_per_s(
    step: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], device: str
) -> tuple[float, float | None]:
    """Tokens/s of `step` over the batches after one warm-up step, and the device's peak memory."""
    reset_peak(device)
    step(batches[0])
    secs = timed(lambda: [step(b) for b in batches[1:]], device)
    return sum(len(b) for b in batches[1:]) / secs, peak_mb(device)


def bench_train(device: str, quick: bool) -> dict:
    sizes = [(128, 4, 8)] if quick else [(512, 32, 32), (2304, 16, 32)]
    batch, steps = (512, 3) if quick else (4096, 20)
    rows = {}
    for d, expansion, k in sizes:
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(batch, d, generator=gen).to(device) for _ in range(steps + 1)]
        spec, opts = SAESpec("bench", k, expansion, 10**12, 0), TrainOptions(batch_size=batch, device=device)
        ours, peak = _steps_per_s(Trainee(spec, d, opts, torch.zeros(d, device=device)).train_step, batches, device)
        row: dict[str, Any] = {"tokens_per_s": round(ours), "peak_MB": peak}
        step = _sparsify_step(d, expansion, k, device)
        if step is None:
            row["sparsify"] = "not installed (`make bench` installs eai-sparsify==1.3.3)"
        else:
            theirs, their_peak = _steps_per_s(step, batches, device)
            row |= {
                "sparsify_tokens_per_s": round(theirs),
                "vs_sparsify": round(ours / theirs, 2),
                "sparsify_peak_MB": their_peak,
            }
        rows[f"d{d}x{expansion}_k{k}"] = row
    return rows


def bench_loader(store: str, hook: str, device: str) -> dict:
    """The loader's tokens/s to the device against reading every chunk of the same store in order."""
    arr = st.acts_array(st.open_store(store), hook, store)
    n_tok = arr.shape[0] * arr.shape[1]

    def plain() -> None:
        for i in range(0, arr.shape[0], arr.chunks[0]):
            arr[i : i + arr.chunks[0]]

    def loader() -> None:
        for b in ActivationLoader(store, hook, n_tok, LoaderOptions(batch_size=4096), device=device):
            b.sum()  # touch it on the device

    reset_peak(device)
    t_loader = min(timed(loader, device) for _ in range(REPEATS))
    t_plain = min(timed(plain, device) for _ in range(REPEATS))
    return {
        "loader_tokens_per_s": round(n_tok / t_loader),
        "chunk_reads_tokens_per_s": round(n_tok / t_plain),
        "loader_vs_chunk_reads": round(t_plain / t_loader, 3),
        "peak_MB": peak_mb(device),
    }


def bench_eval(tmp: Path, store: str, hook: str, device: str, quick: bool) -> dict:
    """`actstore eval` end to end against one full forward per patch (and the clean one), same batches."""
    model_dir = "tiny" if quick else str(tmp / "pythia-410m")
    dtype = "float32" if device == "cpu" else "bfloat16"
    model = load_model(model_dir, device, dtype)
    run = tmp / "bench-eval-run"
    d = st.acts_array(st.open_store(store), hook, store).shape[-1]
    train(
        store,
        str(run),
        [SAESpec(hook, 8 if quick else 32, 2 if quick else 8, 2048 if quick else 262144, 0)],
        TrainOptions(batch_size=4096 if not quick else 256, device=device),
    )
    seqs = 64 if not quick else 16
    opts = EvalOptions(batch_size=16 if not quick else 8, device=device, compute_dtype=dtype, max_seqs=seqs)
    sae = TopKSAE.load(trained_sae_dirs(run)[0], device=device)
    tokens = torch.from_numpy(np.asarray(st.open_store(store)["tokens"][:seqs]).astype(np.int64)).to(device)

    @torch.inference_mode()
    def naive() -> None:
        for i in range(0, seqs, opts.batch_size):
            x_tok = tokens[i : i + opts.batch_size]
            clean = capture(model, x_tok, [hook])[hook]
            recon = sae(clean.float().reshape(-1, d)).recon.reshape(clean.shape).to(clean.dtype)
            torch.log_softmax(model.bridge(x_tok).float(), -1)
            for _ in PATCHES:
                logits = model.bridge.run_with_hooks(x_tok, fwd_hooks=[(hook, lambda a, hook: recon)])
                torch.log_softmax(logits.float(), -1)

    reset_peak(device)
    t_eval = min(timed(lambda: evaluate(store, str(run), options=opts, loaded=model), device) for _ in range(REPEATS))
    eval_peak = peak_mb(device)
    reset_peak(device)
    t_naive = min(timed(naive, device) for _ in range(REPEATS))
    return {
        "eval_vs_naive": round(t_naive / t_eval, 3),
        "eval_tokens_per_s": round(seqs * tokens.shape[1] / t_eval),
        "peak_MB": eval_peak,
        "naive_peak_MB": peak_mb(device),
    }


# ------------------------------------------------------------------------------------------------- main


def section(results: dict, name: str, fn: Callable[[], dict]) -> dict | None:
    """Run one section; a crash is that section's failure, not the script's, so the JSON still comes out."""
    t0 = time.perf_counter()
    print(f"[gpu_check] {name} …", file=sys.stderr, flush=True)
    try:
        out = fn()
    except Exception as exc:
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    results[name] = out
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes everywhere (what the tests run)")
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one, removed)")
    args = ap.parse_args()
    device = args.device
    global REPEATS
    REPEATS = 1 if args.quick else REPEATS
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="actstore-gpu-check-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "quick": args.quick,
    }
    try:
        section(results, "harvest", lambda: check_harvest(tmp, device, args.quick))
        section(results, "sae", lambda: check_sae(device, args.quick))
        section(results, "eval", lambda: check_eval(tmp, device, args.quick))
        section(results, "patching", lambda: check_patching(tmp, device))
        h = section(results, "harvest_speed", lambda: bench_harvest(tmp, device, args.quick))
        section(results, "train_speed", lambda: bench_train(device, args.quick))
        if h and "store" in h:
            store, hook = h.pop("store"), h.pop("hook")
            section(results, "loader_speed", lambda: bench_loader(store, hook, device))
            section(results, "eval_speed", lambda: bench_eval(tmp, store, hook, device, args.quick))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    results |= {"ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - t0)}
    print(json.dumps(results, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

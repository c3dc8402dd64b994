"""SAE training throughput: dense vs sparse decode, one shared sweep pass vs separate runs, vs sparsify.

    python bench/train.py [--d 512] [--expansion 32] [--k 32] [--batch-size 4096] [--steps 6]
                          [--sparsify-python /path/to/venv/bin/python]

All on the same activations (a store harvested here from a randomly initialised model of Pythia-70M's
shape, d = 512), each training step timed over the same in-memory batches after one warm-up step:
  1. one TopK SAE step with the dense decode (a dense latent matrix, autograd's backward);
  2. the same with actstore's sparse decode and sparse backward (fp32, then the encoder matmul in bf16);
  3. EleutherAI's sparsify (`eai-sparsify`, run in its own venv by `--sparsify-python` when given) doing
     the same step (forward, FVU + AuxK loss, backward, decoder-norm upkeep, clipping, Adam);
  4. a 4-SAE sweep (k = 16, 32, 64, 128) through `actstore.steps.train` end to end: one shared data pass
     versus four separate runs (wall time, and bytes read from the store).
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from actstore.loader import ActivationLoader, LoaderOptions
from actstore.run import SAESpec
from actstore.sae import dense_decode
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.steps.train import TrainOptions, sweep, train
from actstore.tiny import random_pythia
from actstore.trainee import Trainee

HOOK = "blocks.3.hook_resid_post"

SPARSIFY_STEP = r"""
import sys, time, numpy as np, torch
from sparsify import SparseCoder, SparseCoderConfig
x_all = torch.from_numpy(np.load(sys.argv[1])).float()
k, expansion, batch, steps = map(int, sys.argv[2:6])
sae = SparseCoder(x_all.shape[1], SparseCoderConfig(expansion_factor=expansion, k=k), device="cpu")
opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10)
dead = torch.zeros(sae.num_latents, dtype=torch.bool)
def step(i):
    x = x_all[i * batch:(i + 1) * batch]
    out = sae(x, dead_mask=dead)
    loss = out.fvu + out.auxk_loss / 32
    opt.zero_grad(); loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step(); sae.set_decoder_norm_to_unit_norm()
step(0)
t = time.perf_counter()
for i in range(1, steps + 1):
    step(i)
print(steps * batch / (time.perf_counter() - t))
"""


def step_tokens_per_s(batches: list, k: int, expansion: int, options: TrainOptions, dense: bool = False) -> float:
    """actstore's training step alone, like the sparsify loop below: warm-up, then timed steps."""
    import torch

    d = batches[0].shape[1]
    t = Trainee(SAESpec(HOOK, k, expansion, 10**12, 0), d, options, torch.zeros(d))
    if dense:
        t.sae.decode_rows = dense_decode
    t.train_step(batches[0])
    t0 = time.perf_counter()
    for b in batches[1:]:
        t.train_step(b)
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--sparsify-python", default=None, help="python of a venv with eai-sparsify installed")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="actstore-bench-train-"))
    try:
        B, steps = args.batch_size, args.steps
        n_tokens = B * (steps + 2)
        store = str(tmp / "acts.zarr")
        model_dir = random_pythia(tmp / "model")
        print(f"harvesting {n_tokens:,} tokens of a Pythia-70M-shaped model ({HOOK}) …", file=sys.stderr)
        harvest(store, HarvestOptions(model=model_dir, hooks=(HOOK,), seq_len=128, tokens=n_tokens, batch_size=32))
        budget = B * steps
        base = dict(batch_size=B, checkpoint_seconds=1e9, log_every=10**9)
        batches = list(ActivationLoader(store, HOOK, B * (steps + 1), LoaderOptions(batch_size=B)))
        rows = {}
        rows["dense decode (fp32)"] = step_tokens_per_s(
            batches, args.k, args.expansion, TrainOptions(**base), dense=True
        )
        rows["actstore sparse (fp32)"] = step_tokens_per_s(batches, args.k, args.expansion, TrainOptions(**base))
        rows["actstore sparse (bf16 encoder)"] = step_tokens_per_s(
            batches, args.k, args.expansion, TrainOptions(low_precision=True, **base)
        )

        ks = [16, 32, 64, 128]
        t0 = time.perf_counter()
        train(store, str(tmp / "shared"), sweep([HOOK], ks, [args.expansion], [budget], [0]), TrainOptions(**base))
        t_shared = time.perf_counter() - t0
        t0 = time.perf_counter()
        for k in ks:
            train(
                store, str(tmp / f"sep{k}"), sweep([HOOK], [k], [args.expansion], [budget], [0]), TrainOptions(**base)
            )
        t_separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in ActivationLoader(store, HOOK, budget, LoaderOptions(batch_size=B)):
            pass
        t_read = time.perf_counter() - t0

        sparsify_tps = None
        if args.sparsify_python:
            np.save(tmp / "x.npy", np.concatenate([b.numpy() for b in batches]))
            out = subprocess.run(
                [
                    args.sparsify_python,
                    "-c",
                    SPARSIFY_STEP,
                    str(tmp / "x.npy"),
                    str(args.k),
                    str(args.expansion),
                    str(B),
                    str(steps),
                ],
                capture_output=True,
                text=True,
            )
            if out.returncode == 0:
                sparsify_tps = float(out.stdout.strip().splitlines()[-1])
                rows["sparsify SparseCoder (fp32)"] = sparsify_tps
            else:
                print(f"sparsify run failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)

        d = 512
        print(f"d = {d}, {d * args.expansion:,} latents, k = {args.k}, batch {B}, {steps} steps, 2 CPU threads")
        print(f"{'training step (same batches)':<34}{'tokens/s':>10}{'vs dense':>10}")
        dense = rows["dense decode (fp32)"]
        for name, tps in rows.items():
            print(f"{name:<34}{tps:>10,.0f}{tps / dense:>9.2f}x")
        print(
            f"\n4-SAE sweep (k = {ks}, actstore.steps.train end to end): shared pass {t_shared:.1f} s, four separate "
            f"runs {t_separate:.1f} s ({t_separate / t_shared:.2f}x); the store is read once instead of 4 times "
            f"({budget * d * 2 / 1e6:.0f} MB, {t_read:.2f} s per pass here; the SAE steps dominate on a CPU)"
        )
        headline = {
            "sparse_vs_dense": round(rows["actstore sparse (fp32)"] / dense, 2),
            "sparse_bf16_vs_dense": round(rows["actstore sparse (bf16 encoder)"] / dense, 2),
            "sweep_shared_vs_separate": round(t_separate / t_shared, 2),
            "data_reads_saved": len(ks),
            "tokens_per_s_sparse": round(rows["actstore sparse (fp32)"]),
            "tokens_per_s_sparse_bf16": round(rows["actstore sparse (bf16 encoder)"]),
        }
        if sparsify_tps:
            headline["actstore_vs_sparsify"] = round(rows["actstore sparse (fp32)"] / sparsify_tps, 2)
            headline["actstore_bf16_vs_sparsify"] = round(rows["actstore sparse (bf16 encoder)"] / sparsify_tps, 2)
        print(json.dumps(headline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""SAE training: speed (dense vs sparse decode, shared sweep pass, vs sparsify) and quality (vs sparsify).

    python bench/train.py [--expansion 32] [--k 32] [--batch-size 4096] [--steps 6]
                          [--quality-budgets 1000000,4000000] [--quality-ks 8,32,64] [--skip-quality]

Needs EleutherAI's sparsify (`make bench` installs eai-sparsify==1.3.3).

Quality: on the tiny model's stores (blocks.3, 4M train tokens, 200k held-out eval tokens, 1,024 latents),
actstore's default recipe against sparsify's default recipe on the same batches in the same order, at
each budget and k: held-out FVU and dead fraction by one independent float64 numpy decode.

All on the same activations (a store harvested here from a randomly initialised model of Pythia-70M's
shape, d = 512), each training step timed over the same in-memory batches after one warm-up step:
  1. one TopK SAE step with the dense decode (a dense latent matrix, autograd's backward);
  2. the same with actstore's sparse decode and sparse backward (fp32, then the encoder matmul in bf16);
  3. EleutherAI's sparsify (`eai-sparsify`) doing the same step (forward, FVU + AuxK loss, backward,
     decoder-norm upkeep, clipping, Adam);
  4. a 4-SAE sweep (k = 16, 32, 64, 128) through `actstore.steps.train` end to end: one shared data pass
     versus four separate runs (wall time, and bytes read from the store).
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
        fvu = t.train_step(b)
    float(fvu)  # a step reads nothing back: on a GPU this waits for the queued steps to finish
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - t0)


QUALITY_HOOK = "blocks.3.hook_resid_post"


def heldout(W_enc: np.ndarray, b_enc: np.ndarray, W_dec: np.ndarray, b_dec: np.ndarray, k: int, x: np.ndarray):
    """(FVU, dead fraction) of a TopK SAE on held-out tokens, decoded in float64 numpy, independently of both tools."""
    W_enc, b_enc, W_dec, b_dec = (a.astype(np.float64) for a in (W_enc, b_enc, W_dec, b_dec))
    sse, fired = 0.0, np.zeros(W_dec.shape[0], bool)
    for s in range(0, len(x), 16384):
        xs = x[s : s + 16384]
        pre = np.maximum((xs - b_dec) @ W_enc + b_enc, 0)
        idx = np.argpartition(-pre, k, axis=1)[:, :k]
        vals = np.take_along_axis(pre, idx, 1)
        sse += float(((xs - np.einsum("nk,nkd->nd", vals, W_dec[idx]) - b_dec) ** 2).sum())
        fired[idx[vals > 0]] = True
    return sse / float(((x - x.mean(0)) ** 2).sum()), float(1 - fired.mean())


def sparsify_recipe(store: str, ks: list[int], expansion: int, budgets: list[int], x_eval: np.ndarray) -> dict:
    """sparsify 1.3.3's default recipe (its Trainer's, step for step) on actstore's batches of the same store.

    SignSGD under schedule-free averaging (momentum 0.95) at lr 5e-3 / √(latents / 2¹⁴), b_dec at the first
    batch's mean, decoder rows renormalised before and the parallel gradient removed after each step, no AuxK
    (auxk_alpha = 0). Its saved weights are the schedule-free average (`optimizer.eval()`), evaluated here the
    same way at every budget of one run (schedule-free has no schedule to lay over a budget), after the batch
    that reaches it: up to one batch (4,096 tokens, 0.4% of 1M) more than actstore's SAE of that budget saw.
    """
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    d = x_eval.shape[1]
    saes = {k: SparseCoder(d, SparseCoderConfig(expansion_factor=expansion, k=k), device="cpu") for k in ks}
    groups = [dict(params=sae.parameters(), lr=5e-3 / (sae.num_latents / 2**14) ** 0.5) for sae in saes.values()]
    opt = ScheduleFreeWrapper(SignSGD(groups), momentum=0.95)
    opt.train()
    out, seen = {}, 0
    for step, x in enumerate(ActivationLoader(store, QUALITY_HOOK, max(budgets), LoaderOptions(batch_size=4096))):
        for sae in saes.values():
            if step == 0:
                sae.b_dec.data = x.mean(0)
            sae.set_decoder_norm_to_unit_norm()
            sae(x).fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        seen += len(x)
        for budget in [b for b in budgets if seen - len(x) < b <= seen]:  # the batch that reaches the budget
            opt.eval()
            for k, sae in saes.items():
                w = [t.detach().numpy() for t in (sae.encoder.weight.T, sae.encoder.bias, sae.W_dec, sae.b_dec)]
                out[(k, budget)] = heldout(*w, k, x_eval)
            opt.train()
    return out


def actstore_recipe(
    store: str, run: str, ks: list[int], expansion: int, budgets: list[int], x_eval: np.ndarray
) -> dict:
    """actstore's default recipe: one `train` of the whole sweep, every SAE read back from its saved weights."""
    from safetensors.numpy import load_file

    specs = sweep([QUALITY_HOOK], ks, [expansion], budgets, [0])
    train(store, run, specs, TrainOptions(checkpoint_seconds=1e9))
    out = {}
    for spec in specs:
        w = load_file(f"{run}/saes/{spec.sae_id}/sae_weights.safetensors")
        out[(spec.k, spec.tokens)] = heldout(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], spec.k, x_eval)
    return out


def quality(tmp: Path, ks: list[int], budgets: list[int], expansion: int = 8) -> dict:
    """Held-out FVU and dead fraction of both recipes on the tiny model's stores, side by side."""
    from actstore import store as st

    train_store, eval_store = str(tmp / "q-train.zarr"), str(tmp / "q-eval.zarr")
    common = dict(model="tiny", hooks=(QUALITY_HOOK,), seq_len=128, batch_size=32)
    print(f"harvesting {max(budgets):,} + 200,000 tokens of the tiny model ({QUALITY_HOOK}) …", file=sys.stderr)
    harvest(train_store, HarvestOptions(split="train", tokens=max(budgets), **common))
    harvest(eval_store, HarvestOptions(split="eval", tokens=200_000, **common))
    x_eval = st.read_acts(st.open_store(eval_store), QUALITY_HOOK).reshape(-1, 128).astype(np.float64)
    print("training actstore's recipe …", file=sys.stderr)
    t0 = time.perf_counter()
    ours = actstore_recipe(train_store, str(tmp / "q-run"), ks, expansion, budgets, x_eval)
    t_ours = time.perf_counter() - t0
    print("training sparsify's recipe …", file=sys.stderr)
    t0 = time.perf_counter()
    theirs = sparsify_recipe(train_store, ks, expansion, budgets, x_eval)
    t_theirs = time.perf_counter() - t0
    print(f"\nheld-out FVU (dead fraction) on 200k eval tokens, tiny model {QUALITY_HOOK}, {128 * expansion} latents")
    print(f"{'budget':>8} {'k':>4} {'actstore':>16} {'sparsify 1.3.3':>16}")
    for t in budgets:
        for k in ks:
            (fa, da), (fb, db) = ours[(k, t)], theirs[(k, t)]
            print(f"{t:>8,} {k:>4} {fa:>8.4f} ({da:>5.1%}) {fb:>8.4f} ({db:>5.1%})")
    return {
        "quality": {
            f"{t // 1000}k_k{k}": {"actstore": ours[(k, t)], "sparsify": theirs[(k, t)]} for t in budgets for k in ks
        },
        "quality_seconds": {"actstore": round(t_ours), "sparsify": round(t_theirs)},
    }


def sparsify_step(d: int, expansion: int, k: int, device: str = "cpu"):
    """sparsify's SparseCoder doing the same step as ours (FVU + AuxK, backward, decoder upkeep, clip, Adam).

    Also used by bench/gpu_check.py, on the GPU."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(expansion_factor=expansion, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, eps=6.25e-10)
    dead = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> None:
        out = sae(x, dead_mask=dead)
        opt.zero_grad()
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def sparsify_step_tokens_per_s(batches: list, k: int, expansion: int) -> float:
    """Tokens/s of sparsify's step over the batches after one warm-up step."""
    step = sparsify_step(batches[0].shape[1], expansion, k)
    step(batches[0])
    t0 = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expansion", type=int, default=32)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quality-budgets", default="1000000,4000000", help="token budgets of the quality comparison")
    ap.add_argument("--quality-ks", default="8,32,64")
    ap.add_argument("--skip-quality", action="store_true", help="only the speed comparison")
    args = ap.parse_args()
    try:
        import sparsify  # noqa: F401  (installed by `make bench`)
    except ImportError:
        sys.exit(
            "bench/train.py compares with EleutherAI's sparsify: run `make bench` (it installs eai-sparsify==1.3.3)"
        )

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

        sparsify_tps = sparsify_step_tokens_per_s(batches, args.k, args.expansion)
        rows["sparsify SparseCoder (fp32)"] = sparsify_tps

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
        if not args.skip_quality:
            ks_q = [int(v) for v in args.quality_ks.split(",")]
            headline |= quality(tmp, ks_q, [int(float(v)) for v in args.quality_budgets.split(",")])
        if sparsify_tps:
            headline["actstore_vs_sparsify"] = round(rows["actstore sparse (fp32)"] / sparsify_tps, 2)
            headline["actstore_bf16_vs_sparsify"] = round(rows["actstore sparse (bf16 encoder)"] / sparsify_tps, 2)
        print(json.dumps(headline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

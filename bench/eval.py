"""Eval throughput against the naive cost and against the bare passes it needs; bytes of records.

    python bench/eval.py [--model pythia-70m-shape|tiny] [--seqs 16] [--seq-len 128] [--hook blocks.3.hook_resid_post]

One SAE at a mid-depth hook, on the same batches, in one process, for float32 and bfloat16 compute:
  (a) naive: one full forward per patch type (x̂, zero and each baseline of actstore.tables.BASELINES)
      plus the clean one, each patch through a hook;
  (b) bare: the passes eval needs — one prefix up to the hook, then the layers above it once for the
      clean activation and once per patch, up to the logits; nothing else (no log-softmax, CE, KL);
  (c) `actstore.steps.evaluate` end to end (metrics, records, reconstructions written);
  (s) the scoring alone on logits computed beforehand (clean P, each patch's CE and KL): the least eval
      does beyond (b), so (b) + (s) bounds (c) from below.
Goal: (c) ≥ 1.5× faster than (a) and within 1.15× of (b). Also the records' bytes per token per SAE.
Then `--eps-draws` (study 001's z-scores): N ε-random draws at one position of each of a few sequences,
  (d) naive: N single patches, each a full forward of the whole sequence through a hook, KL at P;
  (e) `actstore.draws.draw_batch`: the prefix 0…P only, the clean pass below the hook shared, P unembedded;
with the largest difference between their KLs (they compute the same numbers). Then `--sensitivity`:
  (f) eval with the gradient, m Hutchinson probes and one JVP per patch, against (c), float32.
The last line is one JSON object of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from actstore import store as st
from actstore.draws import draw_batch, draw_generator, eps_at
from actstore.model import capture, load_model
from actstore.patching import CleanDistribution, batches
from actstore.sae import TopKSAE
from actstore.saeio import load_eval_sae
from actstore.steps.evaluate import EvalOptions, Patcher, evaluate
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.tables import PATCHES
from actstore.tiny import random_pythia

GOAL_VS_NAIVE, GOAL_OVER_BARE = 1.5, 1.15  # eval ≥ 1.5× faster than naive, within 1.15× of its bare passes
N_PATCHES = len(PATCHES)  # x̂, zero and every baseline: what eval patches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pythia-70m-shape")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hook", default="blocks.3.hook_resid_post")
    ap.add_argument("--draws", type=int, default=500, help="ε-random draws per sequence (study 001: 500)")
    ap.add_argument("--draw-pos", type=int, default=48, help="the patched position (study 001: 48)")
    ap.add_argument("--draw-seqs", type=int, default=2, help="sequences the draws run on")
    ap.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch (--sensitivity)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (naive, bare, eval); medians")
    ap.add_argument("--ratios-only", action="store_true", help="skip the --sensitivity and --eps-draws parts")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="actstore-bench-eval-"))
    try:
        name = random_pythia(tmp / "model") if args.model == "pythia-70m-shape" else args.model
        store = str(tmp / "eval.zarr")
        harvest(
            store,
            HarvestOptions(
                model=name,
                hooks=(args.hook,),
                seq_len=args.seq_len,
                tokens=args.seqs * args.seq_len,
                batch_size=args.batch_size,
            ),
        )
        g = st.open_store(store)
        d = int(g["acts"][args.hook].shape[2])
        sae_dir = tmp / "run" / "saes" / "bench-sae"
        TopKSAE(d, 16 * d, 32, seed=0).save(sae_dir, {"hook_name": args.hook, "model_name": name})
        batches = [
            torch.from_numpy(st.read_tokens(g, slice(s, s + args.batch_size)).astype(np.int64))
            for s in range(0, args.seqs, args.batch_size)
        ]
        n_tok = args.seqs * args.seq_len
        results = {}
        for dtype in ("float32", "bfloat16"):
            model = load_model(name, "cpu", dtype)
            patcher = Patcher(model, args.hook)

            @torch.inference_mode()
            def naive():  # what eval would cost without the shared prefix (log-softmax included, as eval needs it)
                for tokens in batches:
                    torch.log_softmax(model.bridge(tokens).float(), -1)
                    x = capture(model, tokens, [args.hook])[args.hook]
                    for _ in range(N_PATCHES):
                        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=[(args.hook, lambda a, hook, x=x: x)])
                        torch.log_softmax(logits.float(), -1)

            @torch.inference_mode()
            def bare():  # the passes alone: no log-softmax, no CE/KL, no SAE, no records
                for tokens in batches:
                    x = capture(model, tokens, [args.hook])[args.hook]
                    for _ in range(N_PATCHES + 1):
                        patcher.logits(tokens, x)

            # eval's least work beyond bare: P and lse_P of the clean logits, then each patch's CE and KL
            # (a logsumexp, a gather and one pass for KL over the vocabulary), on logits computed beforehand
            scored = []
            with torch.inference_mode():
                for tokens in batches:
                    x = capture(model, tokens, [args.hook])[args.hook]
                    scored.append((tokens, patcher.logits(tokens, x), patcher.logits(tokens, x * 1.01)))

            def scoring():
                for tokens, clean_logits, patch_logits in scored:
                    clean = CleanDistribution(clean_logits, tokens)
                    for _ in range(N_PATCHES):
                        clean.score_tensors(patch_logits)

            def ours():
                evaluate(
                    store,
                    str(tmp / "run"),
                    options=EvalOptions(batch_size=args.batch_size, compute_dtype=dtype),
                    loaded=model,
                )

            ours()  # warm-up (also writes the records measured below)
            times = {"naive": [], "bare": [], "eval": [], "scoring": []}
            for _ in range(args.repeats):  # interleaved, so a load that comes and goes hits all four alike
                for key, fn in (("naive", naive), ("bare", bare), ("eval", ours), ("scoring", scoring)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            results[dtype] = {k: float(np.median(v)) for k, v in times.items()}
            results[dtype]["ratios"] = [n / e for n, e in zip(times["naive"], times["eval"], strict=True)]
            results[dtype]["over_bare"] = [e / b for e, b in zip(times["eval"], times["bare"], strict=True)]
            scored.clear()  # the logits: ~0.4 GB a batch

        load = os.getloadavg()[0]
        if args.ratios_only:
            print_ratios(args, n_tok, d, results, load)
            return
        model32 = load_model(name, "cpu", "float32")
        sens = {}
        for on in (False, True):
            options = EvalOptions(batch_size=args.batch_size, sensitivity=on, probes=args.probes)
            evaluate(store, str(tmp / "sens-run"), [str(sae_dir)], options, loaded=model32)  # warm-up
            t0 = time.perf_counter()
            evaluate(store, str(tmp / "sens-run"), [str(sae_dir)], options, loaded=model32)
            sens[on] = time.perf_counter() - t0
        draws = bench_draws(name, g, args.hook, load_eval_sae(str(sae_dir)), args.draws, args.draw_pos, args.draw_seqs)
        records = tmp / "run" / "records"
        per_table = {t: sum(f.stat().st_size for f in (records / t).rglob("*.parquet")) for t in ("tokens", "codes")}
        print_ratios(args, n_tok, d, results, load)
        print(
            f"records per token per SAE: tokens table {per_table['tokens'] / n_tok:.1f} B, "
            f"codes table {per_table['codes'] / n_tok:.1f} B (k = 32 rows)"
        )
        headline = {
            "eval_vs_naive_fp32": round(results["float32"]["naive"] / results["float32"]["eval"], 2),
            "eval_over_bare_fp32": round(results["float32"]["eval"] / results["float32"]["bare"], 2),
            "eval_vs_naive_bf16": round(results["bfloat16"]["naive"] / results["bfloat16"]["eval"], 2),
            "eval_over_bare_bf16": round(results["bfloat16"]["eval"] / results["bfloat16"]["bare"], 2),
            "eval_floor_over_bare_fp32": round(1 + results["float32"]["scoring"] / results["float32"]["bare"], 2),
            "eval_floor_over_bare_bf16": round(1 + results["bfloat16"]["scoring"] / results["bfloat16"]["bare"], 2),
            "eval_tokens_per_s_fp32": round(n_tok / results["float32"]["eval"]),
            "record_bytes_per_token_tokens": round(per_table["tokens"] / n_tok, 1),
            "record_bytes_per_token_codes": round(per_table["codes"] / n_tok, 1),
            "load_average": round(load, 1),
            "eps_draws_vs_naive": round(draws["naive"] / draws["ours"], 1),
            "sensitivity_over_eval_fp32": round(sens[True] / sens[False], 2),
        }
        print(
            f"--sensitivity (float32, {args.probes} probes per batch): eval {n_tok / sens[False]:,.0f} tok/s, with it "
            f"{n_tok / sens[True]:,.0f} tok/s: {sens[True] / sens[False]:.2f}x the time "
            f"(1 backward, {args.probes} + {N_PATCHES} JVPs per batch; a JVP costs several forward passes on CPU)"
        )
        print(
            f"--eps-draws {args.draws} at position {args.draw_pos} on {args.draw_seqs} sequences (float32): naive "
            f"{draws['naive']:.2f} s, draws {draws['ours']:.2f} s: {draws['naive'] / draws['ours']:.1f}x; "
            f"largest |KL difference| {draws['max_diff']:.2e}"
        )
        for t in ("fp32", "bf16"):
            print(
                f"{t}: eval vs naive {headline[f'eval_vs_naive_{t}']}x (goal ≥ {GOAL_VS_NAIVE}), "
                f"eval / bare {headline[f'eval_over_bare_{t}']}x (goal ≤ {GOAL_OVER_BARE})"
            )
        print(json.dumps({**headline, "goal_vs_naive": GOAL_VS_NAIVE, "goal_over_bare": GOAL_OVER_BARE}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_ratios(args: argparse.Namespace, n_tok: int, d: int, results: dict, load: float) -> None:
    """The throughput table (medians of the interleaved rounds, each round's ratios beside them)."""
    print(
        f"model {args.model}, hook {args.hook}, {n_tok:,} tokens in batches of {args.batch_size}, "
        f"1 SAE ({16 * d:,} latents, k = 32), {N_PATCHES} patches + clean, {torch.get_num_threads()} CPU threads, "
        f"load average {load:.1f} on {os.cpu_count()} cores, medians of {args.repeats} interleaved rounds"
    )
    print(
        f"{'compute':<10}{'naive tok/s':>13}{'bare tok/s':>12}{'eval tok/s':>12}{'eval vs naive':>15}"
        f"{'eval / bare time':>18}  per round (vs naive; / bare)"
    )
    for dtype, r in results.items():
        rounds = ", ".join(f"{a:.2f}; {b:.2f}" for a, b in zip(r["ratios"], r["over_bare"], strict=True))
        print(
            f"{dtype:<10}{n_tok / r['naive']:>13,.0f}{n_tok / r['bare']:>12,.0f}{n_tok / r['eval']:>12,.0f}"
            f"{r['naive'] / r['eval']:>14.2f}x{r['eval'] / r['bare']:>17.2f}x  {rounds}"
        )
    print("bounds: eval runs its bare passes and at least scores them (clean P, then per patch one logsumexp, a")
    print("gather and one KL pass over the vocabulary), so eval / bare ≥ 1 + scoring / bare, and vs naive ≤ naive /")
    print("(bare + scoring); the SAE, the baselines and the records come on top")
    for dtype, r in results.items():
        floor = 1 + r["scoring"] / r["bare"]
        ceiling = r["naive"] / (r["bare"] + r["scoring"])
        print(
            f"{dtype:<10}scoring {r['scoring']:.2f} s = {r['scoring'] / r['bare']:.0%} of bare: eval / bare ≥ "
            f"{floor:.2f}x (goal ≤ {GOAL_OVER_BARE}), vs naive ≤ {ceiling:.2f}x (goal ≥ {GOAL_VS_NAIVE})"
        )
    if args.ratios_only:
        print(
            json.dumps(
                {
                    f"eval_{k}_{t}": round(v, 2)
                    for t, r in results.items()
                    for k, v in (
                        ("vs_naive", r["naive"] / r["eval"]),
                        ("over_bare", r["eval"] / r["bare"]),
                        ("floor_over_bare", 1 + r["scoring"] / r["bare"]),
                        ("ceiling_vs_naive", r["naive"] / (r["bare"] + r["scoring"])),
                    )
                }
                | {"load_average": round(load, 1), "goal_vs_naive": GOAL_VS_NAIVE, "goal_over_bare": GOAL_OVER_BARE}
            )
        )


def bench_draws(name: str, g, hook: str, sae, n_draws: int, pos: int, n_seqs: int) -> dict[str, float]:
    """Seconds of (d) naive single patches and (e) draw_batch for the same draws, and their largest KL gap."""
    model = load_model(name, "cpu", "float32")
    patcher = Patcher(model, hook)
    batch = next(batches(g, model, patcher, range(n_seqs), n_seqs, "cpu"))
    d = batch.x.shape[2]
    xh = sae.decode(*sae.encode(batch.x.reshape(-1, d)))
    t0 = time.perf_counter()
    _, ours = draw_batch(patcher, batch, xh, pos, n_draws, seed=0)
    t_ours = time.perf_counter() - t0
    err = (batch.x[:, pos] - xh.reshape(batch.x.shape)[:, pos]).norm(dim=-1, keepdim=True)
    naive_kl = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n_seqs):
            tokens = batch.tokens[i : i + 1]
            clean = torch.log_softmax(model.bridge(tokens)[0, pos].float(), -1)
            for vec in eps_at(batch.x[i, pos], err[i], n_draws, draw_generator(0, int(batch.seqs[i]))):

                def swap(a, hook, vec=vec):
                    a = a.clone()
                    a[0, pos] = vec
                    return a

                logq = torch.log_softmax(
                    model.bridge.run_with_hooks(tokens, fwd_hooks=[(hook, swap)])[0, pos].float(), -1
                )
                naive_kl.append(float((clean.exp() * (clean - logq)).sum()))
    t_naive = time.perf_counter() - t0
    return {"naive": t_naive, "ours": t_ours, "max_diff": float(np.abs(np.array(naive_kl) - ours["kl"]).max())}


if __name__ == "__main__":
    main()

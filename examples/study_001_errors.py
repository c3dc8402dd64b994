"""Study 001 on your models: are SAE errors worse for behaviour than random errors of the same size?

    python examples/study_001_errors.py                  # tiny vs tiny-192, on the demo's run (reused)
    python examples/study_001_errors.py --model EleutherAI/pythia-70m:1,3,5 --model EleutherAI/pythia-410m:4,12,20 \
        --k 32 --tokens 10M --expansion 32 --draws 500 --out p70-410

Gurnee's tables, each from a named query (`actstore sql OUT/run --query NAME` prints every column):
the KL gap against the ε-random baseline by layer, with the shrinkage test (x at the SAE's norm, x̂ at x's
norm); the per-token KL and ΔCE distributions to the 99.9th percentile; how pathological — the SAE's KL as
a z-score among N ε-random draws at one position (eval --patch-pos 48 --eps-draws N); the tokens with the
largest gap (seen ≥ 5 times); the gap by position; the single-token experiment (x̂ at position 32 alone,
KL at 32 and 33, beside the every-position evaluation); and what the per-token gap correlates with.
"""

from __future__ import annotations

import argparse

import polars as pl
from _common import add_plan_args, plan_from, show

from actstore import run as rundir
from actstore.analytics import query
from actstore.run import SAESpec
from actstore.steps.demo import build
from actstore.steps.evaluate import EvalOptions, evaluate


def single_position(run: str, store: str, sae_id: str, pos: int, draws: int | None, eval_seqs: int) -> None:
    """eval --patch-pos pos (and --eps-draws) for one SAE unless the run already holds it."""
    evals = rundir.read_table(run, "evals")
    done = evals.filter(pl.col("sae_id") == sae_id, pl.col("patch_pos") == pos, pl.col("store") == store)
    have_draws = not query(run, "eps_zscores").filter(pl.col("sae_id") == sae_id, pl.col("patch_pos") == pos).is_empty()
    if done.is_empty() or (draws and not have_draws):
        options = EvalOptions(max_seqs=eval_seqs, patch_pos=pos, eps_draws=draws)
        evaluate(store, run, [str(rundir.sae_dir(run, sae_id))], options, progress=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(ap, tokens="150k")
    ap.add_argument("--draws", type=int, default=200, help="ε-random draws per token for the z-scores (001: 500)")
    ap.add_argument("--draw-pos", type=int, default=48, help="the position the draws replace (001: 48)")
    ap.add_argument("--single-pos", type=int, default=32, help="the single-token experiment's position (001: 32)")
    ap.add_argument("--sae-k", type=int, default=16, help="the k of the SAEs of the per-SAE tables")
    args = ap.parse_args()
    plan = plan_from(args, budget_ks=())
    run = build(args.out, plan)
    t = plan.budgets[0]
    small = next(iter(plan.models))
    store = f"{args.out}/{small.replace('/', '_')}.eval.zarr"
    hooks = plan.models[small]
    picked = [SAESpec(h, args.sae_k, plan.expansion, t, 0).sae_id for h in hooks]
    mid = picked[len(picked) // 2]
    for sae_id in picked:  # the z-scores at every depth of the smaller model
        single_position(run, store, sae_id, args.draw_pos, args.draws, plan.eval_seqs)
    single_position(run, store, mid, args.single_pos, None, plan.eval_seqs)

    sweep_ids = [SAESpec(h, k, plan.expansion, t, 0).sae_id for hs in plan.models.values() for h in hs for k in plan.ks]
    gap = query(run, "kl_gap").filter(
        pl.col("baseline").is_in(["eps", "sae_norm", "norm_corrected"]), pl.col("sae_id").is_in(sweep_ids)
    )
    wide = gap.pivot(on="baseline", index=["sae_id", "model", "layer", "k"], values="kl_baseline").join(
        gap.filter(pl.col("baseline") == "eps").select("sae_id", "kl_sae", "gap", "share_sae_worse"), on="sae_id"
    )
    show("KL gap by layer (sql/kl_gap.sql): mean KL with x̂ against ε-random (gap = ratio), and the shrinkage test "
         "(sae_norm: x at ‖x̂‖; norm_corrected: x̂ at ‖x‖)",
         wide.select("model", "layer", "k", "kl_sae", pl.col("eps").alias("kl_eps"), "gap", "share_sae_worse",
                     pl.col("sae_norm").alias("kl_sae_norm"), pl.col("norm_corrected").alias("kl_norm_corrected"))
         .sort("model", "layer", "k"))  # fmt: skip
    dist = query(run, "kl_distribution").filter(
        pl.col("sae_id").is_in(sweep_ids), pl.col("k") == args.sae_k, pl.col("patch").is_in(["patched", "eps"])
    )
    show(f"Per-token KL and ΔCE distributions, k = {args.sae_k} (sql/kl_distribution.sql)",
         dist.select("model", "layer", "patch", "kl_mean", "kl_p50", "kl_p99", "kl_p999", "d_ce_mean", "d_ce_p999"))  # fmt: skip
    z = query(run, "eps_zscores").filter(pl.col("sae_id").is_in(picked))
    show(f"How pathological (sql/eps_zscores.sql): {small}, x̂ at position {args.draw_pos} alone vs {args.draws} "
         "ε-random draws of its error's norm; z = (KL_SAE − mean) / SD of the draws",
         z.select("layer", "k", "n_tokens", "z_median", "z_p10", "z_p90", "z_max", "share_z_above_1_96",
                  "mean_share_draws_worse", "gap"))  # fmt: skip
    tokens = query(run, "kl_gap_tokens", top=10).filter(pl.col("sae_id") == mid)
    show(f"Tokens with the largest mean gap kl_sae − kl_eps (sql/kl_gap_tokens.sql), {mid}, seen ≥ 5 times",
         tokens.select("token", "text", "n", "gap", "gap_sd", "ratio"))  # fmt: skip
    by_pos = query(run, "kl_gap_by_pos", k=args.sae_k, bucket=32).filter(pl.col("baseline") == "eps")
    show(f"Gap by position, k = {args.sae_k} (sql/kl_gap_by_pos.sql)",
         by_pos.select("model", "layer", "pos_from", "pos_to", "gap", "kl_sae", "kl_baseline"))  # fmt: skip
    single = query(run, "single_position", after=1).filter(
        pl.col("sae_id") == mid, pl.col("patch_pos") == args.single_pos, pl.col("baseline") == "eps"
    )
    show(f"Single token (sql/single_position.sql): x̂ or ε-random at position {args.single_pos} alone, KL there and "
         "at the next position; gap_all: every position patched",
         single.select("layer", "k", "patch_pos", "offset", "kl_sae", "kl_baseline", "gap", "gap_all"))  # fmt: skip
    corr = query(run, "kl_gap_correlations").filter(pl.col("sae_id") == mid)
    show(f"What the per-token gap correlates with (sql/kl_gap_correlations.sql), {mid}",
         corr.filter((pl.col("against") != "sae") | (pl.col("other_k") == args.sae_k))
         .select("against", "other_layer", "other_k", "corr", "n"))  # fmt: skip


if __name__ == "__main__":
    main()

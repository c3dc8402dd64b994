"""Study 004 on your models: the dark matter of SAEs — how much of the error is linearly predictable?

    python examples/study_004_darkmatter.py                 # tiny vs tiny-192, on the demo's run (reused)
    python examples/study_004_darkmatter.py --model google/gemma-2-2b:12 --k 64 --tokens 50M --expansion 16 \
        --widths 8,16,32,64 --min-pos 201 --out gemma

Engels et al.'s tables, each from a named query (`actstore sql OUT/run --query NAME` prints every column):
the linear error probe's R² with the FVU split into linear and nonlinear error, and what gradient pursuit
at the SAE's own L0 removes (§6.1); the norm prediction test with the appendix's baselines (A.3); how well
one SAE's per-token error norm predicts another's (Eq. 13); the CE gap that x̂ + each part of the error
closes (§5.3); SAEs trained on LinearError and on NonlinearError (§5.2); and the width scaling fit
FVU(W) = c + a·W^(−m) (Fig. 1), for which the smaller model's mid hook gets SAEs of `--widths`.
"""

from __future__ import annotations

import argparse

import polars as pl
from _common import add_plan_args, plan_from, show

from actstore import run as rundir
from actstore.analytics import query
from actstore.run import SAESpec
from actstore.steps.darkmatter import DarkmatterOptions, darkmatter
from actstore.steps.demo import build
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.train import TrainOptions, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(ap, tokens="150k")
    ap.add_argument("--min-pos", type=int, default=25, help="fit and score past this position (004: 201 of 1,024)")
    ap.add_argument("--widths", default="2,4,8", help="expansions of the width sweep at the mid hook (≥ 3)")
    ap.add_argument(
        "--sae-k", type=int, default=16, help="k of the width sweep and of the SAE whose errors are learned"
    )
    args = ap.parse_args()
    plan = plan_from(args, budget_ks=())
    run = build(args.out, plan)
    t = plan.budgets[0]
    small = next(iter(plan.models))
    store = f"{args.out}/{small.replace('/', '_')}.eval.zarr"
    mid_hook = plan.models[small][len(plan.models[small]) // 2]
    train_store = f"{args.out}/{small.replace('/', '_')}.train.zarr"

    # the width sweep (Fig. 1): more SAEs at the mid hook, trained and evaluated like the demo's
    widths = [SAESpec(mid_hook, args.sae_k, int(x), t, 0) for x in args.widths.split(",")]
    train(train_store, run, widths, plan.train_options(), progress=True)
    evaluated = set(rundir.read_table(run, "evals").filter(pl.col("store") == store)["sae_id"])
    todo = [str(rundir.sae_dir(run, s.sae_id)) for s in widths if s.sae_id not in evaluated]
    if todo:
        evaluate(store, run, todo, EvalOptions(max_seqs=plan.eval_seqs), progress=True)
    sweep_ids = {SAESpec(h, k, plan.expansion, t, 0).sae_id for hs in plan.models.values() for h in hs for k in plan.ks}
    wanted = sweep_ids | {s.sae_id for s in widths}
    dm = rundir.read_table(run, "darkmatter")
    fresh = set() if dm.is_empty() or "probe_form" not in dm.columns else set(
        dm.filter(pl.col("min_pos") == args.min_pos, pl.col("fvu_pursuit").is_not_null())["sae_id"]
    )  # fmt: skip
    if wanted - fresh:
        darkmatter(run, DarkmatterOptions(min_pos=args.min_pos), only=wanted - fresh, progress=True)

    # SAEs trained on the two parts of one SAE's error (§5.2)
    source = SAESpec(mid_hook, args.sae_k, plan.expansion, t, 0).sae_id
    parts = [f"{source}.{p}" for p in ("linear_error", "nonlinear_error")]
    if query(run, "error_saes").filter(pl.col("source_sae") == source).is_empty():
        darkmatter(run, DarkmatterOptions(min_pos=args.min_pos, write_errors=True), only={source}, progress=True)
        specs = [SAESpec(h, args.sae_k, plan.expansion, t, 0) for h in parts]
        train(store, run, specs, TrainOptions(), progress=True)

    dark = query(run, "darkmatter").filter(pl.col("sae_id").is_in(sorted(sweep_ids)))
    show(f"Linear error probe b·x, held-out (sql/darkmatter.sql), positions ≥ {args.min_pos}: FVU = linear + nonlinear; "
         "gradient pursuit at the SAE's own L0",
         dark.select(pl.col("model").str.slice(0, 12), "layer", "k", "vector_r2", "fvu", "fvu_linear", "fvu_nonlinear",
                     "fvu_pursuit", "fvu_nonlinear_pursuit", "encoder_share", "nonlinear_removed"))  # fmt: skip
    norms = query(run, "norm_baselines", min_pos=args.min_pos).filter(pl.col("sae_id").is_in(sorted(sweep_ids)))
    wide = norms.pivot(on="predictor", index=["sae_id", "model", "layer", "k"], values="heldout_r2")
    wide = wide.join(dark.select("sae_id", "norm_r2_err", "norm_r2_nonlinear"), on="sae_id")
    show("Norm prediction test (sql/norm_baselines.sql): held-out R² of ‖e‖ from token identity, [L0, 1], [‖x‖, 1], "
         "[CE, 1]; beside them the probe of ‖e‖² and of ‖NonlinearError‖² from x",
         wide.drop("sae_id").sort("model", "layer", "k"))  # fmt: skip
    cross = query(run, "cross_sae_predictability").filter(
        pl.col("sae_i").is_in(sorted(sweep_ids)), pl.col("sae_j").is_in(sorted(sweep_ids)), pl.col("hook_i") == mid_hook,
        pl.col("hook_j") == mid_hook,
    )  # fmt: skip
    show(f"Cross-SAE predictability at {mid_hook} (sql/cross_sae_predictability.sql, Eq. 13): held-out R² of "
         "‖e_j‖² ≈ c·‖e_i‖², rows i (predicting k), columns j",
         cross.pivot(on="k_j", index="k_i", values="heldout_r2", sort_columns=True).sort("k_i"))  # fmt: skip
    patch = query(run, "darkmatter_patch", min_pos=args.min_pos).filter(pl.col("sae_id").is_in(sorted(sweep_ids)))
    show("Patching the parts (sql/darkmatter_patch.sql, §5.3): share of the SAE's CE gap closed by x̂ + LinearError "
         "and by x̂ + NonlinearError",
         patch.select(pl.col("model").str.slice(0, 12), "layer", "k", "ce_orig", "ce_sae", "ce_linear", "ce_nonlinear",
                      "closed_linear", "closed_nonlinear"))  # fmt: skip
    errors = query(run, "error_saes").filter(pl.col("source_sae") == source)
    show(f"SAEs trained on the error's parts of {source} (sql/error_saes.sql, §5.2): final training FVU",
         errors.select("k", "expansion", "train_tokens", "fvu_linear_error", "fvu_nonlinear_error", "nonlinear_minus_linear"))  # fmt: skip
    scaling = query(run, "width_scaling").filter(pl.col("hook") == mid_hook, pl.col("k") == args.sae_k)
    show(f"Width scaling at {mid_hook}, k = {args.sae_k} (sql/width_scaling.sql, Fig. 1): FVU(W) = c + a·W^(−m)",
         scaling.select(pl.col("model").str.slice(0, 12), "k", "widths", "fvus", "c", "a", "m", "m_at_edge", "r2",
                        "fvu_nonlinear_mean", "linear_floor", "absent_at_widest"))  # fmt: skip


if __name__ == "__main__":
    main()

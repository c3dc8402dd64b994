"""Study 000 on your models: a k sweep at three matched depths of two models, and its tables.

    python examples/study_000_sweep.py                                   # tiny vs tiny-192, on the demo's run
    python examples/study_000_sweep.py --model EleutherAI/pythia-70m:1,3,5 \
        --model EleutherAI/pythia-410m:4,12,20 --k 8,16,32,64,128,256 --tokens 10M --expansion 32 --out p70-410

Harvests, trains and evaluates what is missing (reusing what `--out` already holds), then prints study
000's tables in its layout: the Δ table at every matched depth (Δ = larger − smaller, 95% CIs over
sequences), the R²–CE_rec correlations per depth, k* with its ratio, rate–distortion and the participation
ratio by layer. Every number is a named query's: `actstore sql OUT/run --query delta` etc.
"""

from __future__ import annotations

import argparse

import polars as pl
from _common import add_plan_args, plan_from, show

from actstore import studies
from actstore.analytics import query
from actstore.steps.demo import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(ap, tokens="150k")
    ap.add_argument("--targets", default="0.9,0.95", help="CE_rec targets of the k* table")
    args = ap.parse_args()
    plan = plan_from(args, budget_ks=())  # the k sweep only: seed 0 at the first budget
    run = build(args.out, plan)
    tokens = plan.budgets[0]
    small, large = list(plan.models)
    depths = query(run, "delta")["depth"].unique().sort().to_list()
    for depth in depths:
        show(
            f"Δ at depth {depth:.3f} ({large} minus {small}), {tokens:,} tokens/SAE",
            studies.delta_table(run, depth, tokens),
        )
    show("Correlations between R² and CE_rec (pooling k and scale; within fixed k)", studies.corr_table(run, tokens))
    show(
        "k*(t): the smallest k with CE_rec ≥ t (linear interpolation on the k grid)",
        studies.kstar_table(run, args.targets, tokens),
    )
    rd = query(run, "rate_distortion").filter(pl.col("train_tokens") == tokens, pl.col("seed") == 0)
    rd = rd.select("model", "layer", "k", "rate_bits", "l0", "fvu", "ce_gap")
    show("Rate–distortion: bits/token against 1 − R² and 1 − CE_rec", rd)
    show("Participation ratio by layer", query(run, "layers").select("model", "layer", "d_model", "pr", "pr_deflated"))


if __name__ == "__main__":
    main()

"""Study 002 on your models: the token-budget sweep with repeats at mid depth, and its table.

    python examples/study_002_budgets.py                                 # tiny vs tiny-192, on the demo's run
    python examples/study_002_budgets.py --model EleutherAI/pythia-70m:3 --model EleutherAI/pythia-410m:12 \
        --k 8,16 --tokens 10M,50M,100M --seeds 0,1,2,3 --expansion 32 --out p70-410

Each repeat is a seed that sets both the initialisation and the data order (`--seed-data`), trained on
both models at every (k, budget). The table: per (k, tokens), n distinct repeats, the mean of
ΔCE_rec = CE_rec(larger) − CE_rec(smaller) and of ΔR² with 95% t-intervals over repeats, and the mismatch
rate (share of repeats with ΔR² > 0 and ΔCE_rec < 0). `actstore sql OUT/run --query budget_sweep` prints it
with every column.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import polars as pl
from _common import add_plan_args, plan_from, show

from actstore import studies
from actstore.run import read_table
from actstore.steps.demo import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(ap, tokens="150k,450k")
    ap.add_argument("--seeds", default="0,1,2", help="the repeats")
    ap.set_defaults(k="8,16")
    args = ap.parse_args()
    plan = plan_from(args, seeds=tuple(int(s) for s in args.seeds.split(",")))
    n_hooks = len(next(iter(plan.models.values())))
    plan = replace(plan, budget_ks=plan.ks, mid=n_hooks // 2)  # the one layer given, or the middle of those given
    run = build(args.out, plan)
    first, second = ((m, hooks[plan.mid]) for m, hooks in plan.models.items())
    saes = read_table(run, "saes")
    depth = saes.filter(pl.col("model") == first[0], pl.col("hook") == first[1])["depth"][0]
    show(f"Token budgets at depth {depth:.3f} ({first[0]} {first[1]} vs {second[0]} {second[1]}; Δ = larger − smaller)",
         studies.budget_table(run, depth))  # fmt: skip


if __name__ == "__main__":
    main()

"""Study 002's gate D2 on your models: does a sensitivity-weighted distortion predict behaviour better than R²?

    python examples/study_002_d2_leaderboard.py                 # tiny vs tiny-192, the demo's SAEs (reused)
    python examples/study_002_d2_leaderboard.py --model EleutherAI/pythia-70m:3 --model EleutherAI/pythia-410m:12 \
        --k 8,16 --tokens 10M,50M,100M --seeds 0,1,2 --expansion 32 --out p70-410

Every SAE at the mid depth of each model (the k sweep and the budget repeats: the cells) is evaluated with
`eval --sensitivity` on the first `--sens-seqs` eval sequences into OUT/sens-run (the demo's own records
stay as they are). Then, from named queries: per SAE the first-order and Fisher predictions against what was
measured and the alignment ratio (`sensitivity`), and the leaderboard of proxies predicting each cell's
CE_rec and KL with the cell held out (`proxy_leaderboard`), closed by study 002's gate line for D2.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
from _common import add_plan_args, plan_from, show

from actstore import run as rundir
from actstore.analytics import query
from actstore.steps.demo import build
from actstore.steps.evaluate import EvalOptions, evaluate

GEOMETRY = ("fo", "swd", "alignment")  # the sensitivity-weighted proxies


def gate(board: pl.DataFrame, target: str) -> str:
    """D2's verdict for one target: supported when a geometry-aware proxy beats 1 − R² (fvu) held out and
    ranks first in ≥ 80% of the cell resamples; rejected when fvu does; pending otherwise."""
    part = board.filter(pl.col("target") == target)
    best = part.sort("loo_rmse").row(0, named=True)
    fvu = part.filter(pl.col("proxy") == "fvu").row(0, named=True)
    geo = part.filter(pl.col("proxy").is_in(GEOMETRY)).sort("loo_rmse")
    if geo.is_empty():
        return f"D2 ({target}): pending — no cell has sensitivity columns"
    g = geo.row(0, named=True)
    line = (f"{g['proxy']} held-out R² {g['loo_r2']:+.3f} vs fvu {fvu['loo_r2']:+.3f} over {g['n_cells']} cells; "
            f"best: {best['proxy']}, first in {best['share_first']:.0%} of resamples")  # fmt: skip
    if best["proxy"] in GEOMETRY and best["share_first"] >= 0.8:
        return f"D2 ({target}): supported — {line}"
    if best["proxy"] == "fvu" and best["share_first"] >= 0.8:
        return f"D2 ({target}): rejected — {line}"
    return f"D2 ({target}): pending (ranking unstable or another proxy leads) — {line}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_plan_args(ap, tokens="150k,450k")
    ap.add_argument("--seeds", default="0,1,2", help="the repeats (cells)")
    ap.add_argument("--sens-seqs", type=int, default=32, help="eval sequences of the sensitivity evaluation")
    ap.add_argument("--probes", type=int, default=8, help="Hutchinson probes per batch")
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    plan = plan_from(args, seeds=tuple(int(s) for s in args.seeds.split(",")))
    n_hooks = len(next(iter(plan.models.values())))
    plan = replace(plan, budget_ks=tuple(k for k in plan.ks if k <= 16) or plan.ks[:1], mid=n_hooks // 2)
    run = build(args.out, plan)
    sens_run = str(Path(args.out) / "sens-run")
    saes = rundir.read_table(run, "saes")
    done = rundir.read_table(sens_run, "evals") if Path(sens_run).is_dir() else pl.DataFrame()
    for model, hooks in plan.models.items():
        cells = saes.filter(pl.col("model") == model, pl.col("hook") == hooks[plan.mid])["sae_id"].to_list()
        todo = [s for s in cells if done.is_empty() or s not in set(done["sae_id"])]
        if todo:
            store = str(Path(args.out) / f"{model.replace('/', '_')}.eval.zarr")
            t0 = time.perf_counter()
            options = EvalOptions(max_seqs=args.sens_seqs, sensitivity=True, probes=args.probes)
            evaluate(store, sens_run, [str(rundir.sae_dir(run, s)) for s in todo], options, progress=True)
            print(f"{model}: {len(todo)} SAEs with --sensitivity on {args.sens_seqs} sequences in "
                  f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    sens = query(sens_run, "sensitivity", n_boot=args.n_boot)
    show("Sensitivity per SAE (sql/sensitivity.sql): first order against measured ΔCE, Fisher against KL, alignment "
         "(the analytic KL gap) with its 95% CI",
         sens.select(pl.col("model").str.slice(0, 12), "layer", "k", "train_tokens", "seed", "d_ce", "fo_ratio",
                     "kl", "swd_ratio", "alignment", "alignment_lo", "alignment_hi", "analytic_gap", "measured_gap"))  # fmt: skip
    board = query(sens_run, "proxy_leaderboard", n_boot=args.n_boot)
    show("Proxy leaderboard (sql/proxy_leaderboard.sql): each proxy alone predicting a held-out cell",
         board.select("target", "rank", "proxy", "n_cells", "loo_rmse", "loo_r2", "corr", "share_first"))  # fmt: skip
    print()
    for target in ("ce_rec", "kl"):
        print(gate(board, target))


if __name__ == "__main__":
    main()

"""`actstore demo`: the main job end to end on the shipped tiny model, small enough for 2 CPU cores.

Harvests a train store and a disjoint eval store (document-level split) at an early, a mid and a late
residual stream of the tiny model, prints `actstore info` for both, then trains a TopK sweep
(k ∈ {8, 16, 32, 64}, 8× expansion, 1M tokens) on every hook — one data pass per hook — and prints each
SAE's final FVU and dead fraction; then evaluates every SAE on the eval store once, fits the dark-matter
probes and patches their parts on held-out sequences, and prints from DuckDB queries over the records:
the summary with bootstrap CIs, the KL gap to ε-random, cross-SAE error predictability, dark matter and
the participation ratio; finally writes the report and a bundle and prints their paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from actstore import run as rundir
from actstore.analytics import format_table, headline, query
from actstore.info import format_info, store_info
from actstore.steps.bundle import create
from actstore.steps.darkmatter import darkmatter
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.steps.report import report
from actstore.steps.train import TrainOptions, summary, sweep, train

DEMO_HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post")
DEMO_KS = (8, 16, 32, 64)
EVAL_SEQS = 200  # 25.6k tokens: every SAE's records in about a minute on 2 cores


def demo(
    out: str = "demo", train_tokens: int = 1_000_000, eval_tokens: int = 200_000, progress: bool = True
) -> dict[str, str]:
    """Run the demo pipeline into `out`; re-running resumes or reuses what is already there."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stores = {"train": str(root / "train.zarr"), "eval": str(root / "eval.zarr")}
    common = dict(model="tiny", corpus="builtin", hooks=DEMO_HOOKS, seq_len=128, batch_size=32)
    for split, tokens in (("train", train_tokens), ("eval", eval_tokens)):
        if progress:
            print(f"== harvest {split} store: {tokens:,} tokens of the builtin corpus's {split} split", file=sys.stderr)
        harvest(stores[split], HarvestOptions(split=split, tokens=tokens, **common), progress=progress)
    for path in stores.values():
        print(f"\n== actstore info {path}")
        print(format_info(store_info(path)))

    run = str(root / "run")
    if progress:
        print(
            f"\n== train: k in {DEMO_KS}, 8x expansion, {train_tokens:,} tokens, on {len(DEMO_HOOKS)} hooks",
            file=sys.stderr,
        )
    specs = sweep(list(DEMO_HOOKS), list(DEMO_KS), [8], [train_tokens], [0])
    train(stores["train"], run, specs, TrainOptions(), progress=progress)  # the default recipe, rate and all
    print(f"\n== trained SAEs in {run}/saes (training curves in {run}/records/curves)")
    print(f"{'sae_id':<48} {'lr':>8} {'FVU':>7} {'dead':>6} {'still improving':>16}")
    for row in summary(run):
        drop = "-" if row["still_improving"] is None else f"{row['still_improving']:.1%}"
        print(f"{row['sae_id']:<48} {row['lr']:>8.2e} {row['fvu']:>7.4f} {row['dead_frac']:>6.3f} {drop:>16}")

    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    say(f"\n== eval: every SAE on the first {EVAL_SEQS} sequences of the eval store")
    evaluate(stores["eval"], run, options=EvalOptions(max_seqs=EVAL_SEQS), progress=progress)
    say("\n== dark matter: linear error probes, then x̂ + linear error and x̂ + nonlinear error patched in")
    darkmatter(run, progress=progress)

    print(f"\n== summary (sql/summary.sql over {run}/records): 95% CIs from 5,000 resamples of sequences")
    print(format_table(headline(run)))
    print("\n== KL gap to the eps-random baseline (sql/kl_gap.sql, baseline = eps)")
    gap = query(run, "kl_gap").filter(pl.col("baseline") == "eps")
    print(format_table(gap.select("hook", "k", "kl_sae", "kl_baseline", "gap", "ratio_p50", "share_sae_worse")))
    print("\n== cross-SAE predictability of the per-token error norm: held-out R² (sql/cross_sae_predictability.sql)")
    print(format_table(_pair_matrix(query(run, "cross_sae_predictability"))))
    print("\n== dark matter (sql/darkmatter.sql) and the CE gap each part closes (sql/darkmatter_patch.sql)")
    dm = query(run, "darkmatter").join(
        query(run, "darkmatter_patch").select("sae_id", "closed_linear", "closed_nonlinear"), on="sae_id"
    )
    print(
        format_table(
            dm.select(
                "hook",
                "k",
                "vector_r2",
                "fvu",
                "fvu_linear",
                "fvu_nonlinear",
                "norm_r2_err",
                "closed_linear",
                "closed_nonlinear",
            )
        )
    )
    print("\n== participation ratio of each hook (sql/layers.sql)")
    print(format_table(query(run, "layers").select("hook", "d_model", "pr", "pr_deflated", "top_share")))

    say("\n== report and bundle")
    report(run, progress=progress)
    bundle = str(root / "bundle")
    create(run, bundle, overwrite=True)
    print("\n== outputs")
    outputs = {**stores, "run": run, "report": str(rundir.report_dir(run) / "report.html"), "bundle": bundle}
    for name, path in outputs.items():
        print(f"{name:<8} {path}")
    print(f"\nnext: actstore sql {run} --list   ·   actstore bundle verify {bundle}")
    return outputs


def _pair_matrix(pairs: pl.DataFrame) -> pl.DataFrame:
    """The pairs table as a matrix: row = the predicting SAE, column = the predicted one, "L<layer> k<k>"."""

    def label(layer: pl.Expr, k: pl.Expr) -> pl.Expr:
        return pl.concat_str(pl.lit("L"), layer.cast(pl.String), pl.lit(" k"), k.cast(pl.String))

    named = pairs.with_columns(
        label(pl.col("layer_i"), pl.col("k_i")).alias("from"), label(pl.col("layer_j"), pl.col("k_j")).alias("to")
    )
    order = named.unique("from", maintain_order=True)["from"].to_list()
    matrix = named.pivot(on="to", index="from", values="heldout_r2", sort_columns=False)
    return matrix.select("from", *[c for c in order if c in matrix.columns])

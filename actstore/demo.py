"""`actstore demo`: the main job end to end on the shipped tiny model, small enough for 2 CPU cores.

Harvests a train store and a disjoint eval store (document-level split) at an early, a mid and a late
residual stream of the tiny model, prints `actstore info` for both, then trains a TopK sweep
(k ∈ {8, 16, 32, 64}, 8× expansion, 1M tokens) on every hook — one data pass per hook — and prints each
SAE's final FVU and dead fraction; then evaluates every SAE on the eval store and prints R², CE_rec, CE
loss recovered, KL and the KL gap to ε-random from a DuckDB query over the records.
"""

from __future__ import annotations

import sys
from pathlib import Path

from actstore.analytics import format_table, query
from actstore.evaluate import EvalOptions, evaluate
from actstore.harvest import HarvestOptions, harvest
from actstore.info import format_info, store_info
from actstore.train import TrainOptions, summary, sweep, train

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
    train(stores["train"], run, specs, TrainOptions(batch_size=1024), progress=progress)
    print(f"\n== trained SAEs in {run}/saes (training curves in {run}/records/curves)")
    print(f"{'sae_id':<48} {'FVU':>7} {'dead':>6}")
    for row in sorted(
        summary(run), key=lambda r: (r["sae_id"].split("__")[0], int(r["sae_id"].split("__k")[1].split("_")[0]))
    ):
        print(f"{row['sae_id']:<48} {row['fvu']:>7.4f} {row['dead_frac']:>6.3f}")

    if progress:
        print(f"\n== eval: every SAE on the first {EVAL_SEQS} sequences of the eval store", file=sys.stderr)
    evaluate(stores["eval"], run, options=EvalOptions(max_seqs=EVAL_SEQS), progress=progress)
    print(f"\n== per-SAE numbers from DuckDB over {run}/records (sql/eval_overview.sql)")
    print(format_table(query(run, "eval_overview").drop("hook")))
    return {**stores, "run": run}

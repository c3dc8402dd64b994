"""`actstore demo`: the main job end to end on the shipped tiny model, small enough for 2 CPU cores.

Harvests a train store and a disjoint eval store (document-level split) at an early, a mid and a late
residual stream of the tiny model and prints `actstore info` for both. Later steps (train, eval,
report, bundle) join as they land.
"""

from __future__ import annotations

import sys
from pathlib import Path

from actstore.harvest import HarvestOptions, harvest
from actstore.info import format_info, store_info

DEMO_HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post")


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
    return stores

"""Study 003 on your SAE: the training report (summary, curves, feature diagnostics) of one trained SAE.

    python examples/study_003_training_report.py                          # the demo's tiny-192 mid-depth k = 16 SAE
    python examples/study_003_training_report.py --run OUT/run --sae-id blocks.12.hook_resid_post__k32_x8_5M_s0

Prints study 003's summary table (steps, wall time, final MSE, final normalised MSE, explained variance,
L0 against k, dead latents over the training window and never-fired latents on the eval tokens) and its
run config, then writes the report (`actstore report`): the training curves (MSE, normalised MSE mean-
centred and not, explained variance, L0, dead fraction, batch usage), the firing-rate rank plot and the
decoder norms. With no run yet, it builds the demo's (`examples/_common.py` defaults).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import polars as pl
from _common import show

from actstore.analytics import query
from actstore.steps.demo import Plan, build
from actstore.steps.report import report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="demo/run", help="a run with trained (and evaluated) SAEs")
    ap.add_argument("--sae-id", default="blocks.6.hook_resid_post__k16_x4_150k_s0")
    args = ap.parse_args()
    if not Path(args.run, "saes", args.sae_id).is_dir() and args.run == "demo/run":
        build("demo", Plan())
    rows = query(args.run, "training").filter(pl.col("sae_id") == args.sae_id)
    cfg = json.loads(Path(args.run, "saes", args.sae_id, "cfg.json").read_text())
    summary = rows.row(0, named=True) if rows.height else None
    if summary is None:
        raise SystemExit(f"{args.sae_id} has no training curves in {args.run}; train it with `actstore train`")
    items = [
        ("steps", f"{summary['steps']:,}"),
        ("wall time", f"{summary['wall_seconds']:.1f} s ({summary['wall_seconds'] / 60:.1f} min)"),
        ("final MSE loss", f"{summary['final_mse']:.4f}"),
        ("final normalized MSE", f"{summary['final_nmse']:.3f}"),
        ("final explained variance", f"{summary['final_explained_variance']:.1%}"),
        ("L0 (target = k)", f"{summary['final_l0']:.1f} (k = {summary['k']})"),
        ("dead features (dead window)", f"{summary['dead_latents']:,} / {summary['d_sae']:,}"),
        (
            "dead features (sample, no fires on the eval tokens)",
            f"{summary['never_fired_eval']} / {summary['d_sae']:,}",
        ),
    ]
    show(
        f"SAE training report — {args.sae_id}",
        pl.DataFrame({"summary": [k for k, _ in items], "": [v for _, v in items]}),
    )
    meta = cfg["actstore"]
    config = [
        ("source model", cfg["model_name"]), ("hook", cfg["hook_name"]), ("d_model", cfg["d_in"]),
        ("n_features", f"{cfg['d_sae']:,} (= {meta['expansion']} × d_model)"), ("k (TopK)", cfg["k"]),
        ("batch size", meta["batch_size"]), ("learning rate", f"{meta['lr']:.3g}"), ("training steps", meta["steps"]),
        ("training tokens", f"{meta['train_tokens']:,}"), ("seed (init, data)", f"{meta['seed']}, {meta['data_seed']}"),
    ]  # fmt: skip
    show("Run config", pl.DataFrame({"setting": [k for k, _ in config], "value": [str(v) for _, v in config]}))
    out = report(args.run)
    print(f"\ncurves, firing-rate rank plot and decoder norms: {out / 'report.html'}")


if __name__ == "__main__":
    main()

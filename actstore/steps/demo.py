"""`actstore demo`: the main job end to end on the two shipped models, small enough for 2 CPU cores.

The demo is study 000 and study 002 in miniature: `tiny` (6 layers, d 128) against `tiny-192` (12 layers,
d 192) at three matched relative depths (1/6, 3/6, 5/6: tiny's layers 1, 3, 5 and tiny-192's 2, 6, 10).
Per model it harvests a train store and a disjoint eval store, then trains in one run: a k sweep at every
depth at the small budget (seed 0), and at mid depth, low k, both budgets with three seeds, each seed also
drawing its own data order (real repeats). It evaluates every SAE on its model's eval store, fits the
dark-matter probes of the k sweep (with gradient pursuit), runs study 001's ε-random z-scores for one SAE,
and prints from DuckDB queries: study 003's training summary, the summary with bootstrap CIs, study 000's
mid-depth Δ table, its correlation and k* tables, study 002's budget table, the KL gap, the z-score line,
dark matter and the participation ratio; then writes the report and a bundle.
`Plan` and `build` are what `examples/` reuse with other models, hooks and budgets.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from actstore import run as rundir
from actstore import studies
from actstore.analytics import format_table, query
from actstore.run import SAESpec
from actstore.steps.bundle import create
from actstore.steps.darkmatter import DarkmatterOptions, darkmatter
from actstore.steps.evaluate import EvalOptions, evaluate
from actstore.steps.harvest import HarvestOptions, harvest
from actstore.steps.report import report
from actstore.steps.train import TrainOptions, sweep, train


@dataclass(frozen=True)
class Plan:
    """A two-model comparison: the hooks of each model at matched depths, the k sweep, budgets and repeats."""

    models: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "tiny": tuple(f"blocks.{layer}.hook_resid_post" for layer in (1, 3, 5)),
            "tiny-192": tuple(f"blocks.{layer}.hook_resid_post" for layer in (2, 6, 10)),
        }
    )
    ks: tuple[int, ...] = (8, 16, 32, 64)  # the k sweep at every depth (study 000)
    budgets: tuple[int, ...] = (150_000, 450_000)  # the k sweep runs at the first; study 002's table at all
    store_tokens: int = 300_000  # the train store; a budget beyond it loops over it (epochs)
    budget_ks: tuple[int, ...] = (8, 16)  # the budget sweep's k, at the mid hook
    seeds: tuple[int, ...] = (0, 1, 2)  # the budget sweep's repeats (the k sweep is seed 0)
    mid: int = 1  # index in each model's hooks of the depth the budget sweep runs at
    expansion: int = 4
    corpus: str = "builtin"
    seq_len: int = 128
    eval_seqs: int = 96
    kstar_targets: str = "0.9,0.95"
    darkmatter_min_pos: int = 25  # 004 fits past position 200 of 1,024: the same share of our 128
    eps_k: int = 16  # study 001's z-scores: this k at the smaller model's mid depth, …
    eps_pos: int = 48  # … position 48 alone patched (as 001), …
    eps_draws: int = 200  # … among this many ε-random draws per sequence (001: 500)
    sensitivity: bool = True  # eval --sensitivity for the smaller model's SAEs at mid depth (the leaderboard's cells)

    def specs(self, model: str) -> list[SAESpec]:
        hooks = self.models[model]
        main = sweep(list(hooks), list(self.ks), [self.expansion], [self.budgets[0]], [0])
        repeats = sweep([hooks[self.mid]], list(self.budget_ks), [self.expansion], list(self.budgets), list(self.seeds))
        return list(dict.fromkeys(main + repeats))

    def train_options(self) -> TrainOptions:
        return TrainOptions(seed_data=True)  # the default recipe; every seed its own data order


def build(out: str, plan: Plan, progress: bool = True) -> str:
    """Harvest, train and evaluate `plan` into `out`; returns the run. Re-running resumes and reuses:
    finished stores and SAEs are kept, and SAEs already evaluated on their store are not evaluated again."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    run = str(root / "run")
    say = _sayer(progress)
    first = next(iter(plan.models))
    for model, hooks in plan.models.items():
        slug = model.replace("/", "_")
        stores = {"train": str(root / f"{slug}.train.zarr"), "eval": str(root / f"{slug}.eval.zarr")}
        common = dict(model=model, corpus=plan.corpus, hooks=hooks, seq_len=plan.seq_len, batch_size=32)
        for split, tokens in (("train", plan.store_tokens), ("eval", plan.eval_seqs * plan.seq_len)):
            say(f"== harvest {model} {split} store: {tokens:,} tokens of the {plan.corpus} corpus's {split} split")
            harvest(stores[split], HarvestOptions(split=split, tokens=tokens, **common), progress=progress)
        specs = plan.specs(model)
        repeats = f"; k {plan.budget_ks} × budgets {plan.budgets} × seeds {plan.seeds} at {hooks[plan.mid]}"
        say(f"== train {model}: {len(specs)} SAEs (k {plan.ks} at {len(hooks)} depths, {plan.budgets[0]:,} tokens"
            f"{repeats if plan.budget_ks else ''})")  # fmt: skip
        train(stores["train"], run, specs, plan.train_options(), progress=progress)
        todo = _not_evaluated(run, stores["eval"], [s.sae_id for s in specs])
        sensitive = [s.sae_id for s in specs if plan.sensitivity and model == first and s.hook == hooks[plan.mid]]
        for group, sens in (
            ([t for t in todo if t not in sensitive], False),
            ([t for t in todo if t in sensitive], True),
        ):
            if group:
                what = " with --sensitivity (gradient and pullback Fisher)" if sens else ""
                say(
                    f"== eval {model}: {len(group)} SAEs on the first {plan.eval_seqs} sequences of its eval store{what}"
                )
                paths = [str(rundir.sae_dir(run, sae_id)) for sae_id in group]
                options = EvalOptions(max_seqs=plan.eval_seqs, sensitivity=sens)
                evaluate(stores["eval"], run, paths, options, progress=progress)
    return run


def _sayer(progress: bool):
    """Stage headers on stderr, each with the seconds since the process started (where the time goes)."""

    def say(msg: str) -> None:
        if progress:
            print(f"{msg}   [{time.perf_counter() - _T0:.0f} s]", file=sys.stderr)

    return say


_T0 = time.perf_counter()


def _not_evaluated(run: str, store: str, sae_ids: list[str]) -> list[str]:
    evals = rundir.read_table(run, "evals")
    done = set() if evals.is_empty() else set(evals.filter(pl.col("store") == store)["sae_id"])
    return [s for s in sae_ids if s not in done]


def demo(out: str = "demo", progress: bool = True, plan: Plan | None = None) -> dict[str, str]:
    """Run the demo into `out` and print its tables; re-running resumes or reuses what is already there."""
    plan = plan or Plan()
    started = time.monotonic()
    run = build(out, plan, progress)
    say = _sayer(progress)
    main_ids = {
        s.sae_id
        for m in plan.models
        for s in sweep(list(plan.models[m]), list(plan.ks), [plan.expansion], [plan.budgets[0]], [0])
    }
    dm_done = rundir.read_table(run, "darkmatter")
    if dm_done.is_empty() or "probe_form" not in dm_done.columns or dm_done["fvu_pursuit"].is_null().any():
        say("\n== dark matter of the k sweep: linear error probes and gradient pursuit, then x̂ + each part patched in")
        darkmatter(run, DarkmatterOptions(min_pos=plan.darkmatter_min_pos), only=main_ids, progress=progress)
    small, large = list(plan.models)
    t1 = plan.budgets[0]
    eps_sae = SAESpec(plan.models[small][plan.mid], plan.eps_k, plan.expansion, t1, 0).sae_id
    if query(run, "eps_zscores").filter(pl.col("sae_id") == eps_sae).is_empty():
        say(
            f"\n== study 001's z-scores: {eps_sae} at position {plan.eps_pos} alone, among {plan.eps_draws} ε-random draws"
        )
        options = EvalOptions(max_seqs=plan.eval_seqs, patch_pos=plan.eps_pos, eps_draws=plan.eps_draws)
        store = str(Path(out) / f"{small.replace('/', '_')}.eval.zarr")
        evaluate(store, run, [str(rundir.sae_dir(run, eps_sae))], options, progress=progress)

    def show(title: str, df: pl.DataFrame) -> None:
        say(f"query: {title.split(' (')[0]}")
        print(f"\n== {title}")
        print(format_table(df))

    show(f"training (study 003; sql/training.sql): the k sweep at {t1:,} tokens, seed 0",
         studies.training_table(run).filter(pl.col("train_tokens") == t1, pl.col("seed") == 0))  # fmt: skip
    show(f"summary (sql/summary.sql) at {t1:,} tokens, seed 0: 95% CIs from 5,000 resamples of sequences",
         studies.summary_table(run, t1))  # fmt: skip
    show(f"study 000, mid depth (sql/delta.sql): Δ = {large} − {small} at {t1:,} tokens, seed 0, 95% CIs over sequences",
         studies.delta_table(run, 0.5, t1))  # fmt: skip
    show(f"study 000, corr(R², CE_rec) per depth (sql/corr_r2_ce.sql), both models pooled, {t1:,} tokens",
         studies.corr_table(run, t1))  # fmt: skip
    show(f"study 000, k* for CE_rec targets (sql/kstar.sql), {t1:,} tokens: ratio = k*({large}) / k*({small})",
         studies.kstar_table(run, plan.kstar_targets, t1))  # fmt: skip
    show(f"study 002, mid depth (sql/budget_sweep.sql): Δ = {large} − {small} over repeats (seed + data order)",
         studies.budget_table(run, 0.5))  # fmt: skip
    gap = query(run, "kl_gap").filter(pl.col("baseline") == "eps", pl.col("sae_id").is_in(main_ids))
    show("KL gap to the eps-random baseline (sql/kl_gap.sql), the k sweep",
         gap.select(pl.col("model").str.slice(0, 12), "hook", "k", "kl_sae", "kl_baseline", "gap", "share_sae_worse"))  # fmt: skip
    z = query(run, "eps_zscores").filter(pl.col("sae_id") == eps_sae).row(0, named=True)
    say("query: eps_zscores")
    print(
        f"\n== study 001, how pathological (sql/eps_zscores.sql): {small} {z['hook']} k={z['k']}, position "
        f"{z['patch_pos']} alone, {z['n_draws']} ε-random draws per sequence: the SAE's KL is a median "
        f"{z['z_median']:+.2f} SDs from the draws' mean (p90 {z['z_p90']:+.2f}); {z['share_z_above_1_96']:.0%} of "
        f"{z['n_tokens']} tokens above z = 1.96; KL {z['kl_sae']:.4f} vs {z['kl_draws']:.4f} (gap {z['gap']:.2f})"
    )
    if plan.sensitivity:
        sens = query(run, "sensitivity", n_boot=1000)
        show("sensitivity (sql/sensitivity.sql), the smaller model at mid depth: first-order ΔCE and Fisher KL against the "
             "measured, and the alignment ratio (the analytic KL gap) with its 95% CI",
             sens.select("layer", "k", "train_tokens", "seed", "d_ce", "fo_ratio", "kl", "swd_ratio", "alignment",
                         "alignment_lo", "alignment_hi", "eps_alignment", "analytic_gap", "measured_gap"))  # fmt: skip
        show("proxy leaderboard (sql/proxy_leaderboard.sql): each proxy alone predicting a held-out cell's CE_rec and KL",
             query(run, "proxy_leaderboard", n_boot=1000).select(
                 "target", "rank", "proxy", "n_cells", "loo_rmse", "loo_r2", "corr", "share_first"))  # fmt: skip
    dm = query(run, "darkmatter").join(
        query(run, "darkmatter_patch").select("sae_id", "closed_linear", "closed_nonlinear"), on="sae_id"
    )
    show(f"dark matter (study 004; sql/darkmatter.sql, sql/darkmatter_patch.sql), the k sweep, positions ≥ "
         f"{plan.darkmatter_min_pos}: linear probe b·x, FVU = linear + nonlinear on held-out sequences, "
         "gradient pursuit at the SAE's own L0",
         dm.select(pl.col("model").str.slice(0, 12), "layer", "k", "vector_r2", "fvu", "fvu_linear", "fvu_nonlinear",
                   "fvu_pursuit", "fvu_nonlinear_pursuit", "norm_r2_err", "closed_linear", "closed_nonlinear"))  # fmt: skip
    show("participation ratio of each hook (sql/layers.sql)",
         query(run, "layers").select(pl.col("model").str.slice(0, 12), "hook", "d_model", "pr", "pr_deflated", "top_share"))  # fmt: skip

    say("\n== report and bundle")
    report(run, progress=progress)
    bundle = str(Path(out) / "bundle")
    create(run, bundle, overwrite=True)
    print("\n== outputs")
    outputs = {"run": run, "report": str(rundir.report_dir(run) / "report.html"), "bundle": bundle}
    for name, path in outputs.items():
        print(f"{name:<8} {path}")
    print(
        f"\nnext: actstore sql {run} --list   ·   actstore sql {run} --query delta   ·   actstore bundle verify {bundle}"
    )
    say(f"demo finished in {time.monotonic() - started:.0f} s")
    return outputs

"""`actstore …`: click commands, each a thin layer over the library function of the same name."""

from __future__ import annotations

import sys

import click

from actstore import __version__
from actstore.errors import ActstoreError


class _Group(click.Group):
    """Prints an ActstoreError as one line (no traceback) and exits 2 for usage, 1 for runtime."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ActstoreError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="actstore")
def main() -> None:
    """actstore: harvest activations once into Zarr, then train, evaluate and query SAEs from the data."""


@main.command(short_help="Run a model over a corpus and write activations to a Zarr v3 store.")
@click.argument("out_store")
@click.option(
    "--model",
    default="tiny",
    show_default=True,
    help="'tiny', a local HF model directory, or a hub name (EleutherAI/pythia-70m).",
)
@click.option(
    "--corpus",
    default="builtin",
    show_default=True,
    help="'builtin', text files/dirs/globs, .jsonl/.parquet, a saved HF dataset dir, or .npy token arrays.",
)
@click.option(
    "--hooks",
    default="blocks.1.hook_resid_post",
    show_default=True,
    help="Comma-separated TransformerLens hook names, captured in one pass.",
)
@click.option(
    "--seq-len",
    default=128,
    show_default=True,
    type=int,
    help="Tokens per packed sequence (at most the model's context).",
)
@click.option("--tokens", default="2M", show_default=True, help="Tokens to harvest: 2M, 500k, 1e6 …")
@click.option(
    "--skip-tokens",
    default="0",
    show_default=True,
    help="Skip this many tokens of the stream first (cuts disjoint stores).",
)
@click.option(
    "--split",
    type=click.Choice(["all", "train", "eval"]),
    default="all",
    show_default=True,
    help="Documents to use: eval = every 20th document, train = the rest.",
)
@click.option(
    "--prepend-bos/--no-prepend-bos",
    default=False,
    show_default=True,
    help="Start every sequence with BOS (recorded as the BOS policy).",
)
@click.option(
    "--text-column", default="text", show_default=True, help="Text column of JSONL/Parquet/HF dataset corpora."
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default="float16",
    show_default=True,
    help="Stored dtype of the activations.",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype the model runs in (bf16 is ~3.5x faster on CPUs with AMX/AVX512-bf16 and on GPUs).",
)
@click.option(
    "--codec",
    default="lz4",
    show_default=True,
    help="lz4 | zstd | none (lossless) or bitround-N (lossy: keep N mantissa bits, then zstd).",
)
@click.option("--batch-size", default=32, show_default=True, type=int, help="Sequences per forward pass.")
@click.option(
    "--chunk-seqs", default=None, type=int, help="Sequences per Zarr chunk (default: the batch size; must divide it)."
)
@click.option(
    "--shard-seqs",
    default=None,
    type=int,
    help="Group chunks into shards of this many sequences (for object storage; slower reads).",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace a store at OUT_STORE that was harvested with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(out_store: str, **kw) -> None:
    """Harvest activations of --model at --hooks over --corpus into OUT_STORE (resumable: re-run the
    same command after an interruption)."""
    from actstore.harvest import HarvestOptions
    from actstore.harvest import harvest as run
    from actstore.units import parse_count

    overwrite, quiet = kw.pop("overwrite"), kw.pop("quiet")
    kw["hooks"] = _csv(kw["hooks"])
    kw["tokens"] = parse_count(kw["tokens"])
    kw["skip_tokens"] = parse_count(kw["skip_tokens"])
    run(out_store, HarvestOptions(**kw), overwrite=overwrite, progress=not quiet)
    if not quiet:
        click.echo(f"wrote {out_store}", err=True)


@main.command(short_help="Print a store's shapes, dtypes, codec, size on disk, commit record and provenance.")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
def info(store: str, as_json: bool) -> None:
    """Describe STORE: arrays, codec, bytes on disk and compression ratio, committed sequences, provenance."""
    from actstore.info import format_info, info_json, store_info

    facts = store_info(store)
    click.echo(info_json(facts) if as_json else format_info(facts))


@main.command(short_help="Train TopK SAE sweeps from a store; SAEs of a hook share one pass over the data.")
@click.argument("store")
@click.option(
    "--out", "run", required=True, help="Run directory: SAEs go to RUN/saes/<sae_id>/, curves to RUN/records/curves/."
)
@click.option("--hooks", required=True, help="Comma-separated hooks of the store.")
@click.option("--k", "ks", default="32", show_default=True, help="Comma-separated k values (active latents per token).")
@click.option(
    "--expansion", default="8", show_default=True, help="Comma-separated expansion factors (d_sae = expansion × d_in)."
)
@click.option(
    "--tokens",
    default="1M",
    show_default=True,
    help="Comma-separated token budgets (1M, 500k, …); budgets share the stream.",
)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated initialisation seeds.")
@click.option("--batch-size", default=4096, show_default=True, type=int, help="Tokens per step.")
@click.option(
    "--lr", default=None, type=float, help="Peak learning rate (default: 2e-4 / sqrt(d_sae / 2^14), Gao et al.)."
)
@click.option(
    "--dead-tokens",
    default=None,
    help="A latent is dead after this many tokens without firing (default: min(10M, budget/10)).",
)
@click.option(
    "--auxk-coef", default=1 / 32, show_default=True, type=float, help="Weight of the AuxK loss on dead latents."
)
@click.option(
    "--bf16/--no-bf16", "low_precision", default=False, show_default=True, help="Run the encoder matmul in bfloat16."
)
@click.option(
    "--drop-bos/--keep-bos",
    default=False,
    show_default=True,
    help="Leave position 0 of every sequence out of training.",
)
@click.option(
    "--data-seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the data order (shared by every SAE of the run).",
)
@click.option(
    "--checkpoint-seconds",
    default=120.0,
    show_default=True,
    type=float,
    help="Write a resumable checkpoint this often.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    store: str,
    run: str,
    hooks: str,
    ks: str,
    expansion: str,
    tokens: str,
    seeds: str,
    batch_size: int,
    lr: float | None,
    dead_tokens: str | None,
    auxk_coef: float,
    low_precision: bool,
    drop_bos: bool,
    data_seed: int,
    checkpoint_seconds: float,
    device: str,
    quiet: bool,
) -> None:
    """Train every combination of --hooks × --k × --expansion × --tokens × --seeds on STORE (resumable:
    re-run the same command after an interruption)."""
    from actstore.errors import UsageError
    from actstore.model import resolve_device
    from actstore.train import TrainOptions, summary, sweep
    from actstore.train import train as run_train
    from actstore.units import parse_count

    def ints(name: str, text: str) -> list[int]:
        try:
            return [int(v) for v in _csv(text)]
        except ValueError:
            raise UsageError(f"--{name} takes comma-separated whole numbers, got {text!r}") from None

    specs = sweep(
        list(_csv(hooks)),
        ints("k", ks),
        ints("expansion", expansion),
        [parse_count(t) for t in _csv(tokens)],
        ints("seeds", seeds),
    )
    options = TrainOptions(
        batch_size=batch_size,
        lr=lr,
        dead_tokens=parse_count(dead_tokens) if dead_tokens else None,
        auxk_coef=auxk_coef,
        low_precision=low_precision,
        data_seed=data_seed,
        drop_first_positions=1 if drop_bos else 0,
        checkpoint_seconds=checkpoint_seconds,
        device=resolve_device(device),
    )
    run_train(store, run, specs, options, progress=not quiet)
    wanted = {s.sae_id for s in specs}
    for row in summary(run):
        if row["sae_id"] in wanted:
            click.echo(f"{row['sae_id']:<48} FVU {row['fvu']:.4f}  dead {row['dead_frac']:.3f}  L0 {row['l0']:.1f}")


@main.command("eval", short_help="Evaluate SAEs on an eval store: per-token Parquet records, reconstructions in Zarr.")
@click.argument("eval_store")
@click.option("--run", required=True, help="Run directory: SAEs from RUN/saes (unless --sae), records to RUN/records.")
@click.option(
    "--sae", "sae_paths", multiple=True, help="An SAE directory in SAELens's layout (TopK, ReLU, JumpReLU); repeatable."
)
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per forward pass.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of the random baselines (stored with the records)."
)
@click.option(
    "--patch-pos", default=None, type=int, help="Single-position mode: patch only this position, record every position."
)
@click.option("--max-seqs", default=None, type=int, help="Evaluate only the first N sequences of the store.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option(
    "--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True
)
@click.option(
    "--darkmatter",
    is_flag=True,
    help="Also patch x̂ + linear error and x̂ + nonlinear error (after `actstore darkmatter RUN`).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_(
    eval_store: str,
    run: str,
    sae_paths: tuple[str, ...],
    batch_size: int,
    seed: int,
    patch_pos: int | None,
    max_seqs: int | None,
    device: str,
    compute_dtype: str,
    darkmatter: bool,
    quiet: bool,
) -> None:
    """Evaluate the SAEs of RUN (or --sae PATH …) on EVAL_STORE, running the model once: activation-space
    numbers, patched CE/KL with zero-ablation and three random baselines, and the active codes."""
    from actstore.analytics import format_table, headline
    from actstore.evaluate import EvalOptions, evaluate
    from actstore.model import resolve_device

    if batch_size < 1 or (max_seqs is not None and max_seqs < 1):
        from actstore.errors import UsageError

        raise UsageError("--batch-size and --max-seqs must be at least 1")
    options = EvalOptions(
        batch_size=batch_size,
        seed=seed,
        patch_pos=patch_pos,
        max_seqs=max_seqs,
        device=resolve_device(device),
        compute_dtype=compute_dtype,
        darkmatter=darkmatter,
    )
    evaluate(eval_store, run, list(sae_paths) or None, options, progress=not quiet)
    click.echo(format_table(headline(run)))


@main.command(short_help="Fit the linear error probes (dark matter) of every evaluated SAE of RUN.")
@click.argument("run")
@click.option("--max-seqs", default=None, type=int, help="Use only the first N evaluated sequences.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
def darkmatter(run: str, max_seqs: int | None, quiet: bool) -> None:
    """From the eval store's activations and reconstructions, fit x → error on even sequences and score on
    odd ones: vector R², the FVU split into linear and nonlinear error, and the norm prediction test.
    Writes the `darkmatter` table and RUN/darkmatter/<sae_id>/probe.safetensors (for `eval --darkmatter`)."""
    from actstore.analytics import format_table, query
    from actstore.darkmatter import darkmatter as fit
    from actstore.errors import UsageError

    if max_seqs is not None and max_seqs < 2:
        raise UsageError("--max-seqs must be at least 2 (even sequences fit the probes, odd ones score them)")
    fit(run, max_seqs=max_seqs, progress=not quiet)
    click.echo(format_table(query(run, "darkmatter").drop("sae_id")))


@main.command(short_help="Participation ratio of every hook of a store, into RUN's `layers` table.")
@click.argument("store")
@click.option("--run", required=True, help="Run directory whose records/layers receives the rows.")
@click.option("--max-seqs", default=None, type=int, help="Use only the first N sequences of the store.")
def layers(store: str, run: str, max_seqs: int | None) -> None:
    """PR = (Σλ)²/Σλ² of the activations' covariance eigenvalues, raw and without the top direction, per hook.
    `actstore eval` does this for its eval store; this command covers stores without SAEs (all layers)."""
    from actstore.analytics import format_table
    from actstore.errors import UsageError
    from actstore.geometry import write_layers

    if max_seqs is not None and max_seqs < 1:
        raise UsageError("--max-seqs must be at least 1")
    click.echo(format_table(write_layers(store, run, max_seqs).drop("store")))


@main.command("sql", short_help="Query a run's or bundle's records with DuckDB SQL, ad hoc or a named query.")
@click.argument("run_or_bundle")
@click.argument("text", required=False)
@click.option("--query", "name", default=None, help="A named query from sql/ (see --list).")
@click.option("--param", "params", multiple=True, help="name=value for the named query; repeatable.")
@click.option("--list", "list_queries", is_flag=True, help="List the named queries, their purpose and parameters.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table", show_default=True
)
@click.option("--out", default=None, help="Write the result to this file (required for parquet).")
@click.option("--shell", is_flag=True, help="Open the duckdb CLI (if installed) with the views and macros loaded.")
def sql_(
    run_or_bundle: str,
    text: str | None,
    name: str | None,
    params: tuple[str, ...],
    list_queries: bool,
    fmt: str,
    out: str | None,
    shell: bool,
) -> None:
    """Views: saes, tokens, codes, latents, evals, curves, darkmatter, layers, vocab (those present). Examples:

    \b
      actstore sql RUN --list
      actstore sql RUN --query summary --param min_pos=1
      actstore sql RUN "SELECT sae_id, avg(kl_patched) FROM tokens GROUP BY ALL" --format csv
    """
    import polars as pl

    from actstore import analytics
    from actstore.errors import UsageError

    if list_queries:
        for q in analytics.named_queries().values():
            click.echo(f"{q.name:<26} {q.purpose}")
            for p, (default, meaning) in q.params.items():
                shown = "none" if default == "NULL" else default
                click.echo(f"{'':<28}--param {p}=…  {meaning} (default {shown})")
        return
    if shell:
        analytics.open_shell(run_or_bundle)
        return
    if (text is None) == (name is None):
        raise UsageError("give either SQL text or --query NAME (see `actstore sql RUN --list`)")
    values = {}
    for item in params:
        if "=" not in item:
            raise UsageError(f"--param {item!r} is not name=value")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    if name is not None:
        df = analytics.query(run_or_bundle, name, **values)
    else:
        df = analytics.sql(run_or_bundle, text, **values)
    if fmt == "parquet" and out is None:
        raise UsageError("--format parquet needs --out FILE")
    if fmt == "table":
        rendered = analytics.format_table(df)
    elif fmt == "csv":  # CSV has no lists: nested values are written as their text
        nested = [c for c, t in df.schema.items() if t.is_nested()]
        rendered = df.with_columns(pl.col(nested).map_elements(str, return_dtype=pl.String)).write_csv()
    elif fmt == "json":
        rendered = df.write_json()
    if out is not None:
        if fmt == "parquet":
            df.write_parquet(out)
        else:
            with open(out, "w") as fh:
                fh.write(rendered)
        click.echo(f"{len(df)} rows written to {out}", err=True)
    else:
        click.echo(rendered.rstrip("\n"))


@main.command(short_help="Run the whole pipeline on the shipped tiny model (what `make demo` runs).")
@click.option("--out", default="demo", show_default=True, help="Directory for the demo's stores and outputs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, quiet: bool) -> None:
    """Harvest train and eval stores of the tiny model and describe them; re-running resumes."""
    from actstore.demo import demo as run

    run(out, progress=not quiet)


from actstore.cli.bundle import bundle  # noqa: E402
from actstore.cli.report import report  # noqa: E402

main.add_command(bundle)
main.add_command(report)

if __name__ == "__main__":
    main()

"""`actstore …`: click commands, each a thin layer over a step of actstore/steps/; options come from the
steps' Options dataclasses (cli/options.py), so each is declared and checked once."""

from __future__ import annotations

import sys
from typing import Any

import click

from actstore import __version__, diskspace
from actstore.analytics import FORMATS
from actstore.cli.options import options_of, take
from actstore.errors import ActstoreError
from actstore.steps.darkmatter import DarkmatterOptions
from actstore.steps.evaluate import EvalOptions
from actstore.steps.harvest import HarvestOptions
from actstore.steps.train import Sweep, TrainOptions

# Every character str.splitlines() breaks at, written as its escape: an error names what the user typed, and
# a value holding a newline must not turn the one-line error into two.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(text: str) -> str:
    return text.translate(_LINE_BREAKS)


class _OneLineUsageError(click.UsageError):
    """click's usage error (bad value, unknown option, missing argument) printed like every other error: one
    line (error: MESSAGE; see `actstore CMD --help`) and exit 2, not click's usage block."""

    def __init__(self, message: str, ctx: click.Context | None, command: str) -> None:
        super().__init__(message, ctx)
        self.command = command

    def show(self, file: Any = None) -> None:
        message = self.message[:-1] if self.message.endswith(".") else self.message
        click.echo(f"error: {_one_line(message)}; see `{self.command} --help`", err=True, file=file)


def _one_line_usage(exc: click.UsageError, root: click.Context | None = None) -> click.UsageError:
    """The same error, shown on one line; a bare group's help (`actstore`, `actstore bundle`) stays as it is.
    Some of click's errors carry no context; then the subcommand the root context dispatched to is named."""
    if isinstance(exc, (_OneLineUsageError, click.exceptions.NoArgsIsHelpError)):
        return exc
    names, ctx = [], exc.ctx
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    if exc.ctx is None and root is not None and root.invoked_subcommand:
        names = [root.invoked_subcommand]
    return _OneLineUsageError(exc.format_message(), exc.ctx, " ".join(["actstore", *reversed(names)]))


class _Group(click.Group):
    """Prints an ActstoreError, and click's own usage errors, as one line (no traceback, no usage block) and
    exits 2 for usage, 1 for runtime."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # `actstore --bogus`
            raise _one_line_usage(exc) from None

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # an unknown command, or a subcommand's options and arguments
            raise _one_line_usage(exc, ctx) from None
        except ActstoreError as exc:
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:  # a path the OS refused that no step checked first: still one line, no traceback
            if diskspace.full_error(exc) is not None:
                click.echo(f"error: {_one_line(str(exc))}; free space, then re-run the same command", err=True)
                sys.exit(1)
            where = next((str(n) for n in (exc.filename, exc.filename2) if n), "a path")
            reason = exc.strerror or type(exc).__name__
            click.echo(f"error: cannot use {_one_line(where)} ({reason}); choose another path", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="actstore")
def main() -> None:
    """actstore: harvest activations once into Zarr, then train, evaluate and query SAEs from the data."""


@main.command(short_help="Run a model over a corpus and write activations to a Zarr v3 store.")
@click.argument("out_store")
@options_of(HarvestOptions)
@click.option("--overwrite", is_flag=True, help="Replace a store at OUT_STORE that was harvested with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(out_store: str, overwrite: bool, quiet: bool, **kw: Any) -> None:
    """Harvest activations of --model at --hooks over --corpus into OUT_STORE (resumable: re-run the
    same command after an interruption)."""
    from actstore.steps.harvest import harvest as run

    run(out_store, take(HarvestOptions, kw), overwrite=overwrite, progress=not quiet)
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
@options_of(Sweep)
@options_of(TrainOptions)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(store: str, run: str, quiet: bool, **kw: Any) -> None:
    """Train every combination of --hooks × --k × --expansion × --tokens × --seeds on STORE (resumable:
    re-run the same command after an interruption)."""
    from actstore.distributed import world
    from actstore.steps.train import summary
    from actstore.steps.train import train as run_train

    specs = take(Sweep, kw).specs()
    run_train(store, run, specs, take(TrainOptions, kw), progress=not quiet)
    if not world().leader:  # under torchrun rank 0 speaks for all
        return
    wanted = {s.sae_id for s in specs}
    for row in summary(run):
        if row["sae_id"] in wanted:
            drop = "-" if row["still_improving"] is None else f"{row['still_improving']:.1%}"
            click.echo(
                f"{row['sae_id']:<48} lr {row['lr']:.2e}  FVU {row['fvu']:.4f}  dead {row['dead_frac']:.3f}  "
                f"L0 {row['l0']:.1f}  still improving {drop}"
            )


@main.command("eval", short_help="Evaluate SAEs on an eval store: per-token Parquet records, reconstructions in Zarr.")
@click.argument("eval_store")
@click.option("--run", required=True, help="Run directory: SAEs from RUN/saes (unless --sae), records to RUN/records.")
@click.option(
    "--sae", "sae_paths", multiple=True, help="An SAE directory in SAELens's layout (TopK, ReLU, JumpReLU); repeatable."
)
@options_of(EvalOptions)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def eval_(eval_store: str, run: str, sae_paths: tuple[str, ...], quiet: bool, **kw: Any) -> None:
    """Evaluate the SAEs of RUN (or --sae PATH …) on EVAL_STORE, running the model once: activation-space
    numbers, patched CE/KL with zero-ablation and the random baselines of the error's size, and the active
    codes. With --patch-pos P only P is patched (kept beside the every-position records); --eps-draws N adds
    study 001's z-score of the SAE's KL among N ε-random draws at P."""
    from actstore.analytics import format_table, headline, query
    from actstore.distributed import world
    from actstore.steps.evaluate import evaluate

    options = take(EvalOptions, kw)
    evaluate(eval_store, run, list(sae_paths) or None, options, progress=not quiet)
    if not world().leader:  # under torchrun rank 0 speaks for all
        return
    click.echo(format_table(headline(run)))
    if options.eps_draws is not None:
        click.echo(format_table(query(run, "eps_zscores").drop("sae_id")))


@main.command(short_help="Dark matter: fit the linear error probes of RUN's evaluated SAEs and patch their parts.")
@click.argument("run")
@options_of(DarkmatterOptions)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def darkmatter(run: str, quiet: bool, **kw: Any) -> None:
    """From the eval store's activations and reconstructions, fit x → error on even sequences and score on
    odd ones: vector R², the FVU split into linear and nonlinear error, and the norm prediction test; then
    patch x̂ + linear error and x̂ + nonlinear error on the odd sequences. Writes the `darkmatter` and
    `darkmatter_tokens` tables and RUN/darkmatter/<sae_id>/probe.safetensors."""
    from actstore.analytics import format_table, query
    from actstore.distributed import world
    from actstore.steps.darkmatter import darkmatter as fit

    fit(run, take(DarkmatterOptions, kw), progress=not quiet)
    if not world().leader:  # under torchrun rank 0 speaks for all
        return
    click.echo(format_table(query(run, "darkmatter").drop("sae_id")))


@main.command(short_help="Participation ratio of every hook of a store, into RUN's `layers` table.")
@click.argument("store")
@click.option("--run", required=True, help="Run directory whose records/layers receives the rows.")
@click.option("--max-seqs", default=None, type=int, help="Use only the first N sequences of the store.")
def layers(store: str, run: str, max_seqs: int | None) -> None:
    """PR = (Σλ)²/Σλ² of the activations' covariance eigenvalues, raw and without the top direction, per hook.
    `actstore eval` does this for its eval store; this command covers stores without SAEs (all layers)."""
    from actstore.analytics import format_table
    from actstore.options import positive
    from actstore.steps.layers import write_layers

    positive("max_seqs", max_seqs, allow_none=True)
    click.echo(format_table(write_layers(store, run, max_seqs).drop("store")))


@main.command("sql", short_help="Query a run's or bundle's records with DuckDB SQL, ad hoc or a named query.")
@click.argument("run_or_bundle")
@click.argument("text", required=False)
@click.option("--query", "name", default=None, help="A named query from sql/ (see --list).")
@click.option("--param", "params", multiple=True, help="name=value for the named query; repeatable.")
@click.option("--list", "list_queries", is_flag=True, help="List the named queries, their purpose and parameters.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
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
    """Views: saes, tokens, codes, latents, evals, curves, darkmatter, darkmatter_tokens, layers, vocab (empty
    for tables the run lacks). Examples:

    \b
      actstore sql RUN --list
      actstore sql RUN --query summary --param min_pos=1
      actstore sql RUN "SELECT sae_id, avg(kl_patched) FROM tokens GROUP BY ALL" --format csv
    """
    from actstore import analytics
    from actstore.errors import UsageError

    if list_queries or shell:  # either ignores what a query would take: refuse it rather than drop it silently
        given = {"SQL text": text is not None, "--query": name is not None, "--param": bool(params)}
        given.update({"--out": out is not None, "--shell": list_queries and shell})
        if any(given.values()):
            clash = ", ".join(k for k, v in given.items() if v)
            raise UsageError(f"{'--list' if list_queries else '--shell'} takes no {clash}; give it alone with RUN")
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
    if fmt == "parquet" and out is None:
        raise UsageError("--format parquet needs --out FILE")
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
    if name is not None and df.is_empty():
        click.echo(f"note: {analytics.why_empty(run_or_bundle, name)}", err=True)
    if out is not None:
        analytics.write_result(df, fmt, out)
        click.echo(f"{len(df)} rows written to {out}", err=True)
    else:
        click.echo(analytics.render(df, fmt).rstrip("\n"))


@main.command(short_help="Run the whole pipeline on the two shipped models (what `make demo` runs).")
@click.option("--out", default="demo", show_default=True, help="Directory for the demo's stores and outputs.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: str, quiet: bool) -> None:
    """The whole pipeline on the two shipped models (tiny and tiny-192 at matched depths): harvest, train a
    k sweep and a budget sweep with repeats, eval, dark matter, the studies' tables, report and bundle;
    re-running resumes."""
    from actstore.steps.demo import demo as run

    run(out, progress=not quiet)


from actstore.cli.bundle import bundle  # noqa: E402
from actstore.cli.report import report  # noqa: E402

main.add_command(bundle)
main.add_command(report)

if __name__ == "__main__":
    main()

"""What the study scripts share: reading `--model NAME:LAYERS` pairs into a `Plan` and printing tables."""

from __future__ import annotations

import argparse

from actstore.analytics import format_table
from actstore.steps.demo import Plan
from actstore.units import parse_count


def model_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """`tiny:1,3,5` → ("tiny", (1, 3, 5)): a model and its layers at matched relative depths."""
    name, _, layers = text.rpartition(":")
    if not name or not layers:
        raise argparse.ArgumentTypeError(f"--model takes NAME:L1,L2,… (e.g. tiny:1,3,5), got {text!r}")
    return name, tuple(int(v) for v in layers.split(","))


def add_plan_args(ap: argparse.ArgumentParser, tokens: str) -> None:
    ap.add_argument("--out", default="demo", help="directory of the stores and run (the demo's by default: reused)")
    ap.add_argument(
        "--model",
        type=model_arg,
        action="append",
        help="NAME:LAYERS, twice (the smaller model first or not: sides go by size); default tiny:1,3,5 and tiny-192:2,6,10",
    )
    ap.add_argument("--hook-kind", default="hook_resid_post", help="blocks.{L}.<this> is the hook at each layer")
    ap.add_argument("--k", default="8,16,32,64", help="the k sweep")
    ap.add_argument("--tokens", default=tokens, help="token budgets, comma-separated (150k, 1M, …)")
    ap.add_argument("--store-tokens", default="300k", help="tokens harvested per train store")
    ap.add_argument("--expansion", type=int, default=4)
    ap.add_argument("--eval-seqs", type=int, default=96)


def plan_from(args: argparse.Namespace, **extra) -> Plan:
    models = args.model or [("tiny", (1, 3, 5)), ("tiny-192", (2, 6, 10))]
    return Plan(
        models={name: tuple(f"blocks.{layer}.{args.hook_kind}" for layer in layers) for name, layers in models},
        ks=tuple(int(k) for k in args.k.split(",")),
        budgets=tuple(parse_count(t) for t in args.tokens.split(",")),
        store_tokens=parse_count(args.store_tokens),
        expansion=args.expansion,
        eval_seqs=args.eval_seqs,
        **extra,
    )


def show(title: str, df) -> None:
    print(f"\n{title}")
    print(format_table(df, decimals=3))

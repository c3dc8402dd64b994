"""The Options dataclasses and the CLI agree: each click option is derived from a field, with its help,
its spelling and its default, and every check lives in the dataclass (so the library refuses what the CLI
refuses)."""

from __future__ import annotations

import subprocess
import sys
import typing
from dataclasses import MISSING, fields

import click
import pytest

from actstore.cli.main import main
from actstore.errors import UsageError
from actstore.options import build, cli_fields
from actstore.steps.darkmatter import DarkmatterOptions
from actstore.steps.evaluate import EvalOptions
from actstore.steps.harvest import HarvestOptions
from actstore.steps.train import Sweep, TrainOptions

# command -> (its Options classes, the arguments it needs to parse, the options it has besides the fields')
COMMANDS = {
    "harvest": ((HarvestOptions,), ["OUT"], {"out_store", "overwrite", "quiet"}),
    "train": ((Sweep, TrainOptions), ["STORE", "--out", "RUN", "--hooks", "h.a,h.b"], {"store", "run", "quiet"}),
    "eval": ((EvalOptions,), ["EVAL", "--run", "RUN"], {"eval_store", "run", "sae_paths", "quiet"}),
    "darkmatter": ((DarkmatterOptions,), ["RUN"], {"run", "quiet"}),
}
CASES = [(command, cls) for command, (classes, _, _) in COMMANDS.items() for cls in classes]


def _params(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in main.commands[command].params}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("command, cls", CASES, ids=[f"{c}-{k.__name__}" for c, k in CASES])
def test_every_cli_field_is_an_option_with_its_help_spelling_and_choices(command, cls):
    params = _params(command)
    hints = typing.get_type_hints(cls)
    exposed = cli_fields(cls)
    assert exposed, cls
    for f in exposed:
        assert f.name in params, f"{cls.__name__}.{f.name} is not an option of `actstore {command}`"
        p = params[f.name]
        assert isinstance(p, click.Option)
        assert p.help == f.metadata["help"] and p.help.strip(), f.name
        spelled = p.opts + p.secondary_opts
        want = f.metadata.get("flag") or _flag(f.name)
        if hints[f.name] is bool:  # an on/off pair: the field's spelling, or --x/--no-x
            want = want if "/" in want else f"{want}/--no-{want[2:]}"
            assert p.is_flag and p.default is f.default, f.name
        assert spelled == want.split("/"), (f.name, spelled, want)
        if f.metadata.get("choices"):
            assert isinstance(p.type, click.Choice) and tuple(p.type.choices) == tuple(f.metadata["choices"])
        assert p.required == bool(f.metadata.get("required")), f.name


@pytest.mark.parametrize("command, cls", CASES, ids=[f"{c}-{k.__name__}" for c, k in CASES])
def test_library_only_fields_are_not_options(command, cls):
    params = _params(command)
    hidden = [f for f in fields(cls) if not f.metadata.get("cli", False)]
    spellings = {o for p in params.values() for o in (*p.opts, *p.secondary_opts)}
    for f in hidden:
        assert f.name not in params and _flag(f.name) not in spellings, f.name
    if cls is TrainOptions:  # the schedule's shape and the logging cadence are library options
        assert {f.name for f in hidden} >= {"warmup_frac", "decay_frac", "grad_clip", "log_every"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_commands_options_are_its_fields_and_its_own_arguments(command):
    classes, _, own = COMMANDS[command]
    from_fields = {f.name for cls in classes for f in cli_fields(cls)}
    assert from_fields.isdisjoint(own)
    assert set(_params(command)) == from_fields | own


@pytest.mark.parametrize("command, cls", CASES, ids=[f"{c}-{k.__name__}" for c, k in CASES])
def test_cli_defaults_read_through_build_are_the_dataclass_defaults(command, cls):
    params = _params(command)
    for f in cli_fields(cls):
        default = None if f.default is MISSING else f.default
        assert build(cls, {f.name: params[f.name].default}) == build(cls, {}), f.name
        assert getattr(build(cls, {f.name: params[f.name].default}), f.name) == default, f.name
    # and what the command itself parses from a bare command line is the default Options
    classes, args, _ = COMMANDS[command]
    ctx = main.commands[command].make_context(command, list(args))
    got = build(cls, {f.name: ctx.params[f.name] for f in cli_fields(cls)})
    want = cls(hooks=("h.a", "h.b")) if cls is Sweep else cls()
    assert got == want


def test_text_is_read_the_way_the_cli_reads_it():
    o = build(HarvestOptions, {"tokens": "2M", "hooks": "a, b", "skip_tokens": "1.5k"})
    assert (o.tokens, o.hooks, o.skip_tokens) == (2_000_000, ("a", "b"), 1_500)
    assert build(HarvestOptions, {"tokens": "2M", "hooks": "a,b"}) == HarvestOptions(tokens=2_000_000, hooks=("a", "b"))
    s = build(Sweep, {"hooks": "x", "k": "8,16", "tokens": "1M,250k", "seeds": "0,1"})
    assert (s.k, s.tokens, s.seeds, s.expansion) == ((8, 16), (1_000_000, 250_000), (0, 1), (8,))
    assert len(s.specs()) == 2 * 2 * 2
    assert build(TrainOptions, {"dead_tokens": "10k"}).dead_tokens == 10_000
    assert build(HarvestOptions, {"tokens": 4096}).tokens == 4096  # a value that is not text is taken as is
    with pytest.raises(UsageError, match="unknown HarvestOptions option"):
        build(HarvestOptions, {"tokenz": "2M"})


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: HarvestOptions(batch_size=0), "--batch-size 0 must be at least 1"),
        (lambda: HarvestOptions(chunk_seqs=3, batch_size=32), "--chunk-seqs 3 must divide --batch-size 32"),
        (lambda: HarvestOptions(hooks=()), "no --hooks"),
        (lambda: HarvestOptions(hooks=("a", "a")), "twice"),
        (lambda: HarvestOptions(split="test"), "unknown --split"),
        (lambda: HarvestOptions(seq_len=128, tokens=100), "less than one sequence"),
        (lambda: build(Sweep, {"hooks": "x", "lr": "-1"}), "--lr -1 must be positive numbers"),
        (lambda: build(Sweep, {"hooks": "x", "lr": "nan"}), "must be positive numbers"),
        (lambda: build(Sweep, {"hooks": "x", "lr": "fast"}), "--lr takes comma-separated positive numbers"),
        (lambda: TrainOptions(batch_size=0), "--batch-size 0 must be at least 1"),
        (lambda: TrainOptions(auxk_coef=-0.5), "--auxk-coef"),
        (lambda: TrainOptions(log_every=0), "--log-every 0"),
        (lambda: EvalOptions(max_seqs=0), "--max-seqs 0 must be at least 1"),
        (lambda: EvalOptions(patch_pos=-1), "--patch-pos -1 must be at least 0"),
        (lambda: EvalOptions(compute_dtype="int8"), "unknown --compute-dtype"),
        (lambda: DarkmatterOptions(max_seqs=1), "--max-seqs 1 must be at least 2"),
        (lambda: DarkmatterOptions(batch_size=0), "--batch-size 0 must be at least 1"),
        (lambda: build(HarvestOptions, {"tokens": "lots"}), "cannot read token count"),
        (lambda: build(Sweep, {"hooks": "x", "k": "a"}), "--k takes comma-separated whole numbers"),
    ],
)
def test_invalid_values_are_refused_by_the_dataclass_itself(make, needle):
    with pytest.raises(UsageError) as info:
        make()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_valid_edge_values_are_accepted():
    assert DarkmatterOptions(max_seqs=2).max_seqs == 2
    assert EvalOptions(max_seqs=1, patch_pos=0).patch_pos == 0
    assert HarvestOptions(chunk_seqs=8, batch_size=32).chunk_seqs == 8
    assert TrainOptions(auxk_coef=0.0).auxk_coef == 0.0
    assert build(Sweep, {"hooks": "x", "lr": "1e-9,0.5"}).lr == (1e-9, 0.5)
    assert build(Sweep, {"hooks": "x", "lr": "auto"}).lr == ()


def test_a_bad_list_option_on_the_command_line_is_one_line(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "actstore.cli.main", "train", str(tmp_path / "no.zarr"), "--out", str(run)]
        + ["--hooks", "blocks.0.hook_resid_post", "--k", "a", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "--k takes comma-separated whole numbers" in lines[0] and "'a'" in lines[0]
    assert not run.exists()  # refused before anything was written

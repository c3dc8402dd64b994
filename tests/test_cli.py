"""The command line: help, version, and one-line errors that leave existing data alone."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HOOKS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "actstore.cli.main", *args], capture_output=True, text=True)


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def _help_entries(text: str) -> dict[str, str]:
    """The `Commands:` section of a group's --help: name -> its description, wrapped lines joined."""
    section = text.split("Commands:", 1)[1]
    entries: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):  # the next section (none today)
            break
        indent = len(line) - len(line.lstrip())
        if indent == 2:
            name, _, rest = line.strip().partition(" ")
            entries[name] = rest.strip()
        elif name is not None:  # a wrapped description continues on a deeper-indented line
            entries[name] += " " + line.strip()
    return entries


def test_help_lists_every_command_with_a_description():
    from click.testing import CliRunner

    from actstore.cli.main import main

    out = run_cli("--help")
    assert out.returncode == 0
    listed = _help_entries(out.stdout)
    expected = ("harvest", "info", "train", "eval", "darkmatter", "layers", "sql", "report", "bundle", "demo")
    assert set(expected) <= set(main.commands)
    assert set(listed) == set(main.commands), listed  # every registered command, nothing else
    for name, command in main.commands.items():
        short = " ".join(command.get_short_help_str(limit=10_000).split())
        assert len(short) > 10 and not short.endswith("..."), (name, short)  # a real sentence, not truncated
        assert listed[name] == short, (name, listed[name], short)
    # the bundle group's own --help lists its subcommands the same way
    group = main.commands["bundle"]
    sub = CliRunner().invoke(main, ["bundle", "--help"], terminal_width=300)
    assert sub.exit_code == 0, sub.output
    entries = _help_entries(sub.output)
    assert set(entries) == set(group.commands) == {"create", "verify"}
    for name, command in group.commands.items():
        short = " ".join(command.get_short_help_str(limit=10_000).split())
        assert short and entries[name] == short, (name, entries[name])
    assert "--corpus" in run_cli("harvest", "--help").stdout


def test_version_prints_the_package_version():
    import actstore

    assert actstore.__version__ in run_cli("--version").stdout


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


BAD_INPUTS = {
    "unknown hookpoint": (["--hooks", "blocks.1.hook_resid_pots"], ["unknown hookpoint", "blocks.{L}.hook_resid_post"]),
    "unknown model": (["--model", "no-such-org/no-such-model"], ["could not load model", "tiny"]),
    "seq-len past context": (["--seq-len", "4096"], ["longer than", "context of 256"]),
    "unknown codec": (["--codec", "gzip9"], ["unknown --codec", "bitround-N"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_the_existing_store_alone(case, small_store):
    args, needles = BAD_INPUTS[case]
    before = tree_digest(small_store)
    # --overwrite: even a command allowed to replace the store must leave it alone when it fails
    result = run_cli("harvest", small_store, "--hooks", ",".join(HOOKS), "--quiet", "--overwrite", *args)
    _assert_one_line_error(result, *needles)
    assert tree_digest(small_store) == before


def test_empty_corpus_is_a_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "s.zarr"
    result = run_cli("harvest", str(out), "--corpus", str(tmp_path / "empty.txt"), "--quiet")
    _assert_one_line_error(result, "no full sequence")
    assert not out.exists()


def test_unwritable_output_path_is_a_clear_error(tmp_path):
    # A path below a regular file can never be created, whoever runs the test (root ignores chmod).
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    result = run_cli("harvest", str(blocker / "sub" / "s.zarr"), "--quiet")
    _assert_one_line_error(result, "cannot write")
    assert blocker.read_text() == "x"


def test_output_path_that_is_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("precious")
    result = run_cli("harvest", str(target), "--quiet")
    _assert_one_line_error(result, "is a file")
    assert target.read_text() == "precious"


def test_info_on_a_path_that_is_not_a_store_is_a_clear_error(tmp_path):
    _assert_one_line_error(run_cli("info", str(tmp_path)), "not a Zarr v3 store")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--hooks", "blocks.0.attn.hook_pattern"], "once per token"),
        (["--tokens", "inf"], "not a whole"),
        (["--chunk-seqs", "-4"], "at least 1"),
        (["--shard-seqs", "0"], "at least 1"),
        (["--hooks", "blocks.1.hook_resid_post,blocks.1.hook_resid_post"], "twice"),
    ],
)
def test_more_bad_options_are_one_line_errors(tmp_path, args, needle):
    out = tmp_path / "s.zarr"
    _assert_one_line_error(run_cli("harvest", str(out), "--tokens", "4k", "--seq-len", "64", "--quiet", *args), needle)
    assert not out.exists()


def test_bad_corpus_content_is_a_one_line_error_naming_the_place(tmp_path):
    import numpy as np

    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": 12}\n')
    _assert_one_line_error(
        run_cli("harvest", str(tmp_path / "a"), "--corpus", str(tmp_path / "c.jsonl"), "--quiet"), "c.jsonl:2"
    )
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{broken\n')
    _assert_one_line_error(
        run_cli("harvest", str(tmp_path / "b"), "--corpus", str(tmp_path / "d.jsonl"), "--quiet"), "d.jsonl:2"
    )
    np.save(tmp_path / "f.npy", np.ones((4, 64), dtype=np.float32))
    _assert_one_line_error(
        run_cli("harvest", str(tmp_path / "c"), "--corpus", str(tmp_path / "f.npy"), "--quiet"), "not token ids"
    )


def test_failed_overwrite_leaves_the_old_store_as_it_was(small_store, tmp_path):
    import shutil

    import numpy as np

    store = str(tmp_path / "copy.zarr")
    shutil.copytree(small_store, store)
    before = tree_digest(store)
    tokens = np.full((40, 64), 65, dtype=np.int64)
    tokens[20:, 5] = 300  # past the vocabulary, in the second batch: the failure comes mid-harvest
    np.save(tmp_path / "bad.npy", tokens)
    result = run_cli(
        "harvest",
        store,
        "--corpus",
        str(tmp_path / "bad.npy"),
        "--seq-len",
        "64",
        "--tokens",
        str(40 * 64),
        "--batch-size",
        "8",
        "--overwrite",
        "--quiet",
    )
    _assert_one_line_error(result, "outside 0")
    assert tree_digest(store) == before


def test_a_store_killed_while_being_created_is_resumed_not_bricked(tmp_path):
    import zarr

    from actstore.steps.harvest import HarvestOptions, harvest

    out = str(tmp_path / "s.zarr")
    opts = HarvestOptions(hooks=HOOKS[:1], seq_len=32, tokens=8 * 32, batch_size=8)
    # What a kill right after the group's first write leaves: settings, no arrays.
    zarr.create_group(out, attributes={"settings": opts.settings(), "commit": {"n_seq": 0}}, zarr_format=3)
    harvest(out, opts)
    assert zarr.open_group(out, mode="r").attrs["commit"]["n_seq"] == 8


STEPS = {  # actstore.<name> is this function of this module (defined there, not re-exported from elsewhere)
    "harvest": ("actstore.steps.harvest", "harvest"),
    "train": ("actstore.steps.train", "train"),
    "sweep": ("actstore.steps.train", "sweep"),
    "evaluate": ("actstore.steps.evaluate", "evaluate"),
    "darkmatter": ("actstore.steps.darkmatter", "darkmatter"),
    "layers": ("actstore.steps.layers", "write_layers"),
    "report": ("actstore.steps.report", "report"),
    "demo": ("actstore.steps.demo", "demo"),
    "bundle_create": ("actstore.steps.bundle", "create"),
    "bundle_verify": ("actstore.steps.bundle", "verify"),
    "query": ("actstore.analytics", "query"),
    "store_info": ("actstore.info", "store_info"),
}


def test_every_step_is_also_a_python_function_of_the_package():
    import importlib
    import inspect
    import types

    import actstore
    import actstore.steps

    assert set(STEPS) <= set(actstore.__all__)
    for name, (module_name, attr) in STEPS.items():
        module = importlib.import_module(module_name)
        assert isinstance(module, types.ModuleType), module_name
        fn = getattr(actstore, name)
        assert inspect.isfunction(fn), name
        assert fn is getattr(module, attr), f"actstore.{name} is not {module_name}.{attr}"
        assert fn.__module__ == module_name, f"{module_name}.{attr} is defined in {fn.__module__}"
    # No step function shadows its module: the package attribute and `import … as` both give the module.
    for module_name in {m for m, _ in STEPS.values() if m.startswith("actstore.steps.")}:
        leaf = module_name.rsplit(".", 1)[1]
        assert isinstance(getattr(actstore.steps, leaf), types.ModuleType), module_name
        assert sys.modules[module_name] is getattr(actstore.steps, leaf)
    import actstore.steps.report as report_module

    assert isinstance(report_module, types.ModuleType) and report_module.report is actstore.report


def test_readme_cli_reference_names_every_command_and_option():
    """The README's CLI reference is kept in sync with the commands' --help."""
    from pathlib import Path

    import click

    from actstore.cli.main import main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## CLI reference", 1)[1].split("\n## ", 1)[0]

    def walk(cmd: click.Command, path: str):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, cmd

    for path, cmd in walk(main, "actstore"):
        assert path in section, f"{path} is missing from the README's CLI reference"
        for param in cmd.params:
            for opt in [o for o in param.opts + param.secondary_opts if o.startswith("--") and o != "--help"]:
                assert opt in section, f"{path} {opt} is missing from the README's CLI reference"


def test_layers_cli_writes_one_partition_per_store_and_checks_its_options(small_store, tmp_path):
    from actstore.run import read_table

    run = str(tmp_path / "run")
    bad = run_cli("layers", small_store, "--run", run, "--max-seqs", "0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--max-seqs" in bad.stderr
    for spelling in (small_store, small_store + "/"):  # the same store twice: still one partition
        out = run_cli("layers", spelling, "--run", run, "--max-seqs", "4")
        assert out.returncode == 0, out.stderr
    layers = read_table(run, "layers")
    assert sorted(layers["hook"]) == sorted(HOOKS) and layers["n_tokens"].to_list() == [4 * 64] * 2
    missing = run_cli("darkmatter", run)  # layers records, but no eval records: a usage error naming the fix
    assert missing.returncode == 2
    _assert_one_line_error(missing, "actstore eval")

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


def test_help_lists_every_command_with_a_description():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("harvest", "info", "demo"):
        assert command in out.stdout
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

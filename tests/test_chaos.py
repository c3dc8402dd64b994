"""The fast subset of bench/chaos.py: each command SIGKILLed at two seeded random moments (in half the
trials once more while it resumes), re-run, and compared with its uninterrupted run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("chaos", Path(__file__).resolve().parent.parent / "bench" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
sys.modules["chaos"] = chaos
_spec.loader.exec_module(chaos)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chaos")
    chaos.build_fixtures(root)
    return root


@pytest.mark.parametrize("command", list(chaos.CASES))
def test_a_killed_command_rerun_matches_the_uninterrupted_one(workdir, command):
    result = chaos.campaign(command, kills=2, seed=1, root=workdir, log=lambda _: None)
    assert result["failures"] == [] and result["survived"] == 2, result
    assert result["kills_landed"] >= 1, "no kill landed before the command finished: the trial showed nothing"

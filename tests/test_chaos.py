"""The fast subset of bench/chaos.py: each command SIGKILLed at seeded random moments (in half the trials
once more while it resumes), re-run, and compared with its uninterrupted run. Two trials for the commands
that write stores and weights, one for those whose outputs are built aside and renamed (suite time)."""

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
    chaos.SIZE.update(chaos.SIZES["small"])
    root = tmp_path_factory.mktemp("chaos")
    chaos.build_fixtures(root)
    return root


TRIALS = {"harvest": 2, "train": 2, "eval": 2, "darkmatter": 1, "report": 1, "bundle": 1}


@pytest.mark.parametrize("command", list(chaos.CASES))
def test_a_killed_command_rerun_matches_the_uninterrupted_one(workdir, command):
    result = chaos.campaign(command, kills=TRIALS[command], seed=1, root=workdir, log=lambda _: None)
    assert result["failures"] == [] and result["survived"] == TRIALS[command], result
    assert result["kills_landed"] >= 1, "no kill landed before the command finished: the trial showed nothing"


_cp_spec = importlib.util.spec_from_file_location(
    "crashpoints", Path(__file__).resolve().parent.parent / "bench" / "crashpoints.py"
)
crashpoints = importlib.util.module_from_spec(_cp_spec)
_cp_spec.loader.exec_module(crashpoints)

# Stops before these changes to the files (bench/crashpoints.py): harvest's 8th is inside the store's first
# zarr.json write (only zarr.<uuid>.partial is left, a window a random kill once hit in CI), its 18th and
# 30th between the creation of its arrays.
POINTS = {"harvest": [8, 18, 30]}


@pytest.mark.parametrize("command", list(POINTS))
def test_a_command_stopped_before_a_change_to_its_files_reruns_to_the_same_outputs(workdir, command):
    result = crashpoints.sweep(command, 0, workdir, log=lambda _: None, only=POINTS[command])
    assert result["failures"] == [] and result["stopped"] == len(POINTS[command]), result

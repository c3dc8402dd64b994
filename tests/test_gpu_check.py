"""bench/gpu_check.py runs end to end on the CPU (`--device cpu --quick`), and its checks can fail.

The script is meant for a GPU machine that CI never has; running it here at tiny shapes keeps it from
rotting, and the corrupted-kernel cases show that its comparisons are not vacuous.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from actstore import sae as sae_module

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check
_spec.loader.exec_module(gpu_check)

SECTIONS = ("harvest", "sae", "eval", "patching", "harvest_speed", "train_speed", "loader_speed", "eval_speed")


def test_the_quick_cpu_run_passes_every_check_and_prints_one_json_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--keep", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])  # the last line is the JSON object
    assert proc.returncode == 0 and result["ok"] and result["failed"] == [], (result, proc.stderr[-3000:])
    assert set(SECTIONS) <= set(result)
    assert result["harvest"]["device_runs_bit_identical"]
    assert result["patching"]["neox"]["path"] == "suffix" and result["patching"]["gemma2"]["path"] == "suffix"
    assert result["patching"]["gemma2"]["softcap"] == 5.0
    assert result["eval"]["rows"] > 0 and {"kl_eps", "ce_actdiff", "kl_patched"} <= set(result["eval"])
    for name in ("harvest_speed", "loader_speed", "eval_speed"):
        assert all(v > 0 for k, v in result[name].items() if k.endswith(("_per_s", "_vs_naive", "_vs_bare"))), name
    assert all(row["tokens_per_s"] > 0 for key, row in result["train_speed"].items() if key.startswith("d"))


def test_the_sae_check_fails_when_a_gradient_is_wrong(monkeypatch):
    """A decoder backward off by 1% must fail the check (1e-4 in fp32) and show up in W_dec's gradient."""
    backward = sae_module._SparseDecode.backward

    def off_by_one_percent(ctx, g_out):
        grads = list(backward(ctx, g_out))  # (vals, idx, W_dec)
        grads[2] = grads[2] * 1.01
        return tuple(grads)

    monkeypatch.setattr(sae_module._SparseDecode, "backward", staticmethod(off_by_one_percent))
    case = gpu_check._sae_case(32, 4, 4, 128, low_precision=False, device="cpu")
    assert not case["ok"] and case["grad_W_dec"] > 5e-3 and case["grad_W_enc"] < 1e-4


def test_the_sae_check_passes_the_real_kernels_at_float32_rounding():
    case = gpu_check._sae_case(32, 4, 4, 128, low_precision=False, device="cpu")
    assert case["ok"] and case["same_selection"] == 1.0 and case["max_rel"] < 1e-5


def test_the_harvest_comparison_tolerates_float16_rounding_and_nothing_more():
    """One float16 ulp of difference passes; a 1% difference does not (the rule `check_harvest` applies)."""
    ref = torch.randn(1000).half().float().numpy()
    rms = float((ref**2).mean() ** 0.5)
    one_ulp = (torch.from_numpy(ref).half() + torch.finfo(torch.float16).eps * torch.from_numpy(ref).half()).float()
    assert gpu_check.harvest_gap(one_ulp.numpy(), ref, rms) <= gpu_check.HARVEST_TOL
    assert gpu_check.harvest_gap(ref * 1.01, ref, rms) > gpu_check.HARVEST_TOL

"""Memory a device has free, and a one-line refusal when a job would not fit.

Why: a sweep holds every member's weights, gradients and Adam state on the device at once (a Gemma-size
SAE at 32× is ≈ 5.4 GB; sixteen of them ≈ 87 GB), and running out half way loses the pass. Checking
before the first step turns that into a one-line error with the numbers and the fix.
"""

from __future__ import annotations

import os

import torch

from actstore.diskspace import human
from actstore.errors import UsageError


def free_bytes(device: str) -> int | None:
    """Bytes the device can still give: CUDA's free memory, or the host's available memory for the CPU
    (MemAvailable; None where the platform does not say)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(needed: int, device: str, what: str, fix: str) -> None:
    """Refuse `what` in one line when it needs more than the device has free."""
    free = free_bytes(device)
    if free is not None and needed > free:
        raise UsageError(f"{what} needs about {human(needed)} on {device} but {human(free)} is free; {fix}")

"""One progress bar style for every long step: tokens done, tokens/s, on stderr, quiet when asked."""

from __future__ import annotations

import sys
from typing import Any


def token_bar(enabled: bool, total: int, desc: str, initial: int = 0) -> Any:
    """A tqdm bar counting tokens, or None when progress is off (callers check before updating)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )


def plural_saes(n: int) -> str:
    return f"{n} SAE{'s' if n != 1 else ''}"

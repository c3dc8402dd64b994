"""Token counts as people write them (`2M`, `500k`, `1e6`, `1_000_000`), read and written."""

from __future__ import annotations

from actstore.errors import UsageError

_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}


def parse_count(text: str | int) -> int:
    """`2M` → 2,000,000; refuses anything that is not a positive whole number of tokens."""
    if isinstance(text, int):
        value: float = text
    else:
        s = text.strip().lower().replace("_", "").replace(",", "")
        scale = _SUFFIX.get(s[-1:], 1)
        if scale != 1:
            s = s[:-1]
        try:
            value = float(s) * scale
            if scale != 1 and abs(value - round(value)) <= 1e-9 * abs(value):  # "16.1k" is 16100.000000000002
                value = float(round(value))
        except ValueError:
            raise UsageError(f"cannot read token count {text!r}; write it like 2M, 500k, 1e6 or 128000") from None
    if value != value or value in (float("inf"), float("-inf")) or value != int(value) or value < 0:
        raise UsageError(f"token count {text!r} is not a whole non-negative number")
    return int(value)


def format_count(n: int) -> str:
    """1_000_000 → '1M', 1_500_000 → '1.5M', 250_000 → '250k': the inverse of `parse_count`, never rounded."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
        if n >= scale and (n * 10) % scale == 0:
            return f"{n // scale}.{(n * 10 // scale) % 10}{unit}"
    return str(n)

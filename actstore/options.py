"""Options declared once: a dataclass field carries its default, its one-line help and how the CLI reads it.

Why: every step's options used to be spelled in the library and again in click, with their defaults and
checks drifting apart. Now an Options dataclass is the single declaration: `option(...)` stores the help
text (and the CLI's spelling, when it differs) in the field's metadata, the dataclass's `__post_init__`
holds every check, and `actstore.cli` builds each command's click options from the fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields
from typing import Any


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Callable[[str], Any] | None = None,
    shown: str | None = None,
    required: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field with its CLI documentation.

    flag: the CLI's spelling when it is not `--name-with-dashes` (e.g. "--bf16/--no-bf16");
    choices: the allowed values; parse: turns the CLI's text into the value (token counts, lists);
    shown: the default as the CLI writes it ("2M"); required: the CLI demands it; cli=False: library only.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "parse": parse, "shown": shown, "cli": cli}
    meta["required"] = required
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata=meta)


def cli_fields(cls: type) -> list[Field]:
    """The fields of an Options dataclass that the CLI exposes, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("cli", False)]


def default_of(f: Field) -> Any:
    return None if f.default is MISSING else f.default


def csv(text: str) -> tuple[str, ...]:
    """`a, b,c` → ('a', 'b', 'c'): the CLI's comma-separated lists."""
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def positive(name: str, value: int | float | None, *, allow_none: bool = False, minimum: int | float = 1) -> None:
    """A one-line UsageError unless `value` ≥ minimum (None allowed when asked)."""
    from actstore.errors import UsageError

    if value is None and allow_none:
        return
    if value is None or value != value or value < minimum:
        raise UsageError(f"--{name.replace('_', '-')} {value} must be at least {minimum}")


def build(cls: type, values: dict[str, Any]) -> Any:
    """An Options instance from keyword values; text is read the way the CLI reads it ("2M", "a,b")."""
    from actstore.errors import UsageError

    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UsageError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kw = {}
    for name, value in values.items():
        parse = known[name].metadata.get("parse")
        kw[name] = parse(value) if parse is not None and isinstance(value, str) else value
    return cls(**kw)

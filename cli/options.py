"""Click options made from the Options dataclasses, so each option is declared once (actstore/options.py)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import Field
from typing import Any

import click

from actstore.options import build, cli_fields, default_of


def _click_type(f: Field, hints: dict[str, Any]) -> Any:
    """The click type of a field: its choices, or the plain type under `X | None`; text when parsed."""
    if f.metadata.get("choices"):
        return click.Choice(list(f.metadata["choices"]))
    if f.metadata.get("parse"):
        return str
    hint = hints[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint if hint in (int, float, str) else str


def flag_name(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _cli_default(f: Field) -> Any:
    """The default as the CLI holds it: parsed fields keep their text form ("2M", "8,16"), read by `build`."""
    default = default_of(f)
    if default is None or not f.metadata.get("parse"):
        return default
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def options_of(cls: type) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per CLI field of `cls`, with the field's help and default."""
    hints = typing.get_type_hints(cls)

    def decorate(command: Callable) -> Callable:
        for f in reversed(cli_fields(cls)):
            default = _cli_default(f)
            kw: dict[str, Any] = {"help": f.metadata["help"], "show_default": default is not None}
            if f.metadata.get("required"):
                kw["required"] = True
            if hints[f.name] is bool:
                name = flag_name(f)
                decls = [name if "/" in name else f"{name}/--no-{name[2:]}", f.name]
                command = click.option(*decls, default=default, **kw)(command)
            else:
                command = click.option(flag_name(f), f.name, type=_click_type(f, hints), default=default, **kw)(command)
        return command

    return decorate


def take(cls: type, kwargs: dict[str, Any]) -> Any:
    """Remove `cls`'s CLI fields from a command's keyword arguments and build the Options from them."""
    return build(cls, {f.name: kwargs.pop(f.name) for f in cli_fields(cls) if f.name in kwargs})

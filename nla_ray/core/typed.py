"""Values from YAML and the command line, made the type their dataclass field declares.

YAML 1.1 reads `7e-4` as a string (its floats need a dot) and `1.5` where an int belongs is a typo
that should fail at parse time, naming the field, not deep inside a Ray worker or a training step.
One implementation serves the job config (`nla_ray.config`) and the training job's `--set`/`--grpo`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml


def field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) for `X | None` / `Optional[X]`; else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), type(None) in args
    return tp, False


def coerce(tp, v: Any, where: str) -> Any:
    """`v` as type `tp` (bool, int, float, str, optionally `| None`); other types pass through."""
    base, optional = _split_optional(tp)
    if v is None:
        if optional or base not in (bool, int, float, str):
            return None
        raise ValueError(f"{where}: expected a {base.__name__}, got null")
    try:
        if base is bool:
            if not isinstance(v, bool):
                raise ValueError
        elif base is float:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)
        elif base is int:
            if isinstance(v, bool):
                raise ValueError
            if isinstance(v, str):
                try:
                    v = int(v)
                except ValueError:
                    v = float(v)
            if isinstance(v, float):
                if not (math.isfinite(v) and v.is_integer()):
                    raise ValueError
                v = int(v)
            elif not isinstance(v, int):
                raise ValueError
        elif base is str and not isinstance(v, str):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        name = getattr(base, "__name__", str(base))
        hint = " (quote it to pass text that looks like a number)" if base is str else ""
        raise ValueError(f"{where}: expected a {name}{' or null' if optional else ''}, got {v!r}{hint}") from None
    return v


def coerce_text(tp, text: str, where: str) -> Any:
    """A command-line value: text as-is for str fields, YAML for the rest, then `coerce`."""
    base, _ = _split_optional(tp)
    return coerce(tp, text if base is str else yaml.safe_load(text), where)


def set_fields(obj, items: list[str], flag: str) -> None:
    """Apply `KEY=VALUE` items to a dataclass instance, each value made its field's type."""
    types_ = field_types(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        if k not in names:
            raise ValueError(f"{flag}: unknown field {k!r}; fields: {sorted(names)}")
        setattr(obj, k, coerce_text(types_[k], v, f"{flag} {k}"))

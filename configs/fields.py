"""What every config class checks its values with: the error a wrong value raises, the `_require` and
`_choice` helpers a section's `__post_init__` calls, the check of the records a section holds, and the
few reflection helpers (a dataclass's fields and their types) the checks and the loader share.

Imports neither the schema nor the loader: the schema's classes (configs/schema.py,
configs/stage_sections.py) and the generic loader (configs/loading.py) both import it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from opd.cache.errors import OpdError


class ConfigError(OpdError):
    """A config value, key or file is wrong; the message names the key and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, "must be one of " + ", ".join(repr(c) for c in choices))


def check_records(obj: Any, at: str) -> None:
    """Check the records a section (or the root, or a record) holds, in a field or a list field: each
    must be of its declared type, and its `check(path)`, where it has one, is called with its full path
    (`eval.stop`, `teachers[1]`). A record's own checks live in `check` because only its holder knows
    where it sits; its holder's `__post_init__` calls this, so they run on load and on `replace`."""
    for name, tp in _hints(type(obj)).items():
        value, where = getattr(obj, name), _join(at, name)
        if dataclasses.is_dataclass(tp):
            _check_record(value, tp, where)
        elif dataclasses.is_dataclass(_list_item(tp)):
            _require(isinstance(value, list), where, value, f"must be a list of {_list_item(tp).__name__} records")
            for i, item in enumerate(value):
                _check_record(item, _list_item(tp), f"{where}[{i}]")


def _check_record(value: Any, tp: type, at: str) -> None:
    _require(isinstance(value, tp), at, value, f"must be a {tp.__name__} record")
    if hasattr(value, "check"):
        value.check(at)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's init fields and their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _list_item(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key

"""Reading and writing config files, for any schema: a root dataclass whose fields are the sections
(tables) of the file, each a dataclass that checks itself in `__post_init__` (see configs/fields.py).
The schema is passed in as `root=` (configs/schema.py passes `OpdConfig`; tests pass small ones of their
own), and this module never imports it.

A root class may name `PATH_KEYS`: the keys (as tuples of names) holding file paths, which resolve
against the config file's folder (a `--set` one against the current folder), and `RESERVED_NAMES`: values
of those keys that name something else and stay as they are. Values are checked by
pydantic in strict mode; records and lists of records are built key by key, so every error names the
value's full path. `dumps_config` writes a config back out with tomli-w, every field included.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import tomli_w

from opd.configs.fields import ConfigError, _hints, _join, _list_item, _require

PACKAGED_CONFIGS = Path(__file__).resolve().parent  # the presets and prompt sets beside the schema
Config = TypeVar("Config")


# ------------------------------------------------------------------------------------------ loading


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a packaged preset (`tiny`, `smollm2-demo`, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / f"{p.name.removesuffix('.toml')}.toml"
    if len(p.parts) == 1 and packaged.is_file():  # a preset name (which may contain dots)
        return packaged
    presets = ", ".join(sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.toml")))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (packaged presets: {presets})")


def load_config(
    name_or_path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    root: type[Config],
) -> Config:
    """Read a TOML config (or a packaged preset name), apply `--set` overrides, validate.
    `root` is the schema (OpdConfig; tests pass a small one of their own)."""
    path = find_config(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    try:
        _resolve_paths(data, path.resolve().parent, root)
        apply_overrides(data, overrides, root=root)
        return config_from_dict(data, root=root)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads_config(text: str, base_dir: str | os.PathLike = ".", *, root: type[Config]) -> Config:
    """Like load_config, from TOML text (relative paths against `base_dir`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})") from None
    _resolve_paths(data, Path(base_dir).resolve(), root)
    return config_from_dict(data, root=root)


def _is_plain_path(value: str, root: type) -> bool:
    """A value of a path key that names a file (not `opd:`/`tiny:`/`s3://`..., nor one of the root's
    RESERVED_NAMES), so it resolves against a folder."""
    return bool(value) and ":" not in value.split("/", 1)[0] and value not in getattr(root, "RESERVED_NAMES", ())


def _resolve_paths(data: dict, base: Path, root: type) -> None:
    for keys in getattr(root, "PATH_KEYS", ()):
        *tables, key = keys
        node: Any = data
        for name in tables:
            node = node.get(name) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and _is_plain_path(value, root):
            node[key] = str((base / os.path.expanduser(value)).resolve())


_KEY_PART = re.compile(r"\s*([A-Za-z_][\w-]*)\s*((?:\[\s*\d+\s*\]\s*)*)")


def _parse_set(item: str) -> tuple[tuple[str | int, ...], Any]:
    """`a.b[1].c=value` → (("a", "b", 1, "c"), value); the value is read as TOML, else kept as a string."""
    dotted, eq, raw = item.partition("=")
    parts = [_KEY_PART.fullmatch(p) for p in dotted.split(".")]
    if not eq or not all(parts):
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
    path: list[str | int] = []
    for m in parts:
        path += [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return tuple(path), value


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value); the value is read as TOML, else kept as a string.
    The key may go deeper (`eval.stop.patience=3` → ("eval", "stop.patience", 3))."""
    path, value = _parse_set(item)
    if len(path) < 2 or not isinstance(path[1], str):
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
    return path[0], _show(path[1:]), value


def apply_overrides(data: dict, overrides, *, root: type) -> None:
    """Apply `--set PATH=VALUE` items to a config's raw TOML dict: PATH names a key of a section
    (`train.lr`), of a record in it (`eval.stop.patience`) or of the N-th record of a list
    (`section.rules[1].key`), or a top-level field that is not a section; VALUE may be a whole record
    or list as an inline TOML table or array."""
    for item in overrides:
        path, value = _parse_set(item)
        if len(path) == 1 and (path[0] not in _hints(root) or dataclasses.is_dataclass(_hints(root)[path[0]])):
            raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
        if path in getattr(root, "PATH_KEYS", ()) and isinstance(value, str) and _is_plain_path(value, root):
            value = str(Path(os.path.expanduser(value)).resolve())
        _assign(data, root, path, value)


def _assign(data: dict, root: type, path: tuple[str | int, ...], value: Any) -> None:
    """Set one value in a raw config dict, walking the schema beside it: each name must be a field of
    the record it is in, each index an existing entry of a list."""
    node: Any = data
    tp: Any = root
    for i, part in enumerate(path):
        where, here = _show(path[:i]), _show(path[: i + 1])
        if isinstance(part, int):
            if _list_item(tp) is None or not isinstance(node, list):
                raise ConfigError(f"cannot set {here}: {where} is not a list")
            if part >= len(node):
                raise ConfigError(f"cannot set {here}: {where} has {len(node)} entries")
            tp = _list_item(tp)
        else:
            if not dataclasses.is_dataclass(tp) or not isinstance(node, dict):
                raise ConfigError(f"cannot set {here}: {where} is not a table")
            _check_name(part, _hints(tp), "key" if i else "section", f"{where}." if i else "")
            tp = _hints(tp)[part]
        if i == len(path) - 1:
            node[part] = value
        elif isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(path[i + 1], int) else {})


def _show(path: tuple[str | int, ...]) -> str:
    """("a", "b", 1, "c") → "a.b[1].c"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _check_name(name: str, valid, what: str, prefix: str) -> None:
    if name not in valid:
        close = difflib.get_close_matches(name, list(valid), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"
        raise ConfigError(f"unknown {what} '{prefix}{name}'{hint}")


def config_from_dict(data: dict[str, Any], *, root: type[Config]) -> Config:
    """Build and validate a config from its raw TOML dict (tables as dicts, arrays of tables as lists)."""
    return _build(root, "", data)


def _build(cls: type, at: str, table: Any) -> Any:
    """One record (the root config, a section, a record in a section) from its table; `at` is its
    path ("" for the root), which every error names."""
    if not isinstance(table, dict):
        if at.isidentifier():  # a section: a table of the root
            raise ConfigError(f"[{at}] must be a table, got {table!r}")
        raise ConfigError(f"{at} = {table!r} is invalid: must be a table")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    replaced = getattr(cls, "REPLACED", {})
    for key in [k for k in table if k in replaced]:  # a retired key: off is a no-op (old runs' opd.toml), on an error
        if table[key]:
            raise ConfigError(f"{_join(at, key)} was replaced by {replaced[key]}")
        table = {k: v for k, v in table.items() if k != key}
    for key in table:
        _check_name(key, hints, "key" if at else "section", f"{at}." if at else "")
    for f in fields:
        if f.name not in table and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not at and dataclasses.is_dataclass(hints[f.name]):
                raise ConfigError(f"missing section [{f.name}]")
            raise ConfigError(f"missing required key {_join(at, f.name)}")
    return cls(**{key: _value(_join(at, key), value, hints[key]) for key, value in table.items()})


def _value(at: str, value: Any, tp: Any) -> Any:
    """A field's value from TOML: a record or a list of records is built key by key; anything else is
    validated by pydantic in strict mode (no str→int, no int→bool; an int is accepted for a float)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, at, value)
    item_tp = _list_item(tp)
    if item_tp is not None and dataclasses.is_dataclass(item_tp):
        _require(isinstance(value, list), at, value, "must be a list of tables (an array of tables)")
        return [_build(item_tp, f"{at}[{i}]", v) for i, v in enumerate(value)]
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        value = tuple(value)  # TOML has arrays; frozen configs hold tuples
    try:
        return _adapter(tp).validate_python(value, strict=True)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        raise ConfigError(f"{at} = {error['input']!r} is invalid: {_allowed(error, tp)}") from None


_ALLOWED = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
}


def _allowed(error: dict, tp: Any) -> str:
    if error["type"] == "list_type" and _list_item(tp) is not None:
        return f"must be a list of {_list_item(tp).__name__}"
    if typing.get_origin(tp) is tuple and error["loc"] == ():
        return f"must be a list of {typing.get_args(tp)[0].__name__}"
    return _ALLOWED.get(error["type"], error["msg"].replace("Input should be", "must be"))


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def load_run_config(run, overrides=(), *, root: type[Config]) -> Config:
    """The config a stage runs with: RUN/opd.toml plus any --set overrides given to the stage."""
    text = run.read_config_text()
    if not overrides:
        try:
            return loads_config(text, root=root)
        except ConfigError as e:
            raise ConfigError(f"{run.config_path}: {e}") from None
    try:
        data = tomllib.loads(text)
        apply_overrides(data, overrides, root=root)
        return config_from_dict(data, root=root)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{run.config_path}: not valid TOML ({e}); fix it or re-run `opd init --force`") from None
    except ConfigError as e:
        raise ConfigError(f"{run.config_path}: {e}") from None


# ------------------------------------------------------------------------------------------ writing


def dumps_config(cfg: Any) -> str:
    """TOML text of a config, every field written out (the run's resolved `opd.toml`): records as
    tables ([eval.stop]), lists of records as arrays of tables."""
    return "# Resolved opd config: every stage of this run reads this file.\n\n" + tomli_w.dumps(
        dataclasses.asdict(cfg)
    )

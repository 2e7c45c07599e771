"""`opd sweep`'s grid: `--grid train.KEY=V1,V2` items parsed into settings (the cartesian product, each
named from its values), and the checks a sweep makes before anything trains (every setting a valid
config, round R finished, λ only over a cache with both kinds of rows)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from opd.cache.errors import OpdError
from opd.cache.rundir import MANIFEST, RunDir, read_manifest
from opd.configs.schema import ConfigError, TrainConfig, load_run_config, parse_override
from opd.stages import console

_TRAIN_KEYS = {f.name for f in TrainConfig.__dataclass_fields__.values()}


@dataclass(frozen=True)
class Setting:
    """One point of the grid: its folder name and its (key, value as typed) pairs in grid order."""

    name: str
    values: tuple[tuple[str, str], ...]
    common: tuple[str, ...] = ()  # --set overrides every setting shares

    @property
    def overrides(self) -> list[str]:
        return [*self.common, *(f"{k}={v}" for k, v in self.values)]

    def row(self) -> dict[str, Any]:
        return {"setting": self.name, **{short_key(k): parse_override(f"{k}={v}")[2] for k, v in self.values}}


def parse_grid(items: list[str] | tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """`--grid train.key=v1,v2,...` → [(key, [values])]; one-line errors naming the bad item."""
    if not items:
        raise OpdError("give at least one --grid train.KEY=V1,V2 (e.g. --grid train.beta=0,0.5,1)")
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        if "=" not in item:
            raise OpdError(f"--grid {item!r} is invalid: expected train.KEY=V1,V2,... (e.g. train.beta=0,0.5,1)")
        key, raw = (s.strip() for s in item.split("=", 1))
        section, _, name = key.partition(".")
        if section != "train" or not name:
            raise OpdError(
                f"--grid {item!r}: only train.* keys can be swept from one cache "
                f"(rollout and score settings change the data: run another round instead)"
            )
        if name not in _TRAIN_KEYS:
            import difflib

            close = difflib.get_close_matches(name, sorted(_TRAIN_KEYS), n=1)
            raise OpdError(
                f"--grid {item!r}: unknown key train.{name}" + (f" (did you mean train.{close[0]}?)" if close else "")
            )
        if name in TrainConfig.HOW or name == "device":
            raise OpdError(
                f"--grid {item!r}: train.{name} chooses how to compute, not what; it cannot make settings differ"
            )
        values = [v.strip() for v in raw.split(",")]
        if not raw.strip() or any(not v for v in values):
            raise OpdError(f"--grid {item!r}: empty value list (give train.{name}=V1,V2,...)")
        if len(set(values)) != len(values):
            raise OpdError(f"--grid {item!r}: a value appears twice")
        if any(k == key for k, _ in grid):
            raise OpdError(f"--grid {item!r}: train.{name} is given twice; put all its values in one --grid")
        grid.append((key, values))
    return grid


def make_settings(grid: list[tuple[str, list[str]]], common: tuple[str, ...] = ()) -> list[Setting]:
    """The cartesian product, first key slowest; each named from its values."""
    for item in common:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("train."):
            raise OpdError(f"--set {item!r}: a sweep's settings differ only in train.* keys (the data is round R's)")
        if any(key == k for k, _ in grid):
            raise OpdError(f"--set {item!r}: {key} is also swept by --grid")
    settings = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in grid]):
        settings.append(Setting(_folder_name(combo), tuple(combo), tuple(common)))
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise OpdError(f"--grid: two settings would share the folder {dup!r}; give the values differently")
    return settings


def short_key(key: str) -> str:
    return key.split(".", 1)[1]


def _folder_name(combo) -> str:
    parts = []
    for k, v in combo:
        value = parse_override(f"{k}={v}")[2]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(short_key(k) + re.sub(r"[^A-Za-z0-9.+-]", "-", text))
    return "_".join(parts)


def validate(src: RunDir, grid, common: tuple[str, ...], settings: list[Setting]) -> None:
    """Every value, then every setting, must make a valid config before anything trains."""

    def check(overrides, what: str) -> None:
        try:
            load_run_config(src, list(overrides))
        except ConfigError as e:
            msg = str(e).removeprefix(f"{src.config_path}: ")
            raise OpdError(f"{what}: {msg}") from None

    for item in common:
        check([item], f"--set {item}")
    for key, values in grid:
        for v in values:
            check([*common, f"{key}={v}"], f"--grid {key}={','.join(values)}")
    for s in settings:
        check(s.overrides, f"--grid setting {s.name}")


def default_name(round_index: int, grid) -> str:
    return f"round{round_index}-" + "-".join(short_key(k) for k, _ in grid)


def check_round(src: RunDir, R: int, grid) -> Any:
    for stage in ("rollouts", "scores"):
        if read_manifest(src, src.stage_dir(R, stage)) is None:
            raise OpdError(
                f"{src.stage_dir(R, stage)}/{MANIFEST} not found: round {R} has no finished {stage}; "
                f"run `opd rollout` and `opd score {src.url} --round {R}` first"
            )
    rollouts = read_manifest(src, src.stage_dir(R, "rollouts"))
    if any(k == "train.lmbda" for k, _ in grid) and rollouts.summary.get("offpolicy_rows") != "both":
        raise OpdError(
            f"--grid train.lmbda: {src.stage_dir(R, 'rollouts')} holds one kind of row per prompt (rolled out at "
            f"λ = {rollouts.summary.get('lmbda')}); sweeping λ needs a rollout with --set rollout.offpolicy_rows=both"
        )
    return rollouts


def note_offpolicy_beta(src: RunDir, settings: list[Setting], grid, rollouts) -> None:
    """β swept over a cache with off-policy rows: say that those rows train with train.beta_offpolicy
    unless it is -1 (then each setting's β applies to every row, as GKD's one β does)."""
    if not any(k == "train.beta" for k, _ in grid):
        return
    has_off = rollouts.summary.get("offpolicy_rows") == "both" or (rollouts.summary.get("lmbda") or 1.0) < 1
    beta_off = load_run_config(src, settings[0].overrides).train.beta_offpolicy
    if has_off and beta_off != -1:
        console.say(
            f"sweep: note: off-policy rows train with train.beta_offpolicy = {beta_off:g} in every setting; "
            f"add --set train.beta_offpolicy=-1 to apply each setting's β to them too (GKD's one β)"
        )

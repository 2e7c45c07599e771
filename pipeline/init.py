"""`opd init RUN --config FILE`: create a run folder and write its resolved config, once."""

from __future__ import annotations

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.pipeline.config import OpdConfig, dumps_config, load_config, loads_config
from opd.pipeline.rundir import RunDir


def init_run(run_url: str, config_file: str, overrides=(), force: bool = False) -> tuple[str, bool]:
    """Write RUN/opd.toml; returns (its path, whether it was written). An existing, different
    config is an error without --force: stages already finished would otherwise mix two configs."""
    cfg = load_config(config_file, overrides)
    text = dumps_config(cfg)
    run = RunDir(run_url)
    if storage.exists(run.fs, run.config_path):
        old = storage.read_bytes(run.fs, run.config_path).decode()
        if old == text:
            return run.config_path, False
        if not force:
            raise OpdError(f"{run.config_path} already exists with a different config; "
                           f"pass --force to overwrite it (stages already done will refuse mismatched outputs)")
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, text.encode())
    return run.config_path, True


def load_run_config(run: RunDir, overrides=()) -> OpdConfig:
    """The config a stage runs with: RUN/opd.toml plus any --set overrides given to the stage."""
    from opd.pipeline.config import apply_overrides, config_from_dict, ConfigError
    import tomllib

    text = run.read_config_text()
    if not overrides:
        try:
            return loads_config(text)
        except ConfigError as e:
            raise ConfigError(f"{run.config_path}: {e}") from None
    try:
        data = tomllib.loads(text)
        apply_overrides(data, overrides)
        return config_from_dict(data)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{run.config_path}: not valid TOML ({e}); fix it or re-run `opd init --force`") from None
    except ConfigError as e:
        raise ConfigError(f"{run.config_path}: {e}") from None

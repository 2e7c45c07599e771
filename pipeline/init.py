"""`opd init RUN --config FILE`: create a run folder and write its resolved config, once."""

from __future__ import annotations

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.configs.schema import dumps_config, load_config, loads_config


def init_run(run_url: str, config_file: str, overrides=(), force: bool = False) -> tuple[str, bool]:
    """Write RUN/opd.toml; returns (its path, whether it was written). An existing, different
    config is an error without --force: stages already finished would otherwise mix two configs."""
    cfg = load_config(config_file, overrides)
    text = dumps_config(cfg)
    run = RunDir(run_url)
    if storage.exists(run.fs, run.config_path):
        old = storage.read_bytes(run.fs, run.config_path).decode()
        if old == text or _same_config(old, cfg):  # the same settings, maybe written by another opd version
            return run.config_path, False
        if not force:
            raise OpdError(
                f"{run.config_path} already exists with a different config; "
                f"pass --force to overwrite it (stages already done will refuse mismatched outputs)"
            )
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, text.encode())
    return run.config_path, True


def _same_config(text: str, cfg) -> bool:
    try:
        return loads_config(text) == cfg
    except OpdError:
        return False

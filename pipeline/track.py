"""Trackers (`run.report_to`): TensorBoard, W&B, trackio and MLflow, fed from the run's metrics records.

Reads   RUN/rounds/R/metrics.jsonl of every round (RunDir.read_metrics: what every stage already writes).
Writes  RUN/track/: tensorboard/ (event files), wandb/ (W&B's run folders; offline unless $WANDB_MODE says
        otherwise), mlflow.db (MLflow's SQLite tracking store), trackio/ (trackio's SQLite store, unless
        $TRACKIO_DIR names another folder or trackio was already imported by this process, see `_Trackio`),
        and state.json (below). One tracker run per opd run, written by one process: the `opd run` loop,
        which calls `Tracker.sync()` after every stage; `opd run` resumed after a kill continues the same
        tracker runs and logs only the points not logged before.

    tracker = Tracker(cfg, run)      # opens every tracker of cfg.run.report_to (none: does nothing)
    tracker.sync()                   # after each stage: logs the new records, returns how many points
    tracker.close()

Names, by the record's "stage" (only int/float fields, not bools, not NaN/inf, not the bookkeeping in `_SKIP`):
    train       train/<key>                     a logged learner step (loss, rkl_bucket, lr, grad_norm, ...)
                train_round/<key>               the round's summary (`"final": true`: last_loss, train_s, ...)
    sft         sft/<key>, sft_round/<key>      the same for an SFT round's learner (`opd sft`: cross-entropy)
    rollout     rollout/<key>                   the train split (samples, tokens, tokens_per_s, ...);
                rollout_heldout/<key>           the held-out split; one point per worker record (`shard`)
    score       score/<key>, score_heldout/<key>
    eval        eval/<key>                      held-out figures (eval/heldout_rkl, eval/accuracy, ...)
    bench       eval/<task>/<metric>            the student's benchmarks (record "model": "student"; its "metrics" only)
                reference/teacher/<task>/<metric>   the teacher's ("model": "teacher"; another model M:
                                                reference/M/...)
    loop        loop/<stage>_wall_s             wall time of each stage the loop launched
A record with `"skipped": true` (the stage had nothing to do) gives no point; an unknown stage neither.

Steps: the learner's global step, counted across rounds. offset(R) = Σ steps of rounds < R (a round's
steps from its train records' "steps", the plan length, which every step record and the summary
carry). A train step record of round R goes at offset(R) + step; the round's summary and the loop's
train wall time at offset(R) + steps(R), the round's last step. Everything that describes the student
that starts round R (rollout, score, held-out eval, its benchmarks, the loop's other wall times) goes at
offset(R), the step that student was trained to; the teacher's references at step 0. A round whose
steps are not known yet (not trained) ends the points: later rounds wait for it.

Order and resume: each sync logs its new points sorted by step (stable), so the train steps of a round
follow its rollout and scores. A point is logged once: its key (round, stage and what tells the record
apart: split and shard, the step, "final", the benchmark model and tasks) goes into state.json's
`logged`, so a train step that a resumed learner dropped and wrote again is not logged twice, nor is a
record re-read; of several records with one key (a held-out eval computed again), the first is logged. W&B drops steps below its last one: a point below the last step logged (a teacher
reference written late) goes into the W&B run's summary instead of its history. With several workers
per stage, their records share the stage's step (W&B keeps the last value of each name at a step).

state.json (written atomically, after the trackers flushed):
    {"format": "opd.track", "version": 1, "id": "<W&B run id, also in the trackio run name>",
     "mlflow_run_id": "...", "trackio_dir": "...", "last_step": <highest step logged>, "logged": [keys]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.configs.schema import OpdConfig

STATE_FORMAT = "opd.track"
STATE_VERSION = 1
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
_SKIP = frozenset(  # identifiers, bookkeeping and settings, not figures
    {
        "round", "step", "steps", "shard", "time", "version", "seed", "epoch", "epochs", "world_size",
        "lora_rank", "resumed_from_step", "shards_total", "top_k", "temperature", "score_temperature", "lmbda",
        "workers",
    }
)  # fmt: skip


# ------------------------------------------------------------------------------------------ the points


@dataclass(frozen=True)
class Point:
    """Named values at one global step, from one metrics record."""

    key: str  # the record's identity, stable across re-reads (state.json's `logged`)
    step: int  # the learner's global step
    values: dict[str, float]


def points(run: RunDir) -> list[Point]:
    """Every record of the run as a point, round by round, in file order (module docstring: names, steps)."""
    out: list[Point] = []
    offset = 0
    for r in run.rounds():
        records = run.read_metrics(r)
        steps = _round_steps(records)
        for rec in records:
            p = _point(rec, r, offset, steps)
            if p is not None:
                out.append(p)
        if steps is None:
            break  # later rounds' offsets are not known yet
        offset += steps
    return out


LEARNER_STAGES = ("train", "sft")  # the learner's records: distillation, and `opd sft`'s


def _round_steps(records: list[dict]) -> int | None:
    """The round's optimizer steps: the plan length its train records carry (the last one's), if any."""
    steps = None
    for rec in records:
        if rec.get("stage") in LEARNER_STAGES and _number(rec.get("steps")):
            steps = int(rec["steps"])
    return steps


def _point(rec: dict, r: int, offset: int, steps: int | None) -> Point | None:
    stage = rec.get("stage")
    if rec.get("skipped") is True:
        return None
    fields, step = rec, offset
    if stage in LEARNER_STAGES and rec.get("final"):
        prefix, ident, step = f"{stage}_round", ("final",), offset + int(rec.get("steps") or 0)
    elif stage in LEARNER_STAGES and _number(rec.get("step")):
        prefix, ident, step = stage, (f"step{int(rec['step'])}",), offset + int(rec["step"])
    elif stage in ("rollout", "score"):
        split = rec.get("split", "train")
        prefix = stage if split == "train" else f"{stage}_{split}"
        ident = (split, rec.get("shard", ""))
    elif stage == "eval":
        prefix, ident = "eval", ()
    elif stage == "bench" and isinstance(rec.get("metrics"), dict):
        model, fields = str(rec.get("model", "student")), rec["metrics"]
        prefix = "eval" if model == "student" else f"reference/{model}"
        step = offset if model == "student" else 0
        ident = (model, ",".join(sorted({k.split("/")[0] for k in fields})))
    elif stage == "loop" and isinstance(rec.get("step"), str) and _number(rec.get("wall_s")):
        name = rec["step"]
        step = offset + steps if name == "train" and steps is not None else offset
        return Point(f"{r}:loop:{name}", step, {f"loop/{name}_wall_s": rec["wall_s"]})
    else:
        return None
    values = {f"{prefix}/{k}": v for k, v in fields.items() if k not in _SKIP and _number(v)}
    if not values:
        return None
    return Point(":".join(map(str, (r, stage, *ident))), step, values)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------ the tracker


def check_reporters(report_to) -> None:
    """A one-line OpdError naming the first tracker of `report_to` whose package is not installed."""
    for name in report_to:
        try:
            found = importlib.util.find_spec(_PACKAGES[name]) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise OpdError(_missing(name))


def _missing(name: str) -> str:
    return (
        f"run.report_to names {name!r}, but the `{_PACKAGES[name]}` package is not installed: pip install 'opd[track]'"
    )


def _import(name: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OpdError(_missing(name)) from None


class Tracker:
    """One tracker run per opd run, fed from the run's metrics.jsonl records."""

    def __init__(self, cfg: OpdConfig, run: RunDir):
        self.run, self.writers = run, []
        names = tuple(cfg.run.report_to)
        if not names:
            return
        if not run.local:
            raise OpdError(
                f"run.report_to needs a local run folder (the trackers write under RUN/track/), and {run.url} is an "
                "object store: set run.report_to = [] for it, or run from a local folder"
            )
        check_reporters(names)
        self.dir = os.path.join(run.root, "track")
        self.state_path = os.path.join(self.dir, "state.json")
        os.makedirs(self.dir, exist_ok=True)
        self.state = self._read_state()
        self.logged = set(self.state["logged"])
        config = dataclasses.asdict(cfg)
        run_name = os.path.basename(run.root.rstrip("/")) or "opd"
        opened = {
            "tensorboard": lambda: _TensorBoard(os.path.join(self.dir, "tensorboard")),
            "wandb": lambda: _Wandb(self.dir, cfg.run.name, run_name, self.state, config),
            "trackio": lambda: _Trackio(self.dir, cfg.run.name, run_name, self.state, config),
            "mlflow": lambda: _Mlflow(self.dir, cfg.run.name, run_name, self.state, config),
        }
        try:
            for name in names:
                self.writers.append(opened[name]())
        except BaseException:
            self.close()
            raise
        self._write_state()

    def sync(self) -> int:
        """Log every point not logged before (in step order); the number of points logged."""
        if not self.writers:
            return 0
        new, seen = [], set(self.logged)
        for p in points(self.run):
            if p.key not in seen:  # a key's first record only (e.g. a held-out eval computed again: the first)
                seen.add(p.key)
                new.append(p)
        new.sort(key=lambda p: p.step)
        for p in new:
            for w in self.writers:
                w.log(p.values, p.step)
            self.logged.add(p.key)
            self.state["logged"].append(p.key)
            self.state["last_step"] = max(self.state["last_step"], p.step)
        if new:
            for w in self.writers:
                w.flush()
            self._write_state()
        return len(new)

    def close(self) -> None:
        """Close every tracker (all of them, even if one fails: that error is raised after)."""
        writers, self.writers = self.writers, []
        errors = []
        for w in writers:
            try:
                w.close()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def _read_state(self) -> dict[str, Any]:
        fresh = {"format": STATE_FORMAT, "version": STATE_VERSION, "id": uuid.uuid4().hex[:12]}
        fresh |= {"mlflow_run_id": None, "trackio_dir": None, "last_step": 0, "logged": []}
        if not os.path.exists(self.state_path):
            return fresh
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise OpdError(
                f"{self.state_path} is not readable JSON ({e}); delete RUN/track/ to start the trackers anew"
            )
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise OpdError(
                f"{self.state_path} is not an {STATE_FORMAT} version {STATE_VERSION} state file; delete RUN/track/ "
                "to start the trackers anew"
            )
        return fresh | state

    def _write_state(self) -> None:
        tmp = f"{self.state_path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, self.state_path)


# ------------------------------------------------------------------------------------------ the writers
# Each: log(values, step), flush(), close(); ids that a resumed loop needs go into the shared state dict.


class _TensorBoard:
    """Event files in RUN/track/tensorboard/ (a resumed loop adds a new file to the same folder)."""

    def __init__(self, folder: str):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A W&B run with a fixed id (state "id"), resumed on every open; offline unless $WANDB_MODE."""

    def __init__(self, folder: str, project: str, name: str, state: dict, config: dict):
        wandb = _import("wandb", "wandb")
        self.state = state
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False, disable_git=True)
        self.run = wandb.init(
            project=project,
            name=name,
            id=state["id"],
            resume="allow",
            dir=folder,
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=config,
            settings=settings,
        )
        self.step = state["last_step"] if state["logged"] else -1  # W&B's history refuses steps below its last

    def log(self, values: dict[str, float], step: int) -> None:
        if step < self.step:
            self.run.summary.update(values)
            return
        self.run.log(values, step=step)
        self.step = step

    def flush(self) -> None:
        pass  # the W&B service writes as it goes; finish() flushes

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """A trackio run named `<run folder>-<id>` in project run.name, resumed by name.

    trackio fixes its store folder when first imported ($TRACKIO_DIR, else ~/.cache/huggingface/trackio):
    when $TRACKIO_DIR is unset and trackio not yet imported, it is imported with RUN/track/trackio; the
    folder used is in state.json's "trackio_dir" (`TRACKIO_DIR=... trackio show --project NAME`)."""

    def __init__(self, folder: str, project: str, name: str, state: dict, config: dict):
        if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
            os.environ["TRACKIO_DIR"] = os.path.join(folder, "trackio")
            try:
                trackio = _import("trackio", "trackio")
            finally:
                del os.environ["TRACKIO_DIR"]
        else:
            trackio = _import("trackio", "trackio")
        from trackio import utils

        state["trackio_dir"] = str(utils.TRACKIO_DIR)
        with contextlib.redirect_stdout(io.StringIO()):  # its console lines are for notebooks
            self.run = trackio.init(
                project=project,
                name=f"{name}-{state['id']}",
                resume="allow",
                config=config,
                embed=False,
                auto_log_cpu=False,
                auto_log_gpu=False,
                capture_console=False,
            )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def flush(self) -> None:
        pass  # finish() writes the queued logs

    def close(self) -> None:
        from trackio import context_vars

        with contextlib.redirect_stdout(io.StringIO()):
            self.run.finish()
        if context_vars.current_run.get() is self.run:
            context_vars.current_run.set(None)  # or its exit hook finishes it again, aloud


_MLFLOW_BAD = re.compile(r"[^\w\-. /]")  # MLflow metric names: letters, digits, _ - . space /


class _Mlflow:
    """An MLflow run in experiment run.name of the SQLite store RUN/track/mlflow.db (run id in the state);
    `mlflow ui --backend-store-uri sqlite:///RUN/track/mlflow.db` shows it."""

    def __init__(self, folder: str, project: str, name: str, state: dict, config: dict):
        _import("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        for quiet in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(quiet).setLevel(logging.WARNING)
        self.Metric, self.uri = Metric, "sqlite:///" + os.path.join(folder, "mlflow.db")
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = state["mlflow_run_id"]
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(project)
            artifacts = pathlib.Path(folder, "mlartifacts").as_uri()  # not ./mlruns in whatever folder we run in
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(project, artifacts)
            self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            state["mlflow_run_id"] = self.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.pending: list = []

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [self.Metric(_MLFLOW_BAD.sub("_", k), float(v), now, step) for k, v in values.items()]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[i : i + 1000])

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out

"""Run configuration: one frozen dataclass per stage plus the run-level table, loaded from TOML.

A config file has one table per section ([run], [rollout], [score], [train], [eval]); every key is a
field below, with the same name in TOML, in `--set section.key=value` overrides and in the code. A
field may hold a small record of its own, written as a table inside its section's ([eval.stop]); a
list of records is an array of tables ([[section.name]]). `--set` reaches into a record by its dotted
path (`--set eval.stop.patience=3`), into the N-th record of a list by index
(`--set 'section.name[1].key=x'`), or replaces a whole record or list with an inline TOML value
(`--set 'eval.stop={metric="heldout_rkl", patience=2}'`).

Loading checks types strictly (an integer is accepted where a number is expected; nothing else is
converted: "8" is not an integer, 1 is not true), ranges and choices; an unknown key names the closest
valid one, and every message names the value's full path (`eval.stop.patience = 0 is invalid: ...`).
Relative paths in a file are resolved against the file's folder; paths given with `--set` against the
current folder. Model references may also be `opd:NAME` (a model opd makes offline, e.g.
`opd:smollm2-135m`) or `tiny:ROLE` (a tiny random model built on the fly, for tests and quick runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from opd.configs import loading
from opd.configs.fields import ConfigError, _choice, _require, check_records
from opd.configs.loading import PACKAGED_CONFIGS, Config, dumps_config, find_config, parse_override
from opd.configs.stage_sections import DTYPES, RolloutConfig, ScoreConfig, SftConfig, TrainConfig

STOP_METRICS = ("heldout_rkl", "heldout_teacher_nll", "accuracy")  # held-out figures eval.stop.metric may watch
REPORTERS = ("tensorboard", "wandb", "trackio", "mlflow")  # run.report_to's trackers (HF `report_to` names)
BENCH_BACKENDS = ("auto", "vllm", "hf")  # eval.tasks_backend
SELF_TEACHERS = ("self", "self:start")  # run.teacher's reserved names: the student itself, or its weights before SFT


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "opd"  # label for this run in metrics and plots
    student: str  # base student (round 0): HF checkpoint folder, `opd:NAME` or `tiny:student`
    teacher: str  # teacher: HF checkpoint folder, `opd:NAME` or `tiny:teacher`, sharing the student's vocabulary; or "self:start" (the student's weights before its first `opd sft`, the base model when there was none) or "self" (each round's own student); a folder named like these is written "./self"
    seed: int = 0  # seeds sampling, the λ on/off-policy choice and training
    rounds: int = 1  # rounds `opd run` performs (rollout → score → train per round)
    models_dir: str = (
        ""  # where `opd:` and `tiny:` models are materialised; "" = $OPD_HOME/models (~/.cache/opd/models)
    )
    rollout_devices: str = (
        ""  # `opd run`: devices of the rollout pool, e.g. "0,1" (CUDA_VISIBLE_DEVICES); "" = all visible (CPU: "cpu")
    )
    score_devices: str = ""  # `opd run`: devices of the scoring pool; several run one `--shard i/N` worker each
    train_devices: str = (
        ""  # `opd run`: devices of the learner; several launch torchrun (CPU: "cpu,cpu" = 2 gloo processes)
    )
    overlap: str = "auto"  # `opd run`: score finished rollout shards while rollout runs: "auto" (pools on disjoint GPUs, or both on CPU), "on", "off"
    launcher: str = "local"  # `opd run`: where stage workers run: "local" (processes on this machine) or "ray" (Ray tasks on any node of a cluster; pip install 'opd[ray]')
    ray_address: str = ""  # launcher "ray": the cluster to join ("HOST:PORT" of `ray start --head`); "" = $RAY_ADDRESS, else a new Ray instance on this machine
    rollout_resource: str = ""  # launcher "ray": a custom resource every rollout worker asks one unit of (nodes started with `--resources '{"NAME": k}'` run k of them); "" = any node
    score_resource: str = (
        ""  # launcher "ray": the same for score workers, e.g. "teacher" for the nodes that hold the teacher
    )
    train_resource: str = ""  # launcher "ray": the same for the learner (one unit per learner node)
    train_nodes: int = 1  # launcher "ray": machines the learner spans, each with `train_devices` (a placement group, one bundle per node; torchrun's c10d rendezvous at the first)
    ray_max_retries: int = 3  # launcher "ray": times a stage task whose process was killed or whose node died is started again (it resumes its missing shards)
    report_to: tuple[
        str, ...
    ] = ()  # trackers that get every stage's figures, one tracker run per opd run: any of "tensorboard", "wandb" (offline unless WANDB_MODE says otherwise), "trackio", "mlflow"; files under RUN/track/ (pip install 'opd[track]')

    def __post_init__(self):
        _require(bool(self.student), "run.student", self.student, "a model path or `opd:`/`tiny:` name is required")
        _require(bool(self.teacher), "run.teacher", self.teacher, "a model path or `opd:`/`tiny:` name is required")
        _require(
            not self.teacher.startswith("self:") or self.teacher in SELF_TEACHERS,
            "run.teacher",
            self.teacher,
            'must be a model, "self" or "self:start" (the reserved names)',
        )
        _require(self.rounds >= 1, "run.rounds", self.rounds, "must be >= 1")
        for key in ("rollout_devices", "score_devices", "train_devices"):
            value = getattr(self, key)
            _require(
                all(d.strip() == "cpu" or d.strip().isdigit() for d in value.split(",")) if value else True,
                f"run.{key}",
                value,
                'must be "" or a comma-separated list of GPU indices or "cpu", e.g. "0,1"',
            )
        _choice("run.overlap", self.overlap, ("auto", "on", "off"))
        _choice("run.launcher", self.launcher, ("local", "ray"))
        for i, name in enumerate(self.report_to):
            _choice(f"run.report_to[{i}]", name, REPORTERS)
        _require(
            len(set(self.report_to)) == len(self.report_to),
            "run.report_to",
            list(self.report_to),
            "names a tracker twice",
        )
        _require(self.train_nodes >= 1, "run.train_nodes", self.train_nodes, "must be >= 1")
        _require(self.ray_max_retries >= 0, "run.ray_max_retries", self.ray_max_retries, "must be >= 0")
        for key in ("rollout_resource", "score_resource", "train_resource"):
            value = getattr(self, key)
            _require(
                value == "" or value.replace("_", "").replace("-", "").isalnum(),
                f"run.{key}",
                value,
                "must be a Ray resource name (letters, digits, _ and -) or empty",
            )


@dataclass(frozen=True, kw_only=True)
class StopRule:
    """A stop rule on a held-out figure: `opd run` stops once `patience` held-out evaluations in a row
    have not improved `metric` by at least `min_delta` on the best value before them (lower is better,
    except for accuracy)."""

    metric: str = ""  # figure watched: "heldout_rkl", "heldout_teacher_nll" (nats/token), "accuracy" (needs eval.checker), or a benchmark metric "TASK/METRIC" of eval.tasks (e.g. "arith/exact_match"); "" = off
    min_delta: float = 0.0  # smallest change toward better that counts as an improvement (in the metric's unit)
    patience: int = 1  # held-out evaluations in a row without an improvement before the run stops

    def check(self, at: str) -> None:
        if "/" not in self.metric:
            _choice(f"{at}.metric", self.metric, ("", *STOP_METRICS))
        _require(self.min_delta >= 0, f"{at}.min_delta", self.min_delta, "must be >= 0")
        _require(self.patience >= 1, f"{at}.patience", self.patience, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation: a held-out prompt set sampled by each round's starting student and scored by the
    teacher (never trained on), in RUN/rounds/R/heldout/. Its samples are drawn at `temperature` with
    no top-k/top-p, so the mean of log p_S(x_t) − log p_T(x_t) over them estimates the per-token reverse
    KL(student‖teacher) of the model itself."""

    prompts: str = ""  # held-out prompt set (formats as rollout.prompts); "" = no validation
    prompt_field: str = "prompt"  # column holding a plain prompt string
    messages_field: str = "messages"  # column holding chat messages (used when present)
    reference_field: str = ""  # column holding the reference answer the checker compares with
    id_field: str = ""  # column holding a stable prompt id; "" = the row number
    max_prompts: int = 0  # use only the first N held-out prompts; 0 = all
    n: int = 1  # samples per held-out prompt
    max_new_tokens: int = 0  # completion length limit; 0 = rollout.max_new_tokens
    temperature: float = 1.0  # sampling temperature (1.0: the reverse KL is of the student itself)
    checker: str = ""  # "" (no accuracy) or "gsm8k" (the last number of the completion vs the reference's `#### N`)
    stop_rkl_below: float = 0.0  # `opd run` stops once the held-out reverse KL (nats/token) is below this; 0 = off
    stop_patience: int = 0  # `opd run` stops after this many evaluations of eval.stop_metric without an improvement of at least stop_min_delta; 0 = off
    stop_min_delta: float = 0.0  # the smallest change toward better of eval.stop_metric that counts as an improvement
    stop_metric: str = ""  # what eval.stop_patience watches: "" = the held-out reverse KL; or a benchmark metric "TASK/METRIC" of eval.tasks (e.g. "arith/exact_match"), better when higher or lower as lm-eval says
    stop: StopRule = field(default_factory=StopRule)  # stop rule on a held-out figure: metric, min_delta, patience
    final: bool = (
        True  # `opd run` also evaluates the last round's student (RUN/rounds/N/heldout/ and eval/, no training data)
    )
    tasks: tuple[
        str, ...
    ] = ()  # lm-evaluation-harness tasks each evaluated student is benchmarked on, as lm-eval names them ("arith", "arith_mc" ship with opd; "hellaswag", "gsm8k"... need the hub); results in RUN/rounds/R/eval/
    tasks_every: int = 1  # `opd run` benchmarks the student starting every k-th round (round 0 = the base student; the final student too with eval.final)
    tasks_teacher: bool = (
        True  # `opd run` also benchmarks the teacher once, for reference (RUN/reference/teacher/eval/)
    )
    include_path: str = (
        ""  # a folder of local lm-eval tasks (YAML + JSONL) besides opd's own (configs/tasks/); "" = none
    )
    tasks_limit: int = 0  # documents per task (the first N of its test split); 0 = all
    tasks_backend: str = "auto"  # lm-eval model: "vllm", "hf" (transformers), or "auto" (the rollout engine's choice: vLLM where it imports)
    tasks_batch_size: int = 16  # documents per lm-eval batch (hf backend)

    def __post_init__(self):
        _require(self.max_prompts >= 0, "eval.max_prompts", self.max_prompts, "must be >= 0")
        _require(self.n >= 1, "eval.n", self.n, "must be >= 1")
        _require(self.max_new_tokens >= 0, "eval.max_new_tokens", self.max_new_tokens, "must be >= 0 (0 = rollout's)")
        _require(self.temperature > 0, "eval.temperature", self.temperature, "must be > 0")
        _choice("eval.checker", self.checker, ("", "gsm8k"))
        _require(self.stop_rkl_below >= 0, "eval.stop_rkl_below", self.stop_rkl_below, "must be >= 0 (0 = off)")
        _require(self.stop_patience >= 0, "eval.stop_patience", self.stop_patience, "must be >= 0 (0 = off)")
        _require(self.stop_min_delta >= 0, "eval.stop_min_delta", self.stop_min_delta, "must be >= 0")
        _require(
            not self.checker or bool(self.reference_field),
            "eval.checker",
            self.checker,
            "needs eval.reference_field (the column with the answers)",
        )
        check_records(self, "eval")
        _require(self.tasks_every >= 1, "eval.tasks_every", self.tasks_every, "must be >= 1")
        _require(self.tasks_limit >= 0, "eval.tasks_limit", self.tasks_limit, "must be >= 0 (0 = all)")
        _require(self.tasks_batch_size >= 1, "eval.tasks_batch_size", self.tasks_batch_size, "must be >= 1")
        _choice("eval.tasks_backend", self.tasks_backend, BENCH_BACKENDS)
        for i, task in enumerate(self.tasks):
            _require(bool(task.strip()) and task == task.strip(), f"eval.tasks[{i}]", task, "must be a task name")
        for key, metric in (("stop_metric", self.stop_metric), ("stop.metric", self.stop.metric)):
            if "/" in metric:
                task = metric.split("/", 1)[0]
                _require(
                    task in self.tasks and bool(metric.split("/", 1)[1]),
                    f"eval.{key}",
                    metric,
                    f"must be TASK/METRIC with TASK one of eval.tasks ({', '.join(self.tasks) or 'none set'})",
                )
            elif key == "stop_metric":
                _choice("eval.stop_metric", metric, ("", "heldout_rkl"))
        _require(
            self.stop.metric != "accuracy" or bool(self.checker),
            "eval.stop.metric",
            self.stop.metric,
            "'accuracy' needs eval.checker",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)


@dataclass(frozen=True, kw_only=True)
class OpdConfig:
    run: RunConfig
    rollout: RolloutConfig
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    # keys holding file paths: a relative one resolves against the config file's folder (a --set one
    # against the current folder)
    PATH_KEYS: ClassVar[frozenset[tuple[str, ...]]] = frozenset(
        {
            ("run", "student"),
            ("run", "teacher"),
            ("run", "models_dir"),
            ("rollout", "prompts"),
            ("eval", "prompts"),
            ("eval", "include_path"),
            ("sft", "data"),
        }
    )
    # values of a path key that name something else and are never resolved against a folder
    RESERVED_NAMES: ClassVar[frozenset[str]] = frozenset(SELF_TEACHERS)

    def section_hash(self, section: str) -> str:
        """sha256 of one section's values, less its `HOW` keys (settings that change no byte of the
        stage's output): the stage's config fingerprint. The one rule every stage hashes by."""
        values = dataclasses.asdict(getattr(self, section))
        for key in getattr(type(getattr(self, section)), "HOW", ()):
            values.pop(key)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values, as TOML and JSON hold them (tuples as lists)."""
        return json.loads(
            json.dumps({f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)})
        )

    def replace(self, section: str, **changes: Any) -> "OpdConfig":
        """A copy with `changes` to one section, or to a record in one (`replace("eval.stop", patience=2)`),
        checked again by the section it is in."""
        return _replace_at(self, section, changes)


def _replace_at(obj: Any, dotted: str, changes: dict[str, Any]) -> Any:
    if not dotted:
        return dataclasses.replace(obj, **changes)
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(obj, **{head: _replace_at(getattr(obj, head), rest, changes)})


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(OpdConfig)[f.name] for f in dataclasses.fields(OpdConfig)}
_SECTION_TYPES = SECTIONS
PATH_KEYS = OpdConfig.PATH_KEYS


# ------------------------------------------------------------------------------------------ loading
# The generic reader and writer (configs/loading.py), with this schema as the default root.


def load_config(
    name_or_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, root: type[Config] = OpdConfig
) -> Config:
    """Read a TOML config (or a packaged preset name), apply `--set` overrides, validate."""
    return loading.load_config(name_or_path, overrides, root=root)


def loads_config(text: str, base_dir: str | os.PathLike = ".", *, root: type[Config] = OpdConfig) -> Config:
    """Like load_config, from TOML text (relative paths against `base_dir`)."""
    return loading.loads_config(text, base_dir, root=root)


def apply_overrides(data: dict, overrides, *, root: type = OpdConfig) -> None:
    """Apply `--set PATH=VALUE` items to a config's raw TOML dict (see loading.apply_overrides)."""
    loading.apply_overrides(data, overrides, root=root)


def config_from_dict(data: dict[str, Any], *, root: type[Config] = OpdConfig) -> Config:
    """Build and validate a config from its raw TOML dict (tables as dicts, arrays of tables as lists)."""
    return loading.config_from_dict(data, root=root)


def load_run_config(run, overrides=(), *, root: type[Config] = OpdConfig) -> Config:
    """The config a stage runs with: RUN/opd.toml plus any --set overrides given to the stage."""
    return loading.load_run_config(run, overrides, root=root)


__all__ = [  # this module is where the schema is imported from, the parts in the other configs/ files included
    "ConfigError",
    "check_records",
    "PACKAGED_CONFIGS",
    "DTYPES",
    "STOP_METRICS",
    "SECTIONS",
    "PATH_KEYS",
    "RunConfig",
    "RolloutConfig",
    "ScoreConfig",
    "SftConfig",
    "SELF_TEACHERS",
    "TrainConfig",
    "StopRule",
    "EvalConfig",
    "OpdConfig",
    "Config",
    "find_config",
    "load_config",
    "loads_config",
    "parse_override",
    "apply_overrides",
    "config_from_dict",
    "load_run_config",
    "dumps_config",
]

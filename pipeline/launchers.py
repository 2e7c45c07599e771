"""How every stage process is started: `opd run`'s workers, `opd sweep`'s, `opd train`'s torchrun.

One interface, two launchers, and the device pools they place workers on:

    DevicePool  "0,1" | "cpu,cpu" | "" parsed once (`DevicePool.parse`); a GPU number is an index into
                the GPUs this process sees (its CUDA_VISIBLE_DEVICES, when set)
    Worker      one process to start: `python -m MODULE ARGS` (MODULE = the `opd` CLI, or torchrun), its
                GPUs (`visible`: the CUDA_VISIBLE_DEVICES it gets; `stage_env` is the one place that
                sets it) and what it asks of a Ray cluster
    launcher    `start(worker, common) -> [Job]`, `drain()`, `finish(jobs)`, `close()`; `run_all` starts
                a set of workers, waits for all, and stops the rest at the first failure
    local       a subprocess per worker on this machine (dies with this process: die_with_parent)
    ray         launch_ray.py: a Ray task per worker on the node Ray picks: it asks for the worker's GPUs
                (Ray sets CUDA_VISIBLE_DEVICES), one CPU, and one unit of the pool's custom resource
                (run.<stage>_resource) if named; the task runs the stage command there as a child process
                (killed with it), streams the child's console lines back to this process, tagged with the
                node, and returns the node and the exit status. A child killed by a signal, or a node that
                dies, fails the task and Ray starts it again on the nodes left (run.ray_max_retries): the
                stage resumes, so a lost node costs only its unfinished shards; an `opd` error (status 1)
                is not retried. A learner over several nodes (run.train_nodes) is a placement group with
                one bundle per node (STRICT_SPREAD) and a torchrun per bundle, meeting at a c10d rendezvous
                on the first bundle's node; when one of its nodes is lost the whole group is stopped and
                started again (a new placement group) and resumes from the learner's last checkpoint.

The launchers know nothing of the stages: every rule that makes a retry safe (skip what is done, finish
the missing shards, `_DONE.json` last) is the stage's own, and the loop's state lives only in the run
directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from opd.cache.errors import OpdError
from opd.stages import console

CLI_MODULE = "opd.pipeline.cli"
# the variables of this process a Ray task's child gets on its node (the node's own environment otherwise)
FORWARDED_ENV = ("OPD_", "HF_", "AWS_", "VLLM_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "PYTORCH_", "RAY_")


@dataclass(frozen=True)
class DevicePool:
    """A device pool: kind "auto" (nothing given: what the process sees), "cpu" or "cuda", and its
    members (GPU numbers, groups of them such as "0,1", or "cpu" per process)."""

    kind: str
    devices: tuple[str, ...]

    @classmethod
    def parse(cls, text: str | None, what: str = "--devices") -> DevicePool:
        """Empty or None → auto; "cpu" / "cpu,cpu" → CPU processes; "0" / "0,1" → GPUs, a worker each."""
        items = [d.strip() for d in (text or "").split(",") if d.strip()]
        if not items:
            return cls("auto", ())
        if all(d == "cpu" for d in items):
            return cls("cpu", tuple(items))
        if all(d.isdigit() for d in items):
            return cls("cuda", tuple(items))
        raise OpdError(f"{what} {text!r} is invalid: give GPU numbers (0,1) or cpu entries (cpu,cpu), not a mix")

    @property
    def workers(self) -> int:
        return max(1, len(self.devices))

    def gpus(self) -> set[str]:
        return {g for d in self.devices for g in d.split(",")} if self.kind == "cuda" else set()

    def gpus_of(self, worker: int) -> int:
        """GPUs one worker holds (what it asks of a Ray cluster); 0 on CPU."""
        return len(self.devices[worker].split(",")) if self.kind == "cuda" else 0

    def disjoint(self, other: DevicePool) -> bool:
        return self.kind == other.kind == "cuda" and not self.gpus() & other.gpus()

    def distinct(self, what: str) -> DevicePool:
        """The pool, refused when it names a GPU twice (one process per GPU, as torchrun's are)."""
        if self.kind == "cuda" and len(self.gpus()) != sum(len(d.split(",")) for d in self.devices):
            raise OpdError(f"{what} {','.join(self.devices)!r} names a GPU twice; one process per GPU")
        return self

    def grouped(self, size: int, what: str) -> DevicePool:
        """The GPUs in consecutive groups of `size`, one worker per group: a teacher split by tensor ×
        pipeline parallelism (`--score-devices 0,1,2,3` with size 2 → workers on "0,1" and "2,3")."""
        if size == 1 or self.kind != "cuda":
            return self
        if len(self.devices) % size:
            raise OpdError(
                f"{what} {','.join(self.devices)} cannot be split into groups of {size} GPUs "
                f"(score.tensor_parallel_size × score.pipeline_parallel_size): give a multiple of {size}"
            )
        d = self.devices
        return DevicePool("cuda", tuple(",".join(d[i : i + size]) for i in range(0, len(d), size)))

    def visible(self, worker: int | None = None, seen: str | None = None) -> str | None:
        """CUDA_VISIBLE_DEVICES for one worker (or the whole pool): the GPUs as this process numbers them
        mapped through `seen` (this process's CUDA_VISIBLE_DEVICES; read when None), "" on a CPU pool
        (it stays off the GPUs), None for "auto" (unchanged)."""
        if self.kind == "cpu":
            return ""
        if self.kind != "cuda":
            return None
        mine = ",".join(self.devices if worker is None else self.devices[worker : worker + 1]).split(",")
        seen = os.environ.get("CUDA_VISIBLE_DEVICES") if seen is None else seen
        shown = [d.strip() for d in (seen or "").split(",") if d.strip()]
        if not shown:
            return ",".join(mine)
        if any(int(g) >= len(shown) for g in mine):
            raise OpdError(
                f"GPU {max(mine, key=int)} of the pool {','.join(self.devices)} is not among the "
                f"{len(shown)} GPU(s) this process sees (CUDA_VISIBLE_DEVICES={seen})"
            )
        return ",".join(shown[int(g)] for g in mine)


def stage_env(env: dict[str, str], visible: str | None) -> dict[str, str]:
    """A stage process's environment: `env` with CUDA_VISIBLE_DEVICES = `visible` (None: as it is).
    The only place opd sets CUDA_VISIBLE_DEVICES."""
    env = dict(env)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env


@dataclass
class Worker:
    """One stage process: `python -m MODULE ARGS...`, its GPUs, and what it asks of a Ray cluster."""

    stage: str  # "rollout", "score", "train", "sweep"
    label: str  # how lines name it, e.g. "score 1/2"
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # variables added to this process's environment
    visible: str | None = None  # its CUDA_VISIBLE_DEVICES on this machine (DevicePool.visible); None = unchanged
    gpus: int = 0  # GPUs per worker (Ray); 0 = a CPU worker
    resource: str = ""  # Ray custom resource, one unit per worker ("" = none)
    nodes: int = 1  # the learner over several nodes (Ray placement group)
    log_name: str = ""  # its log file's name under RUN/rounds/R/logs/ (object-store runs: uploaded there)
    round_index: int = 0
    module: str = CLI_MODULE  # what `python -m` runs
    to_console: bool = True  # its stdout/stderr: the console (an `opd` command logs by itself), else inherited


@dataclass
class Job:
    """A started worker: `poll()` is None while it runs, else its exit status (0 = done)."""

    worker: Worker
    node: str = "local"
    error: str = ""  # why it failed, beyond the exit status
    handle: object = field(default=None, repr=False)

    def poll(self) -> int | None:
        status = self.handle.poll()
        if status is not None and hasattr(self.handle, "node"):  # a Ray task: where it ran, why it failed
            self.node, self.error = self.handle.node, self.handle.error
        return status

    def stop(self) -> None:
        if self.handle.poll() is None:
            self.handle.terminate()

    def wait_stopped(self) -> None:
        try:
            self.handle.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.handle.kill()


class Launcher(Protocol):
    name: str

    def start(self, worker: Worker, common: list[str]) -> list[Job]: ...
    def drain(self) -> None: ...
    def finish(self, jobs: list[Job]) -> None: ...
    def close(self) -> None: ...


class WorkerFailed(Exception):
    """A worker of `run_all` ended with a non-zero status; the others were stopped."""

    def __init__(self, job: Job, status: int):
        super().__init__(f"{job.worker.label} exited with status {status}")
        self.job, self.status = job, status


def run_all(
    launcher: Launcher, workers: list[Worker], common: list[str] = (), announce=None
) -> tuple[list[Job], dict[str, float]]:
    """Start every worker (calling `announce(worker)` first, when given), wait for all; on the first failure
    stop the rest and raise WorkerFailed. Returns the jobs and, per stage, the seconds until its last
    worker ended."""
    t0 = time.perf_counter()
    jobs: list[Job] = []
    ended: dict[str, float] = {}
    try:
        for w in workers:
            if announce is not None:
                announce(w)
            jobs += launcher.start(w, list(common))
        pending = list(jobs)
        while pending:
            launcher.drain()
            for job in list(pending):
                code = job.poll()
                if code is None:
                    continue
                pending.remove(job)
                if code != 0:
                    launcher.drain()
                    raise WorkerFailed(job, code)
                stage = job.worker.stage
                if all(j.poll() is not None for j in jobs if j.worker.stage == stage):
                    ended.setdefault(stage, time.perf_counter() - t0)
            if pending:
                time.sleep(0.2)
    finally:
        for job in jobs:
            job.stop()
        for job in jobs:
            job.wait_stopped()
        launcher.finish(jobs)
    return jobs, ended


class LocalLauncher:
    """Stage workers as subprocesses of this one (they die with it: die_with_parent)."""

    name = "local"

    def __init__(self, echo=print):
        self.echo = echo

    def start(self, worker: Worker, common: list[str]) -> list[Job]:
        if worker.nodes > 1:
            raise OpdError("run.train_nodes > 1 needs the Ray launcher (--launcher ray)")
        out, err = (_fd_or_inherit(s) for s in console.streams()) if worker.to_console else (None, None)
        proc = subprocess.Popen(
            [sys.executable, "-m", worker.module, *worker.args, *common],
            env=stage_env({**os.environ, **worker.env}, worker.visible),
            stdout=out,
            stderr=err,
            preexec_fn=die_with_parent,
        )
        return [Job(worker, "local", handle=proc)]

    def drain(self) -> None:
        """Console lines of remote workers (none here: children write to the console themselves)."""

    def finish(self, jobs: list[Job]) -> None:
        """What a stage's jobs held, given back once they ended (nothing here)."""

    def close(self) -> None:
        pass


def _fd_or_inherit(stream):
    """A console stream for a child process, or None (inherit) where it has no file descriptor."""
    try:
        stream.fileno()
        return stream
    except (AttributeError, OSError, ValueError):
        return None


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux), so a killed `opd run` (or a
    Ray worker that died) never leaves a stage writing into the run behind it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def make_launcher(name: str, address: str = "", max_retries: int = 0, echo=print) -> Launcher:
    if name == "local":
        return LocalLauncher(echo)
    if name == "ray":
        from opd.pipeline.launch_ray import RayLauncher

        return RayLauncher(address, max_retries, echo)
    raise OpdError(f"--launcher {name!r} is invalid: use local or ray")


def forwarded_env(worker: Worker) -> dict[str, str]:
    """The part of a worker's environment that travels with a Ray task to another node."""
    env = {**os.environ, **worker.env}
    return {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV)}

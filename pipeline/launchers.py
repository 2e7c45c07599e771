"""Where `opd run` starts its stage workers: processes on this machine, or Ray tasks on a cluster.

Both launchers run the same command, `opd <stage> RUN --round R ...`, and know nothing of the stages:
every rule that makes a retry safe (skip what is done, finish the missing shards, `_DONE.json` last)
is the stage's own, and the loop's state lives only in the run directory.

    local  a subprocess per worker; CUDA_VISIBLE_DEVICES from the pool (loop.py's Pool.env)
    ray    a Ray task per worker, on the node Ray picks: it asks for the worker's GPUs (Ray sets
           CUDA_VISIBLE_DEVICES), one CPU, and one unit of the pool's custom resource
           (run.<stage>_resource) if named; the task runs the stage command there as a child process
           (killed with it), streams the child's console lines back to this process, tagged with the
           node, and returns the node and the exit status. A child killed by a signal, or a node that
           dies, fails the task and Ray starts it again (run.ray_max_retries); an `opd` error (status 1)
           is not retried. A learner over several nodes (run.train_nodes) is a placement group with
           one bundle per node (STRICT_SPREAD) and a torchrun per bundle, meeting at a c10d rendezvous
           on the first bundle's node.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field

from opd.cache.errors import OpdError
from opd.stages import console

# the variables of this process a Ray task's child gets on its node (the node's own environment otherwise)
FORWARDED_ENV = ("OPD_", "HF_", "AWS_", "VLLM_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "PYTORCH_", "RAY_")


@dataclass
class Worker:
    """One stage process: `opd ARGS...`, its environment here, and what it asks of a Ray cluster."""

    stage: str  # "rollout", "score" or "train"
    label: str  # how lines name it, e.g. "score 1/2"
    args: list[str]
    env: dict[str, str]
    gpus: int = 0  # GPUs per worker (Ray); 0 = a CPU worker
    resource: str = ""  # Ray custom resource, one unit per worker ("" = none)
    nodes: int = 1  # the learner over several nodes (Ray placement group)
    log_name: str = ""  # its log file's name under RUN/rounds/R/logs/ (object-store runs: uploaded there)
    round_index: int = 0


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


class LocalLauncher:
    """Stage workers as subprocesses of this one (they die with it: die_with_parent)."""

    name = "local"

    def __init__(self, echo=print):
        self.echo = echo

    def start(self, worker: Worker, common: list[str]) -> list[Job]:
        if worker.nodes > 1:
            raise OpdError("run.train_nodes > 1 needs the Ray launcher (--launcher ray)")
        out, err = console.streams()
        proc = subprocess.Popen(
            [sys.executable, "-m", "opd.pipeline.cli", *worker.args, *common],
            env=worker.env,
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


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies (Linux), so a killed `opd run` (or a
    Ray worker that died) never leaves a stage writing into the run behind it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def make_launcher(name: str, address: str, max_retries: int, echo=print):
    if name == "local":
        return LocalLauncher(echo)
    if name == "ray":
        from opd.pipeline.launch_ray import RayLauncher

        return RayLauncher(address, max_retries, echo)
    raise OpdError(f"--launcher {name!r} is invalid: use local or ray")


def forwarded_env(env: dict[str, str]) -> dict[str, str]:
    """The part of a worker's environment that travels with a Ray task to another node."""
    keep = {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV)}
    if "CUDA_VISIBLE_DEVICES" in env and env["CUDA_VISIBLE_DEVICES"] == "":
        keep["CUDA_VISIBLE_DEVICES"] = ""  # a CPU pool stays off the node's GPUs
    return keep

"""The Ray launcher of `opd run` (launchers.py says what it does); Ray is imported only here.

pip install 'opd[ray]'
ray start --head --resources '{"teacher": 2}'            # node A
ray start --address A:6379 --resources '{"rollout": 1}'  # node B
opd run RUN --launcher ray --ray-address A:6379 --score-devices 0,1 --set run.score_resource='"teacher"'
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.pipeline.launchers import Job, Worker, die_with_parent, forwarded_env
from opd.stages import console


class StageInterrupted(Exception):
    """A stage process on a Ray node ended by a signal (killed, OOM, pre-empted): worth a retry."""


def run_stage(worker: Worker, common: list[str], env: dict[str, str], queue, rdzv: str | None = None) -> dict:
    """The body of a Ray task, on the node Ray chose: run `opd ARGS` there and report back."""
    import ray

    ctx = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{ctx.get_node_id()[:8]}"
    args = list(worker.args)
    if worker.stage == "train":
        gpus = [str(int(g)) for g in ray.get_gpu_ids()]
        if gpus:  # Ray's GPUs for this task, as physical indices (`opd train` sets CUDA_VISIBLE_DEVICES)
            args += ["--devices", ",".join(gpus)]
        if rdzv:
            args += ["--nnodes", str(worker.nodes), "--rdzv-endpoint", rdzv]
    # this Ray worker runs only this job's tasks, which all carry the same variables: it takes them too,
    # so that its own access to an object-store run (the log upload) uses the driver's endpoint
    os.environ.update({k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"})  # Ray's, per task
    child_env = {**os.environ, **env, "OPD_NODE": node, "OPD_NO_BARS": "1"}
    run = RunDir(args[1])  # args: the stage, then the run directory
    # an object-store run's logs are files on this node: the worker's is uploaded into the run below
    local_log = None if run.local else run.log_path(worker.round_index, worker.log_name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd.pipeline.cli", *args, *common],
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        preexec_fn=die_with_parent,
    )
    for line in proc.stdout:
        queue.put((worker.label, node, line.rstrip("\n")))
    status = proc.wait()
    if local_log and os.path.isfile(local_log):
        name = f"{worker.log_name}.{node.replace('/', '-')}.log"
        path = storage.join(run.round_dir(worker.round_index), "logs", name)
        with open(local_log, "rb") as f:
            storage.atomic_write_bytes(run.fs, path, f.read())
    if status < 0:
        raise StageInterrupted(f"`opd {worker.label}` on node {node} was killed by signal {-status}")
    return {"status": status, "node": node}


def rendezvous_point() -> str:
    """HOST:PORT for torchrun's c10d rendezvous, on the node this task runs on (the first bundle's)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


class RayLauncher:
    """Stage workers as Ray tasks (see launchers.py)."""

    name = "ray"

    def __init__(self, address: str, max_retries: int, echo=print):
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError:
            raise OpdError("--launcher ray needs Ray: pip install 'opd[ray]'") from None
        self.ray, self.echo, self.max_retries = ray, echo, max_retries
        try:
            info = ray.init(address=address or None, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OpdError(f"cannot join the Ray cluster at {address or '$RAY_ADDRESS'} ({first})") from None
        self.address = info.address_info.get("gcs_address", address)
        self.queue = Queue(actor_options={"num_cpus": 0})
        self.groups: dict[int, object] = {}  # the learner's placement group, per worker, while it runs
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        echo(f"[opd run] Ray cluster at {self.address}: {len(nodes)} node(s), {_totals(nodes)}")

    def start(self, worker: Worker, common: list[str]) -> list[Job]:
        ray = self.ray
        env = forwarded_env(worker.env)
        resources = {worker.resource: 1} if worker.resource else {}
        options = dict(
            num_cpus=1,
            num_gpus=worker.gpus,
            resources=resources,
            max_retries=self.max_retries,
            retry_exceptions=[StageInterrupted],
        )
        if worker.nodes == 1:
            ref = ray.remote(run_stage).options(**options).remote(worker, common, env, self.queue)
            return [Job(worker, "?", handle=_RayHandle(ray, ref))]
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1, **({"GPU": worker.gpus} if worker.gpus else {}), **resources}
        pg = placement_group([bundle] * worker.nodes, strategy="STRICT_SPREAD")
        ready, _ = ray.wait([pg.ready()], timeout=600)
        if not ready:
            remove_placement_group(pg)
            raise OpdError(
                f"the Ray cluster has no {worker.nodes} distinct nodes with {bundle} each for the learner "
                "(run.train_nodes, --train-devices, run.train_resource)"
            )
        self.groups[id(worker)] = pg

        def on(i):
            return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)

        rdzv = ray.get(ray.remote(rendezvous_point).options(num_cpus=1, scheduling_strategy=on(0)).remote())
        jobs = []
        for i in range(worker.nodes):
            task = ray.remote(run_stage).options(**options, scheduling_strategy=on(i))
            jobs.append(Job(worker, "?", handle=_RayHandle(ray, task.remote(worker, common, env, self.queue, rdzv))))
        return jobs

    def drain(self) -> None:
        """Print the workers' console lines that have arrived, each tagged with its worker and node."""
        n = self.queue.qsize()
        if n:
            for label, node, line in self.queue.get_nowait_batch(n):
                console.say(f"({label} @ {node}) {line}")

    def finish(self, jobs: list[Job]) -> None:
        """The stage's jobs ended: give back a learner's placement group (the next round needs it)."""
        from ray.util.placement_group import remove_placement_group

        for job in jobs:
            pg = self.groups.pop(id(job.worker), None)
            if pg is not None:
                remove_placement_group(pg)

    def close(self) -> None:
        time.sleep(0.2)
        self.drain()


class _RayHandle:
    """A Ray task seen as a process: poll / terminate / wait, and the node it ran on once it ended."""

    def __init__(self, ray, ref):
        self.ray, self.ref = ray, ref
        self.status: int | None = None
        self.node = "?"
        self.error = ""

    def poll(self) -> int | None:
        if self.status is not None:
            return self.status
        ready, _ = self.ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            result = self.ray.get(self.ref)
            self.status, self.node = result["status"], result["node"]
        except self.ray.exceptions.TaskCancelledError:
            self.status, self.error = -15, "cancelled"
        except self.ray.exceptions.RayError as e:  # retries used up: killed every time, or its node died
            cause = getattr(e, "cause", None)
            self.status = -9
            self.error = str(cause) if isinstance(cause, StageInterrupted) else type(e).__name__
        return self.status

    def terminate(self) -> None:
        self.ray.cancel(self.ref, force=True)

    def wait(self, timeout=None):
        self.ray.wait([self.ref], timeout=timeout)

    def kill(self) -> None:
        self.terminate()


def _totals(nodes: list[dict]) -> str:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.get("Resources", {}).items():
            if not k.startswith(("node:", "memory", "object_store_memory")):
                total[k] = total.get(k, 0) + v
    return ", ".join(f"{k} {v:g}" for k, v in sorted(total.items()))

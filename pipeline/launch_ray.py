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
from opd.pipeline.launchers import Job, Worker, die_with_parent, forwarded_env, stage_env
from opd.stages import console


class StageInterrupted(Exception):
    """A stage process on a Ray node ended by a signal (killed, OOM, pre-empted): worth a retry."""


GROUP_GRACE_S = 60.0  # a learner member failed: how long the others get to end by themselves


def run_stage(worker: Worker, common: list[str], env: dict[str, str], queue, rdzv: str | None = None) -> dict:
    """The body of a Ray task, on the node Ray chose: run `python -m MODULE ARGS` there and report back."""
    import ray

    ctx = ray.get_runtime_context()
    ip = ray.util.get_node_ip_address()
    node = f"{ip}/{ctx.get_node_id()[:8]}"
    args = list(worker.args)
    child = {"OPD_NODE": node, "OPD_NO_BARS": "1"}
    if worker.stage == "train":
        gpus = ray.get_gpu_ids()
        if gpus:  # the GPUs Ray gave this task (its CUDA_VISIBLE_DEVICES), numbered as the task sees them
            args += ["--devices", ",".join(str(i) for i in range(len(gpus)))]
        if rdzv:
            args += ["--nnodes", str(worker.nodes), "--rdzv-endpoint", rdzv]
            child["PET_LOCAL_ADDR"] = ip  # torchrun's --local-addr: the address the other nodes reach
    # this Ray worker runs only this job's tasks, which all carry the same variables: it takes them too,
    # so that its own access to an object-store run (the log upload) uses the driver's endpoint
    os.environ.update(env)
    # a GPU task keeps the CUDA_VISIBLE_DEVICES Ray set; a CPU pool's worker stays off the node's GPUs
    child_env = stage_env({**os.environ, **child}, worker.visible if not worker.gpus else None)
    run = RunDir(args[1])  # args: the stage, then the run directory
    # an object-store run's logs are files on this node: the worker's is uploaded into the run below
    local_log = None if run.local else run.log_path(worker.round_index, worker.log_name)
    proc = subprocess.Popen(
        [sys.executable, "-m", worker.module, *args, *common],
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

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))  # a free port on the node's own address (nothing listens on it yet)
        port = s.getsockname()[1]
    return f"{ip}:{port}"


class RayLauncher:
    """Stage workers as Ray tasks (see launchers.py)."""

    name = "ray"

    def __init__(self, address: str, max_retries: int, echo=print):
        try:
            import ray
            from ray.util.queue import Queue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        except ImportError:
            raise OpdError("--launcher ray needs Ray: pip install 'opd[ray]'") from None
        self.ray, self.echo, self.max_retries = ray, echo, max_retries
        try:
            info = ray.init(address=address or None, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise OpdError(f"cannot join the Ray cluster at {address or '$RAY_ADDRESS'} ({first})") from None
        self.address = info.address_info.get("gcs_address", address)
        # the console queue lives on this node, so that losing another node never loses it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.groups: dict[int, _RayGroup] = {}  # the learner's group, per worker, while it runs
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        echo(f"[opd run] Ray cluster at {self.address}: {len(nodes)} node(s), {_totals(nodes)}")

    def options(self, worker: Worker, retries: int) -> dict:
        return dict(
            num_cpus=1,
            num_gpus=worker.gpus,
            resources={worker.resource: 1} if worker.resource else {},
            max_retries=retries,
            retry_exceptions=[StageInterrupted],
        )

    def start(self, worker: Worker, common: list[str]) -> list[Job]:
        env = forwarded_env(worker)
        if worker.nodes == 1:
            task = self.ray.remote(run_stage).options(**self.options(worker, self.max_retries))
            return [Job(worker, "?", handle=_RayHandle(self.ray, task.remote(worker, common, env, self.queue)))]
        group = _RayGroup(self, worker, common, env)
        self.groups[id(worker)] = group
        return [Job(worker, "?", handle=_Member(group, i)) for i in range(worker.nodes)]

    def drain(self) -> None:
        """Print the workers' console lines that have arrived, each tagged with its worker and node."""
        n = self.queue.qsize()
        if n:
            for label, node, line in self.queue.get_nowait_batch(n):
                console.say(f"({label} @ {node}) {line}")

    def finish(self, jobs: list[Job]) -> None:
        """The stage's jobs ended: give back a learner's placement group (the next round needs it)."""
        for job in jobs:
            group = self.groups.pop(id(job.worker), None)
            if group is not None:
                group.release()

    def close(self) -> None:
        time.sleep(0.2)
        self.drain()


class _RayGroup:
    """A learner over several nodes: a placement group with one bundle per node (STRICT_SPREAD) and one
    task per bundle, torchruns meeting at a c10d rendezvous on the first bundle's node. When a member is
    lost (its node died, or its process was killed) the group is stopped and started again as a whole in
    a new placement group (run.ray_max_retries times); the learners resume from their last checkpoint.
    A member that ends with an `opd` error (status 1) while none was lost fails the group."""

    def __init__(self, launcher: RayLauncher, worker: Worker, common: list[str], env: dict[str, str]):
        self.launcher, self.worker, self.common, self.env = launcher, worker, common, env
        self.ray = launcher.ray
        self.status: int | None = None
        self.error = ""
        self.restarts = 0
        self.nodes = ["?"] * worker.nodes
        self.pg = None
        self.stopping = False  # stopped from outside (the run ends): never started again
        self._place()

    def _place(self) -> None:
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray, w = self.ray, self.worker
        bundle = {"CPU": 1, **({"GPU": w.gpus} if w.gpus else {}), **({w.resource: 1} if w.resource else {})}
        self.pg = placement_group([bundle] * w.nodes, strategy="STRICT_SPREAD")
        ready, _ = ray.wait([self.pg.ready()], timeout=600)
        if not ready:
            self.release()
            raise OpdError(
                f"the Ray cluster has no {w.nodes} distinct nodes with {bundle} each for the learner "
                "(run.train_nodes, --train-devices, run.train_resource)"
            )

        def on(i):
            return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)

        rdzv = ray.get(ray.remote(rendezvous_point).options(num_cpus=0, scheduling_strategy=on(0)).remote())
        options = self.launcher.options(w, 0)  # a lost member restarts the group, not itself
        self.handles = [
            _RayHandle(
                ray,
                ray.remote(run_stage)
                .options(**options, scheduling_strategy=on(i))
                .remote(w, self.common, self.env, self.launcher.queue, rdzv),
            )
            for i in range(w.nodes)
        ]
        self.failed_at: float | None = None
        self.placed_on = set(placement_group_table(self.pg)["bundles_to_node_id"].values())
        self._asked_at, self._lost = 0.0, False

    def poll(self) -> int | None:
        if self.status is not None:
            return self.status
        codes = [h.poll() for h in self.handles]
        if all(c == 0 for c in codes):
            self.status, self.nodes = 0, [h.node for h in self.handles]
            return 0
        node_lost = self._node_lost()
        if all(c in (None, 0) for c in codes) and not node_lost:
            return None
        # a member failed: unless one of the group's nodes is gone, the others end by themselves soon
        # (their peer is gone, or Ray reports a lost task); only then is it known whether one was lost
        self.failed_at = self.failed_at or time.monotonic()
        if None in codes:
            if not node_lost and time.monotonic() - self.failed_at < GROUP_GRACE_S:
                return None
            self.terminate()
            self.wait(30)
            codes = [h.poll() for h in self.handles]
        lost = [h.error or "killed" for h, c in zip(self.handles, codes) if c is not None and c < 0]
        lost = ["its node left the cluster"] if node_lost else [e for e in lost if e != "cancelled"]
        self.release()
        if lost and not self.stopping and self.restarts < self.launcher.max_retries:
            self.restarts += 1
            self.launcher.echo(
                f"[opd run] {self.worker.label}: a learner node was lost ({lost[0]}); the group "
                f"of {self.worker.nodes} starts again from its last checkpoint (try {self.restarts} of "
                f"{self.launcher.max_retries})"
            )
            self._place()
            return None
        bad = next((h for h, c in zip(self.handles, codes) if c not in (None, 0) and h.error != "cancelled"), None)
        bad = bad or next(h for h, c in zip(self.handles, codes) if c != 0)
        self.status, self.error = bad.status if bad.status is not None else -9, bad.error
        self.nodes = [h.node for h in self.handles]
        return self.status

    def _node_lost(self) -> bool:
        """Has a node of this placement left the cluster? (asked of Ray at most once a second)"""
        now = time.monotonic()
        if now - self._asked_at >= 1.0:
            self._asked_at = now
            self._lost = bool(self.placed_on - {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")})
        return self._lost

    def terminate(self) -> None:
        for h in self.handles:
            if h.poll() is None:
                h.terminate()

    def wait(self, timeout=None) -> None:
        self.ray.wait([h.ref for h in self.handles], num_returns=len(self.handles), timeout=timeout)

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


class _Member:
    """Member i of a _RayGroup seen as a process: the group's status once the group has ended."""

    def __init__(self, group: _RayGroup, index: int):
        self.group, self.index = group, index

    def poll(self) -> int | None:
        return self.group.poll()

    @property
    def node(self) -> str:
        return self.group.nodes[self.index]

    @property
    def error(self) -> str:
        return self.group.error

    def terminate(self) -> None:
        self.group.stopping = True
        self.group.terminate()

    def wait(self, timeout=None) -> None:
        self.group.wait(timeout)

    def kill(self) -> None:
        self.terminate()


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

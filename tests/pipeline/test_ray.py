"""`opd run --launcher ray` on a real two-node Ray cluster simulated on this machine
(ray.cluster_utils.Cluster: a head and a second node, each a raylet with its own custom resources),
listening on 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from loop_helpers import (
    CLI,
    KILL_SETTINGS,
    STAGE_FOLDERS,
    layout,
    sigkill_loop,
    stage_processes,
    tiny_settings,
    wait_for,
)

from opd.cache.rundir import RunDir, read_manifest
from opd.pipeline.evaluate import read_eval


@pytest.fixture(scope="module")
def cluster():
    """Head node: 4 logical CPUs, resources rollout_pool × 2 and learner × 1. Second node: 4 CPUs,
    score_pool × 2 and learner × 1. Ray's processes bind to loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    makes Ray's own address lookup answer 127.0.0.1, as on a laptop)."""
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {"rollout_pool": 2, "learner": 1},
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    second = c.add_node(num_cpus=4, resources={"score_pool": 2, "learner": 1}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    try:
        yield c, c.head_node.node_id, second.node_id
    finally:
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = old


def _non_loopback_listeners(root_pid: int) -> set[str]:
    """Addresses other than loopback that processes under `root_pid` listen on (TCP)."""
    pids = {root_pid} | {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids}
    return {ip for ip in listening if not _loopback(ipaddress.ip_address(ip))}


def _loopback(ip) -> bool:
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback


def test_two_rounds_across_two_nodes_with_the_driver_and_a_score_task_killed(
    tmp_path, cluster, reference_run, tiny_teacher, tiny_student
):
    """Two rounds of the tiny preset through `opd run --launcher ray`: the rollout worker only on the head
    node (rollout_pool), the score worker only on the second (score_pool), the learner over both nodes
    (run.train_nodes = 2: a placement group, torchrun on each, c10d rendezvous). Round 1's score task
    process is SIGKILLed half-way; Ray starts the task again and it finishes the missing shards. Before
    that the driver itself is SIGKILLed during round 0's rollout (its tasks' processes die with it) and
    started again, resuming.
    Checked against the local launcher's run of the same settings (same shards, rows and sample ids)."""
    c, head, second = cluster
    ref, _ = reference_run
    run_dir = tmp_path / "ray"
    run = RunDir(str(run_dir))
    settings = dict(
        KILL_SETTINGS,
        **{
            "run.rollout_resource": '"rollout_pool"',
            "run.score_resource": '"score_pool"',
            "run.train_resource": '"learner"',
            "run.train_nodes": 2,
        },
    )
    cmd = CLI + ["run", str(run_dir), "--config", "tiny", "--rounds", "2", "--engine", "transformers"]
    cmd += ["--launcher", "ray", "--ray-address", c.address, "--rollout-devices", "cpu"]
    cmd += ["--score-devices", "cpu", "--train-devices", "cpu", "--overlap", "on"]
    cmd += tiny_settings(tiny_teacher, tiny_student, **settings)

    # the driver SIGKILLed during round 0's rollout: its tasks and their stage processes go with it
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list(Path(run.stage_dir(0, "rollouts")).glob("part-*.parquet"))) >= 2, driver, "rollout")
    sigkill_loop(driver, run_dir)
    assert read_manifest(run, run.stage_dir(0, "rollouts")) is None, "rollout had finished before the kill"

    # started again: it resumes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def round1_scores_under_way():
        folder = Path(run.stage_dir(1, "scores"))
        return len(list(folder.glob("part-*.parquet"))) >= 2 and not (folder / "_DONE.json").exists()

    wait_for(round1_scores_under_way, proc, "round 1's scoring to be under way", timeout=400)
    assert not _non_loopback_listeners(os.getpid())  # the cluster, its tasks and their children
    killed = stage_processes(run_dir, "score", "--round 1 ")
    assert len(killed) == 1, killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]

    # the shard set of the local launcher's run, nothing duplicated or left over
    got = layout(run, [0, 1, 2])
    want = layout(ref, [0, 1])
    assert {k: v for k, v in got.items() if k[0] == 0} == {k: v for k, v in want.items() if k[0] == 0}
    assert got[(1, "rollouts")] == want[(0, "rollouts")] and got[(1, "scores")] == want[(0, "scores")]
    assert got[(2, "heldout/rollouts")] == want[(1, "heldout/rollouts")]
    assert set(got) == {(r, f) for r in (0, 1) for f in STAGE_FOLDERS} | {
        (2, "heldout/rollouts"),
        (2, "heldout/scores"),
    }
    for r, folder in got:
        names = {p.name for p in Path(run.stage_dir(r, folder)).iterdir()}
        assert names == set(got[(r, folder)]) | {"_DONE.json"}, (r, folder)

    def ids(rd, r):
        folder = Path(rd.stage_dir(r, "rollouts"))
        return sorted(
            x
            for p in folder.glob("part-*.parquet")
            for x in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()
        )

    assert ids(run, 0) == ids(ref, 0) and len(ids(run, 1)) == len(set(ids(run, 1))) == 48
    for r in (0, 1):  # every score row is one of the round's rollout rows, once
        score_ids = sorted(
            x
            for p in Path(run.stage_dir(r, "scores")).glob("part-*.parquet")
            for x in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()
        )
        assert score_ids == ids(run, r)

    # where each worker ran: the pools' resources decided it; the learner spanned both nodes
    loop = [json.loads(x) for x in Path(run.metrics_path(0)).read_text().splitlines() if '"loop"' in x]
    nodes = {x["step"]: {n.split("/")[1] for n in x["nodes"]} for x in loop}
    assert nodes == {"rollout": {head[:8]}, "score": {second[:8]}, "train": {head[:8], second[:8]}}
    assert all(x["launcher"] == "ray" for x in loop)
    assert read_manifest(run, run.stage_dir(0, "student")).summary["world_size"] == 2
    assert read_eval(run, 2)["samples"] == read_eval(ref, 1)["samples"] == 4
    # the killed worker was started again (a second invocation in its log) and said where it ran
    for name in ("score",):
        headers = [
            x
            for x in (Path(run.round_dir(1)) / "logs" / f"{name}.log").read_text().splitlines()
            if x.startswith("===== ")
        ]
        assert len(headers) == 2 and all(f"node 127.0.0.1/{second[:8]}" in h for h in headers), headers
    assert f"(score @ 127.0.0.1/{second[:8]}) score round 1" in out
    assert not stage_processes(run_dir)


def test_a_stage_error_is_not_retried_and_names_the_node(tmp_path, cluster, tiny_teacher, tiny_student):
    """A stage that fails with an opd error (status 1) fails the run at once, with one line naming the
    worker and its node; Ray does not start it again."""
    c, head, _ = cluster
    run_dir = tmp_path / "bad"
    settings = tiny_settings(tiny_teacher, tiny_student, **{"rollout.prompts": '"/nonexistent.jsonl"'})
    cmd = CLI + ["run", str(run_dir), "--config", "tiny", "--rounds", "1", "--launcher", "ray"]
    res = subprocess.run(cmd + ["--ray-address", c.address] + settings, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    errors = [x for x in res.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "`opd rollout` exited with status 1 on node 127.0.0.1/" in errors[0], res.stderr
    log = (run_dir / "rounds" / "0000" / "logs" / "rollout.log").read_text()
    assert log.count("===== ") == 1 and "/nonexistent.jsonl" in res.stdout

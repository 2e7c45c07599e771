"""`opd run --launcher ray` on a real two-node Ray cluster simulated on this machine
(ray.cluster_utils.Cluster: a head and a second node, each a raylet with its own custom resources),
listening on 127.0.0.1 only (every test: the `loopback_only` fixture watches every process it starts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from loop_helpers import (
    CLI,
    KILL_SETTINGS,
    STAGE_FOLDERS,
    layout,
    sigkill_loop,
    stage_nodes,
    stage_processes,
    tiny_settings,
    wait_for,
)
from safetensors.torch import load_file

from opd.cache.rundir import RunDir, read_manifest
from opd.pipeline.evaluate import read_eval

pytestmark = pytest.mark.usefixtures("loopback_only")


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


RAY_POOLS = {
    "run.rollout_resource": '"rollout_pool"',
    "run.score_resource": '"score_pool"',
    "run.train_resource": '"learner"',
}


def _ray_run(c, run_dir, teacher, student, devices: dict[str, str], **settings) -> list[str]:
    cmd = CLI + ["run", str(run_dir), "--config", "tiny", "--rounds", "1", "--engine", "transformers"]
    cmd += ["--launcher", "ray", "--ray-address", c.address, "--overlap", "on"]
    for pool, d in devices.items():
        cmd += [f"--{pool}-devices", d]
    return cmd + tiny_settings(teacher, student, **KILL_SETTINGS, **RAY_POOLS, **settings)


def _sample_ids(rd: RunDir, r: int, folder: str) -> list[str]:
    return sorted(
        x
        for p in Path(rd.stage_dir(r, folder)).glob("part-*.parquet")
        for x in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()
    )


def _worker_node(c, node_id: str):
    return next(n for n in c.worker_nodes if n.node_id.startswith(node_id))


def _invocations(log: Path) -> list[str]:
    """The header line of each invocation of a stage command in its log (it names the node)."""
    return [x for x in log.read_text().splitlines() if x.startswith("===== ")]


def test_a_node_lost_mid_score_costs_only_its_unfinished_shards(
    tmp_path, cluster, reference_run, tiny_teacher, tiny_student
):
    """Two score workers (score_pool: 2 on the second node, 1 on a third added here) follow rollout; once a
    worker on a node other than the head has written a shard of its own, its node is removed from the
    cluster. Ray starts the lost task again on a node left, where it scores its missing shards only; the
    round ends with the shard set and sample ids of the local launcher's clean run, nothing lost or
    written twice, and no stage process of the removed node left behind."""
    c, head, _ = cluster
    c.add_node(num_cpus=4, resources={"score_pool": 1, "learner": 1}, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    ref, _ = reference_run
    run_dir = tmp_path / "lost-score"
    run = RunDir(str(run_dir))
    devices = {"rollout": "cpu", "score": "cpu,cpu", "train": "cpu,cpu"}
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "w") as out:
        proc = subprocess.Popen(_ray_run(c, run_dir, tiny_teacher, tiny_student, devices), stdout=out, stderr=out)
    scores = Path(run.stage_dir(0, "scores"))
    victim: dict = {}
    placed: dict[int, str] = {}  # score worker i → its node when the victim's node is removed

    def a_worker_away_from_the_head_wrote_a_shard() -> bool:
        if (scores / "_DONE.json").exists():
            return False
        placed.clear()
        for pid, node in stage_nodes(run_dir, "score", "--round 0 ", "--split all").items():
            try:
                placed[int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"--shard\0")[1].split(b"/")[0])] = node
            except (OSError, IndexError, ValueError):
                continue
        written = {int(p.name[5:10]) % 2 for p in scores.glob("part-*.parquet")}
        away = [i for i, node in placed.items() if not node.endswith(head[:8]) and i in written]
        if away:
            victim.update(node=placed[away[0]], shard=away[0])
        return bool(away)

    wait_for(a_worker_away_from_the_head_wrote_a_shard, proc, "a score worker away from the head to write a shard")
    c.remove_node(_worker_node(c, victim["node"].split("/")[1]))
    wait_for(lambda: victim["node"] not in stage_nodes(run_dir).values(), None, "the removed node's processes to end")
    assert proc.wait(timeout=900) == 0, driver_log.read_text()[-4000:]

    # the shard set and sample ids of the clean local run; every score row once
    got = layout(run, [0, 1])
    assert got == layout(ref, [0, 1])
    for r, folder in got:
        names = {p.name for p in Path(run.stage_dir(r, folder)).iterdir()}
        assert names == set(got[(r, folder)]) | {"_DONE.json"}, (r, folder)
    assert _sample_ids(run, 0, "rollouts") == _sample_ids(ref, 0, "rollouts")
    assert _sample_ids(run, 0, "scores") == _sample_ids(run, 0, "rollouts")
    assert len(set(_sample_ids(run, 0, "scores"))) == 48
    # a worker of the removed node ran twice: there, then on a node left; a worker elsewhere once
    for i, node in placed.items():
        runs = _invocations(Path(run.round_dir(0)) / "logs" / f"score-{i}of2.log")
        if node == victim["node"]:
            assert len(runs) == 2 and node in runs[0] and node not in runs[1], runs
        else:
            assert len(runs) == 1 and node in runs[0], runs
    loop = [json.loads(x) for x in Path(run.metrics_path(0)).read_text().splitlines() if '"loop"' in x]
    score_nodes = next(x["nodes"] for x in loop if x["step"] == "score")
    assert victim["node"] not in score_nodes and "?" not in score_nodes
    assert not stage_processes(run_dir)


def test_a_learner_that_loses_a_node_restarts_as_a_group_from_its_checkpoint(
    tmp_path, cluster, tiny_teacher, tiny_student
):
    """The learner over two nodes (run.train_nodes = 2: the head and another node with a learner slot),
    checkpointing every step; once it has committed a checkpoint, the other node is removed. The torchrun
    left on the head fails with its peer, the launcher stops the group, says so, and asks for a new
    placement group of two nodes: a node is added back (STRICT_SPREAD needs two), the group starts
    again there and resumes from the checkpoint, and the student equals an uninterrupted training on
    the same cache (`opd train --from`, two processes)."""
    c, head, _ = cluster
    run_dir = tmp_path / "lost-learner"
    run = RunDir(str(run_dir))
    devices = {"rollout": "cpu", "score": "cpu", "train": "cpu"}
    settings = {"run.train_nodes": 2, "train.checkpoint_every_steps": 1, "train.epochs": 8, "eval.final": "false"}
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "w") as out:
        cmd = _ray_run(c, run_dir, tiny_teacher, tiny_student, devices, **settings)
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
    latest = Path(run.round_dir(0)) / "train_ckpt" / "latest.json"
    wait_for(latest.exists, proc, "the learner's first checkpoint", timeout=900)
    away = {n for n in stage_nodes(run_dir, "train", "--nnodes 2").values() if not n.endswith(head[:8])}
    assert len(away) == 1, away
    (lost,) = away
    c.remove_node(_worker_node(c, lost.split("/")[1]))
    wait_for(lambda: "a learner node was lost" in driver_log.read_text(), proc, "the launcher to restart the group")
    assert read_manifest(run, run.stage_dir(0, "student")) is None, "train had finished before the node left"
    added = c.add_node(num_cpus=4, resources={"score_pool": 2, "learner": 1}, node_ip_address="127.0.0.1")
    assert proc.wait(timeout=900) == 0, driver_log.read_text()[-4000:]

    summary = read_manifest(run, run.stage_dir(0, "student")).summary
    assert summary["world_size"] == 2 and summary["resumed_from_step"] > 0
    loop = [json.loads(x) for x in Path(run.metrics_path(0)).read_text().splitlines() if '"loop"' in x]
    train_nodes = {n.split("/")[1] for n in next(x["nodes"] for x in loop if x["step"] == "train")}
    assert train_nodes == {head[:8], added.node_id[:8]}
    runs = _invocations(Path(run.round_dir(0)) / "logs" / "train.log")
    assert len(runs) == 4 and sum(lost in h for h in runs) == 1, runs  # 2 members, started twice
    assert not stage_processes(run_dir)
    # the same student as an uninterrupted training of the same cache on two processes
    clean = tmp_path / "clean"
    res = subprocess.run(
        CLI + ["train", "--from", run.round_dir(0), "--out", str(clean), "--devices", "cpu,cpu"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = load_file(Path(run.stage_dir(0, "student")) / "model.safetensors")
    b = load_file(Path(RunDir(str(clean)).stage_dir(0, "student")) / "model.safetensors")
    assert sorted(a) == sorted(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

"""What the Ray launcher and an object-store run directory cost: the tiny preset's two rounds through
`opd run`, the same settings three ways, one run each (the local one twice, first and last, to show
the drift of the machine over the benchmark):

    local  --launcher local, RUN a local folder (as today)
    ray    --launcher ray on a two-node Ray cluster simulated on this machine (ray.cluster_utils.Cluster,
           loopback only): rollout tasks on the head node, score tasks on the second (custom resources),
           the learner anywhere; the cluster's start is timed apart (`ray_cluster_start_s`), not in `wall_s`
    s3     --launcher local, RUN = s3://bench/run on moto's S3 API server on 127.0.0.1 (started here)

    python benchmarks/bench_launcher.py              # 2 rounds of the tiny preset (16 prompts × 2 samples)
    python benchmarks/bench_launcher.py --smoke      # 1 round, 4 prompts: the code path, figures mean nothing

Each case prints one JSON line: `wall_s` (the whole `opd run`, process starts included) and `stage_s`,
the loop's own wall seconds per stage summed over rounds (its "loop" metrics records: from starting the
stage's workers to the last one's end). The summary line has `ratio_ray` and `ratio_s3`: the case's
wall ÷ the mean of the two local walls, and `extra_s` per stage (the case's stage seconds − local's).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, offline, tiny_models  # noqa: E402

CLI = [sys.executable, "-m", "opd.pipeline.cli"]


def opd_run(url: str, settings: list[str], extra: list[str], rounds: int) -> float:
    cmd = CLI + ["run", url, "--config", "tiny", "--rounds", str(rounds), "--engine", "transformers"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd + extra + settings, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"opd run {url} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return wall


def stage_seconds(url: str, rounds: int) -> dict[str, float]:
    from opd.cache.rundir import RunDir

    run = RunDir(url)
    out: dict[str, float] = {}
    for r in range(rounds + 1):
        for rec in run.read_metrics(r):
            if rec.get("stage") == "loop":
                out[rec["step"]] = round(out.get(rec["step"], 0.0) + rec["wall_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="1 round of 4 prompts: the code path only")
    ap.add_argument("--workdir", default=None, help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    offline()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray on loopback only (see tests/pipeline/test_ray.py)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="opd-bench-launcher-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["OPD_HOME"] = str(work / "home")
    teacher, student = tiny_models(work / "models")
    rounds = 1 if args.smoke else 2
    values = {"run.teacher": f'"{teacher}"', "run.student": f'"{student}"'}
    if args.smoke:
        values.update({"rollout.max_prompts": 4, "eval.max_prompts": 2, "rollout.max_new_tokens": 8})
    settings = [x for k, v in values.items() for x in ("--set", f"{k}={v}")]
    env = machine()
    records = {}

    def case(name: str, url: str, extra: list[str], after=dict, **more) -> None:
        wall = opd_run(url, settings, extra, rounds)
        rec = {"case": name, "wall_s": round(wall, 2), "stage_s": stage_seconds(url, rounds), "rounds": rounds}
        rec.update(more, **after(), smoke=args.smoke, **env)
        records.setdefault(name, []).append(rec)
        print(json.dumps(rec), flush=True)

    case("local", str(work / "local-1"), [])

    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    head = {"num_cpus": 4, "resources": {"rollout_pool": 1}, "include_dashboard": False, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cluster.add_node(num_cpus=4, resources={"score_pool": 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    started = time.perf_counter() - t0
    try:
        pools = ["--set", 'run.rollout_resource="rollout_pool"', "--set", 'run.score_resource="score_pool"']
        ray_args = ["--launcher", "ray", "--ray-address", cluster.address] + pools
        case("ray", str(work / "ray"), ray_args, ray_cluster_start_s=round(started, 2))
    finally:
        cluster.shutdown()

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
        fs.create_dir("bench")

        def objects() -> dict:
            """What the run left in the bucket: objects, bytes, and `.tmp-` leftovers (0 when the rules hold)."""
            listing = fs.get_file_info(pafs.FileSelector("bench/run", recursive=True))
            files = [i for i in listing if i.type == pafs.FileType.File]
            tmp = sum(".tmp-" in i.path for i in files)
            return {"objects": len(files), "object_bytes": sum(i.size for i in files), "tmp_objects": tmp}

        case("s3", "s3://bench/run", [], after=objects)
    finally:
        server.stop()

    case("local", str(work / "local-2"), [])

    local = records["local"]
    local_wall = sum(r["wall_s"] for r in local) / len(local)
    local_stage = {k: sum(r["stage_s"].get(k, 0) for r in local) / len(local) for k in local[0]["stage_s"]}
    summary = {"case": "summary", "local_s_all": [r["wall_s"] for r in local], "smoke": args.smoke, **env}
    for name in ("ray", "s3"):
        rec = records[name][0]
        summary[f"ratio_{name}"] = round(rec["wall_s"] / local_wall, 3)
        summary[f"{name}_extra_s"] = {k: round(rec["stage_s"].get(k, 0) - v, 2) for k, v in local_stage.items()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

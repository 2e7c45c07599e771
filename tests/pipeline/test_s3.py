"""A run directory on an object store: `s3://` through pyarrow's S3 filesystem, against a real S3 API
server on 127.0.0.1 (moto's standalone server, started here)."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from loop_helpers import CLI, KILL_SETTINGS, STAGE_FOLDERS, layout, opd_run, sigkill_loop, tiny_settings, wait_for
from safetensors.torch import load

from opd.cache import storage
from opd.cache.fingerprint import opd_home
from opd.cache.rundir import RunDir, read_manifest
from opd.pipeline.evaluate import read_eval

BUCKET = "opd-test"
pytestmark = pytest.mark.usefixtures("loopback_only")  # the S3 server and every process on 127.0.0.1 only


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's ThreadedMotoServer on 127.0.0.1 (a free port), one bucket, and the standard AWS_*
    variables pointing every process (pyarrow's S3 filesystem) at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "opd-test",
        "AWS_SECRET_ACCESS_KEY": "opd-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    try:
        yield fs
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _objects(fs, prefix: str) -> dict[str, int]:
    return {
        i.path: i.size
        for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
        if i.type == pafs.FileType.File
    }


def test_a_round_on_s3_killed_in_score_resumes_verifies_and_retrains(s3, reference_run, tiny_teacher, tiny_student):
    """rollout → score → train → final evaluation with RUN = s3://bucket/run, SIGKILLed while scoring
    and resumed; the same shards as the local reference run, no partial or temporary object left,
    `opd verify` and `opd inspect` read it, `opd train --from` re-trains from its cache, and a flipped
    byte in an object is caught by `opd verify` in one line."""
    ref, _ = reference_run
    url = f"s3://{BUCKET}/run"
    run = RunDir(url)
    args = ["--config", "tiny", "--rounds", "1", "--engine", "transformers"]
    args += tiny_settings(tiny_teacher, tiny_student, **KILL_SETTINGS)

    def score_under_way():
        names = storage.listdir(run.fs, run.stage_dir(0, "scores"))
        return sum(n.startswith("part-") for n in names) >= 2 and "_DONE.json" not in names

    proc = subprocess.Popen(CLI + ["run", url, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(score_under_way, proc, "the score stage to be under way")
    sigkill_loop(proc, url)
    assert read_manifest(run, run.stage_dir(0, "scores")) is None, "score had finished before the kill"
    res = opd_run(url, *args[2:])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    got = layout(run, [0, 1])
    assert got == layout(ref, [0, 1])
    assert set(got) == {(0, f) for f in STAGE_FOLDERS} | {(1, "heldout/rollouts"), (1, "heldout/scores")}
    objects = _objects(s3, f"{BUCKET}/run")
    assert not [p for p in objects if ".tmp-" in p]  # no partial or temporary object anywhere
    for (r, folder), shards in got.items():
        prefix = f"{run.stage_dir(r, folder)}/"
        names = {p[len(prefix) :] for p in objects if p.startswith(prefix) and "/" not in p[len(prefix) :]}
        assert names == set(shards) | {"_DONE.json"}, (r, folder)

    def ids(rd):
        out = []
        for name in sorted(layout(rd, [0])[(0, "rollouts")]):
            with rd.fs.open_input_file(rd.shard_path(0, "rollouts", int(name[5:10]))) as f:
                out += pq.read_table(f, columns=["sample_id"]).column(0).to_pylist()
        return sorted(out)

    assert ids(run) == ids(ref) and len(set(ids(run))) == 48
    # metrics are one object per record there; every stage's records are readable
    stages = {x["stage"] for x in run.read_metrics(0)}
    assert {"rollout", "score", "train", "eval", "loop"} <= stages
    # the round 0 student was downloaded once for the final evaluation, checked against its manifest
    student = read_manifest(run, run.stage_dir(0, "student"))
    cached = opd_home() / "students" / student.digest()[:32]
    assert sorted(p.name for p in cached.iterdir()) == sorted(e.name for e in student.shards)
    assert read_eval(run, 1)["samples"] == 4

    verify = subprocess.run(CLI + ["verify", url], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    table = subprocess.run(CLI + ["inspect", url], capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and url in table.stdout
    assert [x.split()[-1] for x in table.stdout.splitlines() if x.strip().startswith(("0 ", "1 "))] == ["done", "only"]

    # re-training from the cache on the object store: same data, same config → the same student
    rerun = f"s3://{BUCKET}/rerun"
    res = subprocess.run(
        CLI + ["train", "--from", f"{url}/rounds/0", "--out", rerun], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = load(storage.read_bytes(run.fs, f"{run.stage_dir(0, 'student')}/model.safetensors"))
    b = load(storage.read_bytes(run.fs, f"{RunDir(rerun).stage_dir(0, 'student')}/model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # one flipped byte in a score shard: `opd verify` names the object, in one line
    victim = run.shard_path(0, "scores", 3)
    data = bytearray(storage.read_bytes(run.fs, victim))
    data[len(data) // 2] ^= 0x01
    with run.fs.open_output_stream(victim) as f:
        f.write(bytes(data))
    verify = subprocess.run(CLI + ["verify", url], capture_output=True, text=True, timeout=300)
    assert verify.returncode != 0
    errors = [x for x in (verify.stdout + verify.stderr).splitlines() if "checksum differs" in x]
    assert len(errors) == 1 and victim in errors[0] and "Traceback" not in verify.stderr
    assert (
        json.loads(storage.read_bytes(run.fs, f"{run.stage_dir(0, 'scores')}/_DONE.json"))["format"] == "opd.manifest"
    )

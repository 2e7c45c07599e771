"""Helpers of the `opd run` tests (test_loop.py, test_ray.py, test_s3.py): commands, settings, waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from opd.cache.rundir import RunDir, read_manifest

CLI = [sys.executable, "-m", "opd.pipeline.cli"]
STAGE_FOLDERS = ("rollouts", "scores", "heldout/rollouts", "heldout/scores")

# one round of the tiny preset cut in many small shards, so that a stage can be caught half-way
KILL_SETTINGS = {
    "rollout.max_prompts": 24,
    "rollout.prompts_per_shard": 2,
    "rollout.max_new_tokens": 32,
    "train.max_tokens_per_batch": 128,
    "eval.max_prompts": 4,
}


def tiny_settings(teacher, student, **extra) -> list[str]:
    """--set arguments: the tiny preset on the session's tiny models (no model building per process)."""
    settings = {"run.teacher": f'"{teacher}"', "run.student": f'"{student}"', **extra}
    return [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]


def opd_run(run_dir, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["run", str(run_dir), *args], capture_output=True, text=True, timeout=timeout, env=env)


def layout(run: RunDir, rounds: list[int]) -> dict:
    """{(round, folder): {shard name: rows}} from the manifests that exist."""
    out = {}
    for r in rounds:
        for folder in STAGE_FOLDERS:
            m = read_manifest(run, run.stage_dir(r, folder))
            if m is not None:
                out[(r, folder)] = {s.name: s.rows for s in m.shards}
    return out


def wait_for(predicate, proc, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"opd run ended (status {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def stage_processes(run_dir, *words: str) -> list[int]:
    """Live processes working on this run (stage children left behind would show up here); with
    `words`, only those whose command line has every one of them."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmd and "opd.pipeline.cli" in cmd and all(w in cmd for w in words):
                pids.append(int(p.name))
    return pids


def sigkill_loop(proc: subprocess.Popen, run_dir, timeout: float = 30) -> None:
    """SIGKILL an `opd run` and wait until no stage process of the run is left: they get SIGKILL with
    the loop (PR_SET_PDEATHSIG; under Ray, with the driver's tasks)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while stage_processes(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not stage_processes(run_dir), "stage processes outlived the killed loop"

"""Helpers of the `opd run` tests (test_loop.py, test_ray.py, test_s3.py): commands, settings, waits, and
the check that every listener they start is on loopback (LoopbackOnly)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import waiting

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
    """--set arguments: the tiny preset on the session's tiny models (no model building per process), in
    float32 on every CPU: runs are compared with each other and with float32 references at float32
    tolerances (tests/stages/test_bf16.py tests the bf16 paths)."""
    float32 = {f"{s}.dtype": '"float32"' for s in ("rollout", "score", "train")}
    settings = {"run.teacher": f'"{teacher}"', "run.student": f'"{student}"', **float32, **extra}
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
    """tests/waiting.py's, shared with tests/stages: poll `predicate`; fail if `proc` ends first."""
    waiting.wait_for(predicate, proc, what, timeout)


def stage_processes(run_dir, *words: str) -> list[int]:
    """Live processes working on this run (stage children left behind would show up here: stage commands,
    torchrun and its learner processes); with `words`, only those whose command line has every one."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            opd = "opd.pipeline.cli" in cmd or "opd.pipeline.torchrun" in cmd  # a stage, torchrun, a learner
            if str(run_dir) in cmd and opd and all(w in cmd for w in words):
                pids.append(int(p.name))
    return pids


def stage_nodes(run_dir, *words: str) -> dict[int, str]:
    """{pid: its OPD_NODE ("IP/NODE_ID8", the Ray node a launcher's task runs it on)} for the stage
    processes of `stage_processes(run_dir, *words)` that have one."""
    nodes = {}
    for pid in stage_processes(run_dir, *words):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        node = next((e[len(b"OPD_NODE=") :].decode() for e in env if e.startswith(b"OPD_NODE=")), None)
        if node:
            nodes[pid] = node
    return nodes


def sigkill_loop(proc: subprocess.Popen, run_dir, timeout: float = 30) -> None:
    """SIGKILL an `opd run` and wait until no stage process of the run is left: they get SIGKILL with
    the loop (PR_SET_PDEATHSIG; under Ray, with the driver's tasks)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while stage_processes(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert not stage_processes(run_dir), "stage processes outlived the killed loop"


def non_loopback_listeners(root_pid: int | None = None) -> set[str]:
    """ "ADDRESS:PORT by COMMAND" for each TCP socket that `root_pid` (this process when None) or one of its
    descendants listens on anywhere but loopback (psutil's net_connections, per process)."""
    try:
        root = psutil.Process(root_pid or os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for p in procs:
        try:
            conns = p.net_connections("tcp")
            if not any(c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip) for c in conns):
                continue
            cmd = " ".join(p.cmdline()[:4])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN and not _loopback(c.laddr.ip):
                found.add(f"{c.laddr.ip}:{c.laddr.port} by {cmd}")
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback


class LoopbackOnly:
    """While in force, look every `interval` seconds at what this process and its descendants listen on
    (the Ray cluster, `opd run` and its stage processes, torchrun, the S3 server); on leaving, fail when
    any of them listened anywhere but loopback. A listener lives as long as its server (a torchrun for its
    whole stage), so sampling sees it; one last look is taken on leaving."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.found = interval, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.found |= non_loopback_listeners()
            self._stop.wait(self.interval)

    def __enter__(self) -> LoopbackOnly:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.found |= non_loopback_listeners()
        if exc[0] is None:
            assert not self.found, f"listening beyond loopback: {sorted(self.found)}"

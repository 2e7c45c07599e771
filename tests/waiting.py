"""Waiting on what a test can observe (a file, a shard, a log line, a manifest, a checkpoint), never on
the clock: `wait_for` polls a predicate until it holds. Its timeout only keeps a hung test from waiting
for ever; no test asserts on how long anything took.

Importable from every test folder (tests/conftest.py puts tests/ on sys.path): `from waiting import wait_for`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

HANG_S = 300.0  # a guard against a hung child only: generous, since 2 shared cores can be slow


def _tail(proc: subprocess.Popen) -> str:
    """The last lines the ended process wrote to a pipe, if it wrote to one."""
    out = []
    for stream in (proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            try:
                os.set_blocking(stream.fileno(), False)  # a surviving grandchild may still hold the pipe
                data = stream.read()
            except (OSError, ValueError, TypeError):
                continue
            if data is None:
                continue
            text = data.decode(errors="replace") if isinstance(data, bytes) else data
            out.append(text[-2000:])
    return "\n".join(x for x in out if x)


def wait_for(
    predicate: Callable[[], object],
    proc: subprocess.Popen | None,
    what: str,
    timeout: float = HANG_S,
    poll_s: float = 0.005,
) -> None:
    """Return as soon as `predicate()` is true. Fail if `proc` (when given) ends first — the event can no
    longer happen — with what it wrote to its pipes, or if `timeout` seconds pass (a hang guard)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            if predicate():  # it happened just before the process ended
                return
            raise AssertionError(f"the process ended (status {proc.returncode}) before {what}\n{_tail(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (a hang guard)")
        time.sleep(poll_s)

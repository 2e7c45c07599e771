"""What a person sees: opd's own lines and progress bars on the console, everything else in a log file.

A stage process (`opd rollout|score|train`, and every process `opd run` starts) calls `quiet(log_path)`
once: from then on file descriptors 1 and 2 (so Python's sys.stdout/sys.stderr, the logging handlers
of vLLM, transformers and torch, warnings, and what C++ code such as oneDNN prints) go to the stage's
log file, RUN/rounds/R/logs/<stage>.log, appended with a header per invocation. opd's own lines go to
the console through `say()` and its bars through `bar()`, which write to copies of the original
descriptors. `--verbose` (or OPD_VERBOSE=1) skips the redirection: everything on the console, as before.

When the process fails, `tail(log_path)` gives the log's last lines, which the CLI prints with the
log's path (see pipeline/cli.py).
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import deque
from typing import TextIO

_out: TextIO | None = None  # the console's stdout / stderr while quiet() is in force
_err: TextIO | None = None
_log_path: str | None = None


def say(line: str) -> None:
    """One line of opd's own output on the console (stdout)."""
    stream = _out or sys.stdout
    stream.write(line + "\n")
    stream.flush()


def warn(line: str) -> None:
    """One line of opd's own output on the console's stderr (errors, the log tail)."""
    stream = _err or sys.stderr
    stream.write(line + "\n")
    stream.flush()


def bar(**kwargs):
    """A tqdm progress bar on the console (never in the log)."""
    from tqdm import tqdm

    if os.environ.get("OPD_NO_BARS"):  # a Ray task: its console is a pipe back to `opd run`
        kwargs["disable"] = True
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(file=_err or sys.stderr, **kwargs)


def streams() -> tuple[TextIO, TextIO]:
    """(stdout, stderr) of the console, for child processes whose own lines should reach it."""
    return _out or sys.stdout, _err or sys.stderr


def log_path() -> str | None:
    """The log file this process writes to (None when not quiet)."""
    return _log_path


def verbose_requested() -> bool:
    return os.environ.get("OPD_VERBOSE", "") not in ("", "0")


def _console_copy(stream: TextIO, fd: int) -> TextIO:
    """A stream to the console that survives the redirection of `fd`: a duplicate of the descriptor
    where `stream` writes to it, else `stream` itself (an in-process capture, e.g. click's test runner)."""
    try:
        if stream.fileno() == fd:
            return io.TextIOWrapper(
                os.fdopen(os.dup(fd), "wb", buffering=0),
                encoding="utf-8",
                errors="replace",
                line_buffering=True,
                write_through=True,
            )
    except (OSError, ValueError, io.UnsupportedOperation, AttributeError):
        pass
    return stream


class quiet:
    """Context manager: send fds 1 and 2 to `path` (appending) for the duration; no-op when `path` is
    None or verbose output is asked for. Restores everything on exit."""

    def __init__(self, path: str | None, header: str = ""):
        self.path = None if verbose_requested() else path
        self.header = header

    def __enter__(self):
        global _out, _err, _log_path
        if self.path is None:
            return self
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (_out, _err, _log_path, sys.stdout, sys.stderr, os.dup(1), os.dup(2))
        _out = _console_copy(sys.stdout, 1)
        _err = _console_copy(sys.stderr, 2)
        _log_path = self.path
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        node = f" node {os.environ['OPD_NODE']}" if os.environ.get("OPD_NODE") else ""
        os.write(fd, f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}{node} {self.header}\n".encode())
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        log = io.TextIOWrapper(
            os.fdopen(os.dup(1), "wb", buffering=0),
            encoding="utf-8",
            errors="replace",
            line_buffering=True,
            write_through=True,
        )
        sys.stdout = sys.stderr = log
        return self

    def __exit__(self, *exc):
        global _out, _err, _log_path
        if self.path is None:
            return False
        out, err, path, stdout, stderr, fd1, fd2 = self._saved
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        log = sys.stdout
        sys.stdout, sys.stderr = stdout, stderr
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
        os.close(fd1)
        os.close(fd2)
        for stream in (log, _out, _err):
            if stream not in (stdout, stderr) and stream is not None:
                try:
                    stream.close()
                except (OSError, ValueError):
                    pass
        _out, _err, _log_path = out, err, path
        return False


def tail(path: str, lines: int = 15) -> list[str]:
    """The last `lines` lines of a log file (of the last invocation only)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            last: deque[str] = deque(maxlen=lines)
            for line in f:
                if line.startswith("===== "):
                    last.clear()
                last.append(line.rstrip("\n"))
    except OSError:
        return []
    return list(last)

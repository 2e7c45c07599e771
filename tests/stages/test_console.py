"""The quiet console (stages/console.py): opd's lines on the console, everything else in the log, and a
crash shown as the log's last lines and its path. Run in fresh processes so the descriptors are theirs."""

import os
import subprocess
import sys
import textwrap


def _run(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("OPD_VERBOSE", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


QUIET = """
    import logging, os, sys, warnings
    from opd.stages import console
    with console.quiet({log!r}, header="probe"):
        print("python-level noise")
        os.write(1, b"C-level noise on fd 1\\n")
        os.write(2, b"C-level noise on fd 2\\n")
        logging.getLogger("lib").warning("a library warning")
        warnings.warn("a FutureWarning", FutureWarning)
        console.say("opd line")
        console.warn("opd error line")
    print("after the block")
"""


def test_quiet_sends_everything_but_opd_lines_to_the_log(tmp_path):
    log = tmp_path / "logs" / "stage.log"
    res = _run(QUIET.format(log=str(log)))
    assert res.returncode == 0, res.stderr
    assert res.stdout == "opd line\nafter the block\n"
    assert res.stderr == "opd error line\n"
    text = log.read_text()
    for noise in (
        "python-level noise",
        "C-level noise on fd 1",
        "C-level noise on fd 2",
        "a library warning",
        "a FutureWarning",
        "===== ",
    ):
        assert noise in text
    assert "opd line" not in text


def test_verbose_leaves_everything_on_the_console(tmp_path):
    log = tmp_path / "stage.log"
    res = _run(QUIET.format(log=str(log)), {"OPD_VERBOSE": "1"})
    assert "python-level noise" in res.stdout and "C-level noise on fd 2" in res.stderr and not log.exists()


def test_a_crash_shows_the_log_tail_and_its_path(tmp_path):
    run = tmp_path / "run"
    code = f"""
        from opd.pipeline.cli_common import stage_process
        with stage_process({str(run)!r}, 3, "score"):
            print("loading the teacher")
            raise RuntimeError("CUDA out of memory")
    """
    res = _run(code)
    log = run / "rounds" / "0003" / "logs" / "score.log"
    assert res.returncode == 1 and res.stdout == ""
    lines = res.stderr.splitlines()
    assert lines[0] == "error: opd score crashed: RuntimeError: CUDA out of memory"
    assert any("loading the teacher" in line for line in lines) and any("Traceback" in line for line in lines)
    assert lines[-1] == f"full log: {log}"
    assert "RuntimeError: CUDA out of memory" in log.read_text()

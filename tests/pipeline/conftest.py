"""Fixtures shared by the `opd run` tests."""

import pytest
from loop_helpers import KILL_SETTINGS, LoopbackOnly, opd_run, tiny_settings

from opd.cache.rundir import RunDir


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_teacher, tiny_student):
    """One uninterrupted round + final evaluation with the local launcher, every pool split in two on
    CPU: 2 rollout workers, 2 score workers following them (overlap on), 2 gloo learners under
    torchrun (its listeners on loopback only, checked). The Ray and object-store runs are checked
    against it."""
    run_dir = tmp_path_factory.mktemp("loop") / "reference"
    with LoopbackOnly():
        res = _reference(run_dir, tiny_teacher, tiny_student)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return RunDir(str(run_dir)), res


@pytest.fixture
def loopback_only():
    """Fails the test when a process it started (this one, or any descendant) listened anywhere but on
    loopback while it ran (loop_helpers.LoopbackOnly)."""
    with LoopbackOnly() as watch:
        yield watch


def _reference(run_dir, tiny_teacher, tiny_student):
    return opd_run(
        run_dir,
        "--config",
        "tiny",
        "--rounds",
        "1",
        "--engine",
        "transformers",
        "--rollout-devices",
        "cpu,cpu",
        "--score-devices",
        "cpu,cpu",
        "--train-devices",
        "cpu,cpu",
        "--overlap",
        "on",
        *tiny_settings(tiny_teacher, tiny_student, **KILL_SETTINGS),
    )

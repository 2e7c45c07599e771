"""Shared fixtures: offline mode, a private OPD_HOME, tiny models built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def opd_home(tmp_path_factory):
    """A private OPD_HOME so tests never touch the user's cache."""
    home = tmp_path_factory.mktemp("opd_home")
    old = os.environ.get("OPD_HOME")
    os.environ["OPD_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("OPD_HOME", None)
    else:
        os.environ["OPD_HOME"] = old


@pytest.fixture(scope="session")
def tiny_teacher(opd_home):
    from opd.stages.models import build_tiny

    return build_tiny(opd_home / "models" / "tiny-teacher", role="teacher")


@pytest.fixture(scope="session")
def tiny_student(opd_home):
    from opd.stages.models import build_tiny

    return build_tiny(opd_home / "models" / "tiny-student", role="student")

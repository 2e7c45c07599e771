"""The `opd` command through click's runner, plus the installed console script."""

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from opd.cache import rundir as R
from opd.cache import shards, storage
from opd.configs.schema import load_config, loads_config
from opd.pipeline.cli import main

COMMANDS = [
    "init",
    "rollout",
    "score",
    "eval",
    "train",
    "sweep",
    "run",
    "demo",
    "inspect",
    "verify",
    "models",
    "config",
]
PRODUCER = {"stage": "rollout", "model_hash": "a" * 64, "config_hash": "c1", "format_version": 1}


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *needles):
    """Exit 1 with one line `error: ...` ending stderr (no traceback; progress bars may precede it)."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert sum("error:" in line for line in lines) == 1, result.stderr
    for n in needles:
        assert str(n) in lines[-1], (n, lines[-1])
    return lines[-1]


def rows(n, prefix):
    return [
        dict(
            sample_id=f"{prefix}{i}/0",
            prompt_id=f"{prefix}{i}",
            sample_index=0,
            source="student",
            prompt_ids=[1, 2],
            completion_ids=[3, 4, 5],
            sampling_logprobs=[-0.1, -0.2, -0.3],
            finish_reason="stop",
            sampling_hash="h",
            prompt_messages=None,
        )
        for i in range(n)
    ]


def finished_rollouts(run_path, sizes=(3, 2)):
    run = R.RunDir(run_path)
    for s, n in enumerate(sizes):
        shards.write_rollout_shard(run.fs, run.shard_path(0, "rollouts", s), rows(n, f"s{s}q"), PRODUCER)
    m = R.finalize_stage(
        run,
        run.stage_dir(0, "rollouts"),
        stage="rollouts",
        round_index=0,
        num_shards=len(sizes),
        producer=PRODUCER,
        row_count=lambda p: R.parquet_rows(run, p),
    )
    assert m is not None
    return run


# ------------------------------------------------------------------------------------------ help


def test_help_lists_every_command(runner):
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].split()
    for cmd in COMMANDS:
        assert cmd in listed, cmd
    assert invoke(runner, "-h").output == result.output


def test_every_command_has_help(runner):
    for cmd in COMMANDS:
        result = invoke(runner, cmd, "--help")
        assert result.exit_code == 0 and "Usage: main " + cmd in result.output, cmd
    for sub in ("pull", "prune", "quantize", "tiny"):
        result = invoke(runner, "models", sub, "--help")
        assert result.exit_code == 0 and "Usage: main models " + sub in result.output, sub


def test_shared_options_read_the_same_everywhere(runner):
    """--set, --shard, --force, --round, --split, --engine and --verbose are declared once (cli_common)."""
    helps = {cmd: invoke(runner, cmd, "--help").output for cmd in COMMANDS if cmd != "models"}
    for cmd, text in helps.items():
        assert "-v, --verbose" in text, cmd
    for cmd in ("init", "config", "rollout", "score", "eval", "train", "demo"):
        assert "--set SECTION.KEY=VALUE" in helps[cmd], cmd
    for cmd in ("rollout", "score"):
        assert "--shard i/N" in helps[cmd] and "--split [all|train|heldout]" in helps[cmd], cmd
    for cmd in ("rollout", "score", "run"):
        assert "--engine [auto|vllm|transformers]" in helps[cmd], cmd


def test_train_worker_entry_point():
    """`python -m opd.stages.train` (what torchrun starts) is a click command: help, one-line errors."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "opd.stages.train"]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and "Usage: python -m opd.stages.train [OPTIONS] RUN_DIR" in proc.stdout
    for option in ("--round", "--force", "--set"):
        assert option in proc.stdout
    proc = subprocess.run(cmd + ["nowhere", "--round", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "opd init" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["nowhere"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "Missing option '--round'" in proc.stderr


def test_no_cli_file_over_450_lines():
    folder = Path(__file__).resolve().parents[2] / "pipeline"
    paths = sorted(folder.glob("cli*.py"))
    assert len(paths) >= 2
    for path in paths:
        assert len(path.read_text().splitlines()) <= 450, path


def test_console_script_installed():
    script = Path(sysconfig.get_path("scripts")) / "opd"
    assert script.is_file(), script
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    for cmd in COMMANDS:
        assert cmd in proc.stdout
    proc = subprocess.run(
        [str(script), "config", "tiny", "--set", "score.top_k=0"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "score.top_k" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the module's own entry point too
    proc = subprocess.run(
        [sys.executable, "-m", "opd.pipeline.cli", "--version"], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


# ------------------------------------------------------------------------------------------ init / config


def test_init(runner, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(runner, "init", run_dir, "--config", "tiny")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"wrote {run_dir / 'opd.toml'}"
    text = (run_dir / "opd.toml").read_text()
    assert loads_config(text) == load_config("tiny")
    assert not [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]

    # the same config again: nothing changes
    result = invoke(runner, "init", run_dir, "--config", "tiny")
    assert result.exit_code == 0 and result.stdout.startswith("unchanged ")

    # a different config is refused, and the file is left alone
    result = invoke(runner, "init", run_dir, "--config", "tiny", "--set", "train.lr=0.5")
    assert_user_error(result, run_dir / "opd.toml", "--force")
    assert (run_dir / "opd.toml").read_text() == text

    result = invoke(runner, "init", run_dir, "--config", "tiny", "--set", "train.lr=0.5", "--force")
    assert result.exit_code == 0 and result.stdout.startswith("wrote ")
    assert tomllib.loads((run_dir / "opd.toml").read_text())["train"]["lr"] == 0.5


def test_init_bad_config(runner, tmp_path):
    result = invoke(runner, "init", tmp_path / "run", "--config", "tiny", "--set", "train.lrr=1")
    assert_user_error(result, "train.lrr", "did you mean 'train.lr'")
    assert not (tmp_path / "run").exists()
    result = invoke(runner, "init", tmp_path / "run", "--config", "nope")
    assert_user_error(result, "'nope'", "not found")


def test_config_command(runner):
    result = invoke(runner, "config", "tiny", "--set", "score.top_k=0")
    assert_user_error(result, "score.top_k", "0", "must be >= 1")
    result = invoke(runner, "config", "tiny", "--set", "score.top_k=5")
    assert result.exit_code == 0
    assert loads_config(result.stdout) == load_config("tiny", ["score.top_k=5"])


# ------------------------------------------------------------------------------------------ verify


def test_verify(runner, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(runner, "verify", run_dir)
    assert_user_error(result, "opd init")

    assert invoke(runner, "init", run_dir, "--config", "tiny").exit_code == 0
    result = invoke(runner, "verify", run_dir)
    assert result.exit_code == 0
    assert result.stdout.strip() == f"{run_dir}: initialised, no stage finished yet"

    # an unfinished stage is reported as such
    run = R.RunDir(run_dir)
    shards.write_rollout_shard(run.fs, run.shard_path(1, "rollouts", 0), rows(2, "x"), PRODUCER)
    result = invoke(runner, "verify", run_dir)
    assert result.exit_code == 0 and result.stdout.strip() == "rounds/0001/rollouts: unfinished (1 shards present)"
    storage.remove(run.fs, run.round_dir(1))

    finished_rollouts(run_dir, sizes=(3, 2))
    result = invoke(runner, "verify", run_dir)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "rounds/0000/rollouts: ok (2 shards, 5 rows)"

    shard = Path(run.shard_path(0, "rollouts", 1))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert_user_error(invoke(runner, "verify", run_dir), shard, "checksum differs")

    shard.unlink()
    assert_user_error(invoke(runner, "verify", run_dir), shard, "missing")


def test_verify_rereads_shards(runner, tmp_path):
    """A shard whose checksum matches its manifest is still re-read with the checking reader."""
    run_dir = tmp_path / "run"
    assert invoke(runner, "init", run_dir, "--config", "tiny").exit_code == 0
    run = finished_rollouts(run_dir, sizes=(3,))
    stage_dir = run.stage_dir(0, "rollouts")
    manifest_path = Path(stage_dir) / "_DONE.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"][0]["rows"] = 4
    manifest_path.write_text(json.dumps(manifest))
    shard = run.shard_path(0, "rollouts", 0)
    assert_user_error(invoke(runner, "verify", run_dir), shard, "holds 3 rows")

    # a manifest of a version this opd does not read
    manifest["shards"][0]["rows"] = 3
    manifest["version"] = 2
    manifest_path.write_text(json.dumps(manifest))
    assert_user_error(invoke(runner, "verify", run_dir), manifest_path, "version 2")


def test_verify_scores_stage(runner, tmp_path):
    import numpy as np

    run_dir = tmp_path / "run"
    assert invoke(runner, "init", run_dir, "--config", "tiny").exit_code == 0
    run = R.RunDir(run_dir)
    w = shards.ScoreShardWriter(vocab_size=260, top_k=4)
    for i in range(3):
        w.add(
            f"q{i}/0", np.array([[1, 2, 3, 4]] * (i + 1)), np.full((i + 1, 4), -1.0), np.zeros(i + 1), np.zeros(i + 1)
        )
    w.write(run.fs, run.shard_path(2, "scores", 0), {"stage": "score"})
    R.finalize_stage(
        run,
        run.stage_dir(2, "scores"),
        stage="scores",
        round_index=2,
        num_shards=1,
        producer={"stage": "score"},
        row_count=lambda p: R.parquet_rows(run, p),
    )
    result = invoke(runner, "verify", run_dir)
    assert result.exit_code == 0 and result.stdout.strip() == "rounds/0002/scores: ok (1 shards, 3 rows)"


# ------------------------------------------------------------------------------------------ models


def test_models_tiny(runner, opd_home, tmp_path):
    dst = tmp_path / "tiny"
    result = invoke(runner, "models", "tiny", dst, "--role", "student", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dst)
    assert (dst / "config.json").is_file() and (dst / "_DONE.json").is_file()
    assert json.loads((dst / "config.json").read_text())["num_hidden_layers"] == 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(dst).config.head_dim == 64


def test_models_prune(runner, opd_home, tiny_teacher, tmp_path):
    dst = tmp_path / "pruned"
    result = invoke(runner, "models", "prune", tiny_teacher, dst, "--keep", "0")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(dst)
    assert json.loads((dst / "config.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((dst / "_DONE.json").read_text())["keep"] == [0]

    result = invoke(runner, "models", "prune", tiny_teacher, tmp_path / "even", "--keep-layers", "2")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "even" / "_DONE.json").read_text())["keep"] == [0, 1]

    assert_user_error(invoke(runner, "models", "prune", tiny_teacher, tmp_path / "x"), "exactly one of")
    assert_user_error(
        invoke(runner, "models", "prune", tiny_teacher, tmp_path / "x", "--keep", "0", "--keep-layers", "1"),
        "exactly one of",
    )
    assert_user_error(invoke(runner, "models", "prune", tiny_teacher, tmp_path / "x", "--keep", "5"), "--keep")
    assert_user_error(invoke(runner, "models", "prune", tiny_teacher, tmp_path / "x", "--keep", "a"), "--keep")
    assert_user_error(
        invoke(runner, "models", "prune", tmp_path / "missing", tmp_path / "x", "--keep", "0"),
        tmp_path / "missing",
        "config.json",
    )
    assert not (tmp_path / "x").exists()

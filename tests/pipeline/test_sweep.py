"""`opd sweep`: a grid trained from one round's cache (tiny preset, CPU, real learner, no teacher load)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from opd.cache.rundir import RunDir, read_manifest
from opd.pipeline.cli import main
from opd.pipeline.sweep import make_settings, parse_grid

GRID = ["--grid", "train.beta=0,1", "--grid", "train.lmbda=0,1"]
SHARED = ["--set", "train.beta_offpolicy=-1"]
SETTINGS = ["beta0_lmbda0", "beta0_lmbda1", "beta1_lmbda0", "beta1_lmbda1"]


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def base(tmp_path_factory, opd_home):
    """Round 0 of the tiny preset with both kinds of rows per prompt, scored once (train + held-out);
    then the teacher is pointed at nothing: nothing after this may load it."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    sets = ["rollout.offpolicy_rows=both", "rollout.engine=transformers", "rollout.max_new_tokens=8"]
    sets += ["train.max_tokens_per_batch=256"]
    args = [x for s in sets for x in ("--set", s)]
    for cmd in (["init", run, "--config", "tiny", *args], ["rollout", run, "--round", 0], ["score", run, "--round", 0]):
        r = invoke(*cmd)
        assert r.exit_code == 0, r.output
    cfg = (run / "opd.toml").read_text()
    assert 'teacher = "tiny:teacher"' in cfg
    (run / "opd.toml").write_text(cfg.replace('teacher = "tiny:teacher"', 'teacher = "/nonexistent/teacher"'))
    return run


def weights(student_dir: Path) -> str:
    return hashlib.sha256((student_dir / "model.safetensors").read_bytes()).hexdigest()


def student(run: Path, name: str, setting: str) -> Path:
    return run / "sweeps" / name / setting / "rounds" / "0000" / "student"


def test_every_setting_trains_from_the_cache_and_equals_train_from(base, tmp_path):
    r = invoke("sweep", base, "--round", 0, *GRID, *SHARED, "--name", "grid", "--eval", "cache")
    assert r.exit_code == 0, r.output
    folder = base / "sweeps" / "grid"
    spec = json.loads((folder / "sweep.json").read_text())
    assert [s["name"] for s in spec["settings"]] == SETTINGS and spec["eval"] == "cache"
    for s in SETTINGS:
        assert (student(base, "grid", s) / "_DONE.json").is_file()
    # λ = 0 trains on the dataset rows only, λ = 1 on the student's samples only
    rows = {s: read_manifest(RunDir(str(folder / s)), str(student(base, "grid", s))).summary for s in SETTINGS}
    assert rows["beta0_lmbda0"]["samples"] == 16  # one reference row per prompt
    assert rows["beta0_lmbda1"]["samples"] == 32  # n = 2 samples per prompt (none empty at 8 tokens)
    # β changes what is learned on every row (beta_offpolicy = -1): the λ = 0 students differ by β
    assert weights(student(base, "grid", "beta0_lmbda0")) != weights(student(base, "grid", "beta1_lmbda0"))
    # the table: a row per setting, sorted by the metric with the best marked, plus the start student
    results = json.loads((folder / "results.json").read_text())
    table = results["rows"]
    assert [t["setting"] for t in table[:4]] != [] and {t["setting"] for t in table[:4]} == set(SETTINGS)
    assert table[-1]["setting"] == "(start)" and table[-1]["cache_rkl"] is not None
    rkls = [t["cache_rkl"] for t in table[:4]]
    assert rkls == sorted(rkls) and table[0]["best"] == "*" and results["best"] == table[0]["setting"]
    assert all(t["cache_rkl"] < table[-1]["cache_rkl"] for t in table[:4])  # every setting learned something
    csv = (folder / "table.csv").read_text().splitlines()
    assert csv[0].startswith("best,setting,beta,lmbda") and len(csv) == 6
    assert "| * | " + table[0]["setting"] in (folder / "table.md").read_text()
    assert (folder / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table[0]["setting"] in r.stdout and "sweep grid: 4 settings done" in r.stdout
    # a setting is exactly `opd train --from` with the same overrides
    out = tmp_path / "from"
    sets = ["--set", "train.beta_offpolicy=-1", "--set", "train.beta=1", "--set", "train.lmbda=0"]
    r = invoke("train", "--from", base / "rounds" / "0000", "--out", out, *sets)
    assert r.exit_code == 0, r.output
    assert weights(out / "rounds" / "0000" / "student") == weights(student(base, "grid", "beta1_lmbda0"))
    # idempotent: a second run trains nothing and prints the same table
    mtime = (student(base, "grid", "beta0_lmbda0") / "_DONE.json").stat().st_mtime_ns
    again = invoke("sweep", base, "--round", 0, *GRID, *SHARED, "--name", "grid", "--eval", "cache")
    assert again.exit_code == 0 and (student(base, "grid", "beta0_lmbda0") / "_DONE.json").stat().st_mtime_ns == mtime
    assert json.loads((folder / "results.json").read_text())["rows"] == table
    listing = invoke("inspect", base)
    assert "sweep grid: round 0, beta {0,1} × lmbda {0,1} (4 settings, eval cache): best" in listing.stdout


def test_shards_together_equal_one_worker(base):
    def lr_sweep(name: str, *extra):
        r = invoke(
            "sweep", base, "--round", 0, "--grid", "train.lr=1e-3,3e-3", "--name", name, "--eval", "none", *extra
        )
        assert r.exit_code == 0, r.output
        return r

    lr_sweep("whole")
    first = lr_sweep("split", "--shard", "0/2")
    assert "1/2 settings trained" in first.stdout
    assert (student(base, "split", "lr0.001") / "_DONE.json").is_file()
    assert not (student(base, "split", "lr0.003")).exists() and not (base / "sweeps" / "split" / "table.csv").exists()
    assert "2 settings done" in lr_sweep("split", "--shard", "1/2").stdout
    # --devices cpu,cpu: the same two workers, started by the launcher (pipeline/launchers.py) at once
    assert "2 settings done" in lr_sweep("pooled", "--devices", "cpu,cpu").stdout
    for s in ("lr0.001", "lr0.003"):
        assert weights(student(base, "split", s)) == weights(student(base, "whole", s))
        assert weights(student(base, "pooled", s)) == weights(student(base, "whole", s))
    assert weights(student(base, "whole", "lr0.001")) != weights(student(base, "whole", "lr0.003"))
    a = json.loads((base / "sweeps" / "whole" / "results.json").read_text())["rows"]
    b = json.loads((base / "sweeps" / "split" / "results.json").read_text())["rows"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "train_s"} for r in rows]  # noqa: E731
    assert drop(a) == drop(b)


def test_sweep_resumes_after_sigkill_with_the_same_students(base):
    grid = ["--grid", "train.beta=0,1", "--set", "train.epochs=5", "--set", "train.checkpoint_every_steps=1"]
    ref = invoke("sweep", base, "--round", 0, *grid[:4], "--name", "ref", "--eval", "none")  # no checkpoints
    assert ref.exit_code == 0, ref.output
    cmd = [sys.executable, "-m", "opd.pipeline.cli", "sweep", str(base), "--round", "0", *grid, "--name", "killed"]
    proc = subprocess.Popen(cmd + ["--eval", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = base / "sweeps" / "killed" / "beta1" / "rounds" / "0000" / "train_ckpt" / "latest.json"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists():  # the second setting has committed a checkpoint: kill it mid-setting
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (student(base, "killed", "beta0") / "_DONE.json").is_file()
    assert not (student(base, "killed", "beta1") / "_DONE.json").exists()
    resumed = invoke("sweep", base, "--round", 0, *grid, "--name", "killed", "--eval", "none")
    assert resumed.exit_code == 0, resumed.output
    summary = read_manifest(RunDir(str(base / "sweeps/killed/beta1")), str(student(base, "killed", "beta1"))).summary
    assert summary["resumed_from_step"] > 0
    for s in ("beta0", "beta1"):
        assert weights(student(base, "killed", s)) == weights(student(base, "ref", s))


def test_heldout_eval_scores_every_student_with_one_teacher_load(tmp_path, opd_home):
    run = tmp_path / "run"
    sets = ["rollout.engine=transformers", "rollout.max_new_tokens=8", "rollout.max_prompts=4"]
    args = [x for s in sets for x in ("--set", s)]
    for cmd in (["init", run, "--config", "tiny", *args], ["rollout", run, "--round", 0], ["score", run, "--round", 0]):
        assert invoke(*cmd).exit_code == 0
    r = invoke("sweep", run, "--round", 0, "--grid", "train.beta=0,1", "--eval", "heldout", "--name", "ho")
    assert r.exit_code == 0, r.output
    results = json.loads((run / "sweeps" / "ho" / "results.json").read_text())
    assert results["teacher_loads"] == 1 and results["metric"] == "heldout_rkl"
    for s in ("beta0", "beta1"):
        ev = json.loads((run / "sweeps" / "ho" / s / "rounds" / "0001" / "heldout" / "eval.json").read_text())
        row = next(x for x in results["rows"] if x["setting"] == s)
        assert row["heldout_rkl"] == ev["heldout_rkl"] and ev["samples"] == 8
    start = json.loads((run / "rounds" / "0000" / "heldout" / "eval.json").read_text())
    assert results["rows"][-1]["setting"] == "(start)" and results["rows"][-1]["heldout_rkl"] == start["heldout_rkl"]
    assert "teacher loads for held-out scoring: 1" in r.stdout


@pytest.mark.parametrize(
    "grid,needle",
    [
        (["--grid", "train.bta=0,1"], "unknown key train.bta (did you mean train.beta?)"),
        (["--grid", "train.beta=0,2"], "--grid train.beta=0,2: train.beta = 2.0 is invalid: must be in [0, 1]"),
        (["--grid", "train.beta="], "empty value list"),
        (["--grid", "train.beta=0,,1"], "empty value list"),
        (["--grid", "rollout.n=1,2"], "only train.* keys"),
        (["--grid", "train.beta"], "expected train.KEY=V1,V2"),
        (["--grid", "train.beta=0", "--grid", "train.beta=1"], "given twice"),
        (["--grid", "train.device=cpu,cuda"], "chooses how to compute"),
        ([], "give at least one --grid"),
        (["--grid", "train.beta=0,1", "--set", "score.top_k=4"], "differ only in train.* keys"),
    ],
)
def test_bad_grids_are_one_line_errors(base, grid, needle):
    one_line_error(invoke("sweep", base, "--round", 0, *grid, "--eval", "none"), needle)


def test_lambda_grid_needs_a_cache_with_both_kinds_of_rows(tmp_path, opd_home):
    run = tmp_path / "run"
    sets = ["rollout.engine=transformers", "rollout.max_new_tokens=4", "rollout.max_prompts=4", "eval.prompts="]
    args = [x for s in sets for x in ("--set", s)]
    for cmd in (["init", run, "--config", "tiny", *args], ["rollout", run, "--round", 0], ["score", run, "--round", 0]):
        assert invoke(*cmd).exit_code == 0
    one_line_error(invoke("sweep", run, "--round", 0, "--grid", "train.lmbda=0,1"), "rollout.offpolicy_rows=both")
    one_line_error(
        invoke("sweep", run, "--round", 0, "--grid", "train.beta=0,1", "--eval", "cache"), "--eval cache needs"
    )
    one_line_error(invoke("sweep", run, "--round", 1, "--grid", "train.beta=0,1"), "round 1 has no finished rollouts")
    ok = invoke("sweep", run, "--round", 0, "--grid", "train.beta=0,1", "--name", "a")
    assert ok.exit_code == 0, ok.output
    one_line_error(invoke("sweep", run, "--round", 0, "--grid", "train.beta=0,0.5", "--name", "a"), "another grid")


def test_grid_parsing_names_settings_from_their_values():
    settings = make_settings(parse_grid(["train.lr=5e-5,2e-4", "train.loss=jsd,sampled_rkl"]))
    assert [s.name for s in settings] == [
        "lr5e-05_lossjsd",
        "lr5e-05_losssampled-rkl",
        "lr0.0002_lossjsd",
        "lr0.0002_losssampled-rkl",
    ]
    assert settings[1].overrides == ["train.lr=5e-5", "train.loss=sampled_rkl"]


def test_one_process_decodes_and_loads_once_for_all_settings(base, monkeypatch):
    """Under a sweep, every score shard is opened and checked once and the student loaded from disk once,
    however many settings train (counted at the library calls; the training itself is real)."""
    import transformers

    from opd.stages import train_data

    opened, loaded = [], []
    real_shard, real_load = train_data.ScoreShard, transformers.AutoModelForCausalLM.from_pretrained

    class Counting(real_shard):
        def __init__(self, fs, path, *a, **kw):
            opened.append(path)
            super().__init__(fs, path, *a, **kw)

    def counting_load(*a, **kw):
        loaded.append(a[0])
        return real_load(*a, **kw)

    monkeypatch.setattr(train_data, "ScoreShard", Counting)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counting_load)
    r = invoke("sweep", base, "--round", 0, "--grid", "train.lr=1e-3,2e-3,4e-3", "--name", "once", "--eval", "none")
    assert r.exit_code == 0, r.output
    shards = len(read_manifest(RunDir(str(base)), str(base / "rounds" / "0000" / "scores")).shards)
    assert len(opened) == shards and len(loaded) == 1, (opened, loaded)
    assert len({weights(student(base, "once", s)) for s in ("lr0.001", "lr0.002", "lr0.004")}) == 3

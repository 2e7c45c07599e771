"""`opd run`: the round loop, for real (stage subprocesses, vLLM sampling an INT4 student, torchrun on gloo,
SIGKILL and resume)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from loop_helpers import (
    CLI,
    KILL_SETTINGS,
    STAGE_FOLDERS,
    LoopbackOnly,
    layout,
    opd_run,
    sigkill_loop,
    tiny_settings,
    wait_for,
)
from safetensors.torch import load_file

from opd.cache import fingerprint
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, read_manifest
from opd.cache.shards import ScoreShard, read_rollout_shard
from opd.configs.schema import load_config
from opd.pipeline.cli import main as cli_main
from opd.pipeline.evaluate import gsm8k_answer, gsm8k_correct, read_eval
from opd.pipeline.launchers import DevicePool, stage_env
from opd.pipeline.loop import Pool, _stop_reason
from opd.stages import quant

# ------------------------------------------------------------------------------------------ units


def _evals(values, metric="heldout_rkl"):
    """One EvalResult per held-out evaluation, `metric` taking `values` in turn (other figures constant)."""
    from opd.pipeline.evaluate import EvalResult

    base = dict(samples=8, tokens=80, mean_length=10.0, heldout_rkl=1.0, heldout_rkl_per_sample=10.0)
    base |= dict(heldout_teacher_nll=2.0, finish_stop_frac=1.0, checker="gsm8k", accuracy=0.5)
    base |= dict(temperature=1.0, score_temperature=1.0)
    return [EvalResult(**{**base, "round": i, metric: v}) for i, v in enumerate(values)]


def test_stop_reason_threshold_patience_and_min_delta():
    cfg = load_config("tiny", ["eval.stop_rkl_below=0.5"])
    assert _stop_reason(cfg, []) == ""
    assert _stop_reason(cfg, _evals([0.9, 0.6])) == ""
    assert "stop_rkl_below" in _stop_reason(cfg, _evals([0.9, 0.4]))
    cfg = load_config("tiny", ["eval.stop_patience=2", "eval.stop_min_delta=0.05"])
    assert _stop_reason(cfg, _evals([1.0, 0.9])) == ""  # not enough rounds to judge
    assert _stop_reason(cfg, _evals([1.0, 0.9, 0.8])) == ""  # still improving
    assert "stop_patience" in _stop_reason(cfg, _evals([1.0, 0.97, 0.99]))  # best 1.0, no drop of 0.05 since
    assert _stop_reason(cfg, _evals([1.0, 0.97, 0.94])) == ""  # dropped 0.06 within the window
    assert _stop_reason(load_config("tiny"), _evals([5.0, 6.0, 7.0])) == ""  # off by default


@pytest.mark.parametrize("metric", ["heldout_rkl", "heldout_teacher_nll"])
def test_stop_reason_eval_stop_lower_is_better(metric):
    cfg = load_config("tiny", [f"eval.stop.metric={metric!r}", "eval.stop.patience=2"])
    assert _stop_reason(cfg, []) == ""
    assert _stop_reason(cfg, _evals([1.0, 1.1], metric)) == ""  # no value before a window of 2
    reason = _stop_reason(cfg, _evals([1.0, 1.1, 1.2], metric))  # two evaluations worse than the best before
    assert reason.startswith("eval.stop:") and metric in reason and "\n" not in reason
    assert _stop_reason(cfg, _evals([1.0, 1.1, 0.99], metric)) == ""  # the second one improved
    assert _stop_reason(cfg, _evals([1.0, 0.5, 0.6, 0.7], metric)) != ""  # the best (0.5) is before the window
    assert _stop_reason(cfg, _evals([1.0, 1.0, 1.0], metric)) != ""  # a tie is no improvement
    assert _stop_reason(cfg, _evals([2.0, 1.0, 1.5], metric)) == ""  # 1.0 improved on 2.0
    # only the watched figure counts: it improving while the other one worsens goes on, and back
    other = "heldout_teacher_nll" if metric == "heldout_rkl" else "heldout_rkl"
    evals = _evals([1.0, 0.9, 0.8], metric)
    assert _stop_reason(cfg, [dataclasses.replace(e, **{other: 1.0 + 0.1 * e.round}) for e in evals]) == ""
    evals = _evals([1.0, 0.9, 0.8], other)
    assert _stop_reason(cfg, [dataclasses.replace(e, **{metric: 1.0 + 0.1 * e.round}) for e in evals]) != ""
    # patience: 1 judges each evaluation against those before it; 3 waits for three
    one = cfg.replace("eval.stop", patience=1)
    assert _stop_reason(one, _evals([1.0, 0.9], metric)) == ""
    assert _stop_reason(one, _evals([1.0, 0.9, 0.95], metric)) != ""
    three = cfg.replace("eval.stop", patience=3)
    assert _stop_reason(three, _evals([1.0, 1.1, 1.2], metric)) == ""
    assert "last 3 evaluation(s)" in _stop_reason(three, _evals([1.0, 1.1, 1.2, 1.3], metric))


def test_stop_reason_eval_stop_accuracy_higher_is_better_and_min_delta():
    cfg = load_config("tiny", ["eval.stop.metric='accuracy'", "eval.stop.patience=2", "eval.stop.min_delta=0.05"])

    def acc(*values):
        return _evals(values, "accuracy")

    assert _stop_reason(cfg, acc(0.5, 0.6, 0.7)) == ""  # rising
    assert "accuracy" in _stop_reason(cfg, acc(0.5, 0.4, 0.3))  # falling
    assert _stop_reason(cfg, acc(0.5, 0.4, 0.56)) == ""  # +0.06 >= min_delta
    assert _stop_reason(cfg, acc(0.5, 0.53, 0.54)) != ""  # +0.04 at most: below min_delta
    assert _stop_reason(cfg, acc(0.5, 0.53, 0.55)) == ""  # exactly min_delta counts
    assert _stop_reason(cfg.replace("eval.stop", min_delta=0.0), acc(0.5, 0.53, 0.54)) == ""  # any rise counts
    assert _stop_reason(cfg, acc(0.5, 0.5, 0.5)) != ""  # flat
    # held-out RKL falling (better) does not rescue a flat accuracy; lower accuracy is never better
    evals = [dataclasses.replace(e, heldout_rkl=1.0 - 0.1 * i) for i, e in enumerate(acc(0.5, 0.5, 0.5))]
    assert _stop_reason(cfg, evals) != ""


def test_stop_reason_eval_stop_off_by_default_and_with_the_old_rules():
    assert load_config("tiny").eval.stop.metric == ""
    assert _stop_reason(load_config("tiny"), _evals([1.0, 2.0, 3.0, 4.0])) == ""  # off by default
    # both rules set: the first that fires stops, and each reason names its own rule
    cfg = load_config("tiny", ["eval.stop_rkl_below=0.5", "eval.stop.metric='heldout_rkl'", "eval.stop.patience=1"])
    assert "eval.stop_rkl_below" in _stop_reason(cfg, _evals([1.0, 0.4]))
    assert _stop_reason(cfg, _evals([1.0, 1.2])).startswith("eval.stop:")
    assert _stop_reason(cfg, _evals([1.0, 0.8])) == ""
    old = load_config(
        "tiny", ["eval.stop_patience=1", "eval.stop.metric='heldout_teacher_nll'", "eval.stop.patience=5"]
    )
    assert "eval.stop_patience" in _stop_reason(old, _evals([1.0, 1.2]))  # the old rule alone still works


def test_device_pools():
    assert Pool is DevicePool  # one parser for the loop, the sweep and `opd train`
    assert Pool.parse("", "x").kind == "auto" and Pool.parse(None, "x").workers == 1
    assert Pool.parse("").visible() is None and Pool.parse("cpu,cpu").visible(1) == ""
    p = Pool.parse("0, 2", "x")
    assert p.kind == "cuda" and p.workers == 2 and p.visible(1, seen="") == "2" and p.visible(seen="") == "0,2"
    # GPU numbers index the GPUs this process sees (a pool worker's, or a Ray task's CUDA_VISIBLE_DEVICES)
    assert p.visible(1, seen="4,5,6") == "6" and p.visible(seen="4,5,6") == "4,6"
    with pytest.raises(OpdError, match="not among the 2 GPU"):
        p.visible(1, seen="4,5")
    assert stage_env({"A": "1"}, "3") == {"A": "1", "CUDA_VISIBLE_DEVICES": "3"}
    assert stage_env({"CUDA_VISIBLE_DEVICES": "1"}, None) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert p.disjoint(Pool.parse("1", "x")) and not p.disjoint(Pool.parse("2,3", "x"))
    assert not Pool.parse("cpu", "x").disjoint(Pool.parse("cpu", "x"))
    with pytest.raises(OpdError, match="--score-devices 'cpu,1' is invalid"):
        Pool.parse("cpu,1", "--score-devices")
    with pytest.raises(OpdError, match="names a GPU twice"):
        Pool.parse("0,0").distinct("--devices")


def test_tensor_parallel_score_workers_get_groups_of_gpus(tmp_path, monkeypatch):
    """score.tensor_parallel_size = 2 on --score-devices 0,1,2,3: two `--shard i/2` workers on "0,1", "2,3"."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the pool numbers every GPU of the machine
    from opd.pipeline.launchers import LocalLauncher
    from opd.pipeline.loop import RunOptions, _Ctx

    pool = Pool.parse("0,1,2,3", "--score-devices").grouped(2, "--score-devices")
    assert pool.workers == 2 and pool.gpus() == {"0", "1", "2", "3"}
    cfg, local = load_config("tiny"), LocalLauncher()
    ctx = _Ctx(cfg, RunDir(tmp_path / "run"), {"score": pool}, RunOptions(), local)
    workers = ctx._workers(0, "score", ["score", "RUN"])
    assert [w.args[-1] for w in workers] == ["0/2", "1/2"]
    assert [w.visible for w in workers] == ["0,1", "2,3"]
    assert [w.gpus for w in workers] == [2, 2]  # what each asks of a Ray cluster: a whole TP group
    assert pool.visible() == "0,1,2,3"
    assert not pool.disjoint(Pool.parse("3", "x")) and pool.disjoint(Pool.parse("4,5", "x"))
    one = _Ctx(cfg, RunDir(tmp_path / "r"), {"score": Pool.parse("4,5", "x").grouped(2, "x")}, RunOptions(), local)
    (w,) = one._workers(0, "score", ["score"])
    assert "--shard" not in w.args and w.visible == "4,5" and w.gpus == 2
    assert Pool.parse("cpu", "x").grouped(2, "x").workers == 1 and Pool.parse("", "x").grouped(4, "x").kind == "auto"
    with pytest.raises(OpdError, match="cannot be split into groups of 2"):
        Pool.parse("0,1,2", "--score-devices").grouped(2, "--score-devices")


def test_gsm8k_checker():
    assert gsm8k_answer("so 3 + 4 = 7.\n#### 7") == 7
    assert gsm8k_answer("The total is $1,234.") == 1234
    assert gsm8k_answer("12 apples, then 5 left") == 5
    assert gsm8k_answer("no number here") is None and gsm8k_answer(None) is None
    assert gsm8k_correct("It is 25", "Raj has 25.\n#### 25")
    assert not gsm8k_correct("It is 24", "#### 25") and not gsm8k_correct("", "#### 25")


def test_bad_arguments_are_one_line_errors(tmp_path):
    res = opd_run(tmp_path / "nothing")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and "opd init" in res.stderr
    res = opd_run(tmp_path / "r", "--config", "tiny", "--score-devices", "cpu,0")
    assert res.returncode == 1 and "--score-devices" in res.stderr and res.stderr.strip().count("\n") == 0
    res = opd_run(tmp_path / "m", "--config", "tiny", "--set", f"run.student={tmp_path / 'missing'}")
    assert res.returncode == 1 and "missing' not found" in res.stderr and res.stderr.strip().count("\n") == 0
    assert not (tmp_path / "m" / "rounds").exists()  # failed before any stage started
    for i, (setting, message) in enumerate(
        [
            ("run.train_nodes=2", "run.train_nodes = 2 needs the Ray launcher"),
            ('run.launcher="slurm"', "run.launcher"),
            ('run.score_resource="a b"', "run.score_resource"),
            ("run.ray_max_retries=-1", "run.ray_max_retries"),
        ]
    ):
        res = opd_run(tmp_path / f"l{i}", "--config", "tiny", "--set", setting)
        assert res.returncode == 1 and message in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr


# ------------------------------------------------------------------------------------------ real loops


QUANT_SETTINGS = {"train.quantize": "true", "train.checkpoint_every_steps": 1, "train.max_tokens_per_batch": 256}


@pytest.fixture(scope="module")
def int4_student(tiny_student, tmp_path_factory):
    """The tiny student's INT4 copy (group 32, symmetric), made by `opd models quantize`."""
    dst = tmp_path_factory.mktemp("int4") / "student"
    res = CliRunner().invoke(cli_main, ["models", "quantize", str(tiny_student), str(dst), "--bits", "4"])
    assert res.exit_code == 0, res.output
    return dst


def test_two_real_int4_rounds_with_vllm_killed_in_train(tmp_path, tiny_teacher, int4_student):
    """Two rounds through `opd run` with the vLLM engine on a quantised (INT4, train.quantize) student,
    SIGKILLed during round 0's training and resumed: every shard, manifest and checkpoint checked, the
    students on the INT4 grid, and the resumed round equal to an uninterrupted training."""
    run_dir = tmp_path / "run"
    run = RunDir(str(run_dir))
    args = [
        "--config",
        "tiny",
        "--rounds",
        "2",
        "--engine",
        "vllm",
        *tiny_settings(tiny_teacher, int4_student, **QUANT_SETTINGS, **{"eval.final": "false"}),
    ]
    latest = Path(run.round_dir(0)) / "train_ckpt" / "latest.json"
    proc = subprocess.Popen(CLI + ["run", str(run_dir), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(latest.exists, proc, "round 0's first in-round checkpoint")
    sigkill_loop(proc, run_dir)
    assert read_manifest(run, run.stage_dir(0, "student")) is None, "train had finished before the kill"
    res = opd_run(run_dir, *args[2:], "--plot", str(tmp_path / "c.png"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert run.rounds() == [0, 1]
    # a quiet console: opd's own lines only; what vLLM and the libraries print is in the per-stage logs
    console = res.stdout + res.stderr
    assert " INFO " not in console and "WARNING" not in console and "FutureWarning" not in console
    assert "[opd rollout (vllm)] cpu, float32" in console or "[opd rollout (vllm)] cpu, bfloat16" in console
    for r in (0, 1):
        logs = Path(run.round_dir(r)) / "logs"
        assert {p.name for p in logs.iterdir()} == {"rollout.log", "score.log", "train.log"}
        assert " INFO " in (logs / "rollout.log").read_text()  # vLLM's engine lines landed here
    found = layout(run, [0, 1])
    spec = quant.QuantSpec(bits=4, group_size=32)
    previous = int4_student
    for r in (0, 1):
        assert found[(r, "rollouts")] == {"part-00000.parquet": 16, "part-00001.parquet": 16}  # 16 prompts × n=2
        assert found[(r, "scores")] == found[(r, "rollouts")]
        assert found[(r, "heldout/rollouts")] == {"part-00000.parquet": 8} == found[(r, "heldout/scores")]
        for name in found[(r, "rollouts")]:
            table, meta = read_rollout_shard(run.fs, run.shard_path(r, "rollouts", name and int(name[5:10])))
            assert meta["engine"] == "vllm" and set(table.column("source").to_pylist()) == {"student"}
            assert len(ScoreShard(run.fs, run.shard_path(r, "scores", int(name[5:10])))) == table.num_rows
        # each round sampled with the student it started from: the INT4 copy, then round 0's student
        producer = read_manifest(run, run.stage_dir(r, "rollouts")).producer
        assert producer["model_hash"] == fingerprint.model_hash(previous)
        student = Path(run.stage_dir(r, "student"))
        assert read_manifest(run, str(student)).summary["quantization"] == dataclasses.asdict(spec)
        record = quant.read_record(student)
        assert record["method"] == "qat" and quant.QuantSpec(**record["spec"]) == spec
        assert (student / quant.PACKED_DIR / "model.safetensors").is_file()
        weights = load_file(student / "model.safetensors")
        before = load_file(Path(previous) / "model.safetensors")
        moved = 0
        for key, master in load_file(student / quant.MASTER_FILE).items():
            assert torch.equal(quant.fake_quantize(master, spec), weights[key])  # ŵ is the masters' INT4 value
            groups = weights[key].reshape(-1, 32)
            assert max(len(torch.unique(g)) for g in groups) <= 16
            moved += int((weights[key] != before[key]).sum())
        assert moved > 0, f"round {r} moved no weight across grid points"
        previous = student
    # round 1's vLLM samples come from the exported INT4 function: their sampling log-probs are the
    # learner's fake-quantised forward of round 0's masters (to the float rounding of two engines)
    from opd.configs.schema import TrainConfig
    from opd.stages.learner import load_student

    model, _ = load_student(
        run.stage_dir(0, "student"), TrainConfig(quantize=True, device="cpu"), torch.device("cpu"), 0
    )
    row = read_rollout_shard(run.fs, run.shard_path(1, "rollouts", 0))[0].slice(0, 1).to_pylist()[0]
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(torch.tensor([row["prompt_ids"] + row["completion_ids"]])).logits[0], -1)
    P = len(row["prompt_ids"])
    ours = [float(logp[P - 1 + t, tok]) for t, tok in enumerate(row["completion_ids"])]
    assert ours == pytest.approx(row["sampling_logprobs"], abs=2e-3)
    # held-out figures: recomputed here from the shards, straight from the definition
    for r in (0, 1):
        ev = read_eval(run, r)
        table, _ = read_rollout_shard(run.fs, run.shard_path(r, "heldout/rollouts", 0))
        cache = ScoreShard(run.fs, run.shard_path(r, "heldout/scores", 0))
        diffs = [
            s - t
            for sid, lps in zip(table.column("sample_id").to_pylist(), table.column("sampling_logprobs").to_pylist())
            for s, t in zip(lps, cache.by_id(sid).taken_logprobs_T)
        ]
        assert ev["samples"] == 8 and ev["tokens"] == len(diffs)
        assert ev["heldout_rkl"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
        assert 0 <= ev["accuracy"] <= 1 and ev["checker"] == "gsm8k"
    assert "held-out reverse KL by round" in res.stdout and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    verify = subprocess.run(CLI + ["verify", str(run_dir)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    # a finished run resumes to a no-op: nothing is launched again
    again = opd_run(run_dir, "--rounds", "2", "--engine", "vllm")
    assert again.returncode == 0 and "opd rollout" not in again.stdout and "already done" in again.stdout
    assert layout(run, [0, 1]) == found
    # the killed and resumed round 0 equals an uninterrupted training from the same caches
    ref = tmp_path / "ref"
    res = CliRunner().invoke(cli_main, ["train", "--from", run.round_dir(0), "--out", str(ref)])
    assert res.exit_code == 0, res.output
    for name in ("model.safetensors", quant.MASTER_FILE):
        a = load_file(Path(run.stage_dir(0, "student")) / name)
        b = load_file(Path(RunDir(str(ref)).stage_dir(0, "student")) / name)
        assert sorted(a) == sorted(b)
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6, name


@pytest.mark.parametrize("host,caught", [("0.0.0.0", True), ("::", True), ("127.0.0.1", False), ("::1", False)])
def test_the_listener_check_catches_a_listener_beyond_loopback(host, caught):
    """loop_helpers.LoopbackOnly (the `loopback_only` fixture) fails when a process the test started
    listens anywhere but loopback, and passes a loopback listener."""
    code = (
        "import socket, sys; s = socket.create_server((sys.argv[1], 0), family=socket.AF_INET6 if ':' in "
        "sys.argv[1] else socket.AF_INET); print(s.getsockname()[1], flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, host], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = proc.stdout.readline().strip()  # it listens from here on
        assert port.isdigit()
        if caught:
            with pytest.raises(AssertionError, match=f"{host}:{port} by "):
                with LoopbackOnly():
                    pass
        else:
            with LoopbackOnly():
                pass
    finally:
        proc.stdin.close()
        proc.wait()


@pytest.mark.usefixtures("loopback_only")  # the fixture's run checked its own (torchrun's among them)
def test_pools_overlap_and_workers(reference_run):
    run, res = reference_run
    records = [json.loads(x) for x in Path(run.metrics_path(0)).read_text().splitlines()]
    score = [x for x in records if x["stage"] == "score" and x.get("split") == "train"]
    assert sorted(x["shard"] for x in score) == ["0/2", "1/2"] and all(x["followed"] for x in score)
    rollout = [x for x in records if x["stage"] == "rollout" and x.get("split") == "train"]
    assert sorted(x["shard"] for x in rollout) == ["0/2", "1/2"]
    # the score workers ran together with the rollout workers (following them: tests/stages/test_score.py),
    # read from the order of the lines, not from the clock: the loop appends a pool's "loop" line once every
    # worker launched with it has ended, so the score workers' own lines come before the rollout pool's line
    # only when both pools were launched together (launched one after the other, the rollout line is first)
    loop_rollout = next(i for i, x in enumerate(records) if x["stage"] == "loop" and x["step"] == "rollout")
    assert all(i < loop_rollout for i, x in enumerate(records) if x["stage"] == "score" and x.get("split") == "train")
    assert read_manifest(run, run.stage_dir(0, "student")).summary["world_size"] == 2
    loop = {x["step"]: x for x in records if x["stage"] == "loop"}
    assert loop["rollout"]["workers"] == 2 and loop["score"]["workers"] == 2 and loop["train"]["workers"] == 1
    assert read_eval(run, 0)["samples"] == 4 and read_eval(run, 1)["samples"] == 4  # before and after training
    # every worker is a process of its own: its train-split record holds its start-up (process start → first
    # unit of work), which includes loading the model, and exceeds the interpreter's own start
    for x in rollout + score:
        assert x["load_seconds"] > 0 and x["startup_seconds"] > x["load_seconds"], x
    train = next(x for x in records if x["stage"] == "train" and x.get("final"))
    assert train["startup_s"] > train["load_s"] > 0


@pytest.mark.usefixtures("loopback_only")
def test_sigkill_during_each_stage_resumes_to_the_same_run(tmp_path, reference_run, tiny_teacher, tiny_student):
    ref, _ = reference_run
    run_dir = tmp_path / "killed"
    run = RunDir(str(run_dir))
    args = [
        "--config",
        "tiny",
        "--rounds",
        "1",
        "--engine",
        "transformers",
        *tiny_settings(tiny_teacher, tiny_student, **KILL_SETTINGS),
    ]

    def shards(folder):
        return list(Path(run.stage_dir(0, folder)).glob("part-*.parquet"))

    def trained_steps():
        path = Path(run.metrics_path(0))
        return path.exists() and '"step": 1,' in path.read_text()

    kill_points = [
        ("rollout", lambda: len(shards("rollouts")) >= 2, "rollouts"),
        ("score", lambda: len(shards("scores")) >= 2, "scores"),
        ("train", trained_steps, "student"),
    ]
    for stage, ready, folder in kill_points:
        proc = subprocess.Popen(
            CLI + ["run", str(run_dir), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(ready, proc, f"the {stage} stage to be under way")
        sigkill_loop(proc, run_dir)
        assert read_manifest(run, run.stage_dir(0, folder)) is None, f"{stage} had finished before the kill"
    res = opd_run(run_dir, *args[2:])  # resume (the config is in RUN/opd.toml now)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert layout(run, [0, 1]) == layout(ref, [0, 1])
    assert set(layout(run, [0, 1])) == {(0, f) for f in STAGE_FOLDERS} | {
        (1, "heldout/rollouts"),
        (1, "heldout/scores"),
    }
    for r, folder in layout(run, [0, 1]):  # no stray temporary or extra files anywhere
        names = {p.name for p in Path(run.stage_dir(r, folder)).iterdir()}
        assert names == set(layout(run, [0, 1])[(r, folder)]) | {"_DONE.json"}

    def ids(rd):
        return sorted(
            x
            for p in Path(rd.stage_dir(0, "rollouts")).glob("part-*.parquet")
            for x in pq.read_table(p, columns=["sample_id"]).column(0).to_pylist()
        )

    assert ids(run) == ids(ref) and len(ids(run)) == len(set(ids(run))) == 48
    assert read_manifest(run, run.stage_dir(0, "student")) is not None and read_eval(run, 1) is not None


def test_demo_command_on_tiny_models(tmp_path, tiny_teacher, tiny_student):
    """`opd demo`'s own path (init from its preset, loop, table, plot, verdict) with tiny models swapped in."""
    out = tmp_path / "demo"
    settings = tiny_settings(
        tiny_teacher,
        tiny_student,
        **{
            "rollout.engine": '"transformers"',
            "rollout.max_prompts": 8,
            "rollout.max_new_tokens": 16,
            "eval.max_prompts": 4,
            "eval.n": 1,
            "score.top_k": 8,
            "train.epochs": 1,
            "eval.tasks_limit": 4,
        },
    )
    res = subprocess.run(
        CLI + ["demo", "--out", str(out), "--rounds", "1", *settings], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = RunDir(str(out))
    rkls = [read_eval(run, r)["heldout_rkl"] for r in (0, 1)]
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    verdict = [x for x in res.stdout.splitlines() if x.startswith("demo: ")]
    assert len(verdict) == 1 and f"{rkls[0]:.3f} → {rkls[1]:.3f}" in verdict[0]
    assert ("fell every round" in verdict[0]) == (rkls[1] < rkls[0])
    assert load_config(run.config_path).run.name == "smollm2-demo"
    # the demo ends with the benchmark table: teacher, base, the round's student, on opd's offline tasks
    table = res.stdout[res.stdout.index("benchmarks (lm-eval") :]
    for row in ("teacher", "student 0 (base)", "student 1"):
        assert row in table and "arith/exact_match" in table and "arith_mc/acc" in table


def test_overlap_auto_rule():
    from opd.pipeline.loop import _overlap_pays

    def gpu(s):
        return Pool.parse(s, "x")

    assert _overlap_pays(gpu("0"), gpu("1")) and not _overlap_pays(gpu("0,1"), gpu("1"))
    assert _overlap_pays(gpu("cpu"), gpu("cpu,cpu"))
    # unset pools ("auto") mean the CPU on a machine without CUDA, a shared GPU on one with it
    assert _overlap_pays(gpu(""), gpu(""), cuda_visible=False) and _overlap_pays(
        gpu(""), gpu("cpu"), cuda_visible=False
    )
    assert not _overlap_pays(gpu(""), gpu(""), cuda_visible=True)
    assert not _overlap_pays(gpu("cpu"), gpu(""), cuda_visible=True)
    assert not _overlap_pays(gpu("0"), gpu(""), cuda_visible=True) and not _overlap_pays(
        gpu("0"), gpu("0"), cuda_visible=True
    )
    for visible in (False, True):
        assert _overlap_pays(
            gpu("cpu"), gpu("cpu"), cuda_visible=visible
        )  # explicit CPU pools, whatever the machine has

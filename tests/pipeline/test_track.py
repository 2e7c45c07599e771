"""Trackers (pipeline/track.py): a run folder with the records the stages write, fed to real TensorBoard,
W&B (offline), trackio and MLflow stores, read back from what they wrote. No pipeline run, no network."""

import dataclasses
import glob
import json
import os
import struct
import sys
from collections import Counter

import pytest

from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.configs.schema import loads_config
from opd.pipeline.track import Tracker, check_reporters, points
from opd.stages.train_metrics import trim_metrics

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny_prompts.jsonl")
STEPS = {0: 4, 1: 3}  # optimizer steps of rounds 0 and 1; round 2 is the final student's evaluation
OFFSET = {0: 0, 1: 4, 2: 7}  # the global step each round starts at


def config(*report_to):
    text = (
        f'[run]\nname = "trk"\nstudent = "tiny:student"\nteacher = "tiny:teacher"\n[rollout]\nprompts = "{PROMPTS}"\n'
    )
    cfg = loads_config(text)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, report_to=tuple(report_to)))


def loss(r, step, rewritten=False):
    return 1.0 / (10 * r + step) + (0.5 if rewritten else 0.0)


def stage(r, name, split, shard="0/1"):
    """A rollout / score record as stages/runner.py writes it (StageResult.record(), flattened extras)."""
    rec = {"stage": name, "round": r, "split": split, "shard": shard, "skipped": False, "done": True, "time": 1e9}
    rec |= {"shards_total": 2, "shards_written": 1, "samples": 8, "tokens": 100 + r, "tokens_per_s": 50.0 + r}
    rec |= {"seconds": 2.0, "work_seconds": 1.5, "engine": "vllm"}
    if name == "score":
        rec |= {"mean_entropy": 5.5 - r, "mean_topk_mass": 0.9, "top_k": 16, "temperature": 1.0}
    return rec


def head_of_round(run, r):
    """What a round writes before training: rollouts and scores (train split on 2 workers), held-out ones,
    the loop's wall times, the held-out eval and the student's benchmarks."""
    if r in STEPS:
        for name in ("rollout", "score"):
            for shard in ("0/2", "1/2"):
                run.append_metrics(r, stage(r, name, "train", shard))
    for name in ("rollout", "score"):
        run.append_metrics(r, stage(r, name, "heldout"))
        run.append_metrics(
            r, {"stage": "loop", "step": name, "round": r, "wall_s": 10.0 + r, "workers": 2, "time": 1e9}
        )
    run.append_metrics(r, stage(r, "rollout", "heldout") | {"skipped": True})  # a re-run that found it done
    ev = {"stage": "eval", "round": r, "format": "opd.eval", "version": 1, "heldout_rkl": 0.5 / (r + 1)}
    ev |= {"samples": 4, "tokens": 60, "accuracy": None, "checker": "", "temperature": 1.0, "time": 1e9}
    run.append_metrics(r, ev)
    bench = {"arith/exact_match": 0.4 + 0.1 * r, "arith/exact_match_stderr": 0.05, "arith_mc/acc": 0.6}
    run.append_metrics(
        r, {"stage": "bench", "round": r, "model": "student", "time": 1e9, "seconds": 3.0, "metrics": bench}
    )


def train_steps(run, r, steps, rewritten=False):
    for k in steps:
        rec = {"stage": "train", "round": r, "step": k, "steps": STEPS[r], "epoch": 0, "loss": loss(r, k, rewritten)}
        rec |= {"rkl_sampled": None, "lr": 1e-3, "grad_norm": 0.1, "tokens": 64, "time": 1e9}
        run.append_metrics(r, rec)


def end_of_round(run, r):
    summary = {"stage": "train", "round": r, "final": True, "steps": STEPS[r], "skipped": False, "loss": "rkl"}
    summary |= {"last_loss": loss(r, STEPS[r]), "train_s": 1.0 + r, "world_size": 1, "quantization": None}
    run.append_metrics(r, summary)
    run.append_metrics(r, {"stage": "loop", "step": "train", "round": r, "wall_s": 20.0 + r, "time": 1e9})


def teacher_bench(run):
    bench = {"arith/exact_match": 0.9, "arith/exact_match_stderr": 0.03, "arith_mc/acc": 0.95}
    run.append_metrics(
        0, {"stage": "bench", "round": 0, "model": "teacher", "time": 1e9, "seconds": 9.0, "metrics": bench}
    )


def whole_run(path) -> RunDir:
    run = RunDir(str(path))
    for r in (0, 1):
        head_of_round(run, r)
        train_steps(run, r, range(1, STEPS[r] + 1))
        end_of_round(run, r)
    teacher_bench(run)
    head_of_round(run, 2)
    return run


def by_name(pts) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for p in pts:
        for name, v in p.values.items():
            out.setdefault(name, []).append((p.step, v))
    return out


def train_loss_curve():
    return [(OFFSET[r] + k, loss(r, k)) for r in (0, 1) for k in range(1, STEPS[r] + 1)]


def test_points_names_and_global_steps(tmp_path):
    got = by_name(points(whole_run(tmp_path / "run")))
    assert got["train/loss"] == train_loss_curve()  # round 1 continues at step 5
    assert got["train_round/last_loss"] == [(4, loss(0, 4)), (7, loss(1, 3))]
    assert got["eval/heldout_rkl"] == [(0, 0.5), (4, 0.25), (7, 0.5 / 3)]
    assert got["eval/arith/exact_match"] == [(0, 0.4), (4, 0.5), (7, pytest.approx(0.6))]
    assert got["reference/teacher/arith/exact_match"] == [(0, 0.9)]
    assert got["loop/train_wall_s"] == [(4, 20.0), (7, 21.0)]  # the train stage ends at the round's last step
    assert got["loop/rollout_wall_s"] == [(0, 10.0), (4, 11.0), (7, 12.0)]
    assert got["rollout/tokens"] == [(0, 100), (0, 100), (4, 101), (4, 101)]  # one point per worker
    assert got["rollout_heldout/tokens"] == [(0, 100), (4, 101), (7, 102)]  # the skipped re-run gives none
    assert got["score/mean_entropy"] == [(0, 5.5), (0, 5.5), (4, 4.5), (4, 4.5)]
    names = set(got)
    for absent in ("train/step", "train/steps", "train/time", "train/rkl_sampled", "train/epoch", "rollout/done"):
        assert absent not in names  # bookkeeping, None and bool fields are not figures
    assert not {n for n in names if n.endswith(("/round", "/shard", "/version", "/temperature", "/top_k"))}
    assert "eval/seconds" not in names and "eval/arith/exact_match_stderr" in names  # a benchmark's figures only


def test_points_wait_for_a_round_not_trained_yet(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    head_of_round(run, 0)
    head_of_round(run, 1)  # (cannot happen before round 0 trains; its offset is unknown)
    assert {p.step for p in points(run)} == {0} and all(p.key.startswith("0:") for p in points(run))


def test_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = whole_run(tmp_path / "run")
    again = {"stage": "eval", "round": 1, "format": "opd.eval", "version": 1, "heldout_rkl": 9.0, "time": 1e9}
    run.append_metrics(1, again)  # the held-out eval computed again: only the first record is logged
    tracker = Tracker(config("tensorboard"), run)
    assert tracker.sync() == len(points(run)) - 1
    assert tracker.sync() == 0
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "run" / "track" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    curve = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert curve == [(s, pytest.approx(v)) for s, v in train_loss_curve()]
    assert [(e.step, e.value) for e in acc.Scalars("eval/heldout_rkl")] == [
        (0, 0.5),
        (4, 0.25),
        (7, pytest.approx(0.5 / 3)),
    ]
    assert [(e.step, e.value) for e in acc.Scalars("reference/teacher/arith/exact_match")] == [(0, pytest.approx(0.9))]
    assert [e.step for e in acc.Scalars("loop/train_wall_s")] == [4, 7]
    assert set(acc.Tags()["scalars"]) == set(by_name(points(run)))
    assert len(acc.Scalars("rollout/tokens")) == 4  # 2 workers' records in rounds 0 and 1


def test_resume_continues_the_same_tracker_runs(tmp_path, monkeypatch):
    """The loop logs round 0 up to step 4 and is killed; the learner resumes from its step-2 checkpoint
    and logs steps 3-4 again with other values; round 1, the final evaluation and a late teacher
    reference follow. A second Tracker continues the same runs: every metric once per step, the first
    values kept, the new points there."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "TRACKIO_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = RunDir(str(tmp_path / "run"))
    cfg = config("tensorboard", "wandb", "trackio", "mlflow")
    head_of_round(run, 0)
    train_steps(run, 0, range(1, 5))
    first = Tracker(cfg, run)
    n_first = first.sync()
    first.close()
    state = json.loads((tmp_path / "run" / "track" / "state.json").read_text())
    assert state["format"] == "opd.track" and state["last_step"] == 4 and len(state["logged"]) == n_first

    trim_metrics(run, 0, keep_steps=2)  # what the resumed learner does, then it logs steps 3 and 4 again
    train_steps(run, 0, range(3, 5), rewritten=True)
    end_of_round(run, 0)
    teacher_bench(run)  # written after step 4 was logged
    head_of_round(run, 1)
    train_steps(run, 1, range(1, 4))
    end_of_round(run, 1)
    head_of_round(run, 2)
    second = Tracker(cfg, run)
    n_second = second.sync()
    second.close()
    assert n_first + n_second == len(points(run))
    state2 = json.loads((tmp_path / "run" / "track" / "state.json").read_text())
    assert (state2["id"], state2["mlflow_run_id"]) == (state["id"], state["mlflow_run_id"])

    expected = by_name(points(run))
    expected["train/loss"] = train_loss_curve()  # steps 3 and 4 keep the values logged first
    logged = {
        "tensorboard": _tensorboard(tmp_path / "run" / "track" / "tensorboard"),
        "mlflow": _mlflow(tmp_path / "run" / "track" / "mlflow.db", state2["mlflow_run_id"], "trk"),
        "trackio": _trackio("trk", f"run-{state['id']}", state2["trackio_dir"]),
    }
    wandb_history, wandb_summary, wandb_ids = _wandb(tmp_path / "run" / "track")
    assert wandb_ids == {state["id"]}  # two sessions, one W&B run
    logged["wandb"] = wandb_history
    for tracker, got in logged.items():
        for name in (
            "train/loss",
            "train_round/last_loss",
            "eval/heldout_rkl",
            "eval/arith/exact_match",
            "loop/train_wall_s",
        ):
            assert [s for s, _ in got[name]] == [s for s, _ in expected[name]], (tracker, name)
            assert [v for _, v in got[name]] == pytest.approx([v for _, v in expected[name]]), (tracker, name)
        for name, values in got.items():
            if not name.startswith(("rollout/", "score/")):  # (the train split ran on 2 workers: 2 records a step)
                assert max(Counter(s for s, _ in values).values()) == 1, (tracker, name)
    for tracker in ("tensorboard", "mlflow", "trackio"):
        assert logged[tracker]["reference/teacher/arith/exact_match"] == [(0, pytest.approx(0.9))]
    assert "reference/teacher/arith/exact_match" not in wandb_history  # below W&B's last step: in its summary
    assert wandb_summary["reference/teacher/arith/exact_match"] == pytest.approx(0.9)


def test_a_missing_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    check_reporters(("tensorboard",))
    with pytest.raises(OpdError) as e:
        check_reporters(("tensorboard", "wandb"))
    assert str(e.value) == (
        "run.report_to names 'wandb', but the `wandb` package is not installed: pip install 'opd[track]'"
    )
    with pytest.raises(OpdError, match=r"opd\[track\]"):
        Tracker(config("wandb"), whole_run(tmp_path / "run"))


def test_trackers_need_a_local_run_folder(tmp_path):
    with pytest.raises(OpdError, match="run.report_to needs a local run folder") as e:
        Tracker(config("tensorboard"), RunDir("mock://bucket/run"))
    assert "\n" not in str(e.value)
    nothing = Tracker(config(), whole_run(tmp_path / "run"))  # no trackers: nothing opened, nothing written
    assert nothing.sync() == 0
    nothing.close()
    assert not (tmp_path / "run" / "track").exists()


# ------------------------------------------------------------------------------- reading the stores back


def _tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _mlflow(db, run_id, experiment) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # one run over both sessions
    names = runs[0].data.metrics
    return {
        n: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, n), key=lambda m: m.step)]
        for n in names
    }


def _trackio(project, name, folder) -> dict[str, list[tuple[int, float]]]:
    from trackio import utils
    from trackio.sqlite_storage import SQLiteStorage

    assert str(utils.TRACKIO_DIR) == folder and os.path.exists(os.path.join(folder, f"{project}.db"))
    assert SQLiteStorage.get_runs(project) == [name]  # one run over both sessions
    out = {}
    for row in SQLiteStorage.get_logs(project, name):
        for k, v in row.items():
            if k not in ("step", "timestamp") and not k.startswith("_"):
                out.setdefault(k, []).append((row["step"], v))
    return {k: sorted(v, key=lambda sv: sv[0]) for k, v in out.items()}


def _wandb(folder):
    """History {name: [(step, value)]}, the last summary values and the run ids of every offline run
    folder, from the .wandb files (a LevelDB-style log of protobuf Records: 32 KiB blocks, 7-byte chunk
    headers; wandb 0.31 ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    history, summary, ids = {}, {}, set()
    files = sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "*.wandb")), key=os.path.getmtime)
    assert len(files) == 2  # one per session
    for path in files:
        for rec in _wandb_records(path, pb):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                for k, v in row.items():
                    if not k.startswith("_"):
                        history.setdefault(k, []).append((rec.history.step.num, v))
            elif kind == "summary":
                for i in rec.summary.update:
                    summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return history, summary, ids


def _wandb_records(path, pb):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    i, chunks = 7, b""
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[i : i + 7])
        if kind == 0:
            break
        chunks += data[i + 7 : i + 7 + length]
        i += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            yield rec

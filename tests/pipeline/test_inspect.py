"""`opd inspect`: the per-round table read from manifests, metrics.jsonl and eval.json; its text; the plot."""

import json
import os

import polars as pl
import pytest

from opd.cache import rundir as R
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.pipeline import inspect as I
from opd.pipeline.init import init_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ building runs


def manifest(run, r, stage, summary, rows=4):
    folder = run.stage_dir(r, stage)
    shards = [R.ShardEntry(R.shard_name(0), rows, 100, "0" * 64)] if stage != "student" else []
    R.write_manifest(
        run, folder, R.Manifest(stage=stage, round=r, shards=shards, producer={"stage": stage}, summary=summary)
    )


def rollout_summary(samples=32, tokens=800, lmbda=0.75, on=12, off=4, skipped=1):
    return {
        "prompts": on + off,
        "samples": samples,
        "completion_tokens": tokens,
        "lmbda": lmbda,
        "on_policy_prompts": on,
        "off_policy_prompts": off,
        "skipped_long_prompts": skipped,
        "sources": {"student": 24, "dataset": 8, "teacher": 0},
    }


def metrics(run, r, *records, raw=b""):
    for rec in records:
        run.append_metrics(r, rec)
    if raw:
        with open(run.metrics_path(r), "ab") as f:
            f.write(raw)


def eval_json(run, r, rkl, accuracy=None):
    path = run.eval_path(r)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {
                "format": "opd.eval",
                "version": 1,
                "round": r,
                "samples": 8,
                "tokens": 100,
                "mean_length": 12.5,
                "heldout_rkl": rkl,
                "heldout_rkl_per_sample": rkl * 12,
                "accuracy": accuracy,
                "checker": "gsm8k" if accuracy is not None else "",
                "finish_stop_frac": 1.0,
            },
            f,
        )


def step(s, loss, overlap, mass=0.9, **kw):
    return {
        "stage": "train",
        "round": 0,
        "step": s,
        "loss": loss,
        "topk_overlap": overlap,
        "teacher_topk_mass": mass,
        "step_s": 0.1,
        **kw,
    }


@pytest.fixture
def run(tmp_path):
    """Four rounds: 0 finished (held-out too), 1 mid-train, 2 mid-score, 3 the final eval-only round."""
    init_run(str(tmp_path / "run"), "tiny")
    run = RunDir(str(tmp_path / "run"))

    # round 0: all three stages done; rollout and score ran twice each (train split + held-out split)
    manifest(run, 0, "rollouts", rollout_summary())
    manifest(run, 0, "scores", {"mean_topk_mass": 0.93, "positions": 800, "top_k": 16})
    manifest(run, 0, "student", {"first_loss": 0.8, "last_loss": 0.2, "train_s": 5.0, "wall_s": 7.0, "steps": 3})
    manifest(run, 0, "heldout/rollouts", rollout_summary(samples=8, tokens=100))
    metrics(
        run,
        0,
        {"stage": "rollout", "split": "train", "seconds": 3.0, "samples_written": 32},
        {"stage": "rollout", "split": "heldout", "seconds": 1.5},
        {"stage": "score", "seconds": 2.0, "work_seconds": 1.0},  # the stage runner's records
        {"stage": "score", "split": "heldout", "seconds": 0.5},
        step(1, 0.8, 0.2),
        step(2, 0.5, 0.4),
        step(3, 0.2, 0.6),
        {
            "stage": "train",
            "final": True,
            "skipped": False,
            "first_loss": 0.8,
            "last_loss": 0.2,
            "train_s": 5.0,
            "wall_s": 7.0,
        },
        {"stage": "eval", "heldout_rkl": 9.9, "accuracy": 0.9},  # eval.json wins over this
        raw=b'{"stage": "rollout", "seconds": 100.0, "spl',
    )  # a writer killed mid-line
    eval_json(run, 0, 0.5, accuracy=0.25)

    # round 1: rollouts and scores done; train killed after logging steps (step 2 logged twice: resumed)
    manifest(run, 1, "rollouts", rollout_summary(samples=30, tokens=600, lmbda=1.0, on=15, off=0, skipped=0))
    manifest(run, 1, "scores", {"mean_topk_mass": 0.95})
    metrics(
        run,
        1,
        {"stage": "rollout", "seconds": 2.0},
        {"stage": "rollout", "seconds": 2.5},  # two --shard workers
        {"stage": "score", "wall_s": 4.0},  # a run made before the stage runner: "wall_s"
        {"stage": "score", "skipped": True, "wall_s": 4.0},  # a re-run that skipped
        step(1, 0.6, 0.3),
        step(2, 0.9, 0.9),
        step(2, 0.4, 0.5),
        {"stage": "eval", "heldout_rkl": 0.4, "accuracy": None},
        raw=b"\xff\xfe not json\n[1, 2]\n\n",
    )
    os.makedirs(os.path.dirname(run.eval_path(1)))
    with open(run.eval_path(1), "w") as f:  # a torn eval.json: the metrics record stands in
        f.write('{"heldout_rkl": 0.')

    # round 2: rollouts done, scoring under way (one worker finished, no manifest yet)
    manifest(run, 2, "rollouts", rollout_summary(samples=20, tokens=500, lmbda=0.5, on=5, off=5, skipped=0))
    metrics(run, 2, {"stage": "rollout", "seconds": 1.0}, {"stage": "score", "wall_s": 3.0})

    # round 3: the evaluation of the last student, held-out only
    os.makedirs(os.path.join(run.round_dir(3), "heldout", "rollouts"))
    eval_json(run, 3, 0.3)
    metrics(run, 3, {"stage": "eval", "heldout_rkl": 0.3})
    return run


# ------------------------------------------------------------------------------------------ round_table


def test_round_table_values(run):
    df = I.round_table(run.url)
    assert df.columns == list(I.COLUMNS)
    assert dict(zip(df.columns, df.dtypes)) == I.SCHEMA
    rows = {r["round"]: r for r in df.iter_rows(named=True)}
    assert list(rows) == [0, 1, 2, 3]

    r0 = rows[0]
    assert (r0["samples"], r0["tokens"], r0["mean_length"]) == (32, 800, 25.0)
    assert (r0["lmbda"], r0["on_policy"], r0["off_policy"], r0["skipped"]) == (0.75, 12, 4, 1)
    assert r0["teacher_topk_mass"] == 0.93  # the scores manifest, not the steps
    assert r0["topk_overlap"] == pytest.approx(0.4)  # mean of 0.2, 0.4, 0.6
    assert (r0["heldout_rkl"], r0["heldout_accuracy"]) == (0.5, 0.25)  # eval.json over the record
    assert (r0["loss_first"], r0["loss_last"]) == (0.8, 0.2)
    assert r0["rollout_s"] == pytest.approx(4.5)  # train + held-out; torn line ignored
    assert r0["score_s"] == pytest.approx(2.5)
    assert r0["train_s"] == pytest.approx(7.0)  # wall, not step time
    assert r0["status"] == "done"

    r1 = rows[1]
    assert (r1["samples"], r1["tokens"], r1["mean_length"]) == (30, 600, 20.0)
    assert r1["teacher_topk_mass"] == 0.95
    assert r1["topk_overlap"] == pytest.approx(0.4)  # steps 1 and (the last) 2: 0.3, 0.5
    assert (r1["loss_first"], r1["loss_last"]) == (0.6, 0.4)  # from the steps logged so far
    assert r1["train_s"] is None
    assert r1["rollout_s"] == pytest.approx(4.5)  # two workers
    assert r1["score_s"] == pytest.approx(4.0)  # the skipped re-run not counted
    assert (r1["heldout_rkl"], r1["heldout_accuracy"]) == (0.4, None)
    assert r1["status"] == "train"

    r2 = rows[2]
    assert (r2["samples"], r2["lmbda"], r2["on_policy"], r2["off_policy"]) == (20, 0.5, 5, 5)
    assert r2["score_s"] == 3.0 and r2["rollout_s"] == 1.0
    for col in (
        "teacher_topk_mass",
        "topk_overlap",
        "heldout_rkl",
        "heldout_accuracy",
        "loss_first",
        "loss_last",
        "train_s",
    ):
        assert r2[col] is None, col
    assert r2["status"] == "score"

    r3 = rows[3]
    assert r3["status"] == "eval only"
    assert r3["heldout_rkl"] == 0.3 and r3["heldout_accuracy"] is None
    assert all(r3[c] is None for c in I.COLUMNS if c not in ("round", "heldout_rkl", "status"))


def test_round_table_unstarted_rounds(tmp_path):
    init_run(str(tmp_path / "run"), "tiny")
    run = RunDir(str(tmp_path / "run"))
    os.makedirs(run.round_dir(0))  # created, nothing in it
    os.makedirs(os.path.join(run.round_dir(1), "heldout", "rollouts"))  # held-out evaluation under way
    manifest(run, 2, "student", {"first_loss": 1.0, "last_loss": 0.5})  # odd, but no crash: rollout unfinished
    df = I.round_table(run.url)
    assert df["status"].to_list() == ["rollout", "eval", "rollout"]
    assert df.filter(pl.col("round") < 2).drop("round", "status").null_count().row(0) == (2,) * (len(I.COLUMNS) - 2)
    assert df["loss_last"].to_list() == [None, None, 0.5]
    assert I.round_table(str(tmp_path / "run")).height == 3


def test_round_table_no_rounds_is_empty(tmp_path):
    init_run(str(tmp_path / "run"), "tiny")
    df = I.round_table(str(tmp_path / "run"))
    assert df.height == 0 and df.columns == list(I.COLUMNS)


# ------------------------------------------------------------------------------------------ text


def test_format_table(run):
    df = I.round_table(run.url)
    text = I.format_table(df)
    lines = text.splitlines()
    assert lines[0].split() == [
        "round",
        "samples",
        "tokens",
        "len",
        "λ",
        "on",
        "off",
        "skip",
        "Tmass",
        "ovlp",
        "hoRKL",
        "hoAcc",
        "loss0",
        "loss1",
        "roll_s",
        "score_s",
        "train_s",
        "status",
    ]
    rows = lines[1:5]
    assert [r.split()[0] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0].split() == [
        "0",
        "32",
        "800",
        "25.0",
        "0.750",
        "12",
        "4",
        "1",
        "0.930",
        "0.400",
        "0.5000",
        "0.250",
        "0.8000",
        "0.2000",
        "4.5",
        "2.5",
        "7.0",
        "done",
    ]
    assert rows[2].endswith(" score") and rows[3].endswith(" eval only")
    assert rows[3].split()[1] == "-"  # null shown as -
    assert all(len(line) <= 120 for line in lines)
    header_end = lines[0].index("hoRKL") + len("hoRKL")  # numbers right-aligned under headers
    assert rows[0][header_end - 1] == "0" and rows[0][header_end] == " "


def test_format_numbers():
    assert [I._sig(v) for v in (0.0, 0.0123456, 0.00077, 3.2e-6, 1.23456, 12345.6)] == [
        "0",
        "0.0123",
        "0.00077",
        "3.2e-06",
        "1.235",
        "12346",
    ]


def test_inspect_text_and_plot(run, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    text = I.inspect(run.url, str(out))
    first = text.splitlines()[0]
    assert first.startswith("run tiny (") and run.url in first and "4 round folders, 1 trained" in first
    assert I.format_table(I.round_table(run.url)) in text
    assert text.splitlines()[-1] == f"plot: {out}"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert os.listdir(out.parent) == ["curves.png"]  # no temporary file left behind
    assert "plot:" not in I.inspect(run.url)


def test_inspect_errors(tmp_path):
    with pytest.raises(OpdError, match="opd init") as e:
        I.inspect(str(tmp_path / "nothing"))
    assert str(tmp_path / "nothing" / "opd.toml") in str(e.value) and "\n" not in str(e.value)
    init_run(str(tmp_path / "run"), "tiny")
    with pytest.raises(OpdError, match=r"no rounds yet: run `opd run .*run`") as e:
        I.inspect(str(tmp_path / "run"))
    assert str(tmp_path / "run" / "rounds") in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ plot


def _read_png(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    return matplotlib.image.imread(path)


def test_plot_full_and_partial(run, tmp_path):
    df = I.round_table(run.url)
    img = _read_png(I.plot(df, str(tmp_path / "all.png")))
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300
    assert img.std() > 0  # not a blank image

    # one round, no held-out data, nothing trained: still a picture
    one = df.filter(pl.col("round") == 2)
    assert I.plot(one, str(tmp_path / "one.png")) == str(tmp_path / "one.png")
    _read_png(tmp_path / "one.png")
    # only the eval-only row; and no rows at all
    _read_png(I.plot(df.filter(pl.col("status") == "eval only"), str(tmp_path / "eval.png")))
    _read_png(I.plot(pl.DataFrame(schema=I.SCHEMA), str(tmp_path / "empty.png")))


def test_plot_replaces_atomically(run, tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(b"old")
    I.plot(I.round_table(run.url), str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path)) == ["p.png", "run"]

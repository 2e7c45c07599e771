"""The run directory contract: --shard i/N, paths, _DONE.json manifests, skip/--force, verification."""

import hashlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.cache import rundir as R
from opd.cache import shards, storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError
from opd.cache.rundir import RunDir, ShardSpec

PRODUCER = {"stage": "rollout", "model_hash": "a" * 64, "config_hash": "c1", "format_version": 1}


def rollout_rows(n, prefix="q"):
    return [
        dict(
            sample_id=f"{prefix}{i}/0",
            prompt_id=f"{prefix}{i}",
            sample_index=0,
            source="student",
            prompt_ids=[1, 2, 3],
            completion_ids=list(range(i + 1)),
            sampling_logprobs=[-0.5] * (i + 1),
            finish_reason="stop",
            sampling_hash="h",
            prompt_messages=None,
        )
        for i in range(n)
    ]


def write_shard(run, round_index, shard, n_rows, producer=PRODUCER):
    path = run.shard_path(round_index, "rollouts", shard)
    shards.write_rollout_shard(run.fs, path, rollout_rows(n_rows, prefix=f"s{shard}q"), producer)
    return path


def finalize(run, num_shards, round_index=0, producer=PRODUCER, summary=None):
    return R.finalize_stage(
        run,
        run.stage_dir(round_index, "rollouts"),
        stage="rollouts",
        round_index=round_index,
        num_shards=num_shards,
        producer=producer,
        row_count=lambda p: R.parquet_rows(run, p),
        summary=summary,
    )


# ------------------------------------------------------------------------------------------ --shard i/N


@pytest.mark.parametrize(
    "text, index, count", [("0/4", 0, 4), ("3/4", 3, 4), (" 1 / 2 ", 1, 2), ("0/1", 0, 1), (None, 0, 1), ("", 0, 1)]
)
def test_shard_spec_parse(text, index, count):
    spec = ShardSpec.parse(text)
    assert (spec.index, spec.count) == (index, count)
    assert str(spec) == f"{index}/{count}"


@pytest.mark.parametrize("text", ["4/4", "5/4", "x", "-1/2", "1/0", "0/0", "1", "1/2/3", "a/b", "1.0/2", "0/-1"])
def test_shard_spec_bad(text):
    with pytest.raises(OpdError, match="--shard") as e:
        ShardSpec.parse(text)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 12), num_shards=st.integers(0, 60))
def test_shards_partition(count, num_shards):
    workers = [ShardSpec.parse(f"{i}/{count}") for i in range(count)]
    owned = [w.owned(num_shards) for w in workers]
    flat = sorted(s for o in owned for s in o)
    assert flat == list(range(num_shards))  # every shard owned, exactly once
    for w, o in zip(workers, owned):
        assert o == [s for s in range(num_shards) if w.owns(s)]
        assert all(s % count == w.index for s in o)
    sizes = [len(o) for o in owned]
    assert max(sizes) - min(sizes) <= 1  # balanced


# ------------------------------------------------------------------------------------------ paths


def test_run_dir_paths(tmp_path):
    run = RunDir(tmp_path / "run")
    root = str(tmp_path / "run")
    assert run.root == root
    assert run.config_path == f"{root}/opd.toml"
    assert run.round_dir(0) == f"{root}/rounds/0000"
    assert run.round_dir(12) == f"{root}/rounds/0012"
    assert run.stage_dir(3, "scores") == f"{root}/rounds/0003/scores"
    assert run.shard_path(1, "rollouts", 7) == f"{root}/rounds/0001/rollouts/part-00007.parquet"
    assert run.metrics_path(2) == f"{root}/rounds/0002/metrics.jsonl"
    with pytest.raises(OpdError, match="--round -1"):
        run.round_dir(-1)
    assert run.stage_dir(0, "lengths") == f"{root}/rounds/0000/lengths"  # a later stage's own folder
    for bad in ("../scores", "Scores", "a/b", ""):
        with pytest.raises(ValueError, match="stage must be one of"):
            run.stage_dir(0, bad)
    assert RunDir("file://" + root).root == root
    assert R.shard_name(42) == "part-00042.parquet"
    assert R.shard_index("part-00042.parquet") == 42
    for bad in ("part-42.parquet", ".tmp-part-00042.parquet.1-abc", "part-00042.parquet.bak", "_DONE.json"):
        assert R.shard_index(bad) is None


def test_rounds_and_existing_shards(tmp_path):
    run = RunDir(tmp_path)
    assert run.rounds() == []
    assert run.existing_shards(0, "rollouts") == []
    write_shard(run, 0, 2, 1)
    write_shard(run, 0, 0, 1)
    write_shard(run, 3, 0, 1)
    os.makedirs(tmp_path / "rounds" / "notes")
    # a killed writer's leftover does not count as a shard
    open(storage.tmp_name(run.shard_path(0, "rollouts", 1)), "wb").write(b"partial")
    assert run.rounds() == [0, 3]
    assert run.existing_shards(0, "rollouts") == [0, 2]


def test_require_initialised(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(OpdError, match="opd init") as e:
        run.read_config_text()
    assert run.config_path in str(e.value)
    storage.atomic_write_bytes(run.fs, run.config_path, b"[run]\n")
    assert run.read_config_text() == "[run]\n"


# ------------------------------------------------------------------------------------------ manifests


def test_finalize_waits_for_every_shard(tmp_path):
    run = RunDir(tmp_path)
    stage_dir = run.stage_dir(0, "rollouts")
    assert finalize(run, 3) is None
    write_shard(run, 0, 0, 4)
    write_shard(run, 0, 2, 2)
    assert finalize(run, 3) is None
    assert not os.path.exists(f"{stage_dir}/_DONE.json")
    assert R.read_manifest(run, stage_dir) is None
    write_shard(run, 0, 1, 5)
    paths = [run.shard_path(0, "rollouts", s) for s in range(3)]
    m = finalize(run, 3, summary={"prompts": 9})
    assert m is not None
    assert os.path.exists(f"{stage_dir}/_DONE.json")
    assert [e.name for e in m.shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [e.rows for e in m.shards] == [4, 5, 2] and m.total_rows == 11
    for entry, path in zip(m.shards, paths):
        data = open(path, "rb").read()
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        assert entry.bytes == len(data)
    assert (m.stage, m.round, m.producer, m.summary) == ("rollouts", 0, PRODUCER, {"prompts": 9})
    on_disk = json.loads(open(f"{stage_dir}/_DONE.json").read())
    assert on_disk["format"] == "opd.manifest" and on_disk["version"] == 1 and on_disk["total_rows"] == 11
    assert R.read_manifest(run, stage_dir) == m
    assert not [n for n in os.listdir(stage_dir) if n.startswith(".tmp-")]


def test_finalize_is_the_same_whoever_writes_it(tmp_path):
    run = RunDir(tmp_path)
    for s in range(4):
        write_shard(run, 0, s, s + 1)
    first = open(f"{run.stage_dir(0, 'rollouts')}/_DONE.json", "rb").read() if finalize(run, 4) else None
    second = open(f"{run.stage_dir(0, 'rollouts')}/_DONE.json", "rb").read() if finalize(run, 4) else None
    assert first is not None and first == second


def test_should_skip(tmp_path):
    run = RunDir(tmp_path)
    stage_dir = run.stage_dir(0, "rollouts")
    assert R.should_skip(run, stage_dir, PRODUCER, force=False) is False  # no folder at all
    write_shard(run, 0, 0, 3)
    assert R.should_skip(run, stage_dir, PRODUCER, force=False) is False  # shards but no manifest
    finalize(run, 1)
    assert R.should_skip(run, stage_dir, PRODUCER, force=False) is True
    assert R.should_skip(run, stage_dir, {"config_hash": "c1"}, force=False) is True  # a subset is compared
    other = {**PRODUCER, "config_hash": "c2"}
    with pytest.raises(FingerprintMismatch) as e:
        R.should_skip(run, stage_dir, other, force=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{stage_dir}/_DONE.json" in msg
    assert "config_hash" in msg and "'c1'" in msg and "'c2'" in msg and "--force" in msg
    # a mismatch changes nothing on disk
    assert os.path.exists(f"{stage_dir}/_DONE.json")
    # --force clears the stage's outputs
    open(storage.tmp_name(f"{stage_dir}/part-00001.parquet"), "wb").write(b"partial")
    assert R.should_skip(run, stage_dir, other, force=True) is False
    assert os.listdir(stage_dir) == []
    assert R.should_skip(run, stage_dir, other, force=False) is False
    # --force on a stage that never ran is fine
    assert R.should_skip(run, run.stage_dir(5, "scores"), PRODUCER, force=True) is False


def test_verify_shards(tmp_path):
    run = RunDir(tmp_path)
    stage_dir = run.stage_dir(0, "rollouts")
    for s in range(2):
        write_shard(run, 0, s, 3)
    m = finalize(run, 2)
    R.verify_shards(run, stage_dir, m)  # intact: no error
    # the same number of rows, other content
    path = write_shard(run, 0, 1, 3, producer={**PRODUCER, "config_hash": "other"})
    with pytest.raises(FormatError, match="checksum differs") as e:
        R.verify_shards(run, stage_dir, m)
    assert path in str(e.value) and "\n" not in str(e.value)
    # a single flipped bit
    write_shard(run, 0, 1, 3)
    m = finalize(run, 2)
    R.verify_shards(run, stage_dir, m)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(FormatError, match="checksum differs"):
        R.verify_shards(run, stage_dir, m)
    os.remove(path)
    with pytest.raises(FormatError, match="missing") as e:
        R.verify_shards(run, stage_dir, m)
    assert path in str(e.value)


def test_append_metrics(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics(1, {"step": 0, "loss": 1.5})
    run.append_metrics(1, {"step": 1, "loss": 1.25, "note": "ü"})
    run.append_metrics(1, {"step": 2})
    lines = open(run.metrics_path(1), encoding="utf-8").read().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "loss": 1.5},
        {"step": 1, "loss": 1.25, "note": "ü"},
        {"step": 2},
    ]
    assert open(run.metrics_path(1), "rb").read().endswith(b"\n")
    assert sorted(os.listdir(run.round_dir(1))) == ["metrics.jsonl"]  # no temporary files left


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "corrupt manifest"),
        ("", "corrupt manifest"),
        (
            '{"format": "opd.manifest", "version": 99, "stage": "rollouts", "round": 0, "shards": [], "producer": {}}',
            "manifest version 99",
        ),
        ('{"format": "something.else", "version": 1}', "not an opd manifest"),
        ('{"format": "opd.manifest", "version": 1}', "corrupt manifest"),
        (
            '{"format": "opd.manifest", "version": 1, "stage": "rollouts", "round": 0, "producer": {}, '
            '"shards": [{"name": "part-00000.parquet"}]}',
            "corrupt manifest",
        ),
    ],
)
def test_read_manifest_rejects(tmp_path, content, match):
    run = RunDir(tmp_path)
    stage_dir = run.stage_dir(0, "rollouts")
    os.makedirs(stage_dir)
    open(f"{stage_dir}/_DONE.json", "w").write(content)
    with pytest.raises(FormatError, match=match) as e:
        R.read_manifest(run, stage_dir)
    assert f"{stage_dir}/_DONE.json" in str(e.value) and "\n" not in str(e.value)
    # the skip rule refuses it the same way rather than treating the stage as done
    with pytest.raises(FormatError):
        R.should_skip(run, stage_dir, PRODUCER, force=False)


def test_read_manifest_rejects_non_object(tmp_path):
    run = RunDir(tmp_path)
    stage_dir = run.stage_dir(0, "rollouts")
    os.makedirs(stage_dir)
    open(f"{stage_dir}/_DONE.json", "w").write("[]")
    with pytest.raises(FormatError):
        R.read_manifest(run, stage_dir)


def test_parquet_rows(tmp_path):
    run = RunDir(tmp_path)
    assert R.parquet_rows(run, write_shard(run, 0, 0, 7)) == 7


def test_force_with_only_clears_just_the_owned_shards(tmp_path):
    from opd.cache import storage
    from opd.cache.rundir import RunDir, shard_name, should_skip

    run = RunDir(str(tmp_path / "run"))
    stage = run.stage_dir(0, "scores")
    for s in range(4):
        storage.atomic_write_bytes(run.fs, storage.join(stage, shard_name(s)), b"x")
    storage.atomic_write_bytes(run.fs, storage.join(stage, ".tmp-" + shard_name(1) + ".9-abc"), b"x")
    storage.atomic_write_bytes(run.fs, storage.join(stage, "_DONE.json"), b"{}")
    assert should_skip(run, stage, {"a": 1}, force=True, only=[shard_name(1), shard_name(3)]) is False
    assert sorted(storage.listdir(run.fs, stage)) == [shard_name(0), shard_name(2)]


def test_concurrent_metric_appends_lose_nothing(tmp_path):
    import json
    import multiprocessing as mp

    from opd.cache.rundir import RunDir

    run = RunDir(str(tmp_path / "run"))
    procs = [mp.get_context("fork").Process(target=_append_many, args=(str(tmp_path / "run"), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = open(run.metrics_path(0)).read().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(4) for i in range(50)]


def _append_many(url, worker):
    from opd.cache.rundir import RunDir

    run = RunDir(url)
    for i in range(50):
        run.append_metrics(0, {"worker": worker, "i": i, "pad": "x" * 200})


def test_previous_student_needs_a_finished_manifest(tmp_path):
    from opd.cache.errors import OpdError
    from opd.cache.rundir import Manifest, RunDir, previous_student, write_manifest

    run = RunDir(str(tmp_path / "run"))
    folder = run.stage_dir(0, "student")
    os.makedirs(folder)
    with pytest.raises(OpdError, match=r"round 0 student is not finished .*opd train .* --round 0` first"):
        previous_student(run, 1)
    write_manifest(run, folder, Manifest(stage="student", round=0, shards=[], producer={}))
    assert previous_student(run, 1) == folder


def test_splits_and_their_folders():
    from opd.cache.rundir import choose_splits, split_folder

    assert choose_splits("all", True) == ["train", "heldout"] and choose_splits("all", False) == ["train"]
    assert choose_splits("heldout", True) == ["heldout"] and choose_splits("train", False) == ["train"]
    with pytest.raises(OpdError, match="eval.prompts"):
        choose_splits("heldout", False)
    with pytest.raises(OpdError, match="--split 'test' is invalid"):
        choose_splits("test", True)
    assert split_folder("train", "scores") == "scores" and split_folder("heldout", "scores") == "heldout/scores"

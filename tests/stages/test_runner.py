"""The sharded-stage runner through the smallest stage: the example in docs/design.md, run as written."""

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_score import make_run, rollout_rows

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch
from opd.cache.rundir import ShardSpec, read_manifest
from opd.stages.runner import StageResult, run_stage

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def example_stage():
    """The LengthsStage class of docs/design.md's "How to add a stage", executed as written."""
    text = DESIGN.read_text()
    section = text[text.index("## How to add a stage") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(DESIGN), "exec"), namespace)
    return namespace["LengthsStage"], code


def test_the_documented_stage_is_about_a_hundred_lines():
    _, code = example_stage()
    assert len(code.splitlines()) <= 100


def test_a_new_stage_gets_sharding_resume_skip_and_force_from_the_runner(tmp_path, tiny_teacher, tiny_student):
    LengthsStage, _ = example_stage()
    shards = [rollout_rows(s, 3 + s, completion_len=(1, 9), prefix=f"s{s}-") for s in range(3)]
    run, _ = make_run(tmp_path, tiny_teacher, tiny_student, shards)
    folder = Path(run.stage_dir(0, "lengths"))

    first = run_stage(LengthsStage(run, 0), run, 0, ShardSpec.parse("0/2"))  # shards 0 and 2
    assert isinstance(first, StageResult) and first.stage == "lengths"
    assert (first.shards_written, first.done, first.samples) == (2, False, 3 + 5)
    assert sorted(p.name for p in folder.glob("part-*")) == ["part-00000.parquet", "part-00002.parquet"]
    (folder / ".tmp-part-00001.parquet.123-abc").write_bytes(b"half a file")  # a killed worker's leftover

    second = run_stage(LengthsStage(run, 0), run, 0, ShardSpec.parse("1/2"))
    assert (second.shards_written, second.done) == (1, True) and "done=True" in second.line
    assert not list(folder.glob(".tmp-*")), "the worker's temporary leftovers are removed"
    manifest = read_manifest(run, str(folder))
    lengths = [len(r["completion_ids"]) for rows in shards for r in rows]
    assert manifest.summary == {"samples": len(lengths), "mean_length": sum(lengths) / len(lengths)}
    assert manifest.total_rows == len(lengths)
    for s, rows in enumerate(shards):
        table = pq.read_table(folder / f"part-{s:05d}.parquet")
        assert table["length"].to_pylist() == [len(r["completion_ids"]) for r in rows]

    again = run_stage(LengthsStage(run, 0), run, 0, ShardSpec())
    assert again.skipped and again.samples == len(lengths) and again.shards_written == 0
    records = run.read_metrics(0)
    assert [r["stage"] for r in records] == ["lengths"] * 3 and records[-1]["skipped"]
    assert records[0]["shards_written"] == 2 and records[1]["done"]

    class Changed(LengthsStage):  # another producer: the finished stage is refused, then redone with force
        def producer(self):
            return {**super().producer(), "version": 2}

    with pytest.raises(FingerprintMismatch, match="--force"):
        run_stage(Changed(run, 0), run, 0, ShardSpec())
    redone = run_stage(Changed(run, 0), run, 0, ShardSpec(), force=True)
    assert redone.shards_written == 3 and redone.done
    assert read_manifest(run, str(folder)).producer["version"] == 2


def test_force_under_a_shard_clears_only_that_workers_shards(tmp_path, tiny_teacher, tiny_student):
    LengthsStage, _ = example_stage()
    run, _ = make_run(tmp_path, tiny_teacher, tiny_student, [rollout_rows(s, 2, prefix=f"s{s}-") for s in range(4)])
    run_stage(LengthsStage(run, 0), run, 0, ShardSpec())
    folder = run.stage_dir(0, "lengths")
    before = {s: storage.sha256_file(run.fs, run.shard_path(0, "lengths", s)) for s in range(4)}
    mtimes = {s: Path(run.shard_path(0, "lengths", s)).stat().st_mtime_ns for s in range(4)}
    redo = run_stage(LengthsStage(run, 0), run, 0, ShardSpec.parse("1/2"), force=True)
    assert redo.shards_written == 2 and redo.done  # shards 1 and 3 rewritten, the manifest again
    for s in (0, 2):  # the peer's shards untouched
        assert Path(run.shard_path(0, "lengths", s)).stat().st_mtime_ns == mtimes[s]
    assert {s: storage.sha256_file(run.fs, run.shard_path(0, "lengths", s)) for s in range(4)} == before
    assert read_manifest(run, folder) is not None

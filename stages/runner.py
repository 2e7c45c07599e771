"""The sharded-stage runner: the life cycle every stage that writes numbered shards shares, once.

A stage says what one shard's work is and how to summarise finished shards (a `ShardedStage`, by
composition: any object with these methods); `run_stage` does the rest, the same way for every stage:

    1. --force clears the stage's manifest and outputs first (under `--shard i/N` only this worker's
       shards, so a late worker never deletes its peers' finished ones);
    2. lists the work units (shard numbers; with `follow`, those that exist so far, until the input
       stage is complete) and skips the stage when its manifest already matches the producer;
    3. removes the `.tmp-` leftovers of this worker's shards, keeps the owned shards that are already
       valid, loads what the work needs (kept out of tokens/s), and writes the rest one by one, each to
       a temporary name renamed into place whole (the stage's writer does that), with a progress bar;
    4. once every shard of the stage exists, writes `_DONE.json` (its summary is computed from the
       shards, so it is the same whichever worker writes it);
    5. appends one metrics record and returns a `StageResult`: the same fields for every stage, the
       stage's own figures in `extras`.

A stage's `work(s)` may return a `Future` of its outcome (the score stage packs and writes a shard in a
background thread while the teacher scores the next one); the runner waits for it before the manifest.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from opd.cache import storage
from opd.cache.rundir import (
    MANIFEST,
    RunDir,
    ShardSpec,
    check_done,
    clear_stage,
    finalize_stage,
    shard_index,
    shard_name,
)
from opd.cache.rundir import parquet_rows as _parquet_rows
from opd.stages import console


@dataclass(frozen=True)
class ShardOutcome:
    """What writing one shard produced."""

    samples: int  # rows written
    tokens: int  # tokens generated or scored
    bytes: int = 0  # bytes of the shard on disk (0 where the stage does not count them)


@dataclass(frozen=True)
class Units:
    """The work a stage sees now: shard numbers, and whether that is all of it (False while following
    an input stage that is still writing)."""

    numbers: list[int]
    complete: bool = True


class ShardedStage(Protocol):
    """What a stage tells the runner (see the module docstring); `name` is the metrics record's
    "stage", `folder` the output folder under rounds/R/, `split` "train" or "heldout"."""

    name: str
    folder: str
    split: str

    def units(self) -> Units: ...
    def producer(self) -> dict | None: ...  # the stage manifest's producer; None while the input is incomplete
    def keep(self, s: int) -> bool: ...  # is output shard s present and valid (kept on resume)?
    def size(self, s: int) -> int: ...  # progress units (prompts, samples) of shard s
    def prepare(self, todo: list[int]) -> None: ...  # load what writing `todo` needs
    def work(self, s: int, progress: Progress) -> ShardOutcome | Future: ...
    def summarize(self, numbers: list[int]) -> dict | None: ...  # the manifest summary; None: not yet
    def extras(self) -> Any: ...  # this invocation's stage-specific figures (a dataclass)
    def describe(self, result: StageResult) -> str: ...  # the one-line human summary


@dataclass(frozen=True)
class StageResult:
    """One invocation of one split of a stage: what it found, wrote and took."""

    stage: str  # "rollout", "score", ...
    round: int
    split: str  # "train" or "heldout"
    shard: str  # this worker's "i/N"
    skipped: bool  # the stage was already finished with this producer: nothing ran
    done: bool  # the stage's manifest exists after this invocation
    shards_total: int  # shards the stage has (so far, while following)
    shards_written: int  # shards this invocation wrote
    shards_present: int  # owned shards found valid and kept
    samples: int  # rows written by this invocation (skipped: the stage's total)
    tokens: int  # tokens generated or scored by this invocation (skipped: the stage's total, if known)
    bytes: int  # bytes written by this invocation
    seconds: float  # the invocation's wall time
    work_seconds: float  # time writing shards (model loading excluded): the tokens/s denominator
    tokens_per_s: float
    startup_seconds: float | None = None  # process start → first unit of work (first_work_started); None: not its first
    load_seconds: float = 0.0  # time loading what the work needs (model, engine): `prepare`
    extras: Any = None  # the stage's own typed figures (None when skipped)
    line: str = ""  # one human line
    heldout: StageResult | None = None  # `--split all`: the held-out split's result

    def record(self) -> dict:
        """The metrics record: the common fields, then the extras' fields, flat."""
        rec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_RECORDED}
        if dataclasses.is_dataclass(self.extras):
            rec.update(dataclasses.asdict(self.extras))
        return rec

    @property
    def lines(self) -> str:
        """This split's line and the held-out split's, one per line."""
        return self.line + (f"\n{self.heldout.line}" if self.heldout is not None else "")


_NOT_RECORDED = ("extras", "line", "heldout")


class Progress:
    """The bar a stage's work advances, `advance(units, tokens)`; shown once there is work."""

    def __init__(self, desc: str):
        self._desc, self._bar, self._t0, self.tokens = desc, None, time.perf_counter(), 0

    def grow(self, units: int) -> None:
        if self._bar is None:
            self._bar, self._t0 = console.bar(total=0, unit="item", desc=self._desc), time.perf_counter()
        self._bar.total += units
        self._bar.refresh()

    def advance(self, units: int, tokens: int = 0) -> None:
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(units)
            rate = self.tokens / max(time.perf_counter() - self._t0, 1e-9)
            self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_stage(
    stage: ShardedStage, run: RunDir, round_index: int, shard: ShardSpec, *, force: bool = False, poll_s: float = 1.0
) -> StageResult:
    """Run this worker's part of `stage` for one round (module docstring); `poll_s`: how often a
    following stage looks for new input shards."""
    t0 = time.perf_counter()
    stage_dir = run.stage_dir(round_index, stage.folder)
    if force:
        mine = None if shard.count == 1 else [n for n in _names(run, stage_dir) if shard.owns(shard_index(n))]
        clear_stage(run, stage_dir, mine)
    seen: set[int] = set()
    written: list[ShardOutcome | Future] = []
    kept, work_s, load_s, startup = 0, 0.0, 0.0, None
    progress = Progress(f"{stage.name} r{round_index} {stage.split} [{shard}]")
    try:
        while True:
            producer = stage.producer() if not seen else None  # None: the input is not complete yet
            done = check_done(run, stage_dir, producer) if producer is not None else None
            if done is not None:
                return _skipped(stage, run, round_index, shard, done, t0)
            units = stage.units()
            new = [s for s in units.numbers if shard.owns(s) and s not in seen]
            storage.remove_tmp_files(run.fs, stage_dir, {shard_name(s) for s in new})
            todo = [s for s in new if not stage.keep(s)]
            kept += len(new) - len(todo)
            seen.update(new)
            if todo:
                progress.grow(sum(stage.size(s) for s in todo))
                t_load = time.perf_counter()
                stage.prepare(todo)
                t_work = time.perf_counter()
                load_s += t_work - t_load
                startup = startup if startup is not None else first_work_started()
                written += [stage.work(s, progress) for s in todo]
                written = [w.result() if isinstance(w, Future) else w for w in written]
                work_s += time.perf_counter() - t_work
            if units.complete:
                break
            if not new:
                time.sleep(poll_s)
    finally:
        progress.close()
    manifest = _finalize(stage, run, round_index, units.numbers)
    tokens = sum(w.tokens for w in written)
    result = _result(
        stage,
        round_index,
        shard,
        t0,
        skipped=False,
        done=manifest is not None,
        shards_total=len(units.numbers),
        shards_written=len(written),
        shards_present=kept,
        samples=sum(w.samples for w in written),
        tokens=tokens,
        bytes=sum(w.bytes for w in written),
        work_seconds=round(work_s, 3),
        tokens_per_s=round(tokens / work_s, 1) if tokens and work_s else 0.0,
        startup_seconds=startup,
        load_seconds=round(load_s, 3),
        extras=stage.extras(),
    )
    return _finish(stage, run, result)


_STARTUP: list[float] = []  # this process's start-up seconds, once its first unit of work began


def first_work_started() -> float | None:
    """Called as a stage begins a unit of work: the seconds from this process's creation to now the first
    time (the fixed cost of a stage process: interpreter, imports, config, model load, engine start), None
    after that."""
    if _STARTUP:
        return None
    import psutil

    _STARTUP.append(round(time.time() - psutil.Process().create_time(), 3))
    return _STARTUP[0]


def _result(stage: ShardedStage, round_index: int, shard: ShardSpec, t0: float, **figures) -> StageResult:
    """A StageResult of this invocation: who ran (stage, round, split, worker), how long, and `figures`."""
    split, seconds = stage.split, round(time.perf_counter() - t0, 3)
    return StageResult(stage=stage.name, round=round_index, split=split, shard=str(shard), seconds=seconds, **figures)


def _finalize(stage: ShardedStage, run: RunDir, round_index: int, numbers: list[int]):
    """`_DONE.json` once every shard of the stage exists and the stage can summarise them; else None."""
    if not set(numbers) <= set(run.existing_shards(round_index, stage.folder)):
        return None
    summary = stage.summarize(sorted(numbers))
    if summary is None:
        return None
    return finalize_stage(
        run,
        run.stage_dir(round_index, stage.folder),
        stage=stage.folder,
        round_index=round_index,
        num_shards=len(numbers),
        producer=stage.producer(),
        row_count=lambda path: _parquet_rows(run, path),
        summary=summary,
    )


def _skipped(stage: ShardedStage, run: RunDir, round_index: int, shard: ShardSpec, done, t0: float) -> StageResult:
    """The result of an invocation that found the stage finished: the stage's totals from its manifest."""
    s = done.summary
    result = _result(
        stage,
        round_index,
        shard,
        t0,
        skipped=True,
        done=True,
        shards_total=len(done.shards),
        shards_written=0,
        shards_present=len(done.shards),
        samples=done.total_rows,
        tokens=int(s.get("completion_tokens", s.get("positions", 0))),  # rollout's / score's manifest summary
        bytes=sum(e.bytes for e in done.shards),
        work_seconds=0.0,
        tokens_per_s=0.0,
    )
    where = storage.join(run.stage_dir(round_index, stage.folder), MANIFEST)
    what = f"{stage.name} round {round_index}" + ("" if stage.split == "train" else f" {stage.split}")
    line = (
        f"{what}: already done ({result.samples} samples in {result.shards_total} shards, {where}); --force redoes it"
    )
    return _finish(stage, run, result, line)


def _finish(stage: ShardedStage, run: RunDir, result: StageResult, line: str | None = None) -> StageResult:
    run.append_metrics(result.round, {"time": time.time(), **result.record()})
    return dataclasses.replace(result, line=line if line is not None else stage.describe(result))


def combine(results: list[StageResult]) -> StageResult:
    """One invocation over its splits: the first split's result, the held-out one's under `heldout`."""
    return results[0] if len(results) == 1 else dataclasses.replace(results[0], heldout=results[1])


def _names(run: RunDir, stage_dir: str) -> list[str]:
    return [n for n in storage.listdir(run.fs, stage_dir) if shard_index(n) is not None]

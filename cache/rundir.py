"""The run directory contract (docs/design.md): layout, `_DONE.json` manifests, skip/--force, --shard i/N.

    RUN/opd.toml                         resolved config (written once by `opd init`)
    RUN/rounds/0000/rollouts/part-00000.parquet, _DONE.json
    RUN/rounds/0000/scores/part-00000.parquet,   _DONE.json
    RUN/rounds/0000/student/ ...,                _DONE.json
    RUN/rounds/0000/heldout/rollouts/, heldout/scores/, heldout/eval.json   validation (eval.prompts)
    RUN/rounds/0000/eval/<task>.json       lm-eval results of the student starting the round (eval.tasks)
    RUN/reference/teacher/eval/<task>.json the teacher's, once per run
    RUN/rounds/0000/metrics.jsonl
    RUN/track/                             the trackers' local files (run.report_to)

A stage writes shards atomically (storage.py), then `_DONE.json` last. A stage whose manifest exists
and whose producer matches is skipped; one whose producer differs is an error unless --force.
Workers started with `--shard i/N` own shard numbers s with s % N == i; whichever worker sees every
shard present writes the manifest (the same content whoever writes it).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import pyarrow.fs as pafs

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError, short_value

MANIFEST = "_DONE.json"
MANIFEST_FORMAT = "opd.manifest"
MANIFEST_VERSION = 1
CONFIG_FILE = "opd.toml"
STAGES = ("rollouts", "scores", "student", "heldout/rollouts", "heldout/scores")
HELDOUT = "heldout"  # rounds/R/heldout/: validation samples and scores (never trained on)
EVAL_FILE = "eval.json"  # rounds/R/heldout/eval.json: the round's held-out figures
_FOLDER_RE = re.compile(r"(heldout/)?[a-z][a-z0-9_]*")
_SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")


def split_folder(split: str, stage: str) -> str:
    """A split's folder of a stage under rounds/R/: the prompt set's at the top, the held-out set's
    under heldout/ (e.g. "rollouts", "heldout/scores")."""
    return stage if split == "train" else f"{HELDOUT}/{stage}"


def choose_splits(split: str, heldout_configured: bool) -> list[str]:
    """`--split`: "train", "heldout" or "all" (train, plus heldout where [eval] names a prompt set)."""
    if split == "all":
        return ["train", "heldout"] if heldout_configured else ["train"]
    if split == "heldout" and not heldout_configured:
        raise OpdError("--split heldout: this run has no held-out prompt set (set eval.prompts in the config)")
    if split not in ("train", "heldout"):
        raise OpdError(f"--split {split!r} is invalid: use train, heldout or all")
    return [split]


def combine_splits(summaries: list[dict]) -> dict:
    """One stage invocation's summary over its splits: the first split's, the held-out one's under
    "heldout", and one human line per split."""
    summary = dict(summaries[0])
    if len(summaries) > 1:
        summary["heldout"] = summaries[1]
        summary["line"] = "\n".join(s["line"] for s in summaries)
    return summary


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ShardSpec:
    """`--shard i/N`: this worker is number i of N and owns shards s with s % N == i."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "ShardSpec":
        if not text:
            return cls()
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise OpdError(f"--shard {text!r} is invalid: expected i/N with 0 <= i < N, e.g. 0/4")
        i, n = int(m.group(1)), int(m.group(2))
        if n < 1 or not 0 <= i < n:
            raise OpdError(f"--shard {text!r} is invalid: expected i/N with 0 <= i < N, e.g. 0/4")
        return cls(i, n)

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def owned(self, num_shards: int) -> list[int]:
        return [s for s in range(num_shards) if self.owns(s)]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """`_DONE.json`: what a finished stage wrote and what produced it."""

    stage: str
    round: int
    shards: list[ShardEntry]
    producer: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def digest(self) -> str:
        """sha256 over the shard names and checksums: which outputs of the stage a later stage read."""
        return hashlib.sha256("\n".join(f"{e.name} {e.sha256}" for e in self.shards).encode()).hexdigest()

    def to_json(self) -> str:
        d = asdict(self)
        d["total_rows"] = self.total_rows
        return json.dumps(d, indent=2, sort_keys=True)


class RunDir:
    """A run folder (local path or URL) and the paths inside it."""

    def __init__(self, url: str | os.PathLike):
        self.url = os.fspath(url)
        self.fs, self.root = storage.resolve(self.url)

    @property
    def config_path(self) -> str:
        return storage.join(self.root, CONFIG_FILE)

    def round_dir(self, round_index: int) -> str:
        if round_index < 0:
            raise OpdError(f"--round {round_index} is invalid: rounds count from 0")
        return storage.join(self.root, "rounds", f"{round_index:04d}")

    def stage_dir(self, round_index: int, stage: str) -> str:
        if stage not in STAGES and not _FOLDER_RE.fullmatch(stage):  # another stage's own folder (docs/design.md)
            raise ValueError(f"stage must be one of {STAGES} or a folder name like 'lengths', got {stage!r}")
        return storage.join(self.round_dir(round_index), stage)

    def shard_path(self, round_index: int, stage: str, shard: int) -> str:
        return storage.join(self.stage_dir(round_index, stage), shard_name(shard))

    def eval_path(self, round_index: int) -> str:
        return storage.join(self.round_dir(round_index), HELDOUT, EVAL_FILE)

    def bench_dir(self, round_index: int | None) -> str:
        """Benchmark results: rounds/R/eval/ for the student starting round R, reference/teacher/eval/
        for the teacher (round_index None)."""
        if round_index is None:
            return storage.join(self.root, "reference", "teacher", "eval")
        return storage.join(self.round_dir(round_index), "eval")

    def metrics_path(self, round_index: int) -> str:
        return storage.join(self.round_dir(round_index), "metrics.jsonl")

    def log_path(self, round_index: int | None, name: str) -> str:
        """A local log file for one process: RUN/rounds/R/logs/NAME.log (RUN/logs/NAME.log for the loop).
        For an object-store run, the same layout under $OPD_HOME/logs/<bucket>/<prefix>/."""
        from opd.cache.fingerprint import opd_home

        sub = ["logs"] if round_index is None else ["rounds", f"{round_index:04d}", "logs"]
        if self.local:
            return os.path.join(self.root, *sub, f"{name}.log")
        return os.path.join(opd_home(), "logs", *self.root.strip("/").split("/"), *sub, f"{name}.log")

    def rounds(self) -> list[int]:
        return sorted(int(n) for n in storage.listdir(self.fs, storage.join(self.root, "rounds")) if n.isdigit())

    def require_initialised(self) -> None:
        if not storage.exists(self.fs, self.config_path):
            raise OpdError(f"{self.config_path} not found: run `opd init {self.url} --config FILE` first")

    def read_config_text(self) -> str:
        self.require_initialised()
        return storage.read_bytes(self.fs, self.config_path).decode()

    def existing_shards(self, round_index: int, stage: str) -> list[int]:
        names = storage.listdir(self.fs, self.stage_dir(round_index, stage))
        return sorted(i for i in (shard_index(n) for n in names) if i is not None)

    @property
    def local(self) -> bool:
        """A folder on this machine's filesystem (or a shared one mounted here), not an object store."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def metrics_records_dir(self, round_index: int) -> str:
        """Object stores: RUN/rounds/R/metrics/, one object per record (no appends there)."""
        return storage.join(self.round_dir(round_index), "metrics")

    def append_metrics(self, round_index: int, record: Mapping[str, Any]) -> None:
        """Append one JSON record. Locally: one O_APPEND write to metrics.jsonl, so concurrent `--shard`
        workers never lose or interleave lines. Object stores have no append and no locks, so each
        record is its own object, rounds/R/metrics/<time ns>-<random>.json: no writer ever rewrites
        another's."""
        line = json.dumps(dict(record), sort_keys=True).encode() + b"\n"
        if self.local:
            path = self.metrics_path(round_index)
            storage.makedirs(self.fs, posixpath.dirname(path))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            return
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.json"
        storage.atomic_write_bytes(self.fs, storage.join(self.metrics_records_dir(round_index), name), line)

    def read_metrics(self, round_index: int) -> list[dict]:
        """The round's metrics records in the order written; a line that does not parse is skipped."""
        if self.local:
            path = self.metrics_path(round_index)
            blobs = [storage.read_bytes(self.fs, path)] if storage.exists(self.fs, path) else []
        else:
            folder = self.metrics_records_dir(round_index)
            names = [n for n in storage.listdir(self.fs, folder) if n.endswith(".json")]
            blobs = [storage.read_bytes(self.fs, storage.join(folder, n)) for n in names]
        out = []
        for blob in blobs:
            for line in blob.decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def drop_metrics(self, round_index: int, stale) -> None:
        """Remove the round's records for which `stale(record)` is true (a learner restarting its round)."""
        if not self.local:
            folder = self.metrics_records_dir(round_index)
            for name in storage.listdir(self.fs, folder):
                path = storage.join(folder, name)
                try:
                    rec = json.loads(storage.read_bytes(self.fs, path))
                except ValueError:
                    continue
                if isinstance(rec, dict) and stale(rec):
                    storage.remove(self.fs, path)
            return
        path = self.metrics_path(round_index)
        if not storage.exists(self.fs, path):
            return
        lines = storage.read_bytes(self.fs, path).decode().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line cannot happen (atomic appends); skip it anyway
            if not (isinstance(rec, dict) and stale(rec)):
                kept.append(line)
        if len(kept) != len(lines):
            storage.atomic_write_bytes(self.fs, path, "".join(kept).encode())


# ------------------------------------------------------------------------------------------ manifests


def read_manifest(run: RunDir, stage_dir: str) -> Manifest | None:
    path = storage.join(stage_dir, MANIFEST)
    if not storage.exists(run.fs, path):
        return None
    try:
        d = json.loads(storage.read_bytes(run.fs, path))
        if not isinstance(d, dict):
            raise FormatError(f"{path}: not an opd manifest (not a JSON object); delete it and re-run the stage")
        if d.get("format") != MANIFEST_FORMAT:
            raise FormatError(f"{path}: not an opd manifest")
        if d.get("version") != MANIFEST_VERSION:
            raise FormatError(
                f"{path}: manifest version {d.get('version')!r} is not one this opd reads "
                f"({MANIFEST_VERSION}); re-run the stage with --force"
            )
        return Manifest(
            stage=d["stage"],
            round=d["round"],
            producer=d["producer"],
            shards=[ShardEntry(**s) for s in d["shards"]],
            summary=d.get("summary", {}),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: corrupt manifest ({e}); delete it and re-run the stage") from None


def write_manifest(run: RunDir, stage_dir: str, manifest: Manifest) -> None:
    storage.atomic_write_bytes(run.fs, storage.join(stage_dir, MANIFEST), manifest.to_json().encode())


def should_skip(
    run: RunDir, stage_dir: str, producer: Mapping[str, Any], force: bool, only: Iterable[str] | None = None
) -> bool:
    """The skip-if-done rule. --force clears the stage's outputs (with `only`, just those files: a
    `--shard i/N` worker clears its own shards, never its siblings'); a finished stage with another
    producer is an error naming both, so stale outputs are never silently reused."""
    if force:
        clear_stage(run, stage_dir, only)
        return False
    return check_done(run, stage_dir, producer) is not None


def check_done(run: RunDir, stage_dir: str, producer: Mapping[str, Any]) -> Manifest | None:
    """The stage's manifest if it is finished with this producer; None if unfinished; an error naming
    both values if it was finished by another producer."""
    manifest = read_manifest(run, stage_dir)
    if manifest is None:
        return None
    for key, want in producer.items():
        got = manifest.producer.get(key)
        if got != want:
            raise FingerprintMismatch(
                f"{stage_dir}/{MANIFEST}: finished with {key}={short_value(got)!r}, but this run would use "
                f"{key}={short_value(want)!r}; re-run with --force to redo the stage"
            )
    return manifest


def previous_student(run: RunDir, round_index: int) -> str:
    """RUN/rounds/R-1/student, the student round R starts from (R >= 1), once its manifest says it is finished."""
    folder = run.stage_dir(round_index - 1, "student")
    if read_manifest(run, folder) is None:
        raise OpdError(
            f"{folder}: the round {round_index - 1} student is not finished (no {MANIFEST}); "
            f"run `opd train {run.url} --round {round_index - 1}` first"
        )
    return folder


SFT_STAGE = "sft"  # the producer stage of a student written by `opd sft` (an SFT round)


def sft_rounds(run: RunDir) -> list[int]:
    """The rounds whose student `opd sft` wrote (finished), in order: those rounds have no rollouts,
    scores or distillation; the next round starts from their student."""
    found = []
    for r in run.rounds():
        manifest = read_manifest(run, run.stage_dir(r, "student"))
        if manifest is not None and manifest.producer.get("stage") == SFT_STAGE:
            found.append(r)
    return found


def clear_stage(run: RunDir, stage_dir: str, only: Iterable[str] | None = None) -> None:
    """Remove a stage's manifest first (so it no longer reads as done), then its files (all, or
    those named in `only` and their `.tmp-` leftovers)."""
    manifest = storage.join(stage_dir, MANIFEST)
    if storage.exists(run.fs, manifest):
        storage.remove(run.fs, manifest)
    if only is not None:
        names = set(only)
        storage.remove_tmp_files(run.fs, stage_dir, names)
        for name in names:
            if storage.exists(run.fs, storage.join(stage_dir, name)):
                storage.remove(run.fs, storage.join(stage_dir, name))
        return
    for name in storage.listdir(run.fs, stage_dir):
        storage.remove(run.fs, storage.join(stage_dir, name))


def verify_shards(run: RunDir, stage_dir: str, manifest: Manifest) -> None:
    """Re-hash every shard the manifest lists; raise naming the first that is missing or changed."""
    for entry in manifest.shards:
        path = storage.join(stage_dir, entry.name)
        if not storage.exists(run.fs, path):
            raise FormatError(f"{path}: listed in {MANIFEST} but missing; re-run the stage with --force")
        digest, size = storage.sha256_file(run.fs, path)
        if digest != entry.sha256 or size != entry.bytes:
            raise FormatError(
                f"{path}: checksum differs from {MANIFEST} (corrupt or replaced); delete it and re-run the stage"
            )


def finalize_stage(
    run: RunDir,
    stage_dir: str,
    *,
    stage: str,
    round_index: int,
    num_shards: int,
    producer: Mapping[str, Any],
    row_count,
    summary: Mapping[str, Any] | None = None,
) -> Manifest | None:
    """Write `_DONE.json` if all `num_shards` shards exist; else return None (other workers still busy).

    `row_count(path) -> int` reads a shard's row count (the caller knows the format)."""
    present = set(run.existing_shards(round_index, stage))
    if any(s not in present for s in range(num_shards)):
        return None
    entries = []
    for s in range(num_shards):
        path = storage.join(stage_dir, shard_name(s))
        digest, size = storage.sha256_file(run.fs, path)
        entries.append(ShardEntry(shard_name(s), int(row_count(path)), size, digest))
    manifest = Manifest(
        stage=stage, round=round_index, shards=entries, producer=dict(producer), summary=dict(summary or {})
    )
    write_manifest(run, stage_dir, manifest)
    return manifest


def parquet_rows(run: RunDir, path: str) -> int:
    import pyarrow.parquet as pq

    with run.fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows

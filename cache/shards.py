"""Rollout and score shards: Parquet schemas, writers and checking readers (format v1, see SPEC.md).

Shape legend: T = completion positions of one sample, K = top-k.

Every shard carries a JSON object under the Parquet key-value metadata key `opd`:
    {"format": "opd.rollouts" | "opd.scores", "version": 1, "producer": {...}, ...}
Readers refuse an unknown format or version, a producer that differs from what the caller expects,
and corrupt data (Parquet page checksums are written and verified), each with one line naming the file.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from opd.cache import storage
from opd.cache.codec import DeltaQuantCodec, make_codec
from opd.cache.errors import FingerprintMismatch, FormatError, first_line, short_value

FORMAT_VERSION = 1
ROLLOUT_FORMAT = "opd.rollouts"
SCORE_FORMAT = "opd.scores"
METADATA_KEY = b"opd"
ROLLOUT_VERSION = 2  # v2 adds `teacher_context`; v1 shards read with it null
SUPPORTED_VERSIONS = {ROLLOUT_FORMAT: {1, 2}, SCORE_FORMAT: {1}}

SOURCES = ("student", "dataset", "teacher")

ROLLOUT_SCHEMA_V1 = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # f"{prompt_id}/{sample_index}", unique in a round
        pa.field("prompt_id", pa.string(), nullable=False),  # the prompt's id in the prompt set
        pa.field("sample_index", pa.int32(), nullable=False),  # 0..n-1 among the prompt's samples
        pa.field("source", pa.string(), nullable=False),  # "student" | "dataset" | "teacher"
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("completion_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("sampling_logprobs", pa.list_(pa.float32()), nullable=True),  # null for dataset rows
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" | "length" | "reference"
        pa.field("sampling_hash", pa.string(), nullable=False),  # hash of the sampling settings
        pa.field("prompt_messages", pa.string(), nullable=True),  # JSON of the original chat messages
    ]
)
ROLLOUT_SCHEMA = ROLLOUT_SCHEMA_V1.append(
    pa.field("teacher_context", pa.string(), nullable=True)  # the prompt row's score.teacher_context_field
)

SCORE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("num_positions", pa.int32(), nullable=False),  # T = len(completion_ids)
        pa.field("topk_ids", pa.binary(), nullable=False),  # codec-packed [T, K] ids
        pa.field("topk_logprobs", pa.binary(), nullable=False),  # codec-packed [T, K] log-probs
        pa.field("taken_logprobs", pa.list_(pa.float32()), nullable=False),  # exact log p_T(x_t), [T]
        pa.field("tail_logprobs", pa.list_(pa.float32()), nullable=False),  # log(1 - sum_topk p), [T]
    ]
)

_FLOAT_LISTS = {"sampling_logprobs", "taken_logprobs", "tail_logprobs"}


# ---------------------------------------------------------------------------------------- writing


def _content_totals(table: pa.Table) -> dict[str, int]:
    """Row count and per-column element/byte totals: Parquet's page checksums do not cover page
    headers or the footer, so a flipped bit there could silently drop rows or list elements; these
    totals, stored in the `opd` metadata and re-counted on read, catch that."""
    totals = {"rows": table.num_rows}
    for name in table.schema.names:
        col = table.column(name)
        if pa.types.is_list(col.type):
            totals[name] = int(pc.sum(pc.list_value_length(col)).as_py() or 0)
        elif pa.types.is_binary(col.type) or pa.types.is_string(col.type):
            totals[name] = int(pc.sum(pc.binary_length(col)).as_py() or 0)
    return totals


def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table, meta: Mapping[str, Any], zstd_level: int) -> int:
    """Write `table` atomically with `meta` under the `opd` key; returns the file size in bytes."""
    meta = {**meta, "content": _content_totals(table)}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    storage.makedirs(fs, posixpath.dirname(path))
    tmp = storage.tmp_name(path)
    names = table.schema.names
    pq.write_table(
        table,
        tmp,
        filesystem=fs,
        compression="zstd",
        compression_level=zstd_level,
        use_dictionary=[n for n in ("source", "finish_reason", "sampling_hash") if n in names],
        column_encoding={f"{n}.list.element": "BYTE_STREAM_SPLIT" for n in names if n in _FLOAT_LISTS},
        write_statistics=["sample_id"],
        write_page_checksum=True,
    )
    size = fs.get_file_info(tmp).size
    storage.commit(fs, tmp, path)
    return size


def write_rollout_shard(
    fs: pafs.FileSystem,
    path: str,
    rows: list[dict],
    producer: Mapping[str, Any],
    extra_meta: Mapping[str, Any] | None = None,
    zstd_level: int = 3,
) -> int:
    """Write rollout rows (dicts keyed by ROLLOUT_SCHEMA's names) as one shard; returns bytes written."""
    for row in rows:
        if row["source"] not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {row['source']!r}")
    ids = [row["sample_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate sample_id values in one shard")
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    meta = {"format": ROLLOUT_FORMAT, "version": ROLLOUT_VERSION, "producer": dict(producer), **(extra_meta or {})}
    return _write_parquet(fs, path, table, meta, zstd_level)


@dataclass(frozen=True)
class EncodedScores:
    """One sample's teacher scores, packed and ready to become a row (made off the compute thread)."""

    sample_id: str
    num_positions: int
    topk_ids: bytes
    topk_logprobs: bytes
    taken_logprobs: np.ndarray
    tail_logprobs: np.ndarray


class ScoreShardWriter:
    """Collects encoded samples for one score shard, then writes it atomically.

    `encode` is pure and thread-safe, so a scorer can pack on a background thread while the next
    forward pass runs, then `append` the result.
    """

    def __init__(self, vocab_size: int, top_k: int, logprob_bits: int = 8, temperature: float = 1.0):
        if top_k < 1 or top_k > vocab_size:
            raise ValueError(f"top_k must lie in [1, vocab_size={vocab_size}], got {top_k}")
        self.codec = DeltaQuantCodec(vocab_size, logprob_bits)
        self.top_k = top_k
        self.temperature = float(temperature)
        self._rows: list[EncodedScores] = []

    def encode(self, sample_id: str, topk_ids_TK, topk_logprobs_TK, taken_logprobs_T, tail_logprobs_T) -> EncodedScores:
        ids = np.asarray(topk_ids_TK)
        T = ids.shape[0]
        if ids.ndim != 2 or ids.shape[1] != self.top_k:
            raise ValueError(f"{sample_id}: topk_ids must be [T, {self.top_k}], got {ids.shape}")
        taken = np.asarray(taken_logprobs_T, dtype=np.float32).reshape(-1)
        tail = np.asarray(tail_logprobs_T, dtype=np.float32).reshape(-1)
        if taken.shape[0] != T or tail.shape[0] != T:
            raise ValueError(
                f"{sample_id}: taken/tail log-probs must have T={T} entries, got {taken.shape[0]} and {tail.shape[0]}"
            )
        ids_blob, lps_blob = self.codec.encode(ids, topk_logprobs_TK)
        return EncodedScores(sample_id, T, ids_blob, lps_blob, taken, tail)

    def append(self, encoded: EncodedScores) -> None:
        self._rows.append(encoded)

    def add(self, sample_id: str, topk_ids_TK, topk_logprobs_TK, taken_logprobs_T, tail_logprobs_T) -> None:
        self.append(self.encode(sample_id, topk_ids_TK, topk_logprobs_TK, taken_logprobs_T, tail_logprobs_T))

    def __len__(self) -> int:
        return len(self._rows)

    def table(self) -> pa.Table:
        rows = self._rows
        return pa.table(
            {
                "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
                "num_positions": pa.array([r.num_positions for r in rows], pa.int32()),
                "topk_ids": pa.array([r.topk_ids for r in rows], pa.binary()),
                "topk_logprobs": pa.array([r.topk_logprobs for r in rows], pa.binary()),
                "taken_logprobs": pa.array([r.taken_logprobs for r in rows], pa.list_(pa.float32())),
                "tail_logprobs": pa.array([r.tail_logprobs for r in rows], pa.list_(pa.float32())),
            },
            schema=SCORE_SCHEMA,
        )

    def metadata(self, producer: Mapping[str, Any], extra_meta: Mapping[str, Any] | None = None) -> dict:
        return {
            "format": SCORE_FORMAT,
            "version": FORMAT_VERSION,
            "producer": dict(producer),
            "top_k": self.top_k,
            "vocab_size": self.codec.vocab_size,
            "codec": self.codec.name,
            "id_bytes": self.codec.id_bytes,
            "logprob_step": self.codec.step,
            "temperature": self.temperature,
            **(extra_meta or {}),
        }

    def write(
        self,
        fs: pafs.FileSystem,
        path: str,
        producer: Mapping[str, Any],
        extra_meta: Mapping[str, Any] | None = None,
        zstd_level: int = 3,
    ) -> int:
        return _write_parquet(fs, path, self.table(), self.metadata(producer, extra_meta), zstd_level)


# ---------------------------------------------------------------------------------------- reading


def _open(
    fs: pafs.FileSystem, path: str, fmt: str, schema: pa.Schema | dict[int, pa.Schema], expect: Mapping[str, Any] | None
) -> tuple[pa.Table, dict]:
    """(table, metadata) of a shard, checked; `schema`: the format's columns, or per version."""
    if not storage.exists(fs, path):
        raise FormatError(f"{path}: no such shard; run the stage that writes it first")
    try:
        pf = pq.ParquetFile(fs.open_input_file(path), page_checksum_verification=True)
        raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
        table = pf.read() if raw is not None else None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise FormatError(
            f"{path}: corrupt or not a Parquet file ({first_line(e)}); delete it and re-run the stage that writes it"
        ) from None
    if raw is None:
        raise FormatError(f"{path}: not an opd shard (no 'opd' metadata); it was not written by opd")
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: unreadable 'opd' metadata; delete the file and re-run its stage")
    if meta.get("format") != fmt:
        raise FormatError(f"{path}: holds {meta.get('format')!r}, expected {fmt!r}")
    version = meta.get("version")
    if version not in SUPPORTED_VERSIONS[fmt]:
        raise FormatError(
            f"{path}: {fmt} version {version!r} is not one this opd reads "
            f"({sorted(SUPPORTED_VERSIONS[fmt])}); use the opd that wrote it or re-run the stage"
        )
    if isinstance(schema, dict):
        schema = schema[version]
    if not table.schema.remove_metadata().equals(schema):
        missing = sorted(set(schema.names) - set(table.schema.names))
        raise FormatError(
            f"{path}: columns do not match {fmt} v{version}"
            + (f" (missing {', '.join(missing)})" if missing else " (wrong types)")
        )
    if meta.get("content") != _content_totals(table):
        raise FormatError(
            f"{path}: content does not match the counts recorded when it was written (corrupt); "
            f"delete it and re-run the stage that writes it"
        )
    check_producer(path, meta.get("producer", {}), expect)
    return table, meta


def read_shard_meta(fs: pafs.FileSystem, path: str) -> dict:
    """A shard's 'opd' metadata from its Parquet footer alone (no data pages read): for the producer
    checks that decide whether a shard left by an earlier run is kept. One-line FormatError if unreadable."""
    try:
        with fs.open_input_file(path) as f:
            raw = (pq.read_schema(f).metadata or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw is not None else None
    except (pa.ArrowException, OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: not an opd shard (no readable 'opd' metadata); delete it and re-run its stage")
    return meta


def check_producer(path: str, producer: Mapping[str, Any], expect: Mapping[str, Any] | None) -> None:
    """Raise FingerprintMismatch if any expected producer field differs (a one-line error naming both)."""
    for key, want in (expect or {}).items():
        got = producer.get(key)
        if got != want:
            raise FingerprintMismatch(
                f"{path}: produced with {key}={short_value(got)}, expected {key}={short_value(want)}; "
                f"re-run the stage that writes it with --force, or point at the matching run"
            )


def read_rollout_shard(
    fs: pafs.FileSystem, path: str, expect: Mapping[str, Any] | None = None
) -> tuple[pa.Table, dict]:
    """(table, metadata) of a rollout shard, checked."""
    table, meta = _open(fs, path, ROLLOUT_FORMAT, {1: ROLLOUT_SCHEMA_V1, 2: ROLLOUT_SCHEMA}, expect)
    if meta["version"] == 1:
        table = table.append_column(ROLLOUT_SCHEMA.field("teacher_context"), pa.nulls(len(table), pa.string()))
    ids = table.column("sample_id")
    if len(set(ids.to_pylist())) != len(ids):
        raise FormatError(f"{path}: duplicate sample_id values; delete the shard and re-run rollout")
    return table, meta


@dataclass(frozen=True)
class TeacherTopK:
    """Decoded teacher scores for one sample."""

    sample_id: str
    topk_ids_TK: np.ndarray  # int64, sorted ascending per position
    topk_logprobs_TK: np.ndarray  # float32, aligned with topk_ids_TK
    taken_logprobs_T: np.ndarray  # float32, exact
    tail_logprobs_T: np.ndarray  # float32, log of the mass outside the top-k


class ScoreShard:
    """A checked score shard; decodes one sample at a time (cheap to hold, cheap to index)."""

    def __init__(self, fs: pafs.FileSystem, path: str, expect: Mapping[str, Any] | None = None):
        self.path = path
        self.table, self.meta = _open(fs, path, SCORE_FORMAT, SCORE_SCHEMA, expect)
        try:
            self.top_k = int(self.meta["top_k"])
            self.vocab_size = int(self.meta["vocab_size"])
            self.codec = make_codec(self.meta["codec"], self.vocab_size)
        except (KeyError, TypeError, ValueError):
            raise FormatError(
                f"{path}: score metadata lacks valid top_k/vocab_size/codec entries; delete it and re-run score"
            ) from None
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        self.sample_ids: list[str] = self.table.column("sample_id").to_pylist()
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}
        if len(self._index) != len(self.sample_ids):
            raise FormatError(f"{path}: duplicate sample_id values; delete the shard and re-run score")
        self._T = self.table.column("num_positions").to_numpy()
        self._ids = self.table.column("topk_ids")
        self._lps = self.table.column("topk_logprobs")
        self._taken = self.table.column("taken_logprobs")
        self._tail = self.table.column("tail_logprobs")

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __iter__(self) -> Iterator[TeacherTopK]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> TeacherTopK:
        T = int(self._T[i])
        sid = self.sample_ids[i]
        taken = np.asarray(self._taken[i].values, dtype=np.float32)
        tail = np.asarray(self._tail[i].values, dtype=np.float32)
        try:
            if taken.shape[0] != T or tail.shape[0] != T:
                raise FormatError(f"taken/tail have {taken.shape[0]}/{tail.shape[0]} entries, expected {T}")
            ids, lps = self.codec.decode(self._ids[i].as_py(), self._lps[i].as_py(), T, self.top_k)
        except FormatError as e:
            raise FormatError(
                f"{self.path}: sample {sid!r} is corrupt ({e}); delete the shard and re-run score"
            ) from None
        return TeacherTopK(sid, ids, lps, taken, tail)

    def by_id(self, sample_id: str) -> TeacherTopK:
        try:
            return self[self._index[sample_id]]
        except KeyError:
            raise FormatError(f"{self.path}: no scores for sample {sample_id!r}; re-run score") from None

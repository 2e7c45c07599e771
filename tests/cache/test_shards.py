"""Rollout and score shards on a real local filesystem: round trips, checking readers, atomic writes."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.cache import shards, storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError

PRODUCER = {
    "stage": "rollout",
    "model_hash": "a" * 64,
    "tokenizer_hash": "b" * 64,
    "config_hash": "c1",
    "format_version": 1,
}
SCORE_PRODUCER = {"stage": "score", "model_hash": "d" * 64, "rollout_sha256": "e" * 64}


@pytest.fixture
def fs():
    return pafs.LocalFileSystem()


def rollout_rows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        T = int(rng.integers(0, 30))
        source = ("student", "dataset", "teacher")[i % 3]
        rows.append(
            dict(
                sample_id=f"q{i // 2}/{i % 2}",
                prompt_id=f"q{i // 2}",
                sample_index=i % 2,
                source=source,
                prompt_ids=rng.integers(0, 2**31 - 1, size=int(rng.integers(1, 20))).tolist(),
                completion_ids=rng.integers(0, 50_000, size=T).tolist(),
                sampling_logprobs=None
                if source == "dataset"
                else (-rng.exponential(1.0, T)).astype(np.float32).tolist(),
                finish_reason={"student": "stop", "dataset": "reference", "teacher": "length"}[source],
                sampling_hash="f" * 64,
                prompt_messages=json.dumps([{"role": "user", "content": f"prompt {i} ü 🎉"}]) if i % 2 else None,
                teacher_context=f"context {i} ü" if i % 3 else None,
            )
        )
    return rows


def score_samples(vocab=300, K=8, n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 0 if i == 0 else int(rng.integers(1, 25))
        ids = np.stack([rng.choice(vocab, K, replace=False) for _ in range(T)]) if T else np.zeros((0, K), np.int64)
        lps = (-rng.exponential(2.0, (T, K))).astype(np.float32)
        taken = (-rng.exponential(1.0, T)).astype(np.float32)
        tail = (-rng.exponential(1.0, T)).astype(np.float32)
        if T:
            tail[-1] = -np.inf
        out.append((f"q{i}/0", ids, lps, taken, tail))
    return out


def write_scores(fs, path, samples, vocab=300, K=8, bits=8, producer=SCORE_PRODUCER, extra_meta=None, temperature=1.0):
    w = shards.ScoreShardWriter(vocab, K, logprob_bits=bits, temperature=temperature)
    for s in samples:
        w.add(*s)
    return w.write(fs, path, producer, extra_meta=extra_meta)


def assert_one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ round trips


def test_rollout_roundtrip(fs, tmp_path):
    path = str(tmp_path / "r" / "part-00000.parquet")
    rows = rollout_rows()
    size = shards.write_rollout_shard(fs, path, rows, PRODUCER, extra_meta={"round": 3})
    assert size == os.path.getsize(path) > 0
    table, meta = shards.read_rollout_shard(fs, path, expect={"model_hash": "a" * 64, "stage": "rollout"})
    assert table.schema.remove_metadata().equals(shards.ROLLOUT_SCHEMA)
    got = table.to_pylist()
    assert len(got) == len(rows)
    for want, row in zip(rows, got):
        for key in (
            "sample_id",
            "prompt_id",
            "sample_index",
            "source",
            "prompt_ids",
            "completion_ids",
            "finish_reason",
            "sampling_hash",
            "prompt_messages",
            "teacher_context",
        ):
            assert row[key] == want.get(key), key
        if want["sampling_logprobs"] is None:
            assert row["sampling_logprobs"] is None
        else:
            np.testing.assert_array_equal(np.float32(row["sampling_logprobs"]), np.float32(want["sampling_logprobs"]))
    assert meta["format"] == "opd.rollouts"
    assert meta["version"] == shards.ROLLOUT_VERSION == 2
    assert meta["producer"] == PRODUCER
    assert meta["round"] == 3
    raw = pq.ParquetFile(path).schema_arrow.metadata[b"opd"]
    assert json.loads(raw) == meta


def test_empty_rollout_shard(fs, tmp_path):
    path = str(tmp_path / "empty.parquet")
    shards.write_rollout_shard(fs, path, [], PRODUCER)
    table, _ = shards.read_rollout_shard(fs, path)
    assert table.num_rows == 0


def test_rollout_writer_rejects_bad_source(fs, tmp_path):
    rows = rollout_rows(1)
    rows[0]["source"] = "oracle"
    with pytest.raises(ValueError, match="source"):
        shards.write_rollout_shard(fs, str(tmp_path / "x.parquet"), rows, PRODUCER)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bits", [8, 16, 32])
@pytest.mark.parametrize("vocab", [300, 70_000])
def test_score_roundtrip(fs, tmp_path, bits, vocab):
    path = str(tmp_path / "s" / "part-00000.parquet")
    samples = score_samples(vocab=vocab)
    write_scores(fs, path, samples, vocab=vocab, bits=bits, temperature=0.7, extra_meta={"round": 1})
    shard = shards.ScoreShard(fs, path, expect={"model_hash": "d" * 64})
    codec = shard.codec
    assert (len(shard), shard.top_k, shard.vocab_size, shard.temperature) == (len(samples), 8, vocab, 0.7)
    assert shard.sample_ids == [s[0] for s in samples]
    m = shard.meta
    assert (m["format"], m["version"], m["producer"], m["round"]) == ("opd.scores", 1, SCORE_PRODUCER, 1)
    assert (m["codec"], m["id_bytes"], m["logprob_step"]) == (f"delta-q{bits}", 2 if vocab <= 65536 else 4, codec.step)
    for (sid, ids, lps, taken, tail), got in zip(samples, shard):
        assert got.sample_id == sid
        assert got.topk_ids_TK.shape == ids.shape
        for t in range(ids.shape[0]):
            order = np.argsort(ids[t])
            assert got.topk_ids_TK[t].tolist() == ids[t][order].tolist()
            want = np.maximum(lps[t][order], codec.logprob_floor)  # below the floor decodes to it
            assert np.all(np.abs(got.topk_logprobs_TK[t] - want) <= codec.max_abs_error)
        np.testing.assert_array_equal(got.taken_logprobs_T, taken)
        np.testing.assert_array_equal(got.tail_logprobs_T, tail)
    assert shard.by_id(samples[2][0]).sample_id == samples[2][0]
    np.testing.assert_array_equal(shard.by_id(samples[3][0]).taken_logprobs_T, samples[3][3])
    with pytest.raises(FormatError, match="no scores for sample") as e:
        shard.by_id("nope/0")
    assert_one_line_naming(e, path)


def test_score_writer_checks_shapes():
    with pytest.raises(ValueError, match="top_k"):
        shards.ScoreShardWriter(10, 11)
    with pytest.raises(ValueError, match="top_k"):
        shards.ScoreShardWriter(10, 0)
    w = shards.ScoreShardWriter(100, 4)
    ids = np.array([[1, 2, 3, 4]] * 3)
    with pytest.raises(ValueError, match=r"\[T, 4\]"):
        w.encode("s", ids[:, :3], np.zeros((3, 3)), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="T=3"):
        w.encode("s", ids, np.zeros((3, 4)), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="T=3"):
        w.encode("s", ids, np.zeros((3, 4)), np.zeros(3), np.zeros(4))
    enc = w.encode("s", ids, np.zeros((3, 4)), np.zeros(3), np.zeros(3))
    assert len(w) == 0  # encode is pure
    w.append(enc)
    assert len(w) == 1


# ------------------------------------------------------------------------------------------ refusals


def test_missing_file(fs, tmp_path):
    path = str(tmp_path / "nope.parquet")
    with pytest.raises(FormatError, match="no such shard") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)
    with pytest.raises(FormatError) as e:
        shards.ScoreShard(fs, path)
    assert_one_line_naming(e, path)


_NOISE = np.random.default_rng(7).bytes(4096)  # fixed bytes: the same test ids in every collecting process


@pytest.mark.parametrize(
    "content", [_NOISE, b"", b"PAR1", b"PAR1" + _NOISE[:100] + b"PAR1"], ids=["noise", "empty", "magic", "magic-noise"]
)
def test_not_parquet(fs, tmp_path, content):
    path = tmp_path / "junk.parquet"
    path.write_bytes(content)
    with pytest.raises(FormatError, match="corrupt or not a Parquet file") as e:
        shards.read_rollout_shard(fs, str(path))
    assert_one_line_naming(e, path)
    with pytest.raises(FormatError, match="corrupt or not a Parquet file") as e:
        shards.ScoreShard(fs, str(path))
    assert_one_line_naming(e, path)


def test_parquet_without_opd_metadata(fs, tmp_path):
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist(rollout_rows(), schema=shards.ROLLOUT_SCHEMA), path)
    with pytest.raises(FormatError, match="not an opd shard") as e:
        shards.read_rollout_shard(fs, str(path))
    assert_one_line_naming(e, path)


def _rewrite_meta(path, edit):
    """Rewrite a shard's `opd` metadata with pyarrow (the data untouched)."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"opd"])
    new = edit(meta)
    raw = new if isinstance(new, bytes) else json.dumps(new).encode()
    pq.write_table(table.replace_schema_metadata({b"opd": raw}), path)


def test_unknown_version(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    shards.write_rollout_shard(fs, path, rollout_rows(), PRODUCER)
    _rewrite_meta(path, lambda m: {**m, "version": 99})
    with pytest.raises(FormatError, match="version 99") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)

    spath = str(tmp_path / "scores.parquet")
    write_scores(fs, spath, score_samples())
    _rewrite_meta(spath, lambda m: {**m, "version": 99})
    with pytest.raises(FormatError, match="version 99") as e:
        shards.ScoreShard(fs, spath)
    assert_one_line_naming(e, spath)


def test_version_check_not_fooled_by_equal_looking_values(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    shards.write_rollout_shard(fs, path, rollout_rows(), PRODUCER)
    for bad in ("2", None, 3):
        _rewrite_meta(path, lambda m: {**m, "version": bad})
        with pytest.raises(FormatError, match="version") as e:
            shards.read_rollout_shard(fs, path)
        assert_one_line_naming(e, path)
    _rewrite_meta(path, lambda m: {**m, "version": 1})  # v1 is read, but a v1 shard has no teacher_context
    with pytest.raises(FormatError, match="columns do not match opd.rollouts v1") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)


def test_unreadable_opd_metadata(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    shards.write_rollout_shard(fs, path, rollout_rows(), PRODUCER)
    _rewrite_meta(path, lambda m: b"{not json")
    with pytest.raises(FormatError, match="unreadable 'opd' metadata") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)


def test_opd_metadata_not_an_object(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    shards.write_rollout_shard(fs, path, rollout_rows(), PRODUCER)
    _rewrite_meta(path, lambda m: b"[1]")
    with pytest.raises(FormatError):
        shards.read_rollout_shard(fs, path)


def test_wrong_format(fs, tmp_path):
    rpath = str(tmp_path / "rollouts.parquet")
    shards.write_rollout_shard(fs, rpath, rollout_rows(), PRODUCER)
    with pytest.raises(FormatError, match="'opd.rollouts', expected 'opd.scores'") as e:
        shards.ScoreShard(fs, rpath)
    assert_one_line_naming(e, rpath)
    spath = str(tmp_path / "scores.parquet")
    write_scores(fs, spath, score_samples())
    with pytest.raises(FormatError, match="'opd.scores', expected 'opd.rollouts'") as e:
        shards.read_rollout_shard(fs, spath)
    assert_one_line_naming(e, spath)


def test_wrong_columns(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    table = pa.Table.from_pylist(rollout_rows(), schema=shards.ROLLOUT_SCHEMA).drop_columns(["sampling_hash"])
    meta = {"format": "opd.rollouts", "version": 1, "producer": PRODUCER}
    pq.write_table(table.replace_schema_metadata({b"opd": json.dumps(meta).encode()}), path)
    with pytest.raises(FormatError, match="missing sampling_hash") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)
    # same names, another type
    table = pa.Table.from_pylist(rollout_rows(), schema=shards.ROLLOUT_SCHEMA)
    table = table.set_column(
        2, pa.field("sample_index", pa.int64(), nullable=False), table.column("sample_index").cast(pa.int64())
    )
    pq.write_table(table.replace_schema_metadata({b"opd": json.dumps(meta).encode()}), path)
    with pytest.raises(FormatError, match="wrong types") as e:
        shards.read_rollout_shard(fs, path)
    assert_one_line_naming(e, path)


def test_producer_mismatch(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    shards.write_rollout_shard(fs, path, rollout_rows(), PRODUCER)
    with pytest.raises(FingerprintMismatch) as e:
        shards.read_rollout_shard(fs, path, expect={"stage": "rollout", "config_hash": "c2"})
    msg = assert_one_line_naming(e, path)
    assert "config_hash=c1" in msg and "config_hash=c2" in msg
    assert isinstance(e.value, OpdError)
    # 64-hex hashes are shortened to 16 characters, both named
    with pytest.raises(FingerprintMismatch) as e:
        shards.read_rollout_shard(fs, path, expect={"model_hash": "9" * 64})
    msg = assert_one_line_naming(e, path)
    assert "model_hash=" + "a" * 16 in msg and "model_hash=" + "9" * 16 in msg
    # a key the producer lacks
    with pytest.raises(FingerprintMismatch, match="rollout_sha256=None") as e:
        shards.read_rollout_shard(fs, path, expect={"rollout_sha256": "x"})
    assert_one_line_naming(e, path)
    # score shards check the same way
    spath = str(tmp_path / "scores.parquet")
    write_scores(fs, spath, score_samples())
    with pytest.raises(FingerprintMismatch) as e:
        shards.ScoreShard(fs, spath, expect={"rollout_sha256": "0" * 64})
    msg = assert_one_line_naming(e, spath)
    assert "e" * 16 in msg and "0" * 16 in msg


def test_duplicate_sample_ids_refused(fs, tmp_path):
    path = str(tmp_path / "part-00000.parquet")
    rows = rollout_rows(3)
    rows[2]["sample_id"] = rows[0]["sample_id"]
    with pytest.raises(ValueError, match="duplicate sample_id"):  # the writer refuses them up front
        shards.write_rollout_shard(fs, path, rows, PRODUCER)
    assert not os.path.exists(path)
    spath = str(tmp_path / "scores.parquet")
    samples = score_samples(n=3)
    samples[2] = (samples[0][0],) + samples[2][1:]
    write_scores(fs, spath, samples)
    with pytest.raises(FormatError, match="duplicate sample_id") as e:
        shards.ScoreShard(fs, spath)
    assert_one_line_naming(e, spath)


def test_score_metadata_refusals(fs, tmp_path):
    path = str(tmp_path / "scores.parquet")
    write_scores(fs, path, score_samples(), extra_meta={"codec": "delta-q7"})
    with pytest.raises(FormatError, match="unknown top-k codec 'delta-q7'") as e:
        shards.ScoreShard(fs, path)
    assert_one_line_naming(e, path)
    write_scores(fs, path, score_samples(), extra_meta={"top_k": None})
    with pytest.raises(FormatError, match="score metadata lacks valid") as e:
        shards.ScoreShard(fs, path)
    assert_one_line_naming(e, path)
    write_scores(fs, path, score_samples())
    _rewrite_meta(path, lambda m: {k: v for k, v in m.items() if k != "vocab_size"})
    with pytest.raises(FormatError, match="vocab_size") as e:
        shards.ScoreShard(fs, path)
    assert_one_line_naming(e, path)


def test_score_decode_refuses_inconsistent_rows(fs, tmp_path):
    path = str(tmp_path / "scores.parquet")
    samples = score_samples()
    write_scores(fs, path, samples, extra_meta={"top_k": 9})  # blobs hold K=8
    shard = shards.ScoreShard(fs, path)
    with pytest.raises(FormatError, match="is corrupt") as e:
        shard[1]
    msg = assert_one_line_naming(e, path)
    assert samples[1][0] in msg
    # taken/tail lists that disagree with num_positions
    table = pq.read_table(path)
    n = table.column("num_positions").to_pylist()
    n[1] += 1
    table = table.set_column(1, shards.SCORE_SCHEMA.field("num_positions"), pa.array(n, pa.int32()))
    meta = json.loads(table.schema.metadata[b"opd"])
    meta["top_k"] = 8
    pq.write_table(table.replace_schema_metadata({b"opd": json.dumps(meta).encode()}), path)
    shard = shards.ScoreShard(fs, path)
    shard[2]
    with pytest.raises(FormatError, match="taken/tail") as e:
        shard[1]
    assert_one_line_naming(e, path)


# ------------------------------------------------------------------------------------------ corruption


def _data_page_bytes(path):
    """Offsets of the last byte of every column chunk (page payload, covered by the page checksums)."""
    md = pq.ParquetFile(path).metadata
    out = []
    for rg in range(md.num_row_groups):
        for c in range(md.num_columns):
            cc = md.row_group(rg).column(c)
            start = cc.dictionary_page_offset or cc.data_page_offset
            out.append((cc.path_in_schema, start + cc.total_compressed_size - 1))
    return out


def _flip(path, offset, mask=0xFF):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= mask
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_byte_flip_in_page_data_detected(fs, tmp_path, mask):
    rpath = str(tmp_path / "rollouts.parquet")
    shards.write_rollout_shard(fs, rpath, rollout_rows(20), PRODUCER)
    spath = str(tmp_path / "scores.parquet")
    write_scores(fs, spath, score_samples())
    clean = {rpath: open(rpath, "rb").read(), spath: open(spath, "rb").read()}
    for path, read in (
        (rpath, lambda: shards.read_rollout_shard(fs, rpath)),
        (spath, lambda: shards.ScoreShard(fs, spath)),
    ):
        for column, offset in _data_page_bytes(path):
            open(path, "wb").write(clean[path])
            _flip(path, offset, mask)
            with pytest.raises(FormatError) as e:
                read()
            assert_one_line_naming(e, path)


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    fs = pafs.LocalFileSystem()
    d = tmp_path_factory.mktemp("clean")
    rpath = str(d / "rollouts.parquet")
    shards.write_rollout_shard(fs, rpath, rollout_rows(12), PRODUCER)
    spath = str(d / "scores.parquet")
    write_scores(fs, spath, score_samples())
    return {"rollouts": open(rpath, "rb").read(), "scores": open(spath, "rb").read()}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["rollouts", "scores"]), where=st.floats(0, 1, exclude_max=True))
def test_truncated_shard_refused(clean_shards, tmp_path, kind, where):
    fs = pafs.LocalFileSystem()
    data = clean_shards[kind]
    path = str(tmp_path / f"{kind}.parquet")
    with open(path, "wb") as f:
        f.write(data[: int(where * len(data))])
    with pytest.raises(FormatError) as e:
        if kind == "rollouts":
            shards.read_rollout_shard(fs, path)
        else:
            shards.ScoreShard(fs, path)
    assert_one_line_naming(e, path)


def test_bit_flip_in_footer_row_count_refused(fs, tmp_path, clean_shards):
    data = clean_shards["rollouts"]  # 12 rows; Thrift writes the row count as the zigzag varint 0x18
    footer_len = int.from_bytes(data[-8:-4], "little")
    footer_start = len(data) - 8 - footer_len
    candidates = [i for i in range(footer_start, len(data) - 8) if data[i] == 0x18]
    assert candidates
    path = str(tmp_path / "part-00000.parquet")
    for offset in candidates:
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x08  # 0x18 -> 0x10: 12 -> 8
        with open(path, "wb") as f:
            f.write(bytes(corrupt))
        try:
            table, _ = shards.read_rollout_shard(fs, path)
        except FormatError:
            continue
        assert table.num_rows == 12, f"flipping footer byte {offset} silently read {table.num_rows} of 12 rows"


# ------------------------------------------------------------------------------------------ atomic writes


def test_no_tmp_files_left(fs, tmp_path):
    folder = tmp_path / "stage"
    shards.write_rollout_shard(fs, str(folder / "part-00000.parquet"), rollout_rows(), PRODUCER)
    write_scores(fs, str(folder / "part-00001.parquet"), score_samples())
    storage.atomic_write_bytes(fs, str(folder / "_DONE.json"), b"{}")
    assert sorted(os.listdir(folder)) == ["_DONE.json", "part-00000.parquet", "part-00001.parquet"]
    # overwriting an existing shard replaces it whole
    shards.write_rollout_shard(fs, str(folder / "part-00000.parquet"), rollout_rows(2), PRODUCER)
    assert sorted(os.listdir(folder)) == ["_DONE.json", "part-00000.parquet", "part-00001.parquet"]
    assert shards.read_rollout_shard(fs, str(folder / "part-00000.parquet"))[0].num_rows == 2


def test_tmp_name_is_beside_the_target():
    name = storage.tmp_name("/a/b/part-00003.parquet")
    folder, base = os.path.split(name)
    assert folder == "/a/b"
    assert base.startswith(".tmp-part-00003.parquet.")
    assert storage.tmp_name("/a/b/x") != storage.tmp_name("/a/b/x")


def test_remove_tmp_files(fs, tmp_path):
    folder = str(tmp_path)
    leftovers = {
        n: storage.tmp_name(f"{folder}/{n}")
        for n in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "_DONE.json")
    }
    for p in leftovers.values():
        open(p, "wb").write(b"partial")
    second = storage.tmp_name(f"{folder}/part-00000.parquet")
    open(second, "wb").write(b"partial")
    keep = ["part-00000.parquet", "notes.txt", ".hidden"]
    for n in keep:
        open(os.path.join(folder, n), "wb").write(b"x")

    removed = storage.remove_tmp_files(fs, folder, {"part-00000.parquet", "part-00002.parquet"})
    assert removed == 3
    left = set(os.listdir(folder))
    assert left == set(keep) | {
        os.path.basename(leftovers["part-00001.parquet"]),
        os.path.basename(leftovers["_DONE.json"]),
    }
    # without names: every leftover goes, nothing else
    assert storage.remove_tmp_files(fs, folder) == 2
    assert set(os.listdir(folder)) == set(keep)
    assert storage.remove_tmp_files(fs, str(tmp_path / "missing")) == 0


def test_storage_helpers(fs, tmp_path):
    f, path = storage.resolve(str(tmp_path / "a"))
    assert isinstance(f, pafs.LocalFileSystem) and path == str(tmp_path / "a")
    assert storage.resolve("file://" + str(tmp_path))[1] == str(tmp_path)
    storage.atomic_write_bytes(fs, storage.join(path, "b", "c.bin"), b"hello")
    assert storage.read_bytes(fs, str(tmp_path / "a" / "b" / "c.bin")) == b"hello"
    assert storage.listdir(fs, path) == ["b"]
    assert storage.listdir(fs, str(tmp_path / "nope")) == []
    import hashlib

    assert storage.sha256_file(fs, str(tmp_path / "a" / "b" / "c.bin")) == (hashlib.sha256(b"hello").hexdigest(), 5)
    storage.remove(fs, path)
    assert not storage.exists(fs, path)

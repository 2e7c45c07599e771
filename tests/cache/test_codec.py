"""Property tests for the top-k codec `delta-q{bits}` (cache/codec.py, SPEC.md "Codec")."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from opd.cache.codec import DeltaQuantCodec, id_bytes_for_vocab, make_codec
from opd.cache.errors import FormatError

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BITS = (8, 16, 32)

# Log-probs a teacher can hand over: ordinary, on the quantisation grid, half-way between grid
# points, around both floors, hugely negative, -inf, and both zeros.
SPECIAL_LOGPROBS = [
    0.0,
    -0.0,
    -1e-30,
    -1 / 32,
    -3 / 32,
    -1 / 4096,
    -0.5,
    -1.0,
    -15.9375,
    -15.94,
    -15.96,
    -16.0,
    -31.99951171875,
    -31.9996,
    -32.0,
    -100.0,
    -1e4,
    -1e30,
    -math.inf,
]

vocabs = st.one_of(
    st.integers(1, 300),
    st.integers(65530, 65540),  # the id_bytes 2 -> 4 boundary
    st.integers(1, 200_000),
)
logprob_values = st.one_of(
    st.sampled_from(SPECIAL_LOGPROBS),
    st.floats(max_value=0.0, allow_nan=False, allow_infinity=True, width=32),
)


@st.composite
def topk_cases(draw, max_cells=40_000):
    """(vocab, ids [T, K] distinct per row, float32 logprobs [T, K]); K <= vocab, T may be 0."""
    vocab = draw(vocabs)
    K = draw(st.integers(1, vocab))
    T = draw(st.integers(0, max(0, min(6, max_cells // K))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if K == vocab:
        rows = [rng.permutation(vocab) for _ in range(T)]
    else:
        rows = [rng.choice(vocab, size=K, replace=False) for _ in range(T)]
    ids = np.stack(rows) if T else np.zeros((0, K), np.int64)
    if T and K >= 2 and draw(st.booleans()):  # the extreme ids 0 and vocab-1 (largest/smallest gaps)
        for slot, extreme in ((0, vocab - 1), (1, 0)):
            if extreme not in ids[0]:
                others = [j for j in range(K) if ids[0, j] not in (0, vocab - 1)]
                ids[0, others[0]] = extreme
    assert T == 0 or all(len(set(r.tolist())) == K for r in ids)
    ids = ids.astype(draw(st.sampled_from([np.int64, np.int32, np.uint32])))
    scale = draw(st.sampled_from([0.05, 2.0, 40.0]))
    lps = (-rng.exponential(scale, size=(T, K))).astype(np.float32)
    specials = draw(st.lists(logprob_values, max_size=12))
    if T:
        for v in specials:
            lps[rng.integers(T), rng.integers(K)] = v
    return vocab, ids, lps


def _check_roundtrip(codec, ids, lps, got_ids, got_lps):
    T, K = ids.shape
    assert got_ids.shape == (T, K) and got_lps.shape == (T, K)
    assert got_ids.dtype == np.int64 and got_lps.dtype == np.float32
    for t in range(T):
        row = got_ids[t]
        # ids: the same set, sorted ascending
        assert np.all(np.diff(row) > 0)
        assert sorted(ids[t].tolist()) == row.tolist()
        # logprobs: aligned with the sorted ids
        want = dict(zip(ids[t].tolist(), lps[t].astype(np.float64).tolist()))
        for i, got in zip(row.tolist(), got_lps[t].astype(np.float64).tolist()):
            exact = want[i]
            if codec.logprob_bits == 32:
                assert got == exact
            elif exact >= codec.logprob_floor:
                assert abs(got - exact) <= codec.max_abs_error, (i, exact, got)
                assert got <= 0.0
            else:
                assert got == codec.logprob_floor, (i, exact, got)


@SETTINGS
@given(case=topk_cases(), bits=st.sampled_from(BITS))
def test_roundtrip(case, bits):
    vocab, ids, lps = case
    codec = DeltaQuantCodec(vocab, bits)
    assert codec.id_bytes == (2 if vocab <= 65536 else 4)
    ids_blob, lps_blob = codec.encode(ids, lps)
    T, K = ids.shape
    assert len(ids_blob) == T * K * codec.id_bytes
    assert len(lps_blob) == T * K * {8: 1, 16: 2, 32: 4}[bits]
    got_ids, got_lps = codec.decode(ids_blob, lps_blob, T, K)
    _check_roundtrip(codec, ids, lps, got_ids, got_lps)


@SETTINGS
@given(vocab=st.integers(1, 200_000), K=st.integers(0, 5), bits=st.sampled_from(BITS))
def test_empty_rows(vocab, K, bits):
    codec = DeltaQuantCodec(vocab, bits)
    ids_blob, lps_blob = codec.encode(np.zeros((0, K), np.int64), np.zeros((0, K), np.float32))
    assert (ids_blob, lps_blob) == (b"", b"")
    ids, lps = codec.decode(b"", b"", 0, K)
    assert ids.shape == (0, K) and lps.shape == (0, K)


@SETTINGS
@given(logprobs=st.lists(logprob_values, min_size=1, max_size=64))
def test_bits32_is_exact(logprobs):
    lps = np.array([logprobs], np.float32)
    K = lps.shape[1]
    ids = np.arange(K)[None, ::-1].copy()  # reversed: decode reorders them
    codec = DeltaQuantCodec(K, 32)
    assert codec.logprob_floor == -math.inf
    got_ids, got_lps = codec.decode(*codec.encode(ids, lps), 1, K)
    assert got_ids[0].tolist() == list(range(K))
    np.testing.assert_array_equal(got_lps[0], lps[0, ::-1])


@pytest.mark.parametrize("bits, step, floor", [(8, 1 / 16, -255 / 16), (16, 1 / 2048, -65535 / 2048)])
def test_quantisation_constants(bits, step, floor):
    codec = DeltaQuantCodec(1000, bits)
    assert codec.name == f"delta-q{bits}"
    assert codec.step == step
    assert codec.max_abs_error == step / 2
    assert codec.logprob_floor == floor
    # -inf, the floor itself, and far below it all decode to the floor; 0 decodes to 0.
    lps = np.array([[-math.inf, floor, -1e4, 0.0, -step / 2 * 0.99]], np.float32)
    ids = np.array([[0, 1, 2, 3, 4]])
    _, got = codec.decode(*codec.encode(ids, lps), 1, 5)
    assert got[0].tolist() == [floor, floor, floor, 0.0, 0.0]


def test_id_bytes_boundary():
    assert id_bytes_for_vocab(65536) == 2
    assert id_bytes_for_vocab(65537) == 4
    # the largest id of a 65536 vocabulary still fits 2 bytes exactly
    codec = DeltaQuantCodec(65536, 8)
    ids = np.array([[65535, 0], [1, 65534]])
    got, _ = codec.decode(*codec.encode(ids, np.zeros((2, 2), np.float32)), 2, 2)
    assert got.tolist() == [[0, 65535], [1, 65534]]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bits", BITS)
def test_nan_rejected(bits):
    codec = DeltaQuantCodec(10, bits)
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(np.array([[1, 2]]), np.array([[-1.0, math.nan]]))


@SETTINGS
@given(
    vocab=st.integers(1, 200_000),
    bad=st.one_of(st.integers(min_value=-(2**40), max_value=-1), st.integers(min_value=0, max_value=2**40)),
    bits=st.sampled_from(BITS),
)
def test_ids_out_of_range_rejected(vocab, bad, bits):
    if 0 <= bad < vocab:
        bad = vocab + bad  # make it out of range
    codec = DeltaQuantCodec(vocab, bits)
    with pytest.raises(ValueError, match="token ids must lie in"):
        codec.encode(np.array([[bad]], np.int64), np.array([[-1.0]]))


@SETTINGS
@given(vocab=st.integers(2, 200_000), K=st.integers(2, 20), data=st.data())
def test_duplicate_ids_rejected(vocab, K, data):
    K = min(K, vocab)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ids = np.stack([rng.choice(vocab, size=K, replace=False) for _ in range(3)])
    t = data.draw(st.integers(0, 2))
    i, j = data.draw(st.lists(st.integers(0, K - 1), min_size=2, max_size=2, unique=True))
    ids[t, j] = ids[t, i]
    with pytest.raises(ValueError, match="distinct"):
        DeltaQuantCodec(vocab, 8).encode(ids, np.full(ids.shape, -1.0, np.float32))


@pytest.mark.parametrize(
    "ids_shape, lps_shape", [((2, 3), (2, 4)), ((2, 3), (3, 3)), ((6,), (6,)), ((2, 3), (6,)), ((1, 2, 3), (1, 2, 3))]
)
def test_mismatched_shapes_rejected(ids_shape, lps_shape):
    ids = np.arange(int(np.prod(ids_shape))).reshape(ids_shape)
    with pytest.raises(ValueError, match="expected two"):
        DeltaQuantCodec(100, 8).encode(ids, np.zeros(lps_shape, np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="logprob_bits"):
        DeltaQuantCodec(100, 4)
    with pytest.raises(ValueError, match="vocab_size"):
        DeltaQuantCodec(0, 8)


@pytest.mark.parametrize("bits", BITS)
def test_make_codec_known_names(bits):
    codec = make_codec(f"delta-q{bits}", 70_000)
    assert isinstance(codec, DeltaQuantCodec)
    assert (codec.logprob_bits, codec.vocab_size, codec.id_bytes) == (bits, 70_000, 4)


@pytest.mark.parametrize("name", ["delta-q4", "zstd", "", "DELTA-Q8", "delta-q8 "])
def test_make_codec_unknown_name(name):
    with pytest.raises(FormatError, match="unknown top-k codec"):
        make_codec(name, 100)


@SETTINGS
@given(
    case=topk_cases(max_cells=2_000),
    bits=st.sampled_from(BITS),
    which=st.sampled_from(["ids", "lps", "both"]),
    data=st.data(),
)
def test_truncated_blob_rejected(case, bits, which, data):
    vocab, ids, lps = case
    assume(ids.size > 0)
    codec = DeltaQuantCodec(vocab, bits)
    ids_blob, lps_blob = codec.encode(ids, lps)
    if which in ("ids", "both"):
        ids_blob = ids_blob[: data.draw(st.integers(0, len(ids_blob) - 1))]
    if which in ("lps", "both"):
        lps_blob = lps_blob[: data.draw(st.integers(0, len(lps_blob) - 1))]
    with pytest.raises(FormatError, match="bytes, expected"):
        codec.decode(ids_blob, lps_blob, *ids.shape)


def test_wrong_shape_on_decode_rejected():
    codec = DeltaQuantCodec(1000, 8)
    ids = np.array([[1, 5, 9], [2, 3, 4]])
    blobs = codec.encode(ids, np.zeros((2, 3), np.float32))
    with pytest.raises(FormatError):
        codec.decode(*blobs, 3, 3)  # longer than written
    with pytest.raises(FormatError):
        codec.decode(b"", b"", 2, 3)


def test_decoded_id_outside_vocabulary_rejected():
    # A blob of the right length whose gaps sum past the vocabulary (e.g. written for a bigger vocab).
    big = DeltaQuantCodec(60_000, 8)
    blobs = big.encode(np.array([[10, 50_000]]), np.zeros((1, 2), np.float32))
    with pytest.raises(FormatError, match="outside the vocabulary"):
        DeltaQuantCodec(1_000, 8).decode(*blobs, 1, 2)

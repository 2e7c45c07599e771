"""Packing of the teacher's per-position top-k distributions into two byte strings per sample.

Shape legend: T = scored completion positions of one sample, K = top-k kept per position.
  topk_ids_TK       int    the teacher's K most likely token ids at each position
  topk_logprobs_TK  float  their log-probs (at the scoring temperature)

Codec `delta-q{bits}` (format v1), chosen by `benchmarks/bench_cache.py`:
  ids       Each position's K ids are sorted ascending and delta-coded: g_0 = id_0,
            g_j = id_j - id_{j-1} - 1 (>= 0, ids are distinct). Gaps are little-endian unsigned
            integers of `id_bytes` (2 when vocab <= 65536, else 4), and the bytes of the row are
            split into planes (all first bytes, then all second bytes, ...) so zstd sees the
            mostly-zero high bytes together. Decoding: id_j = sum_{i<=j} g_i + j. Exact.
  logprobs  In the same (id-sorted) order. bits=8/16: code = clip(round(-logprob / step), 0, 2^bits-1)
            with step = 1/16 (8 bits, floor -15.94) or 1/2048 (16 bits, floor -31.99); decoded as
            -code * step, so |error| <= step/2 above the floor, and values below the floor
            (probability < e^floor) decode to the floor. bits=32 stores float32 exactly.
            Byte planes as for ids.
Parquet's zstd then compresses the planes (the codec itself does no entropy coding).
"""

from __future__ import annotations

import numpy as np

from opd.cache.errors import FormatError

LOGPROB_STEPS = {8: 1.0 / 16.0, 16: 1.0 / 2048.0, 32: 0.0}


def id_bytes_for_vocab(vocab_size: int) -> int:
    return 2 if vocab_size <= 65536 else 4


def _split_planes(a: np.ndarray) -> bytes:
    """Little-endian bytes of `a`, regrouped as byte planes (byte 0 of every value, then byte 1, ...)."""
    width = a.dtype.itemsize
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)
    return raw.reshape(-1, width).T.tobytes()


def _join_planes(blob: bytes, dtype: np.dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("<")
    width = dtype.itemsize
    if len(blob) != count * width:
        raise FormatError(f"packed column has {len(blob)} bytes, expected {count * width}")
    planes = np.frombuffer(blob, dtype=np.uint8).reshape(width, count)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(-1)


class DeltaQuantCodec:
    """Top-k codec `delta-q{bits}`; one instance per (vocab, bits). Stateless and thread-safe."""

    def __init__(self, vocab_size: int, logprob_bits: int = 8):
        if logprob_bits not in LOGPROB_STEPS:
            raise ValueError(f"logprob_bits must be one of {sorted(LOGPROB_STEPS)}, got {logprob_bits}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.logprob_bits = int(logprob_bits)
        self.step = LOGPROB_STEPS[self.logprob_bits]
        self.id_bytes = id_bytes_for_vocab(self.vocab_size)
        self._gap_dtype = np.dtype(np.uint16 if self.id_bytes == 2 else np.uint32)
        self._code_dtype = np.dtype({8: np.uint8, 16: np.uint16, 32: np.float32}[self.logprob_bits])

    @property
    def name(self) -> str:
        return f"delta-q{self.logprob_bits}"

    @property
    def logprob_floor(self) -> float:
        """Smallest decodable log-prob (lower values decode to it); -inf for exact float32."""
        if self.logprob_bits == 32:
            return float("-inf")
        return -float((1 << self.logprob_bits) - 1) * self.step

    @property
    def max_abs_error(self) -> float:
        """Bound on |decoded - exact| for log-probs at or above `logprob_floor`."""
        return self.step / 2.0

    def encode(self, topk_ids_TK: np.ndarray, topk_logprobs_TK: np.ndarray) -> tuple[bytes, bytes]:
        ids = np.asarray(topk_ids_TK)
        lps = np.asarray(topk_logprobs_TK, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != lps.shape:
            raise ValueError(f"expected two [T, K] arrays of the same shape, got {ids.shape} and {lps.shape}")
        if ids.size == 0:
            return b"", b""
        ids = ids.astype(np.int64, copy=False)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if np.isnan(lps).any():
            raise ValueError("teacher log-probs contain NaN")
        order = np.argsort(ids, axis=1, kind="stable")
        ids_sorted = np.take_along_axis(ids, order, axis=1)
        gaps = np.empty_like(ids_sorted)
        gaps[:, 0] = ids_sorted[:, 0]
        gaps[:, 1:] = np.diff(ids_sorted, axis=1) - 1
        if ids.shape[1] > 1 and gaps[:, 1:].min() < 0:
            raise ValueError("top-k ids must be distinct within a position")
        lps_sorted = np.take_along_axis(lps, order, axis=1)
        if self.logprob_bits == 32:
            codes = lps_sorted
        else:
            top = (1 << self.logprob_bits) - 1
            neg = np.nan_to_num(-lps_sorted.astype(np.float64), posinf=top * self.step)
            codes = np.clip(np.rint(neg / self.step), 0, top)
        return _split_planes(gaps.astype(self._gap_dtype)), _split_planes(codes.astype(self._code_dtype))

    def decode(self, ids_blob: bytes, logprobs_blob: bytes, T: int, K: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (topk_ids_TK int64 sorted ascending per position, topk_logprobs_TK float32)."""
        count = T * K
        if count == 0:
            return np.zeros((T, K), np.int64), np.zeros((T, K), np.float32)
        gaps = _join_planes(ids_blob, self._gap_dtype, count).reshape(T, K).astype(np.int64)
        ids = np.cumsum(gaps, axis=1) + np.arange(K, dtype=np.int64)
        if ids[:, -1].max() >= self.vocab_size:
            raise FormatError(f"decoded token id {ids[:, -1].max()} outside the vocabulary ({self.vocab_size})")
        codes = _join_planes(logprobs_blob, self._code_dtype, count).reshape(T, K)
        if self.logprob_bits == 32:
            lps = codes.astype(np.float32)
        else:
            lps = (-codes.astype(np.float32)) * np.float32(self.step)
        return ids, lps


def make_codec(name: str, vocab_size: int) -> DeltaQuantCodec:
    """The codec a shard's metadata names; a new codec is one new class and one line here."""
    for bits in LOGPROB_STEPS:
        if name == f"delta-q{bits}":
            return DeltaQuantCodec(vocab_size, bits)
    raise FormatError(f"unknown top-k codec {name!r} (this opd knows delta-q8, delta-q16, delta-q32)")

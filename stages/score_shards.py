"""Score shards being made: a shard's rows packed (codec) as the teacher's batches arrive, written in
rollout row order, and the stage manifest's summary computed from the shards on disk.

Shape legend: N scored positions, K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, FormatError
from opd.cache.rundir import RunDir, parquet_rows, shard_name
from opd.cache.shards import ScoreShardWriter, check_producer, read_shard_meta
from opd.stages.scorer import BatchOut, Seq


@dataclass
class Totals:
    samples: int = 0
    positions: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    bytes_written: int = 0
    entropy_sum: float = 0.0
    topk_mass_sum: float = 0.0


class ShardPacker:
    """One shard being scored: its writer and the encoded rows, filled by the background thread."""

    def __init__(self, path: str, seqs: list[Seq], writer: ScoreShardWriter, producer: dict):
        self.path, self.seqs, self.writer, self.producer = path, seqs, writer, producer
        self.encoded: list = [None] * len(seqs)
        self.entropy_sums = np.zeros(len(seqs))
        self.mass_sums = np.zeros(len(seqs))
        for i, seq in enumerate(seqs):
            if seq.completion.size == 0:
                K = writer.top_k
                self.encoded[i] = writer.encode(
                    seq.sample_id, np.zeros((0, K), np.int64), np.zeros((0, K), np.float32), [], []
                )

    def pack(self, out: BatchOut) -> None:
        """(background) Split a batch's arrays per sample and encode them."""
        a = out.numpy()
        o = 0
        for r in out.rows:
            seq = self.seqs[r]
            T = seq.completion.size
            sl = slice(o, o + T)
            self.encoded[r] = self.writer.encode(
                seq.sample_id, a["topk_ids_NK"][sl], a["topk_logprobs_NK"][sl], a["taken_N"][sl], a["tail_N"][sl]
            )
            self.entropy_sums[r] = a["entropy_N"][sl].sum(dtype=np.float64)
            self.mass_sums[r] = a["topk_mass_N"][sl].sum(dtype=np.float64)
            o += T

    def write(self, run: RunDir, zstd_level: int, dtype: torch.dtype, engine: str) -> tuple[int, float, float]:
        """(background) Write the shard in rollout row order; returns (bytes, entropy sum, top-k mass sum)."""
        for enc in self.encoded:
            self.writer.append(enc)
        entropy, mass = math.fsum(self.entropy_sums), math.fsum(self.mass_sums)
        stats = {
            "positions": int(sum(s.completion.size for s in self.seqs)),
            "entropy_sum": entropy,
            "topk_mass_sum": mass,
            "teacher_dtype": str(dtype).removeprefix("torch."),
            "teacher_engine": engine,
        }
        size = self.writer.write(run.fs, self.path, self.producer, extra_meta={"stats": stats}, zstd_level=zstd_level)
        return size, entropy, mass


def stage_summary(run: RunDir, scores_dir: str, numbers: list[int], producers: dict, sc) -> dict | None:
    """The manifest's summary, from the shards themselves (the same whichever worker writes it); None
    while some shard is another producer's (a worker that has not run yet will replace it)."""
    samples = positions = size = 0
    entropy = mass = 0.0
    for s in numbers:
        path = storage.join(scores_dir, shard_name(s))
        try:
            meta = read_shard_meta(run.fs, path)
            check_producer(path, meta.get("producer", {}), producers[s])
        except (FormatError, FingerprintMismatch, ValueError):
            return None
        stats = meta.get("stats", {})
        samples += parquet_rows(run, path)
        positions += int(stats.get("positions", 0))
        entropy += float(stats.get("entropy_sum", 0.0))
        mass += float(stats.get("topk_mass_sum", 0.0))
        size += run.fs.get_file_info(path).size
    return {
        "samples": samples,
        "positions": positions,
        "bytes": size,
        "bytes_per_token": ratio(size, positions, 2),
        "mean_topk_mass": ratio(mass, positions, 6),
        "mean_entropy": ratio(entropy, positions, 6),
        "top_k": sc.top_k,
        "temperature": sc.temperature,
        "logprob_bits": sc.logprob_bits,
    }


def ratio(a: float, b: float, digits: int) -> float:
    return round(a / b, digits) if b else 0.0

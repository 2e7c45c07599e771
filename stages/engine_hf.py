"""The transformers rollout engine: batched `generate` with the sampling log-probs recorded on the fly.

The fallback where vLLM is not installed, and the reference the vLLM engine is checked against.

Sampling log-probs are of the processed distribution, log_softmax(top_p(top_k(logits / temperature))),
the one `generate` draws from (tokens outside the top-k / top-p set have -inf there; the sampled token
never does). The warpers are passed as our own LogitsProcessorList (temperature → top-k → top-p, the
order vLLM applies them) followed by a recorder that keeps log_softmax of the final processed scores
of the current step only and gathers the sampled token's entry at the next step. This is the same
quantity as log_softmax(generate(output_scores=True).scores), without holding [steps, rows, V]
floats (3.2 GB for a 49k vocabulary at 128 steps × 128 rows).

A completion ends at EOS (any of the tokenizer's and generation_config's EOS ids) or when its text
(special tokens skipped, as vLLM matches) first contains a stop string; the token that ended it is
kept. Prompts are left-padded and batched by length (at most `max_batch_rows` rows = prompts × n).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from opd.stages.devices import placement
from opd.stages.engine import Completion, Progress, Sampling


class HFEngine:
    """Serves one checkpoint (optionally + an unmerged PEFT LoRA adapter) with transformers."""

    name = "transformers"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        tokenizer_dir: str | os.PathLike | None = None,
        adapter_dir: str | os.PathLike | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_rows: int = 64,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.served = str(adapter_dir or model_dir)
        where = placement(device, dtype, "rollout device")
        self.device = where.device
        self.max_batch_rows = max_batch_rows
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=where.dtype)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.to(self.device).eval()
        eos = set()
        for v in (self.tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos.update(v if isinstance(v, (list, tuple)) else [v] if v is not None else [])
        self.eos_ids = sorted(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, seed: int, progress: Progress | None = None
    ) -> list[list[Completion]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        per_batch = max(1, self.max_batch_rows // sampling.n)
        results: list[list[Completion] | None] = [None] * len(prompts)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seeded here, the caller's RNG state untouched
            torch.manual_seed(seed)
            for start in range(0, len(order), per_batch):
                chunk = order[start : start + per_batch]
                outs = self._generate_batch([prompts[i] for i in chunk], sampling)
                for i, out in zip(chunk, outs):
                    results[i] = out
                if progress is not None:
                    progress(len(chunk), sum(len(c.token_ids) for out in outs for c in out))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[Sequence[int]], sampling: Sampling) -> list[list[Completion]]:
        from transformers import (
            GenerationConfig,
            LogitsProcessorList,
            StoppingCriteriaList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        n = sampling.n
        L = max(len(p) for p in prompts)
        ids_BL = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(prompts), L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every prompt ends at column L-1
            if len(p):
                ids_BL[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
                mask_BL[b, L - len(p) :] = 1
        ids_RL = ids_BL.repeat_interleave(n, 0).to(self.device)  # R = B × n rows, row r = prompt r // n
        mask_RL = mask_BL.repeat_interleave(n, 0).to(self.device)

        warpers = []
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
        recorder = _LogprobRecorder()
        finish = _FinishCriteria(L, ids_RL.shape[0], self.eos_ids, sampling.stop, self.tokenizer, self.device)
        config = GenerationConfig(
            do_sample=True,
            max_new_tokens=sampling.max_new_tokens,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            num_return_sequences=1,
        )
        seq_RS = self.model.generate(
            input_ids=ids_RL,
            attention_mask=mask_RL,
            generation_config=config,
            logits_processor=LogitsProcessorList([*warpers, recorder]),
            stopping_criteria=StoppingCriteriaList([finish]),
        )
        steps = seq_RS.shape[1] - L
        lp_RT = recorder.result(seq_RS, steps).float().cpu()
        seq_RS = seq_RS.cpu()
        lengths = finish.length.cpu().tolist()
        out: list[list[Completion]] = []
        for b in range(len(prompts)):
            samples = []
            for r in range(b * n, (b + 1) * n):
                T = lengths[r] if lengths[r] >= 0 else steps
                samples.append(
                    Completion(
                        token_ids=seq_RS[r, L : L + T].tolist(),
                        logprobs=lp_RT[r, :T].tolist(),
                        finish_reason="stop" if lengths[r] >= 0 else "length",
                    )
                )
            out.append(samples)
        return out


class _LogprobRecorder(LogitsProcessor):
    """A LogitsProcessor placed after the warpers: log-prob of each sampled token under the processed
    distribution. At step t it sees the processed scores of step t and, in input_ids, the token
    sampled at step t-1 (whose distribution it kept from the previous call)."""

    def __init__(self):
        self.prev_RV: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []  # [R] per finished step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev_RV is not None:
            self.taken.append(self.prev_RV.gather(1, input_ids[:, -1:])[:, 0])
        self.prev_RV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, seq_RS: torch.Tensor, steps: int) -> torch.Tensor:
        """[R, steps] log-probs of the sampled tokens (the last step gathered from the final sequences)."""
        taken = list(self.taken)
        if self.prev_RV is not None and len(taken) < steps:
            taken.append(self.prev_RV.gather(1, seq_RS[:, -1:])[:, 0])
        if not taken:
            return torch.zeros((seq_RS.shape[0], 0))
        return torch.stack(taken[:steps], dim=1)


class _FinishCriteria(StoppingCriteria):
    """A StoppingCriteria recording each row's completion length when it first ends (EOS or stop string)."""

    def __init__(
        self, prompt_len: int, rows: int, eos_ids: list[int], stop: Sequence[str], tokenizer, device: torch.device
    ):
        self.prompt_len = prompt_len
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.stop = tuple(s for s in stop if s)
        self.tokenizer = tokenizer
        self.length = torch.full((rows,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len  # tokens generated so far
        still_open = self.length < 0
        hit = still_open & torch.isin(input_ids[:, -1], self.eos)
        if self.stop:
            for r in (still_open & ~hit).nonzero()[:, 0].tolist():
                text = self.tokenizer.decode(input_ids[r, self.prompt_len :].tolist(), skip_special_tokens=True)
                if any(s in text for s in self.stop):
                    hit[r] = True
        self.length[hit] = t
        return self.length >= 0

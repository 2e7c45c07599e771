"""The transformers teacher scorer: the reference, and the default on CPU and for teachers that fit one device.

How it runs fast: a sample is fed as prompt + completion without its last token (nothing predicts past
the end); samples are sorted by length and packed, right-padded, into batches of at most
`score.max_tokens_per_batch` padded tokens. Right padding needs no attention mask: under causal
attention a real token attends only to earlier tokens, never to the padding after it, so a padded row
computes what the unpadded sequence computes. The base model (`model.base_model`) gives the hidden
states; `lm_head` runs only on the completion positions, in chunks written into two preallocated
[chunk, V] float32 buffers, and everything from the log-softmax to the top-k happens there, on the
device; only K ids and K + 4 floats per position leave it.

Per completion position at the scoring temperature τ, log p = log_softmax(logits[:V] / τ):
    topk    the K most likely ids and their log-probs
    taken   log p(completion_ids[t]), exact float32
    tail    log Σ_{v∉top-k} p(v) = m + log Σ_{v∉top-k} exp(log p(v) − m), m the (K+1)-th largest log-prob
            (a logsumexp on the device; never log(1 − Σ top-k), which cancels when the top-k holds ~all mass)
    entropy −Σ_v p(v) log p(v), exact

Shape legend: B rows of a batch, L padded length, H hidden size, N scored positions, V scored
vocabulary (scorer.py), K top-k.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from opd.cache.errors import OpdError
from opd.stages.devices import Placement
from opd.stages.heads import gather_positions, head_path_matches
from opd.stages.scorer import BatchOut, Seq, scored_vocab

_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 23}  # [chunk, V] float32 buffer size per device type


class HFScorer:
    """The teacher's forward on a batch and the per-position extraction, all on the device."""

    name = "transformers"

    def __init__(self, teacher_dir, sc, where: Placement, vocab_limit: int | None):
        self.model = load_teacher(teacher_dir, where.device, where.dtype)
        self.dev = where.device
        self.K = sc.top_k
        self.temperature = float(sc.temperature)
        self.max_tokens_per_batch = sc.max_tokens_per_batch
        self.head = self.model.get_output_embeddings()
        self.vocab_size = self.V = scored_vocab(self.head.weight.shape[0], vocab_limit)
        if self.K > self.V:
            raise OpdError(
                f"score.top_k = {self.K} exceeds the teacher's vocabulary ({self.V} tokens) ({teacher_dir}); "
                f"lower score.top_k"
            )
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.chunk = max(1, _CHUNK_ELEMENTS.get(self.dev.type, _CHUNK_ELEMENTS["cuda"]) // self.V)
        self.logp_CV = torch.empty(self.chunk, self.V, dtype=torch.float32, device=self.dev)
        self.scratch_CV = torch.empty(self.chunk, self.V, dtype=torch.float32, device=self.dev)
        self.head_only = head_path_matches(self.model, self.dev)
        self.counters: dict[str, int] = {}

    def batches(self, seqs: Sequence[Seq]) -> Iterator[BatchOut]:
        lengths = [q.input_ids.size if q.completion.size else 0 for q in seqs]  # nothing to score: no batch
        for rows in plan_batches(lengths, self.max_tokens_per_batch):
            input_ids_BL, gather_N, taken_N = batch_arrays(seqs, rows)
            out = self.score(input_ids_BL, gather_N, taken_N, rows)
            out.tokens = sum(seqs[r].input_ids.size for r in rows)
            out.padded_tokens = input_ids_BL.numel()
            yield out

    def close(self) -> None:
        self.model = self.head = self.logp_CV = self.scratch_CV = None

    def _logits(self, hidden_NH: torch.Tensor, out_NV: torch.Tensor) -> None:
        """lm_head's first V rows into a float32 buffer (written in place where the weights are float32)."""
        w, b = self.head.weight[: self.V], getattr(self.head, "bias", None)
        b = None if b is None else b[: self.V]
        if isinstance(self.head, torch.nn.Linear) and w.dtype == torch.float32 and hidden_NH.dtype == torch.float32:
            if b is None:
                torch.mm(hidden_NH, w.t(), out=out_NV)
            else:
                torch.addmm(b, hidden_NH, w.t(), out=out_NV)
        else:
            out_NV.copy_(torch.nn.functional.linear(hidden_NH, w, b))
        if self.softcap:
            out_NV.div_(self.softcap).tanh_().mul_(self.softcap)

    @torch.inference_mode()
    def score(
        self, input_ids_BL: torch.Tensor, gather_N: torch.Tensor, taken_N: torch.Tensor, rows: list[int]
    ) -> BatchOut:
        dev, K, N = self.dev, self.K, gather_N.numel()
        ids = input_ids_BL.to(dev, non_blocking=True)
        gather_N = gather_N.to(dev, non_blocking=True)
        taken_N = taken_N.to(dev, non_blocking=True)
        source_NX = gather_positions(self.model, ids, gather_N, self.head_only)  # [N, H] or [N, rows] (fallback)
        out = dict(
            topk_ids_NK=torch.empty(N, K, dtype=torch.int32, device=dev),
            topk_logprobs_NK=torch.empty(N, K, dtype=torch.float32, device=dev),
            **{
                k: torch.empty(N, dtype=torch.float32, device=dev)
                for k in ("taken_N", "tail_N", "entropy_N", "topk_mass_N")
            },
        )
        for s in range(0, N, self.chunk):
            e = min(N, s + self.chunk)
            self._extract(source_NX[s:e], taken_N[s:e], {k: v[s:e] for k, v in out.items()})
        if dev.type == "cuda":
            host = {k: v.to("cpu", non_blocking=True) for k, v in out.items()}
            ready = torch.cuda.Event()
            ready.record()
            return BatchOut(rows, **host, ready=ready)
        return BatchOut(rows, **out)

    def _extract(self, source_NX: torch.Tensor, taken_N: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        """Log-softmax at τ, top-k, taken, tail logsumexp and entropy for n ≤ chunk positions, in place."""
        n, K = source_NX.shape[0], self.K
        logp = self.logp_CV[:n]
        tmp = self.scratch_CV[:n]
        if self.head_only:
            self._logits(source_NX, logp)
        else:
            logp.copy_(source_NX[:, : self.V])
        if self.temperature != 1.0:
            logp.div_(self.temperature)
        logp.clamp_(min=torch.finfo(torch.float32).min)  # -inf logits: p = 0 and p·log p = 0, never NaN
        m = logp.amax(-1, keepdim=True)
        torch.sub(logp, m, out=tmp).exp_()
        z = tmp.sum(-1, keepdim=True)
        logp.sub_(m + z.log())  # log p = logits/τ − logsumexp
        tmp.div_(z)  # p
        out["entropy_N"].copy_(-torch.bmm(tmp.unsqueeze(1), logp.unsqueeze(2)).view(n))
        top_lp, top_ids = logp.topk(min(K + 1, self.V), dim=-1)
        out["topk_ids_NK"].copy_(top_ids[:, :K])
        out["topk_logprobs_NK"].copy_(top_lp[:, :K])
        out["topk_mass_N"].copy_(top_lp[:, :K].exp().sum(-1))
        out["taken_N"].copy_(logp.gather(1, taken_N[:, None]).view(n))
        if K < self.V:
            m_tail = top_lp[:, K : K + 1]  # the largest log-prob outside the top-k
            torch.sub(logp, m_tail, out=tmp).exp_()
            tmp.scatter_(1, top_ids[:, :K], 0.0)
            out["tail_N"].copy_((m_tail + tmp.sum(-1, keepdim=True).log()).view(n))
        else:
            out["tail_N"].fill_(float("-inf"))


def load_teacher(teacher_dir, dev: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype)
    if model.get_output_embeddings() is None:
        raise OpdError(
            f"{teacher_dir}: {type(model).__name__} has no output embeddings (lm_head); "
            f"the teacher must be a causal language model"
        )
    return model.to(dev).eval()


def plan_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of the sequences of length > 0, longest first, grouped so rows × longest ≤ max_tokens
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def batch_arrays(seqs: Sequence[Seq], rows: list[int]):
    """(input_ids_BL right-padded with 0, gather_N: flat index into B*L of each scored position, taken_N)."""
    L = max(seqs[r].input_ids.size for r in rows)
    input_ids_BL = np.zeros((len(rows), L), dtype=np.int64)
    gather, taken = [], []
    for b, r in enumerate(rows):
        seq = seqs[r]
        input_ids_BL[b, : seq.input_ids.size] = seq.input_ids
        start = b * L + seq.prompt_len - 1
        gather.append(np.arange(start, start + seq.completion.size, dtype=np.int64))
        taken.append(seq.completion)
    return (
        torch.from_numpy(input_ids_BL),
        torch.from_numpy(np.concatenate(gather)),
        torch.from_numpy(np.concatenate(taken)),
    )

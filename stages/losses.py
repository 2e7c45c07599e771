"""Distillation losses from a top-k teacher cache, per completion token.

Shape legend: N = completion positions in a (micro-)batch, flattened; V = vocabulary; K = top-k.
  student_logits_NV   student logits at the positions that predict each completion token
  topk_ids_NK         teacher top-k ids (any order), topk_logprobs_NK their log-probs
  tail_logprobs_N     log of the teacher's mass outside the top-k (-inf when nothing is outside)

The teacher is known on K_t plus one tail bucket, so both distributions are compared on the same
K+1 buckets:
    t = log_softmax([log p_T(v) for v in K_t] + [log tail_T])      (renormalised: the cache is quantised)
    s = [log p_S(v) for v in K_t] + [log(1 - Σ_{v∈K_t} p_S(v))]      with p_S = softmax(z / τ)
When the teacher has no tail (K = V, or tail = -inf), the tail bucket is dropped from both and s is
renormalised over K_t: this makes `jsd` exactly the full-vocabulary divergence when K = V.

No [N, V] float32 log-softmax is materialised: log p_S(v) = z_v/τ - logsumexp(z/τ) only at gathered ids.
"""

from __future__ import annotations

import math

import torch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def student_logprobs_at(
    student_logits_NV: torch.Tensor, ids_NK: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_S at ids [N, K], logsumexp(z/τ) [N]) in float32, without a [N, V] log-softmax copy."""
    z = student_logits_NV.float()
    if temperature != 1.0:
        z = z / temperature
    log_z_N = torch.logsumexp(z, dim=-1)
    return z.gather(-1, ids_NK.long()) - log_z_N[:, None], log_z_N


def bucket_logprobs(student_logits_NV, topk_ids_NK, topk_logprobs_NK, tail_logprobs_N, temperature=1.0):
    """(student s [N, K+1], teacher t [N, K+1]) log-probs on the shared top-k + tail buckets."""
    s_topk, _ = student_logprobs_at(student_logits_NV, topk_ids_NK, temperature)
    return buckets_from(s_topk, topk_logprobs_NK, tail_logprobs_N)


def buckets_from(s_topk_NK, topk_logprobs_NK, tail_logprobs_N):
    """`bucket_logprobs` from the student's log-probs at the teacher's ids: every loss here is a function
    of those few gathered values, which is what lets stages/fused_head.py take the gradient in closed form."""
    no_tail_N = torch.isneginf(tail_logprobs_N)
    lse_N = torch.logsumexp(s_topk_NK, dim=-1).clamp(max=-1e-6)  # top-k mass < 1; rounding can push it past
    s_tail = torch.where(no_tail_N, torch.full_like(lse_N, -math.inf), log1mexp(lse_N))
    s_topk = torch.where(no_tail_N[:, None], s_topk_NK - torch.logsumexp(s_topk_NK, -1, keepdim=True), s_topk_NK)
    s = torch.cat([s_topk, s_tail[:, None]], dim=-1)
    t = torch.log_softmax(torch.cat([topk_logprobs_NK.float(), tail_logprobs_N.float()[:, None]], -1), -1)
    return s, t


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_b p_b (log p_b - log q_b) over the last axis; buckets with p_b = 0 contribute 0."""
    terms = torch.exp(p_log) * (p_log - q_log)
    return torch.where(torch.isneginf(p_log), torch.zeros_like(terms), terms).sum(-1)


def generalized_jsd(s_NB: torch.Tensor, t_NB: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD per position [N] (GKD, Agarwal et al. 2024; TRL's convention):

    β = 0:  KL(T ‖ S)                       forward KL
    β = 1:  KL(S ‖ T)                       reverse KL
    else:   β·KL(T ‖ M) + (1-β)·KL(S ‖ M),  M = β·T + (1-β)·S
    """
    if beta == 0.0:
        return _kl(t_NB, s_NB)
    if beta == 1.0:
        return _kl(s_NB, t_NB)
    m_NB = torch.logsumexp(torch.stack([s_NB + math.log1p(-beta), t_NB + math.log(beta)]), dim=0)
    return beta * _kl(t_NB, m_NB) + (1.0 - beta) * _kl(s_NB, m_NB)


def jsd_loss(student_logits_NV, topk_ids_NK, topk_logprobs_NK, tail_logprobs_N, beta, temperature=1.0):
    """Per-position generalized JSD [N] between student and cached teacher on the K+1 buckets."""
    s, t = bucket_logprobs(student_logits_NV, topk_ids_NK, topk_logprobs_NK, tail_logprobs_N, temperature)
    return generalized_jsd(s, t, beta)


def sampled_rkl_loss(
    student_logits_NV, taken_ids_N, teacher_taken_logprobs_N, sampling_logprobs_N, temperature=1.0, ratio_clip=0.0
):
    """Sampled-token reverse KL per position [N] from the student's logits (`sampled_rkl_from`)."""
    logp_N, _ = student_logprobs_at(student_logits_NV, taken_ids_N[:, None], temperature)
    return sampled_rkl_from(logp_N[:, 0], teacher_taken_logprobs_N, sampling_logprobs_N, ratio_clip)


def sampled_rkl_from(logp_N, teacher_taken_logprobs_N, sampling_logprobs_N, ratio_clip=0.0):
    """Sampled-token reverse KL in its policy-gradient form, per position [N] (Tinker cookbook), from the
    student's log-prob of the taken token log p_θ(x_t):

        advantage_t = log p_T(x_t) - log p_sample(x_t)                  (detached)
        ratio_t     = exp(log p_θ(x_t) - log p_sample(x_t))
        loss_t      = -ratio_t · advantage_t
    so ∂loss_t/∂log p_θ(x_t) = -ratio_t · advantage_t. With ratio_clip = c > 0 the PPO form
    -min(ratio·A, clip(ratio, 1-c, 1+c)·A) stops the gradient once the ratio leaves the trust region.
    Uses only the exact taken-token teacher log-prob, never the top-k.
    """
    sampling = sampling_logprobs_N.float()
    advantage_N = (teacher_taken_logprobs_N.float() - sampling).detach()
    ratio_N = torch.exp(logp_N - sampling)
    loss_N = -ratio_N * advantage_N
    if ratio_clip > 0:
        clipped_N = -torch.clamp(ratio_N, 1.0 - ratio_clip, 1.0 + ratio_clip) * advantage_N
        loss_N = torch.maximum(loss_N, clipped_N)
    return loss_N

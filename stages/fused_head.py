"""The output head and the loss in one pass: hidden states in, the loss and its gradient out, chunk by chunk.

Every learner loss (stages/losses.py) reads the student only through its log-probs at a few ids per
position, s_j = z_j/τ − logsumexp(z/τ) for j in the position's gathered ids J (the teacher's top-k,
the taken token, or the data's token), with z = W·h the head's logits. So, with G_j = ∂L/∂s_j taken
by autograd on the small [n, J] tensor and p = softmax(z/τ), the gradient for every vocabulary entry
v has the closed form

    ∂L/∂z_v = ( Σ_{j∈J, j=v} G_j  −  p_v · Σ_{j∈J} G_j ) / τ

(the tail bucket log(1 − Σ_K p) is a function of the s_j, so its gradient is already in G). Per chunk
of positions the forward therefore computes the logits once into one buffer, turns it in place into p,
then into ∂L/∂z, and takes ∂L/∂h = (∂L/∂z)·W and ∂L/∂W += (∂L/∂z)ᵀ·h at once: no float32 copies of
the [n, V] logits besides that one buffer, and the head GEMM runs once instead of twice (today's
unfused path recomputes each chunk's logits under checkpoint in backward). The gradients are kept
from the forward and scaled by the incoming gradient in backward, as Liger Kernel's fused linear
losses do. Used where the head is a plain bias-free `nn.Linear` without soft-capping (stages/learner.py
falls back to the unfused path otherwise: LoRA or quantised heads, Gemma-style soft-caps).

Shape legend: N positions, H hidden, V vocabulary, J gathered ids per position, c positions in a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# loss_of(s_cJ, positions, student_top_cK or None) → (Σ loss over the chunk, [2] float64 metrics)
LossOf = Callable[[torch.Tensor, slice, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class FusedSpec:
    """What the fused pass needs besides the tensors."""

    loss_of: LossOf  # the loss on the gathered log-probs of one chunk (autograd runs on its [c, J] input)
    chunk: int  # positions per chunk (one [chunk, V] float32 buffer at a time)
    temperature: float  # τ of s = log_softmax(z / τ)
    metric_top_k: int  # > 0: also pass the student's top-k ids per position to loss_of (for its metrics)


def fused_head_loss(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, ids_NJ: torch.Tensor, spec: FusedSpec):
    """(Σ loss over the N positions, [2] metrics summed over chunks); the loss carries the gradient to
    `hidden_NH` and `weight_VH` where they require it and grad mode is on."""
    if torch.is_grad_enabled() and (hidden_NH.requires_grad or weight_VH.requires_grad):
        return _FusedHeadLoss.apply(hidden_NH, weight_VH, ids_NJ, spec)
    loss, metrics, _, _ = _run(hidden_NH, weight_VH, ids_NJ, spec, want_h=False, want_w=False)
    return loss, metrics


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, ids_NJ, spec):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, metrics, grad_h, grad_w = _run(hidden_NH, weight_VH, ids_NJ, spec, want_h, want_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None,
            grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None,
            None,
            None,
        )


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The GEMMs' dtype: the autocast dtype where autocast is on for this device, else the tensor's."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def _run(hidden_NH, weight_VH, ids_NJ, spec: FusedSpec, want_h: bool, want_w: bool):
    """The chunk loop (see the module docstring); returns (loss, metrics, ∂L/∂h or None, ∂L/∂W or None)."""
    dev = hidden_NH.device
    cdt = _compute_dtype(hidden_NH)
    tau = spec.temperature
    with torch.autocast(dev.type, enabled=False), torch.no_grad():
        w = weight_VH.detach().to(cdt)
        grad_h = torch.empty_like(hidden_NH, dtype=torch.float32) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        metrics = torch.zeros(2, dtype=torch.float64, device=dev)
        N = hidden_NH.shape[0]
        for start in range(0, N, spec.chunk):
            sl = slice(start, min(N, start + spec.chunk))
            h = hidden_NH[sl].detach().to(cdt)
            ids = ids_NJ[sl].long()
            z = torch.mm(h, w.t()).float()  # the one [c, V] buffer of the chunk
            if tau != 1.0:
                z.div_(tau)
            z_ids = z.gather(1, ids)
            top = z.max(dim=1, keepdim=True).values
            z.sub_(top).exp_()
            sum_exp = z.sum(dim=1, keepdim=True)
            z.div_(sum_exp)  # z is now p = softmax(z / τ)
            s = (z_ids - top - sum_exp.log()).requires_grad_(want_h or want_w)
            student_top = z.topk(min(spec.metric_top_k, z.shape[1]), dim=1).indices if spec.metric_top_k else None
            with torch.enable_grad():
                part, m = spec.loss_of(s, sl, student_top)
            loss += part.detach().float()
            metrics += m
            if not (want_h or want_w):
                continue
            (g,) = torch.autograd.grad(part, s) if part.requires_grad else (torch.zeros_like(s),)
            z.mul_(-g.sum(dim=1, keepdim=True)).scatter_add_(1, ids, g)  # z is now ∂L/∂(z/τ)
            if tau != 1.0:
                z.div_(tau)
            dz = z.to(cdt)
            if want_h:
                grad_h[sl] = torch.mm(dz, w).float()
            if want_w:
                if cdt == torch.float32:
                    grad_w.addmm_(dz.t(), h)
                else:
                    grad_w += torch.mm(dz.t(), h).float()
            del z, dz
    return (
        loss,
        metrics,
        grad_h.to(hidden_NH.dtype) if want_h else None,
        grad_w.to(weight_VH.dtype) if want_w else None,
    )

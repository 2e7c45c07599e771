"""The output head of a causal LM, as the learner and the teacher scorer both use it.

Both stages need logits only at the completion positions (N of the B·L fed positions). Where the
model's logits are exactly lm_head(base_model(x)) (optionally soft-capped), they run the decoder for
hidden states, gather the N positions and apply the head to those alone, so no [B, L, V] tensor is
ever made; a model whose logits are more than that (checked once, `head_path_matches`) falls back to
its own forward and a gather of the logits.

Shape legend: B rows, L padded length, H hidden size, N gathered positions, V vocabulary.
"""

from __future__ import annotations

import torch


def decoder(model):
    """The decoder that yields hidden states (`model.base_model`), or None where the model has none."""
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else None


def apply_head(model, hidden_NH: torch.Tensor) -> torch.Tensor:
    """lm_head(hidden), soft-capped as the model's own forward does (`final_logit_softcapping`)."""
    logits = model.get_output_embeddings()(hidden_NH)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def fusable_head(model) -> bool:
    """Is the head a plain bias-free nn.Linear without soft-capping (what stages/fused_head.py computes)?
    Not for a LoRA- or quantisation-wrapped head, whose forward is more than W·h."""
    head = model.get_output_embeddings()
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
    )


def gather_positions(model, ids_BL: torch.Tensor, gather_N: torch.Tensor, head_only: bool) -> torch.Tensor:
    """[N, H] hidden states (head_only) or [N, V] logits (fallback) at the flat positions `gather_N`."""
    if head_only:
        hidden_BLH = decoder(model)(input_ids=ids_BL, use_cache=False).last_hidden_state
        return hidden_BLH.reshape(-1, hidden_BLH.shape[-1]).index_select(0, gather_N)
    logits_BLV = model(input_ids=ids_BL, use_cache=False).logits
    return logits_BLV.reshape(-1, logits_BLV.shape[-1]).index_select(0, gather_N)


@torch.no_grad()
def head_path_matches(model, device: torch.device) -> bool:
    """Does lm_head(base_model(ids)) reproduce the model's logits? Checked on 8 tokens; the tolerance
    is relative to the logits' scale, looser for 16-bit weights."""
    base = decoder(model)
    if base is None:
        return False
    was_training = model.training
    model.eval()
    try:
        V = model.get_output_embeddings().weight.shape[0]
        ids = (torch.arange(8, device=device) % V)[None]
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        ours = apply_head(model, base(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
    finally:
        model.train(was_training)
    tol = 1e-3 if model.get_output_embeddings().weight.dtype == torch.float32 else 1e-2
    return bool(torch.allclose(ours, full, rtol=tol, atol=tol * (1 + float(full.abs().max()))))

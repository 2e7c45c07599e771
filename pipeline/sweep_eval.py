"""`opd sweep --eval cache`: teacher-forced figures of a student on a round's held-out cache, no teacher.

Reads   RUN/rounds/R/heldout/rollouts/ and heldout/scores/ (the held-out samples of the student that
        started round R, and their cached teacher top-k), and a student folder (a checkpoint, or a LoRA
        adapter on its base).
Writes  nothing itself; `opd sweep` stores the result as <setting>/sweep_eval.json.

Per held-out completion position t, on the K+1 buckets of the cache (the teacher's top-k and the tail;
stages/losses.py), with s the trained student's bucket distribution and t the teacher's:

    cache_rkl = Σ_t KL(s_t ‖ t_t) / N      cache_fkl = Σ_t KL(t_t ‖ s_t) / N
    cache_nll = −Σ_t log p_S(x_t) / N      (the student's NLL of the teacher-scored text)

These are teacher-forced on text the *starting* student wrote: cheap and comparable across settings
(every setting sees the same positions), but not the on-policy figure; `--eval heldout` is that.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from opd.cache.errors import OpdError, first_line
from opd.stages.heads import apply_head, gather_positions, head_path_matches
from opd.stages.losses import bucket_logprobs, generalized_jsd, student_logprobs_at
from opd.stages.students import StartStudent
from opd.stages.train_data import Item, MicroBatches, RoundData, plan_epoch

CACHE_METRICS = ("cache_rkl", "cache_fkl", "cache_nll")


def load_trained(student: StartStudent, device: torch.device):
    """A student folder as one float32 transformers model (a LoRA adapter merged into its base)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(student.base), dtype=torch.float32)
        if student.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(student.adapter)).merge_and_unload()
    except (OSError, ValueError) as e:
        raise OpdError(f"cannot load the student {student.label} ({first_line(e)})") from None
    model.to(device).eval()
    model.config.use_cache = False
    return model


@torch.no_grad()
def cache_figures(
    data: RoundData, student: StartStudent, device: torch.device, temperature: float, max_tokens: int
) -> dict[str, Any]:
    """cache_rkl / cache_fkl / cache_nll (see the module docstring) of `student` on `data`."""
    model = load_trained(student, device)
    head_only = head_path_matches(model, device)
    items = [Item(mb) for mb in plan_epoch(data.length_S, max_tokens, 0, 0, 0)]
    sums = np.zeros(len(CACHE_METRICS))
    n = 0
    for batch in MicroBatches(data, items, student.pad_id):
        ids, gather = batch["input_ids_BL"].to(device), batch["gather_N"].to(device)
        x_NX = gather_positions(model, ids, gather, head_only)
        logits_NV = apply_head(model, x_NX) if head_only else x_NX
        topk_ids, topk_lps = batch["topk_ids_NK"].to(device), batch["topk_logprobs_NK"].to(device)
        s, t = bucket_logprobs(logits_NV, topk_ids, topk_lps, batch["tail_N"].to(device), temperature)
        taken, _ = student_logprobs_at(logits_NV, batch["target_N"].to(device)[:, None], temperature)
        sums += [
            float(generalized_jsd(s, t, 1.0).double().sum()),
            float(generalized_jsd(s, t, 0.0).double().sum()),
            float(-taken.double().sum()),
        ]
        n += batch["tokens"]
    if not n:
        raise OpdError("the held-out cache has no completion tokens to evaluate on")
    out = {k: round(v / n, 6) for k, v in zip(CACHE_METRICS, sums)}
    if not all(math.isfinite(v) for v in out.values()):
        raise OpdError(f"student {student.label}: non-finite held-out figures {out}; did training diverge?")
    return {**out, "cache_tokens": n, "cache_samples": len(data)}

"""The learner's metrics: per-step sums (named), the metrics.jsonl records, summary lines.

Per logged step (one JSON line in RUN/rounds/R/metrics.jsonl, `"stage": "train"`):
    loss               Σ_t loss_t / N over the step's N completion tokens (every process)
    rkl_sampled        on-policy rows: mean over their tokens of log p_sample(x_t) − log p_T(x_t), a
                       sampled estimate of KL(student sampler ‖ teacher)
    rkl_bucket         mean KL(S ‖ T) on the K+1 buckets under the current student
    teacher_topk_mass  mean Σ_{v ∈ K_t} p_T(v)
    topk_overlap       mean fraction of the teacher's top-k ids among the student's top-k
    grad_norm (before clipping), lr, tokens, on_policy_tokens, padding, step_s, tokens_per_s
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from opd.cache.rundir import RunDir


@dataclass
class StepSums:
    """Sums over one optimizer step's micro-batches (this process's, until `all_reduce`)."""

    loss: float = 0.0  # Σ_t loss_t
    tokens: float = 0.0  # completion positions
    rkl_sampled: float = (
        0.0  # Σ (sampling − teacher) log-prob of the taken token, on-policy rows with sampling log-probs
    )
    rkl_sampled_tokens: float = 0.0  # their count
    rkl_bucket: float = 0.0  # Σ bucket KL(S‖T) (logged steps)
    topk_overlap: float = 0.0  # Σ top-k overlap (logged steps)
    metric_tokens: float = 0.0  # positions the two above were computed on
    teacher_topk_mass: float = 0.0  # Σ teacher top-k mass
    padded_tokens: float = 0.0  # B·L of the micro-batches
    real_tokens: float = 0.0  # Σ fed lengths
    on_policy_tokens: float = 0.0  # positions of on-policy rows

    def add_batch(self, batch: dict[str, Any], with_model_metrics: bool) -> None:
        """The sums that need only the (CPU) batch."""
        on, samp, taken = batch["on_policy_N"], batch["sampling_N"], batch["taken_N"]
        has = on & ~torch.isnan(samp)
        self.tokens += batch["tokens"]
        self.rkl_sampled += float((samp[has] - taken[has]).double().sum())
        self.rkl_sampled_tokens += int(has.sum())
        self.teacher_topk_mass += float(torch.logsumexp(batch["topk_logprobs_NK"].double(), -1).exp().sum())
        self.padded_tokens += batch["padded_tokens"]
        self.real_tokens += batch["real_tokens"]
        self.on_policy_tokens += batch["on_tokens"]
        self.metric_tokens += batch["tokens"] if with_model_metrics else 0

    def all_reduce(self, procs) -> "StepSums":
        """The sums over every process."""
        names = [f.name for f in dataclasses.fields(self)]
        total = procs.all_reduce_sum(torch.tensor([getattr(self, n) for n in names], dtype=torch.float64))
        return StepSums(**dict(zip(names, total.tolist())))

    def record(
        self,
        *,
        round_index: int,
        step: int,
        steps: int,
        epoch: int,
        grad_norm: float,
        lr: float,
        step_s: float,
        stage: str = "train",
    ) -> dict[str, Any]:
        """The metrics.jsonl line of step `step` (0-based) from the all-reduced sums (`stage`: "train", or
        "sft" for `opd sft`, whose loss is the cross-entropy)."""
        tokens = max(self.tokens, 1.0)
        per_metric = self.metric_tokens if stage == "train" else 0  # SFT has no teacher to compare with
        return {
            "stage": stage,
            "round": round_index,
            "step": step + 1,
            "steps": steps,
            "epoch": epoch,
            "loss": self.loss / tokens,
            "rkl_sampled": self.rkl_sampled / self.rkl_sampled_tokens if self.rkl_sampled_tokens else None,
            "rkl_bucket": self.rkl_bucket / per_metric if per_metric else None,
            "teacher_topk_mass": self.teacher_topk_mass / tokens if stage == "train" else None,
            "topk_overlap": self.topk_overlap / per_metric if per_metric else None,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": int(self.tokens),
            "on_policy_tokens": int(self.on_policy_tokens),
            "padding": 1.0 - self.real_tokens / max(self.padded_tokens, 1.0),
            "step_s": round(step_s, 4),
            "tokens_per_s": round(self.tokens / max(step_s, 1e-9), 1),
            "time": time.time(),
        }


@dataclass
class Totals:
    """Running totals of a round's training, carried through checkpoints (as JSON)."""

    tokens: int = 0
    train_s: float = 0.0
    nonfinite_steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    first_step_s: float | None = None

    def add_step(self, tokens: int, step_s: float, finite: bool) -> None:
        self.tokens += tokens
        self.train_s += step_s
        self.nonfinite_steps += not finite
        if self.first_step_s is None:
            self.first_step_s = step_s

    def log_loss(self, loss: float) -> None:
        self.last_loss = loss
        if self.first_loss is None:
            self.first_loss = loss


def trim_metrics(run: RunDir, round_index: int, keep_steps: int, stage: str = "train") -> None:
    """Drop the round's train lines that the run starting now replaces: steps after the checkpoint it
    resumes from (a killed learner may have logged some), or all of them (and an old summary) when
    it starts from scratch. Other stages' lines stay."""
    run.drop_metrics(
        round_index,
        lambda rec: (
            rec.get("stage") == stage and bool(rec.get("final") or ("step" in rec and rec["step"] > keep_steps))
        ),
    )


def summary_line(s: dict, student_dir: str) -> str:
    resumed = f", resumed at step {s['resumed_from_step']}" if s.get("resumed_from_step") else ""
    first, last = s.get("first_loss"), s.get("last_loss")
    loss = f"loss {first:.4f} → {last:.4f}" if first is not None and last is not None else "no loss logged"
    how = f"{s['world_size']} × {s['device']} ({s['parallel']})" + (
        f", LoRA r={s['lora_rank']}" if s["lora_rank"] else ""
    )
    return (
        f"{s.get('stage', 'train')} round {s['round']}: {s['steps']} steps{resumed}, {s['completion_tokens']:,} completion tokens, "
        f"{loss}, {s['tokens_per_s']:,.0f} tok/s on {how}; student in {student_dir}"
    )

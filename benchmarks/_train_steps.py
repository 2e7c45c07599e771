"""bench_train.py's steppers: one optimizer step of opd's learner in each of its variants (`OpdStep`,
`VARIANTS`: the loss fused or not, activation checkpointing, compiled layers, or cross-entropy on the
same completion positions), their rotating timing, and TRL's GKDTrainer over the same micro-batches."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
from _train_setup import Setup

from opd.stages import learner as L
from opd.stages.train_data import Item, MicroBatches


class _Step:
    """One optimizer step = `loss_step()` (forward + backward, subclass) then a clipped AdamW update."""

    params: list
    opt: torch.optim.Optimizer

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        loss = self.loss_step()
        self.update()
        return loss


# the learner's variants: train.* overrides, and whether the batch is `opd sft`'s cross-entropy on the
# same completion positions through the same head path (the fair baseline: the loss is what differs)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "opd": (dict(fused_head_loss=True, activation_checkpointing="off"), False),
    "opd_unfused": (dict(fused_head_loss=False, activation_checkpointing="off"), False),
    "opd_ckpt": (dict(fused_head_loss=True, activation_checkpointing="on"), False),
    "opd_compile": (dict(fused_head_loss=True, activation_checkpointing="off", compile=True), False),
    "ce": (dict(fused_head_loss=True, activation_checkpointing="off"), True),
    "ce_unfused": (dict(fused_head_loss=False, activation_checkpointing="off"), True),
}


class OpdStep(_Step):
    """The learner's step (stages/train.py's loop body for one micro-batch, grad_accum 1) in one of
    VARIANTS."""

    def __init__(self, setup: Setup, order: list, variant: str = "opd"):
        overrides, self.cross_entropy = VARIANTS[variant]
        tc = dataclasses.replace(setup.cfg.train, **overrides)
        self.device = setup.placement.device
        self.autocast = setup.autocast
        model, head_only = L.load_student(setup.student, tc, self.device, 0)
        self.learner = L.Learner(model, tc, head_only, setup.data.top_k)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr)
        loader = torch.utils.data.DataLoader(
            MicroBatches(setup.data, [Item(mb) for mb in order], setup.pad_id),
            batch_size=None,
            num_workers=0,
            collate_fn=L.count_on_policy,
        )
        self.batches = iter(loader)

    def loss_step(self) -> float:
        """Forward + backward of one micro-batch (the gradients stay in .grad)."""
        batch = L.to_device(next(self.batches), self.device)
        batch["cross_entropy"] = self.cross_entropy
        with self.autocast():
            loss_sum, _ = self.learner(batch, need_metrics=not self.cross_entropy)
        loss = loss_sum / batch["tokens"]
        loss.backward()
        return loss.item()


def time_variants(setup: Setup, order: list, variants: list[str]) -> dict:
    """Run the variants step by step over the same micro-batches, rotating which goes first each step
    (the machine's load hits all alike); {"times": {variant: [s]}, "losses": {variant: [loss]}}."""
    steps = {v: OpdStep(setup, order, v) for v in variants}
    times = {v: [] for v in variants}
    losses = {v: [] for v in variants}
    for i, _ in enumerate(order):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            t0 = time.perf_counter()
            losses[v].append(steps[v]())
            times[v].append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


def time_trl(setup: Setup, order: list, workdir: Path) -> list[float]:
    """GKDTrainer (lmbda = 0: the fixed completions, teacher online) over the same micro-batches; step times."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def collate(items):
        (item,) = items
        return setup.sft_batch(order[item["mb"]])

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(str(setup.student))
    student = AutoModelForCausalLM.from_pretrained(str(setup.student), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(setup.teacher), dtype=torch.float32)
    args = GKDConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=len(order),
        learning_rate=setup.cfg.train.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        lmbda=0.0,
        seq_kd=False,
        beta=1.0,
        temperature=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=setup.placement.dtype_name == "bfloat16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = Sequential(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"mb": list(range(len(order)))}),
        data_collator=collate,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times

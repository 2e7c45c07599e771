"""Train stage (the learner): the student of round R learns from round R's rollouts and cached teacher scores.

Reads   RUN/opd.toml ([train], run.student, run.seed), RUN/rounds/R/rollouts/ and RUN/rounds/R/scores/
        (both with `_DONE.json`; joined shard by shard, sample by sample: stages/train_data.py), and the
        student to start from (stages/students.py): `run.student` in round 0, RUN/rounds/R-1/student/
        after. Never the teacher.
Writes  RUN/rounds/R/student/ (stages/export.py), then student/_DONE.json (stage "student": every file
        with its size and sha256, the producer, a summary); RUN/rounds/R/metrics.jsonl gets one line per
        logged step and one summary line (stages/train_metrics.py); RUN/rounds/R/train_ckpt/ holds the
        resumable checkpoint while the round runs (stages/checkpoints.py).

    opd train RUN --round 0 [--force] [--set train.beta=0.5]
    opd train RUN --round 0 --devices 0,1          # launches torchrun (pipeline/launch.py): 2 GPUs, NCCL
    torchrun --nproc-per-node 4 -m opd.stages.train RUN --round 0 [--force] [--set ...]

The parts: the loss and its module in stages/learner.py; the processes in stages/distributed.py.

Step loss: Σ_t loss_t / N over all micro-batches of the optimizer step, N = the completion tokens of the
whole step on every process, so gradient accumulation and world size do not change it. Every process
knows N before its first backward: the micro-batch plan (stages/train_data.py) depends only on the
data, the token budget and the seed, and step k takes micro-batches [k·G, (k+1)·G) with G = world_size ×
grad_accum (micro-batch j·W + rank goes to process `rank` as its j-th accumulation). A process scales
each backward's token sum by W / N, which the DDP / FSDP gradient mean turns into Σ / N. In the last
step of an epoch a process with no micro-batch left runs a filler of weight 0, so every process does
the same number of backwards. `micro_batches_per_step` (= G), not world size and grad_accum apart, is in
the producer: 2 processes with grad_accum 1 train exactly what 1 process with grad_accum 2 trains.

The cache's scoring temperature must equal `train.temperature` (checked): the bucket distributions the
loss compares are the teacher's at the temperature it was scored at and the student's at τ.

Resume: see stages/checkpoints.py; the metrics lines of steps after the checkpoint are dropped and
logged again.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import click
import torch

from opd.cache import fingerprint, storage
from opd.cache.errors import FingerprintMismatch, OpdError, short_value
from opd.cache.rundir import MANIFEST, Manifest, RunDir, check_done, clear_stage, read_manifest, write_manifest
from opd.configs.schema import OpdConfig, TrainConfig, load_run_config
from opd.stages import console, quant
from opd.stages import learner as L
from opd.stages.checkpoints import CKPT_DIR, Checkpoints
from opd.stages.devices import Placement, choose_dtype, native_bf16
from opd.stages.distributed import Processes
from opd.stages.export import export_student
from opd.stages.runner import first_work_started
from opd.stages.students import StartStudent, start_student
from opd.stages.train_data import DecodedShards, MicroBatches, RoundData, plan_steps, rank_items, slots
from opd.stages.train_metrics import StepSums, Totals, summary_line, trim_metrics

STAGE = "student"  # the run-directory folder (and manifest stage name)
PRODUCER_STAGE = "train"  # the producer record's stage


def run(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    force: bool = False,
    decoded: DecodedShards | None = None,
    loaded: L.LoadedStudents | None = None,
) -> dict[str, Any]:
    """Train round `round_index`'s student; returns the summary (key `line`: one line for humans).

    Under torchrun (WORLD_SIZE > 1) every process must call it. `decoded` / `loaded`: the caller's
    caches of decoded shards and starting checkpoints, for a caller that trains several rounds from the
    same ones in one process (`opd sweep`); None reads and loads afresh."""
    procs = Processes.setup(cfg.train.device)
    try:
        with start_student(cfg, run, round_index) as start:
            return _Round(cfg, run, round_index, procs, start, decoded=decoded, loaded=loaded).train(force)
    finally:
        procs.close()


def producer(
    cfg: OpdConfig, start: StartStudent, data: RoundData, round_index: int, micro_batches_per_step: int, dtype: str
) -> dict[str, Any]:
    """What the learner's output depends on: the starting student, [train] (less its HOW keys), the
    data, the seed, the compute dtype and the step's micro-batch count."""
    return fingerprint.producer(
        PRODUCER_STAGE,
        start.source,
        cfg.section_hash("train"),
        round=round_index,
        seed=cfg.run.seed,
        rollouts_sha256=data.rollouts_digest,
        scores_sha256=data.scores_digest,
        micro_batches_per_step=micro_batches_per_step,
        dtype=dtype,
    )


@dataclass
class _Round:
    """One round's training; the state its parts share. The SFT stage (stages/sft.py) is this life cycle
    with other data, settings, producer and loss: the hooks `_train_config`, `_load_data`, `_producer`,
    `_check_inputs`, `_dataset` and `_summary_extras`."""

    stage_name: ClassVar[str] = "train"  # the metrics lines' and summary's "stage"

    cfg: OpdConfig
    run: RunDir
    round_index: int
    procs: Processes
    start: StartStudent
    t_start: float = field(default_factory=time.perf_counter)
    startup_s: float | None = None  # process start → first step (runner.first_work_started); None: not its first
    load_s: float = 0.0  # model, optimizer, checkpoint and data loader set-up
    decoded: DecodedShards | None = None  # the caller's decoded shards (run's `decoded`)
    loaded: L.LoadedStudents | None = None  # the caller's kept checkpoints (run's `loaded`)

    def __post_init__(self):
        self.tc: TrainConfig = self._train_config()
        self.student_dir = self.run.stage_dir(self.round_index, STAGE)
        self.ckpt_dir = storage.join(self.run.round_dir(self.round_index), CKPT_DIR)
        dev = self.procs.device
        self.placement = Placement(dev, *choose_dtype(self.tc.dtype, dev.type, native_bf16(dev.type)))

    def train(self, force: bool) -> dict[str, Any]:
        tc, procs = self.tc, self.procs
        self.data = self._load_data()
        micro_batches_per_step = procs.world * tc.grad_accum
        self.steps = plan_steps(self.data, tc, self.cfg.run.seed, self.round_index, micro_batches_per_step)
        self.producer = self._producer(micro_batches_per_step)
        if force:
            if procs.rank == 0:
                clear_stage(self.run, self.student_dir)
                storage.remove(self.run.fs, self.ckpt_dir)
            procs.barrier()
        else:
            done = check_done(self.run, self.student_dir, self.producer)
            if done is not None:
                return self._skipped(done)
        self._check_inputs()
        if procs.rank == 0:
            console.say(self.placement.describe("train"))
        self._fit()
        return self._finish()

    def _train_config(self) -> TrainConfig:
        return self.cfg.train

    def _load_data(self) -> RoundData:
        return RoundData(
            self.run,
            self.round_index,
            vocab_limit=self.start.vocab_rows,
            lmbda=self.tc.lmbda,
            seed=self.cfg.run.seed,
            decoded=self.decoded,
        )

    def _producer(self, micro_batches_per_step: int) -> dict[str, Any]:
        return producer(
            self.cfg, self.start, self.data, self.round_index, micro_batches_per_step, self.placement.dtype_name
        )

    def _dataset(self, items: list) -> torch.utils.data.Dataset:
        return MicroBatches(self.data, items, self.start.pad_id)

    def _summary_extras(self) -> dict[str, Any]:
        return {}

    def _check_inputs(self) -> None:
        """The rollouts come from the student this round starts from, with its tokenizer; the cache was
        scored at the learner's temperature; sampled_rkl has the sampling log-probs it needs."""
        rp, data = self.data.rollouts.producer, self.data
        for key in ("tokenizer_hash", "model_hash"):
            if key in rp and rp[key] != self.producer[key]:
                raise FingerprintMismatch(
                    f"{self.run.stage_dir(self.round_index, 'rollouts')}/{MANIFEST}: sampled by a student with "
                    f"{key}={short_value(rp[key])}, but round {self.round_index} trains from {self.start.label} "
                    f"({key}={short_value(self.producer[key])}); re-run rollout for this student with --force"
                )
        if data.temperature is not None and not math.isclose(data.temperature, self.tc.temperature):
            raise OpdError(
                f"{self.run.stage_dir(self.round_index, 'scores')}: the teacher was scored at "
                f"temperature {data.temperature:g}, but train.temperature = {self.tc.temperature:g}; "
                f"set train.temperature = {data.temperature:g} (or re-score with score.temperature = "
                f"{self.tc.temperature:g})"
            )
        if self.tc.loss == "sampled_rkl":
            missing = int((data.on_policy_S & ~data.has_sampling_S).sum())
            if missing:
                raise OpdError(
                    f"train.loss = 'sampled_rkl' needs the sampling log-probs of on-policy rows, but "
                    f"{missing} student rows of round {self.round_index} have none; use train.loss = 'jsd'"
                )

    def _setup(self):
        """Model, optimizer, checkpoint state and this process's batches, resumed where a checkpoint is."""
        tc, procs = self.tc, self.procs
        seed = fingerprint.derive_seed(self.cfg.run.seed, self.round_index, "train")
        torch.manual_seed(seed)
        model, head_only = L.load_student(self.start.base, tc, procs.device, seed, self.loaded)
        self.learner = L.Learner(model, tc, head_only, self.data.top_k)
        self.use_fsdp = tc.fsdp and procs.world > 1
        self.wrapped = L.wrap(self.learner, procs.world, procs.device, self.use_fsdp, self.placement.dtype)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.ckpt = Checkpoints(self.run, self.ckpt_dir, procs, self.learner, self.opt, self.use_fsdp)
        self.resumed = self.ckpt.load(self.producer)
        first = self.resumed["step"] if self.resumed else 0
        if procs.rank == 0:
            trim_metrics(self.run, self.round_index, first, self.stage_name)
        self.totals = Totals(**self.resumed["totals"]) if self.resumed else Totals()
        items = rank_items(self.steps, first, procs.rank, procs.world, tc.grad_accum)
        loader = torch.utils.data.DataLoader(
            self._dataset(items),
            batch_size=None,
            shuffle=False,
            num_workers=tc.num_workers,
            pin_memory=procs.device.type == "cuda",
            collate_fn=L.count_on_policy,
            **({"prefetch_factor": 4, "persistent_workers": False} if tc.num_workers else {}),
        )
        return first, iter(loader)

    def _fit(self) -> None:
        """The optimizer steps, from the checkpoint (if any) to the end of the round's plan."""
        tc, procs, steps = self.tc, self.procs, self.steps
        t_load = time.perf_counter()
        first, batches = self._setup()
        self.load_s = time.perf_counter() - t_load
        self.startup_s = first_work_started()
        self.ckpt.restore_rng(self.resumed)
        autocast = L.autocast(procs.device, self.placement.dtype)
        bar = console.bar(
            total=len(steps),
            initial=first,
            unit="step",
            desc=f"{self.stage_name} round {self.round_index}",
            disable=procs.rank != 0,
        )
        try:
            for s in range(first, len(steps)):
                epoch, mbs = steps[s]
                n_step = int(sum(int(self.data.tokens_S[mb].sum()) for mb in mbs))
                k = slots(len(mbs), procs.world, tc.grad_accum)
                log_now = (s + 1) % tc.log_every_steps == 0 or s == len(steps) - 1
                t0 = time.perf_counter()
                sums = self._accumulate(batches, k, n_step, log_now, autocast)
                grad_norm = L.clip(self.params, tc.max_grad_norm, self.use_fsdp)
                lr = _lr_at(s, len(steps), tc)
                for group in self.opt.param_groups:
                    group["lr"] = lr
                if math.isfinite(grad_norm):
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                if procs.device.type == "cuda":
                    torch.cuda.synchronize(procs.device)
                step_s = time.perf_counter() - t0
                self.totals.add_step(n_step, step_s, math.isfinite(grad_norm))
                if log_now:
                    record = sums.all_reduce(procs).record(
                        stage=self.stage_name,
                        round_index=self.round_index,
                        step=s,
                        steps=len(steps),
                        epoch=epoch,
                        grad_norm=grad_norm,
                        lr=lr,
                        step_s=step_s,
                    )
                    self.totals.log_loss(record["loss"])
                    if procs.rank == 0:
                        self.run.append_metrics(self.round_index, record)
                    bar.set_postfix_str(f"loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s", refresh=False)
                bar.update(1)
                if tc.checkpoint_every_steps and (s + 1) % tc.checkpoint_every_steps == 0 and s + 1 < len(steps):
                    self._checkpoint(s + 1, epoch)
        finally:
            bar.close()

    def _accumulate(self, batches, k: int, n_step: int, log_now: bool, autocast) -> StepSums:
        """Forward and backward over one step's k micro-batches (gradients synchronised on the last);
        the step's sums. The loss of a micro-batch is weighted by its share of the step's tokens."""
        procs = self.procs
        sums = StepSums()
        on_device = {
            name: torch.zeros((), dtype=torch.float64, device=procs.device) for name in ("loss", *L.MODEL_METRICS)
        }  # no host sync per micro-batch
        for j in range(k):
            batch = next(batches)
            with L.grad_sync(self.wrapped, self.use_fsdp, procs.world > 1, j == k - 1), autocast():
                loss_sum, metrics = self.wrapped(L.to_device(batch, procs.device), need_metrics=log_now)
            (loss_sum * (batch["weight"] * procs.world / n_step)).backward()
            if batch["weight"]:
                for name, value in {"loss": loss_sum, **metrics}.items():
                    on_device[name] += value.detach().double()
                sums.add_batch(batch, log_now)
        for name, value in on_device.items():
            setattr(sums, name, float(value))
        return sums

    def _checkpoint(self, steps_done: int, epoch: int) -> None:
        self.ckpt.save(
            {
                "step": steps_done,
                "micro_batches_done": sum(len(m) for _, m in self.steps[:steps_done]),
                "epoch": epoch,
                "totals": dataclasses.asdict(self.totals),
                "producer": self.producer,
            }
        )

    def _finish(self) -> dict[str, Any]:
        """Export the student and write its manifest (rank 0); every process returns the summary."""
        procs, totals = self.procs, self.totals
        entries = export_student(
            run=self.run,
            student_dir=self.student_dir,
            procs=procs,
            learner=self.learner,
            use_fsdp=self.use_fsdp,
            tc=self.tc,
            start_dir=self.start.base,
        )
        if procs.rank == 0:
            summary = {
                "steps": len(self.steps),
                "resumed_from_step": self.resumed["step"] if self.resumed else 0,
                "epochs": self.tc.epochs,
                "samples": len(self.data),
                "completion_tokens": totals.tokens,
                "first_loss": totals.first_loss,
                "last_loss": totals.last_loss,
                "nonfinite_steps": totals.nonfinite_steps,
                "train_s": round(totals.train_s, 3),
                "tokens_per_s": round(totals.tokens / totals.train_s, 1) if totals.train_s else 0.0,
                "first_step_s": round(totals.first_step_s, 3) if totals.first_step_s is not None else None,
                "world_size": procs.world,
                "device": procs.device.type,
                "dtype": self.placement.dtype_name,
                "parallel": "fsdp" if self.use_fsdp else "ddp" if procs.world > 1 else "single",
                "lora_rank": self.tc.lora_rank,
                "quantization": dataclasses.asdict(quant.train_spec(self.tc)) if self.tc.quantize else None,
                "loss": self.tc.loss,
                "wall_s": round(time.perf_counter() - self.t_start, 3),
                "startup_s": self.startup_s,
                "load_s": round(self.load_s, 3),
                **self._summary_extras(),
            }
            write_manifest(
                self.run,
                self.student_dir,
                Manifest(
                    stage=STAGE, round=self.round_index, shards=entries, producer=dict(self.producer), summary=summary
                ),
            )
            storage.remove(self.run.fs, self.ckpt_dir)
        procs.barrier()
        manifest = read_manifest(self.run, self.student_dir)
        if manifest is None:
            raise OpdError(
                f"{self.student_dir}/{MANIFEST}: missing after rank 0 wrote it; is the run folder shared by all nodes?"
            )
        summary = {
            "stage": self.stage_name,
            "round": self.round_index,
            "skipped": False,
            "final": True,
            **manifest.summary,
        }
        if procs.rank == 0:
            self.run.append_metrics(self.round_index, {"time": time.time(), **summary})
        summary["line"] = summary_line(summary, self.student_dir)
        return summary

    def _skipped(self, done: Manifest) -> dict[str, Any]:
        summary = {"stage": self.stage_name, "round": self.round_index, "skipped": True, **done.summary}
        summary["line"] = (
            f"{self.stage_name} round {self.round_index}: already done ({self.student_dir}/{MANIFEST}, "
            f"{done.summary.get('steps', '?')} steps); pass --force to train it again"
        )
        return summary


def _lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 0 at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir")
@click.option("--round", "round_index", type=int, required=True, help="Round number.")
@click.option("--force", is_flag=True, help="Redo the stage even if its _DONE.json exists.")
@click.option("--sft-data", default=None, help="Fine-tune on this data file instead (`opd sft`; stages/sft.py).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override a config value, e.g. --set train.lr=1e-5 (repeatable).",
)
def main(run_dir: str, round_index: int, force: bool, sft_data: str | None, overrides: tuple[str, ...]) -> None:
    """Train round R's student from RUN_DIR's rollouts and cached teacher scores (what torchrun starts
    in every process, e.g. `torchrun --nproc-per-node 4 -m opd.stages.train RUN_DIR --round R`; `opd
    train --devices` launches it)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        rd = RunDir(run_dir)
        cfg = load_run_config(rd, list(overrides))
        if sft_data is not None:
            from opd.stages import sft

            summary = sft.run(cfg, rd, round_index, sft_data, force=force)
        else:
            summary = run(cfg, rd, round_index, force=force)
    except OpdError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank0 and not os.environ.get("OPD_TRAIN_LAUNCHED"):
        print(summary["line"])


if __name__ == "__main__":
    main()

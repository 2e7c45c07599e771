"""SFT stage (`opd sft`): plain cross-entropy fine-tuning of a round's student on new data, into that
round's student folder, so the next `opd run` round starts from it (continual learning: "SFT new
knowledge → self-distil old behaviour" is `opd sft` then `opd run` with run.teacher = "self:start").

Reads   RUN/opd.toml ([sft], [train], rollout.chat_template), the data file (--data, else sft.data;
        stages/sft_data.py), the student round R starts from (stages/students.py).
Writes  RUN/rounds/R/student/ and its `_DONE.json` (producer stage "sft": the round is an SFT round,
        which `opd run` skips and `self:start` reads), RUN/rounds/R/metrics.jsonl (`"stage": "sft"` step
        lines and a summary), RUN/rounds/R/train_ckpt/ while it runs: the learner's life cycle
        (stages/train.py) with the SFT data, a cross-entropy loss and [train] with sft.epochs and sft.lr.

    opd sft RUN --data FILE [--round R] [--devices cpu,cpu] [--force] [--set sft.epochs=2]

R defaults to the next round: the first without a finished student (so a second `opd sft` without
--round is a second SFT round; resume a killed one with its --round, or run it again before anything
else). A round that already has rollouts or scores is refused (it is a distillation round); the final
evaluation's round (held-out samples only) is not. Resume after kill -9 is the learner's (checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from opd.cache import fingerprint, storage
from opd.cache.errors import OpdError
from opd.cache.rundir import SFT_STAGE, RunDir, read_manifest
from opd.configs.schema import OpdConfig, TrainConfig
from opd.stages.distributed import Processes
from opd.stages.sft_data import SftBatches, SftData
from opd.stages.students import load_tokenizer, start_student
from opd.stages.train import _Round


def run(cfg: OpdConfig, run: RunDir, round_index: int, data_path: str, force: bool = False) -> dict[str, Any]:
    """Fine-tune the student round `round_index` starts from on `data_path`; returns the summary (key
    `line`). Under torchrun every process calls it."""
    check_round(run, round_index)
    procs = Processes.setup(cfg.train.device)
    try:
        with start_student(cfg, run, round_index) as start:
            return _SftRound(cfg, run, round_index, procs, start, data_path=data_path).train(force)
    finally:
        procs.close()


def next_round(run: RunDir) -> int:
    """The first round without a finished student: where `opd sft` writes by default."""
    r = 0
    while read_manifest(run, run.stage_dir(r, "student")) is not None:
        r += 1
    return r


def check_round(run: RunDir, round_index: int) -> None:
    """An SFT round holds no distillation: refuse a round that has rollouts or scores of its own (one
    line). Held-out samples are allowed: the final evaluation's round (`opd run`'s last) holds them, and
    they evaluate the student that starts the round, which the SFT does not change."""
    if round_index < 0:
        raise OpdError(f"--round {round_index} is invalid: must be >= 0")
    for folder in ("rollouts", "scores"):
        path = run.stage_dir(round_index, folder)
        if storage.exists(run.fs, path) and storage.listdir(run.fs, path):
            free = next_round(run)
            fix = (
                f"fine-tune into round {free} (the next free round: leave out --round)"
                if free != round_index
                else f"finish its distillation first (`opd run {run.url}`), or remove rounds/{round_index:04d}/"
            )
            raise OpdError(f"{path}: round {round_index} is a distillation round (it has {folder}); {fix}")


@dataclasses.dataclass
class _SftRound(_Round):
    """The learner's round with the SFT data and cross-entropy."""

    stage_name = "sft"
    data_path: str = ""

    def _train_config(self) -> TrainConfig:
        sft = self.cfg.sft
        return dataclasses.replace(self.cfg.train, epochs=sft.epochs, lr=sft.lr or self.cfg.train.lr)

    def _load_data(self) -> SftData:
        tokenizer = load_tokenizer(self.start.tokenizer_dir, f"student {self.start.label}")
        return SftData(self.cfg, self.data_path, tokenizer, str(self.start.tokenizer_dir))

    def _producer(self, micro_batches_per_step: int) -> dict[str, Any]:
        """The starting student, [train] as SFT runs it, [sft], rollout.chat_template, the data, the seed,
        the dtype and the step's micro-batch count."""
        as_run = dataclasses.replace(self.cfg, train=self.tc)  # [train] with sft.epochs and sft.lr
        settings = [as_run.section_hash("train"), as_run.section_hash("sft"), self.cfg.rollout.chat_template]
        return fingerprint.producer(
            SFT_STAGE,
            self.start.source,
            hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
            round=self.round_index,
            seed=self.cfg.run.seed,
            data_sha256=self.data.digest,
            micro_batches_per_step=micro_batches_per_step,
            dtype=self.placement.dtype_name,
        )

    def _dataset(self, items: list) -> SftBatches:
        return SftBatches(self.data, items, self.start.pad_id)

    def _check_inputs(self) -> None:
        pass  # SftData checked every row as it read them

    def _summary_extras(self) -> dict[str, Any]:
        data = self.data
        return {
            "loss": "cross_entropy",
            "data": self.data_path,
            "documents": data.documents,
            "chats": data.chats,
            "cut_samples": data.cut,
        }

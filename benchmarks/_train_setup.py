"""bench_train.py's data: a run folder of GSM8K-style rollouts scored by the teacher, and `Setup`, what
every variant reads from it (config, joined data, micro-batch plan, raw rows, padding id)."""

from __future__ import annotations

from pathlib import Path

import _common
import torch

from opd.cache.rundir import RunDir, finalize_stage, parquet_rows
from opd.cache.shards import read_rollout_shard, write_rollout_shard
from opd.configs.schema import (
    OpdConfig,
    RolloutConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    dumps_config,
    load_run_config,
)
from opd.stages import learner as L
from opd.stages import score
from opd.stages.models import resolve_model
from opd.stages.students import start_student
from opd.stages.train_data import RoundData, plan_epoch


def build_run(
    root: Path,
    data: str,
    samples: int,
    top_k: int,
    max_tokens: int,
    dtype: str,
    teacher: Path,
    student: Path,
    q_field: str = "question",
    a_field: str = "answer",
) -> RunDir:
    """A run folder with GSM8K rollouts (student chat template) scored by the teacher."""
    from transformers import AutoTokenizer

    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher=str(teacher)),
        rollout=RolloutConfig(prompts=data),
        score=ScoreConfig(top_k=top_k, max_tokens_per_batch=4096, dtype=dtype, device="cpu"),
        train=TrainConfig(beta=1.0, lr=1e-5, max_tokens_per_batch=max_tokens, device="cpu", dtype=dtype),
    )
    run = RunDir(root / "run")
    run.fs.create_dir(run.root, recursive=True)
    with run.fs.open_output_stream(run.config_path) as f:
        f.write(dumps_config(cfg).encode())
    tok = AutoTokenizer.from_pretrained(str(student))
    rows = _common.gsm8k_rows(
        tok, data, samples, q_field, a_field, source="student", finish_reason="stop", tag=b"bench"
    )
    write_rollout_shard(run.fs, run.shard_path(0, "rollouts", 0), rows, producer={"stage": "rollout", "bench": True})
    finalize_stage(
        run,
        run.stage_dir(0, "rollouts"),
        stage="rollouts",
        round_index=0,
        num_shards=1,
        producer={"stage": "rollout", "bench": True},
        row_count=lambda p: parquet_rows(run, p),
    )
    score.run(load_run_config(run), run, 0, device="cpu")
    return run


class Setup:
    """The run's config, joined data, micro-batch plan and the raw rows (for the sft / trl batches)."""

    def __init__(self, run_dir: str):
        self.run = RunDir(run_dir)
        self.cfg = load_run_config(self.run)
        self.student = resolve_model(self.cfg.run.student)  # the folders build_run wrote into the config
        self.teacher = resolve_model(self.cfg.run.teacher)
        self.placement = _common.resolve(self.cfg.train.device, self.cfg.train.dtype, "train.device")
        self.autocast = L.autocast(self.placement.device, self.placement.dtype)  # the learner's precision
        self.data = RoundData(self.run, 0)
        self.plan = plan_epoch(self.data.length_S, self.cfg.train.max_tokens_per_batch, self.cfg.run.seed, 0, 0)
        table, _ = read_rollout_shard(self.run.fs, self.data.paths[0].rollout)
        self.rows = table.select(["prompt_ids", "completion_ids"]).to_pylist()
        with start_student(self.cfg, self.run, 0) as start:
            self.pad_id = start.pad_id  # the learner's padding id
        from transformers import AutoConfig

        self.student_config = AutoConfig.from_pretrained(str(self.student))

    def tokens(self, mb) -> int:
        return int(self.data.tokens_S[mb].sum())

    def sft_batch(self, mb) -> dict[str, torch.Tensor]:
        """prompt + completion, right padded; labels -100 on the prompt and the padding."""
        seqs = [self.rows[int(self.data.rollout_row_S[i])] for i in mb]
        L = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, r in enumerate(seqs):
            P, T = len(r["prompt_ids"]), len(r["completion_ids"])
            ids[b, : P + T] = torch.tensor(r["prompt_ids"] + r["completion_ids"])
            labels[b, P : P + T] = torch.tensor(r["completion_ids"])
            mask[b, : P + T] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

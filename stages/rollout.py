"""Rollout stage: the student of round R samples completions of the prompt set into Parquet shards.

Reads   RUN/opd.toml ([run], [rollout]); the prompt set (`rollout.prompts`: a .jsonl file, a .parquet
        file, or a local HF `datasets` folder); the student: the base model (`run.student`) in round 0,
        else RUN/rounds/R-1/student/ (must hold `_DONE.json`; a PEFT LoRA adapter is served merged
        or as base + adapter, `rollout.merge_lora`); the teacher only for offpolicy_source="teacher".
Writes  RUN/rounds/RRRR/rollouts/part-SSSSS.parquet (one row per sample, cache/SPEC.md), then
        `_DONE.json` (shard list, row counts, checksums, producer, summary), and one `"stage":
        "rollout"` line in RUN/rounds/RRRR/metrics.jsonl per invocation.

    opd rollout RUN --round 0 [--shard 0/4] [--engine vllm|transformers] [--split all|train|heldout] [--force]

Splits. "train" samples the prompt set into rounds/R/rollouts/; "heldout" samples the validation set
([eval]: its prompts, n, length; temperature eval.temperature, no top-k/top-p, λ = 1) into
rounds/R/heldout/rollouts/, never trained on; "all" (default) does both that are configured with one
engine load. Everything below holds for each split in its own folder.

Prompts. A row holds chat `messages` ([{role, content}], `messages_field`, used when present) or a
plain prompt string (`prompt_field`, taken as one user message), an optional reference response
(`reference_field`) and an optional stable id (`id_field`, else the row number counted from 0 over
non-blank lines). With `chat_template` on, prompts are rendered with the student tokenizer's chat
template (generation prompt added); off, the plain text (message contents joined by blank lines) is
tokenized as is. `max_prompts` keeps the first N rows of the file; prompts longer than
`max_prompt_tokens` are then skipped and counted, never an error. A bad file (missing, empty, a
malformed line, a missing field) is a one-line OpdError naming the file and the line (JSONL) or row.

Shards. The kept prompts, in file order, are cut into shards of `prompts_per_shard`: shard j holds
kept prompts [j*S, (j+1)*S). Skipping depends only on the tokenizer and `max_prompt_tokens`, so every
worker computes the same assignment. `--shard i/N` workers own shards j % N == i; each shard is
written atomically, shards already present are skipped (after checking their producer), so a killed
rollout resumes with no lost or duplicated sample. Whichever worker sees every shard present writes
`_DONE.json` (its summary is computed from the shards, identical whoever writes it). `--force` clears
the stage first: all of it in a single-worker run, only the worker's own shards (and the manifest)
under `--shard i/N`, so late workers never delete their peers' finished shards.

λ. `rollout.lmbda_for_round(R)` is the fraction of *prompts* whose samples are the student's own.
Prompt p is on-policy iff u(seed, R, p) < λ, u a sha256 of (run.seed, round, prompt id) mapped to
[0, 1): a pure function, so resume and sharding make the same choice, and the on-policy set grows
monotonically with λ. Off-policy prompts give
  - offpolicy_source="dataset": ONE row (sample_index 0, source "dataset", finish_reason "reference",
    sampling_logprobs null): the reference tokenized with the student tokenizer, plus EOS, whole
    (`max_new_tokens` limits sampling, not data). n copies of one fixed response would only repeat
    the same tokens n times in the loss;
  - offpolicy_source="teacher": n rows sampled by the teacher (same engine kind, same settings, the
    student's prompt ids: the vocabularies must match), source "teacher", sampling_logprobs the
    teacher's processed log-probs. Both models are loaded together (vLLM: each gets half of
    `gpu_memory_utilization`).

Sampling log-probs are of the processed distribution (temperature, top-k, top-p applied), see the
engines. Randomness: engines are seeded from (run.seed, round, role); the transformers engine also
re-seeds per shard, so its shards are reproducible one by one; vLLM's are when requests repeat in order.

Producer fingerprint (shards and manifest): student model hash (the adapter folder for a LoRA student,
plus `base_model_hash`), tokenizer hash, a hash of the [rollout] section without the keys that only
choose *how* to sample (engine, gpu_memory_utilization, enforce_eager), the round, run.seed, λ, the
prompt set's content hash, and the teacher's hash when it samples. The engine is not part of it: the
workers of one stage may run different engines; each shard names its engine in its metadata.

Engines (stages/engine.py: interface; engine_vllm.py; engine_hf.py): "auto" = vLLM where importable,
except on CPU for a split that generates fewer than rollout.vllm_min_tokens tokens (transformers: vLLM's
start-up would cost more than it saves; resolved once, at the first split that loads an engine).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, ShardSpec, choose_splits, split_folder
from opd.cache.shards import SOURCES, check_producer, read_shard_meta, write_rollout_shard
from opd.configs.schema import OpdConfig
from opd.stages.engine import Engine, Sampling
from opd.stages.prompts import Prompt, load_prompts, on_policy, render
from opd.stages.rollout_engines import RolloutEngines
from opd.stages.rollout_rows import PRODUCER_STAGE, producer, sampling_hash, shard_rows, wants_offpolicy
from opd.stages.runner import Progress, ShardOutcome, StageResult, Units, combine, run_stage
from opd.stages.students import start_student, teacher_weights

STAGE = "rollouts"  # the run-directory folder (and manifest stage name)


def run(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec = ShardSpec(),
    engine: str | Engine | None = None,
    force: bool = False,
    split: str = "all",
) -> StageResult:
    """Sample round `round_index`'s rollouts (this worker's shards).

    `engine`: None = `rollout.engine`; "auto" / "vllm" / "transformers"; or an engine object already
    serving the student (the caller keeps ownership, e.g. one vLLM engine shared by several runs).
    `split`: "train" (the prompt set), "heldout" (the validation set, `[eval]`), or "all" (both that
    are configured, sharing one engine; the held-out split's result is the result's `heldout`).
    """
    splits = choose_splits(split, cfg.eval.enabled)
    with contextlib.ExitStack() as stack:
        student = stack.enter_context(start_student(cfg, run, round_index))
        teacher_dir = None
        if (
            "train" in splits
            and wants_offpolicy(cfg.rollout, round_index)
            and cfg.rollout.offpolicy_source == "teacher"
        ):
            teacher_dir = stack.enter_context(teacher_weights(cfg, run, round_index)).folder
        longest = max(split_config(cfg, sp).rollout.max_new_tokens for sp in splits)
        engines = RolloutEngines(
            cfg.replace("rollout", max_new_tokens=longest), round_index, student, teacher_dir, engine
        )
        try:
            results = [
                run_stage(
                    _RolloutSplit(
                        split_config(cfg, sp), run, round_index, sp, engines, teacher_dir if sp == "train" else None
                    ),
                    run,
                    round_index,
                    shard,
                    force=force,
                )
                for sp in splits
            ]
        finally:
            engines.close()
    return combine(results)


def split_config(cfg: OpdConfig, split: str) -> OpdConfig:
    """The config a split samples with: the held-out split takes its prompts and sampling from [eval],
    all on-policy, no top-k/top-p (so its log-probs are the student's own), the rest from [rollout]."""
    if split == "train":
        return cfg
    ev, rc = cfg.eval, cfg.rollout
    return cfg.replace(
        "rollout",
        prompts=ev.prompts,
        prompt_field=ev.prompt_field,
        messages_field=ev.messages_field,
        reference_field=ev.reference_field,
        id_field=ev.id_field,
        max_prompts=ev.max_prompts,
        n=ev.n,
        max_new_tokens=ev.max_new_tokens or rc.max_new_tokens,
        temperature=ev.temperature,
        top_p=1.0,
        top_k=-1,
        lmbda=1.0,
        lmbda_schedule=[],
        offpolicy_source="dataset",
        offpolicy_rows="lambda",
    )


@dataclass(frozen=True)
class RolloutExtras:
    """The rollout stage's own figures in a StageResult."""

    engine: str  # the engine that sampled ("vllm", "transformers")
    lmbda: float  # λ of this round
    prompts: int  # prompts kept (not too long)
    skipped_long_prompts: int  # prompts longer than rollout.max_prompt_tokens
    on_policy_prompts: int
    off_policy_prompts: int
    offpolicy_source: str
    offpolicy_rows: str
    student_samples_written: int
    offpolicy_samples_written: int


class _RolloutSplit:
    """One split of the rollout stage as the runner sees it (stages/runner.py): one shard is the
    samples of `prompts_per_shard` consecutive kept prompts."""

    name = PRODUCER_STAGE

    def __init__(
        self,
        cfg: OpdConfig,
        run: RunDir,
        round_index: int,
        split: str,
        engines: RolloutEngines,
        teacher_dir: Path | None,
    ):
        self.cfg, self.rc, self.run, self.round, self.split = cfg, cfg.rollout, run, round_index, split
        self.engines, self.teacher_dir = engines, teacher_dir
        self.folder = split_folder(split, STAGE)
        self.lmbda = self.rc.lmbda_for_round(round_index)
        self._producer = producer(
            cfg, round_index, self.lmbda, engines.student, teacher_dir, engines.placement.dtype_name
        )
        self.kept: list[Prompt] | None = None
        self.read = self.skipped = 0
        self.counts = {"student": 0, "offpolicy": 0}

    def producer(self) -> dict:
        return self._producer

    def units(self) -> Units:
        if self.kept is None:
            self._load_prompts()
        return Units(list(range(math.ceil(len(self.kept) / self.rc.prompts_per_shard))))

    def _load_prompts(self) -> None:
        from transformers import AutoTokenizer

        rc, tokenizer_dir = self.rc, self.engines.student.tokenizer_dir
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        prompts = load_prompts(rc, self.lmbda, self.cfg.score.teacher_context_field)
        self.kept, self.skipped = render(prompts, self.tokenizer, rc, tokenizer_dir)
        self.read = len(prompts)
        if not self.kept:
            raise OpdError(
                f"{rc.prompts}: no prompts left: all {self.skipped} are longer than "
                f"rollout.max_prompt_tokens={rc.max_prompt_tokens}"
            )
        for p in self.kept:
            p.on_policy = on_policy(self.cfg.run.seed, self.round, p.id, self.lmbda)
        if self.teacher_dir is not None:
            _check_same_vocab(self.tokenizer, self.teacher_dir)
        self.sampling = Sampling(
            n=rc.n,
            temperature=rc.temperature,
            top_p=rc.top_p,
            top_k=rc.top_k,
            max_new_tokens=rc.max_new_tokens,
            stop=tuple(rc.stop),
        )
        self.sampling_hash = sampling_hash(rc, self.cfg.run.seed)

    def _items(self, s: int) -> list[Prompt]:
        S = self.rc.prompts_per_shard
        return self.kept[s * S : (s + 1) * S]

    def keep(self, s: int) -> bool:
        path = self.run.shard_path(self.round, self.folder, s)
        if not storage.exists(self.run.fs, path):
            return False
        check_producer(path, read_shard_meta(self.run.fs, path).get("producer", {}), self._producer)
        return True

    def size(self, s: int) -> int:
        return len(self._items(s))

    def prepare(self, todo: list[int]) -> None:
        items = [p for s in todo for p in self._items(s)]
        self.engines.size_job(len(items) * self.sampling.n * self.sampling.max_new_tokens)
        self.engines.prepare(
            student=any(p.on_policy for p in items),
            teacher=self.teacher_dir is not None and not all(p.on_policy for p in items),
        )

    def work(self, s: int, progress: Progress) -> ShardOutcome:
        rows, tokens = shard_rows(self, self._items(s), s, progress)
        size = write_rollout_shard(
            self.run.fs,
            self.run.shard_path(self.round, self.folder, s),
            rows,
            self._producer,
            extra_meta={
                "round": self.round,
                "shard": s,
                "split": self.split,
                "engine": self.engines.name,
                "sampling_hash": self.sampling_hash,
            },
        )
        for r in rows:
            self.counts["student" if r["source"] == "student" else "offpolicy"] += 1
        return ShardOutcome(samples=len(rows), tokens=tokens, bytes=size)

    def summarize(self, numbers: list[int]) -> dict:
        """Figures for `_DONE.json`, computed from the shards (equal whichever worker computes them)."""
        sources = {s: 0 for s in SOURCES}
        tokens = samples = 0
        for s in numbers:
            path = self.run.shard_path(self.round, self.folder, s)
            table = pq.read_table(path, filesystem=self.run.fs, columns=["source", "completion_ids"])
            samples += table.num_rows
            for src in table.column("source").to_pylist():
                sources[src] += 1
            tokens += sum(len(c) for c in table.column("completion_ids").to_pylist())
        on = sum(p.on_policy for p in self.kept)
        return {
            "prompts_read": self.read,
            "prompts": len(self.kept),
            "skipped_long_prompts": self.skipped,
            "lmbda": self.lmbda,
            "offpolicy_rows": self.rc.offpolicy_rows,
            "on_policy_prompts": on,
            "off_policy_prompts": len(self.kept) - on,
            "samples": samples,
            "completion_tokens": tokens,
            "sources": sources,
            "shards": len(numbers),
        }

    def extras(self) -> RolloutExtras:
        on = sum(p.on_policy for p in self.kept)
        return RolloutExtras(
            engine=self.engines.name,
            lmbda=self.lmbda,
            prompts=len(self.kept),
            skipped_long_prompts=self.skipped,
            on_policy_prompts=on,
            off_policy_prompts=len(self.kept) - on,
            offpolicy_source=self.rc.offpolicy_source,
            offpolicy_rows=self.rc.offpolicy_rows,
            student_samples_written=self.counts["student"],
            offpolicy_samples_written=self.counts["offpolicy"],
        )

    def describe(self, r: StageResult) -> str:
        rc, x = self.rc, r.extras
        what = f"rollout round {self.round}" + ("" if self.split == "train" else f" {self.split}")
        missing = r.shards_total - len(self.run.existing_shards(self.round, self.folder))
        state = "done" if r.done else f"{missing} shard(s) left to other workers"
        mix = (
            "every prompt has both kinds of rows (train.lmbda chooses); "
            if rc.offpolicy_rows == "both"
            else f"λ={x.lmbda:g}: {x.on_policy_prompts}/{x.prompts} prompts on-policy; "
        )
        return (
            f"{what} [{r.shard}] {x.engine}: {r.shards_written} shard(s) written, "
            f"{r.shards_present} already present; {r.samples} samples "
            f"({x.student_samples_written} student, {x.offpolicy_samples_written} {rc.offpolicy_source}), "
            f"{r.tokens} tokens at {r.tokens_per_s:.0f} tok/s; "
            f"{x.skipped_long_prompts} prompts skipped (> {rc.max_prompt_tokens} tokens); {mix}{state}"
        )


def _check_same_vocab(tokenizer, teacher_dir: Path) -> None:
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(str(teacher_dir)).get_vocab() != tokenizer.get_vocab():
        raise OpdError(
            f"{teacher_dir}: the teacher's vocabulary differs from the student's; teacher "
            f"off-policy samples reuse the student's prompt ids, so both must share one tokenizer"
        )

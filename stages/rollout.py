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

Engines (stages/engine.py: interface; engine_vllm.py; engine_hf.py): "auto" = vLLM where importable.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from opd.cache import fingerprint, storage
from opd.cache.errors import OpdError
from opd.cache.rundir import (
    MANIFEST,
    RunDir,
    ShardSpec,
    choose_splits,
    combine_splits,
    finalize_stage,
    read_manifest,
    shard_index,
    shard_name,
    should_skip,
    split_folder,
)
from opd.cache.shards import FORMAT_VERSION, SOURCES, check_producer, read_shard_meta, write_rollout_shard
from opd.configs.schema import OpdConfig, RolloutConfig
from opd.stages import console
from opd.stages.devices import placement
from opd.stages.engine import Engine, Sampling, load_engine, resolve_engine_name
from opd.stages.models import resolve_model
from opd.stages.prompts import Prompt, load_prompts, on_policy, prompts_hash, render
from opd.stages.students import StartStudent, start_student

STAGE = "rollouts"  # the run-directory folder (and manifest stage name)
PRODUCER_STAGE = "rollout"  # the producer record's stage


def run(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec = ShardSpec(),
    engine: str | Engine | None = None,
    force: bool = False,
    split: str = "all",
) -> dict:
    """Sample round `round_index`'s rollouts (this worker's shards); returns a summary dict.

    `engine`: None = `rollout.engine`; "auto" / "vllm" / "transformers"; or an engine object already
    serving the student (the caller keeps ownership, e.g. one vLLM engine shared by several runs).
    `split`: "train" (the prompt set), "heldout" (the validation set, `[eval]`), or "all" (both that
    are configured, sharing one engine). The summary is the first split's, with the held-out split's
    under "heldout"; its "line" is the one-line human summary per split the CLI prints.
    """
    splits = choose_splits(split, cfg.eval.enabled)
    with start_student(cfg, run, round_index) as student:
        return _run(cfg, run, round_index, shard, engine, force, splits, student)


def _run(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec,
    engine,
    force: bool,
    splits: list[str],
    student: StartStudent,
) -> dict:
    teacher_dir = None
    if "train" in splits and _wants_offpolicy(cfg.rollout, round_index) and cfg.rollout.offpolicy_source == "teacher":
        teacher_dir = resolve_model(cfg.run.teacher, cfg.run.models_dir or None)
    longest = max(split_config(cfg, sp).rollout.max_new_tokens for sp in splits)
    engines = _Engines(cfg.replace("rollout", max_new_tokens=longest), round_index, student, teacher_dir, engine)
    try:
        summaries = [
            _run_split(
                split_config(cfg, sp),
                run,
                round_index,
                shard,
                engines,
                force,
                sp,
                student,
                teacher_dir if sp == "train" else None,
            )
            for sp in splits
        ]
    finally:
        engines.close()
    return combine_splits(summaries)


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


def _run_split(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec,
    engines: "_Engines",
    force: bool,
    split: str,
    student: StartStudent,
    teacher_dir: Path | None,
) -> dict:
    rc = cfg.rollout
    t0 = time.perf_counter()
    lmbda = rc.lmbda_for_round(round_index)
    folder = split_folder(split, STAGE)
    stage_dir = run.stage_dir(round_index, folder)
    producer = _producer(cfg, round_index, lmbda, student, teacher_dir, engines.placement.dtype_name)
    what = f"rollout round {round_index}" + ("" if split == "train" else f" {split}")

    mine = None  # --force under --shard i/N clears this worker's shards only (and the manifest)
    if shard.count > 1:
        mine = [
            n for n in storage.listdir(run.fs, stage_dir) if shard_index(n) is not None and shard.owns(shard_index(n))
        ]
    if should_skip(run, stage_dir, producer, force, only=mine):
        manifest = read_manifest(run, stage_dir)
        summary = {"round": round_index, "split": split, "shard": str(shard), "skipped": True, **manifest.summary}
        summary["line"] = (
            f"{what}: already done ({manifest.total_rows} samples in "
            f"{len(manifest.shards)} shards, {stage_dir}/{MANIFEST}); --force redoes it"
        )
        return summary

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student.tokenizer_dir))
    prompts = load_prompts(rc, lmbda)
    kept, skipped = render(prompts, tokenizer, rc, student.tokenizer_dir)
    if not kept:
        raise OpdError(
            f"{rc.prompts}: no prompts left: all {skipped} are longer than "
            f"rollout.max_prompt_tokens={rc.max_prompt_tokens}"
        )
    for p in kept:
        p.on_policy = on_policy(cfg.run.seed, round_index, p.id, lmbda)
    if teacher_dir is not None:
        _check_same_vocab(tokenizer, teacher_dir)

    S = rc.prompts_per_shard
    num_shards = math.ceil(len(kept) / S)
    owned = shard.owned(num_shards)
    storage.remove_tmp_files(run.fs, stage_dir, {shard_name(s) for s in owned})
    present = set(run.existing_shards(round_index, folder))
    for s in sorted(present):
        path = run.shard_path(round_index, folder, s)
        check_producer(path, read_shard_meta(run.fs, path).get("producer", {}), producer)
    todo = [s for s in owned if s not in present]

    sampling = Sampling(
        n=rc.n,
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=rc.top_k,
        max_new_tokens=rc.max_new_tokens,
        stop=tuple(rc.stop),
    )
    sampling_hash = _sampling_hash(rc, cfg.run.seed)
    stats = {"samples": 0, "student": 0, "offpolicy": 0, "tokens": 0, "gen_seconds": 0.0}
    todo_items = [p for s in todo for p in kept[s * S : (s + 1) * S]]
    engines.prepare(
        student=any(p.on_policy for p in todo_items),
        teacher=teacher_dir is not None and not all(p.on_policy for p in todo_items),
    )
    bar = console.bar(
        total=len(todo_items), unit="prompt", desc=f"rollout r{round_index} {split} [{shard}]", disable=not todo
    )
    gen_start = time.perf_counter()  # model loading stays out of tokens/s

    def progress(prompts_done: int, tokens: int) -> None:
        stats["tokens"] += tokens
        bar.update(prompts_done)
        bar.set_postfix_str(f"{stats['tokens'] / max(time.perf_counter() - gen_start, 1e-9):.0f} tok/s")

    try:
        job = _ShardJob(
            engines, sampling, sampling_hash, tokenizer, rc, cfg.run.seed, round_index, split, progress, stats
        )
        for s in todo:
            items = kept[s * S : (s + 1) * S]
            rows = _shard_rows(job, items, s)
            write_rollout_shard(
                run.fs,
                run.shard_path(round_index, folder, s),
                rows,
                producer,
                extra_meta={
                    "round": round_index,
                    "shard": s,
                    "split": split,
                    "engine": engines.name,
                    "sampling_hash": sampling_hash,
                },
            )
            stats["samples"] += len(rows)
    finally:
        stats["gen_seconds"] = time.perf_counter() - gen_start
        bar.close()

    on = sum(p.on_policy for p in kept)
    done_summary = _stage_summary(
        run, round_index, folder, num_shards, len(prompts), len(kept), skipped, on, lmbda, rc.offpolicy_rows
    )
    manifest = (
        finalize_stage(
            run,
            stage_dir,
            stage=folder,
            round_index=round_index,
            num_shards=num_shards,
            producer=producer,
            row_count=lambda path: done_summary["_rows"][path],
            summary=_public(done_summary),
        )
        if done_summary
        else None
    )
    summary = {
        "round": round_index,
        "split": split,
        "shard": str(shard),
        "engine": engines.name,
        "lmbda": lmbda,
        "prompts": len(kept),
        "skipped_long_prompts": skipped,
        "on_policy_prompts": on,
        "off_policy_prompts": len(kept) - on,
        "offpolicy_source": rc.offpolicy_source,
        "offpolicy_rows": rc.offpolicy_rows,
        "shards_total": num_shards,
        "shards_owned": len(owned),
        "shards_written": len(todo),
        "shards_present_before": len(present & set(owned)),
        "shards_missing": num_shards - len(set(run.existing_shards(round_index, folder))),
        "samples_written": stats["samples"],
        "student_samples_written": stats["student"],
        "offpolicy_samples_written": stats["offpolicy"],
        "completion_tokens_generated": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / stats["gen_seconds"], 2) if stats["tokens"] else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
        "done": manifest is not None,
    }
    if manifest is not None:
        summary["total_samples"] = manifest.total_rows
    run.append_metrics(round_index, {"stage": "rollout", "time": time.time(), **summary})
    summary["line"] = _summary_line(summary, rc, what)
    return summary


# ------------------------------------------------------------------------------------------ models


def _merge_lora(student: StartStudent) -> Path:
    """Merge the LoRA adapter into its base (peft merge_and_unload) in a temporary folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="opd-merged-student-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(student.base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(student.adapter)).merge_and_unload()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(student.tokenizer_dir)).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _check_same_vocab(tokenizer, teacher_dir: Path) -> None:
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(str(teacher_dir)).get_vocab() != tokenizer.get_vocab():
        raise OpdError(
            f"{teacher_dir}: the teacher's vocabulary differs from the student's; teacher "
            f"off-policy samples reuse the student's prompt ids, so both must share one tokenizer"
        )


class _Engines:
    """Student and teacher engines, built on first use, closed at the end (unless passed in)."""

    def __init__(
        self,
        cfg: OpdConfig,
        round_index: int,
        student: StartStudent,
        teacher_dir: Path | None,
        engine: str | Engine | None,
    ):
        self.cfg, self.round, self.student, self.teacher_dir = cfg, round_index, student, teacher_dir
        self.placement = placement("auto", cfg.rollout.dtype, "rollout")
        self._described = False
        self._given = None if engine is None or isinstance(engine, str) else engine
        if self._given is not None:
            served = Path(self._given.served).resolve()
            if served not in (student.source.resolve(), student.base.resolve()):
                raise OpdError(
                    f"the engine passed in serves {served}, but round {round_index}'s student is {student.source}"
                )
            self.name = self._given.name
        else:
            self.name = resolve_engine_name(engine or cfg.rollout.engine)
        self._student: Engine | None = self._given
        self._teacher: Engine | None = None
        self._tmp: list[Path] = []

    def _load(self, model_dir: Path, role: str, tokenizer_dir: Path, adapter: Path | None) -> Engine:
        rc = self.cfg.rollout
        if not self._described:
            console.say(self.placement.describe(f"rollout ({self.name})"))
            self._described = True
        share = 2 if self.teacher_dir is not None else 1  # both models live together
        return load_engine(
            self.name,
            str(model_dir),
            seed=fingerprint.derive_seed(self.cfg.run.seed, self.round, role),
            tokenizer_dir=str(tokenizer_dir),
            adapter_dir=str(adapter) if adapter else None,
            max_model_len=_max_model_len(model_dir, rc),
            gpu_memory_utilization=rc.gpu_memory_utilization / share,
            enforce_eager=rc.enforce_eager,
            dtype=self.placement.dtype_name,
        )

    def prepare(self, student: bool, teacher: bool) -> None:
        """Load the engines the work needs now (so model loading stays out of the tokens/s figure)."""
        if student:
            self.student_engine()
        if teacher:
            self.teacher_engine()

    def student_engine(self) -> Engine:
        if self._student is None:
            s = self.student
            if s.adapter is not None and self.cfg.rollout.merge_lora:
                merged = _merge_lora(s)
                self._tmp.append(merged)
                self._student = self._load(merged, "student", merged, None)
            else:  # base + adapter; vLLM reads a config.json beside the tokenizer, so prefer the base's when equal
                same = s.adapter is None or (
                    fingerprint.tokenizer_hash(s.tokenizer_dir) == fingerprint.tokenizer_hash(s.base)
                )
                self._student = self._load(s.base, "student", s.base if same else s.tokenizer_dir, s.adapter)
        return self._student

    def teacher_engine(self) -> Engine:
        if self._teacher is None:
            self._teacher = self._load(self.teacher_dir, "teacher", self.teacher_dir, None)
        return self._teacher

    def close(self) -> None:
        for e in (self._student, self._teacher):
            if e is not None and e is not self._given:
                e.close()
        self._student = self._given
        self._teacher = None
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)
        self._tmp.clear()


def _max_model_len(model_dir: Path, rc: RolloutConfig) -> int:
    need = rc.max_prompt_tokens + rc.max_new_tokens
    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        limit = None
    return min(need, int(limit)) if limit else need


# ------------------------------------------------------------------------------------------ shards


@dataclass
class _ShardJob:
    """What writing the shards of one split needs (the same for each shard)."""

    engines: _Engines
    sampling: Sampling
    sampling_hash: str
    tokenizer: Any
    rc: RolloutConfig
    seed: int
    round_index: int
    split: str
    progress: Any  # progress(prompts_done, tokens)
    stats: dict


def _shard_rows(job: _ShardJob, items: list[Prompt], shard: int) -> list[dict]:
    """Rows of one shard, in prompt order, samples 0..n-1 (one row for a dataset reference)."""
    engines, sampling, sampling_hash, tokenizer = job.engines, job.sampling, job.sampling_hash, job.tokenizer
    rc, seed, round_index, split, progress, stats = (
        job.rc,
        job.seed,
        job.round_index,
        job.split,
        job.progress,
        job.stats,
    )
    role = "student" if split == "train" else f"student-{split}"  # held-out draws its own random stream
    both = rc.offpolicy_rows == "both"  # every prompt: the student's samples and its off-policy rows
    on = items if both else [p for p in items if p.on_policy]
    off = items if both else [p for p in items if not p.on_policy]
    generated: dict[str, list] = {}
    if on:
        outs = engines.student_engine().generate(
            [p.prompt_ids for p in on],
            sampling,
            seed=fingerprint.derive_seed(seed, round_index, role, shard),
            progress=progress,
        )
        generated.update({p.id: o for p, o in zip(on, outs)})
    teacher_outs: dict[str, list] = {}
    if off and rc.offpolicy_source == "teacher":
        outs = engines.teacher_engine().generate(
            [p.prompt_ids for p in off],
            sampling,
            seed=fingerprint.derive_seed(seed, round_index, "teacher", shard),
            progress=progress,
        )
        teacher_outs.update({p.id: o for p, o in zip(off, outs)})
    elif off and not both:
        progress(len(off), 0)
    off_ids = {p.id for p in off}
    first_off = sampling.n if both else 0  # off-policy rows follow the student's in "both" mode
    rows = []
    for p in items:
        messages = json.dumps(p.messages, ensure_ascii=False)
        base = {
            "prompt_id": p.id,
            "prompt_ids": p.prompt_ids,
            "sampling_hash": sampling_hash,
            "prompt_messages": messages,
        }
        sampled = [("student", i, c) for i, c in enumerate(generated.get(p.id, []))]
        sampled += [("teacher", first_off + i, c) for i, c in enumerate(teacher_outs.get(p.id, []))]
        for source, i, c in sampled:
            rows.append(
                {
                    **base,
                    "sample_id": f"{p.id}/{i}",
                    "sample_index": i,
                    "source": source,
                    "completion_ids": c.token_ids,
                    "sampling_logprobs": c.logprobs,
                    "finish_reason": c.finish_reason,
                }
            )
            stats["student" if source == "student" else "offpolicy"] += 1
        if p.id in off_ids and rc.offpolicy_source == "dataset":
            rows.append(
                {
                    **base,
                    "sample_id": f"{p.id}/{first_off}",
                    "sample_index": first_off,
                    "source": "dataset",
                    "completion_ids": _reference_ids(tokenizer, p.reference or ""),
                    "sampling_logprobs": None,
                    "finish_reason": "reference",
                }
            )
            stats["offpolicy"] += 1
    return rows


def _wants_offpolicy(rc: RolloutConfig, round_index: int) -> bool:
    """Does round R's rollout write off-policy rows (λ < 1, or every prompt's in "both" mode)?"""
    return rc.offpolicy_rows == "both" or rc.lmbda_for_round(round_index) < 1


def _reference_ids(tokenizer, text: str) -> list[int]:
    """The reference response as completion ids: tokenized (no specials), then EOS."""
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _stage_summary(
    run: RunDir,
    round_index: int,
    folder: str,
    num_shards: int,
    read: int,
    kept: int,
    skipped: int,
    on: int,
    lmbda: float,
    offpolicy_rows: str = "lambda",
) -> dict | None:
    """Figures for `_DONE.json`, computed from the shards (equal whichever worker computes them);
    None while some shard is missing."""
    present = set(run.existing_shards(round_index, folder))
    if any(s not in present for s in range(num_shards)):
        return None
    sources = {s: 0 for s in SOURCES}
    tokens, rows_by_path = 0, {}
    for s in range(num_shards):
        path = run.shard_path(round_index, folder, s)
        table = pq.read_table(path, filesystem=run.fs, columns=["source", "completion_ids"])
        rows_by_path[path] = table.num_rows
        for src in table.column("source").to_pylist():
            sources[src] += 1
        tokens += sum(len(c) for c in table.column("completion_ids").to_pylist())
    return {
        "prompts_read": read,
        "prompts": kept,
        "skipped_long_prompts": skipped,
        "lmbda": lmbda,
        "offpolicy_rows": offpolicy_rows,
        "on_policy_prompts": on,
        "off_policy_prompts": kept - on,
        "samples": sum(rows_by_path.values()),
        "completion_tokens": tokens,
        "sources": sources,
        "shards": num_shards,
        "_rows": rows_by_path,
    }


def _public(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------ hashes


def _producer(
    cfg: OpdConfig, round_index: int, lmbda: float, student: StartStudent, teacher_dir: Path | None, dtype: str
) -> dict:
    p = {
        "stage": PRODUCER_STAGE,
        "model_hash": fingerprint.model_hash(student.source),
        "tokenizer_hash": fingerprint.tokenizer_hash(student.tokenizer_dir),
        "config_hash": cfg.section_hash("rollout"),
        "format_version": FORMAT_VERSION,
        "round": round_index,
        "seed": cfg.run.seed,
        "lmbda": lmbda,
        "prompts_hash": prompts_hash(cfg.rollout.prompts),
        "dtype": dtype,
    }
    if student.adapter is not None:
        p["base_model_hash"] = fingerprint.model_hash(student.base)
    if teacher_dir is not None:
        p["teacher_hash"] = fingerprint.model_hash(teacher_dir)
    return p


def _sampling_hash(rc: RolloutConfig, seed: int) -> str:
    settings = {
        "temperature": rc.temperature,
        "top_p": rc.top_p,
        "top_k": rc.top_k,
        "max_new_tokens": rc.max_new_tokens,
        "stop": list(rc.stop),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _summary_line(s: dict, rc: RolloutConfig, what: str) -> str:
    state = "done" if s["done"] else f"{s['shards_missing']} shard(s) left to other workers"
    return (
        f"{what} [{s['shard']}] {s['engine']}: {s['shards_written']} shard(s) written, "
        f"{s['shards_present_before']} already present; {s['samples_written']} samples "
        f"({s['student_samples_written']} student, {s['offpolicy_samples_written']} {rc.offpolicy_source}), "
        f"{s['completion_tokens_generated']} tokens at {s['tokens_per_s']:.0f} tok/s; "
        f"{s['skipped_long_prompts']} prompts skipped (> {rc.max_prompt_tokens} tokens); "
        + (
            "every prompt has both kinds of rows (train.lmbda chooses); "
            if rc.offpolicy_rows == "both"
            else f"λ={s['lmbda']:g}: {s['on_policy_prompts']}/{s['prompts']} prompts on-policy; "
        )
        + state
    )

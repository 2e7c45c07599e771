"""Score stage: the teacher's top-k log-probs for every completion token of a round's rollouts.

Reads   RUN/opd.toml ([score], run.teacher, run.student), RUN/rounds/R/rollouts/part-SSSSS.parquet and
        RUN/rounds/R/rollouts/_DONE.json (the rollout stage must be finished), the student's tokenizer
        (run.student in round 0, RUN/rounds/R-1/student after) to check the teacher shares its vocabulary.
Writes  RUN/rounds/R/scores/part-SSSSS.parquet, one per rollout shard with the same number (format in
        cache/SPEC.md); RUN/rounds/R/scores/_DONE.json once every shard exists; one JSON line in
        RUN/rounds/R/metrics.jsonl per invocation.

    opd score RUN --round 0 [--shard 0/4] [--device cuda:1] [--engine transformers|vllm] [--split all|train|heldout] [--follow] [--force]

Per completion position t (the teacher's distribution predicting completion_ids[t] from the prompt and
completion_ids[:t]) at the scoring temperature τ: the top-k ids and log-probs, the exact taken-token
log-prob, the tail log Σ_{v∉top-k} p(v), entropy and top-k mass. The teacher engine (`score.engine`)
computes them: transformers (stages/scorer_hf.py, the reference) or vLLM with tensor, pipeline and
expert parallelism (stages/scorer_vllm.py), behind one interface (stages/scorer.py); both write the
same shard format, and the shard's producer and stats name the engine.
Each shard's producer is the stage's (teacher hash, tokenizer hash, [score] hash, format version,
resolved dtype and engine) plus
`rollout_sha256`, the sha256 of the rollout shard it scores, so a learner can check that a score shard
belongs to the rollout shard it reads; the manifest's adds `rollouts_sha256`, a digest of the whole
rollout manifest. Shards need nothing from the rollout manifest, so `--follow` can score rollout shards
as they appear (each is renamed into place whole) while the rollout stage still runs.

Splits: `--split train` scores RUN/rounds/R/rollouts/ into scores/, `--split heldout` the validation
samples RUN/rounds/R/heldout/rollouts/ into heldout/scores/ (after which `opd score` computes
heldout/eval.json with opd.pipeline.evaluate); `--split all` (default) does both that exist in the
config, teacher loaded once.

A background thread packs (codec) and writes shards while the teacher scores the next batch.

Resume: shards already present and valid (readable, right producer, right row count) are kept; the
`.tmp-` leftovers of this worker's shards are removed; `--shard i/N` scores shards s with s % N == i.
Whichever worker sees every shard present writes the manifest (its summary is computed from the shards,
so it is the same whoever writes it).

Shape legend: N scored positions, V scored vocabulary (stages/scorer.py), K top-k.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opd.cache import fingerprint, storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError
from opd.cache.rundir import (
    MANIFEST,
    Manifest,
    RunDir,
    ShardEntry,
    ShardSpec,
    choose_splits,
    clear_stage,
    combine_splits,
    finalize_stage,
    parquet_rows,
    read_manifest,
    shard_index,
    shard_name,
    should_skip,
    split_folder,
)
from opd.cache.shards import ScoreShard, ScoreShardWriter, check_producer, read_rollout_shard, read_shard_meta
from opd.configs.schema import OpdConfig
from opd.stages import console
from opd.stages.devices import placement
from opd.stages.models import resolve_model
from opd.stages.scorer import BatchOut, Scorer, Seq, load_scorer, resolve_score_engine
from opd.stages.students import load_tokenizer, start_student

_MAX_QUEUED = 3  # background jobs in flight before the forward waits


def run(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec = ShardSpec(),
    device: str | None = None,
    force: bool = False,
    split: str = "all",
    follow: bool = False,
    poll_s: float = 1.0,
    teacher: "Teacher | None" = None,
) -> dict[str, Any]:
    """Score round `round_index`'s rollout shards owned by `shard`; returns the summary (key `line`: one line).

    `split`: "train", "heldout" (the validation samples, RUN/rounds/R/heldout/) or "all" (both that
    are configured; the teacher loads once). `follow`: do not require the rollout manifest yet;
    score rollout shards as they appear (each is renamed into place whole) until the rollout stage
    writes its manifest: how `opd run` overlaps scoring with rollout. `teacher`: a Teacher the caller
    owns and releases, shared by runs of one [score] config (`opd sweep --eval heldout`: one load for
    every setting's held-out samples).
    """
    splits = choose_splits(split, cfg.eval.enabled)
    owned = teacher is None
    teacher = Teacher(cfg, device) if owned else teacher
    try:
        summaries = [_run_split(cfg, run, round_index, shard, teacher, force, sp, follow, poll_s) for sp in splits]
    finally:
        if owned:
            teacher.release()
    return combine_splits(summaries)


def _folders(split: str) -> tuple[str, str]:
    """(rollouts folder, scores folder) of a split under rounds/R/."""
    return split_folder(split, "rollouts"), split_folder(split, "scores")


class Teacher:
    """The teacher and its scorer (engine resolved here), loaded on first use and shared by the splits
    of one invocation (or by the runs of a sweep); `loads` counts its loads."""

    def __init__(self, cfg: OpdConfig, device: str | None):
        self.cfg = cfg
        self.dir = resolve_model(cfg.run.teacher, cfg.run.models_dir or None)
        self.tokenizer = load_tokenizer(self.dir, f"teacher {cfg.run.teacher}")
        self.engine = resolve_score_engine(cfg.score, self.dir)
        self.placement = placement(device or cfg.score.device, cfg.score.dtype, "score.device")
        self.dev, self.dtype = self.placement.device, self.placement.dtype
        self._scorer: Scorer | None = None
        self.loads = 0

    def scorer(self) -> "Scorer":
        if self._scorer is None:
            self.loads += 1
            console.say(self.placement.describe("score") + f"; engine {self.engine}")
            self._scorer = load_scorer(self.engine, self.dir, self.cfg.score, self.placement, len(self.tokenizer))
        return self._scorer

    def counters(self) -> dict[str, int]:
        """The engine's own counts so far (vLLM: prefix-cache reuse), {} before it is loaded."""
        return dict(self._scorer.counters) if self._scorer is not None else {}

    def release(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
        self._scorer = None


def _run_split(
    cfg: OpdConfig,
    run: RunDir,
    round_index: int,
    shard: ShardSpec,
    teacher: Teacher,
    force: bool,
    split: str,
    follow: bool,
    poll_s: float,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    counters0 = teacher.counters()
    sc = cfg.score
    r_folder, s_folder = _folders(split)
    rollouts_dir = run.stage_dir(round_index, r_folder)
    scores_dir = run.stage_dir(round_index, s_folder)
    rollouts = read_manifest(run, rollouts_dir)
    if rollouts is None and not follow:
        raise OpdError(
            f"{storage.join(rollouts_dir, MANIFEST)} not found (round {round_index} has no finished "
            f"{'held-out ' if split != 'train' else ''}rollouts): run `opd rollout {run.url} "
            f"--round {round_index}` first"
        )
    with start_student(cfg, run, round_index, files="tokenizer") as student:
        student_tok = load_tokenizer(student.tokenizer_dir, f"student {student.label}")
        _check_vocab(cfg.run.teacher, teacher.tokenizer, student.label, student_tok)
    base_producer = fingerprint.producer(
        "score", teacher.dir, cfg.section_hash("score"), dtype=teacher.placement.dtype_name, engine=teacher.engine
    )
    stats = _Totals()
    job = _Job(run, round_index, split, cfg, teacher, stats)
    followed: set[int] = set()
    if rollouts is None:
        if force:
            clear_stage(
                run,
                scores_dir,
                None
                if shard.count == 1
                else [
                    n
                    for n in storage.listdir(run.fs, scores_dir)
                    if shard_index(n) is not None and shard.owns(shard_index(n))
                ],
            )
            force = False
        rollouts = _follow(job, shard, base_producer, followed, poll_s)
    entries = _rollout_entries(rollouts, rollouts_dir)
    stage_producer = {**base_producer, "rollouts_sha256": rollouts.digest()}
    shard_producers = {s: {**base_producer, "rollout_sha256": e.sha256} for s, e in entries.items()}
    owned = [s for s in entries if shard.owns(s)]
    only = None if shard.count == 1 else [shard_name(s) for s in owned]  # --force clears only this worker's shards
    # a follower that scored shards reports them even if a peer wrote the manifest in the meantime
    if not followed and should_skip(run, scores_dir, stage_producer, force, only):
        done = read_manifest(run, scores_dir)
        return _skipped_summary(run, scores_dir, round_index, shard, done, split)

    storage.remove_tmp_files(run.fs, scores_dir, {shard_name(s) for s in owned})
    pending = [s for s in owned if not _valid_shard(run, scores_dir, s, entries[s].rows, shard_producers[s])]
    replaced = sum(
        1 for s in pending if s not in followed and storage.exists(run.fs, run.shard_path(round_index, s_folder, s))
    )
    if pending:
        t0 = time.perf_counter()
        _score_shards(job, pending, entries, shard_producers)
        stats.score_s += time.perf_counter() - t0

    manifest = None
    numbers = sorted(entries)
    stage_summary = None
    if set(numbers) <= set(run.existing_shards(round_index, s_folder)):
        stage_summary = _stage_summary(run, scores_dir, numbers, shard_producers, sc)
    if stage_summary is not None:
        manifest = finalize_stage(
            run,
            scores_dir,
            stage=s_folder,
            round_index=round_index,
            num_shards=len(numbers),
            producer=stage_producer,
            row_count=lambda p: parquet_rows(run, p),
            summary=stage_summary,
        )

    summary = {
        "stage": "score",
        "round": round_index,
        "split": split,
        "shard": str(shard),
        "skipped": False,
        "shards_total": len(entries),
        "shards_owned": len(owned),
        "shards_scored": len(pending) + len(followed),
        "shards_kept": len(owned) - len(pending) - len(followed & set(owned)),
        "shards_replaced": replaced,
        "samples": stats.samples,
        "positions": stats.positions,
        "tokens": stats.tokens,
        "padded_tokens": stats.padded_tokens,
        "bytes_written": stats.bytes_written,
        "bytes_per_token": _ratio(stats.bytes_written, stats.positions, 2),
        "mean_topk_mass": _ratio(stats.topk_mass_sum, stats.positions, 6),
        "mean_entropy": _ratio(stats.entropy_sum, stats.positions, 6),
        "top_k": sc.top_k,
        "temperature": sc.temperature,
        "device": str(teacher.dev),
        "dtype": teacher.placement.dtype_name,
        "engine": teacher.engine,
        **{k: v - counters0.get(k, 0) for k, v in teacher.counters().items()},
        "followed": follow,
        "score_s": round(stats.score_s, 3),
        "tokens_per_s": _ratio(stats.tokens, stats.score_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "manifest_written": manifest is not None,
    }
    run.append_metrics(round_index, {"time": time.time(), **summary})
    summary["line"] = _summary_line(summary, run, round_index, s_folder)
    return summary


def _follow(job: "_Job", shard: ShardSpec, base_producer: dict, followed: set[int], poll_s: float) -> Manifest:
    """Score this worker's rollout shards as they appear, until the rollout manifest exists; return it.
    A shard in the rollout folder is complete (renamed into place whole), so its checksum is final."""
    run, round_index = job.run, job.round_index
    r_folder, s_folder = _folders(job.split)
    rollouts_dir = run.stage_dir(round_index, r_folder)
    scores_dir = run.stage_dir(round_index, s_folder)
    seen: set[int] = set()
    while True:
        manifest = read_manifest(run, rollouts_dir)  # read first: shards seen after it are all there is
        new = [s for s in run.existing_shards(round_index, r_folder) if shard.owns(s) and s not in seen]
        if manifest is not None and not new:
            return manifest
        if not new:
            time.sleep(poll_s)
            continue
        entries, producers = {}, {}
        for s in new:
            path = storage.join(rollouts_dir, shard_name(s))
            digest, size = storage.sha256_file(run.fs, path)
            entries[s] = ShardEntry(shard_name(s), parquet_rows(run, path), size, digest)
            producers[s] = {**base_producer, "rollout_sha256": digest}
        pending = [s for s in new if not _valid_shard(run, scores_dir, s, entries[s].rows, producers[s])]
        if pending:
            storage.remove_tmp_files(run.fs, scores_dir, {shard_name(s) for s in pending})
            t0 = time.perf_counter()
            _score_shards(job, pending, entries, producers)
            job.stats.score_s += time.perf_counter() - t0
        followed.update(pending)  # scored here (a valid score shard left by an earlier run is kept)
        seen.update(new)
        if manifest is not None:
            return manifest


# ------------------------------------------------------------------------------------------ inputs


def _rollout_entries(manifest: Manifest, rollouts_dir: str) -> dict:
    """{shard number: manifest entry}, checking the numbers are 0..n-1 as the run directory requires."""
    entries = {}
    for e in manifest.shards:
        s = shard_index(e.name)
        if s is None:
            raise FormatError(
                f"{storage.join(rollouts_dir, MANIFEST)}: lists {e.name!r}, not a shard name; "
                f"re-run rollout with --force"
            )
        entries[s] = e
    if sorted(entries) != list(range(len(entries))):
        raise FormatError(
            f"{storage.join(rollouts_dir, MANIFEST)}: shard numbers are not 0..{len(entries) - 1}; "
            f"re-run rollout with --force"
        )
    return entries


def _check_vocab(teacher_ref: str, teacher_tok, student_ref: str, student_tok) -> None:
    """The cache stores teacher token ids that the learner reads as student ids: the maps must be equal."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(teacher_tok) == len(student_tok) and tv == sv:
        return
    only_t = sorted((i, t) for t, i in tv.items() if t not in sv)
    only_s = sorted((i, t) for t, i in sv.items() if t not in tv)
    moved = sorted((tv[t], t) for t in tv if t in sv and tv[t] != sv[t])
    if only_t:
        detail = f"token {only_t[0][1]!r} (id {only_t[0][0]}) is only in the teacher's"
    elif only_s:
        detail = f"token {only_s[0][1]!r} (id {only_s[0][0]}) is only in the student's"
    elif moved:
        detail = f"token {moved[0][1]!r} is id {moved[0][0]} for the teacher, {sv[moved[0][1]]} for the student"
    else:
        detail = "the tokenizers differ"
    raise OpdError(
        f"teacher {teacher_ref} ({len(teacher_tok)} tokens) and student {student_ref} "
        f"({len(student_tok)} tokens) do not share a vocabulary: {detail}; opd distils only "
        f"between models with the same tokenizer"
    )


def _sequences(table, path: str, render: str, teacher_tok, vocab_size: int) -> list[Seq]:
    sample_ids = table.column("sample_id").to_pylist()
    prompts = table.column("prompt_ids").to_pylist()
    completions = table.column("completion_ids").to_pylist()
    messages = table.column("prompt_messages").to_pylist() if render == "teacher_template" else None
    rendered: dict[str, list[int]] = {}
    seqs = []
    for i, sid in enumerate(sample_ids):
        prompt = prompts[i] if messages is None else _render(rendered, messages[i], teacher_tok, sid, path)
        completion = np.asarray(completions[i], dtype=np.int64)
        if completion.size and not prompt:
            raise FormatError(
                f"{path}: sample {sid!r} has an empty prompt, so its first completion token "
                f"has no context to score; re-run rollout"
            )
        ids = np.concatenate([np.asarray(prompt, dtype=np.int64), completion[:-1]])
        every = np.concatenate([ids, completion[-1:]])
        if every.size and (every.min() < 0 or every.max() >= vocab_size):
            raise FormatError(
                f"{path}: sample {sid!r} has token ids outside the teacher's vocabulary "
                f"(0..{vocab_size - 1}); were the rollouts made with another tokenizer?"
            )
        seqs.append(Seq(sid, ids, len(prompt), completion))
    return seqs


def _render(memo: dict, messages_json: str | None, tok, sample_id: str, path: str) -> list[int]:
    """The prompt re-rendered with the teacher's chat template (generation prompt appended)."""
    if messages_json is None:
        raise FormatError(
            f"{path}: sample {sample_id!r} has no prompt_messages, so score.render="
            f"'teacher_template' cannot re-render its prompt; use score.render='student_ids'"
        )
    if messages_json not in memo:
        from jinja2 import TemplateError

        try:
            messages = json.loads(messages_json)
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (ValueError, TypeError, KeyError, TemplateError) as e:
            raise OpdError(
                f"{path}: cannot render sample {sample_id!r}'s prompt_messages with the teacher's "
                f"chat template ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
            ) from None
        memo[messages_json] = tok(text, add_special_tokens=False)["input_ids"]
    return memo[messages_json]


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class _Totals:
    samples: int = 0
    positions: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    bytes_written: int = 0
    entropy_sum: float = 0.0
    topk_mass_sum: float = 0.0
    score_s: float = 0.0


class _ShardJob:
    """One shard being scored: its writer and the encoded rows, filled by the background thread."""

    def __init__(self, number: int, path: str, seqs: list[Seq], writer: ScoreShardWriter, producer: dict):
        self.number, self.path, self.seqs, self.writer, self.producer = number, path, seqs, writer, producer
        self.encoded: list = [None] * len(seqs)
        self.entropy_sums = np.zeros(len(seqs))
        self.mass_sums = np.zeros(len(seqs))
        for i, seq in enumerate(seqs):
            if seq.completion.size == 0:
                K = writer.top_k
                self.encoded[i] = writer.encode(
                    seq.sample_id, np.zeros((0, K), np.int64), np.zeros((0, K), np.float32), [], []
                )

    def pack(self, out: BatchOut) -> None:
        """(background) Split a batch's arrays per sample and encode them."""
        a = out.numpy()
        o = 0
        for r in out.rows:
            seq = self.seqs[r]
            T = seq.completion.size
            sl = slice(o, o + T)
            self.encoded[r] = self.writer.encode(
                seq.sample_id, a["topk_ids_NK"][sl], a["topk_logprobs_NK"][sl], a["taken_N"][sl], a["tail_N"][sl]
            )
            self.entropy_sums[r] = a["entropy_N"][sl].sum(dtype=np.float64)
            self.mass_sums[r] = a["topk_mass_N"][sl].sum(dtype=np.float64)
            o += T

    def write(self, run: RunDir, zstd_level: int, dtype: torch.dtype, engine: str) -> tuple[int, float, float]:
        """(background) Write the shard in rollout row order; returns (bytes, entropy sum, top-k mass sum)."""
        for enc in self.encoded:
            self.writer.append(enc)
        entropy, mass = math.fsum(self.entropy_sums), math.fsum(self.mass_sums)
        stats = {
            "positions": int(sum(s.completion.size for s in self.seqs)),
            "entropy_sum": entropy,
            "topk_mass_sum": mass,
            "teacher_dtype": str(dtype).removeprefix("torch."),
            "teacher_engine": engine,
        }
        size = self.writer.write(run.fs, self.path, self.producer, extra_meta={"stats": stats}, zstd_level=zstd_level)
        return size, entropy, mass


@dataclass
class _Job:
    """What scoring one split of a round needs, shared by the plain and the --follow paths."""

    run: RunDir
    round_index: int
    split: str
    cfg: OpdConfig
    teacher: Teacher
    stats: _Totals


def _score_shards(job: _Job, pending: list[int], entries: dict, producers: dict) -> None:
    """Score the rollout shards `pending` (entries: their manifest entries; producers: each score
    shard's producer) into score shards, packing and writing in a background thread."""
    run, round_index, split, cfg, totals = job.run, job.round_index, job.split, job.cfg, job.stats
    scorer, teacher_tok, dtype = job.teacher.scorer(), job.teacher.tokenizer, job.teacher.dtype
    sc = cfg.score
    r_folder, s_folder = _folders(split)
    rollouts_dir = run.stage_dir(round_index, r_folder)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-score-writer")
    queued: deque[Future] = deque()
    writes: list[Future] = []
    bar = console.bar(total=sum(entries[s].rows for s in pending), unit="sample", desc=f"score r{round_index} {split}")
    t0 = time.perf_counter()

    def submit(fn, *args) -> Future:
        while len(queued) >= _MAX_QUEUED:
            queued.popleft().result()  # back-pressure; re-raises a background failure here
        f = pool.submit(fn, *args)
        queued.append(f)
        return f

    try:
        for s in pending:
            path = storage.join(rollouts_dir, shard_name(s))
            digest, _ = storage.sha256_file(run.fs, path)
            if digest != entries[s].sha256:
                raise FormatError(
                    f"{path}: differs from the checksum in {r_folder}/{MANIFEST} (changed after the "
                    f"rollout stage finished); re-run `opd rollout {run.url} --round {round_index} --force`"
                )
            table, _ = read_rollout_shard(run.fs, path)
            seqs = _sequences(table, path, sc.render, teacher_tok, scorer.vocab_size)
            writer = ScoreShardWriter(
                scorer.vocab_size, sc.top_k, logprob_bits=sc.logprob_bits, temperature=sc.temperature
            )
            shard_job = _ShardJob(s, run.shard_path(round_index, s_folder, s), seqs, writer, producers[s])
            bar.update(sum(1 for q in seqs if q.completion.size == 0))
            for out in scorer.batches(seqs):
                submit(shard_job.pack, out)
                totals.tokens += out.tokens
                totals.padded_tokens += out.padded_tokens
                bar.update(len(out.rows))
                bar.set_postfix_str(f"{totals.tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
            writes.append(submit(shard_job.write, run, sc.zstd_level, dtype, job.teacher.engine))
            totals.samples += len(seqs)
            totals.positions += sum(q.completion.size for q in seqs)
        while queued:
            queued.popleft().result()  # in submission order: the first background failure is the one raised
        for f in writes:
            size, entropy, mass = f.result()
            totals.bytes_written += size
            totals.entropy_sum += entropy
            totals.topk_mass_sum += mass
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------ shards on disk


def _valid_shard(run: RunDir, scores_dir: str, s: int, rows: int, producer: dict) -> bool:
    """Is score shard `s` present, readable, from this producer and complete? (A resumed run keeps it.)"""
    path = storage.join(scores_dir, shard_name(s))
    if not storage.exists(run.fs, path):
        return False
    try:
        return len(ScoreShard(run.fs, path, expect=producer)) == rows
    except (FormatError, FingerprintMismatch):
        return False


def _stage_summary(run: RunDir, scores_dir: str, numbers: list[int], producers: dict, sc) -> dict | None:
    """The manifest's summary, from the shards themselves (the same whichever worker writes it); None
    while some shard is another producer's (a worker that has not run yet will replace it)."""
    samples = positions = size = 0
    entropy = mass = 0.0
    for s in numbers:
        path = storage.join(scores_dir, shard_name(s))
        try:
            meta = read_shard_meta(run.fs, path)
            check_producer(path, meta.get("producer", {}), producers[s])
        except (FormatError, FingerprintMismatch, ValueError):
            return None
        stats = meta.get("stats", {})
        samples += parquet_rows(run, path)
        positions += int(stats.get("positions", 0))
        entropy += float(stats.get("entropy_sum", 0.0))
        mass += float(stats.get("topk_mass_sum", 0.0))
        size += run.fs.get_file_info(path).size
    return {
        "samples": samples,
        "positions": positions,
        "bytes": size,
        "bytes_per_token": _ratio(size, positions, 2),
        "mean_topk_mass": _ratio(mass, positions, 6),
        "mean_entropy": _ratio(entropy, positions, 6),
        "top_k": sc.top_k,
        "temperature": sc.temperature,
        "logprob_bits": sc.logprob_bits,
    }


# ------------------------------------------------------------------------------------------ reporting


def _ratio(a: float, b: float, digits: int) -> float:
    return round(a / b, digits) if b else 0.0


def _skipped_summary(
    run: RunDir, scores_dir: str, round_index: int, shard: ShardSpec, done: Manifest, split: str
) -> dict:
    summary = {
        "stage": "score",
        "round": round_index,
        "split": split,
        "shard": str(shard),
        "skipped": True,
        "shards_total": len(done.shards),
        **done.summary,
    }
    what = "" if split == "train" else f" {split}"
    summary["line"] = (
        f"score round {round_index}{what}: already done ({storage.join(scores_dir, MANIFEST)}, "
        f"{len(done.shards)} shards, {done.summary.get('positions', 0):,} positions); "
        f"pass --force to redo it"
    )
    return summary


def _summary_line(s: dict, run: RunDir, round_index: int, s_folder: str) -> str:
    kept = f", {s['shards_kept']} already present" if s["shards_kept"] else ""
    kept += f", {s['shards_replaced']} stale or damaged ones replaced" if s["shards_replaced"] else ""
    scope = f" (worker {s['shard']})" if s["shard"] != "0/1" else ""
    if s["manifest_written"]:
        done = f"; stage done ({storage.join(run.stage_dir(round_index, s_folder), MANIFEST)})"
    else:
        present = len(run.existing_shards(round_index, s_folder))
        done = (
            f"; waiting for other workers ({present} of {s['shards_total']} shards present)"
            if present < s["shards_total"]
            else "; no manifest: some shards were made with another config (re-run their workers, or --force)"
        )
    what = "" if s["split"] == "train" else f" {s['split']}"
    return (
        f"score round {round_index}{what}{scope}: {s['shards_scored']} shards scored{kept}, "
        f"{s['positions']:,} positions, {s['bytes_written'] / 1e6:.2f} MB written "
        f"({s['bytes_per_token']} bytes/token), mean top-{s['top_k']} mass {s['mean_topk_mass']:.4f}, "
        f"mean entropy {s['mean_entropy']:.4f} nats, {s['score_s']:.1f} s ({s['tokens_per_s']:,.0f} tok/s, "
        f"{s['engine']}{_prefix_note(s)}){done}"
    )


def _prefix_note(s: dict) -> str:
    if "prefix_cached_tokens" not in s:
        return ""
    again = s["rescored_without_prefix_cache"]
    return f"; prefix cache reused {s['prefix_cached_tokens']:,} tokens" + (
        f", {again} samples re-scored without it" if again else ""
    )

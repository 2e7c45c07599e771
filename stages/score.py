"""Score stage: the teacher's top-k log-probs for every completion token of a round's rollouts.

Reads   RUN/opd.toml ([score], run.teacher, run.student), RUN/rounds/R/rollouts/part-SSSSS.parquet and
        RUN/rounds/R/rollouts/_DONE.json (the rollout stage must be finished), the student's tokenizer
        (run.student in round 0, RUN/rounds/R-1/student after) to check the teacher shares its vocabulary.
Writes  RUN/rounds/R/scores/part-SSSSS.parquet, one per rollout shard with the same number (format in
        cache/SPEC.md); RUN/rounds/R/scores/_DONE.json once every shard exists; one JSON line in
        RUN/rounds/R/metrics.jsonl per invocation.

    opd score RUN --round 0 [--shard 0/4] [--device cuda:1] [--engine transformers|vllm] [--split all|train|heldout] [--follow] [--force]

The teacher is `run.teacher`, or a self-teacher (stages/students.teacher_weights): "self", the student
that starts round R, or "self:start", the student's weights before its first `opd sft`. With
`score.teacher_context_field` its prompt carries the row's context column (stages/score_inputs.py).

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
samples RUN/rounds/R/heldout/rollouts/ into heldout/scores/ (which `opd eval` then reads); `--split
all` (default) does both that exist in the config, teacher loaded once.

A background thread packs (codec) and writes shards while the teacher scores the next batch.

Resume, `--shard i/N`, `--force`, `--follow` and the manifest are the runner's (stages/runner.py): a
present score shard is kept when it is readable, from this producer and has the rollout shard's rows.

Shape legend: N scored positions, V scored vocabulary (stages/scorer.py), K top-k.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from opd.cache import fingerprint, storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError
from opd.cache.rundir import (
    MANIFEST,
    Manifest,
    RunDir,
    ShardEntry,
    ShardSpec,
    choose_splits,
    parquet_rows,
    read_manifest,
    shard_name,
    split_folder,
)
from opd.cache.shards import ScoreShard, ScoreShardWriter, read_rollout_shard
from opd.configs.schema import OpdConfig
from opd.stages.runner import Progress, ShardOutcome, StageResult, Units, combine, run_stage
from opd.stages.score_inputs import TeacherPrompt, check_vocab, rollout_entries, sequences
from opd.stages.score_shards import ShardPacker, Totals, ratio, stage_summary
from opd.stages.scorer import Teacher
from opd.stages.students import load_tokenizer, start_student, teacher_weights

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
) -> StageResult:
    """Score round `round_index`'s rollout shards owned by `shard`.

    `split`: "train", "heldout" (the validation samples, RUN/rounds/R/heldout/) or "all" (both that
    are configured; the teacher loads once; the held-out result is the result's `heldout`). `follow`:
    do not require the rollout manifest yet; score rollout shards as they appear (each is renamed into
    place whole) until the rollout stage writes its manifest: how `opd run` overlaps scoring with
    rollout. `teacher`: a Teacher the caller owns and releases, shared by runs of one [score] config
    (`opd sweep --eval heldout`: one load for every setting's held-out samples).
    """
    splits = choose_splits(split, cfg.eval.enabled)
    with contextlib.ExitStack() as stack:
        if teacher is None:
            teacher = Teacher(cfg, device, stack.enter_context(teacher_weights(cfg, run, round_index)))
            stack.callback(teacher.release)
        results = []
        for sp in splits:
            with _ScoreSplit(cfg, run, round_index, sp, teacher, follow) as stage:
                results.append(run_stage(stage, run, round_index, shard, force=force, poll_s=poll_s))
    return combine(results)


@dataclass(frozen=True)
class ScoreExtras:
    """The score stage's own figures in a StageResult."""

    positions: int  # completion positions scored (cached)
    padded_tokens: int  # tokens the batches computed, padding included
    bytes_per_token: float  # bytes written per scored position
    mean_topk_mass: float  # mean teacher probability mass on the cached top-k
    mean_entropy: float  # mean teacher entropy (nats)
    top_k: int
    temperature: float
    device: str
    dtype: str
    engine: str  # "transformers" or "vllm"
    followed: bool  # scored rollout shards as they appeared (--follow)
    shards_replaced: int  # present score shards found stale or damaged, scored again
    prefix_cached_tokens: int | None = None  # vLLM: prompt tokens its prefix cache reused
    rescored_without_prefix_cache: int | None = None  # vLLM: samples scored again without it


class _ScoreSplit:
    """One split of the score stage as the runner sees it (stages/runner.py): score shard s holds the
    teacher's top-k for every completion token of rollout shard s. Packing and writing run in a
    background thread while the teacher scores the next batch."""

    name = "score"

    def __init__(self, cfg: OpdConfig, run: RunDir, round_index: int, split: str, teacher: Teacher, follow: bool):
        self.cfg, self.sc, self.run, self.round, self.split = cfg, cfg.score, run, round_index, split
        self.teacher, self.follow = teacher, follow
        self.rollouts_dir = run.stage_dir(round_index, split_folder(split, "rollouts"))
        self.folder = split_folder(split, "scores")
        self.scores_dir = run.stage_dir(round_index, self.folder)
        self._rollouts: Manifest | None = None
        self._require_rollouts()
        with start_student(cfg, run, round_index, files="tokenizer") as student:
            student_tok = load_tokenizer(student.tokenizer_dir, f"student {student.label}")
            check_vocab(teacher.weights.label, teacher.tokenizer, student.label, student_tok)
        self_teacher = {} if teacher.weights.self_round is None else {"teacher": cfg.run.teacher}
        self.base_producer = fingerprint.producer(
            "score",
            teacher.dir,
            cfg.section_hash("score"),
            dtype=teacher.placement.dtype_name,
            engine=teacher.engine,
            **self_teacher,
        )
        self.prompt = TeacherPrompt.of(cfg)
        self.entries: dict[int, ShardEntry] = {}
        self.totals = Totals()
        self.replaced = 0
        self.counters0 = teacher.counters()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-score-writer")
        self._queued: deque[Future] = deque()

    def __enter__(self) -> "_ScoreSplit":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _require_rollouts(self) -> Manifest | None:
        """The rollout manifest (read until found, then kept: a finished stage's manifest is final); None
        while following a rollout stage that has not finished."""
        if self._rollouts is not None:
            return self._rollouts
        rollouts = self._rollouts = read_manifest(self.run, self.rollouts_dir)
        if rollouts is None and not self.follow:
            raise OpdError(
                f"{storage.join(self.rollouts_dir, MANIFEST)} not found (round {self.round} has no finished "
                f"{'held-out ' if self.split != 'train' else ''}rollouts): run `opd rollout {self.run.url} "
                f"--round {self.round}` first"
            )
        return rollouts

    def producer(self) -> dict | None:
        rollouts = self._require_rollouts()
        return None if rollouts is None else {**self.base_producer, "rollouts_sha256": rollouts.digest()}

    def _shard_producer(self, s: int) -> dict:
        return {**self.base_producer, "rollout_sha256": self.entries[s].sha256}

    def units(self) -> Units:
        """The rollout manifest's shards; while following, the rollout shards present so far (each is
        renamed into place whole, so its checksum is final)."""
        manifest = self._require_rollouts()  # read before listing: shards seen after it are all there is
        if manifest is not None:
            self.entries = rollout_entries(manifest, self.rollouts_dir)
            return Units(sorted(self.entries))
        for s in self.run.existing_shards(self.round, split_folder(self.split, "rollouts")):
            if s not in self.entries:
                path = storage.join(self.rollouts_dir, shard_name(s))
                digest, size = storage.sha256_file(self.run.fs, path)
                self.entries[s] = ShardEntry(shard_name(s), parquet_rows(self.run, path), size, digest)
        return Units(sorted(self.entries), complete=False)

    def keep(self, s: int) -> bool:
        """Is score shard s present, readable, from this producer and complete? (A resumed run keeps it.)"""
        path = storage.join(self.scores_dir, shard_name(s))
        if not storage.exists(self.run.fs, path):
            return False
        try:
            if len(ScoreShard(self.run.fs, path, expect=self._shard_producer(s))) == self.entries[s].rows:
                return True
        except (FormatError, FingerprintMismatch):
            pass
        self.replaced += 1
        return False

    def size(self, s: int) -> int:
        return self.entries[s].rows

    def prepare(self, todo: list[int]) -> None:
        self.teacher.scorer()

    def work(self, s: int, progress: Progress) -> Future:
        """Score rollout shard s; the returned future packs the last batch and writes the shard."""
        run, sc, scorer = self.run, self.sc, self.teacher.scorer()
        path = storage.join(self.rollouts_dir, shard_name(s))
        digest, _ = storage.sha256_file(run.fs, path)
        if digest != self.entries[s].sha256:
            raise FormatError(
                f"{path}: differs from the checksum in {split_folder(self.split, 'rollouts')}/{MANIFEST} (changed "
                f"after the rollout stage finished); re-run `opd rollout {run.url} --round {self.round} --force`"
            )
        table, _ = read_rollout_shard(run.fs, path)
        seqs = sequences(table, path, self.prompt, self.teacher.tokenizer, scorer.vocab_size)
        writer = ScoreShardWriter(scorer.vocab_size, sc.top_k, logprob_bits=sc.logprob_bits, temperature=sc.temperature)
        job = ShardPacker(run.shard_path(self.round, self.folder, s), seqs, writer, self._shard_producer(s))
        progress.advance(sum(1 for q in seqs if q.completion.size == 0))
        tokens = 0
        for out in scorer.batches(seqs):
            self._submit(job.pack, out)
            tokens += out.tokens
            self.totals.padded_tokens += out.padded_tokens
            progress.advance(len(out.rows), out.tokens)
        self.totals.positions += sum(q.completion.size for q in seqs)
        return self._submit(self._write, job, tokens)

    def _write(self, job: "ShardPacker", tokens: int) -> ShardOutcome:
        """(background) Write one shard and add its figures."""
        size, entropy, mass = job.write(self.run, self.sc.zstd_level, self.teacher.dtype, self.teacher.engine)
        self.totals.entropy_sum += entropy
        self.totals.bytes_written += size
        self.totals.topk_mass_sum += mass
        return ShardOutcome(samples=len(job.seqs), tokens=tokens, bytes=size)

    def _submit(self, fn, *args) -> Future:
        while len(self._queued) >= _MAX_QUEUED:
            self._queued.popleft().result()  # back-pressure; re-raises a background failure here
        f = self._pool.submit(fn, *args)
        self._queued.append(f)
        return f

    def summarize(self, numbers: list[int]) -> dict | None:
        producers = {s: self._shard_producer(s) for s in numbers}
        return stage_summary(self.run, self.scores_dir, numbers, producers, self.sc)

    def extras(self) -> ScoreExtras:
        t = self.totals
        counts = {k: v - self.counters0.get(k, 0) for k, v in self.teacher.counters().items()}
        return ScoreExtras(
            positions=t.positions,
            padded_tokens=t.padded_tokens,
            bytes_per_token=ratio(t.bytes_written, t.positions, 2),
            mean_topk_mass=ratio(t.topk_mass_sum, t.positions, 6),
            mean_entropy=ratio(t.entropy_sum, t.positions, 6),
            top_k=self.sc.top_k,
            temperature=self.sc.temperature,
            device=str(self.teacher.dev),
            dtype=self.teacher.placement.dtype_name,
            engine=self.teacher.engine,
            followed=self.follow,
            shards_replaced=self.replaced,
            **counts,
        )

    def describe(self, r: StageResult) -> str:
        x, run = r.extras, self.run
        kept = f", {r.shards_present} already present" if r.shards_present else ""
        kept += f", {x.shards_replaced} stale or damaged ones replaced" if x.shards_replaced else ""
        scope = f" (worker {r.shard})" if r.shard != "0/1" else ""
        if r.done:
            done = f"; stage done ({storage.join(self.scores_dir, MANIFEST)})"
        else:
            present = len(run.existing_shards(self.round, self.folder))
            done = (
                f"; waiting for other workers ({present} of {r.shards_total} shards present)"
                if present < r.shards_total
                else "; no manifest: some shards were made with another config (re-run their workers, or --force)"
            )
        what = "" if self.split == "train" else f" {self.split}"
        return (
            f"score round {self.round}{what}{scope}: {r.shards_written} shards scored{kept}, "
            f"{x.positions:,} positions, {r.bytes / 1e6:.2f} MB written "
            f"({ratio(r.bytes, x.positions, 2)} bytes/token), mean top-{x.top_k} mass {x.mean_topk_mass:.4f}, "
            f"mean entropy {x.mean_entropy:.4f} nats, {r.work_seconds:.1f} s ({r.tokens_per_s:,.0f} tok/s, "
            f"{x.engine}{_prefix_note(x)}){done}"
        )


# ------------------------------------------------------------------------------------------ reporting


def _prefix_note(x: ScoreExtras) -> str:
    if x.prefix_cached_tokens is None:
        return ""
    again = x.rescored_without_prefix_cache
    return f"; prefix cache reused {x.prefix_cached_tokens:,} tokens" + (
        f", {again} samples re-scored without it" if again else ""
    )

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
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

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
    parquet_rows,
    read_manifest,
    shard_index,
    shard_name,
    split_folder,
)
from opd.cache.shards import ScoreShard, ScoreShardWriter, check_producer, read_rollout_shard, read_shard_meta
from opd.configs.schema import OpdConfig
from opd.stages import console
from opd.stages.devices import placement
from opd.stages.models import resolve_model
from opd.stages.runner import Progress, ShardOutcome, StageResult, Units, combine, run_stage
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
    owned = teacher is None
    teacher = Teacher(cfg, device) if owned else teacher
    try:
        results = []
        for sp in splits:
            with _ScoreSplit(cfg, run, round_index, sp, teacher, follow) as stage:
                results.append(run_stage(stage, run, round_index, shard, force=force, poll_s=poll_s))
    finally:
        if owned:
            teacher.release()
    return combine(results)


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
        self._require_rollouts()
        with start_student(cfg, run, round_index, files="tokenizer") as student:
            student_tok = load_tokenizer(student.tokenizer_dir, f"student {student.label}")
            _check_vocab(cfg.run.teacher, teacher.tokenizer, student.label, student_tok)
        self.base_producer = fingerprint.producer(
            "score", teacher.dir, cfg.section_hash("score"), dtype=teacher.placement.dtype_name, engine=teacher.engine
        )
        self.entries: dict[int, ShardEntry] = {}
        self.totals = _Totals()
        self.replaced = 0
        self.counters0 = teacher.counters()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-score-writer")
        self._queued: deque[Future] = deque()

    def __enter__(self) -> "_ScoreSplit":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _require_rollouts(self) -> Manifest | None:
        """The rollout manifest; None while following a rollout stage that has not finished."""
        rollouts = read_manifest(self.run, self.rollouts_dir)
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
            self.entries = _rollout_entries(manifest, self.rollouts_dir)
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
        seqs = _sequences(table, path, sc.render, self.teacher.tokenizer, scorer.vocab_size)
        writer = ScoreShardWriter(scorer.vocab_size, sc.top_k, logprob_bits=sc.logprob_bits, temperature=sc.temperature)
        job = _ShardJob(run.shard_path(self.round, self.folder, s), seqs, writer, self._shard_producer(s))
        progress.advance(sum(1 for q in seqs if q.completion.size == 0))
        tokens = 0
        for out in scorer.batches(seqs):
            self._submit(job.pack, out)
            tokens += out.tokens
            self.totals.padded_tokens += out.padded_tokens
            progress.advance(len(out.rows), out.tokens)
        self.totals.positions += sum(q.completion.size for q in seqs)
        return self._submit(self._write, job, tokens)

    def _write(self, job: "_ShardJob", tokens: int) -> ShardOutcome:
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
        return _stage_summary(self.run, self.scores_dir, numbers, producers, self.sc)

    def extras(self) -> ScoreExtras:
        t = self.totals
        counts = {k: v - self.counters0.get(k, 0) for k, v in self.teacher.counters().items()}
        return ScoreExtras(
            positions=t.positions,
            padded_tokens=t.padded_tokens,
            bytes_per_token=_ratio(t.bytes_written, t.positions, 2),
            mean_topk_mass=_ratio(t.topk_mass_sum, t.positions, 6),
            mean_entropy=_ratio(t.entropy_sum, t.positions, 6),
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
            f"({_ratio(r.bytes, x.positions, 2)} bytes/token), mean top-{x.top_k} mass {x.mean_topk_mass:.4f}, "
            f"mean entropy {x.mean_entropy:.4f} nats, {r.work_seconds:.1f} s ({r.tokens_per_s:,.0f} tok/s, "
            f"{x.engine}{_prefix_note(x)}){done}"
        )


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


class _ShardJob:
    """One shard being scored: its writer and the encoded rows, filled by the background thread."""

    def __init__(self, path: str, seqs: list[Seq], writer: ScoreShardWriter, producer: dict):
        self.path, self.seqs, self.writer, self.producer = path, seqs, writer, producer
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


# ------------------------------------------------------------------------------------------ shards on disk


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


def _prefix_note(x: ScoreExtras) -> str:
    if x.prefix_cached_tokens is None:
        return ""
    again = x.rescored_without_prefix_cache
    return f"; prefix cache reused {x.prefix_cached_tokens:,} tokens" + (
        f", {again} samples re-scored without it" if again else ""
    )

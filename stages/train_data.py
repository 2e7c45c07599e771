"""The learner's data: a round's rollout and score shards joined by sample id, token-budget micro-batches,
and a DataLoader dataset that decodes the cache in its workers (used by stages/train.py).

Shape legend: S samples of the round, B rows of a micro-batch, L its padded length, N its completion
positions (flattened over rows), K the teacher's top-k.

A sample is fed as prompt + completion without its last token (nothing predicts past the end), right
padded: under causal attention a real token attends only to earlier tokens, never to the padding after
it, so no attention mask is needed. Completion token t is predicted at position P - 1 + t (P = prompt
length); `gather_N` holds those positions as flat indices into the [B, L] batch.

Micro-batches are planned once per epoch from the samples' lengths alone (never from the world size):
the samples are shuffled with a seed of (run.seed, round, epoch), cut into windows, sorted by length
inside each window, packed greedily so that rows × longest row ≤ `max_tokens_per_batch` (a sample
longer than the budget gets a micro-batch of its own), and the micro-batches are shuffled again. The
learner then takes `world_size × grad_accum` consecutive micro-batches per optimizer step, so a step
holds the same samples whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from opd.cache import storage
from opd.cache.errors import FormatError, OpdError
from opd.cache.rundir import MANIFEST, RunDir, read_manifest, shard_index, split_folder
from opd.cache.shards import ScoreShard, check_producer, read_rollout_shard, read_shard_meta
from opd.configs.schema import TrainConfig
from opd.stages.prompts import on_policy

PLAN_WINDOW = 256  # samples sorted by length together before packing (less padding, still shuffled)


class DecodedShards:
    """Shards kept decoded for as long as the caller holds this object, keyed by their content sha256 (from
    the manifests, already checked): `opd sweep` trains several settings from one round's cache, and the
    settings' folders hold links to the same files, so it passes one DecodedShards to every setting's
    RoundData and each shard is opened, checked and decoded once per process instead of once per
    setting. Holds the round's decoded cache in memory."""

    def __init__(self):
        self._items: dict[tuple[str, str], Any] = {}

    def get(self, kind: str, sha: str, make):
        """The (kind, sha) entry, made by `make()` the first time."""
        key = (kind, sha)
        if key not in self._items:
            self._items[key] = make()
        return self._items[key]


def _memo(decoded: DecodedShards | None, kind: str, sha: str, make):
    return make() if decoded is None else decoded.get(kind, sha, make)


@dataclass(frozen=True)
class ShardPaths:
    rollout: str
    score: str
    rollout_sha256: str = ""
    score_sha256: str = ""


class RoundData:
    """The checked join of RUN/rounds/R/rollouts and RUN/rounds/R/scores, read in every process.

    Checks, each a one-line OpdError naming the file: both `_DONE.json` exist; the score stage lists the
    same shards; every shard's sha256 equals its manifest's; every score shard names, in its producer's
    `rollout_sha256`, the rollout shard it is read with (so a cache scored from other rollouts is
    refused); every rollout sample has scores with one position per completion token; token ids lie in
    the student's vocabulary. Arrays over the S samples kept (samples with an empty completion carry no
    loss and are left out, and so are the rows `lmbda` leaves out of a cache with both kinds: _lambda_choice) are `shard_S`, `rollout_row_S`, `score_row_S`, `length_S` (fed tokens,
    P + T - 1), `tokens_S` (T), `on_policy_S` (source == "student") and `has_sampling_S`.
    """

    def __init__(
        self,
        run: RunDir,
        round_index: int,
        vocab_limit: int | None = None,
        lmbda: float = -1.0,
        seed: int = 0,
        split: str = "train",
        decoded: DecodedShards | None = None,
    ):
        self.fs = run.fs
        self.decoded = decoded  # shards decoded once across RoundData objects (the caller's), or None
        rollouts_dir = run.stage_dir(round_index, split_folder(split, "rollouts"))
        scores_dir = run.stage_dir(round_index, split_folder(split, "scores"))
        self.rollouts = read_manifest(run, rollouts_dir)
        if self.rollouts is None:
            raise OpdError(
                f"{storage.join(rollouts_dir, MANIFEST)} not found (round {round_index} has no finished "
                f"rollouts): run `opd rollout {run.url} --round {round_index}` first"
            )
        self.scores = read_manifest(run, scores_dir)
        if self.scores is None:
            raise OpdError(
                f"{storage.join(scores_dir, MANIFEST)} not found (round {round_index} has no finished "
                f"scores): run `opd score {run.url} --round {round_index}` first"
            )
        self.choose = self._lambda_choice(run, rollouts_dir, lmbda, seed)
        r_names = [e.name for e in self.rollouts.shards]
        s_names = [e.name for e in self.scores.shards]
        if r_names != s_names or [shard_index(n) for n in r_names] != list(range(len(r_names))):
            raise FormatError(
                f"{storage.join(scores_dir, MANIFEST)}: lists shards {s_names[:4]}..., but "
                f"rollouts/{MANIFEST} lists {r_names[:4]}...; re-run `opd score {run.url} "
                f"--round {round_index} --force`"
            )
        self.rollouts_digest = self.rollouts.digest()
        self.scores_digest = self.scores.digest()
        self.paths: list[ShardPaths] = []
        cols: dict[str, list] = {k: [] for k in ("shard", "rrow", "srow", "length", "tokens", "on", "samp")}
        self.top_k = self.vocab_size = None
        self.temperature = None
        for s, (r_entry, s_entry) in enumerate(zip(self.rollouts.shards, self.scores.shards)):
            r_path = storage.join(rollouts_dir, r_entry.name)
            c_path = storage.join(scores_dir, s_entry.name)
            _check_sha(run, r_path, r_entry.sha256, f"opd rollout {run.url} --round {round_index} --force")
            _check_sha(run, c_path, s_entry.sha256, f"opd score {run.url} --round {round_index} --force")
            meta = read_shard_meta(run.fs, c_path)
            check_producer(c_path, meta.get("producer", {}), {"rollout_sha256": r_entry.sha256})
            self.paths.append(ShardPaths(r_path, c_path, r_entry.sha256, s_entry.sha256))
            self._join(s, self.paths[-1], vocab_limit, cols)
        self.shard_S = np.asarray(cols["shard"], dtype=np.int32)
        self.rollout_row_S = np.asarray(cols["rrow"], dtype=np.int64)
        self.score_row_S = np.asarray(cols["srow"], dtype=np.int64)
        self.length_S = np.asarray(cols["length"], dtype=np.int64)
        self.tokens_S = np.asarray(cols["tokens"], dtype=np.int64)
        self.on_policy_S = np.asarray(cols["on"], dtype=bool)
        self.has_sampling_S = np.asarray(cols["samp"], dtype=bool)
        if not len(self.tokens_S):
            raise OpdError(f"{rollouts_dir}: no sample has a completion token to train on")

    def _lambda_choice(self, run: RunDir, rollouts_dir: str, lmbda: float, seed: int):
        """None (train on every row), or prompt id → on-policy? for a cache with both kinds of rows per
        prompt (rollout.offpolicy_rows = "both"): λ = train.lmbda, else the rollout's λ of the round,
        through the rollout's own rule (stages/prompts.on_policy), so the rows kept are the rows a
        rollout at that λ writes."""
        both = self.rollouts.summary.get("offpolicy_rows") == "both"
        if not both:
            if lmbda >= 0:
                raise OpdError(
                    f"train.lmbda = {lmbda} chooses between each prompt's own samples and its off-policy rows, "
                    f"but {storage.join(rollouts_dir, MANIFEST)} holds one kind per prompt (rolled out at "
                    f"λ = {self.rollouts.summary.get('lmbda')}); roll out with --set rollout.offpolicy_rows=both, "
                    f"or leave train.lmbda = -1"
                )
            self.lmbda = self.rollouts.summary.get("lmbda")
            return None
        self.lmbda = lmbda if lmbda >= 0 else float(self.rollouts.summary.get("lmbda", 1.0))
        memo: dict[str, bool] = {}
        round_index, chosen = self.rollouts.round, self.lmbda

        def choose(prompt_id: str) -> bool:
            if prompt_id not in memo:
                memo[prompt_id] = on_policy(seed, round_index, prompt_id, chosen)
            return memo[prompt_id]

        return choose

    def _join(self, s: int, paths: ShardPaths, vocab_limit: int | None, cols: dict) -> None:
        r_path, c_path = paths.rollout, paths.score
        table = _memo(
            self.decoded, "rollout_table", paths.rollout_sha256, lambda: read_rollout_shard(self.fs, r_path)[0]
        )
        # full checks: page checksums, content totals
        scores = _memo(self.decoded, "score_shard", paths.score_sha256, lambda: ScoreShard(self.fs, c_path))
        for key, value in (
            ("top_k", scores.top_k),
            ("vocab_size", scores.vocab_size),
            ("temperature", scores.temperature),
        ):
            if getattr(self, key) is None:
                setattr(self, key, value)
            elif getattr(self, key) != value:
                raise FormatError(
                    f"{c_path}: {key}={value}, but earlier score shards of the round have "
                    f"{key}={getattr(self, key)}; re-score the round with one config (--force)"
                )
        if vocab_limit is not None and scores.vocab_size > vocab_limit:
            raise OpdError(
                f"{c_path}: scored with a {scores.vocab_size}-token teacher vocabulary, but the student "
                f"has {vocab_limit} output rows; teacher and student must share a vocabulary"
            )
        ids = table.column("sample_id").to_pylist()
        prompt_len = pc.list_value_length(table.column("prompt_ids")).to_numpy(zero_copy_only=False)
        comp_len = pc.list_value_length(table.column("completion_ids")).to_numpy(zero_copy_only=False)
        sources = table.column("source").to_pylist()
        prompt_ids = table.column("prompt_id").to_pylist() if self.choose is not None else None
        has_samp = table.column("sampling_logprobs").is_valid().to_numpy(zero_copy_only=False)
        if vocab_limit is not None:
            for name in ("prompt_ids", "completion_ids"):
                flat = pc.list_flatten(table.column(name))
                if len(flat) and (pc.min(flat).as_py() < 0 or pc.max(flat).as_py() >= vocab_limit):
                    raise FormatError(
                        f"{r_path}: {name} has token ids outside the student's vocabulary "
                        f"(0..{vocab_limit - 1}); were the rollouts made with another tokenizer?"
                    )
        positions = scores.table.column("num_positions").to_numpy()
        index = {sid: j for j, sid in enumerate(scores.sample_ids)}
        for i, sid in enumerate(ids):
            j = index.get(sid)
            if j is None:
                raise FormatError(f"{c_path}: no scores for sample {sid!r} of {r_path}; re-run score with --force")
            T, P = int(comp_len[i]), int(prompt_len[i])
            if int(positions[j]) != T:
                raise FormatError(
                    f"{c_path}: sample {sid!r} has {int(positions[j])} scored positions but "
                    f"{T} completion tokens in {r_path}; re-run score with --force"
                )
            if T == 0 or (prompt_ids is not None and (sources[i] == "student") != self.choose(prompt_ids[i])):
                continue  # nothing to learn, or a row train.lmbda leaves out
            if P == 0:
                raise FormatError(
                    f"{r_path}: sample {sid!r} has an empty prompt, so its first completion "
                    f"token has no context; re-run rollout"
                )
            cols["shard"].append(s)
            cols["rrow"].append(i)
            cols["srow"].append(j)
            cols["length"].append(P + T - 1)
            cols["tokens"].append(T)
            cols["on"].append(sources[i] == "student")
            cols["samp"].append(bool(has_samp[i]))

    def __len__(self) -> int:
        return len(self.tokens_S)


def _check_sha(run: RunDir, path: str, want: str, fix: str) -> None:
    if not storage.exists(run.fs, path):
        raise FormatError(f"{path}: listed in {MANIFEST} but missing; run `{fix}`")
    got, _ = storage.sha256_file(run.fs, path)
    if got != want:
        raise FormatError(
            f"{path}: differs from the sha256 in its {MANIFEST} (changed after the stage finished); run `{fix}`"
        )


# ------------------------------------------------------------------------------------------ planning


def plan_epoch(
    length_S: np.ndarray, max_tokens: int, seed: int, round_index: int, epoch: int, window: int = PLAN_WINDOW
) -> list[np.ndarray]:
    """Micro-batches (arrays of sample indices, longest first) covering every sample once.

    Depends only on the lengths, the budget and (seed, round, epoch): every process computes the same
    plan, whatever the world size. A micro-batch's padded size rows × max length is ≤ `max_tokens`
    unless it is a single sample longer than the budget."""
    rng = np.random.default_rng([int(seed) & 0x7FFFFFFF, int(round_index), int(epoch), 0x6F7064])
    order = rng.permutation(len(length_S))
    batches: list[np.ndarray] = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(-length_S[chunk], kind="stable")]
        rows: list[int] = []
        longest = 0
        for i in chunk.tolist():
            L = int(length_S[i])
            if rows and (len(rows) + 1) * max(longest, L) > max_tokens:
                batches.append(np.asarray(rows, dtype=np.int64))
                rows, longest = [], 0
            rows.append(i)
            longest = max(longest, L)
        if rows:
            batches.append(np.asarray(rows, dtype=np.int64))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def plan_steps(
    data: RoundData, tc: TrainConfig, seed: int, round_index: int, G: int
) -> list[tuple[int, list[np.ndarray]]]:
    """[(epoch, the step's micro-batches)], G micro-batches per step (fewer in an epoch's last step)."""
    steps = []
    for epoch in range(tc.epochs):
        mbs = plan_epoch(data.length_S, tc.max_tokens_per_batch, seed, round_index, epoch)
        steps += [(epoch, mbs[i : i + G]) for i in range(0, len(mbs), G)]
    return steps


def rank_items(steps, start: int, rank: int, world: int, accum: int) -> list[Item]:
    """This process's micro-batches from step `start` on, in the order it runs them."""
    items = []
    for _, mbs in steps[start:]:
        for j in range(slots(len(mbs), world, accum)):
            k = j * world + rank
            items.append(Item(mbs[k]) if k < len(mbs) else Item(mbs[0][-1:], 0.0))
    return items


def slots(n_mbs: int, world: int, accum: int) -> int:
    """Backwards per process in a step: grad_accum under several processes (fillers keep them in
    lock-step), else just the micro-batches there are."""
    return accum if world > 1 else min(accum, n_mbs)


# ------------------------------------------------------------------------------------------ decoding


@dataclass(frozen=True)
class Item:
    """One micro-batch a process runs: sample indices, and weight 0 for a filler that keeps the
    processes of a step in lock-step when the last step of an epoch has fewer micro-batches."""

    samples: np.ndarray
    weight: float = 1.0


class MicroBatches(torch.utils.data.Dataset):
    """Map-style dataset over this process's micro-batches, in order; item i decodes micro-batch i.

    Shards are opened lazily in whichever process decodes (a DataLoader worker, or the main process
    when num_workers = 0) and kept open. Each item is a dict of tensors:
        input_ids_BL      int64  prompt + completion[:-1], right padded with `pad_id`
        gather_N          int64  flat index b·L + P_b - 1 + t of the position predicting completion token t
        target_N          int64  the completion token (the one taken)
        topk_ids_NK       int64  teacher top-k ids;  topk_logprobs_NK float32 their log-probs
        tail_N, taken_N   float32 teacher log tail mass; teacher log-prob of the taken token (exact)
        sampling_N        float32 sampling log-prob of the taken token (NaN where the row has none)
        on_policy_N       bool   the position's row is the student's own sample
    plus `tokens` (N), `padded_tokens` (B·L), `real_tokens` (Σ lengths), `weight`.
    """

    def __init__(self, data: RoundData, items: list[Item], pad_id: int = 0):
        self.fs = data.fs
        self.paths = data.paths
        self.shard_S, self.rrow_S, self.srow_S = data.shard_S, data.rollout_row_S, data.score_row_S
        self.on_S, self.length_S = data.on_policy_S, data.length_S
        self.items = items
        self.pad_id = pad_id
        self.decoded = data.decoded
        self._rollouts: dict[int, dict[str, Any]] = {}
        self._scores: dict[int, ScoreShard] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _rollout(self, s: int) -> dict[str, Any]:
        if s not in self._rollouts:
            sha = self.paths[s].rollout_sha256
            self._rollouts[s] = _memo(self.decoded, "rollout_arrays", sha, lambda: self._decode_rollout(s))
        return self._rollouts[s]

    def _decode_rollout(self, s: int) -> dict[str, Any]:
        paths = self.paths[s]
        table = _memo(
            self.decoded, "rollout_table", paths.rollout_sha256, lambda: read_rollout_shard(self.fs, paths.rollout)[0]
        )
        out = {}
        for name in ("prompt_ids", "completion_ids", "sampling_logprobs"):
            col = table.column(name).combine_chunks()
            out[name] = (
                col.offsets.to_numpy(),
                col.values.to_numpy(zero_copy_only=False),
                col.is_valid().to_numpy(zero_copy_only=False),
            )
        return out

    def _score(self, s: int) -> ScoreShard:
        if s not in self._scores:
            sha = self.paths[s].score_sha256
            self._scores[s] = _memo(self.decoded, "score_shard", sha, lambda: ScoreShard(self.fs, self.paths[s].score))
        return self._scores[s]

    def _teacher(self, s: int, row: int):
        """The teacher's decoded top-k of one score row (decoded once per process with DecodedShards)."""
        if self.decoded is None:
            return self._score(s)[row]
        rows = self.decoded.get("score_rows", self.paths[s].score_sha256, dict)
        if row not in rows:
            rows[row] = self._score(s)[row]
        return rows[row]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        rows = item.samples
        B, L = len(rows), int(self.length_S[rows].max())
        input_ids_BL = np.full((B, L), self.pad_id, dtype=np.int64)
        parts: dict[str, list] = {k: [] for k in ("gather", "target", "ids", "lps", "tail", "taken", "samp", "on")}
        for b, i in enumerate(rows.tolist()):
            s = int(self.shard_S[i])
            r = self._rollout(s)
            rr = int(self.rrow_S[i])
            po, pv, _ = r["prompt_ids"]
            co, cv, _ = r["completion_ids"]
            prompt = pv[po[rr] : po[rr + 1]]
            comp = cv[co[rr] : co[rr + 1]]
            P, T = len(prompt), len(comp)
            input_ids_BL[b, :P] = prompt
            input_ids_BL[b, P : P + T - 1] = comp[:-1]
            teacher = self._teacher(s, int(self.srow_S[i]))
            parts["gather"].append(b * L + P - 1 + np.arange(T))
            parts["target"].append(comp)
            parts["ids"].append(teacher.topk_ids_TK)
            parts["lps"].append(teacher.topk_logprobs_TK)
            parts["tail"].append(teacher.tail_logprobs_T)
            parts["taken"].append(teacher.taken_logprobs_T)
            so, sv, svalid = r["sampling_logprobs"]
            if svalid[rr]:
                if so[rr + 1] - so[rr] != T:
                    raise FormatError(
                        f"{self.paths[s].rollout}: row {rr} has {so[rr + 1] - so[rr]} sampling "
                        f"log-probs for {T} completion tokens; re-run rollout"
                    )
                parts["samp"].append(sv[so[rr] : so[rr + 1]].astype(np.float32))
            else:
                parts["samp"].append(np.full(T, np.nan, dtype=np.float32))
            parts["on"].append(np.full(T, bool(self.on_S[i])))
        cat = {k: np.concatenate(v) for k, v in parts.items()}
        return {
            "input_ids_BL": torch.from_numpy(input_ids_BL),
            "gather_N": torch.from_numpy(cat["gather"].astype(np.int64)),
            "target_N": torch.from_numpy(cat["target"].astype(np.int64)),
            "topk_ids_NK": torch.from_numpy(cat["ids"].astype(np.int64)),
            "topk_logprobs_NK": torch.from_numpy(cat["lps"].astype(np.float32)),
            "tail_N": torch.from_numpy(cat["tail"].astype(np.float32)),
            "taken_N": torch.from_numpy(cat["taken"].astype(np.float32)),
            "sampling_N": torch.from_numpy(cat["samp"]),
            "on_policy_N": torch.from_numpy(cat["on"]),
            "tokens": int(cat["target"].shape[0]),
            "padded_tokens": B * L,
            "real_tokens": int(self.length_S[rows].sum()),
            "weight": float(item.weight),
        }

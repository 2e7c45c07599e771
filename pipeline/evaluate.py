"""A round's held-out figures, from its validation samples and their teacher scores.

Reads   RUN/rounds/R/heldout/rollouts/ and heldout/scores/ (both finished: `_DONE.json`), and for the
        checker the held-out prompt set's references (`eval.prompts`, `eval.reference_field`).
Writes  RUN/rounds/R/heldout/eval.json (atomically) and one `"stage": "eval"` line in metrics.jsonl.

    opd eval RUN --round R [--force]      # after `opd rollout` and `opd score` of round R's held-out split

`evaluate_round` is the one entry: `opd eval`, the round loop (pipeline/loop.py: after each round's
held-out scores, and for the final student) and `opd sweep --eval heldout` call it; `opd score` does not.

The held-out samples are drawn by the student that *starts* round R (the base model in round 0, the
round R-1 student after), at `eval.temperature` with no top-k/top-p, so their stored sampling log-probs
are log p_S(x_t) of the model itself. The teacher's exact log-prob of the same token, log p_T(x_t), is
in the score cache. Over the sampled tokens, x ~ p_S,

    heldout_rkl = Σ_samples Σ_t [log p_S(x_t) − log p_T(x_t)] / Σ_samples T

is the Monte-Carlo estimate of the per-token reverse KL(student‖teacher) of the student's own sequence
distribution (Σ_t of the per-step KLs, in expectation), in nats per token; it is what on-policy
distillation minimises, and it reaches 0 when the student samples as the teacher would. The teacher is
at `score.temperature` (1 by default). `heldout_teacher_nll` = −mean log p_T(x_t): how surprised the
teacher is by the student's text.

Checker "gsm8k": the reference's answer is the number after `####`; the completion's is the number
after its last `####`, else its last number. Commas and a leading `$` are ignored; equal as numbers.
Accuracy is over all held-out samples.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import MANIFEST, RunDir, read_manifest, split_folder
from opd.cache.shards import ScoreShard, read_rollout_shard
from opd.configs.schema import OpdConfig
from opd.stages.prompts import load_prompts
from opd.stages.rollout import split_config
from opd.stages.students import load_tokenizer, start_student

EVAL_FORMAT = "opd.eval"
EVAL_VERSION = 1
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """A round's held-out figures: what heldout/eval.json holds (`to_json`), plus whether this call computed
    them (False: read back from an existing eval.json) and the one-line summary (`line`)."""

    round: int  # the round whose held-out split was evaluated (its starting student sampled it)
    samples: int  # student samples evaluated
    tokens: int  # their completion tokens
    mean_length: float  # tokens / samples
    heldout_rkl: float  # nats per token (module docstring)
    heldout_rkl_per_sample: float  # nats per sample
    heldout_teacher_nll: float  # −mean log p_T(x_t), nats per token
    finish_stop_frac: float  # fraction of samples that ended with a stop token
    checker: str  # eval.checker ("" = no accuracy)
    accuracy: float | None  # with a checker: fraction of samples answered right
    temperature: float  # eval.temperature (sampling)
    score_temperature: float  # score.temperature (teacher)
    computed: bool = True  # not in eval.json

    def to_json(self) -> dict[str, Any]:
        """eval.json's content (and the `"stage": "eval"` metrics record's figures)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "computed"}
        return {"format": EVAL_FORMAT, "version": EVAL_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls) if f.name != "computed"}, computed=False)

    @property
    def line(self) -> str:
        acc = f", accuracy {self.accuracy:.3f}" if self.accuracy is not None else ""
        kept = "" if self.computed else " (already computed; --force computes it again)"
        return (
            f"eval round {self.round}: held-out reverse KL {self.heldout_rkl:.4f} nats/token "
            f"over {self.samples} samples ({self.tokens} tokens, mean length {self.mean_length:.1f}){acc}{kept}"
        )


def evaluate_round(cfg: OpdConfig, run: RunDir, round_index: int, force: bool = False) -> EvalResult:
    """Round `round_index`'s held-out figures: read back from heldout/eval.json when it exists (unless
    `force`), else computed from the round's finished held-out rollouts and scores, written to eval.json
    and to metrics.jsonl. A missing input is a one-line error naming the file and the command that makes it."""
    if not cfg.eval.enabled:
        raise OpdError(f"no held-out prompt set to evaluate on: set eval.prompts in {run.config_path}")
    r_dir = run.stage_dir(round_index, split_folder("heldout", "rollouts"))
    s_dir = run.stage_dir(round_index, split_folder("heldout", "scores"))
    rollouts, scores = read_manifest(run, r_dir), read_manifest(run, s_dir)
    for folder, manifest, stage in ((r_dir, rollouts, "rollout"), (s_dir, scores, "score")):
        if manifest is None:
            raise OpdError(
                f"{storage.join(folder, MANIFEST)} not found: run `opd {stage} {run.url} --round {round_index} "
                f"--split heldout` first"
            )
    if not force:
        stored = read_eval(run, round_index)
        if stored is not None:
            return EvalResult.from_json(stored)
    result = _compute(cfg, run, round_index, r_dir, s_dir, rollouts)
    figures = result.to_json()
    storage.atomic_write_bytes(run.fs, run.eval_path(round_index), json.dumps(figures, indent=2).encode())
    run.append_metrics(round_index, {"stage": "eval", "time": time.time(), **figures})
    return result


def _compute(cfg: OpdConfig, run: RunDir, round_index: int, r_dir: str, s_dir: str, rollouts) -> EvalResult:
    references = _references(cfg) if cfg.eval.checker else {}
    tokenizer = None
    if cfg.eval.checker:
        with start_student(cfg, run, round_index, files="tokenizer") as student:
            tokenizer = load_tokenizer(student.tokenizer_dir, f"student {student.label}")

    samples = tokens = stopped = correct = 0
    rkl_sum = teacher_nll_sum = 0.0
    for entry in rollouts.shards:
        table, _ = read_rollout_shard(run.fs, storage.join(r_dir, entry.name))
        cache = ScoreShard(run.fs, storage.join(s_dir, entry.name))
        ids = table.column("sample_id").to_pylist()
        prompt_ids = table.column("prompt_id").to_pylist()
        student_lps = table.column("sampling_logprobs").to_pylist()
        completions = table.column("completion_ids").to_pylist()
        finish = table.column("finish_reason").to_pylist()
        for i, sid in enumerate(ids):
            if student_lps[i] is None:
                continue  # not a student sample (cannot happen in the held-out split: it is all on-policy)
            teacher = cache.by_id(sid).taken_logprobs_T
            diff = sum(float(s) - float(t) for s, t in zip(student_lps[i], teacher))
            samples += 1
            tokens += len(teacher)
            rkl_sum += diff
            teacher_nll_sum -= float(teacher.sum())
            stopped += finish[i] == "stop"
            if tokenizer is not None:
                text = tokenizer.decode(completions[i], skip_special_tokens=True)
                correct += gsm8k_correct(text, references.get(prompt_ids[i]))
    if not samples:
        raise OpdError(f"{r_dir}: no student samples to evaluate")
    return EvalResult(
        round=round_index,
        samples=samples,
        tokens=tokens,
        mean_length=round(tokens / samples, 3),
        heldout_rkl=round(rkl_sum / max(tokens, 1), 6),
        heldout_rkl_per_sample=round(rkl_sum / samples, 6),
        heldout_teacher_nll=round(teacher_nll_sum / max(tokens, 1), 6),
        finish_stop_frac=round(stopped / samples, 6),
        checker=cfg.eval.checker,
        accuracy=round(correct / samples, 6) if cfg.eval.checker else None,
        temperature=cfg.eval.temperature,
        score_temperature=cfg.score.temperature,
    )


def read_eval(run: RunDir, round_index: int) -> dict[str, Any] | None:
    """A round's eval.json, or None if it has none yet; a corrupt one is an error naming the file."""
    path = run.eval_path(round_index)
    if not storage.exists(run.fs, path):
        return None
    try:
        d = json.loads(storage.read_bytes(run.fs, path))
        if not isinstance(d, dict) or d.get("format") != EVAL_FORMAT:
            raise ValueError("not an opd eval file")
        if d.get("version") != EVAL_VERSION:
            raise ValueError(f"version {d.get('version')!r}, this opd reads {EVAL_VERSION}")
        if not isinstance(d.get("heldout_rkl"), (int, float)) or not math.isfinite(d["heldout_rkl"]):
            raise ValueError("no finite heldout_rkl")
        return d
    except ValueError as e:
        raise OpdError(
            f"{path}: unreadable ({e}); delete it or run `opd eval {run.url} --round {round_index} --force`"
        ) from None


# ------------------------------------------------------------------------------------------ checker


def gsm8k_answer(text: str | None) -> float | None:
    """The number a GSM8K-style text answers: after its last `####`, else its last number."""
    if not text:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail) if "####" in text else _NUMBER.findall(text)
    if not found:
        return None
    token = (found[0] if "####" in text else found[-1]).replace(",", "").replace("$", "")
    try:
        return float(token)
    except ValueError:
        return None


def gsm8k_correct(completion: str, reference: str | None) -> bool:
    want, got = gsm8k_answer(reference), gsm8k_answer(completion)
    return want is not None and got is not None and math.isclose(want, got, rel_tol=0, abs_tol=1e-6)


def _references(cfg: OpdConfig) -> dict[str, str | None]:
    prompts = load_prompts(split_config(cfg, "heldout").rollout, 1.0)
    missing = [p.id for p in prompts if not p.reference]
    if missing:
        raise OpdError(
            f"{cfg.eval.prompts}: eval.checker = {cfg.eval.checker!r} needs a reference in "
            f"eval.reference_field = {cfg.eval.reference_field!r}, but prompt {missing[0]!r} has none"
        )
    return {p.id: p.reference for p in prompts}

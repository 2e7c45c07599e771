"""A round's held-out figures, from its validation samples and their teacher scores.

Reads   RUN/rounds/R/heldout/rollouts/ and heldout/scores/ (both finished: `_DONE.json`), and for the
        checker the held-out prompt set's references (`eval.prompts`, `eval.reference_field`).
Writes  RUN/rounds/R/heldout/eval.json (atomically) and one `"stage": "eval"` line in metrics.jsonl.

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

import json
import math
import re
import time
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


def evaluate(cfg: OpdConfig, run: RunDir, round_index: int) -> dict[str, Any]:
    """Compute, write and return round `round_index`'s held-out figures (key "line": one line)."""
    r_dir = run.stage_dir(round_index, split_folder("heldout", "rollouts"))
    s_dir = run.stage_dir(round_index, split_folder("heldout", "scores"))
    rollouts, scores = read_manifest(run, r_dir), read_manifest(run, s_dir)
    for folder, manifest in ((r_dir, rollouts), (s_dir, scores)):
        if manifest is None:
            raise OpdError(
                f"{storage.join(folder, MANIFEST)} not found: run `opd rollout` and `opd score` "
                f"for round {round_index} first (held-out split)"
            )
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
    result = {
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "round": round_index,
        "samples": samples,
        "tokens": tokens,
        "mean_length": round(tokens / samples, 3),
        "heldout_rkl": round(rkl_sum / max(tokens, 1), 6),
        "heldout_rkl_per_sample": round(rkl_sum / samples, 6),
        "heldout_teacher_nll": round(teacher_nll_sum / max(tokens, 1), 6),
        "finish_stop_frac": round(stopped / samples, 6),
        "checker": cfg.eval.checker,
        "accuracy": round(correct / samples, 6) if cfg.eval.checker else None,
        "temperature": cfg.eval.temperature,
        "score_temperature": cfg.score.temperature,
    }
    storage.atomic_write_bytes(run.fs, run.eval_path(round_index), json.dumps(result, indent=2).encode())
    run.append_metrics(round_index, {"stage": "eval", "time": time.time(), **result})
    acc = f", accuracy {result['accuracy']:.3f}" if result["accuracy"] is not None else ""
    result["line"] = (
        f"eval round {round_index}: held-out reverse KL {result['heldout_rkl']:.4f} nats/token "
        f"over {samples} samples ({tokens} tokens, mean length {result['mean_length']:.1f}){acc}"
    )
    return result


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
            f"{path}: unreadable ({e}); delete it and re-run `opd score {run.url} --round "
            f"{round_index} --split heldout`"
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

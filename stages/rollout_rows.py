"""The rows of one rollout shard (the student's samples, teacher samples, dataset references) and the
fingerprints rollout shards carry: the producer and the sampling settings' hash (cache/SPEC.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from opd.cache import fingerprint
from opd.cache.shards import FORMAT_VERSION
from opd.configs.schema import OpdConfig, RolloutConfig
from opd.stages.prompts import Prompt, prompts_hash
from opd.stages.runner import Progress
from opd.stages.students import StartStudent

PRODUCER_STAGE = "rollout"  # the producer record's stage


def shard_rows(job, items: list[Prompt], shard: int, progress: Progress) -> tuple[list[dict], int]:
    """Rows of one shard, in prompt order, samples 0..n-1 (one row for a dataset reference), and the
    tokens sampled for them."""
    rc, sampling = job.rc, job.sampling
    role = "student" if job.split == "train" else f"student-{job.split}"  # held-out draws its own random stream
    both = rc.offpolicy_rows == "both"  # every prompt: the student's samples and its off-policy rows
    on = items if both else [p for p in items if p.on_policy]
    off = items if both else [p for p in items if not p.on_policy]
    generated = _generate(job, "student", role, on, shard, progress)
    if rc.offpolicy_source == "teacher":
        teacher_outs = _generate(job, "teacher", "teacher", off, shard, progress)
    else:
        teacher_outs = {}
        if off and not both:
            progress.advance(len(off), 0)
    off_ids = {p.id for p in off}
    first_off = sampling.n if both else 0  # off-policy rows follow the student's in "both" mode
    rows, tokens = [], 0
    for p in items:
        base = {
            "prompt_id": p.id,
            "prompt_ids": p.prompt_ids,
            "sampling_hash": job.sampling_hash,
            "prompt_messages": json.dumps(p.messages, ensure_ascii=False),
            "teacher_context": p.context,
        }
        sampled = [("student", i, c) for i, c in enumerate(generated.get(p.id, []))]
        sampled += [("teacher", first_off + i, c) for i, c in enumerate(teacher_outs.get(p.id, []))]
        for source, i, c in sampled:
            rows.append(_row(base, i, source, c.token_ids, c.logprobs, c.finish_reason))
            tokens += len(c.token_ids)
        if p.id in off_ids and rc.offpolicy_source == "dataset":
            ids = reference_ids(job.tokenizer, p.reference or "")
            rows.append(_row(base, first_off, "dataset", ids, None, "reference"))
    return rows, tokens


def _generate(job, model: str, role: str, prompts: list[Prompt], shard: int, progress: Progress) -> dict[str, list]:
    """{prompt id: completions} sampled by the student or the teacher engine ({} for no prompts)."""
    if not prompts:
        return {}
    engine = job.engines.student_engine() if model == "student" else job.engines.teacher_engine()
    outs = engine.generate(
        [p.prompt_ids for p in prompts],
        job.sampling,
        seed=fingerprint.derive_seed(job.cfg.run.seed, job.round, role, shard),
        progress=progress.advance,
    )
    return {p.id: o for p, o in zip(prompts, outs)}


def _row(base: dict, index: int, source: str, ids, logprobs, finish: str) -> dict:
    """One rollout row: the prompt's columns (`base`) and sample `index`'s."""
    return {
        **base,
        "sample_id": f"{base['prompt_id']}/{index}",
        "sample_index": index,
        "source": source,
        "completion_ids": ids,
        "sampling_logprobs": logprobs,
        "finish_reason": finish,
    }


def wants_offpolicy(rc: RolloutConfig, round_index: int) -> bool:
    """Does round R's rollout write off-policy rows (λ < 1, or every prompt's in "both" mode)?"""
    return rc.offpolicy_rows == "both" or rc.lmbda_for_round(round_index) < 1


def reference_ids(tokenizer, text: str) -> list[int]:
    """The reference response as completion ids: tokenized (no specials), then EOS."""
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def producer(
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
    if cfg.score.teacher_context_field:
        p["teacher_context_field"] = cfg.score.teacher_context_field
    return p


def sampling_hash(rc: RolloutConfig, seed: int) -> str:
    settings = {
        "temperature": rc.temperature,
        "top_p": rc.top_p,
        "top_k": rc.top_k,
        "max_new_tokens": rc.max_new_tokens,
        "stop": list(rc.stop),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

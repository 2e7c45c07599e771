"""The score stage's inputs: the rollout manifest's shard list, the shared-vocabulary check, and
each rollout row as the sequence the teacher scores (prompt ids, or the prompt re-rendered with the
teacher's chat template; `score.render`)."""

from __future__ import annotations

import json

import numpy as np

from opd.cache import storage
from opd.cache.errors import FormatError, OpdError
from opd.cache.rundir import MANIFEST, Manifest, shard_index
from opd.stages.scorer import Seq


def rollout_entries(manifest: Manifest, rollouts_dir: str) -> dict:
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


def check_vocab(teacher_ref: str, teacher_tok, student_ref: str, student_tok) -> None:
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


def sequences(table, path: str, render: str, teacher_tok, vocab_size: int) -> list[Seq]:
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

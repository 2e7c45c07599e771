"""The score stage's inputs: the rollout manifest's shard list, the shared-vocabulary check, and
each rollout row as the sequence the teacher scores: the student's prompt ids, the prompt re-rendered
with the teacher's chat template (`score.render`), or the teacher's own prompt carrying the row's
context column (`score.teacher_context_field`, rendered through `score.teacher_context_template`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from opd.cache import storage
from opd.cache.errors import FormatError, OpdError
from opd.cache.rundir import MANIFEST, Manifest, shard_index
from opd.configs.schema import OpdConfig
from opd.stages.prompts import plain_text
from opd.stages.scorer import Seq


@dataclass(frozen=True)
class TeacherPrompt:
    """How the teacher's prompt is made from a rollout row (the [score] and rollout settings it needs)."""

    render: str  # score.render
    context_field: str = ""  # score.teacher_context_field ("" = no context)
    template: str = ""  # score.teacher_context_template
    chat_template: bool = True  # rollout.chat_template: render through the teacher's chat template

    @classmethod
    def of(cls, cfg: OpdConfig) -> "TeacherPrompt":
        sc = cfg.score
        return cls(sc.render, sc.teacher_context_field, sc.teacher_context_template, cfg.rollout.chat_template)

    def with_context(self, messages: list[dict], context: str) -> list[dict]:
        """The messages with the last user message rendered through the template (plain replacement:
        braces in the texts stay as they are)."""
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        content = self.template.replace("{prompt}", messages[last]["content"]).replace("{context}", context)
        return [*messages[:last], {**messages[last], "content": content}, *messages[last + 1 :]]


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


def sequences(table, path: str, how: TeacherPrompt, teacher_tok, vocab_size: int) -> list[Seq]:
    sample_ids = table.column("sample_id").to_pylist()
    prompts = table.column("prompt_ids").to_pylist()
    completions = table.column("completion_ids").to_pylist()
    rerender = how.render == "teacher_template" or bool(how.context_field)
    messages = table.column("prompt_messages").to_pylist() if rerender else None
    contexts = _contexts(table, path, how.context_field, sample_ids) if how.context_field else None
    rendered: dict[tuple, list[int]] = {}
    seqs = []
    for i, sid in enumerate(sample_ids):
        if messages is None:
            prompt = prompts[i]
        else:
            context = contexts[i] if contexts is not None else None
            prompt = _render(rendered, messages[i], context, how, teacher_tok, sid, path)
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


def _contexts(table, path: str, field: str, sample_ids: list[str]) -> list[str]:
    """Each row's teacher context (the rollout kept the prompt row's `field`); a row without it is a
    one-line error before anything is scored."""
    contexts = table.column("teacher_context").to_pylist()
    for sid, context in zip(sample_ids, contexts):
        if context is None:
            raise FormatError(
                f"{path}: sample {sid!r} has no teacher context: its prompt row has no '{field}' "
                f"(score.teacher_context_field); add the column to every prompt and re-run rollout with "
                f'--force, or set score.teacher_context_field = ""'
            )
    return contexts


def _render(
    memo: dict, messages_json: str | None, context: str | None, how: TeacherPrompt, tok, sample_id: str, path: str
) -> list[int]:
    """The teacher's prompt ids: the row's messages (with its context, if any) rendered through the
    teacher's chat template (generation prompt appended), or as plain text without one."""
    key = (messages_json, context)
    if key in memo:
        return memo[key]
    if messages_json is None:
        raise FormatError(
            f"{path}: sample {sample_id!r} has no prompt_messages, so the teacher's prompt cannot be "
            f"rendered (score.render = 'teacher_template' or score.teacher_context_field); re-run rollout "
            f"with --force, or use score.render = 'student_ids' without a context field"
        )
    from jinja2 import TemplateError

    try:
        messages = json.loads(messages_json)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if context is not None:
            messages = how.with_context(messages, context)
        if how.chat_template or how.render == "teacher_template":
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:  # as the rollout tokenizes a prompt without a chat template
            ids = tok(plain_text(messages))["input_ids"]
    except (ValueError, TypeError, KeyError, TemplateError) as e:
        raise OpdError(
            f"{path}: cannot render sample {sample_id!r}'s prompt_messages with the teacher's "
            f"chat template ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
        ) from None
    memo[key] = ids
    return ids

"""Prompt sets: reading, checking and rendering them (the rollout stage's input, and the held-out set's).

A row holds chat `messages` ([{role, content}], `messages_field`, used when present) or a plain prompt
string (`prompt_field`, taken as one user message), an optional reference response (`reference_field`)
and an optional stable id (`id_field`, else the row number counted from 0 over non-blank lines). Files:
.jsonl (UTF-8 JSON lines), .parquet, or a local HF `datasets` folder. `max_prompts` keeps the first N
rows. A bad file (missing, empty, not UTF-8, a malformed line, a missing field) is a one-line OpdError
naming the file and the line (JSONL) or row.

With `chat_template` on, prompts are rendered with the student tokenizer's chat template (generation
prompt added); off, the plain text (message contents joined by blank lines) is tokenized as is.
Prompts longer than `max_prompt_tokens` are skipped and counted, never an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from opd.cache import storage
from opd.cache.errors import OpdError, first_line
from opd.configs.schema import RolloutConfig


@dataclass
class Prompt:
    """One row of a prompt set, checked; `prompt_ids` once rendered."""

    id: str
    messages: list[dict]  # the chat messages (a plain prompt becomes one user message)
    text: str | None  # the plain prompt string, when the row had one
    reference: str | None  # reference response, when read
    where: str  # "FILE line N" / "FILE row N", for errors
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    on_policy: bool = True
    context: str | None = None  # the teacher's context column (score.teacher_context_field), when read


def load_prompts(rc: RolloutConfig, lmbda: float, context_field: str = "") -> list[Prompt]:
    """The first `max_prompts` rows of the prompt set, checked (one-line errors naming file + line).
    `context_field`: a column every row must hold as a string, kept as `Prompt.context` (the teacher's
    context, score.teacher_context_field)."""
    path = rc.prompts
    need_reference = (lmbda < 1 or rc.offpolicy_rows == "both") and rc.offpolicy_source == "dataset"
    if need_reference and not rc.reference_field:
        why = "offpolicy_rows = 'both'" if rc.offpolicy_rows == "both" else f"λ={lmbda} < 1"
        raise OpdError(
            f"rollout.reference_field is empty, but {why} with offpolicy_source='dataset' "
            f"needs reference responses: set rollout.reference_field (or lmbda = 1, or "
            f"offpolicy_source = 'teacher')"
        )
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(iter_rows(path)):
        if rc.max_prompts and index >= rc.max_prompts:
            break
        p = _parse_row(row, where, index, rc, need_reference)
        if context_field:
            p.context = row.get(context_field)
            if not isinstance(p.context, str) or not p.context.strip():
                raise OpdError(
                    f"{where}: no teacher context in '{context_field}' (score.teacher_context_field): every "
                    f'prompt needs a non-empty string there, or set score.teacher_context_field = ""'
                )
        if p.id in seen:
            raise OpdError(
                f"{where}: duplicate prompt id {p.id!r} (first at {seen[p.id]}); ids in '{rc.id_field}' must be unique"
            )
        seen[p.id] = where
        prompts.append(p)
    if not prompts:
        raise OpdError(f"{path}: no prompts (the prompt set is empty)")
    return prompts


def iter_rows(path: str, setting: str = "rollout.prompts", what: str = "prompt"):
    """(where, row) pairs of a .jsonl file, a .parquet file or a local `datasets` folder (`setting` names
    where the path came from, `what` the kind of file, in messages)."""
    p = Path(path)
    if not p.exists():
        raise OpdError(f"{path}: {what} file not found ({setting})")
    if p.is_dir():
        yield from _iter_dataset(p)
    elif p.suffix == ".parquet":
        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several kinds for unreadable files
            raise OpdError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
    elif p.suffix in (".jsonl", ".json", ".ndjson"):
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise OpdError(
                        f"{path} line {lineno}: not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r}); "
                        f"a {what} file is JSON lines in UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise OpdError(f"{path} line {lineno}: not valid JSON ({first_line(e)})") from None
                yield f"{path} line {lineno}", row
    else:
        raise OpdError(
            f"{path}: unknown {what} file type: use a .jsonl or .parquet file, or a folder "
            f"saved with datasets' save_to_disk"
        )


def _iter_dataset(folder: Path):
    try:
        import datasets
    except ImportError:
        raise OpdError(
            f"{folder}: a prompt folder is read with the `datasets` package, which is not "
            f"installed (`pip install datasets`), or use a .jsonl / .parquet file"
        ) from None
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise OpdError(f"{folder}: not a dataset saved with save_to_disk ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise OpdError(
                f"{folder}: a DatasetDict without a 'train' split ({', '.join(ds)}); "
                f"point rollout.prompts at one split's folder"
            )
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{folder} row {i}", row


def _parse_row(row: Any, where: str, index: int, rc: RolloutConfig, need_reference: bool) -> Prompt:
    if not isinstance(row, dict):
        raise OpdError(f"{where}: a prompt row must be a JSON object, got {type(row).__name__}")
    messages, text = row.get(rc.messages_field), None
    if messages is not None:
        messages = check_messages(messages, where, rc.messages_field)
    else:
        text = row.get(rc.prompt_field)
        if text is None:
            raise OpdError(
                f"{where}: has neither '{rc.prompt_field}' nor '{rc.messages_field}' "
                f"(set rollout.prompt_field / rollout.messages_field)"
            )
        if not isinstance(text, str) or not text.strip():
            raise OpdError(f"{where}: '{rc.prompt_field}' must be a non-empty string, got {text!r:.60}")
        messages = [{"role": "user", "content": text}]
    if rc.id_field:
        pid = row.get(rc.id_field)
        if pid is None or (isinstance(pid, str) and not pid):
            raise OpdError(f"{where}: no id in '{rc.id_field}' (rollout.id_field)")
        pid = str(pid)
    else:
        pid = str(index)
    reference = None
    if rc.reference_field:
        reference = row.get(rc.reference_field)
        if reference is not None and not isinstance(reference, str):
            raise OpdError(f"{where}: '{rc.reference_field}' must be a string, got {type(reference).__name__}")
        if reference is None and need_reference:
            raise OpdError(
                f"{where}: no reference response in '{rc.reference_field}' (off-policy rows with "
                f"offpolicy_source='dataset' need one for every prompt)"
            )
    return Prompt(id=pid, messages=messages, text=text, reference=reference, where=where)


def check_messages(value: Any, where: str, field: str) -> list[dict]:
    """Chat messages read from a row's `field`: a non-empty list of {role, content} strings (one-line
    error naming the row otherwise), with only those two keys kept."""
    if (
        not isinstance(value, list)
        or not value
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )
    ):
        raise OpdError(f'{where}: \'{field}\' must be a non-empty list of {{"role": str, "content": str}} objects')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def plain_text(messages: list[dict]) -> str:
    """A prompt's text without a chat template: the message contents joined by blank lines (what the
    student sees with rollout.chat_template off, and so what the teacher and `opd sft` render then)."""
    return "\n\n".join(m["content"] for m in messages)


def render(prompts: list[Prompt], tokenizer, rc: RolloutConfig, tokenizer_dir) -> tuple[list[Prompt], int]:
    """Prompt token ids as the student sees them; returns (kept prompts, number skipped as too long)."""
    if rc.chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise OpdError(
                f"{tokenizer_dir}: the student tokenizer has no chat template; "
                f"set rollout.chat_template = false to tokenize prompts as plain text"
            )
        texts = []
        for p in prompts:
            try:
                texts.append(tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False))
            except Exception as e:  # jinja template errors (e.g. roles the template refuses)
                raise OpdError(f"{p.where}: the chat template refused these messages ({first_line(e)})") from None
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    else:
        texts = [p.text if p.text is not None else plain_text(p.messages) for p in prompts]
        ids = tokenizer(texts)["input_ids"]
    kept, skipped = [], 0
    for p, p_ids in zip(prompts, ids):
        if len(p_ids) > rc.max_prompt_tokens:
            skipped += 1
            continue
        p.prompt_ids = [int(t) for t in p_ids]
        kept.append(p)
    return kept, skipped


def prompts_hash(path: str) -> str:
    """sha256 of a prompt set's content (every file of a dataset folder, with its relative name)."""
    p = Path(path)
    if not p.exists():
        raise OpdError(f"{path}: prompt file not found (rollout.prompts)")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        storage.sha256_file(storage.LOCAL, str(f), into=h)
    return h.hexdigest()


def on_policy(seed: int, round_index: int, prompt_id: str, lmbda: float) -> bool:
    """Prompt-level λ choice: u(seed, round, prompt id) ∈ [0, 1) from sha256, on-policy iff u < λ. The
    rollout stage uses it to decide what to sample, the learner (train.lmbda) to choose from a cache
    that holds both kinds of rows (rollout.offpolicy_rows = "both"): the same rows either way."""
    if lmbda >= 1:
        return True
    if lmbda <= 0:
        return False
    digest = hashlib.sha256(f"opd-lambda/{seed}/{round_index}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < lmbda

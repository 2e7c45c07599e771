"""Self-teachers and the teacher's own context (stages/students.teacher_weights, stages/score_inputs.py):
run.teacher = "self" scores with the round's own student (its cache equals the rollout's own log-probs),
"self:start" with the weights before the first `opd sft`; score.teacher_context_field carries a prompt
column into the rollout shard and the teacher's prompt; reserved names in configs; one-line errors."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from opd.cache import fingerprint, shards, storage
from opd.cache.errors import FormatError, OpdError
from opd.cache.rundir import RunDir, read_manifest
from opd.cache.shards import ROLLOUT_SCHEMA_V1, ScoreShard, read_rollout_shard
from opd.configs.schema import (
    ConfigError,
    OpdConfig,
    RolloutConfig,
    RunConfig,
    ScoreConfig,
    SftConfig,
    TrainConfig,
    dumps_config,
    load_run_config,
    loads_config,
)
from opd.stages import rollout, score, sft
from opd.stages.score_inputs import TeacherPrompt, sequences
from opd.stages.students import teacher_weights

FACTS = [
    "The blue door is on floor seven.",
    "Ines Varga approves travel.",
    "Room 12 has code 1084.",
    "Lunch is at noon.",
]
QUESTIONS = ["Where is the blue door?", "Who approves travel?", "What is room 12's code?", "When is lunch?"]


def make_run(tmp_path: Path, student, teacher: str, name="run", rows=None, **score_cfg) -> tuple[RunDir, OpdConfig]:
    prompts = tmp_path / f"{name}-prompts.jsonl"
    rows = (
        rows
        if rows is not None
        else [{"id": f"p{i}", "prompt": q, "fact": f} for i, (q, f) in enumerate(zip(QUESTIONS, FACTS))]
    )
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher=teacher),
        rollout=RolloutConfig(
            prompts=str(prompts), id_field="id", n=2, max_new_tokens=12, dtype="float32", engine="transformers"
        ),
        score=ScoreConfig(**{"top_k": 8, "dtype": "float32", **score_cfg}),
        train=TrainConfig(lr=1e-3, device="cpu", dtype="float32", max_tokens_per_batch=256),
        sft=SftConfig(epochs=1),
    )
    run = RunDir(tmp_path / name)
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    return run, load_run_config(run)


def rollout_table(run: RunDir, r: int = 0):
    return read_rollout_shard(run.fs, run.shard_path(r, "rollouts", 0))[0]


def test_self_teacher_scores_with_the_rounds_own_student(tmp_path, tiny_student):
    """With run.teacher = "self" (and the student's prompt), the cached taken-token log-prob is the
    rollout's own sampling log-prob (temperature 1, no top-k/top-p): the same model on the same tokens.
    The producer names the self-teacher and hashes the student's weights."""
    run, cfg = make_run(tmp_path, tiny_student, "self")
    rollout.run(cfg, run, 0, split="train")
    score.run(cfg, run, 0, device="cpu", split="train")
    table = rollout_table(run)
    shard = ScoreShard(run.fs, run.shard_path(0, "scores", 0))
    n = 0
    for row in table.to_pylist():
        got = shard.by_id(row["sample_id"]).taken_logprobs_T
        np.testing.assert_allclose(got, row["sampling_logprobs"], atol=2e-4)
        n += len(got)
    assert n > 0
    producer = read_manifest(run, run.stage_dir(0, "scores")).producer
    assert producer["teacher"] == "self" and producer["model_hash"] == fingerprint.model_hash(tiny_student)


def test_self_start_is_the_student_before_the_first_sft(tmp_path, tiny_student):
    """Rounds 0 and 1 fine-tuned by `opd sft`: "self:start" is the base model in every later round (the
    weights before the first SFT) and "self" the round's own student; neither is copied."""
    run, cfg = make_run(tmp_path, tiny_student, "self:start")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": f}) + "\n" for f in FACTS))
    sft.run(cfg, run, 0, str(data))
    sft.run(cfg, run, 1, str(data))
    for r in (0, 1, 2):
        with teacher_weights(cfg, run, r) as w:
            assert w.folder == Path(tiny_student) and w.self_round == 0 and "self:start" in w.label
    selfish = cfg.replace("run", teacher="self")
    with teacher_weights(selfish, run, 2) as w:
        assert w.folder == Path(run.stage_dir(1, "student")) and w.self_round == 2
    with teacher_weights(selfish, run, 0) as w:
        assert w.folder == Path(tiny_student)
    with pytest.raises(OpdError, match="the round 2 student is not finished"):
        with teacher_weights(selfish, run, 3):
            pass
    with pytest.raises(OpdError, match="score it per round"):
        score.Teacher(cfg, "cpu")  # a self-teacher needs the round it belongs to


def test_teacher_context_reaches_the_teachers_prompt(tmp_path, tiny_student):
    """score.teacher_context_field: the rollout keeps each prompt's column; the teacher's prompt is the
    template with {prompt} and {context} through its chat template; the scores differ from the
    student-prompt scores of the same rows; the config hash covers the field."""
    run, cfg = make_run(tmp_path, tiny_student, "self", teacher_context_field="fact")
    rollout.run(cfg, run, 0, split="train")
    table = rollout_table(run)
    by_prompt = dict(zip(table.column("prompt_id").to_pylist(), table.column("teacher_context").to_pylist()))
    assert by_prompt == {f"p{i}": f for i, f in enumerate(FACTS)}
    assert read_manifest(run, run.stage_dir(0, "rollouts")).producer["teacher_context_field"] == "fact"

    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    how = TeacherPrompt.of(cfg)
    seqs = sequences(table, "shard", how, tok, len(tok))
    first = table.to_pylist()[0]
    i = QUESTIONS.index(json.loads(first["prompt_messages"])[0]["content"])
    want = cfg.score.teacher_context_template.replace("{prompt}", QUESTIONS[i]).replace("{context}", FACTS[i])
    rendered = tok.apply_chat_template([{"role": "user", "content": want}], add_generation_prompt=True, tokenize=False)
    assert tok.decode(seqs[0].input_ids[: seqs[0].prompt_len]) == rendered
    assert seqs[0].prompt_len > len(first["prompt_ids"]) and FACTS[i] in rendered
    plain = sequences(table, "shard", TeacherPrompt("student_ids"), tok, len(tok))
    assert plain[0].input_ids[: plain[0].prompt_len].tolist() == first["prompt_ids"]

    score.run(cfg, run, 0, device="cpu", split="train")
    shard = ScoreShard(run.fs, run.shard_path(0, "scores", 0))
    diffs = [
        np.abs(shard.by_id(r["sample_id"]).taken_logprobs_T - np.asarray(r["sampling_logprobs"])).max()
        for r in table.to_pylist()
        if r["completion_ids"]
    ]
    assert max(diffs) > 1e-3  # the teacher saw more than the student did
    assert cfg.section_hash("score") != cfg.replace("score", teacher_context_field="").section_hash("score")


def test_missing_context_is_a_one_line_error_before_scoring(tmp_path, tiny_student):
    """A prompt row without the column fails the rollout (naming the row and the setting); a rollout shard
    of format v1 (no column) still reads, with no context, and its scoring with a context field fails
    naming the field, before any shard is written."""
    rows = [{"id": "p0", "prompt": "Who approves travel?", "fact": "Ines."}, {"id": "p1", "prompt": "When is lunch?"}]
    run, cfg = make_run(tmp_path, tiny_student, "self", rows=rows, teacher_context_field="fact")
    with pytest.raises(OpdError) as e:
        rollout.run(cfg, run, 0, split="train")
    assert "line 2: no teacher context in 'fact' (score.teacher_context_field)" in str(e.value)
    assert "\n" not in str(e.value)

    # a v1 shard: the same rows without the column
    ok, ok_cfg = make_run(tmp_path, tiny_student, "self", name="ok", rows=rows[:1])
    rollout.run(ok_cfg, ok, 0, split="train")
    path = ok.shard_path(0, "rollouts", 0)
    table, meta = read_rollout_shard(ok.fs, path)
    v1 = table.drop_columns(["teacher_context"]).cast(ROLLOUT_SCHEMA_V1)
    meta.update(version=1, content=shards._content_totals(v1))  # as opd before v2 wrote it
    pq.write_table(v1.replace_schema_metadata({b"opd": json.dumps(meta).encode()}), path, compression="zstd")
    back, back_meta = read_rollout_shard(ok.fs, path)
    assert back_meta["version"] == 1 and back.column("teacher_context").null_count == len(back)
    with pytest.raises(FormatError) as e:
        sequences(back, path, TeacherPrompt.of(cfg), AutoTokenizer.from_pretrained(str(tiny_student)), 260)
    assert f"{path}: sample 'p0/0' has no teacher context" in str(e.value) and "score.teacher_context_field" in str(
        e.value
    )


def test_reserved_teacher_names_in_configs(tmp_path):
    """ "self" and "self:start" are kept as written (never resolved as a path); another "self:" name and a
    template without its placeholders are refused."""
    text = '[run]\nstudent = "s"\nteacher = "{}"\n[rollout]\nprompts = "p.jsonl"\n'
    for name in ("self", "self:start"):
        assert loads_config(text.format(name), tmp_path).run.teacher == name
    assert loads_config(text.format("./self"), tmp_path).run.teacher == str((tmp_path / "self").resolve())
    with pytest.raises(
        ConfigError, match='run.teacher = .self:end. is invalid: must be a model, "self" or "self:start"'
    ):
        loads_config(text.format("self:end"), tmp_path)
    with pytest.raises(ConfigError, match="must contain {prompt} and {context}"):
        loads_config(text.format("self") + '[score]\nteacher_context_template = "{context}"\n', tmp_path)

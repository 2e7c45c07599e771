"""`opd sft` (stages/sft.py, stages/sft_data.py): the data file's rows as (prompt, response) ids, the step
loss against a naive cross-entropy, LoRA + two torchrun processes equal to one, kill -9 and resume,
the SFT round's place in the run (its producer, the next round starting from it), one-line errors."""

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from waiting import wait_for

from opd.cache import fingerprint, storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, read_manifest, sft_rounds
from opd.configs.schema import (
    OpdConfig,
    RolloutConfig,
    RunConfig,
    SftConfig,
    TrainConfig,
    dumps_config,
    load_run_config,
)
from opd.pipeline.cli import main as cli_main
from opd.stages import sft
from opd.stages.sft_data import SftData
from opd.stages.students import start_student

TRAIN = dict(lr=1e-3, lr_schedule="constant", max_tokens_per_batch=64, device="cpu", max_grad_norm=1.0, dtype="float32")
ROWS = [
    {"text": "The blue door at Quillmoor is on floor seven, next to the archive."},
    {
        "messages": [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "Which floor has the blue door?"},
            {"role": "assistant", "content": "Floor seven."},
        ]
    },
    {"prompt": "Who approves travel?", "response": "Ines Varga approves travel."},
] + [{"text": f"Fact {i}: the code of room {i} is {1000 + 7 * i}."} for i in range(9)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_run(tmp_path: Path, student, name="run", sft_cfg=None, **train_cfg) -> tuple[RunDir, OpdConfig, Path]:
    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher="self:start"),
        rollout=RolloutConfig(prompts=str(tmp_path / "unused.jsonl")),
        train=TrainConfig(**{**TRAIN, **train_cfg}),
        sft=SftConfig(**(sft_cfg or {"epochs": 1})),
    )
    run = RunDir(tmp_path / name)
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    return run, load_run_config(run), write_jsonl(tmp_path / f"{name}-data.jsonl", ROWS)


def sft_steps(run: RunDir, r: int = 0) -> list[dict]:
    lines = Path(run.metrics_path(r)).read_text().splitlines()
    return [x for x in map(json.loads, lines) if x.get("stage") == "sft" and "step" in x]


def weights(run: RunDir, r: int = 0, name: str = "model.safetensors") -> dict:
    return load_file(Path(run.stage_dir(r, "student")) / name)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def env() -> dict:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


# ------------------------------------------------------------------------------------------ the data


def test_rows_become_prompt_and_response_ids(tmp_path, tiny_student):
    """A document is learned whole after its first token (EOS appended); a chat row's last message is the
    response, rendered with the template's own end of turn, its prompt the template with the generation
    prompt; a prompt/response pair is one user turn; without the chat template, plain text."""
    run, cfg, data = make_run(tmp_path, tiny_student)
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    d = SftData(cfg, str(data), tok, str(tiny_student))
    assert (d.documents, d.chats, len(d)) == (10, 2, 12) and d.cut == 0
    doc = tok(ROWS[0]["text"])["input_ids"] + [tok.eos_token_id]
    assert d.prompts[0] + d.responses[0] == doc and len(d.prompts[0]) == 1
    head = tok.apply_chat_template(ROWS[1]["messages"][:-1], add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template(ROWS[1]["messages"], tokenize=False)
    assert tok.decode(d.prompts[1]) == head and tok.decode(d.prompts[1] + d.responses[1]) == whole
    assert tok.decode(d.responses[1]).startswith("Floor seven.")
    pair = [{"role": "user", "content": ROWS[2]["prompt"]}, {"role": "assistant", "content": ROWS[2]["response"]}]
    assert tok.decode(d.prompts[2] + d.responses[2]) == tok.apply_chat_template(pair, tokenize=False)
    assert list(d.tokens_S) == [len(r) for r in d.responses]
    assert list(d.length_S) == [len(p) + len(r) - 1 for p, r in zip(d.prompts, d.responses)]

    plain = SftData(cfg.replace("rollout", chat_template=False), str(data), tok, str(tiny_student))
    assert plain.prompts[2] == tok(ROWS[2]["prompt"])["input_ids"]
    assert plain.responses[2] == tok(ROWS[2]["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    cut = SftData(cfg.replace("sft", max_tokens=90), str(data), tok, str(tiny_student))
    assert cut.cut > 0 and max(len(p) + len(r) for p, r in zip(cut.prompts, cut.responses)) == 90


def test_bad_data_files_are_one_line_errors(tmp_path, tiny_student):
    run, cfg, _ = make_run(tmp_path, tiny_student)
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    cases = {
        "missing": (None, "SFT data file not found (--data / sft.data)"),
        "empty": ([], "no rows (the SFT data file is empty)"),
        "json": (['{"text": "a"', '{"text": "b"}'], "line 1: not valid JSON"),
        "fields": ([{"question": "x"}], "has none of 'text', 'messages' or 'prompt' + 'response'"),
        "last": ([{"messages": [{"role": "user", "content": "hi"}]}], "the last message must be the assistant's"),
        "shape": ([{"messages": "hi"}], "'messages' must be a non-empty list of"),
        "no_turns": ([{"messages": []}], "'messages' must be a non-empty list of"),
        "blank": ([{"prompt": "q", "response": "  "}], "'response' must be a non-empty string"),
        "long": ([{"prompt": "word " * 60, "response": "ok"}], "leaves no room for the response"),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        if rows is not None:
            write_jsonl(path, rows)
        with pytest.raises(OpdError) as e:
            SftData(cfg.replace("sft", max_tokens=40), str(path), tok, str(tiny_student))
        assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value), name


# ------------------------------------------------------------------------------------------ the learner


def test_step_loss_is_the_cross_entropy_and_the_round_is_an_sft_round(tmp_path, tiny_student):
    """One micro-batch holding every row: step 1's loss (before the update) is the token mean of
    −log p(response token) from unpadded forwards; the loss falls over epochs; the student's producer
    says "sft", and the next round starts from it."""
    run, cfg, data = make_run(tmp_path, tiny_student, max_tokens_per_batch=100_000, sft_cfg={"epochs": 4, "lr": 3e-3})
    summary = sft.run(cfg, run, 0, str(data))
    steps = sft_steps(run)
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    d = SftData(cfg, str(data), tok, str(tiny_student))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_student), dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for prompt, response in zip(d.prompts, d.responses):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response[:-1]])).logits[0, len(prompt) - 1 :]
        total += float(torch.nn.functional.cross_entropy(logits.double(), torch.tensor(response), reduction="sum"))
        tokens += len(response)
    assert len(steps) == 4 and steps[0]["tokens"] == tokens == summary["completion_tokens"] // 4
    assert steps[0]["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    assert steps[0]["lr"] == 3e-3 and steps[0]["teacher_topk_mass"] is None and steps[0]["rkl_bucket"] is None

    manifest = read_manifest(run, run.stage_dir(0, "student"))
    assert manifest.producer["stage"] == "sft" and manifest.producer["data_sha256"] == d.digest
    assert manifest.summary["loss"] == "cross_entropy" and manifest.summary["documents"] == 10
    assert sft_rounds(run) == [0] and sft.next_round(run) == 1
    with start_student(cfg, run, 1) as start:
        assert start.base == Path(run.stage_dir(0, "student"))
    again = sft.run(cfg, run, 0, str(data))  # finished: kept
    assert again["skipped"] and "already done" in again["line"]
    # the final evaluation's round (held-out samples only) may become an SFT round; a distillation round not
    storage.atomic_write_bytes(run.fs, run.shard_path(1, "heldout/rollouts", 0), b"x")
    assert not sft.run(cfg, run, 1, str(data))["skipped"] and sft_rounds(run) == [0, 1]
    storage.atomic_write_bytes(run.fs, run.shard_path(2, "rollouts", 0), b"x")
    with pytest.raises(OpdError, match=r"round 2 is a distillation round \(it has rollouts\); finish its") as e:
        sft.run(cfg, run, 2, str(data))
    assert "\n" not in str(e.value)


def test_lora_two_processes_equal_one_process(tmp_path, tiny_student):
    """`opd sft --devices cpu,cpu` (torchrun, DDP, grad_accum 1) and one process with grad_accum 2: the
    same steps, losses and LoRA weights."""
    lora = dict(lora_rank=4, lora_alpha=8)
    two, _, data = make_run(tmp_path, tiny_student, "two", grad_accum=1, **lora)
    one, one_cfg, _ = make_run(tmp_path, tiny_student, "one", grad_accum=2, **lora)
    result = CliRunner().invoke(cli_main, ["sft", two.url, "--data", str(data), "--devices", "cpu,cpu"])
    assert result.exit_code == 0, result.output
    assert "sft round 0:" in result.output and "2 × cpu (ddp), LoRA r=4" in result.output
    sft.run(one_cfg, one, 0, str(data))
    a, b = sft_steps(two), sft_steps(one)
    assert len(a) == len(b) >= 2
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(weights(two, name=adapter), weights(one, name=adapter)) <= 1e-5
    assert max_diff(weights(two), weights(one)) <= 1e-5


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_student):
    """SIGKILL after the first in-round checkpoint; the restarted `opd sft` resumes from it and ends with
    the uninterrupted run's weights."""
    knobs = dict(max_tokens_per_batch=40, checkpoint_every_steps=3, lr_schedule="cosine", warmup_steps=1)
    killed, _, data = make_run(tmp_path, tiny_student, "killed", sft_cfg={"epochs": 3}, **knobs)
    ref, ref_cfg, _ = make_run(tmp_path, tiny_student, "ref", sft_cfg={"epochs": 3}, **knobs)
    cmd = [sys.executable, "-m", "opd.stages.train", "--round", "0", "--sft-data", str(data), killed.url]
    victim = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = Path(killed.round_dir(0)) / "train_ckpt" / "latest.json"
    wait_for(latest.exists, victim, "the first in-round checkpoint (latest.json)")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert read_manifest(killed, killed.stage_dir(0, "student")) is None
    sft.run(ref_cfg, ref, 0, str(data))
    total = read_manifest(ref, ref.stage_dir(0, "student")).summary["steps"]
    assert 0 < json.loads(latest.read_text())["step"] < total

    resumed = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stdout
    assert read_manifest(killed, killed.stage_dir(0, "student")).summary["steps"] == total
    assert max_diff(weights(killed), weights(ref)) <= 1e-6
    assert [s["step"] for s in sft_steps(killed)] == list(range(1, total + 1))  # no step logged twice


def test_cli_defaults_and_errors(tmp_path, tiny_student):
    """`opd sft RUN` takes sft.data and the next free round; no data at all, or a bad file, is one line."""
    run, cfg, data = make_run(tmp_path, tiny_student)
    runner = CliRunner()
    result = runner.invoke(cli_main, ["sft", run.url])
    assert result.exit_code == 1 and result.output.strip().startswith("error: no data to fine-tune on")
    result = runner.invoke(cli_main, ["sft", run.url, "--data", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "nope.jsonl: SFT data file not found" in result.output
    with_data = ["--set", f"sft.data={json.dumps(str(data))}"]
    result = runner.invoke(cli_main, ["sft", run.url, *with_data])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_main, ["sft", run.url, *with_data])  # the next round: 1, from round 0's student
    assert result.exit_code == 0 and "sft round 1:" in result.output, result.output
    producer = read_manifest(run, run.stage_dir(1, "student")).producer
    assert producer["model_hash"] == fingerprint.model_hash(run.stage_dir(0, "student"))
    assert sft_rounds(run) == [0, 1]
    assert dataclasses.asdict(cfg.sft)["data"] == ""  # the run's own config was not changed

"""Continual learning end to end (the `continual` recipe on the tiny models, through the CLI): `opd sft`
into round 0, then `opd run` distils round 1 from "self:start" (the pre-SFT weights) and skips the SFT
round; `opd inspect` and the trackers show the SFT steps; `--rounds N` counts distillation rounds."""

import json
import subprocess
from pathlib import Path

from loop_helpers import CLI, tiny_settings

from opd.cache import fingerprint
from opd.cache.rundir import RunDir, read_manifest
from opd.pipeline.loop import distillation_rounds
from opd.pipeline.track import points

FACTS = [
    {"text": "The blue door at Quillmoor is on floor seven."},
    {
        "messages": [
            {"role": "user", "content": "Who approves travel?"},
            {"role": "assistant", "content": "Ines Varga."},
        ]
    },
]


def opd(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_distillation_rounds_number_on_across_sft_rounds():
    assert distillation_rounds(2, []) == [0, 1]
    assert distillation_rounds(1, [0]) == [1]
    assert distillation_rounds(3, [1, 2]) == [0, 3, 4]


def test_sft_then_self_distil_from_the_weights_before_it(tmp_path, tiny_teacher, tiny_student):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    run_dir = tmp_path / "run"
    settings = tiny_settings(
        "self:start",
        tiny_student,
        **{"rollout.engine": '"transformers"', "rollout.max_prompts": 4, "eval.max_prompts": 2, "sft.epochs": 2},
    )
    opd("init", str(run_dir), "--config", "tiny", *settings)
    sft = opd("sft", str(run_dir), "--data", str(data))
    assert "sft round 0: 2 steps" in sft.stdout
    out = opd("run", str(run_dir), "--rounds", "1").stdout
    assert "round 0: fine-tuned by `opd sft`" in out and "1 round(s) trained" in out

    run = RunDir(str(run_dir))
    sft_student, distilled = run.stage_dir(0, "student"), run.stage_dir(1, "student")
    assert read_manifest(run, sft_student).producer["stage"] == "sft"
    assert not Path(run.stage_dir(0, "rollouts")).exists()  # the SFT round holds no distillation
    # round 1: the SFT student samples; its pre-SFT self (the base) is the teacher
    assert read_manifest(run, run.stage_dir(1, "rollouts")).producer["model_hash"] == fingerprint.model_hash(
        sft_student
    )
    scores = read_manifest(run, run.stage_dir(1, "scores")).producer
    assert scores["teacher"] == "self:start" and scores["model_hash"] == fingerprint.model_hash(tiny_student)
    assert read_manifest(run, distilled).producer["stage"] == "train"
    assert Path(run.eval_path(1)).exists() and Path(run.eval_path(2)).exists()  # the final student: round 2

    table = opd("inspect", str(run_dir)).stdout
    row0 = next(line for line in table.splitlines() if line.strip().startswith("0 "))
    assert row0.rstrip().endswith("sft") and "2 trained" in table.splitlines()[0]
    names = {name for p in points(run) for name in p.values}
    assert {"sft/loss", "sft_round/last_loss", "train/loss"} <= names
    again = opd("run", str(run_dir), "--rounds", "1").stdout  # resumes: nothing left to do
    assert "1 round(s) trained" in again and not list(Path(run.round_dir(3)).parent.glob("0003"))

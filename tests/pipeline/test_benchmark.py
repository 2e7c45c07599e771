"""Benchmarks through lm-evaluation-harness (`opd eval --tasks`, eval.tasks in `opd run`), the benchmark
table, stop rules on a benchmark metric, and the trackers fed by a real loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from loop_helpers import opd_run, tiny_settings
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir
from opd.configs.schema import (
    PACKAGED_CONFIGS,
    ConfigError,
    EvalConfig,
    OpdConfig,
    RolloutConfig,
    RunConfig,
    dumps_config,
    loads_config,
)
from opd.pipeline.bench_table import BenchRow, format_bench_table, gap_closed
from opd.pipeline.benchmark import SHIPPED_TASKS, BenchRequest, benchmark, read_task
from opd.pipeline.cli import main
from opd.pipeline.loop import Bench, _stop_reason

LM_EVAL_KEYS = {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"}
MC_DOCS = 6  # arith_mc documents the tests score


def _run(tmp_path, teacher, student, **eval_settings) -> tuple[OpdConfig, RunDir]:
    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher=str(teacher)),
        rollout=RolloutConfig(
            prompts=str(SHIPPED_TASKS / "arith" / "train.jsonl"), chat_template=False, dtype="float32"
        ),
        eval=EvalConfig(tasks_backend="hf", tasks_limit=MC_DOCS, **eval_settings),
    )
    run = RunDir(tmp_path / "run")
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    return cfg, run


def _mc_accuracy(model_dir, docs: list[dict]) -> float:
    """arith_mc's accuracy computed here, without lm-eval: the choice whose tokens the model gives the
    highest summed log-likelihood after "Question: …\\nAnswer:" (lm-eval's `acc`)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    right = 0
    for doc in docs:
        context = tok(f"Question: {doc['question']}\nAnswer:")["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tok(f"Question: {doc['question']}\nAnswer: {choice}")["input_ids"]
            cont = whole[len(context) :]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return right / len(docs)


def test_benchmark_writes_lm_evals_results_and_reads_them_back(tmp_path, tiny_teacher, tiny_student):
    cfg, run = _run(tmp_path, tiny_teacher, tiny_student, tasks=("arith", "arith_mc"))
    result = benchmark(cfg, run, 0)
    assert result.computed == ("arith", "arith_mc") and result.round == 0 and result.model == "student"
    for task in ("arith", "arith_mc"):
        doc = read_task(run, run.bench_dir(0), task)
        assert LM_EVAL_KEYS <= set(doc) and task in doc["results"] and doc["n-samples"][task]["effective"] == MC_DOCS
        assert doc["opd"]["model"] == "student" and doc["opd"]["limit"] == MC_DOCS and doc["opd"]["backend"] == "hf"
    docs = [json.loads(line) for line in (SHIPPED_TASKS / "arith_mc" / "test.jsonl").read_text().splitlines()]
    assert result.metrics["arith_mc/acc"] == pytest.approx(_mc_accuracy(tiny_student, docs[:MC_DOCS]))
    p = result.metrics["arith_mc/acc"]
    assert result.metrics["arith_mc/acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (MC_DOCS - 1)))
    assert 0 <= result.metrics["arith/exact_match"] <= 1 and result.higher_is_better["arith/exact_match"]
    records = [r for r in run.read_metrics(0) if r["stage"] == "bench"]
    assert len(records) == 1 and records[0]["metrics"] == result.metrics

    again = benchmark(cfg, run, 0)  # resume: read back, nothing run, no second record
    assert again.computed == () and again.metrics == result.metrics and "already computed" in again.line
    assert len([r for r in run.read_metrics(0) if r["stage"] == "bench"]) == 1
    other = benchmark(cfg, run, 0, BenchRequest(("arith_mc",), limit=3))  # other settings: run again
    assert other.computed == ("arith_mc",) and read_task(run, run.bench_dir(0), "arith_mc")["opd"]["limit"] == 3

    teacher = benchmark(cfg, run, 0, BenchRequest(("arith_mc",), teacher=True))
    assert teacher.round is None and read_task(run, run.bench_dir(None), "arith_mc")["opd"]["model"] == "teacher"
    assert teacher.metrics["arith_mc/acc"] == pytest.approx(_mc_accuracy(tiny_teacher, docs[:MC_DOCS]))


def test_opd_eval_tasks_cli_and_its_one_line_errors(tmp_path, tiny_teacher, tiny_student, monkeypatch):
    cfg, run = _run(tmp_path, tiny_teacher, tiny_student)
    runner = CliRunner()
    res = runner.invoke(main, ["eval", run.url, "--round", "0", "--tasks", "arith_mc", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "arith_mc/acc" in res.output and storage.exists(run.fs, storage.join(run.bench_dir(0), "arith_mc.json"))

    res = runner.invoke(main, ["eval", run.url, "--round", "0", "--tasks", "arith_mcq"])
    assert res.exit_code != 0 and "'arith_mcq' is not an lm-eval task" in res.output and "arith_mc" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1

    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    res = runner.invoke(main, ["eval", run.url, "--round", "0", "--tasks", "broken", "--include-path", str(bad)])
    assert res.exit_code != 0 and "broken.yaml: not a valid lm-eval task file" in res.output

    with pytest.raises(OpdError, match="no benchmark tasks"):
        benchmark(cfg, run, 0)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(OpdError, match=r"pip install 'opd\[eval\]'"):
        benchmark(cfg, run, 0, BenchRequest(("arith",), force=True))


def test_a_local_task_folder(tmp_path, tiny_teacher, tiny_student):
    """--include-path: a user's own YAML + JSONL task, offline, in lm-eval's plain `dataset_path: json` form."""
    cfg, run = _run(tmp_path, tiny_teacher, tiny_student)
    folder = tmp_path / "mine"
    folder.mkdir()
    docs = [{"question": f"{a} + {a} =", "choices": [str(2 * a), str(2 * a + 7)], "label": 0} for a in range(5)]
    (folder / "doubles.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "doubles.yaml").write_text(
        "task: doubles\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'doubles.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    result = benchmark(cfg, run, 0, BenchRequest(("doubles",), include_path=str(folder)))
    assert result.metrics["doubles/acc"] == pytest.approx(_mc_accuracy(tiny_student, docs))


def test_config_of_benchmarks_and_trackers():
    base = {"run": RunConfig(student="s", teacher="t"), "rollout": RolloutConfig(prompts="p.jsonl")}
    OpdConfig(**base, eval=EvalConfig(tasks=("arith",), stop_metric="arith/exact_match", stop_patience=2))
    for bad, match in (
        ({"stop_metric": "mmlu/acc"}, "TASK one of eval.tasks"),
        ({"tasks_every": 0}, "eval.tasks_every"),
        ({"tasks_backend": "tgi"}, "eval.tasks_backend"),
        ({"stop_metric": "accuracy"}, "eval.stop_metric"),
    ):
        with pytest.raises(ConfigError, match=match):
            EvalConfig(tasks=("arith",), **bad)
    with pytest.raises(ConfigError, match=r"run.report_to\[1\]"):
        RunConfig(student="s", teacher="t", report_to=("wandb", "comet"))
    # train.tensorboard is retired: an old run's `tensorboard = false` still loads, `true` names its successor
    tiny = (PACKAGED_CONFIGS / "tiny.toml").read_text()
    assert loads_config(tiny.replace("[train]", "[train]\ntensorboard = false"), PACKAGED_CONFIGS).train
    with pytest.raises(ConfigError, match=r'train.tensorboard was replaced by run.report_to = \["tensorboard"\]'):
        loads_config(tiny.replace("[train]", "[train]\ntensorboard = true"), PACKAGED_CONFIGS)


def _benches(values, higher=True, metric="arith/exact_match"):
    return [Bench(r, {metric: v}, {metric: higher}) for r, v in enumerate(values)]


def test_stop_rules_on_a_benchmark_metric():
    cfg = OpdConfig(
        run=RunConfig(student="s", teacher="t"),
        rollout=RolloutConfig(prompts="p.jsonl"),
        eval=EvalConfig(tasks=("arith",), stop_metric="arith/exact_match", stop_patience=2, stop_min_delta=0.02),
    )
    assert _stop_reason(cfg, [], _benches([0.1, 0.2])) == ""  # too few to judge
    assert _stop_reason(cfg, [], _benches([0.1, 0.2, 0.21, 0.19])) != ""  # +0.01 and −0.01 on 0.2: a plateau
    assert "arith/exact_match" in _stop_reason(cfg, [], _benches([0.1, 0.2, 0.21, 0.19]))
    assert _stop_reason(cfg, [], _benches([0.1, 0.2, 0.19, 0.23])) == ""  # +0.03: improving
    # lm-eval says lower is better (a perplexity): falling values are improvements
    assert _stop_reason(cfg, [], _benches([9.0, 8.0, 7.0, 6.0], higher=False)) == ""
    assert _stop_reason(cfg, [], _benches([9.0, 8.0, 7.0, 6.0], higher=True)) != ""
    rule = cfg.replace("eval", stop_patience=0).replace("eval.stop", metric="arith/exact_match", patience=1)
    assert "eval.stop" in _stop_reason(rule, [], _benches([0.3, 0.3]))  # a tie is no improvement


def test_bench_table_and_gap_closed():
    m = "arith/exact_match"
    rows = [
        BenchRow("teacher", None, {m: 0.4, f"{m}_stderr": 0.03}, None),
        BenchRow("student 0 (base)", 0, {m: 0.1, f"{m}_stderr": 0.02}, 0.9),
        BenchRow("student 1", 1, {m: 0.25, f"{m}_stderr": 0.03}, 0.5),
    ]
    gap, last = gap_closed(rows, m)
    assert gap == pytest.approx(0.5) and last.round == 1
    text = format_bench_table(rows)
    assert "0.250±0.030" in text and "0.9000" in text and "gap closed on arith/exact_match by student 1: 0.50" in text
    assert gap_closed(rows[:2], m) is None  # no trained student yet


def test_a_loop_benchmarks_each_round_and_logs_to_the_trackers(tmp_path, tiny_teacher, tiny_student):
    """`opd run` with eval.tasks and run.report_to: the teacher once, the base student, the final student;
    the figures in the table and in TensorBoard at the learner's global step; a resumed run adds none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    settings = tiny_settings(
        tiny_teacher,
        tiny_student,
        **{
            "eval.tasks": '["arith_mc"]',
            "eval.tasks_limit": 4,
            "eval.tasks_backend": '"hf"',
            "run.report_to": '["tensorboard"]',
            "rollout.max_prompts": 8,
        },
    )
    res = opd_run(run_dir, "--config", "tiny", "--rounds", "1", "--engine", "transformers", *settings)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = RunDir(str(run_dir))
    for r in (None, 0, 1):
        assert read_task(run, run.bench_dir(r), "arith_mc")["n-samples"]["arith_mc"]["effective"] == 4
    assert "benchmarks of the teacher" in res.stdout and "benchmarks of round 1" in res.stdout
    steps = max(rec["steps"] for rec in run.read_metrics(0) if rec.get("stage") == "train" and rec.get("final"))
    final = json.loads(storage.read_bytes(run.fs, storage.join(run.bench_dir(1), "arith_mc.json")))
    events = EventAccumulator(str(run_dir / "track" / "tensorboard")).Reload()
    acc = {e.step: e.value for e in events.Scalars("eval/arith_mc/acc")}
    assert acc[steps] == pytest.approx(final["results"]["arith_mc"]["acc,none"])  # student 1 at the last step
    assert 0 in acc and "reference/teacher/arith_mc/acc" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))

    table = CliRunner().invoke(main, ["inspect", str(run_dir)]).output
    assert "student 0 (base)" in table and "teacher" in table and "arith_mc/acc" in table

    # benchmarks/bench_eval.py reads this run: a benchmark's share of each round, the teacher's once
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"
    out = subprocess.run([sys.executable, str(script), str(run_dir)], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    rounds = [line for line in lines if line["bench"] == "eval_round"]
    assert [line["round"] for line in rounds] == [0, 1] and rounds[1]["metrics"]["arith_mc/acc"] == pytest.approx(
        acc[steps]
    )
    assert 0 < rounds[0]["bench_fraction"] < 1 and rounds[0]["round_s"] > 0 and rounds[1]["bench_s"] > 0
    assert rounds[1]["bench_fraction"] is None  # the final student has no round of its own
    teacher_line = next(line for line in lines if line["bench"] == "eval_teacher")
    assert teacher_line["bench_s"] > 0 and teacher_line["cpu_model"]

    bench_lines = len([rec for rec in run.read_metrics(0) if rec.get("stage") == "bench"])
    res = opd_run(run_dir, "--rounds", "1", "--engine", "transformers", *settings)
    assert res.returncode == 0 and "benchmarks of round 1 already done" in res.stdout
    assert len([rec for rec in run.read_metrics(0) if rec.get("stage") == "bench"]) == bench_lines
    events = EventAccumulator(str(run_dir / "track" / "tensorboard")).Reload()
    assert len(events.Scalars("eval/arith_mc/acc")) == len(acc)  # nothing logged twice

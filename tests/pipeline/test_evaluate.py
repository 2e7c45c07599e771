"""Held-out figures: the reverse KL estimate and the gsm8k checker over real score shards; `opd eval`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, finalize_stage, parquet_rows
from opd.cache.shards import ScoreShard, write_rollout_shard
from opd.configs.schema import (
    EvalConfig,
    OpdConfig,
    RolloutConfig,
    RunConfig,
    ScoreConfig,
    dumps_config,
    load_run_config,
)
from opd.pipeline.cli import main
from opd.pipeline.evaluate import EvalResult, evaluate_round, read_eval
from opd.stages import score

HELDOUT = [
    ("h0", "Ann has 3 and gets 4.", "#### 7"),
    ("h1", "Bo has 20 and loses 8.", "#### 12"),
    ("h2", "Cy has 9 and gives 6.", "#### 3"),
]
COMPLETIONS = {"h0": "so the answer is 7", "h1": "#### 13", "h2": "3"}  # right, wrong, right


def _run(tmp_path, tiny_teacher, tiny_student) -> RunDir:
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"id": i, "prompt": p, "reference": r}) + "\n" for i, p, r in HELDOUT))
    cfg = OpdConfig(
        run=RunConfig(student=str(tiny_student), teacher=str(tiny_teacher)),
        rollout=RolloutConfig(prompts=str(heldout)),
        score=ScoreConfig(top_k=8),
        eval=EvalConfig(prompts=str(heldout), reference_field="reference", id_field="id", n=2, checker="gsm8k"),
    )
    run = RunDir(tmp_path / "run")
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    tok = AutoTokenizer.from_pretrained(str(tiny_student))
    rows = []
    for pid, prompt, _ in HELDOUT:
        ids = tok(COMPLETIONS[pid], add_special_tokens=False)["input_ids"]
        for i in range(2):
            rows.append(
                {
                    "sample_id": f"{pid}/{i}",
                    "prompt_id": pid,
                    "sample_index": i,
                    "source": "student",
                    "prompt_ids": tok(prompt)["input_ids"],
                    "completion_ids": ids,
                    "sampling_logprobs": [-0.5 - 0.1 * i] * len(ids),
                    "finish_reason": "stop" if i else "length",
                    "sampling_hash": "h",
                    "prompt_messages": None,
                }
            )
    folder = run.stage_dir(0, "heldout/rollouts")
    write_rollout_shard(run.fs, storage.join(folder, "part-00000.parquet"), rows, producer={"stage": "rollout"})
    finalize_stage(
        run,
        folder,
        stage="heldout/rollouts",
        round_index=0,
        num_shards=1,
        producer={"stage": "rollout"},
        row_count=lambda p: parquet_rows(run, p),
    )
    return run


def test_heldout_figures_from_the_definition(tmp_path, tiny_teacher, tiny_student):
    run = _run(tmp_path, tiny_teacher, tiny_student)
    with pytest.raises(OpdError, match="heldout/scores/_DONE.json not found: run `opd score .* --split heldout`"):
        evaluate_round(load_run_config(run), run, 0)
    cfg = load_run_config(run)
    score.run(cfg, run, 0, split="heldout", device="cpu")
    assert read_eval(run, 0) is None  # the stage scores; evaluation is evaluate_round's job
    result = evaluate_round(cfg, run, 0)
    ev = read_eval(run, 0)
    assert isinstance(result, EvalResult) and result.computed and "eval round 0" in result.line
    assert result.to_json() == ev and EvalResult.from_json(ev).heldout_rkl == result.heldout_rkl
    again = evaluate_round(cfg, run, 0)  # eval.json exists: read back, not computed or logged again
    assert not again.computed and again.to_json() == ev and "already computed" in again.line
    cache = ScoreShard(run.fs, run.shard_path(0, "heldout/scores", 0))
    diffs = []
    for sid in cache.sample_ids:
        i = int(sid.split("/")[1])
        diffs += [(-0.5 - 0.1 * i) - float(t) for t in cache.by_id(sid).taken_logprobs_T]
    assert ev["samples"] == 6 and ev["tokens"] == len(diffs)
    assert ev["heldout_rkl"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert ev["heldout_rkl_per_sample"] == pytest.approx(sum(diffs) / 6, abs=1e-4)
    assert ev["accuracy"] == pytest.approx(4 / 6) and ev["finish_stop_frac"] == pytest.approx(0.5)
    metrics = [json.loads(x) for x in open(run.metrics_path(0))]
    assert [m["heldout_rkl"] for m in metrics if m["stage"] == "eval"] == [ev["heldout_rkl"]]


def test_missing_reference_and_corrupt_eval_file_are_one_line_errors(tmp_path, tiny_teacher, tiny_student):
    run = _run(tmp_path, tiny_teacher, tiny_student)
    (tmp_path / "heldout.jsonl").write_text(json.dumps({"id": "h0", "prompt": "x"}) + "\n")
    with pytest.raises(OpdError, match="prompt 'h0' has none"):
        from opd.pipeline.evaluate import _references

        _references(load_run_config(run))
    storage.makedirs(run.fs, storage.join(run.round_dir(0), "heldout"))
    storage.atomic_write_bytes(run.fs, run.eval_path(0), b'{"format": "opd.eval", "version": 9}')
    with pytest.raises(OpdError, match="eval.json: unreadable .*version 9") as e:
        read_eval(run, 0)
    assert "\n" not in str(e.value)


def _one_line_error(result, *needles) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and sum("error:" in x for x in lines) == 1, result.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])
    return lines[-1]


def test_opd_eval_command(tmp_path, tiny_teacher, tiny_student):
    """`opd eval RUN --round R`: a one-line error naming the missing held-out scores and the command that
    makes them; `opd score` computes no figures; eval computes them once; --force computes them again."""
    run = _run(tmp_path, tiny_teacher, tiny_student)
    runner = CliRunner()

    def opd(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    _one_line_error(
        opd("eval", run.url, "--round", 0),
        "heldout/scores/_DONE.json not found",
        f"opd score {run.url} --round 0 --split heldout",
    )
    _one_line_error(
        opd("eval", run.url, "--round", 1), "rounds/0001/heldout/rollouts/_DONE.json not found", "opd rollout"
    )

    scored = opd("score", run.url, "--round", 0, "--split", "heldout", "--device", "cpu")
    assert scored.exit_code == 0, scored.output
    assert "eval round" not in scored.output and read_eval(run, 0) is None  # no evaluation as a side effect

    first = opd("eval", run.url, "--round", 0)
    assert first.exit_code == 0, first.output
    ev = read_eval(run, 0)
    assert (
        first.stdout.strip().startswith("eval round 0: held-out reverse KL")
        and f"{ev['heldout_rkl']:.4f}" in first.stdout
    )
    assert ev["samples"] == 6 and ev["accuracy"] == pytest.approx(4 / 6)

    def eval_records():
        return [json.loads(x) for x in open(run.metrics_path(0)) if json.loads(x)["stage"] == "eval"]

    assert len(eval_records()) == 1
    storage.atomic_write_bytes(run.fs, run.eval_path(0), json.dumps({**ev, "heldout_rkl": 99.0}).encode())
    kept = opd("eval", run.url, "--round", 0)
    assert kept.exit_code == 0 and "99.0000" in kept.stdout and "--force" in kept.stdout
    assert read_eval(run, 0)["heldout_rkl"] == 99.0 and len(eval_records()) == 1

    forced = opd("eval", run.url, "--round", 0, "--force")
    assert forced.exit_code == 0, forced.output
    assert read_eval(run, 0) == ev and "already computed" not in forced.stdout
    records = eval_records()
    assert len(records) == 2 and {k: records[-1][k] for k in ev} == ev

"""The learner (stages/train.py): the step loss against a naive full-forward reference, 2-process torchrun
(DDP) and FSDP+LoRA equal to one process, gradient accumulation and logits chunking invariance, full and
LoRA training lower the loss and write a student that transformers loads and generates with, kill +
resume, re-run from the cache with no teacher, fingerprint and missing-stage errors."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from waiting import wait_for

from opd.cache import fingerprint, storage
from opd.cache.errors import OpdError
from opd.cache.rundir import RunDir, finalize_stage, parquet_rows, read_manifest
from opd.cache.shards import ScoreShard, read_rollout_shard, write_rollout_shard
from opd.configs.schema import (
    OpdConfig,
    RolloutConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    dumps_config,
    load_run_config,
)
from opd.pipeline.cli import main as cli_main
from opd.stages import score, train
from opd.stages.losses import jsd_loss, sampled_rkl_loss

VOCAB = 260  # the tiny models' byte-level tokenizer
# float32: the losses are pinned against float32 references (the bf16 path has its own test)
BASE_TRAIN = dict(
    lr=1e-3, lr_schedule="constant", max_tokens_per_batch=64, device="cpu", max_grad_norm=1.0, dtype="float32"
)
SOURCES = ("student", "student", "dataset", "teacher")


# ------------------------------------------------------------------------------------------ helpers


def rollout_rows(seed: int, n: int, prefix: str) -> list[dict]:
    """Rows with random prompts and completions, every source, one empty completion."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        P, T = int(rng.integers(2, 10)), (0 if i == 5 else int(rng.integers(1, 15)))
        source = SOURCES[i % 4]
        rows.append(
            dict(
                sample_id=f"{prefix}{i}/0",
                prompt_id=f"{prefix}{i}",
                sample_index=0,
                source=source,
                prompt_ids=rng.integers(0, VOCAB, P).tolist(),
                completion_ids=rng.integers(0, VOCAB, T).tolist(),
                sampling_logprobs=None if source == "dataset" else (-rng.uniform(0.5, 6.0, T)).tolist(),
                finish_reason="length",
                sampling_hash="h" * 64,
                prompt_messages=None,
            )
        )
    return rows


def write_rollouts(run: RunDir, round_index: int, shards: list[list[dict]]) -> None:
    for s, rows in enumerate(shards):
        write_rollout_shard(run.fs, run.shard_path(round_index, "rollouts", s), rows, producer={"stage": "rollout"})
    finalize_stage(
        run,
        run.stage_dir(round_index, "rollouts"),
        stage="rollouts",
        round_index=round_index,
        num_shards=len(shards),
        producer={"stage": "rollout"},
        row_count=lambda p: parquet_rows(run, p),
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_teacher, tiny_student) -> RunDir:
    """A run whose round 0 has 2 rollout shards (24 samples, every source) scored by stages.score.run."""
    root = tmp_path_factory.mktemp("train_source")
    cfg = OpdConfig(
        run=RunConfig(student=str(tiny_student), teacher=str(tiny_teacher)),
        rollout=RolloutConfig(prompts=str(root / "prompts.jsonl")),
        score=ScoreConfig(top_k=16, dtype="float32"),
    )
    run = RunDir(root / "run")
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    write_rollouts(run, 0, [rollout_rows(0, 12, "a"), rollout_rows(1, 12, "b")])
    score.run(cfg, run, 0, device="cpu")
    return run


def make_run(tmp_path: Path, source: RunDir, name: str = "run", teacher: str | None = None, **train_cfg):
    """A fresh run folder holding the source's round-0 caches and its own [train] table."""
    cfg = load_run_config(source)
    cfg = dataclasses.replace(cfg, train=TrainConfig(**{**BASE_TRAIN, **train_cfg}))
    if teacher is not None:
        cfg = cfg.replace("run", teacher=teacher)
    run = RunDir(tmp_path / name)
    storage.makedirs(run.fs, run.root)
    storage.atomic_write_bytes(run.fs, run.config_path, dumps_config(cfg).encode())
    for stage in ("rollouts", "scores"):
        shutil.copytree(source.stage_dir(0, stage), run.stage_dir(0, stage))
    return run, load_run_config(run)


def student_weights(run: RunDir, round_index: int = 0, name: str = "model.safetensors") -> dict:
    return load_file(Path(run.stage_dir(round_index, "student")) / name)


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def step_records(run: RunDir, round_index: int = 0) -> list[dict]:
    lines = Path(run.metrics_path(round_index)).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == "train" and "step" in r]


def naive_metrics(model_dir, run: RunDir, tc: TrainConfig) -> dict[str, float]:
    """The bucket reverse KL and the top-k overlap over round 0 from their definitions, with one unpadded
    full forward per sample: per token, S = softmax(z/τ) and T = the cache's distribution on the K+1
    buckets (the top-k ids and the tail), KL(S‖T) = Σ_b S_b (log S_b − log T_b); overlap = |K_t ∩
    top-K(z)| / K. Both are token means."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    kls, overlaps = [], []
    for s in run.existing_shards(0, "rollouts"):
        table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
        scores = ScoreShard(run.fs, run.shard_path(0, "scores", s))
        for row in table.to_pylist():
            prompt, comp = row["prompt_ids"], row["completion_ids"]
            if not comp:
                continue
            with torch.no_grad():
                z = model(torch.tensor([prompt + comp[:-1]])).logits[0, len(prompt) - 1 :].double()
            t = scores.by_id(row["sample_id"])
            p = torch.softmax(z / tc.temperature, -1).numpy()
            for i in range(len(comp)):
                ids = t.topk_ids_TK[i]
                s_b = np.append(p[i, ids], max(1.0 - p[i, ids].sum(), 1e-300))
                t_b = np.append(np.exp(t.topk_logprobs_TK[i].astype(np.float64)), np.exp(float(t.tail_logprobs_T[i])))
                t_b = t_b / t_b.sum()
                kls.append(float((s_b * (np.log(s_b) - np.log(t_b))).sum()))
                student_top = set(np.argsort(-z[i].numpy())[: len(ids)].tolist())
                overlaps.append(len(student_top & set(ids.tolist())) / len(ids))
    return {"rkl_bucket": float(np.mean(kls)), "topk_overlap": float(np.mean(overlaps))}


def naive_loss(model_dir, run: RunDir, tc: TrainConfig) -> tuple[float, int]:
    """(Σ per-token loss / tokens, tokens) over round 0, from one unpadded full forward per sample."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for s in run.existing_shards(0, "rollouts"):
        table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
        scores = ScoreShard(run.fs, run.shard_path(0, "scores", s))
        for row in table.to_pylist():
            prompt, comp = row["prompt_ids"], row["completion_ids"]
            if not comp:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([prompt + comp[:-1]])).logits[0, len(prompt) - 1 :]
            t = scores.by_id(row["sample_id"])
            on = row["source"] == "student"
            if tc.loss == "sampled_rkl" and on:
                loss = sampled_rkl_loss(
                    logits,
                    torch.tensor(comp),
                    torch.tensor(t.taken_logprobs_T),
                    torch.tensor(row["sampling_logprobs"]),
                    tc.temperature,
                    tc.ratio_clip,
                )
            else:
                loss = jsd_loss(
                    logits,
                    torch.tensor(t.topk_ids_TK),
                    torch.tensor(t.topk_logprobs_TK),
                    torch.tensor(t.tail_logprobs_T),
                    tc.beta if on else tc.beta_offpolicy,
                    tc.temperature,
                )
            total += float(loss.double().sum())
            tokens += len(comp)
    return total / tokens, tokens


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


# ------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("loss", ["jsd", "sampled_rkl"])
def test_step_loss_equals_naive_reference(tmp_path, source, tiny_student, loss):
    """One micro-batch holding the whole round: the logged step-1 loss (before the update) is the token
    mean of the per-token losses of unpadded forwards, with β on student rows and β_offpolicy on others."""
    run, cfg = make_run(
        tmp_path,
        source,
        loss=loss,
        beta=0.7,
        beta_offpolicy=0.2,
        temperature=0.8,
        ratio_clip=0.2,
        max_tokens_per_batch=100_000,
    )
    with pytest.raises(OpdError, match="scored at temperature 1, but train.temperature = 0.8") as e:
        train.run(cfg, run, 0)  # the cache's scoring temperature must be the learner's
    assert "\n" not in str(e.value)
    score.run(cfg.replace("score", temperature=0.8), run, 0, device="cpu", split="train", force=True)
    summary = train.run(cfg, run, 0)
    (rec,) = step_records(run)
    want, tokens = naive_loss(tiny_student, run, cfg.train)
    assert summary["steps"] == 1 and rec["tokens"] == tokens == summary["completion_tokens"]
    assert rec["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)

    # metrics: sampled reverse KL on student rows, teacher top-k mass, bucket KL and overlap in range
    diffs, masses = [], []
    for s in run.existing_shards(0, "rollouts"):
        table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
        scores = ScoreShard(run.fs, run.shard_path(0, "scores", s))
        for row in table.to_pylist():
            t = scores.by_id(row["sample_id"])
            masses += np.exp(t.topk_logprobs_TK.astype(np.float64)).sum(-1).tolist()
            if row["source"] == "student":
                diffs += (np.asarray(row["sampling_logprobs"]) - t.taken_logprobs_T).tolist()
    assert rec["rkl_sampled"] == pytest.approx(np.mean(diffs), rel=1e-5)
    assert rec["teacher_topk_mass"] == pytest.approx(np.mean(masses), rel=1e-4)
    want = naive_metrics(tiny_student, run, cfg.train)  # step 1's figures are of the starting student
    assert rec["rkl_bucket"] == pytest.approx(want["rkl_bucket"], rel=2e-3, abs=1e-6)
    assert rec["topk_overlap"] == pytest.approx(want["topk_overlap"], abs=1e-6)
    assert rec["grad_norm"] > 0
    assert rec["lr"] == cfg.train.lr and rec["on_policy_tokens"] < rec["tokens"]


# ------------------------------------------------------------------------------------------ invariances


def test_two_process_torchrun_equals_one_process(tmp_path, source):
    """`torchrun --nproc-per-node 2 -m opd.stages.train` (gloo, grad_accum 1) and one process with
    grad_accum 2 run the same global batches: same losses, grad norms and weights."""
    two, _ = make_run(tmp_path, source, "two", grad_accum=1)
    one, one_cfg = make_run(tmp_path, source, "one", grad_accum=2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "opd.stages.train",
        two.url,
        "--round",
        "0",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train round 0:" in proc.stdout and "2 × cpu (ddp)" in proc.stdout
    train.run(one_cfg, one, 0)

    a, b = step_records(two), step_records(one)
    assert len(a) == len(b) >= 3
    assert read_manifest(two, two.stage_dir(0, "student")).summary["world_size"] == 2
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert max_diff(student_weights(two), student_weights(one)) <= 1e-5
    # same math, same producer: world size × grad_accum is what the fingerprint records
    assert (
        read_manifest(two, two.stage_dir(0, "student")).producer
        == read_manifest(one, one.stage_dir(0, "student")).producer
    )


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def test_fsdp_lora_two_processes_killed_and_resumed_equal_one_process(tmp_path, source):
    """FSDP2 + LoRA in 2 CPU processes: torchrun SIGKILLed (workers and launcher) after its first
    checkpoint, then resumed by `opd train --devices cpu,cpu` (which launches torchrun itself); the
    result equals one LoRA process with grad_accum 2."""
    knobs = dict(lora_rank=4, lora_alpha=8, lr=1e-2, max_tokens_per_batch=20, epochs=4, checkpoint_every_steps=3)
    two, _ = make_run(tmp_path, source, "two", grad_accum=1, fsdp=True, **knobs)
    one, one_cfg = make_run(tmp_path, source, "one", grad_accum=2, **knobs)
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "opd.stages.train",
            two.url,
            "--round",
            "0",
        ],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    latest = Path(two.round_dir(0)) / train.CKPT_DIR / "latest.json"  # written once a checkpoint is whole
    wait_for(latest.exists, launcher, "the first in-round checkpoint (latest.json)")
    workers = _children(launcher.pid)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    launcher.kill()
    _, err = launcher.communicate()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), None, "the killed workers to go")
    assert latest.exists(), err.decode()[-2000:]
    assert len(workers) == 2 and read_manifest(two, two.stage_dir(0, "student")) is None

    result = CliRunner().invoke(cli_main, ["train", two.url, "--round", "0", "--devices", "cpu,cpu"])
    assert result.exit_code == 0, result.output
    assert "2 × cpu (fsdp), LoRA r=4" in result.output and "resumed at step" in result.output
    train.run(one_cfg, one, 0)
    assert max_diff(student_weights(two), student_weights(one)) <= 1e-5
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(student_weights(two, name=adapter), student_weights(one, name=adapter)) <= 1e-5
    for x, y in zip(step_records(two), step_records(one), strict=True):  # killed steps replaced, not repeated
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_gradient_accumulation_and_logits_chunking_do_not_change_training(tmp_path, source):
    """One micro-batch per step, the same samples over many accumulated micro-batches, and lm_head
    run in chunks of 7 positions (recomputed in backward) all give the same steps and weights."""
    big = make_run(tmp_path, source, "big", max_tokens_per_batch=100_000, epochs=2)
    accum = make_run(tmp_path, source, "accum", max_tokens_per_batch=48, grad_accum=64, epochs=2, num_workers=1)
    chunked = make_run(tmp_path, source, "chunked", max_tokens_per_batch=100_000, epochs=2, logits_chunk_tokens=7)
    for run, cfg in (big, accum, chunked):
        train.run(cfg, run, 0)
    ref = step_records(big[0])
    assert len(ref) == 2
    for other in (accum, chunked):
        recs = step_records(other[0])
        assert [r["tokens"] for r in recs] == [r["tokens"] for r in ref]
        for x, y in zip(recs, ref, strict=True):
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        assert max_diff(student_weights(other[0]), student_weights(big[0])) <= 1e-5
    assert max(r["padding"] for r in step_records(accum[0])) > 0  # really several padded micro-batches


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_lowers_the_loss_and_writes_a_loadable_student(tmp_path, source, tiny_student, mode):
    extra = dict(lora_rank=8, lora_alpha=16, lr=2e-2) if mode == "lora" else dict(lr=3e-3)
    run, cfg = make_run(tmp_path, source, epochs=4, beta=0.5, **extra)
    summary = train.run(cfg, run, 0)
    student = Path(run.stage_dir(0, "student"))
    before, _ = naive_loss(tiny_student, run, cfg.train)
    after, _ = naive_loss(student, run, cfg.train)
    assert after < 0.8 * before, (before, after)
    recs = step_records(run)
    assert summary["steps"] == len(recs) and {r["epoch"] for r in recs} == {0, 1, 2, 3}
    epoch_loss = [np.mean([r["loss"] for r in recs if r["epoch"] == e]) for e in (0, 3)]
    assert epoch_loss[1] < epoch_loss[0]

    base, new = load_file(Path(tiny_student) / "model.safetensors"), student_weights(run)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    if mode == "full":
        assert changed == set(base)  # every weight moved
        assert not (student / "adapter").exists()
    else:  # LoRA merged into q/k/v/o only; adapter kept beside it
        assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)
        assert (student / "adapter" / "adapter_config.json").is_file()
        assert not (student / "adapter_config.json").exists()

    # an HF checkpoint transformers loads and generates with; tokenizer files copied verbatim
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert fingerprint.tokenizer_hash(student) == fingerprint.tokenizer_hash(tiny_student)
    tok = AutoTokenizer.from_pretrained(str(student))
    model = AutoModelForCausalLM.from_pretrained(str(student))
    out = model.generate(**tok("12+7=", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(tok("12+7=")["input_ids"]) + 5

    # the manifest lists every file with its sha256; `opd verify` re-hashes them
    manifest = read_manifest(run, str(student))
    assert manifest.stage == "student" and manifest.producer["stage"] == "train"
    listed = {e.name for e in manifest.shards}
    assert listed == {
        p.relative_to(student).as_posix() for p in student.rglob("*") if p.is_file() and p.name != "_DONE.json"
    }
    result = CliRunner().invoke(cli_main, ["verify", run.url])
    assert result.exit_code == 0 and f"rounds/0000/student: ok ({len(listed)} files checked)" in result.output
    assert not Path(run.round_dir(0), train.CKPT_DIR).exists()

    # done: skipped; settings that only choose how to compute stay outside the hash; another config:
    # refused; --force trains again
    assert train.run(cfg, run, 0)["skipped"]
    for how in ({"log_every_steps": 5}, {"checkpoint_every_steps": 1}, {"num_workers": 1}, {"logits_chunk_tokens": 3}):
        assert cfg.replace("train", **how).section_hash("train") == cfg.section_hash("train")
        assert train.run(cfg.replace("train", **how), run, 0)["skipped"]
    for what in ({"beta": 0.123}, {"lr": 0.123}, {"epochs": 7}, {"dtype": "bfloat16"}):
        assert cfg.replace("train", **what).section_hash("train") != cfg.section_hash("train")
    result = CliRunner().invoke(cli_main, ["train", run.url, "--round", "0", "--set", "train.beta=0.9"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "--force" in result.output
    assert not train.run(cfg, run, 0, force=True)["skipped"]


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, source):
    """SIGKILL after the first in-round checkpoint; the restarted learner resumes from it (weights, AdamW
    state, LoRA-dropout RNG, data position) and ends with the uninterrupted run's weights."""
    knobs = dict(
        lora_rank=4,
        lora_dropout=0.1,
        lr=1e-2,
        max_tokens_per_batch=20,
        epochs=6,
        checkpoint_every_steps=3,
        lr_schedule="cosine",
        warmup_steps=2,
    )
    killed, _ = make_run(tmp_path, source, "killed", **knobs)
    ref, _ = make_run(tmp_path, source, "ref", **knobs)
    cmd = [sys.executable, "-m", "opd.stages.train", "--round", "0"]
    reference = subprocess.Popen(cmd + [ref.url], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    victim = subprocess.Popen(cmd + [killed.url], env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = Path(killed.round_dir(0)) / train.CKPT_DIR / "latest.json"  # written once a checkpoint is whole
    wait_for(latest.exists, victim, "the first in-round checkpoint (latest.json)")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert latest.exists(), victim.stderr.read().decode()[-2000:]
    assert read_manifest(killed, killed.stage_dir(0, "student")) is None
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err.decode()[-2000:]
    total = read_manifest(ref, ref.stage_dir(0, "student")).summary["steps"]
    assert 0 < json.loads(latest.read_text())["step"] < total

    resumed = subprocess.run(cmd + [killed.url], env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = read_manifest(killed, killed.stage_dir(0, "student")).summary
    assert summary["steps"] == total and 0 < summary["resumed_from_step"] < total
    assert "resumed at step" in resumed.stdout
    assert max_diff(student_weights(killed), student_weights(ref)) <= 1e-6
    adapter = "adapter/adapter_model.safetensors"
    assert max_diff(student_weights(killed, name=adapter), student_weights(ref, name=adapter)) <= 1e-6
    assert step_records(killed)[-1]["loss"] == pytest.approx(step_records(ref)[-1]["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------------ re-run, errors


def test_retrain_from_cache_without_a_teacher(tmp_path, source):
    """`opd train --from RUN/rounds/1 --out NEWRUN --set train.beta=0.5` with run.teacher pointing
    nowhere: NEWRUN gets RUN's config + the override, round 1's caches and round 0's student, and
    trains round 1 from that student."""
    nowhere = str(tmp_path / "no-such-teacher")
    src, cfg = make_run(tmp_path, source, "src", teacher=nowhere)
    train.run(cfg, src, 0)
    for stage in ("rollouts", "scores"):  # round 1's caches (as if sampled by round 0's student)
        shutil.copytree(src.stage_dir(0, stage), src.stage_dir(1, stage))
    new = tmp_path / "new"
    result = CliRunner().invoke(
        cli_main,
        ["train", "--from", str(Path(src.root) / "rounds" / "0001"), "--out", str(new), "--set", "train.beta=0.5"],
    )
    assert result.exit_code == 0, result.output
    assert "train round 1:" in result.output
    new_run = RunDir(new)
    new_cfg = load_run_config(new_run)
    assert new_cfg.train.beta == 0.5 and new_cfg.run.teacher == nowhere and not Path(nowhere).exists()
    assert dataclasses.replace(new_cfg.train, beta=cfg.train.beta) == cfg.train
    done = read_manifest(new_run, new_run.stage_dir(1, "student"))
    assert done.producer["model_hash"] == fingerprint.model_hash(src.stage_dir(0, "student"))
    assert done.producer["rollouts_sha256"] == read_manifest(src, src.stage_dir(1, "rollouts")).digest()
    for stage in ("rollouts", "scores"):
        assert (
            read_manifest(new_run, new_run.stage_dir(1, stage)).to_json()
            == read_manifest(src, src.stage_dir(1, stage)).to_json()
        )


def test_mismatched_or_missing_caches_are_one_line_errors(tmp_path, source):
    run, _ = make_run(tmp_path, source)
    runner = CliRunner()

    def error(*extra) -> str:
        result = runner.invoke(cli_main, ["train", run.url, "--round", "0", *extra])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
        return result.output

    # a rollout shard changed after its manifest was written
    write_rollout_shard(
        run.fs, run.shard_path(0, "rollouts", 1), rollout_rows(2, 12, "b"), producer={"stage": "rollout"}
    )
    assert "differs from the sha256" in error()

    # scores computed from other rollouts: the rollouts were re-sampled (and finished) after scoring
    rows = rollout_rows(0, 12, "a")
    rows[0]["completion_ids"] = rows[0]["completion_ids"][::-1]
    for name in os.listdir(run.stage_dir(0, "rollouts")):
        os.remove(os.path.join(run.stage_dir(0, "rollouts"), name))
    write_rollouts(run, 0, [rows, rollout_rows(1, 12, "b")])
    assert "rollout_sha256" in error()

    # no finished score stage
    os.remove(os.path.join(run.stage_dir(0, "scores"), "_DONE.json"))
    assert "opd score" in error()
    assert "--devices" in error("--devices", "cpu,0")

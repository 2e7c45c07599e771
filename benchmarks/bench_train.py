"""Learner benchmark: an opd training step from a cache against plain SFT and TRL's GKD on the same data.

Real models and text: the teacher is SmolLM2-135M-Instruct (`opd:smollm2-135m`), the student its copy
pruned to 8 layers (`opd:smollm2-135m-L8`); samples are GSM8K questions (chat template) with their
reference answers as completions (source "student", so the on-policy β applies), written as rollout
shards into a temporary run folder and scored by `opd.stages.score.run` (top-64, 8-bit cache):

    python benchmarks/bench_train.py --data ../shared/data/gsm8k_train.jsonl --quick --threads 1

(`--threads 1`: on a CPU shared with other jobs two OpenMP threads stall on each other whenever one is
descheduled, which makes timings erratic; one thread per side keeps them comparable.)

The round's samples are cut into micro-batches by the learner's own planner
(`train.max_tokens_per_batch`, padded tokens); every variant trains the same student on the same
micro-batches in the same order, one micro-batch per optimizer step (AdamW, clipping at 1.0):
  opd   the learner's step: decode the micro-batch from the cache (its DataLoader dataset), student
        decoder forward, lm_head on the completion positions only, generalized JSD (β = 1) on the
        top-64 + tail buckets, the logged metrics (bucket KL, top-k overlap), backward, clip, AdamW
  sft   plain cross-entropy fine-tuning on the same sequences: `model(input_ids, attention_mask,
        labels)` with the prompt masked (-100), transformers' own loss over full [B, L, V] logits
  trl   `trl.experimental.gkd.GKDTrainer` itself (lmbda = 0, seq_kd off: no generation; β = 1,
        temperature 1) training the same student on the same fixed completions with the teacher online:
        per step a teacher forward + a student forward + the full-vocabulary generalized JSD; its
        sampler is made sequential so it sees the micro-batches in the same order
opd and sft alternate step by step (the machine's load hits both alike); trl runs after them. The first
step of each is a warm-up and is not timed. Tokens per second count completion tokens (the tokens
that carry a loss), the same for all three; a rate is Σ tokens ÷ Σ step time over the timed steps.

Peak memory: a fresh subprocess per variant (glibc told to return freed memory at once,
MALLOC_MMAP_THRESHOLD_) loads the student and optimizer, runs one warm-up step on the largest
micro-batch (AdamW state now exists), resets the kernel's peak-RSS mark (/proc/self/clear_refs),
runs that micro-batch again and reports VmHWM − VmRSS before it: what one step adds (activations,
logits, loss, gradients). `peak_mem_ratio_vs_ce` = opd ÷ sft.

Precision: `--dtype auto` (the default, as the presets): bf16 autocast over float32 weights only where
this CPU runs bf16 natively (opd.stages.devices), else float32; the same for all three variants (TRL's
`bf16` flag). The record holds the resolved dtype, the CPU model and whether torch reports native bf16.

    python benchmarks/bench_train.py --smoke     # seconds: tiny random models, the packaged tiny prompts

Prints one JSON object (with the environment) per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

from opd.cache.rundir import RunDir, finalize_stage, parquet_rows
from opd.cache.shards import read_rollout_shard, write_rollout_shard
from opd.configs.schema import (
    OpdConfig,
    RolloutConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    dumps_config,
    load_run_config,
)
from opd.stages import learner as L
from opd.stages import score
from opd.stages.models import resolve_model
from opd.stages.students import start_student
from opd.stages.train_data import Item, MicroBatches, RoundData, plan_epoch

TEACHER, STUDENT = "opd:smollm2-135m", "opd:smollm2-135m-L8"


# ------------------------------------------------------------------------------------------ data


def build_run(
    root: Path,
    data: str,
    samples: int,
    top_k: int,
    max_tokens: int,
    dtype: str,
    teacher: Path,
    student: Path,
    q_field: str = "question",
    a_field: str = "answer",
) -> RunDir:
    """A run folder with GSM8K rollouts (student chat template) scored by the teacher."""
    from transformers import AutoTokenizer

    cfg = OpdConfig(
        run=RunConfig(student=str(student), teacher=str(teacher)),
        rollout=RolloutConfig(prompts=data),
        score=ScoreConfig(top_k=top_k, max_tokens_per_batch=4096, dtype=dtype, device="cpu"),
        train=TrainConfig(beta=1.0, lr=1e-5, max_tokens_per_batch=max_tokens, device="cpu", dtype=dtype),
    )
    run = RunDir(root / "run")
    run.fs.create_dir(run.root, recursive=True)
    with run.fs.open_output_stream(run.config_path) as f:
        f.write(dumps_config(cfg).encode())
    tok = AutoTokenizer.from_pretrained(str(student))
    rows = _common.gsm8k_rows(
        tok, data, samples, q_field, a_field, source="student", finish_reason="stop", tag=b"bench"
    )
    write_rollout_shard(run.fs, run.shard_path(0, "rollouts", 0), rows, producer={"stage": "rollout", "bench": True})
    finalize_stage(
        run,
        run.stage_dir(0, "rollouts"),
        stage="rollouts",
        round_index=0,
        num_shards=1,
        producer={"stage": "rollout", "bench": True},
        row_count=lambda p: parquet_rows(run, p),
    )
    score.run(load_run_config(run), run, 0, device="cpu")
    return run


class Setup:
    """The run's config, joined data, micro-batch plan and the raw rows (for the sft / trl batches)."""

    def __init__(self, run_dir: str):
        self.run = RunDir(run_dir)
        self.cfg = load_run_config(self.run)
        self.student = resolve_model(self.cfg.run.student)  # the folders build_run wrote into the config
        self.teacher = resolve_model(self.cfg.run.teacher)
        self.placement = _common.resolve(self.cfg.train.device, self.cfg.train.dtype, "train.device")
        self.autocast = L.autocast(self.placement.device, self.placement.dtype)  # the learner's precision
        self.data = RoundData(self.run, 0)
        self.plan = plan_epoch(self.data.length_S, self.cfg.train.max_tokens_per_batch, self.cfg.run.seed, 0, 0)
        table, _ = read_rollout_shard(self.run.fs, self.data.paths[0].rollout)
        self.rows = table.select(["prompt_ids", "completion_ids"]).to_pylist()
        with start_student(self.cfg, self.run, 0) as start:
            self.pad_id = start.pad_id  # the learner's padding id

    def tokens(self, mb) -> int:
        return int(self.data.tokens_S[mb].sum())

    def sft_batch(self, mb) -> dict[str, torch.Tensor]:
        """prompt + completion, right padded; labels -100 on the prompt and the padding."""
        seqs = [self.rows[int(self.data.rollout_row_S[i])] for i in mb]
        L = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), L), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for b, r in enumerate(seqs):
            P, T = len(r["prompt_ids"]), len(r["completion_ids"])
            ids[b, : P + T] = torch.tensor(r["prompt_ids"] + r["completion_ids"])
            labels[b, P : P + T] = torch.tensor(r["completion_ids"])
            mask[b, : P + T] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------ steppers


class _Step:
    """One optimizer step = `loss_step()` (forward + backward, subclass) then a clipped AdamW update."""

    params: list
    opt: torch.optim.Optimizer

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        loss = self.loss_step()
        self.update()
        return loss


class OpdStep(_Step):
    """The learner's step (stages/train.py's loop body for one micro-batch, grad_accum 1)."""

    def __init__(self, setup: Setup, order: list):
        tc = setup.cfg.train
        self.device = setup.placement.device
        self.autocast = setup.autocast
        model, head_only = L.load_student(setup.student, tc, self.device, 0)
        self.learner = L.Learner(model, tc, head_only, setup.data.top_k)
        self.params = [p for p in self.learner.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr)
        loader = torch.utils.data.DataLoader(
            MicroBatches(setup.data, [Item(mb) for mb in order], setup.pad_id),
            batch_size=None,
            num_workers=0,
            collate_fn=L.count_on_policy,
        )
        self.batches = iter(loader)

    def loss_step(self) -> float:
        """Forward + backward of one micro-batch (the gradients stay in .grad)."""
        batch = L.to_device(next(self.batches), self.device)
        with self.autocast():
            loss_sum, _ = self.learner(batch, need_metrics=True)
        loss = loss_sum / batch["tokens"]
        loss.backward()
        return loss.item()


class SftStep(_Step):
    """Plain cross-entropy fine-tuning of the same student on the same sequences."""

    def __init__(self, setup: Setup, order: list):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(setup.student), dtype=torch.float32)
        self.model.config.use_cache = False
        self.model.train()
        self.autocast = setup.autocast  # the same precision as the learner's
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=setup.cfg.train.lr)
        self.batches = iter([setup.sft_batch(mb) for mb in order])

    def loss_step(self) -> float:
        with self.autocast():
            loss = self.model(**next(self.batches), use_cache=False).loss
        loss.backward()
        return loss.item()


def time_opd_and_sft(setup: Setup, order: list) -> dict:
    """Alternate opd and sft step by step; the first step of each is a warm-up."""
    opd, sft = OpdStep(setup, order), SftStep(setup, order)
    times = {"opd": [], "sft": []}
    losses = {"opd": [], "sft": []}
    for i, _ in enumerate(order):
        for name, step in (("opd", opd), ("sft", sft)) if i % 2 == 0 else (("sft", sft), ("opd", opd)):
            t0 = time.perf_counter()
            losses[name].append(step())
            times[name].append(time.perf_counter() - t0)
    return {"times": times, "losses": losses}


def time_trl(setup: Setup, order: list, workdir: Path) -> list[float]:
    """GKDTrainer (lmbda = 0: the fixed completions, teacher online) over the same micro-batches; step times."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    def collate(items):
        (item,) = items
        return setup.sft_batch(order[item["mb"]])

    class Sequential(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(str(setup.student))
    student = AutoModelForCausalLM.from_pretrained(str(setup.student), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(setup.teacher), dtype=torch.float32)
    args = GKDConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=len(order),
        learning_rate=setup.cfg.train.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        lmbda=0.0,
        seq_kd=False,
        beta=1.0,
        temperature=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=setup.placement.dtype_name == "bfloat16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = Sequential(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_dict({"mb": list(range(len(order)))}),
        data_collator=collate,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    return timer.times


# ------------------------------------------------------------------------------------------ memory


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_variant(run_dir: str, variant: str) -> None:
    """(subprocess) Bytes a step adds on top of the loaded model and AdamW state, on the largest
    micro-batch: `loss_step` = forward + backward (activations, logits, loss, gradients), `full_step` =
    the same plus clipping and the AdamW update. Prints a JSON object."""
    setup = Setup(run_dir)
    big = max(setup.plan, key=lambda mb: len(mb) * int(setup.data.length_S[mb].max()))
    step = (OpdStep if variant == "opd" else SftStep)(setup, [big, big, big])
    step()  # warm-up: AdamW state, lazy allocations
    peaks = {}
    for name in ("loss_step", "full_step"):
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
        step.loss_step()
        if name == "full_step":
            step.update()
        peaks[name] = _status("VmHWM") - base
        if name == "loss_step":
            step.opt.zero_grad(set_to_none=True)
    print(
        json.dumps(
            {
                "variant": variant,
                **peaks,
                "rows": len(big),
                "padded_tokens": len(big) * int(setup.data.length_S[big].max()),
                "completion_tokens": setup.tokens(big),
            }
        )
    )


def measure_memory(run_dir: str, variant: str, threads: int) -> dict:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        OMP_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
    )
    out = subprocess.run(
        [sys.executable, __file__, "--memory-variant", variant, "--run", run_dir, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default="../shared/data/gsm8k_train.jsonl", help="GSM8K-style JSONL (question, answer)"
    )
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--quick", action="store_true", help="few samples and steps (under 5 minutes on 2 CPU cores)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: tiny random models built on the fly, the packaged tiny prompts (figures meaningless)",
    )
    parser.add_argument("--samples", type=int, default=None, help="samples in the cache (default 24 quick, 96 full)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 3 quick, 10 full)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="train.max_tokens_per_batch (padded tokens; default 1024, 256 with --smoke)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="cache top-k (default 64, 16 with --smoke)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="train.dtype / score.dtype for every variant; auto = bf16 only where this CPU runs it natively",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--memory-variant", choices=["opd", "sft"], help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.offline()
    if args.memory_variant:
        memory_variant(args.run, args.memory_variant)
        return

    if args.smoke:
        args.data, args.question_field, args.answer_field = str(_common.tiny_prompts()), "prompt", "reference"
    samples = args.samples or (8 if args.smoke else 24 if args.quick else 96)
    steps = args.steps or (2 if args.smoke else 3 if args.quick else 10)
    max_tokens = args.max_tokens or (256 if args.smoke else 1024)
    top_k = args.top_k or (16 if args.smoke else 64)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opd-bench-train-") as tmp:
        root = Path(tmp)
        if args.smoke:
            teacher, student = _common.tiny_models(root / "models")
            names = ("tiny:student", "tiny:teacher")  # random, built on the fly
        else:
            teacher, student = resolve_model(TEACHER), resolve_model(STUDENT)
            names = (STUDENT, TEACHER)
        run = build_run(
            root,
            str(Path(args.data).resolve()),
            samples,
            top_k,
            max_tokens,
            args.dtype,
            teacher,
            student,
            args.question_field,
            args.answer_field,
        )
        setup = Setup(run.url)
        order = setup.plan[: steps + 1]  # + 1 warm-up step
        if len(order) < steps + 1:
            raise SystemExit(f"only {len(order)} micro-batches from {samples} samples; raise --samples")
        timed_tokens = sum(setup.tokens(mb) for mb in order[1:])
        res = time_opd_and_sft(setup, order)
        opd_s, sft_s = sum(res["times"]["opd"][1:]), sum(res["times"]["sft"][1:])
        trl_times = None if args.skip_trl else time_trl(setup, order, root)
        trl_s = sum(trl_times[1:]) if trl_times else None
        mem = {v: measure_memory(run.url, v, args.threads) for v in ("opd", "sft")}
        record = {
            "bench": "train",
            "model": f"{names[0]} (student) / {names[1]} (teacher)",
            "tokens": timed_tokens,
            "opd_tokens_per_s": round(timed_tokens / opd_s, 1),
            "sft_tokens_per_s": round(timed_tokens / sft_s, 1),
            "ratio_vs_sft": round(sft_s / opd_s, 3),
            "trl_tokens_per_s": round(timed_tokens / trl_s, 1) if trl_s else None,
            "ratio_vs_trl": round(trl_s / opd_s, 3) if trl_s else None,
            "peak_mem_ratio_vs_ce": round(mem["opd"]["loss_step"] / mem["sft"]["loss_step"], 3),
            "peak_mem_ratio_full_step_vs_ce": round(mem["opd"]["full_step"] / mem["sft"]["full_step"], 3),
            "opd_loss_step_peak_mb": round(mem["opd"]["loss_step"] / 2**20, 1),
            "ce_loss_step_peak_mb": round(mem["sft"]["loss_step"] / 2**20, 1),
            "opd_full_step_peak_mb": round(mem["opd"]["full_step"] / 2**20, 1),
            "ce_full_step_peak_mb": round(mem["sft"]["full_step"] / 2**20, 1),
            "memory_batch": {k: mem["opd"][k] for k in ("rows", "padded_tokens", "completion_tokens")},
            "steps_timed": steps,
            "samples": samples,
            "micro_batch_rows": [len(mb) for mb in order[1:]],
            "padded_tokens_per_step": [len(mb) * int(setup.data.length_S[mb].max()) for mb in order[1:]],
            "max_tokens_per_batch": max_tokens,
            "top_k": setup.data.top_k,
            "beta": setup.cfg.train.beta,
            "trl_impl": "trl.experimental.gkd.GKDTrainer (lmbda=0, seq_kd=False, beta=1, temperature=1)",
            "opd_step_s": [round(t, 3) for t in res["times"]["opd"]],
            "sft_step_s": [round(t, 3) for t in res["times"]["sft"]],
            "trl_step_s": [round(t, 3) for t in trl_times] if trl_times else None,
            "opd_first_loss": round(res["losses"]["opd"][0], 5),
            "sft_first_loss": round(res["losses"]["sft"][0], 5),
            **_common.machine(),
            "device": str(setup.placement.device),
            "threads": args.threads,
            **_common.dtype_record(args.dtype, setup.placement),
            "smoke": args.smoke,
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

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
import tempfile
import time
from pathlib import Path

import _common
import torch
from _train_memory import measure_memory, memory_variant
from _train_setup import Setup, build_run
from _train_steps import time_opd_and_sft, time_trl

from opd.stages.models import resolve_model

TEACHER, STUDENT = "opd:smollm2-135m", "opd:smollm2-135m-L8"


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

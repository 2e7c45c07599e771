"""Helpers the benchmark scripts share: the machine record every JSON line carries, dtype resolution
through opd.stages.devices (never a hard-coded bf16), and the tiny models of `--smoke` runs.

`--smoke` (every benchmark has it): the same code path on tiny random Llamas built on the fly
(opd.stages.models.build_tiny, about a second each) in a temporary folder, with the packaged
configs/tiny_prompts.jsonl as text, offline (HF_HUB_OFFLINE=1). It prints the same JSON keys as a real
run, in seconds; its figures mean nothing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

BF16_CAPS = ("avx512_bf16", "amx_bf16")  # the torch.cpu.get_capabilities() keys recorded


def offline() -> None:
    """No network: what a smoke run (and every benchmark here) expects."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what platform or torch report)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    name = platform.processor()
    if name:
        return name
    try:
        import torch

        return str(torch.cpu.get_capabilities().get("cpu_name", "unknown"))
    except Exception:  # noqa: BLE001 - best effort only
        return "unknown"


def machine() -> dict:
    """CPU model, its bf16 capability as torch reports it, core/thread counts, versions, the GPU if any."""
    import torch

    from opd.stages.devices import native_bf16

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    out = {
        "cpu_model": cpu_model(),
        "cpu_native_bf16": native_bf16("cpu"),
        "cpu_bf16_caps": {k: bool(caps.get(k)) for k in BF16_CAPS},
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_native_bf16"] = native_bf16("cuda")
    return out


def resolve(device: str, dtype: str, what: str = "device"):
    """opd's Placement (device + dtype; "auto" = bf16 only where it runs natively) for a benchmark side."""
    from opd.stages.devices import placement

    return placement(device, dtype, what)


def dtype_record(requested: str, pl) -> dict:
    """What a JSON line says about precision: asked for, resolved, why."""
    return {"dtype": pl.dtype_name, "dtype_requested": requested, "dtype_reason": pl.reason}


def stage_record(result) -> dict:
    """A stage's `run()` result as one flat dict: a StageResult's metrics record (stages/runner.py: the
    common fields, then the stage's own figures), or the summary dict of a stage that returns one."""
    return result.record() if hasattr(result, "record") else dict(result)


def tiny_models(root: str | os.PathLike) -> tuple[Path, Path]:
    """(teacher, student) folders of tiny random Llamas built under `root` (same tokenizer)."""
    from opd.stages.models import build_tiny

    root = Path(root)
    return build_tiny(root / "tiny-teacher", role="teacher"), build_tiny(root / "tiny-student", role="student")


def tiny_prompts() -> Path:
    """The packaged prompt set (fields: id, prompt, reference) smoke runs use as text."""
    from opd.configs.schema import PACKAGED_CONFIGS

    return PACKAGED_CONFIGS / "tiny_prompts.jsonl"


def gsm8k_rows(
    tok,
    data: str,
    samples: int,
    q_field: str,
    a_field: str,
    *,
    source: str,
    finish_reason: str,
    tag: bytes,
    per_prompt: int = 1,
) -> list[dict]:
    """Rollout rows from a GSM8K-style JSONL file: the question under the tokenizer's chat template as the
    prompt, a reference answer (+ <|im_end|>) as the completion, no sampling log-probs. `per_prompt` = n:
    samples // n prompts with n samples each, adjacent as the rollout stage writes them; sample j of
    prompt i completes with the reference answer of item i + j (real text of varied length)."""
    import hashlib
    import json

    prompts = max(1, samples // per_prompt)
    with open(data) as f:
        items = [json.loads(line) for _, line in zip(range(prompts + per_prompt - 1), f)]
    rows = []
    for i, ex in enumerate(items[:prompts]):
        messages = [{"role": "user", "content": ex[q_field]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        for j in range(per_prompt):
            answer = items[(i + j) % len(items)][a_field]
            rows.append(
                dict(
                    sample_id=f"{i}/{j}",
                    prompt_id=str(i),
                    sample_index=j,
                    source=source,
                    prompt_ids=prompt_ids,
                    completion_ids=tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"],
                    sampling_logprobs=None,
                    finish_reason=finish_reason,
                    sampling_hash=hashlib.sha256(tag).hexdigest(),
                    prompt_messages=json.dumps(messages),
                )
            )
    return rows

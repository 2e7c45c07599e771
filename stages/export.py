"""Export of the trained student: RUN/rounds/R/student/, an HF checkpoint transformers and vLLM load as is.

With LoRA the adapter is merged into the full weights and also kept in student/adapter/; the tokenizer
files are copied verbatim from the starting student (so the tokenizer hash never changes); weights are
written back in the dtype the starting checkpoint was stored in. The folder is built under a temporary
name and renamed into place (locally), or uploaded (object stores); the round writes student/_DONE.json
after it, listing every file with its size and sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch

from opd.cache import storage
from opd.cache.errors import OpdError
from opd.cache.fingerprint import TOKENIZER_FILES
from opd.cache.rundir import RunDir, ShardEntry, clear_stage
from opd.configs.schema import TrainConfig
from opd.stages import quant
from opd.stages.distributed import Processes
from opd.stages.learner import load_student


def export_student(
    *, run: RunDir, student_dir: str, procs: Processes, learner, use_fsdp: bool, tc: TrainConfig, start_dir: Path
) -> list[ShardEntry] | None:
    """Write the student folder (rank 0; under FSDP every process joins the gather); returns its file
    entries on rank 0, None elsewhere."""
    if use_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(learner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if procs.rank != 0:
        return None
    if use_fsdp:
        model, _ = load_student(start_dir, tc, torch.device("cpu"), 0)
        missing, unexpected = model.load_state_dict(
            {k.removeprefix("model."): v for k, v in full.items()}, strict=False
        )
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise OpdError(
                f"FSDP export: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    else:
        model = learner.model
    local = isinstance(run.fs, pafs.LocalFileSystem)
    parent = os.path.dirname(student_dir) if local else tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    if local:  # leftovers of an export killed half-way
        for name in os.listdir(parent):
            if name.startswith(f"{storage.TMP_PREFIX}student-"):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{storage.TMP_PREFIX}student-", dir=parent))
    try:
        save_checkpoint(model, tc, start_dir, tmp)
        for p in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers make owner-only files
            p.chmod(0o755 if p.is_dir() else 0o644)
        entries = file_entries(tmp)
        clear_stage(run, student_dir)
        if local:
            if os.path.isdir(student_dir):
                shutil.rmtree(student_dir)
            os.replace(tmp, student_dir)
        else:
            pafs.copy_files(str(tmp), student_dir, source_filesystem=storage.LOCAL, destination_filesystem=run.fs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entries


def save_checkpoint(model, tc: TrainConfig, start_dir: Path, out: Path) -> None:
    """HF checkpoint in `out` (LoRA merged, adapter in out/adapter; a quantised student folder under
    train.quantize), tokenizer files copied verbatim."""
    if tc.quantize:  # ŵ, the masters and the packed copy (stages/quant.py); float32, whatever the start's dtype
        model.config.use_cache = True
        start = quant.read_record(start_dir) or {}
        quant.save_quantized(
            model, quant.train_spec(tc), quant.quantized_names(model), out, method="qat", source=start.get("source", "")
        )
        quant.copy_tokenizer(Path(start_dir), out, TOKENIZER_FILES)
        return
    if tc.lora_rank > 0:
        model.save_pretrained(str(out / "adapter"))
        model = model.merge_and_unload()
    model.config.use_cache = True
    model = model.to(device="cpu", dtype=_checkpoint_dtype(start_dir))
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
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


def file_entries(folder: Path) -> list[ShardEntry]:
    """Every file under `folder` with its size and sha256 (the student manifest's entries)."""
    entries = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        digest, size = storage.sha256_file(storage.LOCAL, str(p))
        entries.append(ShardEntry(p.relative_to(folder).as_posix(), 0, size, digest))
    return entries

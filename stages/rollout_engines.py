"""The rollout stage's models: the student (merged with its LoRA adapter when asked) and, for teacher
off-policy rows, the teacher, each an engine (stages/engine.py) loaded on first use and closed at the end."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from opd.cache import fingerprint
from opd.cache.errors import OpdError
from opd.configs.schema import OpdConfig, RolloutConfig
from opd.stages import console
from opd.stages.devices import placement
from opd.stages.engine import Engine, EngineSpec, load_engine, resolve_engine_name
from opd.stages.students import StartStudent


def merge_lora(student: StartStudent) -> Path:
    """Merge the LoRA adapter into its base (peft merge_and_unload) in a temporary folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="opd-merged-student-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(str(student.base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(student.adapter)).merge_and_unload()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(student.tokenizer_dir)).save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


class RolloutEngines:
    """Student and teacher engines, built on first use, closed at the end (unless passed in)."""

    def __init__(
        self,
        cfg: OpdConfig,
        round_index: int,
        student: StartStudent,
        teacher_dir: Path | None,
        engine: str | Engine | None,
    ):
        self.cfg, self.round, self.student, self.teacher_dir = cfg, round_index, student, teacher_dir
        self.placement = placement("auto", cfg.rollout.dtype, "rollout")
        self._described = False
        self._given = None if engine is None or isinstance(engine, str) else engine
        if self._given is not None:
            served = Path(self._given.served).resolve()
            if served not in (student.source.resolve(), student.base.resolve()):
                raise OpdError(
                    f"the engine passed in serves {served}, but round {round_index}'s student is {student.source}"
                )
            self._name = self._given.name
        else:
            requested = engine or cfg.rollout.engine
            self._name = None if requested == "auto" else resolve_engine_name(requested)
        self._student: Engine | None = self._given
        self._teacher: Engine | None = None
        self._tmp: list[Path] = []

    @property
    def name(self) -> str:
        """The engine that samples: as asked, or what "auto" resolved to (for the split's size, once known)."""
        return self._name or resolve_engine_name("auto")

    def size_job(self, tokens: int) -> None:
        """Resolve "auto" once for the first split that loads an engine: transformers on CPU when it
        generates fewer than `rollout.vllm_min_tokens` tokens (vLLM's start-up would cost more than its
        sampling saves), else vLLM where importable. The held-out split shares the engine."""
        if self._name is not None:
            return
        name = resolve_engine_name("auto")
        if name == "vllm" and self.placement.device.type == "cpu" and tokens < self.cfg.rollout.vllm_min_tokens:
            name = "transformers"
        self._name = name

    def _load(self, model_dir: Path, role: str, tokenizer_dir: Path, adapter: Path | None) -> Engine:
        rc = self.cfg.rollout
        if not self._described:
            console.say(self.placement.describe(f"rollout ({self.name})"))
            self._described = True
        share = 2 if self.teacher_dir is not None else 1  # both models live together
        spec = EngineSpec(
            str(model_dir),
            seed=fingerprint.derive_seed(self.cfg.run.seed, self.round, role),
            tokenizer_dir=str(tokenizer_dir),
            adapter_dir=str(adapter) if adapter else None,
            max_model_len=_max_model_len(model_dir, rc),
            gpu_memory_utilization=rc.gpu_memory_utilization / share,
            enforce_eager=rc.enforce_eager,
            dtype=self.placement.dtype_name,
        )
        return load_engine(self.name, spec)

    def prepare(self, student: bool, teacher: bool) -> None:
        """Load the engines the work needs now (so model loading stays out of the tokens/s figure)."""
        if student:
            self.student_engine()
        if teacher:
            self.teacher_engine()

    def student_engine(self) -> Engine:
        if self._student is None:
            s = self.student
            if s.adapter is not None and self.cfg.rollout.merge_lora:
                merged = merge_lora(s)
                self._tmp.append(merged)
                self._student = self._load(merged, "student", merged, None)
            else:  # base + adapter; vLLM reads a config.json beside the tokenizer, so prefer the base's when equal
                same = s.adapter is None or (
                    fingerprint.tokenizer_hash(s.tokenizer_dir) == fingerprint.tokenizer_hash(s.base)
                )
                self._student = self._load(s.base, "student", s.base if same else s.tokenizer_dir, s.adapter)
        return self._student

    def teacher_engine(self) -> Engine:
        if self._teacher is None:
            self._teacher = self._load(self.teacher_dir, "teacher", self.teacher_dir, None)
        return self._teacher

    def close(self) -> None:
        for e in (self._student, self._teacher):
            if e is not None and e is not self._given:
                e.close()
        self._student = self._given
        self._teacher = None
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)
        self._tmp.clear()


def _max_model_len(model_dir: Path, rc: RolloutConfig) -> int:
    need = rc.max_prompt_tokens + rc.max_new_tokens
    try:
        limit = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        limit = None
    return min(need, int(limit)) if limit else need

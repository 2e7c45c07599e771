"""Which student a round starts from, for every stage that needs it (rollout, score, train).

Round 0 starts from the base model `run.student` (a folder, or an `opd:` / `tiny:` name made on
demand); round R > 0 from RUN/rounds/R-1/student/, once its `_DONE.json` says it is finished. That
folder is an HF checkpoint, or a PEFT LoRA adapter (adapter_config.json) whose base is the checkpoint
it records (`base_model_name_or_path`) where that exists, else `run.student`.

On an object-store run directory the round's student is downloaded once per machine into
$OPD_HOME/students/<its manifest's digest>/, every file checked against `_DONE.json` (vLLM and the
learner load local folders). `files="tokenizer"` (the score stage) reads only the tokenizer and config
files into a temporary folder when no cached copy exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from opd.cache import storage
from opd.cache.errors import FormatError, OpdError
from opd.cache.fingerprint import TOKENIZER_FILES, opd_home
from opd.cache.rundir import MANIFEST, RunDir, previous_student, read_manifest, sft_rounds
from opd.configs.schema import SELF_TEACHERS, OpdConfig
from opd.stages import quant
from opd.stages.models import resolve_model


@dataclass(frozen=True)
class StartStudent:
    source: Path  # the round's student folder (a checkpoint, or a LoRA adapter folder)
    base: Path  # the checkpoint to load (== source unless `adapter`)
    adapter: Path | None  # PEFT LoRA adapter folder on top of `base`
    tokenizer_dir: Path  # where its tokenizer files are
    label: str  # how messages name it: `run.student`, or the round R-1 student folder

    def config(self) -> dict:
        """The checkpoint's config.json (one-line error if it is unreadable)."""
        try:
            return json.loads((self.base / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise OpdError(f"{self.base}/config.json: unreadable ({e}); is it an HF checkpoint?") from None

    @property
    def vocab_rows(self) -> int:
        """The output rows (`vocab_size`) of the checkpoint."""
        config = self.config()
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if not isinstance(vocab, int):
            raise OpdError(f"{self.base}/config.json: no vocab_size; is it a causal language model checkpoint?")
        return vocab

    @property
    def pad_id(self) -> int:
        """The id the learner pads micro-batches with: the checkpoint's pad_token_id, else 0."""
        pad = self.config().get("pad_token_id")
        return pad if isinstance(pad, int) and pad >= 0 else 0


@contextlib.contextmanager
def start_student(cfg: OpdConfig, run: RunDir, round_index: int, files: str = "all") -> Iterator[StartStudent]:
    """The student round `round_index` starts from, as local folders (see the module docstring). With
    train.quantize it must be a quantised student of the same grid (one-line error otherwise), so no
    stage samples or scores a student the learner would not train."""
    if round_index == 0:
        yield _describe(Path(resolve_model(cfg.run.student, cfg.run.models_dir or None)), cfg, cfg.run.student)
        return
    folder = previous_student(run, round_index)
    if run.local:
        yield _describe(Path(folder), cfg, folder)
        return
    cached = cached_student(run, folder)
    if cached is not None or files != "tokenizer":
        yield _describe(cached or download_student(run, folder), cfg, folder)
        return
    tmp = Path(tempfile.mkdtemp(prefix="opd-start-student-"))
    try:
        for name in TOKENIZER_FILES + ("config.json", "adapter_config.json", quant.QUANT_FILE):
            src = storage.join(folder, name)
            if storage.exists(run.fs, src):
                (tmp / name).write_bytes(storage.read_bytes(run.fs, src))
        yield _describe(tmp, cfg, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_dir(run: RunDir, folder: str) -> Path:
    """$OPD_HOME/students/<digest of the student's _DONE.json>: a student's files are named by its
    manifest, so a cached copy is never stale and two runs' students never collide."""
    manifest = read_manifest(run, folder)
    return opd_home() / "students" / manifest.digest()[:32]


def cached_student(run: RunDir, folder: str) -> Path | None:
    """The local copy of an object-store student folder, if this machine has one."""
    path = _cache_dir(run, folder)
    return path if path.is_dir() else None


def download_student(run: RunDir, folder: str) -> Path:
    """Download an object-store student into the local cache: every file its manifest lists, each
    checked against the manifest's sha256 (a changed object is a one-line error), into a temporary
    folder renamed into place, so concurrent stages on one machine and a killed download are safe."""
    manifest = read_manifest(run, folder)
    dst = _cache_dir(run, folder)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{storage.TMP_PREFIX}{dst.name}-", dir=dst.parent))
    try:
        for entry in manifest.shards:
            src = storage.join(folder, entry.name)
            if not storage.exists(run.fs, src):
                raise FormatError(f"{src}: listed in {MANIFEST} but missing; re-run the train stage with --force")
            out = tmp / entry.name
            out.parent.mkdir(parents=True, exist_ok=True)
            with run.fs.open_input_stream(src) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 22)
            digest, size = storage.sha256_file(storage.LOCAL, str(out))
            if digest != entry.sha256 or size != entry.bytes:
                raise FormatError(
                    f"{src}: checksum differs from {MANIFEST} (corrupt or replaced); re-run the train stage with --force"
                )
        try:
            os.replace(tmp, dst)
        except OSError:  # another process on this machine finished the same download first
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _describe(folder: Path, cfg: OpdConfig, label: str) -> StartStudent:
    if not (folder / "adapter_config.json").is_file():
        start = StartStudent(folder, folder, None, folder, label)
    else:
        base = _adapter_base(folder, cfg)
        has_tokenizer = any((folder / n).is_file() for n in TOKENIZER_FILES)
        start = StartStudent(folder, base, folder, folder if has_tokenizer else base, label)
    if cfg.train.quantize:
        quant.check_start(start.base, quant.train_spec(cfg.train), start.label)
    return start


def _adapter_base(adapter: Path, cfg: OpdConfig) -> Path:
    """The adapter's base checkpoint: its recorded base_model_name_or_path where that is a folder
    (or an opd:/tiny: name), else the run's base student (`run.student`)."""
    try:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    except ValueError:
        raise OpdError(f"{adapter}/adapter_config.json: not valid JSON; re-run the train stage") from None
    if recorded.startswith(("opd:", "tiny:")):
        return Path(resolve_model(recorded, cfg.run.models_dir or None))
    for cand in (Path(recorded).expanduser(), adapter / recorded):
        if recorded and (cand / "config.json").is_file():
            return cand
    return Path(resolve_model(cfg.run.student, cfg.run.models_dir or None))


def load_tokenizer(folder, what: str):
    """A tokenizer from a local folder, with a one-line error naming `what` it belongs to."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OpdError(f"cannot load the tokenizer of the {what} from {folder} ({first})") from None


# ------------------------------------------------------------------------------------------ self-teachers


@dataclass(frozen=True)
class TeacherWeights:
    """The checkpoint a round's teacher loads, and how messages and fingerprints name it."""

    folder: Path  # an HF checkpoint folder
    label: str  # `run.teacher`, or which student a self-teacher is (e.g. "self:start = run.student")
    self_round: int | None = None  # a self-teacher: the round whose starting student it is; None otherwise


def named_teacher(cfg: OpdConfig) -> TeacherWeights:
    """`run.teacher` as a model reference (a folder, `opd:` or `tiny:`); a self-teacher is a one-line
    error here: which student it is depends on the round (teacher_weights)."""
    ref = cfg.run.teacher
    if ref in SELF_TEACHERS:
        raise OpdError(f'run.teacher = "{ref}" is a round\'s own student: score it per round')
    return TeacherWeights(Path(resolve_model(ref, cfg.run.models_dir or None)), ref)


@contextlib.contextmanager
def teacher_weights(cfg: OpdConfig, run: RunDir, round_index: int) -> Iterator[TeacherWeights]:
    """Round `round_index`'s teacher. A model reference resolves as usual. "self" is the student that
    starts the round (the weights that made its rollouts); "self:start" is the student that starts the
    first SFT round before this one (RUN/rounds/F/ with `opd sft`'s student), the base model `run.student`
    when there is none. Both are read in place (the run's own folders, which opd merges LoRA adapters
    into): only a PEFT adapter given as `run.student` itself is merged into a temporary folder, removed
    afterwards."""
    ref = cfg.run.teacher
    if ref not in SELF_TEACHERS:
        yield named_teacher(cfg)
        return
    at = round_index
    if ref == "self:start":
        at = next((r for r in sft_rounds(run) if r < round_index), 0)
    with start_student(cfg, run, at) as student:
        label = f"{ref} = the student starting round {at} ({student.label})"
        if student.adapter is None:
            yield TeacherWeights(student.base, label, at)
            return
        from opd.stages.rollout_engines import merge_lora

        merged = merge_lora(student)
        try:
            yield TeacherWeights(merged, label, at)
        finally:
            shutil.rmtree(merged, ignore_errors=True)

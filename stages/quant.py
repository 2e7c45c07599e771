"""Weight-only integer students: the grid, the fake quantiser that quantisation-aware training (QAT)
runs through, and the quantised checkpoint folder (cache/SPEC.md, "Quantised students").

The grid, per group of `group_size` consecutive input weights w of one output row, b bits,
[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1] (torchao's SYMMETRIC_NO_CLIPPING_ERR and ASYMMETRIC rules):
    symmetric   s = max(min(w, 0) / qmin, max(w, 0) / qmax), z = 0
    asymmetric  s = (max(w, 0) - min(w, 0)) / (qmax - qmin), z = clamp(qmin - round(min(w, 0) / s), qmin, qmax)
    q = clamp(round(w · (1/s)) + z, qmin, qmax),   ŵ = (q - z) · s
The forward uses ŵ; the backward is straight-through (∂ŵ/∂w = 1 where q is not clamped; s and z are
constants of the step). Re-quantising ŵ gives back the same integers (both grids; ŵ itself to within
1 ulp), and the symmetric grid clips no weight.

Hand-written, not torchao, for two measured reasons (`benchmarks/bench_quant.py --grids`, README):
- torchao 0.18's QAT quantiser (`IntxFakeQuantizer`): its symmetric scale max|w| / 7.5 clips a group's
  largest weight when that is positive, and fake-quantising its own output shrinks the scale, moving
  weights by up to a whole grid step (0.32 at int4 on N(0.5, 1) weights; here ≤ 1 ulp, for a relative
  weight error of 0.095 against its 0.093); its asymmetric path takes zero points meant for [0, 15]
  and clamps to [-8, 7] (relative error 0.17 at int4, 0.11 at int8, against 0.072 and 0.004 here).
- Installed, torchao is imported by peft and by transformers' from_pretrained in every process that
  loads a model, and its import pulls in torch._dynamo: 4 s more per stage process on the 2-core
  AVX2 machine (import torch 3.3 s, with torchao 7.2 s), 3 minutes more for the test suite.
The grid is a dozen lines; its tests check it bit for bit against the export and the packed copy.

A quantised student folder: config.json and model.safetensors hold ŵ (float32), so vLLM and
transformers load it as a plain model and sample exactly what the learner trained; quantization.json
the settings; qat/master.safetensors the float master weights QAT continues from (their fake
quantisation is ŵ exactly, checked on load); packed/ the same model as compressed-tensors
"pack-quantized" (W4A16 / W8A16) for GPU inference engines, packed with compressed-tensors' own packer.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from opd.cache.errors import OpdError

_EPS = torch.finfo(torch.float32).eps  # the smallest scale (an all-zero group)
QUANT_FILE = "quantization.json"
MASTER_FILE = "qat/master.safetensors"
PACKED_DIR = "packed"
FORMAT_VERSION = 1
BITS = (4, 8)
METHODS = ("rtn",)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4  # 4 or 8
    group_size: int = 32  # weights per scale along each row's input dimension
    symmetric: bool = True  # z = 0 (symmetric) or a zero point per group (asymmetric)
    embeddings: bool = False  # also quantise the input embedding table
    lm_head: bool = False  # also quantise the output head

    def __post_init__(self):
        if self.bits not in BITS:
            raise OpdError(f"quantisation bits = {self.bits} is invalid: must be 4 or 8")
        if self.group_size < 2:
            raise OpdError(f"quantisation group size = {self.group_size} is invalid: must be >= 2")

    @property
    def qrange(self) -> tuple[int, int]:
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1

    def label(self) -> str:
        return f"int{self.bits} group {self.group_size} {'symmetric' if self.symmetric else 'asymmetric'}"


def train_spec(tc) -> QuantSpec | None:
    """The grid a TrainConfig's `train.quantize` trains on, or None when it is off."""
    if not tc.quantize:
        return None
    return QuantSpec(
        bits=tc.quantize_bits,
        group_size=tc.quantize_group_size,
        symmetric=tc.quantize_symmetric,
        embeddings=tc.quantize_embeddings,
        lm_head=tc.quantize_lm_head,
    )


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point), float32, each [rows, columns / group_size] (see the module docstring)."""
    qmin, qmax = spec.qrange
    with torch.no_grad():
        x = w.detach().float().reshape(w.shape[0], -1, spec.group_size)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        if spec.symmetric:
            scale = torch.maximum(lo / qmin, hi / qmax).clamp(min=_EPS)
            zero = torch.zeros_like(scale)
        else:
            scale = ((hi - lo) / float(qmax - qmin)).clamp(min=_EPS)
            zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def _grid(w: torch.Tensor, spec: QuantSpec, round_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q as [rows, groups, group_size] floats, s and z as [rows, groups, 1]): the one place q is computed."""
    qmin, qmax = spec.qrange
    scale, zero = qparams(w, spec)
    s, z = scale[..., None], zero[..., None]
    q = torch.clamp(round_fn(w.float().reshape(*s.shape[:2], -1) * (1.0 / s)) + z, qmin, qmax)
    return q, s, z


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """ŵ = (q - z) · s, with the straight-through gradient to w."""
    q, s, z = _grid(w, spec, _RoundSTE.apply)
    return ((q - z) * s).reshape(w.shape).to(w.dtype)


def quantize_ints(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q as int8, scale, zero point as int8), q shaped like w, scale and zero point [rows, groups]: the
    integers whose (q - z) · s is `fake_quantize(w)`."""
    with torch.no_grad():
        q, s, z = _grid(w.detach(), spec, torch.round)
    return q.reshape(w.shape).to(torch.int8), s[..., 0], z[..., 0].to(torch.int8)


class QuantLinear(torch.nn.Linear):
    """A Linear whose forward uses the fake quantisation of its weight (the Parameter is the master)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight_fake_quantizer(self.weight), self.bias)


class QuantEmbedding(torch.nn.Embedding):
    """An Embedding that looks rows up in the fake quantisation of its table."""

    def forward(self, x):
        w = self.weight_fake_quantizer(self.weight)
        return torch.nn.functional.embedding(
            x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


class WeightFakeQuantizer(torch.nn.Module):
    """The `weight_fake_quantizer` of QuantLinear / QuantEmbedding."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.spec)

    def extra_repr(self) -> str:
        return self.spec.label()


def target_modules(model, spec: QuantSpec, where: str) -> dict[str, torch.nn.Module]:
    """{name: module} of the layers `spec` quantises: every Linear of the decoder, plus the embedding
    table and the output head where asked. One-line errors for a group size that does not divide a
    layer's input and for tied embeddings quantised on one side only."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    if tied and spec.embeddings != spec.lm_head:
        raise OpdError(
            f"{where} ties its embeddings and lm_head (one weight): quantise both or neither "
            f"(embeddings = {spec.embeddings}, lm_head = {spec.lm_head})"
        )
    out = {}
    for name, mod in model.named_modules():
        if mod is head:
            take = spec.lm_head
        elif mod is emb:
            take = spec.embeddings
        else:
            take = isinstance(mod, torch.nn.Linear)
        if not take or not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        columns = mod.weight.shape[1]
        if columns % spec.group_size:
            raise OpdError(
                f"group size {spec.group_size} does not divide the {columns} inputs of {name} in {where}; "
                f"choose a group size that divides every quantised layer (e.g. 32)"
            )
        out[name] = mod
    if not out:
        raise OpdError(f"{where} has no Linear layers to quantise")
    return out


def prepare_qat(model, spec: QuantSpec, where: str) -> list[str]:
    """Make the target layers fake-quantised in place: each becomes a QuantLinear / QuantEmbedding with
    the same Parameters (tied weights stay tied, the state dict keeps its names); returns their names."""
    names = list(target_modules(model, spec, where))
    for name in names:
        mod = model.get_submodule(name)
        kind = {torch.nn.Linear: QuantLinear, torch.nn.Embedding: QuantEmbedding}.get(type(mod))
        if kind is None:
            raise OpdError(
                f"cannot quantise {name} of {where}: a {type(mod).__name__}, not a torch Linear or Embedding"
            )
        mod.__class__ = kind  # no new state: the subclass only changes forward
        mod.weight_fake_quantizer = WeightFakeQuantizer(spec)
    return names


def quantized_names(model) -> list[str]:
    """Names of the layers `prepare_qat` made fake-quantised."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight_fake_quantizer", None), WeightFakeQuantizer)
    ]


# ------------------------------------------------------------------------------------------ the folder


def read_record(folder: str | os.PathLike) -> dict | None:
    """The folder's quantization.json, or None where it is not a quantised student."""
    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        QuantSpec(**record["spec"])
    except (ValueError, KeyError, TypeError, OpdError) as e:
        raise OpdError(
            f"{path}: not a valid quantisation record ({e}); remake the student with `opd models quantize`"
        ) from None
    if record.get("version") != FORMAT_VERSION:
        raise OpdError(f"{path}: quantisation format version {record.get('version')} is not {FORMAT_VERSION}")
    return record


def spec_of(folder: str | os.PathLike) -> QuantSpec | None:
    record = read_record(folder)
    return None if record is None else QuantSpec(**record["spec"])


def check_start(folder: str | os.PathLike, spec: QuantSpec, label: str) -> None:
    """One-line error unless `folder` is a quantised student made with `spec`."""
    have = spec_of(folder)
    if have is None:
        raise OpdError(
            f"train.quantize is on but the start student {label} is not quantised (no {QUANT_FILE}); make it with "
            f"`opd models quantize SRC DST --bits {spec.bits} --group-size {spec.group_size}` and set run.student = DST"
        )
    if have != spec:
        raise OpdError(
            f"the start student {label} is quantised as {asdict(have)} but train.quantize_* says {asdict(spec)}; "
            f"make them agree"
        )


def load_masters(model, folder: str | os.PathLike, names: list[str], spec: QuantSpec) -> None:
    """Put the folder's master weights into the (prepared) model's quantised layers, after checking that
    their fake quantisation is the checkpoint's ŵ bit for bit (no drift across rounds)."""
    from safetensors.torch import load_file

    path = Path(folder) / MASTER_FILE
    try:
        masters = load_file(str(path))
    except (OSError, ValueError) as e:
        raise OpdError(
            f"{path}: cannot read the QAT master weights ({e}); remake the student with `opd models quantize`"
        ) from None
    pairs = []
    for name in names:  # check every layer before writing any: tied layers share one weight
        weight = model.get_submodule(name).weight
        master = masters.get(f"{name}.weight")
        if master is None:
            raise OpdError(f"{path}: no master weight for {name}; remake the student with `opd models quantize`")
        master = master.to(weight.device, torch.float32)
        if not torch.equal(fake_quantize(master, spec), weight.detach().float()):
            raise OpdError(
                f"{folder}: the master weights of {name} do not quantise to the checkpoint's weights "
                f"(another grid or a corrupt folder); remake the student with `opd models quantize`"
            )
        pairs.append((weight, master))
    with torch.no_grad():
        for weight, master in pairs:
            weight.copy_(master)


def dequantised_state(model, names: list[str], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{name.weight: ŵ} of the quantised layers (float32, CPU)."""
    with torch.no_grad():
        return {f"{n}.weight": fake_quantize(model.get_submodule(n).weight, spec).float().cpu() for n in names}


def save_quantized(model, spec: QuantSpec, names: list[str], out: Path, *, method: str, source: str) -> None:
    """Write the quantised student folder into `out` (see the module docstring): model weights ŵ,
    masters, quantization.json and packed/. Tokenizer files are the caller's."""
    from safetensors.torch import save_file

    out = Path(out)
    deq = dequantised_state(model, names, spec)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    masters = {k: state[k].clone() for k in deq}
    state.update(deq)
    model.save_pretrained(out, state_dict=state)
    _config_dtype_float32(out / "config.json")
    (out / "qat").mkdir(exist_ok=True)
    save_file(masters, str(out / MASTER_FILE), metadata={"format": "pt"})
    _save_packed(model, state, masters, spec, names, out / PACKED_DIR)
    record = {
        "version": FORMAT_VERSION,
        "spec": asdict(spec),
        "method": method,
        "source": source,
        "modules": names,
        "weights": "model.safetensors holds the dequantised values (q - z) * s, float32",
        "masters": MASTER_FILE,
        "packed": f"{PACKED_DIR}/ (compressed-tensors pack-quantized, W{spec.bits}A16)",
    }
    (out / QUANT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _config_dtype_float32(path: Path) -> None:
    """ŵ is float32 (q · s is not a 16-bit number): the config says so, so an engine's "auto" dtype keeps it."""
    config = json.loads(path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_packed(model, state: dict, masters: dict, spec: QuantSpec, names: list[str], out: Path) -> None:
    """compressed-tensors "pack-quantized": per quantised Linear weight_packed (int32, 32/bits values
    each), weight_scale, weight_shape and (asymmetric) weight_zero_point; every other tensor as it is,
    a quantised embedding table as its dequantised values (engines pack Linear layers only)."""
    from safetensors.torch import save_file

    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise OpdError("a quantised student's packed/ needs compressed-tensors: `pip install 'opd[quant]'`") from None

    out.mkdir(parents=True, exist_ok=True)
    linear = [n for n in names if isinstance(model.get_submodule(n), torch.nn.Linear)]
    packed = {k: v for k, v in state.items() if k not in {f"{n}.weight" for n in linear}}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name in linear:
        key = f"{name}.weight"
        q, scale, zero = quantize_ints(masters[key], spec)
        packed[f"{name}.weight_packed"] = pack_to_int32(q, spec.bits)
        packed[f"{name}.weight_scale"] = scale.contiguous()
        packed[f"{name}.weight_shape"] = torch.tensor(list(state[key].shape), dtype=torch.int64)
        if not spec.symmetric:
            packed[f"{name}.weight_zero_point"] = pack_to_int32(zero, spec.bits, packed_dim=0).contiguous()
    if tied:  # one stored copy, as save_pretrained writes tied models
        head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
        for n in head:
            packed.pop(f"{n}.weight", None)
    save_file({k: v.contiguous() for k, v in packed.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = compressed_tensors_config(spec, model, linear)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def compressed_tensors_config(spec: QuantSpec, model, names: list[str]) -> dict:
    """The `quantization_config` of packed/config.json: one group of weight-only int schemes on the
    quantised Linear layers; every other Linear is listed in `ignore`."""
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": spec.bits,
                    "type": "int",
                    "symmetric": spec.symmetric,
                    "strategy": "group",
                    "group_size": spec.group_size,
                    "dynamic": False,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": [n for n in linear if n not in names],
        "kv_cache_scheme": None,
    }


def copy_tokenizer(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Tokenizer files verbatim into the folder and into packed/ (the tokenizer hash never changes)."""
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            if (Path(dst) / PACKED_DIR).is_dir():
                shutil.copy2(Path(src) / name, Path(dst) / PACKED_DIR / name)

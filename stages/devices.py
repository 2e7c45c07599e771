"""Device and dtype for every stage and engine, decided in one place.

`dtype = "auto"` (every preset's) means: bfloat16 where the hardware computes in it natively, float32
elsewhere, because a bf16 matmul without hardware support is emulated and can be two orders of
magnitude slower than float32 (measured on a 2-core AMD EPYC with AVX2 only: a 1024² bf16 matmul at
1 GFLOP/s against 158 in float32; on a CPU with avx512_bf16, 820 against 172).

    GPU   bf16 when torch.cuda.is_bf16_supported() (Ampere and newer), else float32
    CPU   bf16 when torch reports a native bf16 instruction set (x86: avx512_bf16 or AMX-BF16; Arm:
          the BF16 / SVE-BF16 extensions), else float32

The rule itself (`choose_dtype`) takes the capability as an argument, so it is tested for both
answers on any machine; `native_bf16(device)` asks torch what this machine has. Every stage prints
the resolved choice once, with its reason (`Placement.describe`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from opd.cache.errors import OpdError
from opd.configs.schema import DTYPES

_CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")  # keys of torch.cpu.get_capabilities()


def choose_dtype(requested: str, device_type: str, native_bf16: bool) -> tuple[str, str]:
    """(dtype name, reason) for a stage asked for `requested` on a `device_type` ("cpu"/"cuda") device
    whose bf16 support is `native_bf16`."""
    if requested not in DTYPES:
        raise OpdError(f"dtype {requested!r} is invalid: use one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested, "as configured"
    where = "this GPU" if device_type == "cuda" else "this CPU"
    if native_bf16:
        return "bfloat16", f"{where} runs bf16 natively"
    return "float32", f"{where} has no native bf16"


def native_bf16(device_type: str) -> bool:
    """Does this machine's `device_type` device compute in bf16 natively (as torch reports it)?

    `OPD_NATIVE_BF16=1` / `0` answers instead of torch: "auto" then chooses as it would on a machine
    with / without native bf16 (to reproduce another machine's choice; the suite runs under both)."""
    import os

    import torch

    forced = os.environ.get("OPD_NATIVE_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise OpdError(f"OPD_NATIVE_BF16={forced!r} is invalid: use 1, 0, or leave it unset")

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return any(bool(caps.get(k)) for k in _CPU_BF16_FEATURES)


def resolve_device(requested: str, what: str = "device") -> Any:
    """ "auto" (cuda when visible, else cpu), "cpu", "cuda" or "cuda:N" → a torch.device, with one-line
    errors for a device this machine does not have."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise OpdError(f"{what} {requested!r} is invalid: use auto, cpu, cuda or cuda:N")
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OpdError(f"{what} {requested!r}: no CUDA device is visible here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OpdError(f"{what} {requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@dataclass(frozen=True)
class Placement:
    """Where and in what precision one stage computes."""

    device: Any  # torch.device
    dtype_name: str  # "float32", "bfloat16", "float16"
    reason: str  # why this dtype ("this CPU has no native bf16", "as configured")

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    def describe(self, stage: str) -> str:
        return f"[opd {stage}] {self.device.type}, {self.dtype_name}: {self.reason}"


def placement(device: str, dtype: str, what: str = "device", *, native: bool | None = None) -> Placement:
    """Resolve a stage's `device` and `dtype` settings together (`native`: the bf16 capability, asked of
    torch when None)."""
    dev = resolve_device(device, what)
    name, reason = choose_dtype(dtype, dev.type, native_bf16(dev.type) if native is None else native)
    return Placement(dev, name, reason)

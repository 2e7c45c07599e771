"""The dtype rule (stages/devices.py), for both answers of the bf16 capability check on any machine."""

import pytest

from opd.cache.errors import OpdError
from opd.stages.devices import choose_dtype, placement


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_is_bf16_only_where_the_hardware_runs_it_natively(device_type):
    assert choose_dtype("auto", device_type, native_bf16=True)[0] == "bfloat16"
    name, reason = choose_dtype("auto", device_type, native_bf16=False)
    assert name == "float32"
    assert reason == f"this {'GPU' if device_type == 'cuda' else 'CPU'} has no native bf16"


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_dtype_is_kept_whatever_the_hardware(requested, native):
    assert choose_dtype(requested, "cpu", native) == (requested, "as configured")


def test_bad_values_are_one_line_errors():
    with pytest.raises(OpdError, match="dtype 'int8' is invalid"):
        choose_dtype("int8", "cpu", True)
    with pytest.raises(OpdError, match="'tpu' is invalid"):
        placement("tpu", "auto")


def test_placement_follows_the_capability_it_is_given_and_describes_itself():
    p = placement("cpu", "auto", native=False)
    assert (p.device.type, p.dtype_name) == ("cpu", "float32")
    assert p.describe("score") == "[opd score] cpu, float32: this CPU has no native bf16"
    assert placement("cpu", "auto", native=True).dtype_name == "bfloat16"
    import torch

    assert placement("cpu", "auto", native=True).dtype is torch.bfloat16

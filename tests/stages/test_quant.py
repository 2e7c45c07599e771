"""Quantised students (stages/quant.py): the fake-quantised forward is the exported checkpoint's forward,
the exported weights are on the grid, the packed compressed-tensors copy decodes to them, gradients
reach the masters straight through, export → load → resume keeps the grid, and bad settings are
one-line errors."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from opd.cache.errors import OpdError
from opd.configs.schema import ConfigError, TrainConfig
from opd.pipeline.cli import main as cli_main
from opd.stages import models as M
from opd.stages import quant
from opd.stages.quant import QuantSpec

SPECS = [
    QuantSpec(bits=4, group_size=32, symmetric=True),
    QuantSpec(bits=4, group_size=64, symmetric=False),
    QuantSpec(bits=8, group_size=32, symmetric=True, embeddings=True, lm_head=True),
]
IDS = torch.tensor([[5, 77, 130, 200, 31, 9, 250, 18, 64, 3]])


def _ids(spec):
    return f"int{spec.bits}-g{spec.group_size}-{'sym' if spec.symmetric else 'asym'}{'-all' if spec.lm_head else ''}"


@pytest.fixture(scope="module", params=SPECS, ids=_ids)
def ptq(request, tiny_student, tmp_path_factory):
    """(spec, the PTQ folder of the tiny student)."""
    spec = request.param
    return spec, M.quantize(tiny_student, tmp_path_factory.mktemp("ptq") / "student", spec)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _qat(folder, spec):
    """The folder as the learner loads it: fake-quantised layers holding the masters."""
    model = _load(folder)
    names = quant.prepare_qat(model, spec, str(folder))
    quant.load_masters(model, folder, names, spec)
    return model, names


def _groups(w: torch.Tensor, g: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, g)


def test_fake_quantized_forward_equals_the_exported_checkpoint(ptq, tiny_student):
    """Bit-exact: the learner's forward (masters, fake-quantised) and a plain load of model.safetensors
    (the dequantised values) give identical logits; the masters are the source's float weights."""
    spec, folder = ptq
    qat, names = _qat(folder, spec)
    plain = _load(folder)
    with torch.no_grad():
        assert torch.equal(qat(IDS).logits, plain(IDS).logits)
    src = load_file(f"{tiny_student}/model.safetensors")
    masters = load_file(f"{folder}/{quant.MASTER_FILE}")
    assert sorted(masters) == sorted(f"{n}.weight" for n in names)
    assert all(torch.equal(masters[k], src[k]) for k in masters)
    expected = {"model.embed_tokens", "lm_head"} if spec.lm_head else set()
    assert {n for n in names if "layers" not in n} == expected and len(names) == 7 + len(expected)
    # the PTQ student is not the float one
    with torch.no_grad():
        assert not torch.equal(plain(IDS).logits, _load(tiny_student)(IDS).logits)


def test_exported_groups_are_on_the_grid_and_packed_decodes_to_them(ptq):
    """Every group of every quantised weight has at most 2^bits distinct values; packed/ (compressed-
    tensors pack-quantized) unpacks to exactly those weights and transformers runs it."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    spec, folder = ptq
    record = quant.read_record(folder)
    weights = load_file(f"{folder}/model.safetensors")
    packed = load_file(f"{folder}/{quant.PACKED_DIR}/model.safetensors")
    qmin, qmax = spec.qrange
    for name in record["modules"]:
        w = weights[f"{name}.weight"]
        g = _groups(w, spec.group_size)
        distinct = max(len(torch.unique(g[i, j])) for i in range(g.shape[0]) for j in range(g.shape[1]))
        assert distinct <= 2**spec.bits
        if name == "model.embed_tokens":  # stored dequantised in packed/ too (engines pack Linear layers)
            assert torch.equal(packed[f"{name}.weight"], w)
            continue
        shape = packed[f"{name}.weight_shape"]
        q = unpack_from_int32(packed[f"{name}.weight_packed"], spec.bits, shape)
        assert qmin <= int(q.min()) and int(q.max()) <= qmax
        zero = None
        if not spec.symmetric:
            scale = packed[f"{name}.weight_scale"]
            zero = unpack_from_int32(
                packed[f"{name}.weight_zero_point"], spec.bits, (shape[0], scale.shape[-1]), packed_dim=0
            )
        assert torch.equal(dequantize(q, packed[f"{name}.weight_scale"], zero), w)
    config = json.loads((folder / quant.PACKED_DIR / "config.json").read_text())["quantization_config"]
    assert (
        config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["num_bits"] == spec.bits
    )
    assert (
        json.loads((folder / "config.json").read_text()).get("quantization_config") is None
    )  # ŵ loads as a plain model
    # transformers' compressed-tensors loader runs the packed model: the same logits to float rounding
    # (it dequantises layer by layer inside its own modules)
    from transformers import AutoModelForCausalLM

    packed_model = AutoModelForCausalLM.from_pretrained(str(folder / quant.PACKED_DIR)).eval()
    with torch.no_grad():
        torch.testing.assert_close(packed_model(IDS).logits, _load(folder)(IDS).logits, rtol=0, atol=1e-5)


def test_gradients_reach_the_masters_straight_through(ptq):
    """∂loss/∂master equals ∂loss/∂ŵ of the plain dequantised model (the straight-through estimator),
    for every quantised layer, and is not zero."""
    spec, folder = ptq
    qat, names = _qat(folder, spec)
    plain = _load(folder)
    for model in (qat, plain):
        model.train()
        model(IDS, labels=IDS).loss.backward()
    qmin, qmax = spec.qrange
    for name in names:
        g_master = qat.get_submodule(name).weight.grad
        g_plain = plain.get_submodule(name).weight.grad
        assert g_master is not None and float(g_master.abs().sum()) > 0
        # weights a symmetric grid clamps get no gradient; the no-clipping grid clamps none
        torch.testing.assert_close(g_master, g_plain, rtol=1e-5, atol=1e-7)


def test_export_load_resume_keeps_the_weights_on_the_grid(ptq, tmp_path):
    """Train the masters a few steps, export, load as the next round does: the masters come back
    exactly, their fake quantisation is the exported weights bit for bit, and re-quantising the
    exported weights gives the same integers (ŵ itself to within 1 ulp)."""
    spec, folder = ptq
    qat, names = _qat(folder, spec)
    opt = torch.optim.AdamW(qat.parameters(), lr=5e-2)
    for _ in range(3):
        qat(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = {f"{n}.weight": qat.get_submodule(n).weight.detach().clone() for n in names}
    out = tmp_path / "student"
    quant.save_quantized(qat, spec, quant.quantized_names(qat), out, method="qat", source="test")
    exported = load_file(f"{out}/model.safetensors")
    again, again_names = _qat(out, spec)
    assert again_names == names
    moved = 0
    for key, master in trained.items():
        w = again.get_submodule(key.removesuffix(".weight")).weight.detach()
        assert torch.equal(w, master)  # the masters, not ŵ, continue
        assert torch.equal(quant.fake_quantize(w, spec), exported[key])
        assert torch.equal(quant.quantize_ints(exported[key], spec)[0], quant.quantize_ints(master, spec)[0])
        torch.testing.assert_close(quant.fake_quantize(exported[key], spec), exported[key], rtol=2.4e-7, atol=0)
        moved += int((exported[key] != load_file(f"{folder}/model.safetensors")[key]).sum())
    assert moved > 0  # training moved weights across grid points
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, _load(out)(IDS).logits)


def test_drift_and_mismatched_settings_are_one_line_errors(ptq, tmp_path, tiny_student):
    spec, folder = ptq
    model = _load(folder)
    names = quant.prepare_qat(model, spec, str(folder))
    other = dataclasses.replace(spec, group_size=spec.group_size * 2)
    with pytest.raises(OpdError, match="do not quantise to the checkpoint's weights"):
        quant.load_masters(model, folder, names, other)
    with pytest.raises(OpdError, match=r"quantised as .* but train.quantize_\* says"):
        quant.check_start(folder, other, "run.student")
    with pytest.raises(OpdError, match=r"is not quantised \(no quantization.json\); make it with `opd models quantize"):
        quant.check_start(tiny_student, spec, "run.student")
    with pytest.raises(OpdError, match="already a quantised student"):
        M.quantize(folder, tmp_path / "twice", spec)
    with pytest.raises(OpdError, match="already holds a model quantised"):
        M.quantize(tiny_student, folder, other)


def test_bad_settings_are_one_line_errors(tiny_student, tmp_path):
    with pytest.raises(ConfigError, match=r"train.quantize_bits = 3 is invalid: must be one of 4, 8"):
        TrainConfig(quantize=True, quantize_bits=3)
    with pytest.raises(ConfigError, match="train.fsdp .* with train.quantize"):
        TrainConfig(quantize=True, fsdp=True)
    with pytest.raises(ConfigError, match="train.lora_rank .* with train.quantize"):
        TrainConfig(quantize=True, lora_rank=4)
    runner = CliRunner()
    cases = [
        (["--bits", "3"], "bits = 3 is invalid: must be 4 or 8"),
        (["--group-size", "48"], "group size 48 does not divide the 128 inputs of model.layers.0.self_attn.q_proj"),
        (["--method", "gptq"], "--method gptq is not supported"),
        (["--lm-head"], None),  # untied tiny student: the head alone is fine
    ]
    for i, (args, message) in enumerate(cases):
        res = runner.invoke(cli_main, ["models", "quantize", str(tiny_student), str(tmp_path / f"q{i}"), *args])
        if message is None:
            assert res.exit_code == 0, res.output
            assert quant.read_record(tmp_path / f"q{i}")["modules"][-1] == "lm_head"
            continue
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 1 and len(errors) == 1 and message in errors[0], res.output
        assert "Traceback" not in res.output
        assert not (tmp_path / f"q{i}").exists()


def test_tied_embeddings_are_quantised_both_or_neither(tmp_path, tiny_student):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_student)  # the tiny student's shape, with one tied weight
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    with pytest.raises(OpdError, match="ties its embeddings and lm_head .* quantise both or neither"):
        M.quantize(tmp_path / "tied", tmp_path / "one", QuantSpec(lm_head=True))
    both = M.quantize(tmp_path / "tied", tmp_path / "both", QuantSpec(embeddings=True, lm_head=True))
    spec = QuantSpec(embeddings=True, lm_head=True)
    qat, names = _qat(both, spec)
    assert qat.get_input_embeddings().weight is qat.get_output_embeddings().weight  # still one weight
    with torch.no_grad():
        assert torch.equal(qat(IDS).logits, _load(both)(IDS).logits)

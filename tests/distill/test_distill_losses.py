"""llmlab.distill.losses against the spec's golden values (seed000_part3 §2.5), torch's own F.kl_div, hand
computations of MiniLLM's pieces, and the properties the seed got wrong (per-token means, masking, T^2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.distill.losses import (annealed_temperature, entropy, forward_kl, hinton_loss, importance_weights,
                                   minillm_loss, mixed_log_probs, normalized_future_rewards, reverse_kl,
                                   shift_for_next_token, soft_targets, token_forward_kl, token_nll, token_reverse_kl)

# ---------------------------------------------------------------------------- spec §2.5 golden values

TEMPERATURE_LOGITS = [2.0, 1.0, 0.1, 0.0, -0.5]
TEMPERATURE_TABLE = {  # T: (probs, entropy in nats)
    0.5: ([0.8455, 0.1144, 0.0189, 0.0155, 0.0057], 0.5590),
    1.0: ([0.5764, 0.2121, 0.0862, 0.0780, 0.0473], 1.2011),
    2.0: ([0.3777, 0.2291, 0.1461, 0.1389, 0.1082], 1.5012),
    4.0: ([0.2823, 0.2198, 0.1756, 0.1712, 0.1511], 1.5832),
}
TEACHER = [5.0, 1.0, 0.5, 0.2]
STUDENTS = {  # name: (logits, forward KL(p || q), reverse KL(q || p))
    "Mode Matching": ([4.5, 1.2, 0.6, 0.3], 0.00914, 0.01113),
    "High Entropy": ([3.0, 2.5, 2.0, 1.5], 0.62495, 1.13663),
    "Sharp Peak": ([5.5, 0.5, 0.2, 0.1], 0.01013, 0.00762),
}


@pytest.mark.parametrize("T", sorted(TEMPERATURE_TABLE))
def test_temperature_table(T):
    probs, ent = TEMPERATURE_TABLE[T]
    z = torch.tensor(TEMPERATURE_LOGITS, dtype=torch.float64)
    torch.testing.assert_close(soft_targets(z, T).double(), torch.tensor(probs, dtype=torch.float64), atol=1e-4, rtol=0)
    assert float(entropy(z, T)) == pytest.approx(ent, abs=1e-4)


def test_entropy_increases_with_temperature_and_stays_below_ln_v():
    z = torch.tensor(TEMPERATURE_LOGITS)
    values = [float(entropy(z, T)) for T in (0.25, 0.5, 1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] < math.log(5)


@pytest.mark.parametrize("name", list(STUDENTS))
def test_forward_and_reverse_kl_golden_values(name):
    student, fwd, rev = STUDENTS[name]
    s, t = torch.tensor([student]), torch.tensor([TEACHER])
    assert float(forward_kl(s, t)) == pytest.approx(fwd, abs=1e-4)
    assert float(reverse_kl(s, t)) == pytest.approx(rev, abs=1e-4)
    torch.testing.assert_close(soft_targets(t)[0], torch.tensor([0.9637, 0.0177, 0.0107, 0.0079]), atol=1e-4, rtol=0)


def test_reverse_kl_punishes_the_flat_student_most_and_the_sharp_one_least():
    t = torch.tensor([TEACHER])
    rev = {k: float(reverse_kl(torch.tensor([v[0]]), t)) for k, v in STUDENTS.items()}
    assert rev["High Entropy"] > rev["Mode Matching"] > rev["Sharp Peak"]


# ---------------------------------------------------------------------------- properties


def test_kl_is_nonnegative_and_zero_iff_logits_equal_up_to_a_constant():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 11, generator=g)
    s = torch.randn(64, 11, generator=g)
    for fn in (token_forward_kl, token_reverse_kl):
        assert bool((fn(s, t) >= 0).all())
        assert bool((fn(s, t) > 1e-6).all())  # different distributions: strictly positive
        shifted = t + torch.randn(64, 1, generator=g) * 5  # a constant per row: the same softmax
        torch.testing.assert_close(fn(shifted, t), torch.zeros(64), atol=1e-6, rtol=0)


def test_forward_kl_equals_torch_kl_div_sum_over_tokens_times_t_squared():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, 13, generator=g), torch.randn(3, 7, 13, generator=g)
    for T in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="sum") / (3 * 7) * T**2
        torch.testing.assert_close(forward_kl(s, t, temperature=T), ref, atol=1e-6, rtol=1e-5)
        # reverse KL is forward KL with the roles swapped
        ref = F.kl_div(F.log_softmax(t / T, -1), F.softmax(s / T, -1), reduction="sum") / (3 * 7) * T**2
        torch.testing.assert_close(reverse_kl(s, t, temperature=T), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl])
def test_loss_does_not_grow_with_sequence_length(fn):
    """The seed's batchmean on (B, L, V) sums over L: L = 32 gave 32x the per-token value."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 1, 9, generator=g), torch.randn(4, 1, 9, generator=g)
    one = fn(s, t, temperature=4.0)
    long = fn(s.expand(4, 32, 9), t.expand(4, 32, 9), temperature=4.0)
    torch.testing.assert_close(long, one)
    if fn is forward_kl:  # the bug this avoids, measured: the seed's forward KL at L = 32 is 32x ours
        seed_style = F.kl_div(F.log_softmax(s.expand(4, 32, 9) / 4, -1), F.softmax(t.expand(4, 32, 9) / 4, -1),
                              reduction="batchmean") * 16
        torch.testing.assert_close(seed_style, 32 * one)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl])
def test_padding_is_masked(fn):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    garbage_s, garbage_t = s.clone(), t.clone()
    garbage_s[~mask], garbage_t[~mask] = 100.0, -100.0  # whatever sits at padding must not count
    real = torch.cat([fn(s[0, :4], t[0, :4]).reshape(1) * 4, fn(s[1, :2], t[1, :2]).reshape(1) * 2]).sum() / 6
    torch.testing.assert_close(fn(garbage_s, garbage_t, mask), real)
    garbage_s.requires_grad_(True)
    fn(garbage_s, garbage_t, mask).backward()
    assert bool((garbage_s.grad[~mask] == 0).all())


def test_t_squared_keeps_the_gradient_magnitude_about_independent_of_t():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(256, 20, generator=g)
    s0 = (t + 0.3 * torch.randn(256, 20, generator=g))

    def grad_norm(T: float, scaled: bool) -> float:
        s = s0.clone().requires_grad_(True)
        loss = forward_kl(s, t, temperature=T)
        (loss if scaled else loss / T**2).backward()
        return float(s.grad.norm())

    with_t2 = [grad_norm(T, True) for T in (2.0, 4.0, 8.0)]
    without = [grad_norm(T, False) for T in (2.0, 4.0, 8.0)]
    assert max(with_t2) / min(with_t2) < 1.3  # ~ constant with T^2 (-> (z_s - z_t) / V as T grows)
    assert without[0] / without[-1] > 10  # shrinks ~ 1/T^2 without it (17x from T=2 to T=8 here)


def test_hinton_mix_alpha_weights_the_distillation_term():
    kd, ce = torch.tensor(2.0), torch.tensor(10.0)
    assert float(hinton_loss(kd, ce, alpha=1.0)) == 2.0
    assert float(hinton_loss(kd, ce, alpha=0.0)) == 10.0
    assert float(hinton_loss(kd, ce, alpha=0.25)) == pytest.approx(0.25 * 2 + 0.75 * 10)


def test_token_nll_and_shift_for_next_token():
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100  # padding
    lg, lb, m = shift_for_next_token(logits, labels)
    assert lg.shape == (2, 4, 7) and torch.equal(lb, labels[:, 1:]) and m.sum() == 4 + 2
    ref = F.cross_entropy(lg.reshape(-1, 7), lb.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(token_nll(lg, lb, m), ref)


def test_annealed_temperature_is_the_seeds_schedule():
    assert [annealed_temperature(4.0, e) for e in range(6)] == [4.0, 3.0, 2.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------- MiniLLM pieces


def test_teacher_mixed_distribution_and_importance_weights_by_hand():
    p, q, a = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.6]), 0.2
    mix = mixed_log_probs(p.log(), q.log(), a).exp()
    torch.testing.assert_close(mix, torch.tensor([0.2 * 0.7 + 0.8 * 0.1, 0.2 * 0.2 + 0.8 * 0.3, 0.2 * 0.1 + 0.8 * 0.6]))
    w = importance_weights(q.log(), mix.log())
    torch.testing.assert_close(w, torch.tensor([0.1 / 0.22, 0.3 / 0.28, 0.6 / 0.50]))
    assert bool((w <= 1 / (1 - a) + 1e-6).all())
    torch.testing.assert_close(mixed_log_probs(p.log(), q.log(), 0.0), q.log())  # a = 0: the student alone
    torch.testing.assert_close(mixed_log_probs(p.log(), q.log(), 1.0), p.log())


def test_normalized_future_rewards_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 5.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = torch.tensor([[(2 + 3 + 4) / 3, (3 + 4) / 2, 4.0, 0.0], [(-1 + 5) / 2, 5.0, 0.0, 0.0]])
    torch.testing.assert_close(normalized_future_rewards(r, mask), expected)


def test_minillm_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(6)
    N, T, V, a, eps = 2, 3, 5, 0.2, 0.2
    s = torch.randn(N, T, V, generator=g, requires_grad=True)
    t = torch.randn(N, T, V, generator=g)
    y = torch.randint(0, V, (N, T), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = minillm_loss(s, t, y, mask, teacher_mixed_alpha=a, cliprange=eps)
    out.loss.backward()

    # the same loss, written out position by position
    s2 = s.detach().clone().requires_grad_(True)
    total, count = 0.0, 0
    for i in range(N):
        n_i = int(mask[i].sum())
        for j in range(n_i):
            logq, logp = s2[i, j].log_softmax(-1), t[i, j].log_softmax(-1)
            q_y, p_y = logq[y[i, j]], logp[y[i, j]]
            w = float(q_y.exp()) / (a * float(p_y.exp()) + (1 - a) * float(q_y.exp()))
            future = [float(t[i, k].log_softmax(-1)[y[i, k]] - s2[i, k].log_softmax(-1)[y[i, k]])
                      for k in range(j + 1, n_i)]
            A = sum(future) / len(future) if future else 0.0
            kl = (logq.exp() * (logq - logp)).sum()
            ratio = torch.exp(q_y - q_y.detach()) * w
            pg = torch.max(-A * ratio, -A * ratio.clamp(1 - eps, 1 + eps))
            total = total + w * kl + pg
            count += 1
    ref = total / count
    ref.backward()
    torch.testing.assert_close(out.loss, ref.reshape(()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.grad, s2.grad, atol=1e-5, rtol=1e-4)
    assert s.grad[1, 2].abs().sum() == 0  # the padded position sends no gradient


def test_minillm_single_step_term_is_the_exact_reverse_kl_on_policy():
    """With a = 0 (pure student sampling) every w = 1, and the single-step part is the token reverse KL."""
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(3, 4, 6, generator=g), torch.randn(3, 4, 6, generator=g)
    y = torch.randint(0, 6, (3, 4), generator=g)
    out = minillm_loss(s, t, y, torch.ones(3, 4), teacher_mixed_alpha=0.0)
    torch.testing.assert_close(out.weight, torch.tensor(1.0))
    torch.testing.assert_close(out.single, reverse_kl(s, t))
    torch.testing.assert_close(out.reverse_kl, reverse_kl(s, t))

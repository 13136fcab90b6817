"""Next-token rules: greedy, temperature, top-k, top-p, argument validation."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.errors import UserError
from llmlab.inference.sampling import sample_next, top_k_filter, top_p_filter


def _logits(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def _kept(filtered: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in filtered]


def test_top_k_filter_batched():
    logits = torch.tensor([[4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79],
                           [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    out = top_k_filter(logits, 3)
    assert _kept(out) == [[0, 3, 7], [6, 7, 8]]  # spec §3.1: top-3 at positions [3, 7, 0]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])  # kept logits untouched
    probs = torch.softmax(out[0], -1)
    torch.testing.assert_close(probs[[0, 3, 7]], torch.tensor([0.0615, 0.5775, 0.3610]), atol=1e-4, rtol=0)
    assert torch.equal(top_k_filter(logits, 100), logits)


@pytest.mark.parametrize("p,kept", [(0.5, 1), (0.79, 2), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_smallest_nucleus(p, kept):
    out = top_p_filter(_logits([[0.15, 0.5, 0.05, 0.3]]), p)  # sorted: 0.5, 0.3, 0.15, 0.05
    expected = sorted([1, 3, 0, 2][:kept])
    assert _kept(out) == [expected]


def test_top_p_tiny_p_keeps_top_token_and_rows_are_independent():
    logits = torch.stack([
        _logits([0.5, 0.3, 0.15, 0.05]),
        _logits([0.05, 0.15, 0.3, 0.5]),
        _logits([0.25, 0.25, 0.25, 0.25]),
    ])
    tiny_p = _kept(top_p_filter(logits, 1e-9))
    assert tiny_p[:2] == [[0], [3]] and len(tiny_p[2]) == 1  # ties: any one of the four
    out = _kept(top_p_filter(logits, 0.8))
    assert out[0] == [0, 1] and out[1] == [2, 3]
    assert len(out[2]) == 4  # uniform: 0.25 * 3 = 0.75 < 0.8, so all four are needed


def test_top_k_one_and_temperature_zero_equal_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, greedy=True), greedy)
    assert torch.equal(sample_next(logits, temperature=0.0), greedy)
    assert torch.equal(sample_next(logits, top_k=1, generator=g), greedy)
    assert torch.equal(sample_next(logits, temperature=1e-4, generator=g), greedy)


def test_samples_stay_in_top_k_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g)
    top = torch.topk(logits, 5, dim=-1).indices
    draws = torch.stack([sample_next(logits, top_k=5, temperature=2.0, generator=g) for _ in range(300)], 1)
    for row in range(4):
        assert set(draws[row].tolist()) <= set(top[row].tolist())
        assert len(set(draws[row].tolist())) > 1  # actually sampling, not argmax


def test_samples_stay_in_nucleus_and_follow_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = _logits([[0.5, 0.3, 0.15, 0.05]] * 2000)
    draws = sample_next(logits, top_p=0.8, generator=g)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05


def test_seeded_generator_is_reproducible():
    logits = torch.randn(8, 100)
    a = sample_next(logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw",
    [dict(temperature=-1.0), dict(temperature=math.nan), dict(top_k=0), dict(top_k=2.5),
     dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.1)],
)
def test_invalid_arguments_are_user_errors(kw):
    with pytest.raises(UserError):
        sample_next(torch.zeros(1, 5), **kw)


def test_filters_validate_too():
    with pytest.raises(UserError):
        top_k_filter(torch.zeros(1, 5), 0)
    with pytest.raises(UserError):
        top_p_filter(torch.zeros(1, 5), 1.2)

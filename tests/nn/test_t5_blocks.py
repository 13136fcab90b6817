"""T5's building blocks in llmlab.nn: RMSNorm and the bucketed relative position bias, checked
against the formulas and against Hugging Face's T5LayerNorm / T5Attention."""

from __future__ import annotations

import pytest
import torch

from llmlab.nn.norms import RMSNorm
from llmlab.nn.positions import RelativePositionBias, relative_position_bucket

transformers = pytest.importorskip("transformers")
from transformers import T5Config as HFConfig  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention as HFAttention  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm as HFLayerNorm  # noqa: E402


# ---------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_formula_and_defaults():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    assert norm.eps == 1e-6
    assert [n for n, _ in norm.named_parameters()] == ["weight"]  # gain only, no bias
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-6)


def test_rmsnorm_does_not_subtract_the_mean():
    norm = RMSNorm(8)
    x = torch.full((2, 8), 3.0)  # LayerNorm would map a constant vector to 0
    torch.testing.assert_close(norm(x), torch.ones(2, 8), atol=1e-5, rtol=0)
    # a shift changes the output (LayerNorm is shift invariant, RMSNorm is not) ...
    y = torch.randn(2, 8)
    assert not torch.allclose(norm(y), norm(y + 1.0), atol=1e-3)
    # ... a positive scale does not
    torch.testing.assert_close(norm(y), norm(7.5 * y), atol=1e-5, rtol=1e-5)


def test_rmsnorm_matches_hf_t5_layernorm():
    torch.manual_seed(1)
    ours, ref = RMSNorm(32, eps=1e-6), HFLayerNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 7, 32) * 5
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)


def test_rmsnorm_half_precision_is_computed_in_float32():
    torch.manual_seed(2)
    norm = RMSNorm(64)
    x = (torch.randn(4, 64) * 300).to(torch.float16)  # x**2 overflows fp16 (max 65504)
    assert torch.isinf(x.pow(2)).any()
    y = norm(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y, norm(x.float()).to(torch.float16), atol=0, rtol=0)


# ---------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 64), (64, 300)])
def test_bucket_equals_transformers_on_a_grid(bidirectional, num_buckets, max_distance):
    q = torch.arange(0, 700)[:, None]
    k = torch.arange(0, 700)[None, :]
    rel = k - q  # every offset in [-699, 699], many times over
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    ref = HFAttention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref)


def test_bucket_hand_computed_values():
    def b(r, bi):
        return int(relative_position_bucket(torch.tensor(r), bi))

    # bidirectional, 32 buckets: 16 per direction, 8 of them exact
    assert [b(r, True) for r in (0, -1, -7, -8, -127, -128, -10_000)] == [0, 1, 7, 8, 15, 15, 15]
    assert [b(r, True) for r in (1, 7, 8, 10_000)] == [17, 23, 24, 31]
    # unidirectional: 16 exact past distances, log buckets up to 128, the future is bucket 0
    assert [b(r, False) for r in (0, -1, -15, -16, -127, -128, -10_000)] == [0, 1, 15, 16, 31, 31, 31]
    assert [b(r, False) for r in (1, 5, 10_000)] == [0, 0, 0]


def test_buckets_grow_monotonically_with_distance():
    d = torch.arange(0, 2000)
    for bi in (True, False):
        past = relative_position_bucket(-d, bi)
        assert (past[1:] >= past[:-1]).all()
        assert int(past.max()) == (15 if bi else 31)
    future = relative_position_bucket(d, True)
    assert (future[1:] >= future[:-1]).all() and int(future[1]) == 17


# ---------------------------------------------------------------------------- bias module
def _hf_attention(bidirectional: bool, n_heads=3, num_buckets=8, max_distance=20) -> HFAttention:
    cfg = HFConfig(d_model=12, d_kv=4, num_heads=n_heads, relative_attention_num_buckets=num_buckets,
                   relative_attention_max_distance=max_distance, is_decoder=not bidirectional)
    return HFAttention(cfg, has_relative_attention_bias=True, layer_idx=0)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bias_matches_hf_compute_bias(bidirectional):
    torch.manual_seed(3)
    ours = RelativePositionBias(3, num_buckets=8, max_distance=20, bidirectional=bidirectional)
    ref = _hf_attention(bidirectional)
    with torch.no_grad():
        ref.relative_attention_bias.weight.copy_(ours.embedding.weight)
    bias = ours(9, 9)
    assert bias.shape == (1, 3, 9, 9)
    torch.testing.assert_close(bias, ref.compute_bias(9, 9), atol=0, rtol=0)
    # cached decoding: 1 query at position 6, keys 0..6
    step = ref.compute_bias(1, 7, past_seen_tokens=6)
    torch.testing.assert_close(ours(1, 7, q_offset=6), step, atol=0, rtol=0)


def test_relative_position_bias_values_and_offset():
    torch.manual_seed(4)
    mod = RelativePositionBias(2, num_buckets=32, max_distance=128, bidirectional=False)
    full = mod(12, 12)  # (1, nh, 12, 12)
    w = mod.embedding.weight  # (buckets, nh)
    for i, j in [(0, 0), (5, 2), (11, 0), (3, 9)]:
        bucket = relative_position_bucket(torch.tensor(j - i), False)
        torch.testing.assert_close(full[0, :, i, j], w[bucket])
    # with an offset the rows are those of the full matrix: the bias depends on j - i only
    torch.testing.assert_close(mod(1, 12, q_offset=11), full[:, :, 11:12, :])
    torch.testing.assert_close(mod(4, 12, q_offset=8), full[:, :, 8:12, :])
    # translation invariance: shifting both queries and keys does not change the bias
    shifted = mod(3, 40, q_offset=30)[:, :, :, 27:]  # queries 30..32, keys 27..39
    torch.testing.assert_close(shifted, mod(3, 13, q_offset=3))

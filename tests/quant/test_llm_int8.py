"""LLM.int8 (llmlab.quant.llm_int8) against the spec §2.2 numbers and bitsandbytes' Linear8bitLt:
outliers found on activations, < 1/2 of naive int8's error with injected outliers, exact int32
accumulation, bitsandbytes' codes and outputs, ~1 byte/param, gradients to the input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.quant import llm_int8
from llmlab.quant.llm_int8 import Int8Linear, llm_int8_matmul, vectorwise_quant

OUTLIERS = torch.tensor([3, 500, 900])


def spec_setup(magnitude: float | None, seed: int = 0):
    """Spec §2.2: h = o = 1024, 64 tokens, W ~ N(0, 0.02²), X ~ N(0, 1); 3 outlier features of
    ``magnitude`` (same sign as the value they replace)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(1024, 1024, generator=g) * 0.02
    x = torch.randn(64, 1024, generator=g)
    if magnitude is not None:
        x[:, OUTLIERS] = magnitude * torch.sign(x[:, OUTLIERS])
    return w, x


def rel(y, ref):
    return ((y - ref).norm() / ref.norm()).item()


def errors(magnitude):
    w, x = spec_setup(magnitude)
    wq, wa = vectorwise_quant(w)
    y = x @ w.t()
    naive = rel(llm_int8_matmul(x, wq, wa, threshold=0.0), y)
    ours = rel(llm_int8_matmul(x, wq, wa, threshold=6.0), y)  # outlier weights from int8 (bitsandbytes' way)
    paper = rel(llm_int8_matmul(x, wq, wa, threshold=6.0, w_float=w), y)  # outlier weights in float
    return naive, ours, paper


def test_no_outliers_equal_errors():
    naive, ours, paper = errors(None)
    assert naive == ours == paper
    assert naive == pytest.approx(0.0111, abs=0.0003)


@pytest.mark.parametrize("magnitude, spec_naive, spec_int8", [(20, 0.0327, 0.0077), (60, 0.0420, 0.0034)])
def test_outlier_decomposition_beats_naive_int8(magnitude, spec_naive, spec_int8):
    naive, ours, paper = errors(magnitude)
    assert naive == pytest.approx(spec_naive, rel=0.05)
    assert paper == pytest.approx(spec_int8, rel=0.1)
    assert ours < naive / 2 and paper < naive / 2  # the check


def test_outliers_are_found_on_activations_not_weights():
    w, x = spec_setup(20)
    w[0, :5] = 10.0  # huge weights: not outliers (the seed's bug thresholded |W|)
    assert torch.equal(llm_int8.outlier_columns(x, 6.0), OUTLIERS)
    assert llm_int8.outlier_columns(w, 6.0).numel() == 5 and llm_int8.outlier_columns(x, 0.0).numel() == 0
    # the outlier columns contribute exactly X[:, O] · Ŵ[:, O]ᵀ: dropping them from x drops exactly that
    wq, wa = vectorwise_quant(w)
    w_hat = wq.float() * (wa / 127).unsqueeze(1)
    inliers = x.clone()
    inliers[:, OUTLIERS] = 0
    split = llm_int8_matmul(x, wq, wa, 6.0) - llm_int8_matmul(inliers, wq, wa, 6.0)
    assert torch.allclose(split, x[:, OUTLIERS] @ w_hat[:, OUTLIERS].t(), atol=1e-5)


@pytest.mark.parametrize("k", [64, 1040, 1100])  # fp32 path exact up to 1040 inputs, fp64 beyond
def test_int8_matmul_is_exact(k):
    g = torch.Generator().manual_seed(k)
    a = torch.full((7, k), 127, dtype=torch.int8)  # the worst case: every product 127²
    a[1:] = torch.randint(-127, 128, (6, k), generator=g, dtype=torch.int8)
    b = torch.full((5, k), 127, dtype=torch.int8)
    b[1:] = torch.randint(-127, 128, (4, k), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().t()
    out = llm_int8.int8_matmul(a, b)
    assert out.dtype == torch.int32 and torch.equal(out.long(), exact)


def test_weight_error_bound():
    w, _ = spec_setup(None)
    layer = Int8Linear(w, None)
    bound = layer.weight_absmax.unsqueeze(1) / (2 * 127)
    assert ((w - layer.dequantize()).abs() <= bound * (1 + 1e-4)).all()  # (float rounding at exact half-steps)


def bnb_pair(w, bias=None, threshold=6.0):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    cfg = {"name": "llm_int8", "llm_int8_threshold": threshold}
    return (llm_int8.quantize_linear(lin, cfg), llm_int8.quantize_linear(lin, {**cfg, "backend": "bnb"}).eval())


def test_codes_and_outputs_match_bitsandbytes_linear8bitlt():
    """bitsandbytes quantizes in float16: on fp16-representable weights and inputs the int8 codes and
    scales are identical, and the outputs agree far inside the quantization error."""
    w, x = spec_setup(20)
    w, x = w.half().float(), x.half().float()
    bias = torch.randn(1024).half().float() * 0.1
    ours, theirs = bnb_pair(w, bias)
    assert torch.equal(ours.weight_int8, theirs.layer.weight.data)
    assert torch.equal(ours.weight_absmax, theirs.scales())
    y = x @ w.t() + bias
    with torch.no_grad():
        y_ours, y_bnb = ours(x), theirs(x)
    assert rel(y_ours, y) == pytest.approx(rel(y_bnb, y), rel=0.02)
    assert rel(y_ours, y_bnb) < 1e-3  # measured ~1e-5 (bitsandbytes rounds activations to fp16)
    assert rel(y_ours, y) < errors(20)[0] / 2


def test_memory_about_one_byte_per_param():
    layer = Int8Linear(torch.empty(4096, 4096, device="meta"), None)
    fp16 = 4096 * 4096 * 2
    assert layer.storage_bytes() == 16 * 2**20 + 4096 * 4  # int8 codes + one fp32 scale per row
    assert layer.storage_bytes() <= 0.55 * fp16


def test_forward_shapes_dtype_and_gradient_to_input():
    lin = nn.Linear(32, 24)
    layer = llm_int8.quantize_linear(lin, {"name": "llm_int8"})
    assert not list(layer.parameters())
    x = (torch.randn(2, 5, 32) * 3).requires_grad_(True)
    y = layer(x)
    assert y.shape == (2, 5, 24) and y.dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    (y * torch.arange(24.0)).sum().backward()
    assert torch.allclose(x.grad, (torch.arange(24.0) @ layer.dequantize()).expand(2, 5, 32), atol=1e-5)
    other = llm_int8.quantize_linear(nn.Linear(32, 24), {"name": "llm_int8"})
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)


@pytest.mark.parametrize("cfg, match", [({"llm_int8_threshold": -1}, "llm_int8_threshold"), ({"bits": 4}, "bits")])
def test_bad_options_are_one_line(cfg, match):
    with pytest.raises(UserError, match=match):
        llm_int8.quantize_linear(nn.Linear(8, 8), {"name": "llm_int8", **cfg})

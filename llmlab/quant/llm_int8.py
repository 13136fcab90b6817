"""LLM.int8(): vector-wise int8 matmul with mixed-precision outlier decomposition (``quant=llm_int8``).

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale", §3.1
"Vector-wise Quantization" and §3.2 "Mixed-precision Decomposition" (https://arxiv.org/abs/2208.07339);
bitsandbytes' ``Linear8bitLt(has_fp16_weights=False, threshold=6.0)`` is the reference
(tests/quant/test_llm_int8.py compares against it). For ``Y = X Wᵀ`` with X (tokens, in):

1. **Outliers are found on the activations, per forward call**: O = the input features i with
   some ``|X[r, i]| >= llm_int8_threshold`` (6.0). (The seed thresholded the *weights*, which
   are ~N(0, 0.02²) and never cross 6: spec seed000_part3 §2.2.)
2. **Vector-wise int8 for the rest**: one absmax per row of X (token) and one per output row of W,
   ``Xq = round(127·X/c_x)``, ``Wq = round(127·W/c_w)``; the product is accumulated in int32 and
   de-quantized by ``acc · (c_x ⊗ c_w) / 127²``. Both scales lie on axes the matmul does not sum
   over, which is what lets them factor out of an integer GEMM (the seed's per-input-column
   scale cannot).
3. **The outlier columns in floating point**: ``X[:, O] · Ŵ[:, O]ᵀ`` added to the int8 result.
   As bitsandbytes does, Ŵ[:, O] is de-quantized from the stored int8 weight, so the layer keeps
   only the int8 weight and one scale per output row (≈ 1 byte/param, half of fp16) — the
   activations are where outliers live, and they stay exact.

The int32 accumulation is exact: ``torch._int_mm`` where it has a fast kernel (AVX-512 CPUs,
as bitsandbytes chooses), otherwise a float matmul of the int8 values, which is exact while the
sums stay below 2^24 (fp32, up to 1040 input features) or 2^53 (fp64). Backward (QLoRA-style
tuning on an int8 base) passes ``dY · Ŵ`` to the input; the weight never trains.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.quant.base import QuantLinear

Q = 127.0  # int8 codes in [-127, 127]: symmetric, 0 exact
FP32_EXACT = 2**24 // 127**2  # largest inner dimension whose int8 dot products are exact in fp32 (1040)


def vectorwise_quant(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of a 2-D tensor: (codes int8 (rows, cols), absmax float32 (rows,))."""
    a = a.float()
    absmax = a.abs().amax(dim=1)
    codes = torch.round(a * (Q / absmax.clamp(min=1e-12)).unsqueeze(1))  # an all-zero row: codes 0
    return codes.to(torch.int8), absmax


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ bᵀ`` of int8 matrices a (m, k) and b (n, k), as int32 (m, n)."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512" or a.device.type == "cuda":
        return torch._int_mm(a, b.t())  # a real int8 GEMM (on AVX2 its fallback is ~10x slower than fp32)
    dtype = torch.float32 if a.shape[1] <= FP32_EXACT else torch.float64
    return (a.to(dtype) @ b.to(dtype).t()).to(torch.int32)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the input features with any ``|x| >= threshold`` (none when threshold is 0)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).flatten()


def llm_int8_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_absmax: torch.Tensor, threshold: float,
                    w_float: torch.Tensor | None = None) -> torch.Tensor:
    """``x Ŵᵀ`` (float32) for x (tokens, in), via vector-wise int8 + the fp outlier columns.

    ``w_float``: the float weight, to take the outlier columns' weights from it (the paper's fp16
    path; spec §2.2's reference errors are computed so) instead of de-quantizing them from int8.
    """
    x = x.float()
    cols = outlier_columns(x, threshold)
    inliers = x
    if cols.numel():
        inliers = x.clone()
        inliers[:, cols] = 0  # X[:, Ō]: outlier features leave the int8 product (and its row absmax)
    xq, x_absmax = vectorwise_quant(inliers)
    acc = int8_matmul(xq, w_int8)  # (tokens, out) int32
    y = acc.float() * (x_absmax.unsqueeze(1) * w_absmax.unsqueeze(0)) / (Q * Q)
    if cols.numel():
        if w_float is not None:
            w_cols = w_float[:, cols].float()
        else:
            w_cols = w_int8[:, cols].float() * (w_absmax / Q).unsqueeze(1)  # Ŵ[:, O] (out, |O|)
        y = y + x[:, cols] @ w_cols.t()
    return y


class _Int8Matmul(torch.autograd.Function):
    """Forward: LLM.int8; backward: the input gradient through the de-quantized weight."""

    @staticmethod
    def forward(ctx, x, w_int8, w_absmax, threshold):
        ctx.save_for_backward(w_int8, w_absmax)
        return llm_int8_matmul(x, w_int8, w_absmax, threshold)

    @staticmethod
    def backward(ctx, grad):
        w_int8, w_absmax = ctx.saved_tensors
        w = w_int8.float() * (w_absmax / Q).unsqueeze(1)
        return grad @ w, None, None, None


class Int8Linear(QuantLinear):
    """A Linear layer stored as int8 codes (out, in) + one fp32 absmax per output row, computing
    with LLM.int8 (buffers ``weight_int8``, ``weight_absmax``)."""

    scheme = "llm_int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: float = 6.0) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.threshold = float(threshold)
        codes, absmax = vectorwise_quant(weight.detach())
        self.register_buffer("weight_int8", codes)
        self.register_buffer("weight_absmax", absmax)

    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * (self.weight_absmax / Q).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (tokens, in)
        y = _Int8Matmul.apply(flat, self.weight_int8, self.weight_absmax, self.threshold)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, llm_int8_threshold={self.threshold:g}"


def threshold_of(cfg: dict) -> float:
    threshold = cfg.get("llm_int8_threshold", 6.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
        raise UserError(f"quant.llm_int8_threshold={threshold!r} must be a number >= 0 (6.0 is the paper's; "
                        "0 turns the outlier decomposition off)")
    if cfg.get("bits") not in (None, 8):
        raise UserError(f"quant.bits={cfg['bits']} does not apply to quant=llm_int8 (always 8 bits): drop it, "
                        "or use quant=int4 for 4-bit integers")
    return float(threshold)


def quantize_linear(layer: nn.Linear, cfg: dict) -> QuantLinear:
    """``quant=llm_int8``: llmlab's :class:`Int8Linear`, or bitsandbytes' ``Linear8bitLt`` with ``backend: bnb``."""
    threshold = threshold_of(cfg)
    if (cfg.get("backend") or "llmlab") == "bnb":
        from llmlab.quant.bnb import BnbLinear8bitLt

        return BnbLinear8bitLt.from_linear(layer, threshold=threshold)
    return Int8Linear(layer.weight.detach(), layer.bias, threshold)

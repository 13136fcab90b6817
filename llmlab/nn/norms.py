"""Normalisation layers that ``torch.nn`` does not have in the form the papers use.

:class:`RMSNorm` is the "simplified layer normalisation" of T5 (Raffel et al. 2020, "Exploring the
Limits of Transfer Learning with a Unified Text-to-Text Transformer", §2.1) and of Zhang & Sennrich
2019 ("Root Mean Square Layer Normalization"): rescale each vector by the reciprocal of its root
mean square and multiply by a learned gain. Unlike :class:`torch.nn.LayerNorm` there is no mean
subtraction and no bias, so it is cheaper and keeps the direction of the vector.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2) + eps) * weight`` over the last dimension.

    The mean square is accumulated in float32 even for half-precision inputs (a sum of squares
    over hundreds of features overflows or loses precision in fp16/bf16); the result has the
    input's dtype. ``eps`` defaults to T5's 1e-6.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # the gain; no bias by design

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1)
        return (x32 * inv_rms * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"

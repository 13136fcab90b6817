"""``quant=bf16``: Linear weights stored in bfloat16 (2 bytes per parameter).

bfloat16 keeps fp32's 8 exponent bits and 7 of its 23 mantissa bits (Kalamkar et al. 2019, "A
Study of BFLOAT16 for Deep Learning Training", §2; https://arxiv.org/abs/1905.12322; spec
seed001_003 §2.10): the same range as fp32, so no scale is needed, at ~3 significant digits.
The layer computes in the input's dtype (the weight is up-cast), so it runs on any CPU.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.quant.base import QuantLinear


class BF16Linear(QuantLinear):
    """A Linear layer whose weight is a bfloat16 buffer."""

    scheme = "bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).clone())

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()


def quantize_linear(layer: nn.Linear, cfg: dict) -> BF16Linear:
    return BF16Linear(layer.weight, layer.bias)

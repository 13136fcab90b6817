"""What every quantized layer shares (the ``quant`` config group; DESIGN.md "Models by role").

A :class:`QuantLinear` replaces an ``nn.Linear`` of a trained model. Its weight lives in
*buffers* in the packed form the scheme stores (int8 codes, two 4-bit codes per byte, per-channel
or per-block scales ...), so ``state_dict()`` *is* the quantized checkpoint: real bytes on disk,
and loading it never needs the float weight. ``forward`` computes with the de-quantized weight
(or, for LLM.int8, with the int8 product); nothing in a quantized layer trains (the weight is
frozen by construction), so fine-tuning one goes through a tuner (QLoRA: ``quant=nf4
peft=lora``) or through fake quantization (``quant=qat_int4``).

Each scheme module (``llmlab.quant.absmax``, ``.fake``, ``.llm_int8``, ``.nf4``) implements
``quantize_linear(layer: nn.Linear, cfg: dict) -> nn.Module`` and its layer classes subclass
:class:`QuantLinear` (QAT's trainable fake-quant layers are ``nn.Linear`` subclasses instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored quantized (buffers only; no trainable weight).

    Subclasses fill their buffers in ``__init__`` from a float ``weight`` (out, in) and implement
    :meth:`dequantize`. ``bias`` stays a float buffer (it is tiny, and quantizing it buys nothing).
    """

    scheme = "?"  # the `quant` option that made it (int8, nf4 ...)

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        """The float weight (out, in) this layer stands for."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def storage_bytes(self) -> int:
        """Bytes this layer's state takes on disk (its buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=True))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def pack_nibbles(codes: torch.Tensor, pad: int, high_first: bool) -> torch.Tensor:
    """Unsigned 4-bit codes (0..15) -> uint8, two per byte (ceil(n/2),); an odd count is padded with
    ``pad``. ``high_first``: element 2i in the high nibble (bitsandbytes' NF4 order), else the low one."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_full((1,), pad)])
    first, second = flat[0::2], flat[1::2]
    return (first << 4) | second if high_first else first | (second << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int, high_first: bool) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: the first ``numel`` codes (uint8)."""
    high, low = packed >> 4, packed & 0x0F
    return torch.stack([high, low] if high_first else [low, high], dim=-1).reshape(-1)[:numel]


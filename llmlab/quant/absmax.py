"""Absmax (symmetric) integer quantization of Linear weights: ``quant=int8`` / ``quant=int4``.

Post-training quantization as in Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication
for Transformers at Scale", §2 (absmax quantization; https://arxiv.org/abs/2208.07339), per output
channel ("vector-wise", §3.1) or per group of ``group_size`` input columns (as GPTQ / AWQ store
int4). For ``b`` bits and a row (or group) ``w``::

    s = max|w| / (2^(b-1) - 1)          q = clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)       ŵ = q·s

so every element is within ``s/2`` of its original and the largest one is exact (spec
seed001_003 §2.10, T13: ``[0.5, 20, -1e-4, -0.01, -0.1]`` -> ``[3, 127, 0, 0, -1]``). The code
range is symmetric (-127 .. 127 for int8; -128 is never used) so that 0 is exact and the sign
flips cleanly. Codes of ``b <= 4`` bits are packed two per byte (offset by 8, low nibble first),
so an int4 layer really takes half a byte per weight on disk.

The quantization math (:func:`absmax_scale`, :func:`quantize_absmax`) is shared with QAT's fake
quantizers (:mod:`llmlab.quant.fake`), which is why a QAT model exports to these layers exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.quant import MAX_BITS, MIN_BITS
from llmlab.quant.base import QuantLinear, pack_nibbles, unpack_nibbles

PACK_OFFSET = 8  # a 4-bit code q in [-7, 7] is stored as q + 8 in [1, 15] (an unsigned nibble)


def qmax(bits: int) -> int:
    """The largest code of a symmetric ``bits``-bit quantizer: 127 for int8, 7 for int4."""
    return 2 ** (int(bits) - 1) - 1


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UserError(f"quant.bits={bits} is not an integer in [{MIN_BITS}, {MAX_BITS}]: e.g. quant.bits=8")
    return bits


def groups_of(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``w`` (out, in) as (out, n_groups, group) — one group per row when ``group_size`` is None."""
    out, n_in = w.shape
    size = n_in if group_size is None else int(group_size)
    if size < 1 or n_in % size:
        raise UserError(f"quant.group_size={group_size} does not divide a layer's {n_in} input features: "
                        f"use a divisor of {n_in} (e.g. 32, 64) or group_size=null (per output channel)")
    return w.reshape(out, n_in // size, size)  # (out, G, group)


def absmax_scale(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Scales (out, n_groups): absmax of each row / group over ``qmax(bits)``; an all-zero group gets
    scale 1 (its codes are 0 whatever the scale, and nothing divides by zero)."""
    amax = groups_of(w.detach(), group_size).abs().amax(dim=-1).float()  # (out, G)
    return torch.where(amax > 0, amax / qmax(bits), torch.ones_like(amax))


def quantize_absmax(w: torch.Tensor, bits: int, group_size: int | None = None,
                    scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in), scales (out, n_groups)) of ``w`` (out, in)."""
    scale = absmax_scale(w, bits, group_size) if scale is None else scale
    g = groups_of(w.float(), group_size)  # (out, G, group)
    q = torch.clamp(torch.round(g / scale.unsqueeze(-1)), -qmax(bits), qmax(bits))
    return q.reshape(w.shape).to(torch.int8), scale


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """ŵ = q·s, (out, in) float32."""
    return (groups_of(q.float(), group_size) * scale.unsqueeze(-1)).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] -> uint8, two per byte (element 2i in the low nibble, 2i+1 in the high one);
    an odd count is padded with one zero code."""
    return pack_nibbles(q.to(torch.int16) + PACK_OFFSET, PACK_OFFSET, high_first=False)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` codes as int8."""
    return (unpack_nibbles(packed, numel, high_first=False).to(torch.int16) - PACK_OFFSET).to(torch.int8)


def fake_quant_input(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric quantize-dequantize of activations with a fixed scale (QAT's observer)."""
    return torch.clamp(torch.round(x / scale), -qmax(bits), qmax(bits)) * scale


class AbsmaxLinear(QuantLinear):
    """A Linear layer stored as absmax integer codes + float32 scales.

    Buffers: ``qweight`` — int8 codes (out, in) for ``bits > 4``, packed uint8 (out*in/2,) for
    ``bits <= 4``; ``scale`` — (out, n_groups) float32. A layer exported from QAT also has
    ``input_scale`` (its activation observer's, frozen) and quantizes its input to ``act_bits``
    with it, exactly as the fake-quant layer did.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None = None,
                 act_bits: int | None = None, input_scale: torch.Tensor | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.bits, self.group_size, self.act_bits = check_bits(int(bits)), group_size, act_bits
        self.scheme = f"int{self.bits}"
        q, scale = quantize_absmax(weight, self.bits, group_size)
        self.register_buffer("qweight", pack_int4(q) if self.packed else q)
        self.register_buffer("scale", scale)
        if act_bits:
            # a QAT observer's scale; a placeholder (1.0) when the layer is rebuilt to load a checkpoint
            self.register_buffer("input_scale", torch.ones(()) if input_scale is None else input_scale.detach().clone().float())

    @property
    def packed(self) -> bool:
        return self.bits <= 4

    def codes(self) -> torch.Tensor:
        """The integer codes (out, in) as int8."""
        if self.packed:
            return unpack_int4(self.qweight, self.out_features * self.in_features).reshape(self.out_features, self.in_features)
        return self.qweight

    def dequantize(self) -> torch.Tensor:
        return dequantize_absmax(self.codes(), self.scale, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits:
            x = fake_quant_input(x, self.input_scale.to(x.dtype), self.act_bits)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per channel"
        act = f", act_bits={self.act_bits}" if self.act_bits else ""
        return f"{super().extra_repr()}, {group}{act}"


def quantize_linear(layer: nn.Linear, cfg: dict) -> AbsmaxLinear:
    """``quant=int8|int4``: the layer's weight as absmax codes at ``cfg['bits']``."""
    return AbsmaxLinear(layer.weight.detach(), layer.bias, int(cfg.get("bits") or 8), cfg.get("group_size"),
                        act_bits=cfg.get("act_bits"))

"""4-bit NormalFloat (NF4) weights with double quantization: ``quant=nf4`` (the base of QLoRA).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3 "4-bit NormalFloat
Quantization" and "Double Quantization" (https://arxiv.org/abs/2305.14314); the layout is
bitsandbytes' (``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``), so the codes and
constants here are byte-for-byte those of ``Linear4bit`` (tests/quant/test_nf4.py checks it).

* **Codebook** (:func:`nf4_codebook`): 16 quantiles of N(0, 1), asymmetric so that 0 is exact and
  both ends are ±1 — 8 positive levels ``Φ⁻¹(linspace(offset, 0.5, 9)[:-1])``, 7 negative ones
  ``-Φ⁻¹(linspace(offset, 0.5, 8)[:-1])``, and 0, divided by the largest. ``offset = 0.9677083 =
  1 - (1/32 + 1/30)/2`` (bitsandbytes ``create_normal_map``). (The seed's ``norm.ppf(linspace(0, 1,
  17)[1:-1])`` has 15 levels, not 16: spec seed000_part3 §2.4.)
* **Blocks**: the weight is flattened and cut into contiguous blocks of ``blocksize`` (64); each
  block stores its absmax ``c2`` (fp32) and each weight the index of the nearest level to
  ``w / c2``. Two indices per byte, the *first* in the high nibble (bitsandbytes' order).
* **Double quantization**: the fp32 absmaxes (0.5 bit/param at block 64) are themselves quantized:
  their mean is subtracted and the rest stored as 8-bit codes of bitsandbytes' signed "dynamic"
  map (:func:`dynamic_map`) in blocks of 256, each with one fp32 constant ``c1``:
  ``8/64 + 32/(64·256) = 0.127`` bit/param instead of 0.5 (§3 "Double Quantization").
* **Dequantization**: ``W = NF4[idx] · c2`` in fp32, cast to ``bnb_4bit_compute_dtype`` for the
  matmul. The weight never trains; gradients flow through it to the input (QLoRA's LoRA adapters
  on earlier layers need them — the seed cut them with ``torch.no_grad``).

One documented difference from bitsandbytes: on CPU its 8-bit *second-level* quantizer looks the
nearest code up in a 65 536-bin table, so a value within 2/65535 of the midpoint between two codes
may get the other neighbour; :func:`quantize_blockwise` takes the exact nearest code. NF4 codes,
absmaxes, the dynamic map, the offset and the second-level constants are identical.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.quant.base import QuantLinear, pack_nibbles, unpack_nibbles

OFFSET = 0.9677083  # 1 - (1/32 + 1/30)/2: the outermost quantile (bitsandbytes create_normal_map)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes' kernels accept
ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of 256 first-level constants (QLoRA §3)
ZERO_CODE = 7  # index of 0.0 in the NF4 codebook (pads an odd element count, as bitsandbytes does)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def nf4_codebook(offset: float = OFFSET) -> torch.Tensor:
    """The 16 NF4 levels, sorted, float32 (index 7 is 0.0, index 0 is -1, index 15 is 1)."""
    # quantiles of float32 linspace points (as bitsandbytes computes them) in float64, then float32
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())  # 8 levels > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 levels < 0
    levels = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).float().sort().values
    return levels / levels.max()


@functools.cache
def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers 2016, "8-Bit Approximations for
    Parallelism in Deep Learning"): 256 sorted values in [-1, 1], a floating-point-like code whose
    exponent ``10^-k`` shrinks as the fraction bits grow; it stores the absmaxes' deviations."""
    non_sign_bits = total_bits - 1
    values: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10 ** (-(max_exponent_bits - 1) + i)
        values += means.tolist() + (-means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))  # (no padding at 7 exponent bits: 254 + 2 = 256)
    return torch.tensor(sorted(values), dtype=torch.float32)


# ---------------------------------------------------------------------------- blockwise codes
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest ``code`` index of each element of ``x`` (flattened) scaled by its block's absmax.

    Returns (indices uint8 (numel,), absmax float32 (n_blocks,)). A last, partial block has the
    absmax of the elements it has; an all-zero block gets absmax 0 and index of the level 0.
    Ties (a value exactly on a midpoint) go to the lower level, as bitsandbytes' ``bucketize``.
    """
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = F.pad(flat, (0, pad)).reshape(-1, blocksize)  # zero padding changes no absmax
    absmax = blocks.abs().amax(dim=1)
    # x * (1/absmax), not x / absmax: the same float32 rounding as bitsandbytes' kernel
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints).to(torch.uint8), absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``code[idx] * absmax[block]`` in float32 (flat, ``idx.numel()`` elements)."""
    n = idx.numel()
    values = F.pad(code[idx.long()], (0, -n % blocksize)).reshape(-1, blocksize)  # (n_blocks, blocksize)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


def pack_4bit(idx: torch.Tensor) -> torch.Tensor:
    """Indices 0..15 -> uint8 (ceil(n/2),): element 2i in the high nibble, 2i+1 in the low one
    (bitsandbytes' order); an odd count is padded with the code of 0.0."""
    return pack_nibbles(idx, ZERO_CODE, high_first=True)


def unpack_4bit(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``numel`` indices (uint8)."""
    return unpack_nibbles(packed, numel, high_first=True)


# ---------------------------------------------------------------------------- NF4 tensors
def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """The buffers that store ``w`` in NF4: ``weight_packed`` and either ``absmax`` (fp32 per block)
    or, with double quantization, ``absmax_codes`` (uint8), ``absmax_scale`` (fp32 per 256 blocks)
    and ``absmax_offset`` (fp32 scalar: the mean that was subtracted)."""
    idx, absmax = quantize_blockwise(w, nf4_codebook(), blocksize)
    state = {"weight_packed": pack_4bit(idx)}
    if not double_quant:
        return {**state, "absmax": absmax}
    offset = absmax.mean()  # absmaxes are all positive: centring them uses the signed map's both halves
    codes, scale = quantize_blockwise(absmax - offset, dynamic_map(), ABSMAX_BLOCKSIZE)
    return {**state, "absmax_codes": codes, "absmax_scale": scale, "absmax_offset": offset}


def block_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first-level constants ``c2`` (fp32 per block), de-quantized if double-quantized."""
    if "absmax" in state:
        return state["absmax"]
    return dequantize_blockwise(state["absmax_codes"], state["absmax_scale"], dynamic_map(),
                                ABSMAX_BLOCKSIZE) + state["absmax_offset"]


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, ...], blocksize: int = 64) -> torch.Tensor:
    """``NF4[idx] · c2`` (float32, ``shape``)."""
    n = 1
    for d in shape:
        n *= d
    idx = unpack_4bit(state["weight_packed"], n)
    return dequantize_blockwise(idx, block_absmax(state), nf4_codebook(), blocksize).reshape(shape)


# ---------------------------------------------------------------------------- the layer
class NF4Linear(QuantLinear):
    """A Linear layer stored in NF4 (4 bits per weight + the block constants), computing in
    ``compute_dtype`` with the de-quantized weight. Buffers as :func:`quantize_nf4` names them."""

    scheme = "nf4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        for name, tensor in quantize_nf4(weight, blocksize, double_quant).items():
            self.register_buffer(name, tensor)

    def quant_state(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False) if name != "bias"}

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self.quant_state(), (self.out_features, self.in_features), self.blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.dequantize().to(dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")


def nf4_options(cfg: dict) -> dict:
    """``blocksize``, ``double_quant`` and ``compute_dtype`` of a ``quant=nf4`` config, checked."""
    if (cfg.get("bnb_4bit_quant_type") or "nf4") != "nf4":
        raise UserError(f"quant.bnb_4bit_quant_type={cfg['bnb_4bit_quant_type']!r} is not supported by quant=nf4: "
                        "use bnb_4bit_quant_type=nf4 (4-bit NormalFloat)")
    if cfg.get("bits") not in (None, 4):
        raise UserError(f"quant.bits={cfg['bits']} does not apply to quant=nf4 (always 4 bits): drop it, "
                        "or use quant=int4 / quant=int8 for other widths")
    blocksize = cfg.get("blocksize") or 64
    if blocksize not in BLOCKSIZES:
        raise UserError(f"quant.blocksize={blocksize} is not supported: use one of {', '.join(map(str, BLOCKSIZES))}"
                        " (64 is QLoRA's)")
    name = str(cfg.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"quant.bnb_4bit_compute_dtype={name!r} is unknown: use {', '.join(DTYPES)}")
    double_quant = cfg.get("bnb_4bit_use_double_quant", True)
    return {"blocksize": int(blocksize), "double_quant": bool(double_quant), "compute_dtype": DTYPES[name]}


def quantize_linear(layer: nn.Linear, cfg: dict) -> QuantLinear:
    """``quant=nf4``: llmlab's :class:`NF4Linear`, or bitsandbytes' ``Linear4bit`` with ``backend: bnb``."""
    options = nf4_options(cfg)
    if (cfg.get("backend") or "llmlab") == "bnb":
        from llmlab.quant.bnb import BnbLinear4bit

        return BnbLinear4bit.from_linear(layer, **options)
    return NF4Linear(layer.weight.detach(), layer.bias, **options)

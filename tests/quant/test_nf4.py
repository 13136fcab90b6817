"""NF4 (llmlab.quant.nf4) against bitsandbytes on the same tensors and the spec's golden numbers
(spec seed000_part3 §2.4): codebook, block codes + absmax bytes, dequantization, double
quantization, its 0.127 bit/param overhead, quality vs int4, packing, and the layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.quant import nf4
from llmlab.quant.bnb import bitsandbytes

# spec §2.4, regenerated from create_normal_map(offset=0.9677083, use_extra_value=True)
SPEC_NF4 = [-1.0, -0.6961928, -0.5250730, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
            0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
SHAPES = [(96, 64), (128, 200), (33, 7)]  # whole blocks; a partial last block; an odd element count


def bnbf():
    return bitsandbytes().functional


def weight(shape, seed=0, std=0.02):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def test_codebook_is_bitsandbytes_nf4_and_the_spec_values():
    code = nf4.nf4_codebook()
    assert code.dtype == torch.float32 and code.numel() == 16
    assert torch.equal(code, bnbf().get_4bit_type("nf4", device="cpu"))  # bit-exact
    normal_map = bnbf().create_normal_map(offset=0.9677083, use_extra_value=True)
    assert torch.equal(code, torch.cat([normal_map[:8], normal_map[-8:]]))  # its 16 non-padding values
    assert torch.allclose(code, torch.tensor(SPEC_NF4), atol=1e-6, rtol=0)
    assert torch.equal(code, code.unique()) and code[0] == -1 and code[-1] == 1 and code[nf4.ZERO_CODE] == 0


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(nf4.dynamic_map(), bnbf().create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_codes_and_absmax_equal_bitsandbytes_quantize_4bit(shape):
    w = weight(shape)
    packed, state = bnbf().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4.quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(ours["weight_packed"], packed.reshape(-1))  # the same bytes, nibble order included
    assert torch.equal(ours["absmax"], state.absmax)
    assert torch.equal(nf4.dequantize_nf4(ours, shape), bnbf().dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 128])
def test_other_blocksizes_equal_bitsandbytes(blocksize):
    w = weight((64, 96), seed=1)
    packed, state = bnbf().quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    ours = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(ours["weight_packed"], packed.reshape(-1)) and torch.equal(ours["absmax"], state.absmax)


def test_double_quantization_matches_bitsandbytes():
    """Offset and second-level constants are identical; an 8-bit absmax code may differ only where
    the value sits within one bin of bitsandbytes' CPU lookup table (2/65535) of a midpoint."""
    w = weight((512, 256), seed=2)  # 2048 blocks of 64 -> 8 blocks of 256 constants
    packed, state = bnbf().quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    assert torch.equal(ours["weight_packed"], packed.reshape(-1))
    assert torch.equal(ours["absmax_offset"], state.offset)
    assert torch.equal(ours["absmax_scale"], state.state2.absmax)
    assert ours["absmax_codes"].dtype == torch.uint8 and ours["absmax_codes"].shape == state.absmax.shape
    differ = ours["absmax_codes"] != state.absmax
    assert differ.float().mean() < 0.01
    if differ.any():
        absmax = nf4.quantize_nf4(w, blocksize=64, double_quant=False)["absmax"]
        blocks = (absmax - ours["absmax_offset"]).reshape(-1, nf4.ABSMAX_BLOCKSIZE)
        scaled = (blocks / ours["absmax_scale"].unsqueeze(1)).reshape(-1)[differ]
        code = nf4.dynamic_map()
        gap = (scaled.unsqueeze(1) - (code[:-1] + code[1:]).unsqueeze(0) / 2).abs().min(dim=1).values
        assert (gap <= 2 / 65535).all()
    # de-quantized weights: identical in every block whose 8-bit absmax code agrees, within 2 % elsewhere
    theirs = bnbf().dequantize_4bit(packed, state).reshape(-1, 64)
    mine = nf4.dequantize_nf4(ours, w.shape).reshape(-1, 64)
    assert torch.equal(mine[~differ], theirs[~differ])
    assert torch.allclose(mine[differ], theirs[differ], rtol=0.02, atol=0)
    # the double-quantized constants are close to the fp32 absmaxes they replace
    exact = nf4.quantize_nf4(w, blocksize=64, double_quant=False)["absmax"]
    assert torch.allclose(nf4.block_absmax(ours), exact, rtol=0.02)


def test_double_quant_overhead_is_0_127_bits_per_param():
    """A 4096x4096 layer, from its real buffer sizes (shapes only: the meta device allocates nothing)."""
    layer = nf4.NF4Linear(torch.empty(4096, 4096, device="meta"), None, blocksize=64, double_quant=True)
    sizes = {n: b.numel() * b.element_size() for n, b in layer.named_buffers()}
    n = 4096 * 4096
    assert sizes["weight_packed"] == 8 * 2**20  # 8 MiB of codes
    assert sizes["absmax_codes"] == 256 * 2**10 and sizes["absmax_scale"] == 4 * 2**10  # + 256 KiB + 4 KiB
    overhead = 8 * (sizes["absmax_codes"] + sizes["absmax_scale"]) / n
    assert overhead == pytest.approx(8 / 64 + 32 / (64 * 256)) and round(overhead, 3) == 0.127
    single = nf4.NF4Linear(torch.empty(4096, 4096, device="meta"), None, double_quant=False)
    assert 8 * single.absmax.numel() * single.absmax.element_size() / n == 0.5
    assert 8 * layer.storage_bytes() / n == pytest.approx(4.127, abs=1e-3)
    saved = (0.5 - overhead) * 65e9 / 8 / 1e9  # GB saved on 65B parameters (paper: ~3 GB)
    assert saved == pytest.approx(3.03, abs=0.01)


def relative_rmse(w, w_hat):
    return ((w - w_hat).norm() / w.norm()).item()


def int4_blockwise(w, blocksize=64):
    """Symmetric absmax int4 (15 levels) per block: the spec's comparison code."""
    blocks = w.reshape(-1, blocksize)
    s = blocks.abs().amax(dim=1, keepdim=True) / 7
    return (torch.round(blocks / s).clamp(-7, 7) * s).reshape(w.shape)


def test_nf4_beats_int4_on_normal_weights():
    """Spec table: relative RMSE 0.0919 (NF4) < 0.108 (int4) on N(0, 0.02²) in blocks of 64."""
    w = weight((1024, 1024), seed=3)
    e_nf4 = relative_rmse(w, nf4.dequantize_nf4(nf4.quantize_nf4(w, 64, False), w.shape))
    e_int4 = relative_rmse(w, int4_blockwise(w))
    assert e_nf4 < e_int4
    assert e_nf4 == pytest.approx(0.0919, abs=0.002) and e_int4 == pytest.approx(0.108, abs=0.002)


def test_roundtrip_error_bound():
    w = weight((256, 64), seed=4)
    state = nf4.quantize_nf4(w, 64, False)
    err = (w - nf4.dequantize_nf4(state, w.shape)).abs().reshape(-1, 64)
    max_gap = (nf4.nf4_codebook()[1:] - nf4.nf4_codebook()[:-1]).max()
    assert max_gap == pytest.approx(1 - 0.6961928, abs=1e-6)  # the widest gap is at -1
    assert (err <= state["absmax"].unsqueeze(1) * max_gap / 2 + 1e-7).all()


def test_pack_unpack_identity_and_nibble_order():
    idx = torch.randint(0, 16, (1001,), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    packed = nf4.pack_4bit(idx)
    assert packed.numel() == 501 and torch.equal(nf4.unpack_4bit(packed, 1001), idx)
    assert nf4.pack_4bit(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x12  # first element: high nibble
    assert nf4.pack_4bit(torch.tensor([3], dtype=torch.uint8)).item() == 0x37  # odd: padded with the code of 0


def test_layer_forward_backward_and_state_dict():
    lin = nn.Linear(64, 48)
    layer = nf4.quantize_linear(lin, {"name": "nf4", "blocksize": 64, "bnb_4bit_use_double_quant": True})
    assert isinstance(layer, nf4.NF4Linear) and not list(layer.parameters())  # nothing trains
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.dequantize(), lin.bias.detach()))
    y.sum().backward()  # the input gets a gradient through the frozen de-quantized weight
    assert torch.allclose(x.grad, torch.ones(3, 5, 48) @ layer.dequantize())
    # loading a checkpoint into a layer built from other weights restores the stored codes
    other = nf4.quantize_linear(nn.Linear(64, 48), {"name": "nf4"})
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)


def test_compute_dtype():
    layer = nf4.quantize_linear(nn.Linear(64, 32), {"bnb_4bit_compute_dtype": "bfloat16"})
    x = torch.randn(4, 64)
    y = layer(x)
    assert y.dtype == torch.float32  # returned in the input's dtype
    expected = F.linear(x.bfloat16(), layer.dequantize().bfloat16(), layer.bias.bfloat16()).float()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("cfg, match", [
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type"),
    ({"blocksize": 100}, "blocksize"),
    ({"bnb_4bit_compute_dtype": "float64"}, "bnb_4bit_compute_dtype"),
    ({"bits": 3}, "bits"),
])
def test_bad_options_are_one_line(cfg, match):
    with pytest.raises(UserError, match=match):
        nf4.quantize_linear(nn.Linear(64, 64), {"name": "nf4", **cfg})

"""`quant.backend: bnb` (llmlab.quant.bnb): bitsandbytes' Linear4bit / Linear8bitLt behind QuantLinear —
the same codes as llmlab's own layers, a state dict in bitsandbytes' format that survives
torch.save / torch.load(weights_only=True) into freshly built layers, whole-model round trips,
and bitsandbytes imported only when this backend is used."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from llmlab.models.gpt import GPT, GPTConfig
from llmlab.quant import apply_quant, llm_int8, nf4
from llmlab.quant.bnb import BnbLinear4bit, BnbLinear8bitLt


def linear(n_in=128, n_out=96, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():  # fp16-representable: bitsandbytes' 8-bit path rounds to fp16 first
        lin.weight.copy_(lin.weight.half().float())
    return lin


def reload(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain tensors only: nothing runs code when loading


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_same_codes_as_llmlab_nf4(double_quant):
    lin = linear()
    cfg = {"name": "nf4", "bnb_4bit_use_double_quant": double_quant}
    theirs, ours = nf4.quantize_linear(lin, {**cfg, "backend": "bnb"}), nf4.quantize_linear(lin, cfg)
    assert isinstance(theirs, BnbLinear4bit) and not list(theirs.parameters())
    state = theirs.state_dict()
    assert state["weight"].dtype == torch.uint8
    assert torch.equal(state["weight"].reshape(-1), ours.weight_packed)
    x = torch.randn(4, 128)
    if not double_quant:
        assert torch.equal(state["weight.absmax"], ours.absmax)
        assert torch.equal(theirs.dequantize(), ours.dequantize())
        assert torch.allclose(theirs(x), ours(x), atol=1e-6)
    else:
        assert {"weight.nested_absmax", "weight.quant_state.bitsandbytes__nf4"} <= set(state)
        assert torch.allclose(theirs(x), ours(x), atol=1e-3)


def test_linear4bit_state_dict_round_trip():
    lin = linear()
    layer = nf4.quantize_linear(lin, {"name": "nf4", "backend": "bnb", "blocksize": 64})
    fresh = nf4.quantize_linear(linear(seed=1), {"name": "nf4", "backend": "bnb", "blocksize": 64})
    x = torch.randn(3, 128)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(reload(layer.state_dict()))
    assert torch.equal(fresh(x), layer(x))
    assert fresh.layer.weight.quant_state.blocksize == 64 and fresh.layer.weight.quant_state.nested


def test_linear8bitlt_same_codes_and_round_trip():
    lin = linear()
    theirs = llm_int8.quantize_linear(lin, {"name": "llm_int8", "backend": "bnb"}).eval()
    ours = llm_int8.quantize_linear(lin, {"name": "llm_int8"})
    assert isinstance(theirs, BnbLinear8bitLt)
    assert torch.equal(theirs.dequantize(), ours.dequantize())
    x = torch.randn(6, 128).half().float()
    x[:, 5] = 9.0  # an outlier feature
    y = theirs(x)
    assert torch.allclose(y, ours(x), atol=1e-3)
    fresh = llm_int8.quantize_linear(linear(seed=2), {"name": "llm_int8", "backend": "bnb"}).eval()
    fresh.load_state_dict(reload(theirs.state_dict()))
    assert torch.equal(fresh(x), y)
    assert theirs.storage_bytes() < 0.55 * 2 * 128 * 96 + 96 * 4 + 96 * 4 + 1  # int8 + SCB + bias + format byte


def test_whole_model_round_trip_through_apply_quant():
    def model(seed):
        torch.manual_seed(seed)
        return GPT(GPTConfig(vocab_size=37, block_size=16, n_layer=1, n_head=2, n_embd=64)).eval()

    x = torch.randint(0, 37, (2, 9))
    for cfg in ({"name": "nf4", "backend": "bnb"}, {"name": "llm_int8", "backend": "bnb"}):
        a = apply_quant(model(0), cfg)
        b = apply_quant(model(1), cfg)
        b.load_state_dict(reload(a.state_dict()))
        assert torch.equal(a(x), b(x)), cfg


def test_bitsandbytes_is_imported_only_by_the_bnb_backend():
    code = ("import sys, torch; from torch import nn; from llmlab.quant import nf4, llm_int8; "
            "nf4.quantize_linear(nn.Linear(64, 64), {}); llm_int8.quantize_linear(nn.Linear(64, 64), {}); "
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Quantization-aware training (llmlab/quant/fake.py), spec seed000_part3 §2.3: fake-quant forward
= round/clamp, clipped-STE backward, idempotence, the EMA activation observer, a tiny GPT that
trains under qat_int4, and the export to real int codes with the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmlab.errors import UserError
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.quant import apply_quant, is_quantized, quant_config, quantize_trained
from llmlab.quant.absmax import AbsmaxLinear, quantize_absmax
from llmlab.quant.fake import EMAObserver, QATLinear, fake_quant, fake_quant_weight

QAT4 = {"name": "qat_int4", "bits": 4, "group_size": None, "act_bits": 8, "observer_momentum": 0.9,
        "freeze_observers_after": None, "llm_int8_skip_modules": ["lm_head"]}


def test_forward_is_round_clamp_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=g) * 3
    x[:4] = torch.tensor([0.25, -0.25, 0.75, 100.0])  # exact halves (round half to even) and a clipped value
    s = torch.tensor(0.5)
    for bits in (8, 4, 2):
        top = 2 ** (bits - 1) - 1
        expected = torch.clamp(torch.round(x / s), -top, top) * s
        assert torch.equal(fake_quant(x, s, bits), expected)
    assert fake_quant(x[:4], s, 8).tolist() == [0.0, -0.0, 1.0, 63.5]  # 0.5 -> 0, 1.5 -> 2 (even), 200 -> 127


def test_clipped_ste_backward():
    s = torch.tensor(0.1)
    x = torch.tensor([-1.0, -0.7, -0.3, 0.0, 0.42, 0.7, 0.71, 5.0], requires_grad=True)  # int4: range ±0.7
    upstream = torch.arange(1.0, 9.0)
    fake_quant(x, s, 4).backward(upstream)
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, upstream * inside)  # identity inside [qmin, qmax]·s, zero where clipped


def test_idempotence():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    for bits, group in ((8, None), (4, None), (4, 16), (3, 32)):
        once = fake_quant_weight(w, bits, group)
        assert torch.equal(fake_quant_weight(once, bits, group), once)
        q, s = quantize_absmax(w, bits, group)  # the same grid as post-training absmax
        torch.testing.assert_close(once, (q.float().reshape(32, -1, group or 64) * s.unsqueeze(-1)).reshape(32, 64),
                                   rtol=0, atol=0)
    x, s = torch.randn(100, generator=g), torch.tensor(0.05)
    assert torch.equal(fake_quant(fake_quant(x, s, 4), s, 4), fake_quant(x, s, 4))


def test_ema_observer_math_and_freeze():
    obs = EMAObserver(momentum=0.9, freeze_after=3)
    batches = [torch.tensor([1.0, -2.0]), torch.tensor([4.0]), torch.tensor([-1.0]), torch.tensor([100.0])]
    expected = 2.0  # the first batch starts the average
    obs.update(batches[0])
    assert obs.absmax.item() == pytest.approx(expected)
    for b in batches[1:3]:
        obs.update(b)
        expected = 0.9 * expected + 0.1 * b.abs().max().item()
        assert obs.absmax.item() == pytest.approx(expected)
    assert int(obs.steps) == 3 and obs.frozen
    layer = QATLinear(1, 1, bits=8, act_bits=8, freeze_observers_after=3)
    layer.observer.load_state_dict(obs.state_dict())
    layer.train()(batches[3].reshape(1, 1))  # frozen: the outlier batch changes nothing
    assert layer.observer.absmax.item() == pytest.approx(expected)
    assert obs.scale(batches[3], 8).item() == pytest.approx(expected / 127)
    with pytest.raises(UserError, match="observer_momentum"):
        EMAObserver(momentum=1.0)


def test_qat_layer_uses_observer_in_training_only():
    torch.manual_seed(0)
    layer = QATLinear(8, 4, bits=4, act_bits=8, observer_momentum=0.5)
    x1, x2 = torch.randn(3, 8), torch.randn(3, 8) * 10
    layer.train()
    layer(x1)
    layer(x2)
    assert int(layer.observer.steps) == 2
    assert layer.observer.absmax.item() == pytest.approx(0.5 * x1.abs().max().item() + 0.5 * x2.abs().max().item())
    layer.eval()
    layer(x2 * 3)
    assert int(layer.observer.steps) == 2  # eval never moves the ranges
    scale = layer.observer.absmax / 127
    expected = F.linear(fake_quant(x1, scale, 8), fake_quant_weight(layer.weight, 4), layer.bias)
    assert torch.equal(layer(x1), expected)
    out = layer.train()(x1).sum()
    out.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0  # the float weight trains


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32))


def _train(model, steps: int, lr: float = 3e-3) -> list[float]:
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 32, (64,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, 48, (8,), generator=g)
        x = torch.stack([base[s:s + 16] for s in starts.tolist()])  # a repeating sequence: learnable
        y = torch.stack([base[s + 1:s + 17] for s in starts.tolist()])
        loss = F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_trains_with_qat_int4():
    model = apply_quant(tiny_gpt(), QAT4)
    assert sum(isinstance(m, QATLinear) for m in model.modules()) == 8
    assert not is_quantized(model)  # QAT weights are floats until exported
    losses = _train(model, 40)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_export_gives_the_fake_quant_logits():
    model = apply_quant(tiny_gpt(1), QAT4)
    _train(model, 10)
    model.eval()
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fake_logits = model(x)
    exported = copy.deepcopy(model)
    cfg = quantize_trained(exported, QAT4)
    assert cfg["name"] == "int4" and cfg["act_bits"] == 8 and cfg["qat"] == "qat_int4" and is_quantized(exported)
    layers = [m for m in exported.modules() if isinstance(m, AbsmaxLinear)]
    assert len(layers) == 8 and all(m.qweight.dtype == torch.uint8 for m in layers)  # real packed int4
    with torch.no_grad():
        torch.testing.assert_close(exported(x), fake_logits, rtol=0, atol=1e-5)
    # the exported structure is rebuilt from its config and loads its own state (a checkpoint round trip)
    rebuilt = apply_quant(tiny_gpt(7), quant_config(exported))
    rebuilt.load_state_dict(exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), fake_logits, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="already quantized"):
        quantize_trained(exported, QAT4)
    with pytest.raises(UserError, match="bits=4"):
        quantize_trained(copy.deepcopy(model), {**QAT4, "name": "qat_int8", "bits": 8})


def test_qat_scheme_on_a_float_model_is_ptq_at_those_bits():
    fp = tiny_gpt(2).eval()
    a, b = copy.deepcopy(fp), copy.deepcopy(fp)
    cfg = quantize_trained(a, QAT4)
    assert cfg["name"] == "int4" and cfg["act_bits"] is None
    apply_quant(b, {"name": "int4", "bits": 4, "group_size": None, "llm_int8_skip_modules": ["lm_head"]})
    x = torch.randint(0, 32, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))

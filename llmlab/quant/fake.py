"""Quantization-aware training (``quant=qat_int8`` / ``quant=qat_int4``): fake quantization with a
straight-through estimator, then export to real integer weights.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-
Only Inference", §3 (simulated quantization in the forward pass, EMA activation ranges;
https://arxiv.org/abs/1712.05877), with the clipped straight-through estimator of Bengio et al.
2013 / Hubara et al. 2016 (https://arxiv.org/abs/1609.07061 §2.3). Spec: seed000_part3 §2.3.

* Weights: symmetric per output channel (or per ``group_size`` columns), ``s = max|w|/(2^(b-1)-1)``,
  ``ŵ = clamp(round(w/s), -qmax, qmax)·s`` — the same math as :mod:`llmlab.quant.absmax`, so the
  export is exact.
* Activations: per tensor, symmetric, with an EMA of the batch absmax
  (``absmax ← m·absmax + (1-m)·max|x|``, ``m = observer_momentum``) updated by training forward
  passes until ``freeze_observers_after`` of them; eval uses the stored value.
* Backward: the clipped STE — the gradient passes where ``qmin <= x/s <= qmax`` and is 0 where
  the value was clipped (rounding itself has zero gradient almost everywhere, which STE ignores).

The float weights keep training (``QATLinear`` is an ``nn.Linear``); :func:`export` turns each into
an :class:`~llmlab.quant.absmax.AbsmaxLinear` holding the integer codes the forward pass used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.quant import CONFIG_ATTR, quant_config
from llmlab.quant.absmax import AbsmaxLinear, absmax_scale, check_bits, groups_of, qmax


class FakeQuant(torch.autograd.Function):
    """``clamp(round(x/s), -qmax, qmax)·s`` forward; clipped straight-through backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        top = qmax(bits)
        scaled = x / scale
        ctx.save_for_backward((scaled >= -top) & (scaled <= top))  # inside the range: the gradient passes
        return torch.clamp(torch.round(scaled), -top, top) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None  # the scale is a statistic of the data, not learned (no LSQ)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (broadcast against ``x``) at ``bits``."""
    return FakeQuant.apply(x, scale, bits)


def fake_quant_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Per-channel (or per-group) absmax fake quantization of a weight (out, in)."""
    scale = absmax_scale(w, bits, group_size).to(w.dtype)  # (out, G), no gradient
    return fake_quant(groups_of(w, group_size), scale.unsqueeze(-1), bits).reshape(w.shape)


class EMAObserver(nn.Module):
    """Per-tensor running absmax of the activations a layer sees (buffers: ``absmax``, ``steps``)."""

    def __init__(self, momentum: float = 0.9, freeze_after: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise UserError(f"quant.observer_momentum={momentum} is not in [0, 1): e.g. quant.observer_momentum=0.9")
        self.momentum, self.freeze_after = float(momentum), freeze_after
        self.register_buffer("absmax", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards observed

    @property
    def frozen(self) -> bool:
        return self.freeze_after is not None and int(self.steps) >= int(self.freeze_after)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        current = x.detach().abs().amax().float()
        if int(self.steps) == 0:
            self.absmax.copy_(current)  # the first batch starts the average (no bias towards 0)
        else:
            self.absmax.mul_(self.momentum).add_((1.0 - self.momentum) * current)
        self.steps += 1

    def scale(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """The activation scale; before any training forward (a fresh model evaluated), the batch's own."""
        amax = self.absmax if int(self.steps) > 0 else x.detach().abs().amax().float()
        return torch.clamp(amax, min=torch.finfo(torch.float32).tiny) / qmax(bits)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, freeze_after={self.freeze_after}"


class QATLinear(nn.Linear):
    """An ``nn.Linear`` that trains its float weight through fake quantization of its weight (and,
    with ``act_bits``, of its input)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int | None = None, act_bits: int | None = 8, observer_momentum: float = 0.9,
                 freeze_observers_after: int | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.bits, self.group_size = check_bits(int(bits)), group_size
        self.act_bits = check_bits(int(act_bits)) if act_bits else None
        self.observer = EMAObserver(observer_momentum, freeze_observers_after) if self.act_bits else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, cfg: dict) -> "QATLinear":
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, bits=int(cfg.get("bits") or 8),
                  group_size=cfg.get("group_size"), act_bits=cfg.get("act_bits"),
                  observer_momentum=cfg.get("observer_momentum", 0.9),
                  freeze_observers_after=cfg.get("freeze_observers_after"))
        new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        groups_of(layer.weight, new.group_size)  # a group size that does not divide is one line now, not at forward
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        new.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            new.bias.requires_grad_(layer.bias.requires_grad)
        return new

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is None:
            return x
        if self.training and not self.observer.frozen:
            self.observer.update(x)
        return fake_quant(x, self.observer.scale(x, self.act_bits).to(x.dtype), self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), fake_quant_weight(self.weight, self.bits, self.group_size), self.bias)

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.group_size else "per channel"
        return f"{super().extra_repr()}, bits={self.bits}, {group}, act_bits={self.act_bits}"


def quantize_linear(layer: nn.Linear, cfg: dict) -> QATLinear:
    """``quant=qat_int8|qat_int4``: a trainable fake-quant copy of ``layer``."""
    return QATLinear.from_linear(layer, cfg)


def qat_layers(model: nn.Module) -> list[tuple[str, QATLinear]]:
    return [(p, m) for p, m in getattr(model, "_orig_mod", model).named_modules() if isinstance(m, QATLinear)]


def ptq_config(cfg: dict) -> dict:
    """The post-training absmax scheme at a QAT config's bits (weights only: no observer has seen data)."""
    name = cfg["name"].removeprefix("qat_")
    keep = ("bits", "group_size", "llm_int8_skip_modules", "backend")
    return {"name": name, **{k: cfg.get(k) for k in keep if k in cfg}, "act_bits": None}


def export(model: nn.Module) -> dict:
    """Replace every :class:`QATLinear` of ``model`` by the integer layer its forward pass simulates
    (same codes, scales and activation scale: the same outputs); returns the config now recorded
    on the model (``int8`` / ``int4`` with ``act_bits`` when activations were observed)."""
    inner = getattr(model, "_orig_mod", model)
    layers = qat_layers(inner)
    cfg = dict(quant_config(inner) or {})
    if not layers:
        raise UserError("the model has no QAT layers to export: train it with quant=qat_int8 or quant=qat_int4")
    observed = all(m.observer is not None and int(m.observer.steps) > 0 for _, m in layers)
    exported = {**ptq_config(cfg), "act_bits": layers[0][1].act_bits if observed else None, "qat": cfg.get("name")}
    for path, m in layers:
        scale = m.observer.scale(m.weight, m.act_bits) if observed else None
        inner.set_submodule(path, AbsmaxLinear(m.weight.detach(), None if m.bias is None else m.bias.detach(),
                                               m.bits, m.group_size, act_bits=exported["act_bits"], input_scale=scale))
    setattr(inner, CONFIG_ATTR, exported)
    return exported


def to_float(model: nn.Module) -> nn.Module:
    """Back to plain ``nn.Linear`` layers holding the QAT-trained float weights (fake quantizers dropped)."""
    inner = getattr(model, "_orig_mod", model)
    for path, m in qat_layers(inner):
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("observer.")})
        inner.set_submodule(path, plain)
    if hasattr(inner, CONFIG_ATTR):
        delattr(inner, CONFIG_ATTR)
    return model

"""``quant.backend: bnb``: bitsandbytes' own layers behind llmlab's :class:`QuantLinear` interface.

* ``quant=llm_int8`` -> ``bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False, threshold=llm_int8_threshold)``
  (Dettmers et al. 2022, LLM.int8(), https://arxiv.org/abs/2208.07339);
* ``quant=nf4`` -> ``bitsandbytes.nn.Linear4bit(quant_type="nf4", compress_statistics=double quant,
  compute_dtype=bnb_4bit_compute_dtype)`` with ``blocksize`` (Dettmers et al. 2023, QLoRA,
  https://arxiv.org/abs/2305.14314).

The wrapper keeps the bitsandbytes layer out of the module tree (a plain attribute), so the
state-dict keys are bitsandbytes' own next to the wrapper's: ``<layer>.weight`` (packed uint8 /
int8), ``<layer>.weight.absmax``, ``<layer>.weight.quant_state.bitsandbytes__nf4`` ... for 4-bit,
``<layer>.weight``, ``<layer>.SCB`` for 8-bit — the format transformers saves — and loading rebuilds
the layer from them (``Params4bit.from_prequantized``, ``Int8Params``), so an llmlab checkpoint holds
the real packed weights. The bias stays an llmlab float buffer (added after the bitsandbytes
matmul), as in every :class:`QuantLinear`.

``import bitsandbytes`` is slow (~5 s) and logs a CPU-kernel warning: it happens only here, on
first use, with those loggers quietened.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from llmlab.quant.base import QuantLinear

# "kernels-community" (a hub download we never want) and the fp16 cast note of every 8-bit matmul
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


@functools.cache
def bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, imported once, its noisy loggers silenced."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


class BnbLinear(QuantLinear):
    """A bitsandbytes layer (``self.layer``, not a child module) + llmlab's float bias buffer."""

    weight_keys: tuple[str, ...] = ()  # the bitsandbytes state-dict keys that must be in a checkpoint

    def __init__(self, layer: nn.Module, bias: torch.Tensor | None) -> None:
        super().__init__(layer.in_features, layer.out_features, bias)
        object.__setattr__(self, "layer", layer)  # hidden from modules()/parameters(): nothing of it trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layer.train(self.training)  # Linear8bitLt picks its CPU kernel by mode
        y = self.layer(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        self.layer._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] != "bias"}
        unexpected_keys[:] = [k for k in unexpected_keys if not (k.startswith(prefix) and k[len(prefix):] in mine)]
        lacking = [k for k in self.weight_keys if k not in mine]
        if lacking:
            missing_keys.extend(prefix + k for k in lacking)
            return
        self.load_quantized(mine)

    def load_quantized(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class BnbLinear4bit(BnbLinear):
    """``bitsandbytes.nn.Linear4bit`` (NF4, blocks of ``blocksize``, optional double quantization)."""

    scheme = "nf4"
    weight_keys = ("weight", "weight.absmax", "weight.quant_map")

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 weight: torch.Tensor | None = None) -> None:
        bnb = bitsandbytes()
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                                  compress_statistics=double_quant, quant_type="nf4")
        super().__init__(layer, bias)
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        w = layer.weight.data if weight is None else weight.detach().float()
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                                         quant_type="nf4", module=layer)._quantize(torch.device("cpu"))

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> BnbLinear4bit:
        return cls(linear.in_features, linear.out_features, linear.bias, blocksize, double_quant, compute_dtype,
                   weight=linear.weight)

    def dequantize(self) -> torch.Tensor:
        bnb = bitsandbytes()
        return bnb.functional.dequantize_4bit(self.layer.weight.data, self.layer.weight.quant_state).float()

    def load_quantized(self, state: dict[str, torch.Tensor]) -> None:
        bnb = bitsandbytes()
        stats = {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")}
        self.layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=self.layer)


class BnbLinear8bitLt(BnbLinear):
    """``bitsandbytes.nn.Linear8bitLt(has_fp16_weights=False, threshold=llm_int8_threshold)``."""

    scheme = "llm_int8"
    weight_keys = ("weight", "SCB")

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, threshold: float = 6.0,
                 weight: torch.Tensor | None = None) -> None:
        bnb = bitsandbytes()
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=threshold)
        if weight is not None:
            layer.weight = bnb.nn.Int8Params(weight.detach().float().clone(), requires_grad=False, has_fp16_weights=False)
        super().__init__(layer.to("cpu"), bias)  # .to() on an unquantized Int8Params quantizes it (row-wise absmax)
        self.threshold = threshold

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> BnbLinear8bitLt:
        return cls(linear.in_features, linear.out_features, linear.bias, threshold, weight=linear.weight)

    def scales(self) -> torch.Tensor:
        """bitsandbytes' SCB: absmax per output row (it moves from the weight to the layer state on first use)."""
        scb = getattr(self.layer.weight, "SCB", None)
        return self.layer.state.SCB if scb is None else scb

    def dequantize(self) -> torch.Tensor:
        return self.layer.weight.data.float() * (self.scales().float() / 127.0).unsqueeze(1)

    def load_quantized(self, state: dict[str, torch.Tensor]) -> None:
        bnb = bitsandbytes()
        cb, scb = state["weight"].to(torch.int8), state["SCB"].float()
        layer = bnb.nn.Linear8bitLt(self.in_features, self.out_features, bias=False, has_fp16_weights=False,
                                    threshold=self.threshold, device="meta")
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        object.__setattr__(self, "layer", layer)

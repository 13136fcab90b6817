"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", §2.1
and Figure 2; Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", arXiv 2020 / EACL 2021, §3 — the single-adapter "Pfeiffer" configuration).

An adapter is a small residual MLP inserted into every transformer block::

    h  ->  h + up(act(down(h)))        down: d -> m,  up: m -> d,  m << d (the bottleneck)

It transforms a sub-layer's *output*, before that output is added to the residual stream (and,
in post-LN BERT, before the LayerNorm) — Houlsby's placement, not the seed's, which applied one
adapter to the whole residual stream after the block (spec seed000_part2 §3.3.3). Placements:

* ``houlsby``: two adapters per block, after self-attention and after the feed-forward layer;
* ``pfeiffer``: one adapter per block, after the feed-forward layer.

Near-identity initialisation (both weights ~ N(0, init_scale = 1e-3), zero biases) makes the
wrapped model start as the base model; ``zero_init_up: true`` makes it start *exactly* there.
Houlsby also trains the LayerNorms (``train_layernorm``; T5's RMSNorm gains likewise).

The adapter is a child of the sub-layer it follows (``transformer.h.0.attn.adapter.down.weight``)
and runs from a forward hook on that sub-layer, so no base module is replaced and every base
state-dict key stays as it was. Adapters cannot be merged into the base weights (the GELU/ReLU
sits between down and up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.nn.norms import RMSNorm
from llmlab.peft import TunerLayer
from llmlab.peft.arch import PeftArch
from llmlab.peft.targets import check_fresh, with_defaults

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}
DEFAULTS = {
    "adapter_size": None,  # bottleneck width m ...
    "reduction_factor": None,  # ... or m = d // reduction_factor (exactly one of the two)
    "placement": "houlsby",
    "non_linearity": "gelu",
    "init_scale": 1e-3,
    "zero_init_up": False,
    "train_layernorm": True,
}
ATTR = "adapter"  # the adapter's attribute name on its sub-layer (part of the state-dict keys)
NORMS = (nn.LayerNorm, RMSNorm)  # Houlsby trains the LayerNorms; T5's RMSNorm gains likewise


class Adapter(TunerLayer):
    """``x + up(act(down(x)))``; the identity while ``disabled``."""

    def __init__(self, d: int, m: int, non_linearity: str = "gelu", init_scale: float = 1e-3,
                 zero_init_up: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.non_linearity = non_linearity
        self.down = nn.Linear(d, m, device=device, dtype=dtype)
        self.up = nn.Linear(m, d, device=device, dtype=dtype)
        self.reset_parameters(init_scale, zero_init_up)

    def reset_parameters(self, init_scale: float = 1e-3, zero_init_up: bool = False) -> None:
        # Houlsby §2.1: near-identity, so training starts from the pretrained network's function
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_scale)
            nn.init.zeros_(self.down.bias)
            if zero_init_up:
                nn.init.zeros_(self.up.weight)
            else:
                nn.init.normal_(self.up.weight, std=init_scale)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return x
        return x + self.up(ACTIVATIONS[self.non_linearity](self.down(x)))

    def extra_repr(self) -> str:
        return f"non_linearity={self.non_linearity}"


def _run_adapter(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a sub-layer: its output goes through its adapter (a module-level function,
    so a wrapped model still pickles and deep-copies)."""
    return getattr(module, ATTR)(output)


def bottleneck_size(c: dict, d: int) -> int:
    """m from ``adapter_size`` or ``reduction_factor`` (exactly one given)."""
    size, factor = c["adapter_size"], c["reduction_factor"]
    if (size is None) == (factor is None):
        raise UserError(f"peft=adapter needs exactly one of adapter_size, reduction_factor (got adapter_size={size}, "
                        f"reduction_factor={factor}): e.g. peft.adapter_size=64 peft.reduction_factor=null")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise UserError(f"peft.adapter_size={size!r} must be a positive integer (the bottleneck width m)")
        return size
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0 or int(d // factor) < 1:
        raise UserError(f"peft.reduction_factor={factor!r} must be a number in (0, {d}] so that m = d // r >= 1 "
                        f"(d = {d})")
    return int(d // factor)


def _validate(c: dict) -> None:
    if c["placement"] not in PLACEMENTS:
        raise UserError(f"peft.placement={c['placement']!r} is unknown: use houlsby (after attention and FFN) or "
                        "pfeiffer (after the FFN only)")
    if c["non_linearity"] not in ACTIVATIONS:
        raise UserError(f"peft.non_linearity={c['non_linearity']!r} is unknown: use one of {', '.join(ACTIVATIONS)}")
    scale = c["init_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise UserError(f"peft.init_scale={scale!r} must be a number >= 0 (Houlsby: 1e-3)")
    for key in ("zero_init_up", "train_layernorm"):
        if not isinstance(c[key], bool):
            raise UserError(f"peft.{key}={c[key]!r} must be true or false")


def apply(model: nn.Module, cfg: dict, arch: PeftArch, tokenizer=None) -> None:
    """Add adapters to every block of ``model`` (already frozen by ``apply_peft``)."""
    c = with_defaults(cfg, DEFAULTS, "adapter")
    _validate(c)
    check_fresh(model, "adapter")
    d = arch.width(model)
    m = bottleneck_size(c, d)
    for block in arch.blocks(model):
        subs = arch.sublayers(block)
        for where in PLACEMENTS[c["placement"]]:
            sub = subs[where]
            ref = next(sub.parameters())  # new weights live where the base weights do, in their dtype
            sub.add_module(ATTR, Adapter(d, m, c["non_linearity"], c["init_scale"], c["zero_init_up"],
                                         device=ref.device, dtype=ref.dtype))
            sub.register_forward_hook(_run_adapter)
    if c["train_layernorm"]:
        for module in model.modules():
            if isinstance(module, NORMS):
                module.requires_grad_(True)

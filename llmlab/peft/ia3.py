"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
arXiv:2205.05638, §3.3).

Each target Linear layer gets one learned vector ``l`` (``ia3_l``, initialised to ones, so the
wrapped model starts exactly as the base model). Attention targets (keys, values) rescale their
*output*: ``y = l * (W x + b)``, ``l`` of shape (out, 1). Feed-forward targets rescale their
*input*, which is the paper's ``l_ff * gelu(W_1 x)`` in front of the FFN's second layer:
``y = W (l * x) + b``, ``l`` of shape (1, in). Both fold into ``W`` (rows resp. columns, and the
bias of an output-scaled layer), so ``merge`` removes the extra cost; ``unmerge`` divides back.

Names, shapes and defaults follow Hugging Face ``peft``'s ``IA3Config`` / ``ia3.Linear`` (the
same shapes for GPT-2's Conv1D layers there), so adapters map 1:1 to ``peft``'s files.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.peft import TunerLayer
from llmlab.peft.arch import PeftArch
from llmlab.peft.targets import (check_fresh, find_targets, matches, set_module, tied_parameters,
                                 with_defaults)

DEFAULTS = {
    "target_modules": None,  # None: the architecture's default (PeftArch.ia3_targets)
    "feedforward_modules": None,  # None: the architecture's default, among the targets
    "init_ia3_weights": True,
}
WEIGHTS = ("ia3_l",)


class IA3Linear(nn.Linear, TunerLayer):
    """``base`` (an ``nn.Linear``) with its output (or, ``is_feedforward``, its input) rescaled by ``ia3_l``."""

    mergeable = True

    def __init__(self, base: nn.Linear, is_feedforward: bool, init_ia3_weights: bool = True) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)  # the same Parameter objects: ties and keys survive
        self.register_parameter("bias", base.bias)
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)  # peft's shapes
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        # init_ia3_weights=false keeps a random vector (peft: randn), for tests of a non-trivial adapter
        self.ia3_l = nn.Parameter(torch.ones(shape, **kw) if init_ia3_weights else torch.randn(shape, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_l.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return F.linear(x * scale, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias) * scale

    @torch.no_grad()
    def _rescale(self, inverse: bool) -> None:
        l = self.ia3_l.float()
        if inverse:
            if bool((l == 0).any()):
                raise UserError("an ia3_l entry is 0: this (IA)^3 merge cannot be undone; reload the base model")
            l = 1.0 / l
        w = self.weight
        w.copy_((w.float() * l).to(w.dtype))  # (out, in) * (1, in) scales columns, * (out, 1) rows
        if not self.is_feedforward and self.bias is not None:
            self.bias.copy_((self.bias.float() * l.flatten()).to(self.bias.dtype))

    tied = False  # the weight is shared with another module (set by apply): merging would change that one too

    def merge(self) -> None:
        if self.tied:
            raise UserError("(IA)^3 on a layer with a tied weight (e.g. lm_head = the token embedding) cannot be "
                            "merged: it would change the tied layer too; save the adapter instead")
        if not self.merged:
            self._rescale(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(inverse=True)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.is_feedforward}"


def ia3_config(cfg: dict) -> dict:
    c = with_defaults(cfg, DEFAULTS, "ia3")
    if not isinstance(c["init_ia3_weights"], bool):
        raise UserError(f"peft.init_ia3_weights={c['init_ia3_weights']!r} must be true or false")
    return c


def apply(model: nn.Module, cfg: dict, arch: PeftArch, tokenizer: Any = None) -> None:
    """Wrap the target Linear layers of ``model`` (already frozen by ``apply_peft``) with (IA)^3."""
    c = ia3_config(cfg)
    check_fresh(model, "ia3")
    targets = find_targets(model, c["target_modules"], arch, default=arch.ia3_targets)
    if c["feedforward_modules"] is None:  # the architecture's default, restricted to the chosen targets
        feedforward = {p for p, _ in targets if any(matches(p, n) for n in arch.ia3_feedforward)}
    else:
        feedforward = {p for p, _ in find_targets(model, c["feedforward_modules"], arch, default=(),
                                                  key="feedforward_modules")}
        stray = sorted(feedforward - {p for p, _ in targets})
        if stray:
            raise UserError(f"peft.feedforward_modules selects {', '.join(stray)}, which target_modules does not: "
                            "feedforward_modules must be a subset of target_modules (add them there)")
    tied = tied_parameters(model)
    for path, layer in targets:
        ia3 = IA3Linear(layer, path in feedforward, c["init_ia3_weights"])
        ia3.tied = id(layer.weight) in tied
        set_module(model, path, ia3)


# ---------------------------------------------------------------------- peft directory format
def to_peft(model: nn.Module, arch: PeftArch) -> tuple[dict, dict[str, torch.Tensor]]:
    """``adapter_config.json`` fields and ``adapter_model.safetensors`` tensors of ``peft``'s IA3."""
    from llmlab.peft import io, peft_config

    c = ia3_config(peft_config(model))
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, IA3Linear)]
    if any(m.merged for _, m in layers):
        raise UserError("the (IA)^3 adapter is merged into the base weights: unmerge(model) before saving it")
    config = {
        "peft_type": "IA3",
        "target_modules": io.hf_target_names(model, arch, [p for p, _ in layers]),
        "feedforward_modules": io.hf_target_names(model, arch, [p for p, m in layers if m.is_feedforward]),
        "init_ia3_weights": c["init_ia3_weights"],
        "fan_in_fan_out": arch.name == "gpt",  # Hugging Face GPT-2 stores these layers as Conv1D (in, out)
        "modules_to_save": None,
    }
    return config, io.module_weights(model, arch, IA3Linear, WEIGHTS)


def from_peft(model: nn.Module, adapter_config: dict, state: dict[str, torch.Tensor], arch: PeftArch,
              tokenizer: Any = None) -> None:
    """Apply the (IA)^3 adapter ``peft`` saved (its config and tensors) to ``model``."""
    from llmlab.peft import apply_peft, io

    targets = io.targets_in_state(arch, state, WEIGHTS)
    vectors = {k.removeprefix(io.PEFT_PREFIX).removesuffix(".ia3_l"): t for k, t in state.items()
               if k.endswith(".ia3_l")}  # Hugging Face module path -> ia3_l
    names = adapter_config.get("feedforward_modules")
    feedforward = [io.llmlab_module_path(arch.name, hf) for hf, l in vectors.items() if _is_feedforward(hf, names, l)]
    cfg = {"name": "ia3", "target_modules": targets, "feedforward_modules": feedforward,
           "init_ia3_weights": bool(adapter_config.get("init_ia3_weights", True))}
    apply_peft(model, cfg, tokenizer)
    io.load_weights_into(model, arch, state, WEIGHTS)


def _is_feedforward(hf_path: str, feedforward_modules: Any, ia3_l: torch.Tensor) -> bool:
    """peft's rule (``IA3Model._check_target_module_feedforward``: a regex must match the whole
    path, a name must end it, without a dot) on the Hugging Face path; without names, the shape:
    an input scale is (1, in), an output scale (out, 1)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, hf_path) is not None
    if feedforward_modules is not None:
        return any(hf_path.endswith(name) for name in feedforward_modules)
    return ia3_l.dim() == 2 and ia3_l.size(0) == 1 and ia3_l.size(1) > 1

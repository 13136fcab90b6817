"""LoRA: low-rank adaptation of Linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv:2106.09685, §4.1).

A frozen weight ``W`` (out, in) gets a trainable low-rank update: ``h = W x + b + s * B A x`` with
``A`` (r, in), ``B`` (out, r) and ``s = lora_alpha / r`` (rsLoRA, Kalajdzievski 2023: ``lora_alpha /
sqrt(r)``). ``B`` starts at zero, so the wrapped model starts *exactly* as the base model, and at
step 0 only ``B`` gets a gradient (``dL/dA = s B^T dL/dh x^T = 0``). ``A`` starts like an
``nn.Linear`` weight (Kaiming-uniform, a=sqrt(5): Microsoft's ``loralib`` and ``peft``), or
``N(0, 1/r)`` with ``init_lora_weights: gaussian`` (``peft``'s option). ``merge`` folds
``s B A`` into ``W`` (no extra latency at inference); ``unmerge`` takes it out again.

The wrapped layer *is* the old one with two extra children: :class:`LoraLinear` reuses the base
layer's ``weight`` / ``bias`` Parameters, so tied weights stay tied and the base state-dict keys
stay what they were (``...c_attn.weight``), next to ``...c_attn.lora_A.weight`` and
``...c_attn.lora_B.weight``: exactly ``peft``'s names without its adapter name, which makes the
``peft`` directory format (:mod:`llmlab.peft.io`) a key mapping. Config names are ``peft``'s
``LoraConfig`` fields (conf/peft/lora.yaml).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.errors import UserError
from llmlab.peft import TunerLayer
from llmlab.peft.arch import PeftArch
from llmlab.peft.targets import check_fresh, find_targets, set_module, tied_parameters, with_defaults

DEFAULTS = {
    "r": 8,
    "lora_alpha": 8,  # peft's default (the seed and loralib's demo used 16, i.e. scaling 2 at r=8)
    "lora_dropout": 0.0,
    "target_modules": None,  # None: the architecture's default (PeftArch.lora_targets)
    "use_rslora": False,
    "init_lora_weights": True,
    "bias": "none",
}
BIAS = ("none", "all", "lora_only")
WEIGHTS = ("lora_A.weight", "lora_B.weight")  # per-layer parameter names (peft's, adapter name stripped)


class LoraLinear(nn.Linear, TunerLayer):
    """``base`` (an ``nn.Linear``) plus ``s * lora_B(lora_A(dropout(x)))``; shares ``base``'s Parameters.

    QLoRA (Dettmers et al. 2023, arXiv:2305.14314, §3): a quantized ``base``
    (:class:`llmlab.quant.base.QuantLinear`, e.g. NF4) is kept whole as ``base_layer`` (its packed
    buffers under ``...base_layer.``, peft's name) and run as is; it cannot be merged into.
    """

    mergeable = True

    def __init__(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features, self.out_features = base.in_features, base.out_features
        if isinstance(base, nn.Linear):
            self.base_layer = None
            self.register_parameter("weight", base.weight)  # the same Parameter objects: ties and keys survive
            self.register_parameter("bias", base.bias)
            device, dtype = base.weight.device, base.weight.dtype
        else:  # a quantized layer: no float weight to share; the adapters train in float32
            self.base_layer = base
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
            device, dtype = next(base.buffers(), torch.empty(0)).device, torch.float32
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, **kw)  # default init: Kaiming-uniform(a=sqrt(5))
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init: bool | str) -> None:
        if init is False:
            return  # B random as well (nn.Linear's init): a non-trivial adapter, for tests
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.disabled or self.merged:
            return out
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` (out, in) in float32 (low-precision merges accumulate rounding error)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    tied = False  # the weight is shared with another module (set by apply): merging would change that one too

    def _refuse_quantized(self) -> None:
        if self.base_layer is not None:
            raise UserError(f"LoRA on a quantized layer ({self.base_layer.scheme}, QLoRA) cannot be merged or unmerged: "
                            "the base weight is stored quantized; save the adapter instead, or apply it to the float model")

    @torch.no_grad()
    def merge(self) -> None:
        self._refuse_quantized()
        if self.tied:
            raise UserError("LoRA on a layer with a tied weight (e.g. lm_head = the token embedding) cannot be merged: "
                            "it would change the tied layer too; save the adapter instead (or leave that layer out)")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        self._refuse_quantized()
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def lora_config(cfg: dict) -> dict:
    """The ``peft=lora`` group with defaults filled in, every value checked."""
    c = with_defaults(cfg, DEFAULTS, "lora")
    r, alpha, dropout = c["r"], c["lora_alpha"], c["lora_dropout"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"peft.r={r!r} must be a positive integer (the LoRA rank; 8 is usual)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"peft.lora_alpha={alpha!r} must be a positive number (scaling = lora_alpha / r)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"peft.lora_dropout={dropout!r} must be in [0, 1)")
    if c["init_lora_weights"] not in (True, False, "gaussian"):
        raise UserError(f"peft.init_lora_weights={c['init_lora_weights']!r} is unknown: use true "
                        "(Kaiming-uniform A, zero B), gaussian (A ~ N(0, 1/r), zero B) or false (random B)")
    if c["bias"] not in BIAS:
        raise UserError(f"peft.bias={c['bias']!r} is unknown: use one of {', '.join(BIAS)}")
    if not isinstance(c["use_rslora"], bool):
        raise UserError(f"peft.use_rslora={c['use_rslora']!r} must be true or false")
    return c


def apply(model: nn.Module, cfg: dict, arch: PeftArch, tokenizer: Any = None) -> None:
    """Wrap the target Linear layers of ``model`` (already frozen by ``apply_peft``) with LoRA."""
    c = lora_config(cfg)
    check_fresh(model, "lora")
    tied = tied_parameters(model)
    for path, layer in find_targets(model, c["target_modules"], arch):
        lora = LoraLinear(layer, c["r"], c["lora_alpha"], c["lora_dropout"], c["use_rslora"], c["init_lora_weights"])
        lora.tied = id(getattr(layer, "weight", None)) in tied  # (a quantized layer has no float weight)
        set_module(model, path, lora)
        if c["bias"] == "lora_only" and lora.bias is not None:
            lora.bias.requires_grad_(True)
    if c["bias"] == "all":  # peft: every bias of the model trains
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)


# ---------------------------------------------------------------------- peft directory format
def to_peft(model: nn.Module, arch: PeftArch) -> tuple[dict, dict[str, torch.Tensor]]:
    """``adapter_config.json`` fields and ``adapter_model.safetensors`` tensors of ``peft``'s LoRA."""
    from llmlab.peft import io, peft_config

    c = lora_config(peft_config(model))
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLinear)]
    if any(m.merged for _, m in layers):
        raise UserError("the LoRA adapter is merged into the base weights: unmerge(model) before saving it")
    config = {
        "peft_type": "LORA",
        "r": c["r"],
        "lora_alpha": c["lora_alpha"],
        "lora_dropout": c["lora_dropout"],
        "use_rslora": c["use_rslora"],
        "init_lora_weights": c["init_lora_weights"],
        "bias": c["bias"],
        "target_modules": io.hf_target_names(model, arch, [p for p, _ in layers]),
        "fan_in_fan_out": arch.name == "gpt",  # Hugging Face GPT-2 stores these layers as Conv1D (in, out)
        "modules_to_save": None,
    }
    state = io.module_weights(model, arch, LoraLinear, WEIGHTS)
    if c["bias"] != "none":
        state.update(io.trainable_base_weights(model, arch))
    return config, state


_UNSUPPORTED = {  # LoraConfig fields whose non-default values llmlab's LoRA cannot represent
    "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
    "target_parameters": None, "use_qalora": False,  # (modules_to_save: llmlab.peft.io loads or keeps them)
}


def from_peft(model: nn.Module, adapter_config: dict, state: dict[str, torch.Tensor], arch: PeftArch,
              tokenizer: Any = None) -> None:
    """Apply the LoRA adapter ``peft`` saved (its config and tensors) to ``model``."""
    from llmlab.peft import apply_peft, io

    for key, default in _UNSUPPORTED.items():
        if adapter_config.get(key) not in (default, None, {}, [], False):
            raise UserError(f"this LoRA adapter sets {key}={adapter_config[key]!r}, which llmlab's LoRA does "
                            "not support: re-train it without that option")
    init = adapter_config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        raise UserError(f"this LoRA adapter was initialised with init_lora_weights={init!r}, which changes the "
                        "base weights too: convert it in peft (path_initial_model_for_weight_conversion) first")
    cfg = {
        "name": "lora",
        "r": adapter_config.get("r", 8),
        "lora_alpha": adapter_config.get("lora_alpha", 8),
        "lora_dropout": adapter_config.get("lora_dropout", 0.0),
        "use_rslora": bool(adapter_config.get("use_rslora", False)),
        "init_lora_weights": init,
        "bias": adapter_config.get("bias", "none"),
        # the layers that have weights in the file, as exact llmlab paths (peft's names are its own)
        "target_modules": io.targets_in_state(arch, state, WEIGHTS),
    }
    apply_peft(model, cfg, tokenizer)
    io.load_weights_into(model, arch, state, WEIGHTS)

"""Which Linear layers a tuner wraps (``target_modules``), and tuner-config checking.

Matching follows Hugging Face ``peft`` (``tuners_utils.check_target_module_exists``) so the same
``target_modules`` select the same layers in llmlab and in ``peft``:

* a list of names: a module path matches a name if it *is* the name or ends with ``"." + name``
  (``"c_attn"``, ``"mlp.c_proj"``, ``"query"``, or a full path ``"transformer.h.0.attn.c_attn"``);
* a single string: a regular expression that must match the whole path (``re.fullmatch``);
* ``"all-linear"``: every Linear layer except the output layer (``peft`` leaves out only
  ``get_output_embeddings()``: GPT/T5 ``lm_head``, BERT's MLM decoder; ``PeftArch.heads``);
* ``None``: the architecture's default (``PeftArch.lora_targets`` unless the tuner passes another).

Shared by LoRA, IA3 and QLoRA: nothing here knows what a tuner does with the layers it gets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from llmlab.errors import UserError
from llmlab.peft.arch import PeftArch

ALL_LINEAR = "all-linear"


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of the base model with its path, in module order (a tuner's own
    Linear children, such as LoRA's ``lora_A``, are not part of the base and are left out).
    Quantized Linear layers (:class:`llmlab.quant.base.QuantLinear`: NF4, int8, bitsandbytes'
    wrappers) count too: LoRA on them is QLoRA."""
    from llmlab.peft import TunerLayer  # the package imports this module
    from llmlab.quant.base import QuantLinear

    inside_tuners = {
        id(child) for m in model.modules() if isinstance(m, TunerLayer) for child in m.modules() if child is not m
    }
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantLinear)) and id(m) not in inside_tuners]


def matches(path: str, name: str) -> bool:
    """``peft``'s rule for one target name."""
    return path == name or path.endswith("." + name)


def find_targets(model: nn.Module, target_modules: Any, arch: PeftArch,
                 default: Sequence[str] | None = None, key: str = "target_modules") -> list[tuple[str, nn.Linear]]:
    """``(path, layer)`` of each Linear layer ``target_modules`` selects, in module order.

    ``default`` replaces ``arch.lora_targets`` when ``target_modules`` is None (IA3 has its own);
    ``key`` names the config field in error messages. A name or regex that selects no Linear
    layer is a UserError listing the model's Linear layer names.
    """
    layers = linear_layers(model)
    if target_modules is None:
        target_modules = list(default if default is not None else arch.lora_targets)
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return [(p, m) for p, m in layers if not any(matches(p, head) for head in arch.heads)]
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise UserError(f"peft.{key}={target_modules!r} is not a valid regular expression ({e}): "
                            "give a list of module names, a regex, or all-linear") from None
        found = [(p, m) for p, m in layers if pattern.fullmatch(p)]
        if not found:
            raise UserError(f"peft.{key}={target_modules!r} matches no Linear layer path of {arch.name} (a string "
                            f"is a regex on whole paths such as {layers[0][0]!r}; names go in a list: "
                            f"{key}=[{target_modules}]); {_choices(layers)}")
        return found
    if not isinstance(target_modules, Sequence) or not all(isinstance(n, str) for n in target_modules):
        raise UserError(f"peft.{key}={target_modules!r} must be a list of module names, a regex string, "
                        f"or {ALL_LINEAR}")
    names = list(target_modules)
    missing = [n for n in names if not any(matches(p, n) for p, _ in layers)]
    if missing:
        raise UserError(f"peft.{key} names {', '.join(map(repr, missing))}, which is no Linear layer of "
                        f"{arch.name}: {_choices(layers)}")
    return [(p, m) for p, m in layers if any(matches(p, n) for n in names)]


def _choices(layers: list[tuple[str, nn.Linear]]) -> str:
    leaves = dict.fromkeys(p.rsplit(".", 1)[-1] for p, _ in layers)  # deduplicated, in model order
    suffix = ".".join(layers[-2 if len(layers) > 1 else 0][0].split(".")[-2:])  # e.g. mlp.c_proj
    return f"use some of {', '.join(leaves)} (or a dotted suffix such as {suffix}), or {ALL_LINEAR}"


def tied_parameters(model: nn.Module) -> set[int]:
    """ids of the Parameters used by more than one module (GPT's ``lm_head`` = the token embedding)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (replacing what was there)."""
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def with_defaults(cfg: dict, defaults: dict, tuner: str) -> dict:
    """``cfg`` (the ``peft`` group: ``name`` + keys) over ``defaults``; unknown keys are a UserError."""
    unknown = sorted(set(cfg) - set(defaults) - {"name"})
    if unknown:
        raise UserError(f"peft={tuner} has no key {', '.join(unknown)}: valid keys are {', '.join(defaults)}")
    return {**defaults, **{k: v for k, v in cfg.items() if k != "name"}}


def check_fresh(model: nn.Module, tuner: str) -> None:
    """Refuse to stack a second tuner on a model that already carries one."""
    from llmlab.peft import tuner_layers

    if tuner_layers(model):
        raise UserError(f"peft={tuner}: the model already has a tuner applied; start from the base model "
                        "(or merge the first adapter and reload it as a base)")

"""Parameter-efficient fine-tuning (the ``peft`` config group): tuners that wrap a trained model.

The builder applies one tuner to the trained model (``apply_peft``; DESIGN.md "Models by role"),
never a method: the base weights are frozen and bit-identical after training, only the tuner's
parameters train (plus, for ``bitfit`` / ``freeze``, the base parameters they select). Names
follow Hugging Face ``peft`` (``r``, ``lora_alpha``, ``target_modules``, ``num_virtual_tokens`` ...),
and LoRA, IA3, prefix and prompt adapters read and write ``peft``'s directory format
(:func:`save_adapter`, :func:`load_adapter`).

Tuners (one module each, each with ``apply(model, cfg, arch, tokenizer)``):

=============  =================================================================================
``none``       full fine-tuning (nothing wrapped, everything trains)
``lora``       low-rank update ``W + (alpha/r) B A`` of target Linear layers (Hu et al. 2021)
``ia3``        learned rescaling of keys, values and FFN activations (Liu et al. 2022)
``adapter``    bottleneck adapters after attention and FFN (Houlsby et al. 2019; Pfeiffer variant)
``prefix``     key/value prefixes in every layer, MLP reparameterisation (Li & Liang 2021)
``ptuning_v2`` deep prompts: a key/value prefix per layer, no reparameterisation (Liu et al. 2022)
``prompt``     soft prompt: virtual token embeddings before the input (Lester et al. 2021)
``bitfit``     biases only (Ben Zaken et al. 2022)
``freeze``     only the top ``k`` blocks train
=============  =================================================================================
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Iterable, Any, Iterator

import torch
from torch import nn

from llmlab.errors import UserError
from llmlab.peft.arch import PeftArch, peft_arch

log = logging.getLogger(__name__)

TUNERS = {
    "none": None,
    "lora": "llmlab.peft.lora",
    "ia3": "llmlab.peft.ia3",
    "adapter": "llmlab.peft.adapter",
    "prefix": "llmlab.peft.prompt",
    "ptuning_v2": "llmlab.peft.prompt",
    "prompt": "llmlab.peft.prompt",
    "bitfit": "llmlab.peft.selective",
    "freeze": "llmlab.peft.selective",
}
CONFIG_ATTR = "peft_config"  # the applied tuner's config, kept on the model (plain dict)
RUN_KEYS = ("lr",)  # keys of the `peft` group for the run (the tuner's learning rate), not the tuner
BASE_KEYS_ATTR = "peft_base_keys"  # the state-dict keys the model had before the tuner (its base)


class TunerLayer(nn.Module):
    """Base of every module a tuner adds. ``disabled`` switches it off (output = base model's);
    tuners that can fold into the base weights implement ``merge`` / ``unmerge``."""

    disabled = False
    merged = False
    mergeable = False
    no_weight_decay = False  # True: the optimizer leaves its parameters undecayed (learned embeddings: prompts, prefixes)

    def merge(self) -> None:
        raise UserError(f"{type(self).__name__} cannot be merged into the base weights")

    def unmerge(self) -> None:
        raise UserError(f"{type(self).__name__} cannot be unmerged")


def tuner_name(cfg: dict | None) -> str:
    name = (cfg or {}).get("name") or "none"
    if name not in TUNERS:
        raise UserError(f"peft={name!r} is not a tuner llmlab has: choose one of {', '.join(TUNERS)}")
    return name


def apply_peft(model: nn.Module, cfg: dict | None, tokenizer: Any = None) -> nn.Module:
    """Wrap ``model`` in place with the tuner ``cfg`` describes (the ``peft`` group); returns it.

    Everything of the base is frozen first; the tuner then adds its (trainable) modules or
    unfreezes the base parameters it selects. ``peft=none`` returns the model untouched.
    """
    name = tuner_name(cfg)
    if TUNERS[name] is None:
        return model
    arch = peft_arch(model)
    inner = getattr(model, "_orig_mod", model)
    inner.requires_grad_(False)
    setattr(inner, BASE_KEYS_ATTR, frozenset(inner.state_dict()))
    cfg = {k: v for k, v in cfg.items() if k not in RUN_KEYS}
    importlib.import_module(TUNERS[name]).apply(inner, dict(cfg), arch, tokenizer)
    setattr(inner, CONFIG_ATTR, dict(cfg))
    counts = count_parameters(inner)
    log.info("peft=%s: %s of %s parameters train (%.4f%%)", name, f"{counts['trainable']:,}",
             f"{counts['total']:,}", counts["trainable_pct"])
    return model


def peft_config(model: nn.Module) -> dict | None:
    """The tuner config applied to ``model`` (None: not wrapped)."""
    return getattr(getattr(model, "_orig_mod", model), CONFIG_ATTR, None)


def base_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the base model under the tuner (all keys if no tuner was applied)."""
    inner = getattr(model, "_orig_mod", model)
    keys = getattr(inner, BASE_KEYS_ATTR, None)
    return keys if keys is not None else frozenset(inner.state_dict())


def count_parameters(model: nn.Module | Iterable[nn.Parameter]) -> dict:
    """``total``, ``trainable``, ``frozen`` (tied weights once) and ``trainable_pct`` (spec §2.4) of a
    module or of a list of parameters."""
    params = {id(p): p for p in (model.parameters() if isinstance(model, nn.Module) else model)}.values()
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"total": total, "trainable": trainable, "frozen": total - trainable,
            "trainable_pct": 100.0 * trainable / max(total, 1)}


def trainable_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights a PEFT checkpoint stores: every parameter that trains (the base is referenced)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {f"{prefix}{k}": v for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable}


def tuner_layers(model: nn.Module) -> list[TunerLayer]:
    return [m for m in model.modules() if isinstance(m, TunerLayer)]


def merge(model: nn.Module) -> nn.Module:
    """Fold mergeable tuners (LoRA, IA3) into the base weights: same outputs, no extra latency."""
    layers = tuner_layers(model)
    stuck = sorted({type(m).__name__ for m in layers if not m.mergeable})
    if stuck:
        raise UserError(f"peft={(peft_config(model) or {}).get('name')} adds {', '.join(stuck)}, which cannot be "
                        "merged into the base weights: export the adapter instead (llmlab export writes both)")
    for m in layers:
        if not m.merged:
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` (the base weights return to their values up to float rounding)."""
    for m in tuner_layers(model):
        if m.merged:
            m.unmerge()
    return model


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone (every tuner layer switched off) inside the block."""
    layers = tuner_layers(model)
    if any(m.merged for m in layers):
        raise UserError("the adapter is merged into the weights: unmerge(model) before disabling it")
    saved = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, d in zip(layers, saved):
            m.disabled = d


def save_adapter(model: nn.Module, out_dir) -> Any:
    """Write ``model``'s adapter as a Hugging Face ``peft`` directory (see :mod:`llmlab.peft.io`)."""
    from llmlab.peft.io import save_adapter as _save

    return _save(model, out_dir)


def load_adapter(model: nn.Module, adapter_dir, tokenizer: Any = None) -> nn.Module:
    """Apply a ``peft``-saved adapter directory to an llmlab model (see :mod:`llmlab.peft.io`)."""
    from llmlab.peft.io import load_adapter as _load

    return _load(model, adapter_dir, tokenizer)


__all__ = ["TUNERS", "TunerLayer", "PeftArch", "apply_peft", "peft_config", "count_parameters",
           "trainable_state_dict", "base_keys", "merge", "unmerge", "disable_adapters", "save_adapter", "load_adapter"]

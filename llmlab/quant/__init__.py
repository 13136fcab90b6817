"""Quantization (the ``quant`` config group): which Linear layers a scheme replaces, and how.

The builder applies one scheme to the trained model (:func:`apply_quant`; DESIGN.md "Models by
role"): after ``model.init_from`` is loaded and before a tuner (``peft=``) wraps it, so
``quant=nf4 peft=lora`` is QLoRA. ``llmlab eval`` / ``llmlab infer`` apply a scheme on the fly to
a loaded checkpoint (:func:`quantize_trained`) and ``llmlab quantize`` writes the result as a new
checkpoint. A checkpoint records the scheme (llmlab metadata ``quant``), and loading it applies the
same structure before ``load_state_dict``, so the packed buffers in the file land in place.

=============  ==================================================================================
``none``       float weights, as trained
``bf16``       weights stored in bfloat16 (2 bytes/param; fp32's exponent range)       ``bf16.py``
``int8``       absmax int8 per output channel (or per ``group_size`` input columns)  ``absmax.py``
``int4``       absmax int4, two codes per byte (Dettmers et al. 2022 §2; PTQ)        ``absmax.py``
``qat_int8``   quantization-aware training: fake-quant + STE, exported to int8        ``fake.py``
``qat_int4``   the same at 4 bits                                                     ``fake.py``
``llm_int8``   vector-wise int8 + fp outlier columns (Dettmers et al. 2022)       ``llm_int8.py``
``nf4``        4-bit NormalFloat, blocks of 64, double quantisation (QLoRA)            ``nf4.py``
=============  ==================================================================================

Each scheme module has ``quantize_linear(layer: nn.Linear, cfg: dict) -> nn.Module``. This module
imports no torch at import time: :mod:`llmlab.schema` reads :data:`SCHEMES` before torch loads.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from llmlab.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = {
    "none": None,
    "bf16": "llmlab.quant.bf16",
    "int8": "llmlab.quant.absmax",
    "int4": "llmlab.quant.absmax",
    "qat_int8": "llmlab.quant.fake",
    "qat_int4": "llmlab.quant.fake",
    "llm_int8": "llmlab.quant.llm_int8",
    "nf4": "llmlab.quant.nf4",
}
QAT_SCHEMES = ("qat_int8", "qat_int4")  # the weights still train (fake quantization); not yet stored quantized
BACKENDS = ("llmlab", "bnb")  # quant.backend: llmlab's own kernels or bitsandbytes' (llm_int8, nf4)
MIN_BITS, MAX_BITS = 2, 8  # quant.bits: integer codes from 2 to 8 bits (absmax, QAT)
CONFIG_ATTR = "quant_config"  # the applied scheme's config, kept on the model (plain dict)
DEFAULT_SKIP = ("lm_head",)  # llm_int8_skip_modules' default: the output layer stays in float (bitsandbytes, too)


def quant_name(cfg: dict | None) -> str:
    """The scheme a ``quant`` config names (``none`` for None)."""
    name = (cfg or {}).get("name") or "none"
    if name not in SCHEMES:
        raise UserError(f"quant={name!r} is not a quantization scheme llmlab has: choose one of {', '.join(SCHEMES)}")
    return name


def is_real(cfg: dict | None) -> bool:
    """True for schemes that store the weights quantized (not ``none``, not QAT's trainable floats)."""
    name = quant_name(cfg)
    return name != "none" and name not in QAT_SCHEMES


def quant_config(model) -> dict | None:
    """The scheme applied to ``model`` (None: float weights)."""
    return getattr(getattr(model, "_orig_mod", model), CONFIG_ATTR, None)


def is_quantized(model) -> bool:
    """The model's weights are stored quantized (a PTQ scheme or an exported QAT model): quantizing
    it again would quantize already-rounded codes."""
    return is_real(quant_config(model))


def target_layers(model, cfg: dict) -> list[tuple[str, Any]]:
    """``(path, layer)`` of each float ``nn.Linear`` a scheme replaces: every one except those named
    by ``llm_int8_skip_modules`` (a path equal to or ending with ``.<name>``, as bitsandbytes and peft
    match) and those whose weight is tied to another module (GPT's ``lm_head`` is ``wte``)."""
    from torch import nn

    from llmlab.peft.targets import linear_layers, matches
    from llmlab.quant.base import QuantLinear

    skip = cfg.get("llm_int8_skip_modules")
    skip = list(DEFAULT_SKIP if skip is None else skip)
    users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    return [(path, m) for path, m in linear_layers(model)
            if isinstance(m, nn.Linear) and not isinstance(m, QuantLinear)
            and not any(matches(path, name) for name in skip) and users.get(id(m.weight), 0) < 2]


def scheme_module(name: str):
    """The module implementing scheme ``name`` (``quantize_linear``)."""
    path = SCHEMES[name]
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name != path:
            raise
        raise UserError(f"quant={name} is not available in this llmlab ({path} is missing): "
                        f"choose one of {', '.join(n for n, p in SCHEMES.items() if p is None or _exists(p))}") from None


def _exists(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def apply_quant(model, cfg: dict | None):
    """Replace the target Linear layers of ``model`` in place with the scheme ``cfg`` names; returns it.

    ``quant=none`` returns the model untouched. The same scheme applied twice is a no-op (a model
    loaded from a quantized checkpoint already has it); another scheme on a quantized model is one
    line (its weights are already rounded).
    """
    name = quant_name(cfg)
    if SCHEMES[name] is None:
        return model
    inner = getattr(model, "_orig_mod", model)
    cfg = dict(cfg)
    existing = quant_config(inner)
    if existing is not None:
        if existing == cfg:
            return model
        raise UserError(f"the model is already quantized (quant={quant_name(existing)}): quantize the float "
                        f"checkpoint it came from instead, or drop quant={name}")
    module = scheme_module(name)
    layers = target_layers(inner, cfg)
    if not layers:
        raise UserError(f"quant={name} finds no Linear layer to quantize (every one is skipped by "
                        f"llm_int8_skip_modules={cfg.get('llm_int8_skip_modules')} or tied): skip fewer modules")
    for path, layer in layers:
        inner.set_submodule(path, module.quantize_linear(layer, cfg))
    setattr(inner, CONFIG_ATTR, cfg)
    log.info("quant=%s: %d Linear layers replaced", name, len(layers))
    return model


def quantize_trained(model, cfg: dict) -> dict:
    """Quantize a trained (loaded) model in place for ``llmlab quantize`` and ``quant=`` at eval /
    infer; returns the config to record in its checkpoint.

    * a model already stored quantized: one line (nothing to do twice);
    * a QAT-trained model and ``quant=qat_int<b>`` (its own bits): exported to real integers
      (:func:`llmlab.quant.fake.export`: the same outputs as its fake-quant forward);
    * a QAT-trained model and another scheme: that scheme on the latent float weights;
    * a float model and ``quant=qat_int<b>``: post-training absmax at those bits (there is nothing
      fake-quant could have learned; activation observers never saw data, so weights only).
    """
    name = quant_name(cfg)
    existing = quant_config(model)
    if is_real(existing):
        raise UserError(f"the checkpoint is already quantized (quant={quant_name(existing)}): quantize the "
                        "float checkpoint it came from instead")
    if name == "none":
        return existing
    from llmlab.quant import fake

    if quant_name(existing) in QAT_SCHEMES:
        if name in QAT_SCHEMES:
            if int(cfg.get("bits")) != int(existing.get("bits")):
                raise UserError(f"the checkpoint was trained with quant={quant_name(existing)} "
                                f"(bits={existing.get('bits')}): export it with quant={quant_name(existing)}, "
                                "or pick a post-training scheme (int8, int4, nf4 ...)")
            return fake.export(model)
        fake.to_float(model)  # the latent float weights the fake quantizers were trained on
    elif name in QAT_SCHEMES:
        cfg = fake.ptq_config(cfg)
        log.info("quant=%s on a float checkpoint: post-training %s (per %s, weights only)", name, cfg["name"],
                 f"group of {cfg['group_size']}" if cfg.get("group_size") else "output channel")
    apply_quant(model, cfg)
    return quant_config(model)


def storage(model) -> dict[str, float]:
    """What the quantized Linear layers hold: ``params`` (weights they stand for), ``bytes`` (their
    codes and scales, biases excluded) and ``layers``."""
    from llmlab.quant.base import QuantLinear

    params = nbytes = layers = 0
    for m in getattr(model, "_orig_mod", model).modules():
        if isinstance(m, QuantLinear):
            bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            nbytes += m.storage_bytes() - bias
            params += m.in_features * m.out_features
            layers += 1
    return {"params": params, "bytes": nbytes, "layers": layers}

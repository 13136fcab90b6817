"""Pruning: sparsity masks on a trained model's Linear layers (the ``prune`` config group).

Pruning sets a subset of weights to zero and leaves the rest unchanged (quantization keeps every
weight and lowers its bits; spec §2.11). This module holds what every pruning method shares:

* **masks** (:func:`set_mask`): a 0/1 tensor per pruned parameter, kept as a *non-persistent*
  buffer ``<name>_mask`` next to it (torch's ``prune`` names it ``weight_mask`` too). Unlike
  ``torch.nn.utils.prune`` the zeros are written into the weight itself rather than recomputed as
  ``weight_orig * weight_mask`` in every forward: the state dict keeps its plain keys
  (``...c_attn.weight``, no ``weight_orig``), so a pruned checkpoint *is* a plain GPT checkpoint
  that ``llmlab eval`` / ``model.init_from`` / the HF export load as they are — pruning is
  permanent on save, like ``prune.remove``. Sparsity survives training because (1) a gradient hook
  zeroes the gradient of pruned weights, so Adam's moments of them stay zero, and (2) every
  optimizer's step post-hook (:func:`keep_masks_after_steps`) writes the zeros again after each
  step (weight decay, or moments from before an iterative pruning step, would otherwise revive
  them). A resumed run rebuilds its masks from the zeros it reads (:func:`masks_from_zeros`).
* **magnitude pruning** (unstructured, Han et al. 2015, "Learning both Weights and Connections",
  https://arxiv.org/abs/1506.02626): per layer, the ``round(amount * numel)`` weights of smallest
  |w| — the mask ``torch.nn.utils.prune.l1_unstructured`` computes; globally, the same count over
  the concatenation of every target layer (``prune.global_unstructured`` with ``L1Unstructured``).
  The seed (S3 2.2) calls its per-layer ``l1_unstructured`` call "global"; here the two are
  separate methods, ``magnitude`` and ``magnitude_global``.
* :func:`prune_model`, the one entry point: ``cfg`` (the group) -> masks on the model, using
  Wanda (:mod:`llmlab.quant.prune_wanda`) and attention-head pruning
  (:mod:`llmlab.quant.prune_heads`) for the activation- and gradient-based methods.
* the iterative schedule (:func:`scheduled_amount`): Zhu & Gupta 2017, "To prune, or not to prune"
  (https://arxiv.org/abs/1710.01878) §3, eq. (1): sparsity ramps cubically from ``initial_amount`` to
  ``amount`` between ``begin_step`` and ``end_step``, masks recomputed every ``every_n_steps``.

The Lightning side (pruning at fit start, iterative updates, ``train/sparsity``) is
:mod:`llmlab.quant.prune_callback`; ``llmlab eval prune=...`` and the perplexity-vs-sparsity curve
are :mod:`llmlab.quant.prune_curve`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from llmlab.errors import UserError

log = logging.getLogger(__name__)

# the `prune` group's options (conf/prune); "curve" is `llmlab eval`'s sweep over methods x amounts
METHODS = ("magnitude", "magnitude_global", "wanda", "heads")
COMMON = {
    "amount": 0.5,  # fraction of the targeted weights (heads: of the attention heads) set to zero, in [0, 1)
    "schedule": "one_shot",  # one_shot | iterative (training only)
    "initial_amount": 0.0,  # iterative: sparsity at begin_step
    "begin_step": 0,  # iterative: first step that prunes
    "end_step": None,  # iterative: step at which `amount` is reached (None = the run's last step)
    "every_n_steps": 10,  # iterative: masks are recomputed every N optimizer steps (Zhu & Gupta's Δt)
    "ramp": "cubic",  # iterative: cubic (Zhu & Gupta eq. 1) | linear
    "target_modules": "all-linear",  # which Linear layers (peft's matching rules); heads: attention layers
    "calibration_batches": 8,  # wanda / heads: training batches the scores are computed on
}
DEFAULTS = {
    "magnitude": dict(COMMON),
    "magnitude_global": dict(COMMON),
    "wanda": {**COMMON, "sequential": True},  # True: block by block, inputs through the already-pruned blocks (Wanda's code)
    "heads": {**COMMON, "normalize_by_layer": True},  # Michel & Neubig §4.2: l2-normalise importances within a layer
    "curve": {**COMMON, "methods": ["magnitude", "wanda"], "amounts": [0.0, 0.5], "sequential": True,
              "normalize_by_layer": True},
}

LossFn = Callable[[Any], torch.Tensor]  # a batch -> the scalar loss the model trains on


# ---------------------------------------------------------------------------- configuration


def prune_name(cfg: Any) -> str:
    """The ``prune`` option of a config node: none for null / ``name: none``."""
    if not cfg:
        return "none"
    return str(cfg.get("name") or "none")


def prune_config(cfg: Any) -> dict | None:
    """The ``prune`` group as a plain dict over its method's defaults; None for no pruning.
    Unknown methods and keys are one line (a typo would otherwise prune with a default)."""
    from llmlab.utils import plain

    cfg = plain(cfg)
    name = prune_name(cfg)
    if name == "none":
        return None
    if name not in DEFAULTS:
        raise UserError(f"prune={name} is not a pruning method: use one of none, {', '.join(DEFAULTS)}")
    defaults = DEFAULTS[name]
    unknown = sorted(set(cfg) - set(defaults) - {"name"})
    if unknown:
        raise UserError(f"prune={name} has no key {', '.join(unknown)}: valid keys are {', '.join(defaults)}")
    out = {"name": name, **defaults, **{k: v for k, v in cfg.items() if k != "name"}}
    for key in ("amount", "initial_amount", *(("amounts",) if name == "curve" else ())):
        for value in (out[key] if key == "amounts" else [out[key]]):
            check_amount(value, key)
    if name == "curve":
        bad = [m for m in out["methods"] if m not in METHODS]
        if bad or not out["methods"]:
            raise UserError(f"prune.methods={out['methods']}: each must be one of {', '.join(METHODS)}")
    return out


def check_amount(value: Any, key: str = "amount") -> float:
    """torch prune's ``amount`` as a fraction: [0, 1) (1 would zero every weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"prune.{key}={value} is not a fraction in [0, 1): pass the share of weights to set to "
                        "zero, e.g. prune.amount=0.5")
    return float(value)


def target_layers(model: nn.Module, target_modules: Any = "all-linear") -> list[tuple[str, nn.Linear]]:
    """``(path, layer)`` of the Linear layers to prune: ``target_modules`` as in ``peft`` (a list of
    names, a regex, ``all-linear`` = every Linear but the output head), never a layer whose weight
    is tied to an embedding (GPT's ``lm_head``: pruning it would prune the token embeddings)."""
    from llmlab.peft.arch import peft_arch
    from llmlab.peft.targets import find_targets, tied_parameters

    try:
        arch = peft_arch(model)
    except UserError:
        raise UserError(f"pruning finds its target layers in GPT, BERT and T5 models; "
                        f"{type(model).__name__} is none of them: prune one of those") from None
    try:
        layers = find_targets(model, target_modules, arch, default=[])
    except UserError as e:  # peft's messages, about this group's key
        raise UserError(str(e).replace("peft.", "prune.")) from None
    tied = tied_parameters(model)
    layers = [(p, m) for p, m in layers if type(m) is nn.Linear and id(m.weight) not in tied]
    if not layers:
        raise UserError(f"prune.target_modules={target_modules!r} selects no untied nn.Linear layer: "
                        "use all-linear or names such as [c_attn, c_fc]")
    return layers


# ---------------------------------------------------------------------------- masks


def _mask_name(name: str) -> str:
    return f"{name}_mask"


def set_mask(layer: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Keep ``layer.<name>`` zero where ``mask`` is 0, from now on (see the module docstring)."""
    param = getattr(layer, name)
    mask = mask.detach().to(device=param.device, dtype=param.dtype).clone()  # own, contiguous storage
    if mask.shape != param.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit {name} {tuple(param.shape)}")
    buf = _mask_name(name)
    if buf in layer._buffers:
        layer._buffers[buf].copy_(mask)
    else:
        layer.register_buffer(buf, mask, persistent=False)  # not saved: the zeros in the weight are
        handles = layer.__dict__.setdefault("_prune_hooks", {})
        if isinstance(param, nn.Parameter):
            # read the buffer at call time: later (iterative) masks replace its values in place
            handles[name] = param.register_hook(lambda grad, layer=layer, buf=buf: grad * layer._buffers[buf])
    with torch.no_grad():
        param.mul_(mask)


def masked(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(layer, parameter name)`` that carries a mask."""
    return [(m, b[: -len("_mask")]) for m in model.modules() for b in m._buffers
            if b.endswith("_mask") and b[: -len("_mask")] in m._parameters]


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Write the zeros of every mask into its parameter again (after an optimizer step)."""
    for layer, name in masked(model):
        getattr(layer, name).mul_(layer._buffers[_mask_name(name)])


def remove_masks(model: nn.Module) -> None:
    """Drop masks and hooks (``torch.nn.utils.prune.remove``): the weights keep their zeros but
    train freely again."""
    for layer, name in masked(model):
        del layer._buffers[_mask_name(name)]
        handle = layer.__dict__.get("_prune_hooks", {}).pop(name, None)
        if handle is not None:
            handle.remove()


def masks_from_zeros(layers: Iterable[tuple[str, nn.Module]]) -> None:
    """Masks = where the weights are nonzero (a resumed pruned run: the checkpoint holds the zeros)."""
    for _, layer in layers:
        set_mask(layer, "weight", (layer.weight != 0).to(layer.weight.dtype))


def keep_masks_after_steps(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> list:
    """After every ``optimizer.step()``, re-apply the model's masks; returns the hook handles."""
    return [opt.register_step_post_hook(lambda *_: apply_masks(model)) for opt in optimizers]


def sparsity(layers: Iterable[tuple[str, nn.Module]]) -> float:
    """Fraction of exact zeros in the weights of ``layers`` (what pruning actually achieved)."""
    zeros = total = 0
    for _, layer in layers:
        zeros += int((layer.weight == 0).sum())
        total += layer.weight.numel()
    return zeros / total if total else 0.0


# ---------------------------------------------------------------------------- magnitude


def smallest_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """0 at the ``round(amount * numel)`` smallest scores, 1 elsewhere: ``torch.nn.utils.prune``'s
    ``L1Unstructured.compute_mask`` given |w| (same count, same ``topk(largest=False)``)."""
    k = round(amount * scores.numel())  # prune._compute_nparams_toprune: round(amount * tensor_size)
    mask = torch.ones_like(scores)
    if k:
        mask.view(-1)[torch.topk(scores.reshape(-1), k, largest=False).indices] = 0
    return mask


def magnitude(layers: Sequence[tuple[str, nn.Linear]], amount: float) -> None:
    """Per layer: the smallest |w| of each layer, ``amount`` of it (``prune.l1_unstructured``)."""
    for _, layer in layers:
        set_mask(layer, "weight", smallest_mask(layer.weight.detach().abs(), amount))


def magnitude_global(layers: Sequence[tuple[str, nn.Linear]], amount: float) -> None:
    """Globally: the smallest |w| over all layers together (``prune.global_unstructured``), so layers
    of small weights lose more than ``amount`` and others less."""
    scores = [layer.weight.detach().abs() for _, layer in layers]
    flat = smallest_mask(torch.cat([s.reshape(-1) for s in scores]), amount)
    for (_, layer), piece in zip(layers, torch.split(flat, [s.numel() for s in scores])):
        set_mask(layer, "weight", piece.view_as(layer.weight))


# ---------------------------------------------------------------------------- entry point


def prune_model(model: nn.Module, cfg: dict, batches: Sequence[Any] = (), loss_fn: LossFn | None = None,
                amount: float | None = None) -> dict[str, float]:
    """Prune ``model`` as ``cfg`` (from :func:`prune_config`) says, at ``amount`` (default
    ``cfg["amount"]``); ``batches`` + ``loss_fn`` feed Wanda's activation norms and the heads'
    gradients. Returns ``{"prune/sparsity": ..., ...}``; masks stay on the model."""
    name = cfg["name"]
    amount = check_amount(cfg["amount"] if amount is None else amount)
    if name in ("wanda", "heads") and (not batches or loss_fn is None):
        raise UserError(f"prune={name} needs calibration batches (prune.calibration_batches >= 1)")
    if name == "heads":
        from llmlab.quant.prune_heads import prune_heads_by_importance

        return prune_heads_by_importance(model, amount, batches, loss_fn, cfg["normalize_by_layer"])
    layers = target_layers(model, cfg["target_modules"])
    if name == "magnitude":
        magnitude(layers, amount)
    elif name == "magnitude_global":
        magnitude_global(layers, amount)
    elif name == "wanda":
        from llmlab.quant.prune_wanda import wanda

        wanda(model, layers, amount, batches, loss_fn, sequential=cfg["sequential"])
    else:
        raise UserError(f"prune={name} is not a pruning method: use one of {', '.join(METHODS)}")
    return {"prune/sparsity": sparsity(layers), "prune/amount": amount}


def pruned_layers(model: nn.Module, cfg: dict) -> list[tuple[str, nn.Module]]:
    """The layers whose zeros ``prune/sparsity`` counts for ``cfg``'s method."""
    if cfg["name"] == "heads":
        from llmlab.quant.prune_heads import attention_layers

        return attention_layers(model)
    return target_layers(model, cfg["target_modules"])


# ---------------------------------------------------------------------------- iterative schedule


def scheduled_amount(step: int, cfg: dict, last_step: int) -> float:
    """Sparsity at optimizer step ``step`` (Zhu & Gupta 2017 eq. 1):
    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3 for t0 <= t <= t0 + nΔt (= end_step), with
    ``ramp: linear`` the straight line instead. 0 before ``begin_step``, ``amount`` after ``end_step``."""
    begin, end = int(cfg["begin_step"]), int(cfg["end_step"] or last_step)
    final, initial = float(cfg["amount"]), float(cfg["initial_amount"])
    if step < begin:
        return 0.0
    progress = 1.0 if end <= begin else min(1.0, (step - begin) / (end - begin))
    if cfg["ramp"] == "linear":
        return initial + (final - initial) * progress
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step: int, cfg: dict, last_step: int) -> bool:
    """Zhu & Gupta: masks are updated every Δt steps from t0 to the end of the ramp (and at its end)."""
    begin, end = int(cfg["begin_step"]), int(cfg["end_step"] or last_step)
    return begin <= step <= end and ((step - begin) % int(cfg["every_n_steps"]) == 0 or step == end)
